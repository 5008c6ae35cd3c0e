"""``OrthoRegularizer``: hooks that capture hidden states and turn them into penalty gradients.

The engine shared by ``OrthoRegCallback`` (Trainer/TRL) and ``OrthoLoRA`` (custom loops). Per model forward:

1. a forward pre-hook on the unwrapped LM opens a *session*: it decides whether this forward is regularised
   (``lm.training`` and grad enabled — so DPO's reference passes and evaluation are not), builds the token mask
   from the call's ``attention_mask``/``labels``/``position_ids``, and, for ``anchor="paired"``, runs the
   reference forward with the PEFT adapter disabled;
2. forward hooks on the guarded decoder layers *capture* their outputs — only the first call per session, because
   activation checkpointing re-runs layers during backward (transformers < 5.23 fires layer hooks twice; under
   reentrant checkpointing the first call is under no_grad, and the captured tensor becomes differentiable when
   the checkpoint returns it);
3. a forward hook on the module that runs the layers (``LlamaModel``, ``GPT2Model``, …) closes the session: it
   runs once, outside any checkpoint, with grad enabled, computes the penalties in float32 (the formula:
   ``orthoreg.engine.activation_terms``), and either *injects*
   their gradient into the graph (``mode="inject"``: the output is passed through ``orthoreg.terms.injection.inject_penalty``, the
   identity forward whose backward also sends ``coef`` into the penalty, exactly as if ``coef · penalty`` had been added to
   the loss) or keeps the weighted penalty for the caller to add to its loss (``mode="return"``).

Injection is what makes a plain ``TrainerCallback`` work unchanged in ``Trainer``, ``SFTTrainer`` and
``DPOTrainer`` (which computes its loss from logits and ignores ``outputs.loss``). It bypasses fp16 loss scaling,
so fp16 with a GradScaler is refused by the callback.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..config import OrthoRegConfig
from ..core.capture import (
    DecoderStack,
    batch_shape,
    bind_forward_inputs,
    find_decoder_stack,
    layer_hidden,
    resolve_layers,
    token_mask,
)
from ..core.reference import (
    NO_GRAD_CHECKPOINT_WARNING,
    capture_reference_layers,
    find_peft_model,
    lora_dropout_modules,
    reference_forward,
    reference_forward_active,
)
from ..directions.harmful import DirectionsError, DirectionsOnDevice, HarmfulDirections
from ..terms.injection import PenaltyScale, inject_penalty
from .activation_terms import ActivationTerms, ForwardSession
from .base_statistics import BaseStatistics, calibrate
from .health import IllConditionedPenaltyError, NonFiniteHiddenStateError, StepHealth
from .metrics import PenaltyMetrics

logger = logging.getLogger(__name__)

__all__ = [
    "IllConditionedPenaltyError",
    "NO_GRAD_CHECKPOINT_WARNING",
    "NonFiniteHiddenStateError",
    "OrthoRegularizer",
    "attached",
    "batch_shape",
    "capture_reference_layers",
    "find_peft_model",
    "reference_forward",
    "reference_forward_active",
]

# The regularisers attached to each LM (by id), to find the hooks of a training run that ended by an exception.
_ATTACHED: dict[int, list[weakref.ref]] = {}


class OrthoRegularizer(ActivationTerms):
    """Attaches orthoreg's penalties to a causal LM through hooks.

    Args:
        config (`OrthoRegConfig`): what to penalise and how strongly.
        directions (`HarmfulDirections`, *optional*): harmful subspaces; required when ``config.proj_weight > 0``.
            Only guarded layers that have directions get a projection term (a warning lists the others).
        mode (`str`, *optional*, defaults to `"inject"`): ``"inject"`` adds the penalty's gradient inside the
            backward of the task loss; ``"return"`` leaves the weighted penalty in ``pending_penalty`` for the
            caller to add to its loss.
        check (`str`, *optional*, defaults to `"forward"`): when the numerical health of the penalty (see
            ``orthoreg.engine.health``) is checked: after every forward (``"forward"``: one host sync each; for direct
            use), or only when the owner calls ``check_step()`` once per optimizer step (``"step"``: what
            ``OrthoRegCallback`` and ``OrthoLoRA`` do). Either way a NaN/Inf or ill-conditioned penalty never
            reaches the weights unannounced.

    Attributes:
        grad_scale (`float`): multiplier on the penalty for the current micro-batch (the caller sets 1/GA here,
            so the regulariser is scaled like the task loss).
        step (`int`): optimizer step, for the warm-up schedule.
        base_reference (`dict[int, Tensor]`): recorded base mean projections r per layer (``anchor="base_mean"``),
            float32, always finite.
    """

    def __init__(self, config: OrthoRegConfig, directions: HarmfulDirections | None = None, mode: str = "inject",
                 check: str = "forward"):
        if mode not in ("inject", "return"):
            raise ValueError(f"mode must be 'inject' or 'return'; got {mode!r}")
        if check not in ("forward", "step"):
            raise ValueError(f"check must be 'forward' or 'step'; got {check!r}")
        if config.proj_weight > 0 and directions is None:
            raise ValueError(
                "OrthoRegConfig(proj_weight > 0) needs harmful directions: pass `directions=` "
                "(HarmfulDirections.load(path) or extract_directions(...)), or set proj_weight=0"
            )
        self.config = config
        self.directions = directions
        # U_ℓ in float32 on the activations' device, copied once per device, not per forward.
        self.directions_on = DirectionsOnDevice(directions) if directions is not None else None
        self.mode = mode
        self.check = check
        self.grad_scale = 1.0
        self.step = 0
        self.base_mean = BaseStatistics(config.calibration_batches, config.on_nonfinite)
        self.pending_penalty: torch.Tensor | None = None
        self.stack: DecoderStack | None = None
        self.layer_indices: list[int] = []
        self.owner: Any = None  # who attached it (a TrainerState for OrthoRegCallback), to recognise stale hooks
        self.health = StepHealth(config.on_nonfinite)
        self._peft_model: nn.Module | None = None
        self._replay_dropout: list[nn.Module] = []
        self._handles: list[Any] = []
        self._session: ForwardSession | None = None
        self._reset_metrics()

    # ------------------------------------------------------------------ attachment
    def attach(self, model: nn.Module) -> OrthoRegularizer:
        """Finds the decoder layers of ``model`` (bare, PEFT- or DDP/DeepSpeed/FSDP-wrapped) and installs hooks.

        Raises:
            UnsupportedArchitectureError, ValueError, DirectionsError: naming the problem and the fix.
        """
        if self._handles:
            raise RuntimeError("this OrthoRegularizer is already attached; call detach() first")
        stack = find_decoder_stack(model, layers_path=self.config.layers_path)
        indices = resolve_layers(self.config.layers, stack.num_layers)
        if self.directions is not None:
            self.directions.check_compatible(stack.hidden_size, stack.num_layers, stack.model_type)
            if self.config.proj_weight > 0:
                uncovered = [i for i in indices if i not in self.directions]
                if len(uncovered) == len(indices):
                    raise DirectionsError(
                        f"none of the guarded layers {indices} has harmful directions (directions cover layers "
                        f"{self.directions.layers}); set OrthoRegConfig(layers=...) to those layers"
                    )
                if uncovered:
                    warnings.warn(
                        f"guarded layers {uncovered} have no harmful directions (directions cover "
                        f"{self.directions.layers}), so they get no projection term"
                        f"{' (only the covariance)' if self.config.cov_weight > 0 else ''}; guard "
                        "OrthoRegConfig(layers=directions.layers) or extract directions for them",
                        UserWarning,
                        stacklevel=2,
                    )
        peft_model = find_peft_model(model)
        if self.config.anchor == "paired" and self.config.proj_weight > 0 and peft_model is None:
            raise ValueError(
                "anchor='paired' needs the base model's activations from the same model with its adapter disabled, "
                "so it works only with PEFT models; use anchor='base_mean' for full fine-tuning"
            )
        self.stack, self.layer_indices, self._peft_model = stack, indices, peft_model
        if peft_model is not None and self.config.anchor == "paired":
            self._replay_dropout = lora_dropout_modules(stack.stack)
        self._handles.append(stack.lm.register_forward_pre_hook(self._open_session, with_kwargs=True))
        for index in indices:
            self._handles.append(stack.layers[index].register_forward_hook(self._make_capture_hook(index)))
        self._handles.append(stack.stack.register_forward_hook(self._close_session))
        _ATTACHED.setdefault(id(stack.lm), []).append(weakref.ref(self))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._session = None
        if self.stack is not None:
            refs = _ATTACHED.get(id(self.stack.lm), [])
            refs[:] = [r for r in refs if r() is not None and r() is not self]
            if not refs:
                _ATTACHED.pop(id(self.stack.lm), None)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def others_attached(self, model: nn.Module) -> list[OrthoRegularizer]:
        """The other regularisers of this class whose hooks are on ``model``'s LM (e.g. those of a training run that
        ended by an exception before it could remove them)."""
        lm = find_decoder_stack(model, layers_path=self.config.layers_path).lm
        return [r() for r in _ATTACHED.get(id(lm), []) if r() is not None and r() is not self
                and type(r()) is type(self) and r().attached]

    # ------------------------------------------------------------------ hooks
    def _open_session(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if reference_forward_active():
            return None
        active = module.training and torch.is_grad_enabled()
        self._session = ForwardSession(active=active)
        if not active:
            return None
        inputs = bind_forward_inputs(module, args, kwargs)
        shape = batch_shape(inputs)
        if shape is not None:
            self._session.mask = token_mask(inputs, shape, self.config.mask)
        if self.config.anchor == "paired" and self.config.proj_weight > 0:
            self._session.reference = self._reference_hidden_states(
                module, args, kwargs, transform=self._reference_coordinates
            )
        return None

    def _make_capture_hook(self, index: int):
        def capture(module: nn.Module, args: tuple, output: Any) -> None:
            session = self._session
            if reference_forward_active() or session is None or not session.active or index in session.captured:
                return None
            session.captured[index] = layer_hidden(output)
            return None

        return capture

    def _close_session(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if reference_forward_active():
            return None
        session, self._session = self._session, None
        if session is None or not session.active:
            return None
        missing = [i for i in self.layer_indices if i not in session.captured]
        if missing:
            raise RuntimeError(
                f"orthoreg captured no output for decoder layers {missing} in this forward; something replaced "
                "or skipped them (layer dropping, early exit). Guard other layers."
            )
        penalty = self._penalty(session)
        if self.check == "forward" and self.health.pending:
            self.check_step()
        if penalty is None:
            return None
        if self.mode == "return":
            self.pending_penalty = penalty if self.pending_penalty is None else self.pending_penalty + penalty
            return None
        scale = PenaltyScale(self.grad_scale)
        return _replace_first_tensor(output, lambda x: inject_penalty(x, penalty, scale))

    def check_step(self) -> int:
        """Checks the numerical health of every micro-batch since the last check (one host sync); see
        ``orthoreg.engine.health``. Raises ``NonFiniteHiddenStateError``/``IllConditionedPenaltyError``, or returns the
        number of micro-batches whose penalty was dropped (``on_nonfinite="skip"``)."""
        dropped = self.health.check(self.step)
        self._skipped += dropped
        return dropped

    @property
    def base_reference(self) -> dict[int, torch.Tensor]:
        return self.base_mean.values

    @base_reference.setter
    def base_reference(self, values: dict[int, torch.Tensor]) -> None:
        self.base_mean.values = values

    @property
    def calibration_tokens(self) -> dict[int, int]:
        return self.base_mean.tokens

    @property
    def calibration_batches_seen(self) -> int:
        return self.base_mean.batches_seen

    @calibration_batches_seen.setter
    def calibration_batches_seen(self, value: int) -> None:
        self.base_mean.batches_seen = value

    @property
    def calibrating(self) -> bool:
        """Whether regularised forwards are still recording the base model's statistics (r for
        ``anchor="base_mean"``, the base units): normally during the first ``calibration_batches`` micro-batches of
        step 0, later only when those held NaN/Inf under ``on_nonfinite="skip"``. ``OrthoRegCallback`` saves the
        recorded state once this turns false."""
        return self.base_mean.calibrating(self.step)

    def penalty_for_activations(
        self, captured: dict[int, torch.Tensor], mask: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The activation terms' penalty of one forward from the guarded layers' outputs (layer → (B, T, d)) and
        the token mask (``None``: every token), computed exactly as the forward hook computes it (warm-up factor
        included, ``grad_scale`` not; metrics and health checks updated) but without running the model: for timing
        or testing the terms in isolation. ``None`` when no term applies."""
        return self._penalty(ForwardSession(active=True, mask=mask, captured=captured))

    def calibrate(self, model: nn.Module, batches: Iterator[dict[str, torch.Tensor]]) -> None:
        """Records the base model's statistics (r for ``anchor="base_mean"``, the base units) on a calibration set;
        see ``orthoreg.engine.base_statistics.calibrate``."""
        calibrate(self, model, batches)

    def _reference_hidden_states(
        self, lm: nn.Module, args: tuple, kwargs: dict, transform=None
    ) -> dict[int, torch.Tensor]:
        """The guarded layers' outputs of the same model with its PEFT adapter disabled, on the same inputs and with
        the same dropout masks as the training forward (see ``orthoreg.core.reference``).

        ``transform(index, h)``, when given, is applied to each captured output and its result stored instead (a
        layer is left out when it returns ``None``), so only what the penalty needs stays alive.
        """
        inputs = bind_forward_inputs(lm, args, kwargs)
        with self._peft_model.disable_adapter():
            return capture_reference_layers(self.stack, self.layer_indices, inputs, transform,
                                            replay_lora_dropout=self._replay_dropout)

    # ------------------------------------------------------------------ metrics and state
    def _reset_metrics(self) -> None:
        self.metrics = PenaltyMetrics()
        self._skipped = 0

    def _accumulate_metrics(self, values: dict[str, torch.Tensor], weighted_total: torch.Tensor,
                            keep: torch.Tensor | float = 1.0) -> None:
        self.metrics.add(values, weighted_total, keep)

    def pop_metrics(self, per_layer: bool | None = None) -> dict[str, float]:
        """Mean of each penalty over the micro-batches since the last call, then resets the running sums.

        Keys: ``cov`` and ``proj`` (summed over guarded layers, unweighted; means with ``units="base"``), ``total``
        (weighted, with warm-up), ``cov/layer_i``/``proj/layer_i`` when ``per_layer``, ``skipped`` when non-finite
        batches were dropped.
        """
        out = self.metrics.pop(self.config.per_layer_metrics if per_layer is None else per_layer)
        if self._skipped:
            out["skipped"] = float(self._skipped)
        self._skipped = 0
        return out

    def pop_metric_tensors(self) -> dict[str, torch.Tensor]:
        """``pop_metrics(per_layer=True)`` as 0-dim tensors, without a host sync (``OrthoLoRA`` reads it after every
        forward); ``skipped`` is not included (see ``check_step``)."""
        return self.metrics.pop_tensors()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: recorded references and calibration progress (floats are exact in JSON)."""
        return self.base_mean.state_dict(self.config.anchor, self.layer_indices)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores ``state_dict()``'s output, validating it against this run (anchor, layers, one finite r of k
        entries per layer with directions); a corrupt or mismatched state raises, naming the field and the fix."""
        widths = None
        if self.directions is not None:
            widths = {i: int(self.directions[i].shape[0]) for i in self.directions.layers}
        self.base_mean.load_state_dict(state, self.config.anchor, self.layer_indices if self.attached else None,
                                       widths)


def _replace_first_tensor(output: Any, fn) -> Any:
    """Applies ``fn`` to the hidden-state tensor of a decoder stack's output (ModelOutput, tuple or Tensor)."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if hasattr(output, "last_hidden_state") and isinstance(output.last_hidden_state, torch.Tensor):
        output.last_hidden_state = fn(output.last_hidden_state)
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (fn(output[0]),) + tuple(output[1:])
    raise TypeError(f"cannot find the hidden states in a decoder stack output of type {type(output).__name__}")



@contextlib.contextmanager
def attached(model: nn.Module, config: OrthoRegConfig, directions: HarmfulDirections | None = None, **kwargs):
    """Context manager: ``with attached(model, cfg, dirs) as reg: ...`` removes the hooks on exit."""
    reg = OrthoRegularizer(config, directions, **kwargs).attach(model)
    try:
        yield reg
    finally:
        reg.detach()
