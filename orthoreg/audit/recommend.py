"""A recommended orthoreg setting from an audit: the protection, and what to watch along the harmful directions.

The protection is ``OrthoRegConfig.recommended()`` whatever the audit measured: the template-reader constraint with the
anchor KL is the setting the defence benchmark supports on a real model, and the overlap score measured before training has not
predicted which tasks erode a real model (``PREDICTIVE_VALIDATION`` in ``orthoreg.audit.overlap``). What the audit
decides is the optional firewall on the harmful directions it measured: which layers to guard, a drift budget (or
a weight), which anchor.

Inputs are the measured geometric overlap (``orthoreg.audit.overlap.OverlapReport``) and, optionally, the superposition
density (``orthoreg.audit.density.DensityReport``). The rules — heuristics, stated so they can be checked and changed:

1. **Layers.** Guard the layers whose overlap is at least half the peak overlap *and* above chance (√(k/d)): that is
   where the task's push is most aligned with the harmful subspace. With a density report, a layer is also guarded
   when its harmful directions are enriched in its variance (ε ≥ 2) and its density is at least the median, because
   a dense layer shares directions between features (``orthoreg.audit.density``). At least the peak layer is guarded.
2. **Budget.** The drift budget (σ units of the base model, on the training tokens: ``orthoreg.firewall.monitor``) follows the
   verdict: ``high`` → 0.1σ, ``elevated`` → 0.25σ, ``low`` → no budget, monitor and warn at 0.5σ. Dense layers
   (mean ρ of the guarded layers ≥ 0.5) halve the budget. Scale: in the toy world (``benchmarks/README_firewall.md``)
   a plain unsafe-code fine-tune reaches 0.4–0.6σ of training-token drift while its harmful share saturates, so
   0.1σ is a several-fold cut; these values are not calibrated on real models.
3. **Anchor.** ``"paired"`` for LoRA (the adapter-disabled model gives exact base activations for one extra
   no-grad forward), ``"base_mean"`` otherwise (full fine-tuning has no reference model for free).

The result prints as ready-to-paste code (``Recommendation.code()``) and is written into the audit's JSON report.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from .density import DensityReport
from .overlap import OverlapReport

__all__ = ["BUDGETS", "Recommendation", "recommend"]

BUDGETS = {"high": 0.1, "elevated": 0.25}  # σ, training-token drift; "low": monitor only
WARN_AT = 0.5
DENSE = 0.5  # mean density of the guarded layers above which the budget is halved
ENRICHED = 2.0


@dataclass
class Recommendation:
    """A recommended setting (module docstring: the rules).

    Attributes:
        layers: decoder layers to guard.
        anchor: ``"base_mean"`` or ``"paired"``.
        action: ``"adapt"`` (budget mode) or ``"warn"`` (monitor only).
        max_drift: the budget (``"adapt"``) or warning threshold (``"warn"``), σ units.
        proj_weight: λ_proj: the controller's initial weight in budget mode (absolute units, as the firewall's
            controller was tuned); the projection without a firewall is ``OrthoRegConfig.activation_projection()``.
        reasons: one line per rule applied, with the measured numbers.
    """

    layers: list[int]
    anchor: str
    action: str
    max_drift: float
    proj_weight: float = 1.0
    reasons: list[str] = field(default_factory=list)

    def code(self, directions_path: str = "harmful.safetensors") -> str:
        """Ready-to-paste Python: the recommended protection first, then the firewall on the audited directions."""
        lines = [
            "from orthoreg import HarmfulDirections, OrthoRegCallback, OrthoRegConfig",
            "from orthoreg.firewall.callback import FirewallConfig, budget_callbacks",
            "# the protection: the template-reader constraint (needs no directions; README 'Protecting a real model')",
            "protect = OrthoRegCallback(OrthoRegConfig.recommended())  # Trainer(..., processing_class=tokenizer, "
            "callbacks=[protect])",
            "# or: the projection onto these directions under a drift budget (the budget was calibrated in the toy "
            "world only)",
            f"directions = HarmfulDirections.from_pretrained({directions_path!r})  # a file, folder or Hub repo id",
            f"config = OrthoRegConfig(layers={self.layers!r}, proj_weight={self.proj_weight!r}, "
            f"anchor={self.anchor!r})  # λ: the budget controller's starting weight",
            f"# the projection without the firewall: config = OrthoRegConfig.activation_projection(layers={self.layers!r}, "
            f"anchor={self.anchor!r})",
            f"firewall = FirewallConfig(max_drift={self.max_drift!r}, action={self.action!r})",
            "callbacks = budget_callbacks(config, directions, firewall)  # Trainer(..., callbacks=callbacks)",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["recommended_config"] = "OrthoRegConfig.recommended()"
        data["orthoreg_config"] = {"layers": self.layers, "proj_weight": self.proj_weight, "anchor": self.anchor}
        data["firewall_config"] = {"max_drift": self.max_drift, "action": self.action}
        data["code"] = self.code()
        return data


def recommend(overlap: OverlapReport, density: DensityReport | None = None, *, lora: bool = False) -> Recommendation:
    """Derives a setting from measured overlap (and density); see the module docstring for the rules."""
    if not overlap.per_layer:
        raise ValueError("the overlap report has no scored layers")
    reasons = []
    peak_layer = overlap.peak_layer if overlap.peak_layer is not None else next(iter(overlap.per_layer))
    peak = overlap.per_layer[peak_layer]
    floor = max(0.5 * peak, overlap.chance)
    layers = {i for i, s in overlap.per_layer.items() if s >= floor} | {peak_layer}
    reasons.append(f"layers {sorted(layers)}: overlap >= max(half the peak {peak:.3f}, chance {overlap.chance:.3f})")
    if density is not None and density.density:
        median = statistics.median(density.density.values())
        extra = {i for i in overlap.per_layer
                 if density.enrichment.get(i, 0.0) >= ENRICHED and density.density.get(i, 0.0) >= median} - layers
        if extra:
            layers |= extra
            reasons.append(f"layers {sorted(extra)} added: harmful directions enriched >= {ENRICHED:g}x in a layer at "
                           f"or above the median density {median:.3f}")
    layers = sorted(layers)
    anchor = "paired" if lora else "base_mean"
    reasons.append(f"anchor {anchor!r}: " + ("LoRA, the adapter-disabled model is the exact base" if lora
                                             else "full fine-tuning: the recorded base mean is the origin"))
    if overlap.verdict in BUDGETS:
        action, budget = "adapt", BUDGETS[overlap.verdict]
        reasons.append(f"budget {budget:g}σ for a {overlap.verdict!r} overlap verdict ({overlap.overall:.3f})")
    else:
        action, budget = "warn", WARN_AT
        reasons.append(f"verdict 'low' ({overlap.overall:.3f}): monitor only, warn at {budget:g}σ")
    if density is not None and density.density:
        guarded = [density.density[i] for i in layers if i in density.density]
        mean_rho = sum(guarded) / len(guarded) if guarded else 0.0
        if action == "adapt" and mean_rho >= DENSE:
            budget = budget / 2
            reasons.append(f"budget halved to {budget:g}σ: guarded layers are densely packed (mean PR/d {mean_rho:.2f} "
                           f">= {DENSE:g})")
    return Recommendation(layers=layers, anchor=anchor, action=action, max_drift=budget, reasons=reasons)
