r"""The writer-side LoRA weight term of ``OrthoLoRA``: which modules carry it, and the hooks that compute it.

For every LoRA module m that writes into the residual stream inside a guarded layer ℓ with directions,

.. math:: P_m = s_m^2\,\|(U_\ell B_m) A_m\|_F^2 = \|U_\ell \Delta W_m\|_F^2,\qquad \Delta W_m = s_m B_m A_m,

with U_ℓ (k, d) the harmful directions of layer ℓ (float32), A_m (r, in) = ``lora_A.weight``, B_m (d, r) =
``lora_B.weight`` and s_m = ``scaling[adapter]``; never forming ΔW or a d×d matrix (``penalties.lora_weight_penalty``).

Each P_m is computed **inside m's own forward** (a forward hook on the PEFT ``LoraLayer``, prepended), where DeepSpeed
ZeRO-3 and FSDP have A and B gathered, and its gradient λ_lora·w(t)·d(loss)/d(P) enters the graph at m's output
(``orthoreg.terms.injection.inject_penalty``), so its backward runs inside m's backward, where they are gathered again. The
values' sum reaches the loss through ``PenaltyScale.tap``, which records d(loss)/d(penalty) for the injection nodes.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from ..core.layers import check_adapter_state, is_sharded
from ..core.zero3 import register_external_parameters
from ..directions.harmful import DirectionsError, DirectionsOnDevice, HarmfulDirections
from ..terms.injection import PenaltyScale, inject_penalty
from ..terms.penalties import lora_weight_penalty
from .writers import LoraWriter, check_writer_supported, find_residual_writers

__all__ = ["WriterPenaltyHooks", "WriterSession", "select_penalized_writers"]


@dataclass
class WriterSession:
    """State of one OrthoLoRA forward for the weight term.

    Attributes:
        active: the forward is regularised (training, grad enabled, λ_lora·w(t) > 0).
        scale: the multiplier of the injected gradient (``orthoreg.terms.injection``): λ_lora · w(t) · d(loss)/d(tapped
            value), recorded when the loss that carries the penalty is backpropagated (includes 1/GA and any loss
            scale); its ``finished`` says that backward has ended, so later hook calls outside a forward are not
            recomputes of this forward; its ``gate`` is 0 when the penalty was not finite.
        values: writer name → unweighted penalty (detached), recorded once per writer per forward.
        layers: writer name → its decoder layer.
        anchor: the decoder stack's output hidden states, downstream of every writer (the tap's zero-gradient edge,
            so backward reaches the injection nodes even when only the penalty is backpropagated).
    """

    active: bool
    scale: PenaltyScale
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: dict[str, int] = field(default_factory=dict)
    anchor: torch.Tensor | None = None


def select_penalized_writers(peft_model: nn.Module, adapted_names: Sequence[str], guarded_layers: Sequence[int],
                             directions: HarmfulDirections, writer_modules: Sequence[str] | None = None,
                             layers_path: str | None = None) -> tuple[list[LoraWriter], list[LoraWriter]]:
    """(penalised, unpenalised) residual-writer LoRA modules: penalised are those in a guarded layer with directions.

    Raises when no LoRA module writes into the residual stream, or none of them is in a guarded layer with
    directions (the term would be silently zero); warns about writers left unpenalised (they still write into the
    residual stream of later guarded layers); raises for LoRA variants the term does not support (DoRA, bias).
    """
    all_writers = find_residual_writers(peft_model, writer_modules, layers_path)
    if not all_writers:
        raise ValueError(
            "lora_weight > 0 but no LoRA module writes into the residual stream: the adapters sit on "
            f"{sorted({n.rsplit('.', 1)[-1] for n in adapted_names})}. Add the block output projections to "
            "LoraConfig(target_modules=...) (e.g. 'o_proj', 'down_proj'; GPT-2 'c_proj'; GPT-NeoX 'dense', "
            "'dense_4h_to_h'), pass `writer_modules=`, or set lora_weight=0."
        )
    covered = set(guarded_layers) & set(directions.layers)
    penalized = [w for w in all_writers if w.layer in covered]
    unpenalized = [w for w in all_writers if w.layer not in covered]
    if not penalized:
        raise DirectionsError(
            f"lora_weight > 0 but none of the residual-writer LoRA modules (in layers "
            f"{sorted({w.layer for w in all_writers})}) is in a guarded layer with directions (guarded "
            f"{list(guarded_layers)}, directions for {directions.layers}); guard those layers "
            "(OrthoRegConfig(layers=...)) with directions for them, or set lora_weight=0"
        )
    if unpenalized:
        warnings.warn(
            f"{len(unpenalized)} residual-writer LoRA modules are in layers without guarded directions and get no "
            f"weight-space penalty: {[w.name for w in unpenalized][:6]}{' …' if len(unpenalized) > 6 else ''}"
            f" (guarded {list(guarded_layers)}, directions for {directions.layers})",
            UserWarning,
            stacklevel=3,
        )
    for writer in penalized:
        adapter = check_adapter_state(writer.name, writer.module)
        if adapter is not None:
            check_writer_supported(writer.name, writer.module, adapter)
    return penalized, unpenalized


class WriterPenaltyHooks:
    """The forward hooks of the weight term on the penalised writers and on the decoder stack (for the anchor).

    ``open(coef, active)`` starts a forward's ``WriterSession``; ``close()`` ends it (the session stays the latest,
    so activation-checkpointing recomputes in its backward still find it). A module called twice in one forward is
    counted and injected once; outside a forward only recomputes of the latest forward's backward are handled.
    """

    def __init__(self, writers: Sequence[LoraWriter], directions: HarmfulDirections, stack: Any, accelerator: Any):
        self.writers = list(writers)
        self._directions = DirectionsOnDevice(directions)
        self.session: WriterSession | None = None  # the forward in progress
        self.latest: WriterSession | None = None  # the latest forward, for recomputes in its backward
        # prepend: run before any hook DeepSpeed adds later (its post-forward hook releases gathered parameters and
        # wraps the output for its pre-backward gather, which must then sit *after* our injection node).
        self._handles = [w.module.register_forward_hook(partial(self._writer_hook, w), prepend=True)
                         for w in self.writers]
        self._handles.append(stack.stack.register_forward_hook(self._stack_hook))
        self._register_zero3_external_parameters(accelerator)

    def _register_zero3_external_parameters(self, accelerator: Any) -> None:
        # Under ZeRO-3 a module's pre-forward gathers only its own parameters; A and B belong to the child modules
        # lora_A/lora_B. Registering them as external parameters of the LoraLayer keeps them gathered for the whole
        # LoraLayer forward (so in our hook) and makes DeepSpeed re-gather them for its backward. Harmless otherwise.
        uses_deepspeed = accelerator is not None and getattr(accelerator.state, "deepspeed_plugin", None) is not None
        if not (uses_deepspeed or "deepspeed" in sys.modules):
            return
        for writer in self.writers:
            register_external_parameters(writer.module, [
                p for adapter in writer.module.lora_A
                for p in (writer.module.lora_A[adapter].weight, writer.module.lora_B[adapter].weight)])

    def open(self, coef: float, active: bool) -> WriterSession:
        self.session = self.latest = WriterSession(active=active and coef > 0, scale=PenaltyScale(coef, tapped=True))
        return self.session

    def close(self) -> None:
        self.session = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _writer_hook(self, writer: LoraWriter, module: nn.Module, args: tuple, output: Any) -> Any:
        in_forward = self.session is not None
        session = self.session if in_forward else self.latest
        # Outside a forward the only calls that matter are recomputes (activation checkpointing) during that
        # forward's backward; calls after it (direct use of the PEFT model, generation) are ignored.
        if session is None or not session.active or (not in_forward and session.scale.finished):
            return None
        if module.disable_adapters:  # paired reference forward, or adapters disabled by the user
            return None
        adapter = check_adapter_state(writer.name, module)
        if adapter is None:
            return None
        if in_forward and writer.name in session.values:
            return None  # a module called twice in one forward is counted and injected once
        lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        if is_sharded(lora_a) or is_sharded(lora_b):
            raise RuntimeError(
                f"the LoRA weights of {writer.name!r} are sharded during its own forward (shape "
                f"{tuple(lora_a.shape)}, {type(lora_a).__name__}), so the weight-space penalty cannot be computed. "
                "Under DeepSpeed ZeRO-3 build OrthoLoRA before `accelerator.prepare` and pass `accelerator=` (or "
                "import deepspeed first) so A and B are registered as the module's external parameters; with FSDP2 "
                "shard whole decoder layers, not LoRA submodules."
            )
        penalty = lora_weight_penalty(lora_a, lora_b, self._directions(writer.layer, lora_b.device),
                                      module.scaling[adapter])
        if in_forward:
            session.values[writer.name] = penalty.detach()
            session.layers[writer.name] = writer.layer
        if torch.is_grad_enabled() and penalty.requires_grad:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"{writer.name!r} returned {type(output).__name__}; expected a Tensor")
            return inject_penalty(output, penalty, session.scale)
        return None

    def _stack_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        session = self.session
        if session is None or not session.active or session.anchor is not None:
            return None
        hidden = None
        if isinstance(output, torch.Tensor):
            hidden = output
        elif isinstance(getattr(output, "last_hidden_state", None), torch.Tensor):
            hidden = output.last_hidden_state
        elif isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            hidden = output[0]
        # Only the differentiable pass: not a no-grad reference forward through the same stack (paired anchor).
        if hidden is not None and hidden.requires_grad:
            session.anchor = hidden
        return None
