"""The base model's statistics, recorded before any update: the ``anchor="base_mean"`` reference r_ℓ (the mean
projection U_ℓ x) and, for ``units="base"``, each term's base-model scale — the variance of U_ℓ x (the projection's
unit) and the covariance penalty's own value (the covariance's unit).

They are recorded on the first ``calibration_batches`` micro-batches of step 0 (or by ``calibrate()``), as the token mean
over every data-parallel rank's selected tokens, so all ranks — and a resumed run, which restores rank 0's saved r —
share one r. It is saved in the checkpoint as JSON (floats are exact there) and validated when loaded.

r is never NaN/Inf: a calibration micro-batch whose hidden states are not finite is refused
(``on_nonfinite="raise"``) or left out, calibration then moving to the next finite micro-batch, with a warning
(``"skip"``). Recording syncs with the host once per layer and calibration micro-batch; it runs in the first step.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..core.capture import batch_shape, bind_forward_inputs, layer_hidden, token_mask
from ..terms.covariance import covariance_from_index
from ..terms.distributed_rows import all_reduce_sum, data_parallel_world
from ..terms.token_rows import no_autocast, select_tokens, selected_index
from .health import NonFiniteHiddenStateError

logger = logging.getLogger(__name__)

__all__ = ["BaseStatistics", "STATE_FORMAT_VERSION", "calibrate"]

STATE_FORMAT_VERSION = 1


class BaseStatistics:
    """Recorded base statistics per guarded layer, and the progress of their calibration.

    Attributes:
        values (`dict[int, Tensor]`): r_ℓ, float32 (k,), always finite.
        tokens (`dict[int, int]`): tokens (over all ranks) that r_ℓ averages.
        square_means (`dict[int, float]`): mean of ‖U_ℓ x‖² over the same tokens (float64), for the variance.
        cov_values (`dict[int, float]`): the covariance penalty of the calibration micro-batches (mean over them and
            over ranks), the covariance's unit with ``units="base"``.
        batches_seen (`int`): calibration micro-batches recorded so far.
        deferred (`bool`): an earlier calibration micro-batch was not finite and was left out (``"skip"``), so
            calibration continues past step 0.
    """

    def __init__(self, calibration_batches: int, on_nonfinite: str):
        self.calibration_batches = calibration_batches
        self.on_nonfinite = on_nonfinite
        self.values: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, int] = {}
        self.square_means: dict[int, float] = {}
        self.cov_values: dict[int, float] = {}
        self._cov_batches: dict[int, int] = {}
        self.batches_seen = 0
        self.deferred = False

    def calibrating(self, step: int) -> bool:
        return self.batches_seen < self.calibration_batches and (step == 0 or self.deferred)

    def clear(self) -> None:
        for table in (self.values, self.tokens, self.square_means, self.cov_values, self._cov_batches):
            table.clear()
        self.batches_seen = 0

    def projection_variance(self, index: int) -> float:
        """E‖U x − r‖² of the base model over the calibration tokens: the projection's unit with ``units="base"``."""
        r = self.values[index].double()
        return max(self.square_means[index] - float(r.square().sum()), 0.0)

    def unit(self, term: str, index: int) -> float:
        """The base-model value of ``term`` (``"cov"``: its calibration value; ``"proj"``: the variance of U x) at
        layer ``index``, the term's unit with ``units="base"``.

        Raises:
            RuntimeError: nothing was recorded for the layer. ValueError: the value is 0 (fewer than two selected
                tokens, identical hidden states), so it cannot be a unit.
        """
        if term == "cov":
            value, what = self.cov_values.get(index), "covariance penalty"
        else:
            value = self.projection_variance(index) if index in self.square_means else None
            what = "variance of U x"
        if value is None:
            raise RuntimeError(
                f"OrthoRegConfig(units='base') but no base {what} was recorded for layer {index}: calibration ran "
                "before this layer was guarded, or a resumed run lost its orthoreg state. Start from step 0, call "
                "calibrate() before training, or resume from a checkpoint written with orthoreg attached."
            )
        if not value > 0:
            raise ValueError(
                f"OrthoRegConfig(units='base'): the base model's {what} at layer {index} is 0 on the calibration "
                "micro-batches (fewer than two selected tokens, or identical hidden states), so it cannot be the "
                "term's unit. Calibrate on more tokens (calibration_batches, mask='attention') or use "
                "units='absolute'."
            )
        return value

    @torch.no_grad()
    def record_covariance(self, index: int, value: torch.Tensor) -> bool:
        """Adds one calibration micro-batch's covariance penalty (the mean over ranks) to the covariance's unit.
        Returns False, recording nothing, when it is not finite on some rank."""
        value = value.detach().double().reshape(1)
        finite = torch.isfinite(value).all()
        world = data_parallel_world()
        if world > 1:
            sums = all_reduce_sum(torch.cat([torch.where(finite, value, 0.0), (~finite).double().reshape(1)]))
            value, finite = sums[:1] / world, sums[1] == 0
        if not bool(finite):
            self._refuse(index, -1)
            return False
        seen = self._cov_batches.get(index, 0)
        previous = self.cov_values.get(index, 0.0)
        self.cov_values[index] = previous + (float(value[0]) - previous) / (seen + 1)
        self._cov_batches[index] = seen + 1
        return True

    def finish(self) -> None:
        """Marks calibration done (``calibrate()`` recorded r on its own batches)."""
        self.deferred = False
        self.batches_seen = self.calibration_batches

    @torch.no_grad()
    def record(self, index: int, h: torch.Tensor, mask: torch.Tensor | None, u: torch.Tensor, step: int) -> bool:
        """Adds one calibration micro-batch's U x to r_ℓ (a token-weighted running mean over micro-batches and
        ranks). Returns False, recording nothing, when its coordinates are not finite on some rank."""
        with no_autocast(h.device):  # inside an autocast forward U x would otherwise be a bf16 product
            coords = select_tokens(h.detach(), mask) @ u.float().T
        world = data_parallel_world()
        finite = torch.isfinite(coords).all()
        if world > 1:  # every rank must agree whether this micro-batch counts
            finite = all_reduce_sum((~finite).to(torch.float32).reshape(1))[0] == 0
        if not bool(finite):
            self._refuse(index, step)
            return False
        square_sum = coords.double().square().sum().reshape(1)
        if world > 1:
            # One all-reduce of (Σ U x, Σ‖U x‖², n) per layer and calibration micro-batch; a rank with no token
            # takes part.
            sums = torch.cat([coords.double().sum(dim=0), square_sum,
                              coords.new_tensor([coords.shape[0]], dtype=torch.float64)])
            sums = all_reduce_sum(sums)
            n = int(sums[-1].item())
            batch_mean = (sums[:-2] / max(n, 1)).float()
            square_sum = sums[-2:-1]
        else:  # the float32 mean, exactly as recorded results (the toy-world studies, the demo) were computed
            n = coords.shape[0]
            batch_mean = coords.mean(dim=0) if n else None
        if n == 0:
            self.values.setdefault(index, torch.zeros(u.shape[0], device=h.device))
            return True
        seen = self.tokens.get(index, 0)
        batch_square_mean = float(square_sum[0]) / n
        if seen == 0:
            self.values[index] = batch_mean
            self.square_means[index] = batch_square_mean
        else:
            prev = self.values[index].to(h.device)
            self.values[index] = prev + (batch_mean - prev) * (n / (seen + n))
            self.square_means[index] += (batch_square_mean - self.square_means[index]) * (n / (seen + n))
        self.tokens[index] = seen + n
        if self.deferred and step > 0:
            logger.warning(
                "orthoreg recorded the base reference r of layer %d at step %d, after %d optimizer update(s): the "
                "earlier calibration micro-batches held NaN/Inf hidden states", index, step, step,
            )
        return True

    def _refuse(self, index: int, step: int) -> None:
        at = f" at step {step}" if step >= 0 else ""
        message = (
            f"orthoreg cannot record the base model's statistics (the base_mean reference r, the base units) of "
            f"layer {index}{at}: this calibration micro-batch's hidden states contain NaN/Inf, and r would stay NaN "
            "for the whole run."
        )
        if self.on_nonfinite == "raise":
            raise NonFiniteHiddenStateError(
                message + " Check the data and the model (inputs_embeds, a diverged checkpoint), call "
                "calibrate(model, batches) on clean batches before training, or set OrthoRegConfig("
                "on_nonfinite='skip') to calibrate on the next finite micro-batch."
            )
        for table in (self.values, self.tokens, self.square_means, self.cov_values, self._cov_batches):
            table.pop(index, None)
        self.deferred = True
        logger.warning(message + " Calibrating on the next finite micro-batch instead (on_nonfinite='skip').")

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self, anchor: str, layers: list[int]) -> dict[str, Any]:
        for index, r in self.values.items():
            if not bool(torch.isfinite(r).all()):  # unreachable by construction; never write a bare NaN to JSON
                raise NonFiniteHiddenStateError(f"orthoreg's recorded r of layer {index} is not finite: {r.tolist()}")
        return {
            "format_version": STATE_FORMAT_VERSION,
            "anchor": anchor,
            "layers": layers,
            "base_reference": {str(k): v.detach().cpu().double().tolist() for k, v in self.values.items()},
            "calibration_tokens": {str(k): v for k, v in self.tokens.items()},
            "calibration_batches_seen": self.batches_seen,
            "base_square_means": {str(k): v for k, v in self.square_means.items()},
            "base_covariance": {str(k): v for k, v in self.cov_values.items()},
        }

    def load_state_dict(self, state: Any, anchor: str, layers: list[int] | None,
                        widths: dict[int, int] | None) -> None:
        """Validates a saved state against this run, then restores it. ``layers``: the guarded layers (``None``
        before attaching); ``widths``: k of each layer's directions (``None`` when unknown).

        Raises:
            ValueError: naming the field that is missing, malformed, non-finite or mismatched, and the fix.
        """
        where = "the checkpoint's orthoreg state (trainer_state.json → stateful_callbacks.orthoreg)"
        if not isinstance(state, dict):
            raise ValueError(f"{where} is a {type(state).__name__}, not a JSON object: the checkpoint is corrupt")
        if state.get("format_version") != STATE_FORMAT_VERSION:
            raise ValueError(f"{where} has unknown format_version {state.get('format_version')!r}")
        if state.get("anchor") != anchor:
            raise ValueError(
                f"{where} was recorded with anchor={state.get('anchor')!r}, but this run uses anchor={anchor!r}; "
                "resume with the same OrthoRegConfig"
            )
        if layers is not None and state.get("layers") != layers:
            raise ValueError(
                f"{where} guarded layers {state.get('layers')}, this run guards {layers}; resume with the same "
                "OrthoRegConfig(layers=...)"
            )
        raw_r, raw_n, seen = state.get("base_reference"), state.get("calibration_tokens"), \
            state.get("calibration_batches_seen")
        if not isinstance(raw_r, dict) or not isinstance(raw_n, dict) or not _is_count(seen):
            raise ValueError(
                f"{where} lacks base_reference/calibration_tokens (objects) or calibration_batches_seen (an int "
                ">= 0): the checkpoint is corrupt; resume from another checkpoint or recalibrate"
            )
        values: dict[int, torch.Tensor] = {}
        for key, r in raw_r.items():
            index = _layer_key(key, where)
            if layers is not None and index not in layers:
                raise ValueError(f"{where} holds r for layer {index}, which this run does not guard ({layers})")
            if not isinstance(r, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r):
                raise ValueError(f"{where}: r of layer {index} must be a list of numbers; got {r!r:.80}")
            if not all(math.isfinite(v) for v in r):
                raise ValueError(
                    f"{where}: r of layer {index} is not finite ({r!r:.80}); it was written by a run whose "
                    "calibration saw NaN/Inf. Recalibrate (start from step 0, or call calibrate() before train())"
                )
            if widths is not None and index in widths and len(r) != widths[index]:
                raise ValueError(
                    f"{where}: r of layer {index} has {len(r)} entries but the directions of that layer have "
                    f"k = {widths[index]}; resume with the directions the checkpoint was trained with"
                )
            values[index] = torch.tensor(r, dtype=torch.float64).float()
        tokens = {}
        for key, n in raw_n.items():
            if not _is_count(n):
                raise ValueError(f"{where}: calibration_tokens[{key!r}] must be an int >= 0; got {n!r}")
            tokens[_layer_key(key, where)] = int(n)
        scalars = {}
        for name in ("base_square_means", "base_covariance"):
            raw = state.get(name, {})  # absent in states written before base units existed
            if not isinstance(raw, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     and math.isfinite(v) and v >= 0 for v in raw.values()):
                raise ValueError(f"{where}: {name} must map layers to finite numbers >= 0; got {raw!r:.80}")
            scalars[name] = {_layer_key(k, where): float(v) for k, v in raw.items()}
        self.values, self.tokens, self.batches_seen = values, tokens, int(seen)
        self.square_means, self.cov_values = scalars["base_square_means"], scalars["base_covariance"]
        self._cov_batches = {k: 1 for k in self.cov_values}
        self.deferred = False


def calibrate(regularizer: Any, model: Any, batches: Any) -> None:
    """Records ``regularizer``'s base statistics on calibration batches instead of the first training batches.

    Call before training. ``batches`` yields model kwargs (``input_ids``, ``attention_mask``, …) already on the
    model's device. Under data parallelism every rank must call it with the same number of batches: the statistics
    are token means over all ranks' batches (one all-reduce per layer and batch). A batch with NaN/Inf hidden
    states raises (``on_nonfinite="raise"``) or is left out with a warning (``"skip"``).
    """
    if not regularizer.attached:
        regularizer.attach(model)
    stats, config, stack = regularizer.base_mean, regularizer.config, regularizer.stack
    stats.clear()
    current_mask: list[torch.Tensor | None] = [None]

    def pre(module, args, kwargs):
        inputs = bind_forward_inputs(module, args, kwargs)
        shape = batch_shape(inputs)
        current_mask[0] = token_mask(inputs, shape, config.mask) if shape else None

    def make(index):
        def hook(module, args, output):
            h = layer_hidden(output)
            directions = regularizer.directions
            if directions is not None and index in directions:
                stats.record(index, h, current_mask[0], regularizer.directions_on(index, h.device), regularizer.step)
            if config.units == "base" and config.cov_weight > 0:
                rows = selected_index(None if current_mask[0] is None else current_mask[0].to(h.device))
                stats.record_covariance(index, covariance_from_index(h, rows, gather=config.gather))

        return hook

    hooks = [stack.lm.register_forward_pre_hook(pre, with_kwargs=True)]
    hooks += [stack.layers[i].register_forward_hook(make(i)) for i in regularizer.layer_indices]
    was_training = stack.lm.training
    try:
        stack.lm.eval()
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for handle in hooks:
            handle.remove()
        stack.lm.train(was_training)
    if not stats.values and not stats.cov_values:
        raise ValueError("calibration saw no tokens: the calibration batches are empty, all padding, or NaN/Inf")
    stats.finish()


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _layer_key(key: Any, where: str) -> int:
    try:
        return int(key)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {key!r} is not a layer index") from err
