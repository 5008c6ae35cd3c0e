"""The audit: before (or after) a fine-tune, how the task's features relate to the model's harmful directions.

One module a role:

- ``task_data``: reading task examples, tokenising them with their loss labels, padding them into batches;
- ``features``: the task's feature direction per layer (the task-loss gradient, or the fine-tune's activation shift);
- ``overlap``: the overlap score of those directions with the harmful subspace, its verdict and ``OverlapReport``;
- ``plot``: the overlap report as a PNG;
- ``density``: the superposition density of each layer and the harmful directions' share of its variance;
- ``recommend``: a recommended ``OrthoRegConfig`` (layers, drift budget, anchor) from the overlap and the density;
- ``erosion_probe``: a K-step LoRA dry run on the task data and the erosion its live harm signal predicts, with the
  prediction's error measured on the task benchmark (``orthoreg audit --probe-steps K``).

``orthoreg audit`` (``orthoreg/commands/audit.py``) runs them in this order.
"""

from .density import DensityReport, covariance_density, superposition_density
from .erosion_probe import ErosionCalibration, ErosionProbeReport, probe_erosion
from .features import task_features
from .overlap import (
    DEFAULT_THRESHOLDS,
    PREDICTIVE_VALIDATION,
    VERDICTS,
    OverlapReport,
    default_guarded_layers,
    overlap_score,
    score_features,
    verdict_for,
)
from .plot import plot_overlap
from .recommend import BUDGETS, Recommendation, recommend
from .task_data import TaskDataError, encode_task_examples, load_task_examples, task_batches

__all__ = [
    "BUDGETS",
    "DEFAULT_THRESHOLDS",
    "DensityReport",
    "ErosionCalibration",
    "ErosionProbeReport",
    "OverlapReport",
    "PREDICTIVE_VALIDATION",
    "Recommendation",
    "TaskDataError",
    "VERDICTS",
    "covariance_density",
    "default_guarded_layers",
    "encode_task_examples",
    "load_task_examples",
    "overlap_score",
    "plot_overlap",
    "probe_erosion",
    "recommend",
    "score_features",
    "superposition_density",
    "task_batches",
    "task_features",
    "verdict_for",
]
