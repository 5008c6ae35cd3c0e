"""``OrthoLoRA``: orthoreg for custom (``accelerate``) training loops over a PEFT LoRA model, with the LoRA
weight-space penalty.

How the three terms get into the loss:

- the activation terms (covariance, projection) come from ``OrthoRegularizer`` in ``mode="return"``: hooks on the
  decoder layers capture h_ℓ, and the weighted penalty is read after each forward and added to ``outputs.loss``;
- the weight-space term s²‖(U_ℓ B) A‖²_F (``orthoreg.lora.weight_term``) is computed **inside each residual-writer
  LoRA module's forward** (a forward hook on the PEFT ``LoraLayer``), where DeepSpeed ZeRO-3 and FSDP have the full
  A and B gathered, and its gradient enters the graph at that module's output (``orthoreg.terms.injection.inject_penalty``).
  Its *value* is added to ``outputs.loss`` through ``PenaltyScale.tap``, an identity whose backward records
  d(loss)/d(penalty); the injection nodes read that number. So ``accelerator.backward(outputs.loss)`` scales the
  weight term exactly like the rest of the loss (1/GA, fp16 loss scale, DeepSpeed's own scaling), and its backward
  runs while the owning module's parameters are gathered for its own backward.

Why a forward hook (prepended) rather than a pre-hook: DeepSpeed registers its gather (pre-forward) and release
(post-forward) hooks when the model is prepared, usually after OrthoLoRA is built, so an earlier pre-hook would run
*before* the gather; a forward hook registered with ``prepend=True`` runs after the module's own forward (A and B
gathered) and before DeepSpeed's release, and the injection node it adds sits below DeepSpeed's pre-backward gather
on the output. Under FSDP the whole decoder layer is unsharded around its forward/backward, so either works.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..anchor import AnchorKLError, anchor_kl_for, data_parallel_rank, sharded_backend
from ..config import OrthoRegConfig
from ..core.capture import find_decoder_stack, resolve_layers
from ..core.layers import check_adapter_state, lora_layers
from ..core.reference import reference_forward_active
from ..directions.harmful import HarmfulDirections
from ..engine.health import StepHealth
from ..engine.metrics import metric_names
from ..engine.refusal_margin import HarmSignalError, HarmSignalSchedule
from ..engine.regularizer import OrthoRegularizer
from ..reader.wiring import configured_subspaces, reader_penalty_for, record_builtin_subspaces
from .io import load_ortholora, save_ortholora
from .weight_term import WriterPenaltyHooks, WriterSession, select_penalized_writers
from .writers import RESIDUAL_WRITER_NAMES, LoraWriter, find_residual_writers

logger = logging.getLogger(__name__)

__all__ = ["OrthoLoRA", "LoraWriter", "find_residual_writers", "RESIDUAL_WRITER_NAMES"]


# ------------------------------------------------------------------------------------------------------- wrapper
class OrthoLoRA(nn.Module):
    r"""Wraps a PEFT LoRA model so that its forward returns outputs whose ``loss`` includes orthoreg's penalties.

    For a training forward (``module.training`` and grad enabled) the returned ``outputs.loss`` is

    .. math:: \mathcal{L} = \mathcal{L}_{task} + w(t)\Big(\lambda_{cov}\sum_{\ell} \mathrm{cov}(h_\ell)
              + \lambda_{proj}\sum_{\ell} \mathrm{proj}(h_\ell)
              + \lambda_{lora}\sum_{\ell}\sum_{m \in W_\ell} s_m^2\,\|(U_\ell B_m) A_m\|_F^2\Big)

    with ℓ over the guarded layers (``config.layers``), W_ℓ the LoRA modules that write into the residual stream
    inside layer ℓ (``find_residual_writers``: ``o_proj``/``down_proj``, GPT-2's ``c_proj`` Conv1Ds, GPT-NeoX's
    ``dense``/``dense_4h_to_h``, …), U_ℓ (k, d) the harmful directions of layer ℓ, A_m (r, in) = ``lora_A.weight``,
    B_m (d, r) = ``lora_B.weight`` and s_m = ``scaling[adapter]`` (α/r, or α/√r with rsLoRA), so that
    s_m²‖(U_ℓ B_m) A_m‖²_F = ‖U_ℓ ΔW_m‖²_F for ΔW_m = s_m B_m A_m, computed without forming ΔW or any d×d matrix.
    Writers in layers that are not guarded or have no directions are not weight-penalised (a warning lists them,
    since they still write into the residual stream of later guarded layers). w(t) is the warm-up factor
    of ``config``. ``outputs.orthoreg_penalty`` is the penalty alone (differentiable, for losses built from logits),
    ``outputs.task_loss`` the model's own loss.

    Because the penalty is part of ``outputs.loss``, ``accelerator.backward(outputs.loss)`` scales it exactly like the
    task loss: 1/GA under ``accelerator.accumulate`` (each micro-batch contributes penalty/GA), the fp16 loss scale,
    DeepSpeed's own scaling.

    **Sharded parameters.** The weight term is computed inside each writer's own forward (a forward hook on the PEFT
    ``LoraLayer``, run before any other forward hook of that module), where FSDP has unsharded the layer and DeepSpeed
    ZeRO-3 has gathered the module's parameters (A and B are registered as its external parameters); its gradient
    enters at the module's output, so its backward runs inside the module's backward, where they are gathered again.
    Parameters are never read from outside their module's forward.

    **Activation checkpointing.** Submodule hooks fire twice (forward, then recompute in backward; under reentrant
    checkpointing the first call is under ``no_grad``). Each writer's value is counted once per forward (the first
    call); its gradient enters through whichever call builds the graph that is backpropagated (the forward call, or
    the recompute under reentrant checkpointing). The hook does the same work in both calls, as non-reentrant
    checkpointing requires. A recompute is matched to the latest OrthoLoRA forward, so under reentrant
    checkpointing backpropagate each forward's loss before the next forward (the usual loop; summing the losses of
    several forwards into one backward is exact without checkpointing or with non-reentrant checkpointing).

    **Paired anchor.** With ``OrthoRegConfig(anchor="paired")`` the projection is ‖U_ℓ(h_ℓ − h_ℓ^{ref})‖² with h^{ref}
    the activations of the same model with the adapter disabled, on the same tokens. Cost: one extra forward per
    micro-batch, under ``no_grad`` and stopped after the deepest guarded layer (≈ ℓ_max/L of a forward's compute, no
    activation memory kept except one (B, T, d) tensor per guarded layer).

    **Anchor KL.** With ``config.anchor_kl_weight > 0`` (``recommended()``) the base's replies to the anchor requests
    are recorded here (adapter off; needs ``tokenizer``) and each training forward adds λ_anchor·AKL of its own anchor
    batch to the loss (``orthoreg.anchor.term``; one process or DDP), logged as ``orthoreg/anchor_kl``.

    **Steps.** ``step`` (for the warm-up) advances after each training forward that ends an accumulation cycle
    (``accelerator.sync_gradients``); without an accelerator, after every training forward. Set it when resuming.

    Args:
        peft_model (`peft.PeftModel`): a causal LM with LoRA adapters (``get_peft_model(model, LoraConfig(...))``);
            one active, unmerged adapter.
        config (`OrthoRegConfig`): weights, guarded layers, anchor, schedule. ``lora_weight`` is λ_lora.
        directions (`HarmfulDirections`, *optional*): needed when ``proj_weight > 0`` or ``lora_weight > 0``.
        accelerator (`accelerate.Accelerator`, *optional*): used for the step counter (``sync_gradients``),
            ``is_main_process`` when saving, and to prepare for DeepSpeed ZeRO-3.
        writer_modules (`Sequence[str]`, *optional*): name suffixes of the residual writers, overriding the
            structural rule of ``find_residual_writers``.
        input_subspaces (`InputSubspaces`, *optional*): the reader term's V_m; overrides ``config.input_subspaces``.
        tokenizer (*optional*): with ``config.input_subspaces="builtin"`` (``OrthoRegConfig.recommended()``) V_m are
            recorded here, on the model with its adapter switched off, with this tokenizer's chat template (one
            process records, every rank receives them; ``orthoreg.reader.wiring``) and saved by ``save_pretrained``.
            With ``config.harm_signal_every`` the harm signal's base margins are recorded with it too (adapter off);
            the readings come every that many updates (``read_harm_signal``) and join ``pop_metrics``.
        harm_signal_state (`dict`, *optional*): a saved probe state (``state_dict_orthoreg()["harm_signal"]``)
            instead of recording one; ``from_pretrained`` passes it.

    Raises:
        ValueError: no LoRA layers, merged or several active adapters, no weight-penalised writer while
            ``lora_weight > 0``, missing directions, ``return_dict=False`` outputs.
        DirectionsError: directions for another hidden size or depth.
        NotImplementedError: DoRA / other ``lora_variant`` / ``lora_bias`` on a weight-penalised writer.

    Example:
        >>> model = get_peft_model(base, LoraConfig(r=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
        >>> model = OrthoLoRA(model, OrthoRegConfig.recommended(), tokenizer=tokenizer, accelerator=accelerator)

        The projection and writer terms on harmful directions instead:

        >>> config = OrthoRegConfig(layers=directions.layers, proj_weight=0.1, lora_weight=1.0)
        >>> model = OrthoLoRA(model, config, directions, accelerator=accelerator)
        >>> model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        >>> for batch in loader:
        ...     with accelerator.accumulate(model):
        ...         outputs = model(**batch)
        ...         accelerator.backward(outputs.loss)
        ...         optimizer.step(); optimizer.zero_grad()
        >>> accelerator.unwrap_model(model).pop_metrics()  # {'orthoreg/proj': ..., 'orthoreg/lora': ..., ...}
    """

    _orthoreg_wrapper = True  # ``orthoreg.core.capture.unwrap_model`` looks through it (monitors, audits, firewalls)

    def __init__(
        self,
        peft_model: nn.Module,
        config: OrthoRegConfig,
        directions: HarmfulDirections | None = None,
        accelerator: Any = None,
        *,
        writer_modules: Sequence[str] | None = None,
        input_subspaces: Any = None,
        tokenizer: Any = None,
        harm_signal_state: dict[str, Any] | None = None,
    ):
        super().__init__()
        if not isinstance(config, OrthoRegConfig):
            raise TypeError(f"OrthoLoRA needs an OrthoRegConfig; got {type(config).__name__}")
        adapted = lora_layers(peft_model)
        if not adapted:
            raise ValueError(
                f"{type(peft_model).__name__} has no LoRA layers. Wrap the model first: "
                "`peft_model = peft.get_peft_model(model, LoraConfig(target_modules=[...]))`; for full fine-tuning "
                "use OrthoRegCallback or OrthoRegularizer instead."
            )
        if config.needs_directions and directions is None:
            raise ValueError(
                "OrthoRegConfig(proj_weight > 0 or lora_weight > 0) needs harmful directions: pass `directions=` "
                "(HarmfulDirections.load(path) or extract_directions(...)), or set those weights to 0"
            )
        adapters = {a for name, module in adapted if (a := check_adapter_state(name, module)) is not None}
        if len(adapters) > 1:
            raise ValueError(
                f"different LoRA layers have different active adapters {sorted(adapters)}; OrthoLoRA regularises one "
                "adapter. Activate one with `peft_model.set_adapter(name)`."
            )
        self.model = peft_model
        self.config = config
        self.directions = directions
        self.accelerator = accelerator
        self.step = 0

        stack = self._stack = find_decoder_stack(peft_model, layers_path=config.layers_path)
        if directions is not None:
            directions.check_compatible(stack.hidden_size, stack.num_layers, stack.model_type)
        self.guarded_layers = resolve_layers(config.layers, stack.num_layers)

        # Weight-space term (orthoreg.lora.weight_term): which writers carry it, and its hooks.
        self.writers: list[LoraWriter] = []
        self.unpenalized_writers: list[LoraWriter] = []
        self._writer_hooks: WriterPenaltyHooks | None = None
        if config.lora_weight > 0:
            self.writers, self.unpenalized_writers = select_penalized_writers(
                peft_model, [n for n, _ in adapted], self.guarded_layers, directions, writer_modules, config.layers_path)
            self._writer_hooks = WriterPenaltyHooks(self.writers, directions, stack, accelerator)

        # Activation terms: the shared hook engine, returning its penalty instead of injecting it.
        self.regularizer: OrthoRegularizer | None = None
        if config.cov_weight > 0 or config.proj_weight > 0:
            self.regularizer = OrthoRegularizer(config, directions, mode="return", check="step").attach(peft_model)
        self._health = StepHealth(config.on_nonfinite)
        # Reader-side weight term (orthoreg.reader.penalty): inside each adapted module's forward, through the loss.
        self.input_subspaces = configured_subspaces(config, input_subspaces)
        if self.input_subspaces is None and config.reader_weight > 0:  # "builtin": before any update, adapter off
            self.input_subspaces = record_builtin_subspaces(peft_model, tokenizer, config)
        self.reader = reader_penalty_for(config, self.input_subspaces, mode="return")
        if self.reader is not None:
            self.reader.attach(peft_model)
        self.anchor_kl, self._anchor_calls = None, 0  # the anchor KL (orthoreg.anchor): recorded now, adapter off
        if config.anchor_kl_weight > 0:
            if (backend := sharded_backend(None, peft_model, accelerator)) is not None:
                raise AnchorKLError(f"OrthoLoRA's anchor KL runs in one process or under DDP, not under {backend}: "
                                    "set OrthoRegConfig(anchor_kl_weight=0) there")
            self.anchor_kl = anchor_kl_for(config, peft_model, tokenizer)
        # The live harm signal (orthoreg.engine.refusal_margin): base margins now, a reading every N updates.
        self.harm_signal: HarmSignalSchedule | None = None
        if config.harm_signal_every is not None:
            self.harm_signal = HarmSignalSchedule(config.harm_signal_every)
            if harm_signal_state is not None:  # from_pretrained: the base of step 0, as saved
                self.harm_signal.probe.load_state_dict(harm_signal_state)
            else:  # a diagnostic: the penalties work without it, so a missing piece is said out loud, not raised
                try:
                    if tokenizer is None:
                        raise HarmSignalError("it reads the refusal margin through the chat template: pass "
                                              "OrthoLoRA(..., tokenizer=tokenizer) to log it")
                    self.harm_signal.probe.record_base(peft_model, tokenizer)
                except HarmSignalError as err:
                    warnings.warn(f"orthoreg: the live harm signal (OrthoRegConfig(harm_signal_every=...)) is off: "
                                  f"{err}. Set harm_signal_every=0 to silence this.", UserWarning, stacklevel=2)
                    self.harm_signal = None
        self._last_metric_tensors: dict[str, torch.Tensor] = {}
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_count = 0
        self._skipped = 0

    # ------------------------------------------------------------------ properties
    @property
    def peft_model(self) -> nn.Module:
        return self.model

    @property
    def penalized_modules(self) -> list[str]:
        """Names of the LoRA modules that carry the weight-space penalty."""
        return [w.name for w in self.writers]

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if "adapter_names" in kwargs:
            raise ValueError("OrthoLoRA regularises one adapter; mixed-adapter batches (`adapter_names=`) are not supported")
        active = self.training and torch.is_grad_enabled() and not reference_forward_active()  # marked: not a step
        coef = self.config.lora_weight * self.config.warmup_factor(self.step)
        session = self._writer_hooks.open(coef, active) if self._writer_hooks is not None else None
        if self.regularizer is not None:
            self.regularizer.step = self.step
            self.regularizer.pending_penalty = None
        if self.reader is not None:
            self.reader.grad_scale = self.config.warmup_factor(self.step)
        if active and self.harm_signal is not None:  # due after `step` updates: read before this forward changes them
            self.harm_signal.after_step(self.model, self.step)
        try:
            outputs = self.model(*args, **kwargs)
        finally:
            if self._writer_hooks is not None:
                self._writer_hooks.close()
        activation = None
        if self.regularizer is not None:
            activation, self.regularizer.pending_penalty = self.regularizer.pending_penalty, None
        penalty = activation
        if active and self.anchor_kl is not None:  # marked as a reference forward: no other term counts it
            penalty = self.anchor_kl.weighted_loss(self.model, self._anchor_calls, *data_parallel_rank())
            penalty = penalty if activation is None else activation + penalty
            self._anchor_calls += 1
        reader = self.reader.pop_penalty() if self.reader is not None and active else None
        if reader is not None:
            penalty = reader if penalty is None else penalty + reader
        weight_sum = None
        if session is not None and session.values:
            weight_sum = torch.stack([v.float() for v in session.values.values()]).sum()
            # Gated in the graph, checked once per optimizer step (no host sync here): NaN/Inf LoRA weights raise
            # before the update (on_nonfinite="raise"), or their penalty is dropped from the loss ("skip"; the task
            # loss is then NaN as well — nothing a penalty policy can save).
            weight_sum, keep = self._health.gate(weight_sum, {f"lora/{n}": v for n, v in session.values.items()})
            session.scale.gate = keep
            # A fresh leaf, so the tap's backward always runs; the anchor (if captured) links it to the model.
            anchor = () if session.anchor is None else (session.anchor,)
            weighted = session.scale.tap(coef * weight_sum, *anchor)
            session.anchor = None  # do not keep the (B, T, d) tensor alive beyond the graph
            penalty = weighted if penalty is None else penalty + weighted
        if active:
            self._record_metrics(session, weight_sum, penalty)
            ends_step = self.accelerator is None or self.accelerator.sync_gradients
            if ends_step:
                # The step's one host sync, before this last micro-batch's backward and the optimizer step.
                self.check_step()
                self.step += 1
        if penalty is not None:
            if not hasattr(outputs, "keys"):
                raise ValueError(
                    f"OrthoLoRA needs a ModelOutput from the model (got {type(outputs).__name__}); do not pass "
                    "return_dict=False"
                )
            loss = outputs.get("loss")
            outputs["orthoreg_penalty"] = penalty
            if loss is not None:
                outputs["task_loss"] = loss
                outputs["loss"] = loss + penalty
        return outputs

    # ------------------------------------------------------------------ metrics
    def _record_metrics(self, session: WriterSession | None, weight_sum: torch.Tensor | None, penalty: Any) -> None:
        # Tensors only: nothing here waits for the device. Values become floats when read (``pop_metrics``,
        # ``last_metrics``).
        metrics: dict[str, torch.Tensor] = {}
        if weight_sum is not None:
            metrics["lora"] = weight_sum.detach()
            for name, value in session.values.items():
                key = f"lora/layer_{session.layers[name]}"
                value = value * session.scale.gate
                metrics[key] = metrics[key] + value if key in metrics else value
        if isinstance(penalty, torch.Tensor):
            metrics["total"] = penalty.detach()
        if self.regularizer is not None:
            for key, value in self.regularizer.pop_metric_tensors().items():
                if key != "total":
                    metrics[key] = value
        if not metrics:
            return
        self._last_metric_tensors = metrics
        for key, value in metrics.items():
            self._metric_sums[key] = self._metric_sums[key] + value if key in self._metric_sums else value
        self._metric_count += 1

    @property
    def last_metrics(self) -> dict[str, float]:
        """The latest training forward's penalties, in the vocabulary of ``orthoreg.engine.metrics``."""
        return metric_names(_to_floats(self._last_metric_tensors))

    def read_harm_signal(self) -> dict[str, float]:
        """Measures the refusal margins now (``orthoreg/harm_margin``…, one no-grad forward; every rank must call
        it under ZeRO-3/FSDP) and keeps them for the next ``pop_metrics``. ``forward`` calls it by itself every
        ``config.harm_signal_every`` updates; call it after the last step for a final reading."""
        if self.harm_signal is None:
            raise ValueError("this OrthoLoRA reads no harm signal: build it with OrthoRegConfig(harm_signal_every=N) "
                             "and tokenizer=")
        return self.harm_signal.read(self.model, self.step)

    @property
    def harm_readings(self) -> list[dict[str, float]]:
        """Every harm-signal reading of this run, with its step (empty without ``harm_signal_every``)."""
        return self.harm_signal.readings if self.harm_signal is not None else []

    def check_step(self) -> int:
        """The numerical health check of the optimizer step (one host sync; see ``orthoreg.engine.health``). Called by
        ``forward`` at the end of each accumulation cycle; returns the micro-batches whose penalty was dropped."""
        dropped = self._health.check(self.step)
        if self.regularizer is not None:
            dropped = max(dropped, self.regularizer.check_step())
        if self.reader is not None:
            self.reader.check_step()
        self._skipped += dropped
        return dropped

    def pop_metrics(self, per_layer: bool | None = None) -> dict[str, float]:
        """Means over the training forwards since the last call, then resets.

        Keys are those ``OrthoRegCallback`` logs (``orthoreg.engine.metrics``): ``orthoreg/lora`` (Σ s²‖(UB)A‖² over
        penalised writers, unweighted), ``orthoreg/cov``, ``orthoreg/proj`` (sums over guarded layers, unweighted),
        ``orthoreg/total`` (the weighted penalty added to the loss, with warm-up), ``orthoreg/warmup`` (w(t)),
        ``orthoreg/<term>/layer_i`` with ``per_layer`` (default ``config.per_layer_metrics``), ``orthoreg/skipped``
        (micro-batches whose penalty was dropped as non-finite), and the latest harm-signal reading not yet popped
        (``orthoreg/harm_margin``…, with ``config.harm_signal_every``). Values are this rank's; average across
        ranks with ``accelerator.reduce`` if needed (not the harm signal: every rank measures the same model).
        """
        per_layer = self.config.per_layer_metrics if per_layer is None else per_layer
        count, sums, skipped = self._metric_count, self._metric_sums, self._skipped
        self._metric_sums, self._metric_count, self._skipped = {}, 0, 0
        out = {k: v / count for k, v in _to_floats(sums).items() if per_layer or "/layer_" not in k} if count else {}
        if self.reader is not None:
            out.update(self.reader.pop_metrics(per_module=per_layer))
        if self.anchor_kl is not None:
            out.update(self.anchor_kl.pop_metrics())
        if skipped:
            out["skipped"] = float(skipped)
        named = metric_names(out, warmup=self.config.warmup_factor(max(self.step - 1, 0)) if count else None)
        if self.harm_signal is not None:
            named.update(self.harm_signal.pop())
        return named

    # ------------------------------------------------------------------ lifecycle
    def remove_hooks(self) -> None:
        """Removes every hook OrthoLoRA installed; the PEFT model is then a plain PEFT model again."""
        if self._writer_hooks is not None:
            self._writer_hooks.remove()
        if self.regularizer is not None:
            self.regularizer.detach()
        if self.reader is not None:
            self.reader.detach()

    def state_dict_orthoreg(self) -> dict[str, Any]:
        """JSON-serialisable training state: the step and the regulariser's recorded references."""
        return {
            "step": self.step,
            "regularizer": self.regularizer.state_dict() if self.regularizer is not None else None,
            "harm_signal": self.harm_signal.probe.state_dict() if self.harm_signal is not None else None,
        }

    def load_state_dict_orthoreg(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))
        if state.get("regularizer") is not None and self.regularizer is not None:
            self.regularizer.load_state_dict(state["regularizer"])
        if state.get("harm_signal") is not None and self.harm_signal is not None:  # the base of step 0, not now's
            self.harm_signal.probe.load_state_dict(state["harm_signal"])
            self.harm_signal.readings.clear()

    def save_pretrained(self, save_directory: str | os.PathLike, *, is_main_process: bool | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> None:
        """Writes the adapter and orthoreg's files next to it; see ``orthoreg.lora.io.save_ortholora``."""
        save_ortholora(self, save_directory, is_main_process=is_main_process, state_dict=state_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, pretrained_path: str | os.PathLike, accelerator: Any = None, *,
                        is_trainable: bool = True, writer_modules: Sequence[str] | None = None,
                        tokenizer: Any = None, **peft_kwargs: Any) -> OrthoLoRA:
        """Restores an OrthoLoRA written by ``save_pretrained``; see ``orthoreg.lora.io.load_ortholora``."""
        return load_ortholora(cls, base_model, pretrained_path, accelerator, is_trainable=is_trainable,
                              writer_modules=writer_modules, tokenizer=tokenizer, **peft_kwargs)


def _to_floats(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """One device-to-host transfer for a dict of 0-dim tensors."""
    if not tensors:
        return {}
    values = torch.stack([t.float().reshape(()).to(next(iter(tensors.values())).device) for t in tensors.values()])
    return dict(zip(tensors, values.tolist(), strict=True))
