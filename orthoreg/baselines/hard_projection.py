r"""GuardSpace-style hard projection (arXiv 2510.14301): LoRA's A kept orthogonal to each module's input subspace.

For every LoRA module m named in the ``InputSubspaces`` (V_m: k × d_in, orthonormal rows), after every optimizer step
(and once when training starts)

.. math:: A_m \leftarrow A_m - (A_m V_m^\top)\, V_m

so :math:`A_m V_m^\top = 0` and ΔW_m x = s B_m A_m x = 0 for every input x in span(V_m): on those inputs the module's
output is the base model's, exactly — the hard counterpart of the reader-side penalty s²‖B(AVᵀ)‖² (``orthoreg.reader.penalty``).
GuardSpace builds its projector from a covariance-preconditioned SVD of harmful-prompt activations and also freezes a
"safety" part of the weights; this baseline keeps only the null-space constraint, with the same V_m as the reader
penalty, so the two compare like for like.

**Why a projection after the step, not a parametrisation** (A = Â(I − VᵀV) in every forward): it costs nothing in
the forward or backward, works with any optimizer and with activation checkpointing, and the saved adapter is the
constrained one (a parametrisation would save Â). Its price: the optimizer's moments keep components along V_m that
the next projection removes again; the constraint itself holds exactly after every step. The projection is float64,
written back in the parameter's dtype.

Sharded parameters: an FSDP2 shard of A split by rows (``Shard(0)``, FSDP2's default) holds whole rows and is
projected in place; ZeRO-3-partitioned A is refused (use the reader penalty there).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..core.layers import active_lora_adapter, is_lora_layer
from ..reader.subspaces import InputSubspaces, InputSubspacesError

__all__ = ["HardProjectionCallback", "InputNullSpaceProjection"]


class InputNullSpaceProjection:
    """Projects LoRA's A off the input subspaces: A ← A − (A Vᵀ) V (module docstring). Call ``project()`` after
    each optimizer step; ``attach`` projects once.

    Args:
        subspaces (`InputSubspaces`): V_m per module; every named module must carry a LoRA adapter.

    Attributes:
        max_residual (`float`): max over modules of ‖A Vᵀ‖_max before the last projection (how far the step moved A
            into the subspace).
    """

    def __init__(self, subspaces: InputSubspaces):
        if not isinstance(subspaces, InputSubspaces):
            raise TypeError(f"`subspaces` must be InputSubspaces; got {type(subspaces).__name__}")
        self.subspaces = subspaces
        self.modules: dict[str, nn.Module] = {}
        self.max_residual = 0.0
        self._residual_sum, self._count = 0.0, 0

    @property
    def attached(self) -> bool:
        return bool(self.modules)

    def attach(self, model: nn.Module) -> InputNullSpaceProjection:
        """Resolves the modules (names as in the base model) and projects A once.

        Raises:
            InputSubspacesError: a named module has no LoRA adapter, or names/widths do not match.
        """
        resolved = self.subspaces.resolve(model)
        missing = [n for n, m in resolved.items() if not is_lora_layer(m)]
        if missing:
            raise InputSubspacesError(
                f"the hard projection constrains LoRA's A, but {missing[:4]} carry no LoRA adapter; add them to "
                "LoraConfig(target_modules=...) or drop them from the subspaces"
            )
        for name, module in resolved.items():
            active_lora_adapter(name, module)  # refuses merged / DoRA / several active adapters
        self.modules = resolved
        self.project()
        return self

    def detach(self) -> None:
        self.modules = {}

    @torch.no_grad()
    def project(self) -> None:
        """A ← A − (A Vᵀ) V for the active adapter of every module."""
        worst = 0.0
        for name, module in self.modules.items():
            adapter = active_lora_adapter(name, module)
            if adapter is None:
                continue
            weight = module.lora_A[adapter].weight
            local = _local_rows(name, weight)
            v = self.subspaces[name].to(device=local.device, dtype=torch.float64)
            a = local.to(torch.float64)
            coords = a @ v.T  # (r, k)
            if coords.numel():
                worst = max(worst, float(coords.abs().max()))
            local.copy_((a - coords @ v).to(local.dtype))
        self.max_residual = worst
        self._residual_sum += worst
        self._count += 1

    def pop_metrics(self) -> dict[str, float]:
        """``residual``: mean over projections since the last call of max |A Vᵀ| just before projecting."""
        count, total = self._count, self._residual_sum
        self._residual_sum, self._count = 0.0, 0
        return {"residual": total / count} if count else {}


def _local_rows(name: str, weight: torch.Tensor) -> torch.Tensor:
    """The rows of A this process holds: the whole tensor, or an FSDP2 row shard's local tensor."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(weight, dtensor.DTensor):
        if not all(isinstance(p, dtensor.Shard) and p.dim == 0 or isinstance(p, dtensor.Replicate)
                   for p in weight.placements):
            raise NotImplementedError(
                f"lora_A of {name!r} is sharded as {weight.placements}; the hard projection needs whole rows per "
                "shard (FSDP2's default Shard(0))"
            )
        return weight.to_local()
    if weight.numel() == 0:
        raise NotImplementedError(
            f"lora_A of {name!r} is partitioned (DeepSpeed ZeRO-3); the hard projection does not gather it. Use "
            "ZeRO-2, FSDP2, or the reader penalty (orthoreg.reader.penalty.ReaderPenalty)"
        )
    return weight.data


class HardProjectionCallback(TrainerCallback):
    r"""GuardSpace-style hard projection as a Trainer callback: A_m ← A_m − (A_m V_mᵀ) V_m when training starts and
    after every optimizer step (``on_optimizer_step``, before the next forward), so that every LoRA module's output on
    inputs in span(V_m) stays the base model's. Logged: ``hard_projection/residual`` (max |A Vᵀ| removed per step).

    Args:
        subspaces (`InputSubspaces`): V_m per LoRA module (``extract_input_subspaces``).

    Example:
        >>> from orthoreg.baselines import HardProjectionCallback
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
        ...                   callbacks=[HardProjectionCallback(subspaces)])
    """

    def __init__(self, subspaces: InputSubspaces):
        self.projection = InputNullSpaceProjection(subspaces)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                       **kwargs: Any):
        if model is None:
            raise ValueError("HardProjectionCallback received no model in on_train_begin")
        if not self.projection.attached:
            self.projection.attach(model)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.projection.project()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs.update({f"hard_projection/{k}": v for k, v in self.projection.pop_metrics().items()})

    def on_train_end(self, args, state, control, **kwargs):
        self.projection.detach()
