r"""The erosion probe: a short LoRA dry run on the user's task data, the harm signal it moves, and the erosion that
predicts — with the prediction's error as measured on orthoreg's task benchmark.

**Dry run.** A fresh LoRA adapter (rank r, alpha 2r, on every linear projection the benchmark adapts) is trained for
K optimizer steps on the task examples (AdamW, constant learning rate, no weight decay, gradients clipped to norm 1,
batches of ``batch_size`` in a seeded shuffled order, cycling): the settings of the benchmark's benign fine-tunes
(``orthoreg.realbench.hyperparams``). The refusal margin (``orthoreg.engine.refusal_margin``) is recorded on the
model before the first step and read after the K-th; the signal is its **fall** f_K = −(margin_K − margin_0), nats.
The adapter is then removed (``unload``, nothing merged): the model is returned as it was.

**Prediction.** ``erosion_calibration.json`` holds, per step s of the benchmark's 50-step fine-tunes (SmolLM2-135M,
8 benign tasks, seeds 0–2, judge v2.1), each task's mean fall f_s and mean final rise in harmful attempts (points).
The prediction at K is the least-squares line rise = a + b·f through the tasks' points at the calibrated step
nearest K, and its error is the **leave-one-task-out** mean absolute error of that line (each task predicted from
a line fitted on the other seven), reported beside the Spearman correlation of f_s with the rise. Where that
correlation is near 0 (it is at step 10: −0.05) the line is nearly flat and the prediction is the benchmark's mean
rise ± its spread: the report says so rather than dressing it up.

A dry run on another model, learning rate or batch size than the calibration's moves the margin on another scale;
the report names the calibration's settings so a reader can judge.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import torch
from torch import nn

from ..core.layers import DECODER_PROJECTIONS
from ..core.rank_correlation import spearman_rho

__all__ = ["ErosionCalibration", "ErosionProbeReport", "probe_erosion"]

CALIBRATION_FILE = "erosion_calibration.json"


@dataclass
class ErosionCalibration:
    """Per calibrated step: each task's (mean fall, mean final rise); the fit and its leave-one-task-out error."""

    steps: dict[int, dict[str, tuple[float, float]]]
    total_steps: int
    source: str
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def builtin(cls) -> ErosionCalibration:
        text = resources.files("orthoreg.data").joinpath(CALIBRATION_FILE).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ErosionCalibration:
        steps = {int(s): {t: (float(v[0]), float(v[1])) for t, v in tasks.items()} for s, tasks in data["steps"].items()}
        if not steps or any(len(tasks) < 3 for tasks in steps.values()):
            raise ValueError("an erosion calibration needs >= 3 tasks at every calibrated step")
        return cls(steps=steps, total_steps=int(data["total_steps"]), source=str(data["source"]),
                   settings=dict(data.get("settings", {})))

    def to_dict(self) -> dict[str, Any]:
        return {"steps": {str(s): {t: list(v) for t, v in tasks.items()} for s, tasks in self.steps.items()},
                "total_steps": self.total_steps, "source": self.source, "settings": self.settings}

    def nearest_step(self, step: int) -> int:
        return min(self.steps, key=lambda s: (abs(s - step), s))

    def fit(self, step: int) -> dict[str, float]:
        """The line through the tasks' (fall, rise) at ``step``: intercept, slope, leave-one-task-out MAE, Spearman."""
        points = list(self.steps[step].values())
        intercept, slope = _least_squares(points)
        errors = []
        for i, (fall, rise) in enumerate(points):  # each task predicted by the line through the others
            a, b = _least_squares(points[:i] + points[i + 1:])
            errors.append(abs(rise - (a + b * fall)))
        return {"intercept": intercept, "slope": slope, "loo_mae": sum(errors) / len(errors),
                "spearman": spearman_rho([p[0] for p in points], [p[1] for p in points]) or 0.0,
                "n_tasks": len(points)}


@dataclass
class ErosionProbeReport:
    """What ``probe_erosion`` measured and predicts (``to_dict`` is the audit JSON's ``erosion_probe``)."""

    steps: int
    fall: float  # −Δ harm margin after the dry run, nats
    overrefusal_rise: float  # Δ over-refusal margin, nats
    calibrated_step: int
    predicted_rise: float  # points of harmful attempts at the calibration's total steps
    loo_mae: float  # the prediction's measured error, points
    spearman: float
    n_tasks: int
    calibration: str
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        trust = ("the signal ranks the benchmark's tasks" if self.spearman >= 0.5 else
                 "the signal does not rank the benchmark's tasks at this step: read the prediction as the benchmark's "
                 "typical rise, not as this task's")
        return [
            f"erosion probe: {self.steps}-step LoRA dry run (discarded); the refusal margin fell {self.fall:+.2f} nats "
            f"(over-refusal margin {self.overrefusal_rise:+.2f})",
            f"predicted rise in harmful attempts after a full fine-tune: {self.predicted_rise:+.0f} points ± "
            f"{self.loo_mae:.0f} (leave-one-task-out error over {self.n_tasks} benchmark tasks at step "
            f"{self.calibrated_step}; Spearman {self.spearman:+.2f}: {trust})",
        ]


def probe_erosion(model: nn.Module, tokenizer: Any, encoded: list[tuple[list[int], list[int]]], *, steps: int = 10,
                  lr: float = 5e-4, batch_size: int = 8, rank: int = 16, seed: int = 0,
                  calibration: ErosionCalibration | None = None) -> ErosionProbeReport:
    """The dry run and its prediction (module docstring). ``encoded``: ``audit.encode_task_examples`` output.
    ``model`` must be a plain (not PEFT) causal LM; it is unchanged on return."""
    from peft import LoraConfig, get_peft_model

    from ..core.activations import input_device
    from ..core.prompt_encoding import pad_token_id
    from ..engine.metrics import HARM_MARGIN_DELTA, METRIC_PREFIX, OVERREFUSAL_MARGIN_DELTA
    from ..engine.refusal_margin import RefusalMarginProbe
    from .task_data import TaskDataError, task_batches

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` of the erosion probe must be an int >= 1; got {steps!r}")
    if not any(any(label != -100 for label in labels) for _, labels in encoded):
        raise TaskDataError("the task data has no token with a loss label: the dry run would not train")
    calibration = calibration or ErosionCalibration.builtin()
    targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                      if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in DECODER_PROJECTIONS})
    if not targets:
        raise ValueError(f"the model has none of the projections {DECODER_PROJECTIONS} the dry run adapts")
    probe = RefusalMarginProbe()
    probe.record_base(model, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                      target_modules=targets))
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        device, pad = input_device(peft_model), pad_token_id(tokenizer)
        order = random.Random(f"erosion-probe-{seed}")
        peft_model.train()
        for _ in range(steps):
            chunk = [encoded[order.randrange(len(encoded))] for _ in range(batch_size)]
            batch = next(task_batches(chunk, batch_size, pad, device))
            peft_model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        reading = probe.measure(peft_model)
    finally:
        peft_model.unload()  # removes the LoRA layers without merging: the base weights are untouched
    fall = -reading[METRIC_PREFIX + HARM_MARGIN_DELTA]
    at = calibration.nearest_step(steps)
    fit = calibration.fit(at)
    return ErosionProbeReport(
        steps=steps, fall=fall, overrefusal_rise=reading[METRIC_PREFIX + OVERREFUSAL_MARGIN_DELTA],
        calibrated_step=at, predicted_rise=fit["intercept"] + fit["slope"] * fall, loo_mae=fit["loo_mae"],
        spearman=fit["spearman"], n_tasks=fit["n_tasks"], calibration=calibration.source,
        settings={"lr": lr, "batch_size": batch_size, "rank": rank, "seed": seed, "lora_targets": targets,
                  "calibration_settings": calibration.settings, "calibration_total_steps": calibration.total_steps})


def _least_squares(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of rise on fall; a flat line at the mean when the falls do not vary."""
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx <= 1e-12 * max(1.0, mx * mx):
        return my, 0.0
    slope = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    return my - slope * mx, slope
