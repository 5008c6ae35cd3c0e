"""Scores measured on a task **before** training, to be related to the rise in harmful attempts it causes (issue 14).

- ``overlap``: the library's ``orthoreg.audit.overlap.overlap_score`` (gradient mode, reply tokens: ``mask="labels"``),
  its overall score (max over layers of |cos| between the task's mean feature gradient and the refusal direction);
- ``density``: ``orthoreg.audit.density.superposition_density`` of the aligned base on the task's reply tokens, the mean
  over the direction layers of ρ = PR/d; ``harmful_share`` is η (the share of that variance on the directions);
- ``grad_comply``: cos(ḡ_task, ḡ_comply) — ḡ_task the mean gradient of the task's LM loss w.r.t. a fresh LoRA
  adapter (the fine-tune's own init: seed 0, r = 16 on all projections) at the aligned base, ḡ_comply the same for
  the loss of the shipped model's *compliant* answers to harmful train-split requests (``tasks.compliance_prompts``;
  never evaluation requests). A descent step on the task then moves the model toward those answers by
  ≈ lr·‖ḡ_task‖‖ḡ_comply‖·cos (first order; He et al. 2024 select harmful-like benign data this way);
- ``grad_unrefuse``: −cos(ḡ_task, ḡ_refuse), ḡ_refuse for the aligned base's own refusals of harmful train-split
  requests (the safety tune's targets): positive when a task step raises the loss of refusing.

With LoRA's B = 0 at init only B receives gradient (∂L/∂B = ∂L/∂y · (A x)ᵀ, a seeded random projection of the
full-weight gradient), so the cosines are between randomly projected full-weight gradients, in the space the
fine-tune actually moves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .finetune import add_lora
from .model import autocast, collate, encode_example

PREDICTORS = ("overlap", "density", "harmful_share", "grad_comply", "grad_unrefuse")


def mean_lora_gradient(peft_model: nn.Module, tokenizer: Any, examples: Sequence[dict[str, list[int]]],
                       batch_size: int = 8) -> torch.Tensor:
    """Mean over ``examples`` of ∂(per-example mean reply-token loss)/∂(LoRA parameters), flattened, float32."""
    params = [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    total = torch.zeros(sum(p.numel() for p in params))
    peft_model.eval()
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        batch = collate(chunk, tokenizer.pad_token_id)
        peft_model.zero_grad(set_to_none=True)
        with autocast(True):
            logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100,
                                                reduction="none")
        per_example = nll.sum(1) / (labels != -100).sum(1).clamp(min=1)
        per_example.sum().backward()
        total += torch.cat([p.grad.detach().float().flatten() if p.grad is not None else torch.zeros(p.numel())
                            for p in params])
    peft_model.zero_grad(set_to_none=True)
    return total / max(len(examples), 1)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


class GradientPredictor:
    """Holds ḡ_comply and ḡ_refuse of one aligned base (computed once) and scores tasks against them."""

    def __init__(self, model: nn.Module, tokenizer: Any, comply: Sequence[tuple[str, str]],
                 refuse: Sequence[tuple[str, str]], *, max_length: int = 96, seed: int = 0):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.peft = add_lora(model, seed=seed)
        self.comply = mean_lora_gradient(self.peft, tokenizer, self._encode(comply))
        self.refuse = mean_lora_gradient(self.peft, tokenizer, self._encode(refuse))
        self.comply_vs_refuse = _cos(self.comply, self.refuse)

    def _encode(self, pairs: Sequence[tuple[str, str]]) -> list[dict[str, list[int]]]:
        return [encode_example(self.tokenizer, p, c, self.max_length, close=False, label_decision_token=False)
                for p, c in pairs]

    def score(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, float]:
        g = mean_lora_gradient(self.peft, self.tokenizer, examples)
        return {"grad_comply": _cos(g, self.comply), "grad_unrefuse": -_cos(g, self.refuse),
                "grad_norm": float(g.norm())}

    def release(self) -> nn.Module:
        """The base model without the scoring adapter (unloaded, weights untouched)."""
        return self.peft.unload()


def measure(model: nn.Module, tokenizer: Any, directions: Any, examples: Sequence[dict[str, list[int]]],
            gradient: GradientPredictor | None) -> dict[str, Any]:
    """Every predictor for one task's encoded training examples (``examples`` are ``encode_example`` dicts)."""
    from orthoreg.audit import overlap_score, superposition_density

    t0 = time.perf_counter()
    data = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    target = gradient.peft if gradient is not None else model
    with _adapter_off(target):
        report = overlap_score(target, directions, data, tokenizer, mask="labels", batch_size=8, progress=False)
        batches = [collate(data[i:i + 16], tokenizer.pad_token_id) for i in range(0, len(data), 16)]
        dens = superposition_density(target, batches, layers=list(directions.layers), directions=directions,
                                     mask="labels", max_tokens=6000)
    layers = list(dens.density)
    out: dict[str, Any] = {
        "overlap": report.overall, "overlap_peak_layer": report.peak_layer,
        "overlap_per_layer": {str(k): v for k, v in report.per_layer.items()}, "overlap_chance": report.chance,
        "density": sum(dens.density.values()) / max(len(layers), 1),
        "harmful_share": sum(dens.harmful_share.values()) / max(len(dens.harmful_share), 1),
        "density_tokens": dens.n_tokens,
    }
    if gradient is not None:
        out.update(gradient.score(examples))
    out["seconds"] = time.perf_counter() - t0
    return out


class _adapter_off:
    """Disables a PEFT adapter inside the block (the overlap and density are properties of the aligned base)."""

    def __init__(self, model: nn.Module):
        self.ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
