"""``ReaderPenalty``: the reader-side weight term of ``orthoreg.terms.reader`` (its formulas, absolute and in
base-model units, are in that module's docstring) applied to a model: hooks that compute each penalised module's
term inside the module's own forward and send its gradient into the weights, for LoRA and full fine-tuning, under
DDP, DeepSpeed ZeRO-3 and FSDP2. On inputs inside span(V_m) a penalised module's output then stays the base model's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from ..core.capture import unwrap_model
from ..core.layers import active_lora_adapter, check_gathered, is_conv1d, is_lora_layer
from ..core.reference import reference_forward_active
from ..core.zero3 import register_external_parameters
from ..terms.injection import PenaltyScale, inject_penalty
from ..terms.reader import full_reader_penalty, lora_reader_penalty, weight_times_basis
from .base_state import ReaderBaseState
from .extraction import extract_input_subspaces
from .subspaces import InputSubspaces, InputSubspacesError

__all__ = [
    "InputSubspaces",
    "NonFiniteReaderPenaltyError",
    "ReaderPenalty",
    "extract_input_subspaces",
    "full_reader_penalty",
    "lora_reader_penalty",
    "weight_times_basis",
]


UNITS = ("absolute", "base")


class NonFiniteReaderPenaltyError(FloatingPointError):
    """A reader penalty is NaN/Inf: the weights (or the stored base product) contain NaN/Inf."""


@dataclass(frozen=True)
class ReaderModule:
    """One penalised module: its canonical name, the module (PEFT ``LoraLayer``, ``nn.Linear`` or ``Conv1D``) and
    which formula applies (``"lora"`` or ``"full"``)."""

    name: str
    module: nn.Module
    kind: Literal["lora", "full"]


@dataclass
class _Session:
    """One forward of the LM: whether it is regularised, the multiplier of its injected gradients, and each
    module's unweighted value (detached, recorded once per forward)."""

    active: bool
    scale: PenaltyScale
    values: dict[str, torch.Tensor] = field(default_factory=dict)


class ReaderPenalty:
    r"""Adds :math:`\lambda \sum_m \mathrm{reader}(m)` (module docstring) to training, computed inside each
    module's own forward.

    **Where it is computed.** A forward hook registered with ``prepend=True`` on each penalised module (the PEFT
    ``LoraLayer``, or the ``nn.Linear``/``Conv1D`` itself for full fine-tuning) computes reader(m) right after the
    module's own forward — where DeepSpeed ZeRO-3 has gathered the module's parameters (LoRA's A and B are
    registered as external parameters of the ``LoraLayer``) and FSDP2 has unsharded its layer — and returns the
    module's output through ``inject_penalty``: the identity forward, whose backward also sends
    ``multiplier · ∂reader(m)/∂θ`` into the parameters inside the module's own backward (gathered again there).

    **Counted once per forward.** A pre-/post-hook pair on the unwrapped LM delimits each forward. The first call of
    a module in a forward records its value; activation checkpointing re-runs the module during backward (the first
    call is under ``no_grad`` with reentrant checkpointing): those recomputes, matched to the latest regularised
    forward, inject with that forward's multiplier and record nothing, so the gradient enters exactly once — from
    the forward call (no / non-reentrant checkpointing) or from the recompute (reentrant). The hook does the same
    work in both calls, as non-reentrant checkpointing requires.

    **Skipped** when the LM is not in training mode or grad is disabled (evaluation, generation, DPO's reference
    passes), for a LoRA module whose adapter is disabled (``disable_adapter()``) or not active, and when the
    coefficient is 0.

    **Modes.** ``"inject"`` (a ``TrainerCallback``): the multiplier is ``coef = weight · grad_scale``, set by the
    caller before each micro-batch (e.g. ``grad_scale = w(t)/GA``); nothing is added to the loss. ``"return"`` (a
    custom loop whose loss goes through ``accelerator.backward``): after each forward ``pop_penalty()`` gives
    ``coef · Σ_m reader(m)`` as a tapped scalar to add to the loss; its backward records ∂L/∂(that value) and the
    injection nodes multiply by it, so 1/GA, loss scaling and DeepSpeed's scaling apply exactly as to the loss.

    **Full fine-tuning.** W₀Vᵀ is recorded when attaching, from the weights as they are then (attach before the
    first optimizer step); a weight that is sharded at that point (ZeRO-3, FSDP2) is recorded at the module's first
    forward instead, inside its gathered region. A bias that trains is part of the term (‖b − b₀‖², b₀ recorded
    with W₀Vᵀ); under LoRA a trainable base bias is refused by name (``orthoreg.reader.base_state``).
    ``reference_state()`` / ``load_reference_state()`` carry them across a resume.

    **Non-finite values** raise ``NonFiniteReaderPenaltyError``, so a NaN never reaches the weights: with
    ``check="forward"`` at the end of each forward, before its backward (one host sync per forward); with
    ``check="step"`` when the owner calls ``check_step()`` before the optimizer step (one host sync per step: what
    ``OrthoRegCallback`` and ``OrthoLoRA`` do). Metrics stay on the device until ``pop_metrics``.

    Args:
        subspaces (`InputSubspaces`): V_m per module; every named module must be a linear module of the model.
        weight (`float`): λ.
        mode (`str`, *optional*, defaults to `"inject"`): ``"inject"`` or ``"return"``.
        units (`str`, *optional*, defaults to `"absolute"`): ``"absolute"`` — λ·Σ_m reader(m); ``"base"`` —
            λ·mean_m reader(m)/‖W₀,m V_mᵀ‖²_F (module docstring). The metrics follow: ``reader`` is the term λ
            multiplies, ``reader/<module>`` each module's share of it.
        check (`str`, *optional*, defaults to `"forward"`): ``"forward"`` or ``"step"`` (see above).

    Attributes:
        grad_scale (`float`): per-micro-batch multiplier set by the caller (1/GA, a warm-up factor, …).
        modules (`list[ReaderModule]`): the penalised modules, after ``attach``.
        skipped (`list[str]`): named modules without a trainable update (frozen, no LoRA): their penalty is 0.

    Example:
        >>> reader = ReaderPenalty(subspaces, weight=1.0).attach(peft_model)
        >>> reader.grad_scale = 1 / ga  # before each micro-batch
        >>> loss = peft_model(**batch).loss; loss.backward()  # gradients include λ/GA · ∇ Σ_m reader(m)
        >>> reader.pop_metrics()  # {'reader': ..., 'reader/model.layers.0.mlp.up_proj': ..., ...}
        >>> reader.detach()
    """

    def __init__(self, subspaces: InputSubspaces, weight: float, *, mode: Literal["inject", "return"] = "inject",
                 check: Literal["forward", "step"] = "forward", units: Literal["absolute", "base"] = "absolute"):
        if not isinstance(subspaces, InputSubspaces):
            raise TypeError(f"`subspaces` must be InputSubspaces; got {type(subspaces).__name__}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"`weight` (λ of the reader penalty) must be a number >= 0; got {weight!r}")
        if mode not in ("inject", "return"):
            raise ValueError(f"`mode` must be 'inject' or 'return'; got {mode!r}")
        if check not in ("forward", "step"):
            raise ValueError(f"`check` must be 'forward' or 'step'; got {check!r}")
        if units not in UNITS:
            raise ValueError(f"`units` must be one of {UNITS}; got {units!r}")
        self.subspaces, self.weight, self.mode, self.check, self.units = subspaces, float(weight), mode, check, units
        self.grad_scale = 1.0
        self.modules: list[ReaderModule] = []
        self.skipped: list[str] = []
        self._handles: list[Any] = []
        self._stack: list[_Session] = []  # forwards in progress (a reference forward may run inside another)
        self._last_active: _Session | None = None  # the latest regularised forward, for recomputes in its backward
        self._pending: torch.Tensor | None = None
        self._base = ReaderBaseState(self._basis, units)  # W₀V_mᵀ, b₀, base read-outs
        self._basis_cache: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._weighted: torch.Tensor | None = None  # Σ over forwards of λ · Σ_m reader(m)
        self._count = 0
        self.weighted_mean = 0.0  # set by pop_metrics: mean over its forwards of λ · Σ_m reader(m)
        self._nonfinite: torch.Tensor | None = None  # check="step": forwards with a non-finite total since the check
        self._unchecked: list[dict[str, torch.Tensor]] = []  # their per-module values, read only on failure

    @property
    def coef(self) -> float:
        """λ · grad_scale: the multiplier of this micro-batch's penalty."""
        return self.weight * self.grad_scale

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def resident_tensors(self) -> list[torch.Tensor]:
        """The tensors this penalty keeps besides the subspaces it was given: the float32 copy of each V_m on every
        device it was used on, and (full fine-tuning) the recorded W₀V_mᵀ. What it adds to memory, for accounting."""
        return list(self._basis_cache.values()) + self._base.tensors()

    # ------------------------------------------------------------------ attachment
    def attach(self, model: nn.Module) -> ReaderPenalty:
        """Resolves the subspaces' modules in ``model`` (bare, PEFT-, DDP-, DeepSpeed- or FSDP-wrapped) and installs
        the hooks.

        Raises:
            InputSubspacesError: a name or width does not match the model, or no named module has a trainable
                update.
            ValueError, NotImplementedError: unsupported LoRA states (see ``active_lora_adapter``).
        """
        if self._handles:
            raise RuntimeError("this ReaderPenalty is already attached; call detach() first")
        lm = unwrap_model(model)
        modules, skipped = [], []
        for name, module in self.subspaces.resolve(model).items():
            if is_lora_layer(module):
                active_lora_adapter(name, module)
                ReaderBaseState.refuse_lora_bias(name, module)
                modules.append(ReaderModule(name, module, "lora"))
            elif module.weight.requires_grad:
                modules.append(ReaderModule(name, module, "full"))
            else:
                skipped.append(name)
        if not modules:
            raise InputSubspacesError(
                f"none of the {len(self.subspaces)} modules the input subspaces name has a trainable update (no LoRA "
                "adapter, frozen weight); add them to LoraConfig(target_modules=...) or unfreeze them"
            )
        self.modules, self.skipped = modules, skipped
        for entry in modules:
            self._base.record_on_attach(entry.name, entry.kind, entry.module)
        try:
            self._handles.append(lm.register_forward_pre_hook(self._open))
            self._handles.append(lm.register_forward_hook(self._close, always_call=True))
            for entry in modules:
                self._handles.append(entry.module.register_forward_hook(partial(self._module_hook, entry), prepend=True))
                if entry.kind == "lora" and self.units == "base":
                    # Inside the base layer's own forward its weight is gathered (ZeRO-3) / unsharded (FSDP2).
                    base_layer = entry.module.get_base_layer()
                    self._handles.append(base_layer.register_forward_hook(
                        partial(self._base.base_layer_hook, entry.name), prepend=True))
            self._register_zero3_external_parameters()
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Removes every hook; the model is unchanged afterwards."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()
        self._last_active = self._pending = None

    def __enter__(self) -> ReaderPenalty:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def _register_zero3_external_parameters(self) -> None:
        # Under ZeRO-3 a module's pre-forward gathers only its own parameters; A and B belong to its children
        # lora_A/lora_B. As external parameters of the LoraLayer they stay gathered for its whole forward (our hook)
        # and are re-gathered for its backward. A full-FT weight is the module's own parameter already.
        if "deepspeed" not in sys.modules:
            return
        for entry in self.modules:
            if entry.kind == "lora":
                register_external_parameters(entry.module, [
                    p for adapter in entry.module.lora_A
                    for p in (entry.module.lora_A[adapter].weight, entry.module.lora_B[adapter].weight)])

    def _basis(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._basis_cache:
            self._basis_cache[key] = self.subspaces[name].to(device=device, dtype=torch.float32)
        return self._basis_cache[key]

    # ------------------------------------------------------------------ hooks
    def _open(self, module: nn.Module, args: tuple) -> None:
        coef = self.coef
        # A marked forward (a reference pass, or another term's own anchor batch) is not a step of the task: the
        # penalty enters once per training forward, never through it.
        active = module.training and torch.is_grad_enabled() and coef != 0 and not reference_forward_active()
        session = _Session(active=active, scale=PenaltyScale(coef, tapped=self.mode == "return"))
        self._stack.append(session)
        if active:
            self._last_active = session
        return None

    def _close(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._stack:
            return None
        session = self._stack.pop()
        if not session.active or not session.values:
            return None
        device = next(iter(session.values.values())).device
        values = torch.stack([v.to(device) for v in session.values.values()])
        total = values.sum()
        if self.check == "forward" and not bool(torch.isfinite(total)):
            _raise_nonfinite([session.values])
        if self.check == "step":
            bad = (~torch.isfinite(total)).to(torch.int32)
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite + bad.to(self._nonfinite.device)
            self._unchecked.append(dict(session.values))
        for name, value in session.values.items():
            self._sums[name] = self._sums[name] + value.to(device) if name in self._sums else value.to(device)
        # λ in force at this forward: a budget mode may change it between steps, and the logged total must follow.
        self._weighted = self.weight * total if self._weighted is None else self._weighted + self.weight * total.to(
            self._weighted.device)
        self._count += 1
        if self.mode == "return":
            anchor = _differentiable_output(output)
            self._pending = session.scale.tap(session.scale.coef * total, *anchor)
        return None

    def _module_hook(self, entry: ReaderModule, module: nn.Module, args: tuple, output: Any) -> Any:
        in_forward = bool(self._stack)
        session = self._stack[-1] if in_forward else self._last_active
        if not in_forward and entry.kind == "full" and entry.name not in self._base.products:
            return None
        if entry.kind == "full" and entry.name not in self._base.products:
            check_gathered(entry.name, module.weight)
            self._base.record_full(entry.name, module)  # first forward after attach, inside the gathered region
        if session is None or not session.active:
            return None
        if not in_forward and (session.scale.finished or not (module.training and torch.is_grad_enabled())):
            return None  # not a recompute of the latest regularised forward
        if in_forward and entry.name in session.values:
            return None  # a module called twice in one forward is counted and injected once
        penalty = self._penalty(entry, module)
        if penalty is None:
            return None
        if in_forward:
            session.values[entry.name] = penalty.detach()
        if torch.is_grad_enabled() and penalty.requires_grad:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"{entry.name!r} returned {type(output).__name__}; expected a Tensor")
            return inject_penalty(output, penalty, session.scale)
        return None

    def _penalty(self, entry: ReaderModule, module: nn.Module) -> torch.Tensor | None:
        if entry.kind == "lora":
            if module.disable_adapters:  # reference forward with the adapter disabled, or disabled by the user
                return None
            adapter = active_lora_adapter(entry.name, module)
            if adapter is None:
                return None
            lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            check_gathered(entry.name, lora_a, lora_b)
            value = lora_reader_penalty(lora_a, lora_b, self._basis(entry.name, lora_a.device), module.scaling[adapter])
        else:
            weight = module.weight
            check_gathered(entry.name, weight)
            value = full_reader_penalty(weight, self._basis(entry.name, weight.device), self._base.products[entry.name],
                                        is_conv1d(module))
            bias_change = self._base.full_bias_change(entry.name, module)
            if bias_change is not None:  # a trained bias shifts every read-out of span(V)
                value = value + bias_change
        if self.units == "base":  # this module's share of mean_m reader(m)/‖W₀,m V_mᵀ‖²_F
            value = value * self._base.scale(entry.name, value.device, len(self.modules))
        return value

    def check_step(self) -> None:
        """``check="step"``: raises ``NonFiniteReaderPenaltyError`` if any forward since the last call had a
        non-finite penalty (one host sync), naming the modules; call it before the optimizer step."""
        flags, values = self._nonfinite, self._unchecked
        self._nonfinite, self._unchecked = None, []
        if flags is not None and bool(flags > 0):
            _raise_nonfinite(values)

    # ------------------------------------------------------------------ results
    def pop_penalty(self) -> torch.Tensor | None:
        """``mode="return"``: coef · Σ_m reader(m) of the latest regularised forward, to add to its loss (its gradient
        reaches the weights through the injection nodes); ``None`` when that forward was not regularised."""
        if self.mode != "return":
            raise RuntimeError("pop_penalty() is for ReaderPenalty(mode='return'); in 'inject' mode the gradient is "
                               "already in the graph")
        pending, self._pending = self._pending, None
        return pending

    def pop_metrics(self, per_module: bool = True) -> dict[str, float]:
        """Means over the regularised forwards since the last call, then resets: ``reader`` (Σ_m reader(m),
        unweighted) and, with ``per_module``, ``reader/<module name>``. One host sync; this rank's values.
        ``weighted_mean`` becomes the mean of λ · Σ_m reader(m) with the λ in force at each forward."""
        count, sums, weighted = self._count, self._sums, self._weighted
        self._sums, self._count, self._weighted = {}, 0, None
        self.weighted_mean = 0.0
        if count == 0:
            return {}
        names = list(sums)
        device = sums[names[0]].device
        values = torch.stack([sums[n].to(device).float() for n in names]) / count
        listed = torch.cat([values.sum().reshape(1), weighted.to(device).float().reshape(1) / count, values]).tolist()
        metrics = {"reader": listed[0]}
        self.weighted_mean = listed[1]
        if per_module:
            metrics.update({f"reader/{n}": v for n, v in zip(names, listed[2:], strict=True)})
        return metrics

    def reference_state(self) -> dict[str, torch.Tensor]:
        """W₀Vᵀ (and b₀ of a bias that trains) per full-FT module (float32), for a checkpoint
        (safetensors-serialisable)."""
        return self._base.state()

    def load_reference_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restores ``reference_state()`` (before the first forward after a resume)."""
        self._base.load(state, self.subspaces.names)


def _raise_nonfinite(forwards: list[dict[str, torch.Tensor]]) -> None:
    bad = sorted({n for values in forwards for n, v in values.items() if not bool(torch.isfinite(v))})
    raise NonFiniteReaderPenaltyError(
        f"the reader penalty is not finite for {bad[:4]}{' …' if len(bad) > 4 else ''}: those modules' weights "
        "contain NaN/Inf (diverging training). Lower the learning rate; the optimizer step was not taken."
    )


def _differentiable_output(output: Any) -> tuple[torch.Tensor, ...]:
    """A tensor of the LM's output that requires grad (the logits), for ``PenaltyScale.tap``'s anchor edge."""
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return (value,)
    if isinstance(output, torch.Tensor) and output.requires_grad:
        return (output,)
    if isinstance(output, tuple):
        for value in output:
            if isinstance(value, torch.Tensor) and value.requires_grad:
                return (value,)
    return ()
