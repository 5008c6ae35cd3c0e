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
   runs once, outside any checkpoint, with grad enabled, computes the penalties in float32, and either *injects*
   their gradient into the graph (``mode="inject"``: the output is passed through ``_InjectPenalty``, the identity
   forward whose backward also sends ``coef`` into the penalty, exactly as if ``coef · penalty`` had been added to
   the loss) or keeps the weighted penalty for the caller to add to its loss (``mode="return"``).

Injection is what makes a plain ``TrainerCallback`` work unchanged in ``Trainer``, ``SFTTrainer`` and
``DPOTrainer`` (which computes its loss from logits and ignores ``outputs.loss``). It bypasses fp16 loss scaling,
so fp16 with a GradScaler is refused by the callback.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .capture import DecoderStack, bind_forward_inputs, find_decoder_stack, layer_hidden, resolve_layers, token_mask
from .config import OrthoRegConfig
from .directions import DirectionsError, HarmfulDirections
from .penalties import (
    _no_autocast,
    all_reduce_sum,
    covariance_from_index,
    data_parallel_world,
    projection_from_index,
    select_tokens,
    selected_index,
)

logger = logging.getLogger(__name__)

# torch warns on every no-grad forward through a checkpointed layer (transformers < 5.23); reference passes are that.
NO_GRAD_CHECKPOINT_WARNING = "None of the inputs have requires_grad=True"
_reference_state = threading.local()


def reference_forward_active() -> bool:
    """Whether a reference forward (base activations or logits, no grad) is running in this thread."""
    return getattr(_reference_state, "depth", 0) > 0


@contextlib.contextmanager
def reference_forward():
    """Marks a reference forward in progress. The flag is shared by every regulariser on every model, so two
    regularisers on one model (e.g. orthoreg's paired anchor and LDIFS) never capture each other's reference
    passes as training activations, nor close each other's sessions."""
    _reference_state.depth = getattr(_reference_state, "depth", 0) + 1
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=NO_GRAD_CHECKPOINT_WARNING)
            yield
    finally:
        _reference_state.depth -= 1


class NonFiniteHiddenStateError(FloatingPointError):
    """A guarded layer produced NaN/Inf hidden states or penalties."""


class _InjectPenalty(torch.autograd.Function):
    """Identity on ``x``; backward returns ``grad_x`` unchanged and a gradient of exactly 1 for ``penalty``.

    With ``penalty = coef · p`` the parameters receive ``coef · ∂p/∂θ`` on top of the task gradient: the same as
    backpropagating ``task_loss + coef · p``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        ctx.penalty_meta = (penalty.shape, penalty.dtype, penalty.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape, dtype, device = ctx.penalty_meta
        return grad_x, torch.ones(shape, dtype=dtype, device=device)


@dataclass
class _Session:
    active: bool
    mask: torch.Tensor | None = None
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    # anchor="paired": per guarded layer with directions, U x_ref of every token, (B·T, k) float32 (not the
    # (B, T, d) reference activations: the projection needs only these coordinates). Subclasses (LDIFS) may store
    # reference hidden states here instead.
    reference: dict[int, torch.Tensor] | None = None
    index: torch.Tensor | None = None  # flat indices of the selected tokens (None: all), computed once per forward
    index_ready: bool = False
    token_share: float | None = None  # gather=True: W·n_r/N of this forward (see OrthoRegularizer._global_token_share)


@torch.no_grad()
def capture_reference_layers(
    stack: DecoderStack, layer_indices: list[int], inputs: dict[str, Any], transform=None
) -> dict[int, torch.Tensor]:
    """A reference forward of ``stack``'s decoder on ``inputs`` (the LM's forward kwargs): no grad, marked with
    ``reference_forward()`` so no regulariser or monitor observes it, stopped after the deepest of
    ``layer_indices`` (the layers above and the LM head are not needed). Returns those layers' outputs, detached
    (or ``transform(index, h)`` of each; a layer is left out when it returns ``None``)."""
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layer_indices)

    def make_hook(index: int):
        def hook(module, args, output):
            if index not in captured:
                value = layer_hidden(output).detach()
                value = value if transform is None else transform(index, value)
                if value is not None:
                    captured[index] = value
            if index == deepest:
                raise _StopReferenceForward

        return hook

    hooks = [stack.layers[i].register_forward_hook(make_hook(i)) for i in layer_indices]
    stack_inputs = {k: v for k, v in inputs.items() if k in _STACK_INPUTS and v is not None}
    try:
        with reference_forward():
            stack.stack(**stack_inputs, use_cache=False)
    except _StopReferenceForward:
        pass
    finally:
        for h in hooks:
            h.remove()
    return captured


class OrthoRegularizer:
    """Attaches orthoreg's penalties to a causal LM through hooks.

    Args:
        config (`OrthoRegConfig`): what to penalise and how strongly.
        directions (`HarmfulDirections`, *optional*): harmful subspaces; required when ``config.proj_weight > 0``.
            Only guarded layers that have directions get a projection term.
        mode (`str`, *optional*, defaults to `"inject"`): ``"inject"`` adds the penalty's gradient inside the
            backward of the task loss; ``"return"`` leaves the weighted penalty in ``pending_penalty`` for the
            caller to add to its loss.

    Attributes:
        grad_scale (`float`): multiplier on the penalty for the current micro-batch (the caller sets 1/GA here,
            so the regulariser is scaled like the task loss).
        step (`int`): optimizer step, for the warm-up schedule.
        base_reference (`dict[int, Tensor]`): recorded base mean projections r per layer (``anchor="base_mean"``).
    """

    def __init__(self, config: OrthoRegConfig, directions: HarmfulDirections | None = None, mode: str = "inject"):
        if mode not in ("inject", "return"):
            raise ValueError(f"mode must be 'inject' or 'return'; got {mode!r}")
        if config.proj_weight > 0 and directions is None:
            raise ValueError(
                "OrthoRegConfig(proj_weight > 0) needs harmful directions: pass `directions=` "
                "(HarmfulDirections.load(path) or extract_directions(...)), or set proj_weight=0"
            )
        self.config = config
        self.directions = directions
        self.mode = mode
        self.grad_scale = 1.0
        self.step = 0
        self.base_reference: dict[int, torch.Tensor] = {}
        self.calibration_tokens: dict[int, int] = {}
        self.calibration_batches_seen = 0
        self.pending_penalty: torch.Tensor | None = None
        self.stack: DecoderStack | None = None
        self.layer_indices: list[int] = []
        self._peft_model: nn.Module | None = None
        self._handles: list[Any] = []
        self._session: _Session | None = None
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
            if self.config.proj_weight > 0 and not any(i in self.directions for i in indices):
                raise DirectionsError(
                    f"none of the guarded layers {indices} has harmful directions (directions cover layers "
                    f"{self.directions.layers}); set OrthoRegConfig(layers=...) to those layers"
                )
        peft_model = _find_peft_model(model)
        if self.config.anchor == "paired" and self.config.proj_weight > 0 and peft_model is None:
            raise ValueError(
                "anchor='paired' needs the base model's activations from the same model with its adapter disabled, "
                "so it works only with PEFT models; use anchor='base_mean' for full fine-tuning"
            )
        self.stack, self.layer_indices, self._peft_model = stack, indices, peft_model
        self._handles.append(stack.lm.register_forward_pre_hook(self._open_session, with_kwargs=True))
        for index in indices:
            self._handles.append(stack.layers[index].register_forward_hook(self._make_capture_hook(index)))
        self._handles.append(stack.stack.register_forward_hook(self._close_session))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._session = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # ------------------------------------------------------------------ hooks
    def _open_session(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if reference_forward_active():
            return None
        active = module.training and torch.is_grad_enabled()
        self._session = _Session(active=active)
        if not active:
            return None
        inputs = bind_forward_inputs(module, args, kwargs)
        shape = _batch_shape(inputs)
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
        if penalty is None:
            return None
        if self.mode == "return":
            self.pending_penalty = penalty if self.pending_penalty is None else self.pending_penalty + penalty
            return None
        return _replace_first_tensor(output, lambda x: _InjectPenalty.apply(x, penalty * self.grad_scale))

    # ------------------------------------------------------------------ the math
    def _selected_index(self, session: _Session, h: torch.Tensor) -> torch.Tensor | None:
        """Flat indices of the session's selected tokens, computed once per forward and shared by every layer and
        term (``None`` when all tokens count)."""
        if not session.index_ready:
            mask = session.mask
            if mask is not None and tuple(mask.shape) != tuple(h.shape[:-1]):
                raise ValueError(f"mask has shape {tuple(mask.shape)} but hidden states are {tuple(h.shape)}")
            session.index = selected_index(None if mask is None else mask.to(h.device))
            session.index_ready = True
        index = session.index
        if index is not None and index.device != h.device:  # layers on several devices (pipeline / device_map)
            index = index.to(h.device)
        return index

    def _penalty(self, session: _Session) -> torch.Tensor | None:
        cfg = self.config
        mask = session.mask
        calibrating = cfg.anchor == "base_mean" and self._calibrating()
        total = None
        values: dict[str, torch.Tensor] = {}
        for index in self.layer_indices:
            h = session.captured[index]
            if mask is not None and mask.device != h.device:
                mask = mask.to(h.device)
            rows = self._selected_index(session, h)
            terms = []
            if cfg.cov_weight > 0:
                cov = covariance_from_index(h, rows, gather=cfg.gather)
                values[f"cov/layer_{index}"] = cov.detach()
                terms.append(cfg.cov_weight * cov)
            if cfg.proj_weight > 0 and self.directions is not None and index in self.directions:
                u = self.directions[index]
                if u.device != h.device:
                    u = self.directions.directions[index] = u.to(h.device)
                if calibrating:
                    self._record_base_mean(index, h, mask, u)
                reference = None
                if cfg.anchor == "base_mean":
                    if index not in self.base_reference:
                        raise RuntimeError(
                            f"no recorded base projection for layer {index}: calibration ran before this layer was "
                            "guarded, or a resumed run lost its orthoreg state. Call calibrate() before training, "
                            "or resume from a checkpoint written with orthoreg attached."
                        )
                    reference = self.base_reference[index]
                    if reference.device != h.device:
                        reference = self.base_reference[index] = reference.to(h.device)
                elif cfg.anchor == "paired":
                    reference = session.reference[index].to(h.device)
                    if rows is not None:
                        reference = reference.index_select(0, rows)
                proj = projection_from_index(h, _float32(u), rows, reference, one_sided=cfg.one_sided)
                if cfg.gather:
                    proj = proj * self._global_token_share(session, h, rows)
                values[f"proj/layer_{index}"] = proj.detach()
                terms.append(cfg.proj_weight * proj)
            for term in terms:
                total = term if total is None else total + term
        if calibrating:
            self.calibration_batches_seen += 1
        if total is None:
            return None
        if not torch.isfinite(total):
            bad = [name for name, v in values.items() if not torch.isfinite(v)]
            message = (
                f"orthoreg penalty is not finite at step {self.step} ({', '.join(bad) or 'total'}): the guarded "
                "hidden states contain NaN/Inf (diverging training, fp16 overflow). Lower the learning rate, use bf16 "
                "or fp32, or set OrthoRegConfig(on_nonfinite='skip') to drop such micro-batches."
            )
            if self.config.on_nonfinite == "raise":
                raise NonFiniteHiddenStateError(message)
            logger.warning(message + " Skipping the penalty for this micro-batch.")
            self._skipped += 1
            return None
        weighted = total * cfg.warmup_factor(self.step)
        self._accumulate_metrics(values, weighted.detach())
        return weighted

    def _calibrating(self) -> bool:
        return self.calibration_batches_seen < self.config.calibration_batches and self.step == 0

    @torch.no_grad()
    def _global_token_share(self, session: _Session, h: torch.Tensor, rows: torch.Tensor | None) -> float:
        """W·n_r/N for ``gather=True``: turns this rank's token mean into its share of the global-batch token mean
        (Σ_ranks Σ_tokens / N, N the selected tokens of all ranks), so that DDP's gradient averaging (÷W) yields the
        gradient of the global mean, and the ranks' logged values average to it. One all-reduce per forward."""
        if session.token_share is None:
            world = data_parallel_world()
            n_local = h.shape[0] * h.shape[1] if rows is None else rows.numel()
            if world == 1:
                session.token_share = 1.0
            else:
                n_all = int(all_reduce_sum(torch.tensor([n_local], dtype=torch.float64, device=h.device)).item())
                session.token_share = world * n_local / n_all if n_all else 0.0
        return session.token_share

    def _record_base_mean(self, index: int, h: torch.Tensor, mask: torch.Tensor | None, u: torch.Tensor) -> None:
        # Token-weighted running mean of U x over the calibration micro-batches (before any optimizer update) of
        # every data-parallel rank: one all-reduce of (Σ U x, n) per layer and calibration micro-batch, so all ranks
        # hold the same r — the one a single process would record from the concatenated batch, and the one the
        # checkpoint (written by rank 0) restores on every rank. A rank with no selected token still takes part.
        coords = select_tokens(h.detach(), mask) @ u.float().T
        if data_parallel_world() > 1:
            sums = torch.cat([coords.double().sum(dim=0), coords.new_tensor([coords.shape[0]], dtype=torch.float64)])
            sums = all_reduce_sum(sums)
            n = int(sums[-1].item())
            batch_mean = (sums[:-1] / max(n, 1)).float()
        else:  # the float32 mean, exactly as recorded results (the toy-world studies, the demo) were computed
            n = coords.shape[0]
            batch_mean = coords.mean(dim=0) if n else None
        if n == 0:
            self.base_reference.setdefault(index, torch.zeros(u.shape[0], device=h.device))
            return
        seen = self.calibration_tokens.get(index, 0)
        if seen == 0:
            self.base_reference[index] = batch_mean
        else:
            prev = self.base_reference[index].to(h.device)
            self.base_reference[index] = prev + (batch_mean - prev) * (n / (seen + n))
        self.calibration_tokens[index] = seen + n

    def calibrate(self, model: nn.Module, batches: Iterator[dict[str, torch.Tensor]]) -> None:
        """Records the base model's mean projection r on a calibration set (``anchor="base_mean"``).

        Call before training; replaces recording from the first training batches. ``batches`` yields model
        kwargs (``input_ids``, ``attention_mask``, …) already on the model's device. Under data parallelism every
        rank must call it with the same number of batches: r is the token mean over all ranks' batches (one
        all-reduce per layer and batch).
        """
        if not self.attached:
            self.attach(model)
        self.base_reference.clear()
        self.calibration_tokens.clear()
        stack = self.stack
        captured: dict[int, list] = {}
        hooks = []
        current_mask: list[torch.Tensor | None] = [None]

        def pre(module, args, kwargs):
            inputs = bind_forward_inputs(module, args, kwargs)
            shape = _batch_shape(inputs)
            current_mask[0] = token_mask(inputs, shape, self.config.mask) if shape else None

        def make(index):
            def hook(module, args, output):
                if self.directions is not None and index in self.directions:
                    u = self.directions[index].to(layer_hidden(output).device)
                    self._record_base_mean(index, layer_hidden(output), current_mask[0], u)
                captured.setdefault(index, [])

            return hook

        hooks.append(stack.lm.register_forward_pre_hook(pre, with_kwargs=True))
        hooks += [stack.layers[i].register_forward_hook(make(i)) for i in self.layer_indices]
        was_training = stack.lm.training
        try:
            stack.lm.eval()
            with torch.no_grad():
                for batch in batches:
                    model(**batch)
        finally:
            for h in hooks:
                h.remove()
            stack.lm.train(was_training)
        if not self.base_reference:
            raise ValueError("calibration saw no tokens: the calibration batches are empty or all padding")
        self.calibration_batches_seen = self.config.calibration_batches  # calibration done

    @torch.no_grad()
    def _reference_hidden_states(
        self, lm: nn.Module, args: tuple, kwargs: dict, transform=None
    ) -> dict[int, torch.Tensor]:
        """The guarded layers' outputs of the same model with its PEFT adapter disabled, on the same inputs.

        ``transform(index, h)``, when given, is applied to each captured output and its result stored instead (a
        layer is left out when it returns ``None``), so only what the penalty needs stays alive.
        """
        inputs = bind_forward_inputs(lm, args, kwargs)
        with self._peft_model.disable_adapter():
            return capture_reference_layers(self.stack, self.layer_indices, inputs, transform)

    def _reference_coordinates(self, index: int, h_ref: torch.Tensor) -> torch.Tensor | None:
        """U_ℓ x_ref for every token of the reference activations, (B·T, k) float32; ``None`` without directions."""
        if self.directions is None or index not in self.directions:
            return None
        u = _float32(self.directions[index]).to(h_ref.device)
        with _no_autocast(h_ref.device):
            return h_ref.reshape(-1, h_ref.shape[-1]).float() @ u.T

    # ------------------------------------------------------------------ metrics and state
    def _reset_metrics(self) -> None:
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_count = 0
        self._skipped = 0

    def _accumulate_metrics(self, values: dict[str, torch.Tensor], weighted_total: torch.Tensor) -> None:
        # Kept as tensors so no device sync happens on the training path; read only at logging steps.
        totals: dict[str, torch.Tensor] = {"total": weighted_total}
        for name, value in values.items():
            kind = name.split("/")[0]
            totals[kind] = totals[kind] + value if kind in totals else value
        totals.update(values)
        for name, value in totals.items():
            self._metric_sums[name] = self._metric_sums[name] + value if name in self._metric_sums else value
        self._metric_count += 1

    def pop_metrics(self, per_layer: bool | None = None) -> dict[str, float]:
        """Mean of each penalty over the micro-batches since the last call, then resets the running sums.

        Keys: ``cov`` and ``proj`` (summed over guarded layers, unweighted), ``total`` (weighted, with warm-up),
        ``cov/layer_i``/``proj/layer_i`` when ``per_layer``, ``skipped`` when non-finite batches were dropped.
        """
        per_layer = self.config.per_layer_metrics if per_layer is None else per_layer
        out = {
            name: float(value) / self._metric_count
            for name, value in self._metric_sums.items()
            if per_layer or "/layer_" not in name
        }
        if self._skipped:
            out["skipped"] = float(self._skipped)
        self._reset_metrics()
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: recorded references and calibration progress (floats are exact in JSON)."""
        return {
            "format_version": 1,
            "anchor": self.config.anchor,
            "layers": self.layer_indices,
            "base_reference": {str(k): v.detach().cpu().double().tolist() for k, v in self.base_reference.items()},
            "calibration_tokens": {str(k): v for k, v in self.calibration_tokens.items()},
            "calibration_batches_seen": self.calibration_batches_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != 1:
            raise ValueError(f"unknown orthoreg state format {state.get('format_version')!r}")
        if state.get("anchor") != self.config.anchor:
            raise ValueError(
                f"the checkpoint's orthoreg state was recorded with anchor={state.get('anchor')!r}, but this run uses "
                f"anchor={self.config.anchor!r}; resume with the same OrthoRegConfig"
            )
        if self.attached and state.get("layers") != self.layer_indices:
            raise ValueError(
                f"the checkpoint guarded layers {state.get('layers')}, this run guards {self.layer_indices}; "
                "resume with the same OrthoRegConfig(layers=...)"
            )
        self.base_reference = {
            int(k): torch.tensor(v, dtype=torch.float64).float() for k, v in state["base_reference"].items()
        }
        self.calibration_tokens = {int(k): int(v) for k, v in state["calibration_tokens"].items()}
        self.calibration_batches_seen = int(state["calibration_batches_seen"])


class _StopReferenceForward(Exception):
    """Raised inside the reference forward once the deepest guarded layer has run."""


_STACK_INPUTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "cache_position")


def _float32(u: torch.Tensor) -> torch.Tensor:
    return u if u.dtype == torch.float32 else u.float()


def _find_peft_model(model: nn.Module) -> nn.Module | None:
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "disable_adapter") and hasattr(model, "get_base_model"):
            return model
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return None


def _batch_shape(inputs: dict[str, Any]) -> tuple[int, int] | None:
    for key in ("input_ids", "inputs_embeds", "attention_mask", "labels"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[0]), int(value.shape[1])
    return None


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
