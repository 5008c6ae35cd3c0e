r"""``DriftMonitor``: how far, in units of the base model's own spread, training has moved the features along the
harmful directions.

For a guarded layer ℓ with harmful directions u_{ℓ,1..k} (rows of U_ℓ) and the step's selected tokens x (the output
of decoder layer ℓ, the same tokens the penalties count: ``mask="attention"`` or ``"labels"``):

.. math::

    m_{\ell j}(t) &= \frac{1}{N_t}\sum_{x \in \text{step } t} u_{\ell j}^\top x
        && \text{mean projection over the step's tokens (all its micro-batches)} \\
    \mathrm{drift}_{\ell j}(t) &= \frac{m_{\ell j}(t) - \mu_{\ell j}}{\sigma_{\ell j}}
        && \mu, \sigma: \text{mean and std of } u_{\ell j}^\top x \text{ over the base model's calibration tokens} \\
    \Delta\mathrm{cov}_\ell(t) &= \frac{\overline{\mathrm{cov}}_\ell(t) - \overline{\mathrm{cov}}_\ell(\text{base})}
        {\overline{\mathrm{cov}}_\ell(\text{base})}
        && \text{relative change of the covariance penalty (mean over micro-batches)}

σ is the *token-level* standard deviation, so a drift of 1 means the average token moved by one base-model spread
along u: large enough to change what the model writes. The drift's own sampling noise is that of a mean over N_t
tokens, about σ_batch / σ where σ_batch is the spread of batch means on the base model (``base_batch_std`` in the
state; ≪ 1 for batches of hundreds of tokens). Positive drift is movement along +u, toward the harmful side for
directions extracted as harmful − harmless.

Calibration (μ, σ and the base covariance) happens once: from every micro-batch seen before the first ``update()``
(the first optimizer step, all at the base weights), or from a calibration set with ``calibrate(model, batches)``.
It is saved by ``state_dict()`` (JSON) and restored by ``load_state_dict()``, never recomputed on resume.

The monitor has its own hooks (a pre-hook on the LM for the token mask, a pre-hook and a hook on the decoder stack
that bracket one forward, hooks on the guarded layers), so it works with or without a regulariser. Like the
regulariser it counts only training forwards (``lm.training`` and grad enabled: not evaluation, not DPO reference
passes, not the paired anchor's adapter-disabled reference pass), and only the first call of a layer per forward
(activation checkpointing re-runs layers inside backward). Per micro-batch it keeps k + 1 numbers per layer (token
count and projection sums, float64, on the activations' device: no device sync on the training path), plus the
covariance penalty when ``track_covariance`` (N·d·min(N, d) multiply-adds, no gradient). Readings are synchronised
across data-parallel ranks (one all-reduce per ``update``), so every rank acts on the same global drift.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..core.capture import (
    MASK_POLICIES,
    batch_shape,
    bind_forward_inputs,
    find_decoder_stack,
    layer_hidden,
    resolve_layers,
    token_mask,
)
from ..core.reference import reference_forward_active
from ..directions.harmful import DirectionsError, DirectionsOnDevice, HarmfulDirections
from ..terms.penalties import covariance_penalty, data_parallel_world
from .drift_statistics import DriftReading, LayerSums, base_statistics, drift_reading, reduce_layer_sums

__all__ = ["DriftMonitor", "DriftReading", "STATE_FORMAT"]

STATE_FORMAT = 1


class DriftMonitor:
    """Measures the drift of the guarded layers' features along harmful directions (module docstring: formulas).

    Use it inside a Trainer through ``orthoreg.firewall.callback.FirewallCallback``, or directly in a custom loop (OrthoLoRA):

    Example:
        >>> monitor = DriftMonitor(directions, layers=[6, 8]).attach(model)
        >>> monitor.calibrate(model, calibration_batches)      # optional: else the first step calibrates
        >>> for batch in loader:
        ...     loss = model(**batch).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()
        ...     reading = monitor.update()                      # closes the step
        ...     log(monitor.metrics())                          # {'drift/layer_6/dir_0': 0.4, 'max_drift': 0.9, …}

    Args:
        directions (`HarmfulDirections`): harmful subspaces; only guarded layers that have directions are monitored.
        layers (*optional*): layers to monitor (any ``resolve_layers`` spec); defaults to every layer with directions.
        mask (`str`, *optional*, defaults to `"attention"`): tokens that count (as ``OrthoRegConfig.mask``).
        track_covariance (`bool`, *optional*, defaults to `True`): also track the covariance penalty's change.
        min_std (`float`, *optional*, defaults to `1e-6`): floor on σ (a direction the base never varies along).
        sync (`bool`, *optional*, defaults to `True`): all-reduce readings across data-parallel ranks.
    """

    def __init__(
        self,
        directions: HarmfulDirections,
        layers: Any = None,
        *,
        mask: str = "attention",
        track_covariance: bool = True,
        min_std: float = 1e-6,
        sync: bool = True,
    ):
        if not isinstance(directions, HarmfulDirections):
            raise TypeError(f"DriftMonitor needs HarmfulDirections; got {type(directions).__name__}")
        if mask not in MASK_POLICIES:
            raise ValueError(f"`mask` must be one of {MASK_POLICIES}; got {mask!r}")
        self.directions = directions
        self.layer_spec = layers
        self.mask = mask
        self.track_covariance = track_covariance
        self.min_std = float(min_std)
        self.sync = sync
        self.layers: list[int] = []
        self.stack = None
        # Base statistics (None until calibrated): per layer μ (k,), σ (k,), mean covariance penalty, and the
        # spread of the calibration micro-batch means (the drift's noise floor, σ units).
        self.base_mean: dict[int, list[float]] | None = None
        self.base_std: dict[int, list[float]] | None = None
        self.base_cov: dict[int, float] = {}
        self.base_batch_std: dict[int, list[float]] = {}
        self.calibration_tokens = 0
        self.steps = 0
        self.last: DriftReading | None = None
        self._step_acc: dict[int, LayerSums] = {}
        self._batch_means: dict[int, list[torch.Tensor]] = {}  # calibration only: per micro-batch means
        self._handles: list[Any] = []
        self._pending: tuple[bool, torch.Tensor | None] | None = None
        self._session: dict[str, Any] | None = None
        self._directions_on = DirectionsOnDevice(directions)

    # ------------------------------------------------------------------ attachment
    def attach(self, model: nn.Module, layers_path: str | None = None, hooks: bool = True) -> DriftMonitor:
        """Finds the decoder layers of ``model`` (bare, PEFT- or DDP/DeepSpeed/FSDP-wrapped) and, with ``hooks``,
        installs the hooks that observe training forwards (without: only ``observe_batches`` feeds the monitor)."""
        if self._handles:
            raise RuntimeError("this DriftMonitor is already attached; call detach() first")
        stack = find_decoder_stack(model, layers_path=layers_path)
        self.directions.check_compatible(stack.hidden_size, stack.num_layers, stack.model_type)
        self._resolve(stack.num_layers)
        self.stack = stack
        if not hooks:
            return self
        self._handles.append(stack.lm.register_forward_pre_hook(self._lm_pre_hook, with_kwargs=True))
        self._handles.append(stack.stack.register_forward_pre_hook(self._open))
        for index in self.layers:
            self._handles.append(stack.layers[index].register_forward_hook(self._make_capture(index)))
        self._handles.append(stack.stack.register_forward_hook(self._close))
        return self

    def _resolve(self, num_layers: int) -> None:
        spec = self.directions.layers if self.layer_spec is None else self.layer_spec
        chosen = [i for i in resolve_layers(spec, num_layers) if i in self.directions]
        if not chosen:
            raise DirectionsError(
                f"none of the monitored layers {resolve_layers(spec, num_layers)} has harmful directions (directions "
                f"cover {self.directions.layers}); monitor those layers"
            )
        if self.layers and self.layers != chosen:
            raise ValueError(f"the monitor was calibrated on layers {self.layers}; this model resolves to {chosen}")
        self.layers = chosen

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._session = self._pending = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def calibrated(self) -> bool:
        return self.base_mean is not None

    # ------------------------------------------------------------------ hooks
    def _lm_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        active = module.training and torch.is_grad_enabled() and not reference_forward_active()
        mask = None
        if active:
            inputs = bind_forward_inputs(module, args, kwargs)
            shape = batch_shape(inputs)
            mask = token_mask(inputs, shape, self.mask) if shape is not None else None
        self._pending = (active, mask)

    def _open(self, module: nn.Module, args: tuple) -> None:
        # The stack runs once per model forward, with grad enabled in training. A stack call under no_grad inside a
        # training forward is a reference pass (the paired anchor runs the stack with the adapter disabled from the
        # LM's pre-hook): it must not be counted.
        pending, self._pending = self._pending, None
        active = pending is not None and pending[0] and torch.is_grad_enabled()
        self._session = {"active": active, "mask": pending[1] if active else None, "seen": set()}
        if not active:
            self._pending = pending  # the real stack call of this forward comes next

    def _make_capture(self, index: int):
        def capture(module: nn.Module, args: tuple, output: Any) -> None:
            session = self._session
            if session is None or not session["active"] or index in session["seen"]:
                return None
            session["seen"].add(index)
            self._observe_layer(index, layer_hidden(output), session["mask"])
            return None

        return capture

    def _close(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._session = None
        return None

    # ------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def _observe_layer(self, layer: int, h: torch.Tensor, mask: torch.Tensor | None) -> None:
        h = h.detach()
        u = self._directions_on(layer, h.device)
        if mask is not None:
            mask = mask.to(h.device)
            if tuple(mask.shape) != tuple(h.shape[:-1]):
                raise ValueError(f"mask has shape {tuple(mask.shape)} but hidden states are {tuple(h.shape)}")
        flat = h.reshape(-1, h.shape[-1])
        rows = flat if mask is None else flat[mask.reshape(-1)]
        coords = (rows.float() @ u.T).double()  # (N, k)
        n = coords.shape[0]
        acc = self._step_acc.get(layer)
        if acc is None:
            acc = self._step_acc[layer] = LayerSums.zeros(u.shape[0], h.device)
        acc.add(coords, covariance_penalty(rows) if self.track_covariance and n >= 2 else None)
        if not self.calibrated and n > 0:
            self._batch_means.setdefault(layer, []).append((coords.sum(dim=0) / n).cpu())

    def observe(self, hidden_states: Mapping[int, torch.Tensor], mask: torch.Tensor | None = None) -> None:
        """Feeds one micro-batch by hand: layer → its output hidden states (B, T, d); ``mask`` (B, T) selects tokens.
        With HF ``output_hidden_states=True``, layer ℓ's output is ``hidden_states[ℓ + 1]`` — except the last layer's,
        which most models return after the final norm.

        Use either the hooks (``attach``) or this, not both on the same forwards.
        """
        if not self.layers:
            width = next(iter(hidden_states.values())).shape[-1]
            if width != self.directions.hidden_size:
                raise DirectionsError(f"hidden states are {width} wide; the directions are {self.directions.hidden_size}")
            spec = self.directions.layers if self.layer_spec is None else self.layer_spec
            wanted = set(spec) if isinstance(spec, (list, tuple)) else set(self.directions.layers)
            self.layers = [i for i in sorted(hidden_states) if i in self.directions and i in wanted]
        missing = [i for i in self.layers if i not in hidden_states]
        if missing:
            raise ValueError(f"no hidden states for monitored layers {missing}")
        for layer in self.layers:
            self._observe_layer(layer, hidden_states[layer], mask)

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def calibrate(self, model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """Records the base statistics on a calibration set, replacing calibration from the first training step.

        ``batches`` yields model kwargs (``input_ids``, ``attention_mask``, ``labels`` for ``mask="labels"``) on the
        model's device. The model runs in eval mode without grad (no dropout: the base's own spread); its mode is
        restored. Call before training, on the base model.
        """
        self._reset_calibration()
        self.observe_batches(model, batches)
        if not self._finish_calibration():
            raise ValueError("calibration saw no tokens: the calibration batches are empty or all padding")

    @torch.no_grad()
    def observe_batches(self, model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """Runs ``model`` (eval mode, no grad; its mode is restored) on ``batches`` and observes them as part of the
        current step — a fixed *probe* set measured after every update gives a drift free of batch-composition
        noise (``FirewallConfig(probe=...)``)."""
        stack = self.stack if self.stack is not None else find_decoder_stack(model)
        if not self.layers:
            self.directions.check_compatible(stack.hidden_size, stack.num_layers, stack.model_type)
            self._resolve(stack.num_layers)
        captured: dict[int, torch.Tensor] = {}

        def make_hook(index: int):
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                captured.setdefault(index, layer_hidden(output).detach())
            return hook

        hooks = [stack.layers[i].register_forward_hook(make_hook(i)) for i in self.layers]
        was_training = stack.lm.training
        stack.lm.eval()  # the attached training hooks see an eval forward and stay out of it
        try:
            for batch in batches:
                inputs = dict(batch)
                shape = batch_shape(inputs)
                mask = token_mask(inputs, shape, self.mask) if shape is not None else None
                captured.clear()
                model(**inputs)
                for layer in self.layers:
                    self._observe_layer(layer, captured[layer], mask)
        finally:
            for hook in hooks:
                hook.remove()
            stack.lm.train(was_training)

    def _reset_calibration(self) -> None:
        self.base_mean = self.base_std = None
        self.base_cov, self.base_batch_std, self.calibration_tokens = {}, {}, 0
        self._step_acc.clear()
        self._batch_means.clear()

    def _finish_calibration(self) -> bool:
        stats = base_statistics(self._reduce(), self._batch_means, self.min_std)
        self._batch_means.clear()
        self._step_acc.clear()
        if stats is None:
            return False
        self.base_mean, self.base_std, self.base_cov, self.base_batch_std, self.calibration_tokens = stats
        return True

    def _reduce(self) -> dict[int, dict[str, Any]]:
        widths = {layer: self.directions[layer].shape[0] for layer in self.layers}
        return reduce_layer_sums(self.layers, widths, self._step_acc, self.sync and data_parallel_world() > 1)

    # ------------------------------------------------------------------ readings
    def update(self) -> DriftReading | None:
        """Closes a step: turns what was observed since the last call into a reading.

        Before calibration, the observed micro-batches become the calibration (base statistics) and ``None`` is
        returned. ``None`` is also returned when nothing was observed (every rank must still call it).
        """
        self.steps += 1
        if not self.calibrated:
            self._finish_calibration()
            return None
        totals = self._reduce()
        self._step_acc.clear()
        reading = drift_reading(self.steps, totals, self.base_mean, self.base_std, self.base_cov)
        if reading is not None:
            self.last = reading
        return reading

    def metrics(self, side: str = "both") -> dict[str, float]:
        """The latest reading as flat metrics: ``drift/layer_i/dir_j``, ``max_drift`` (largest |drift|, or largest
        positive drift for ``side="harmful"``), ``cov_change/layer_i``. Empty before the first reading."""
        if self.last is None:
            return {}
        out: dict[str, float] = {}
        for layer, values in self.last.drift.items():
            for j, value in enumerate(values):
                out[f"drift/layer_{layer}/dir_{j}"] = value
        for layer, value in self.last.cov_change.items():
            out[f"cov_change/layer_{layer}"] = value
        out["max_drift"] = self.last.largest(side)[0]
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the base statistics (exact floats) and the step count."""
        return {
            "format_version": STATE_FORMAT,
            "layers": self.layers,
            "k": {str(i): self.directions[i].shape[0] for i in self.layers},
            "mask": self.mask,
            "base_mean": None if self.base_mean is None else {str(k): v for k, v in self.base_mean.items()},
            "base_std": None if self.base_std is None else {str(k): v for k, v in self.base_std.items()},
            "base_cov": {str(k): v for k, v in self.base_cov.items()},
            "base_batch_std": {str(k): v for k, v in self.base_batch_std.items()},
            "calibration_tokens": self.calibration_tokens,
            "steps": self.steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format_version") != STATE_FORMAT:
            raise ValueError(f"unknown firewall monitor state format {state.get('format_version')!r}")
        if self.layers and list(state["layers"]) != self.layers:
            raise ValueError(f"the checkpoint monitored layers {state['layers']}, this run monitors {self.layers}; "
                             "resume with the same layers")
        layers = [int(i) for i in state["layers"]]
        ks = {int(i): int(k) for i, k in state["k"].items()}
        mine = {i: self.directions[i].shape[0] for i in layers if i in self.directions}
        if ks != mine or state["mask"] != self.mask:
            raise ValueError(f"the checkpoint's monitor used k={ks}, mask={state['mask']!r}; this run has k={mine}, "
                             f"mask={self.mask!r}; resume with the same directions and mask")
        self.layers = layers

        def unpack(d: Mapping[str, Any] | None) -> dict[int, list[float]] | None:
            return None if d is None else {int(k): [float(x) for x in v] for k, v in d.items()}

        self.base_mean, self.base_std = unpack(state["base_mean"]), unpack(state["base_std"])
        self.base_cov = {int(k): float(v) for k, v in state["base_cov"].items()}
        self.base_batch_std = unpack(state["base_batch_std"]) or {}
        self.calibration_tokens = int(state["calibration_tokens"])
        self.steps = int(state["steps"])
        self._step_acc.clear()
        self._batch_means.clear()

