"""``OrthoRegConfig``: which layers are guarded, how strongly, and against what anchor."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .capture import MASK_POLICIES

Anchor = Literal["absolute", "base_mean", "paired"]
ANCHORS = ("absolute", "base_mean", "paired")
NONFINITE_POLICIES = ("raise", "skip")


@dataclass
class OrthoRegConfig:
    """Configuration of the orthoreg regulariser.

    The total loss is ``task_loss + w(t) · (cov_weight · Σ_ℓ cov(h_ℓ) + proj_weight · Σ_ℓ proj(h_ℓ)
    [+ lora_weight · Σ lora_proj])`` where ℓ ranges over ``layers`` and w(t) is the warm-up factor.

    Args:
        layers (`int | str | list`, *optional*, defaults to `"middle_third"`):
            Decoder layers to guard: an index, a negative index, a list, a named range (``"last_third"``,
            ``"all"``, …) or a fraction slice ``"a:b"``. See ``orthoreg.capture.resolve_layers``.
        cov_weight (`float`, *optional*, defaults to `0.0`): λ_cov, weight of the off-diagonal covariance penalty.
        proj_weight (`float`, *optional*, defaults to `1.0`): λ_proj, weight of the projection penalty; needs
            harmful directions.
        lora_weight (`float`, *optional*, defaults to `0.0`): λ_lora, weight of the LoRA weight-space penalty
            (``OrthoLoRA`` only).
        anchor (`str`, *optional*, defaults to `"base_mean"`): origin of the projection penalty:
            ``"absolute"`` (‖Ux‖²), ``"base_mean"`` (‖Ux − r‖², r = the base model's mean projection recorded on
            the first ``calibration_batches`` micro-batches, before any update), or ``"paired"`` (‖U(x − x_ref)‖²,
            x_ref from the same model with its PEFT adapter disabled; costs one extra no-grad forward per step).
        one_sided (`bool`, *optional*, defaults to `False`): penalise only movement toward the harmful side.
        mask (`str`, *optional*, defaults to `"attention"`): tokens that count: ``"attention"`` (non-padding)
            ``"labels"`` (non-padding tokens whose label is not -100) or ``"prompt_end"`` (one token per row: the
            last prompt token before the first label, where a chat model decides how to answer; needs
            completion-only labels).
        warmup_steps (`int`, *optional*, defaults to `0`): optimizer steps over which w(t) ramps linearly from
            1/warmup_steps to 1 (w = 1 from then on; w = 1 throughout when 0).
        gather (`bool`, *optional*, defaults to `False`): both terms become statistics of the global batch across
            data-parallel ranks: the covariance of every rank's rows (a differentiable all-gather per guarded layer
            per micro-batch) and the projection's mean over every rank's tokens (one scalar all-reduce per
            micro-batch). Without it each rank's terms use its own tokens.
        calibration_batches (`int`, *optional*, defaults to `1`): micro-batches of the first optimizer step used
            to record r for ``anchor="base_mean"`` — over every data-parallel rank's tokens, so all ranks (and a
            resumed run) share one r; at most the gradient-accumulation steps, so r is recorded
            before any update.
        per_layer_metrics (`bool`, *optional*, defaults to `False`): also log ``orthoreg/cov/layer_i`` etc.
        layers_path (`str`, *optional*): dotted path of the decoder-layer ``ModuleList`` for architectures the
            structural search does not recognise.
        on_nonfinite (`str`, *optional*, defaults to `"raise"`): a NaN/Inf penalty raises an error naming the
            layer (``"raise"``) or is dropped for that micro-batch with a warning (``"skip"``); it never reaches
            the weights.
    """

    layers: Any = "middle_third"
    cov_weight: float = field(default=0.0, metadata={"help": "λ_cov, weight of the covariance penalty"})
    proj_weight: float = field(default=1.0, metadata={"help": "λ_proj, weight of the projection penalty"})
    lora_weight: float = field(default=0.0, metadata={"help": "λ_lora, weight of the LoRA weight-space penalty"})
    anchor: Anchor = field(default="base_mean", metadata={"help": "origin of the projection", "choices": ANCHORS})
    one_sided: bool = False
    mask: Literal["attention", "labels", "prompt_end"] = "attention"
    warmup_steps: int = 0
    gather: bool = False
    calibration_batches: int = 1
    per_layer_metrics: bool = False
    layers_path: str | None = None
    on_nonfinite: Literal["raise", "skip"] = "raise"

    def __post_init__(self) -> None:
        for name in ("cov_weight", "proj_weight", "lora_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value != value or value < 0 or value == float("inf"):
                raise ValueError(f"`{name}` must be a finite number >= 0; got {value!r}")
            setattr(self, name, float(value))
        if self.cov_weight == 0 and self.proj_weight == 0 and self.lora_weight == 0:
            raise ValueError(
                "every weight of OrthoRegConfig is zero (`cov_weight`, `proj_weight`, `lora_weight`), so the "
                "regulariser would do nothing; set at least one of them > 0"
            )
        if self.anchor not in ANCHORS:
            raise ValueError(f"`anchor` must be one of {ANCHORS}; got {self.anchor!r}")
        if self.mask not in MASK_POLICIES:
            raise ValueError(f"`mask` must be one of {MASK_POLICIES}; got {self.mask!r}")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"`on_nonfinite` must be one of {NONFINITE_POLICIES}; got {self.on_nonfinite!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an int >= 0; got {self.warmup_steps!r}")
        if not isinstance(self.calibration_batches, int) or self.calibration_batches < 1:
            raise ValueError(f"`calibration_batches` must be an int >= 1; got {self.calibration_batches!r}")
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)

    @property
    def needs_directions(self) -> bool:
        return self.proj_weight > 0 or self.lora_weight > 0

    def warmup_factor(self, step: int) -> float:
        """w(t) for optimizer step t (0-based): linear from 1/warmup_steps up to 1."""
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OrthoRegConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown OrthoRegConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**data)
