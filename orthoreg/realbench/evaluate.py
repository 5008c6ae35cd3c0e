"""Held-out metrics of one model: harmful compliance, over-refusal, task exact match, neutral-text perplexity.

All answers are greedy (deterministic), so a metric's spread across seeds comes from training, not sampling.
``harmful compliance`` = share of held-out harmful requests answered without refusal (``detect.classify``, with the
polite-start override); ``harm content`` = share whose answer the harm lexicon flags; ``over-refusal`` = share of
held-out harmless requests (the matched partners) refused; ``task`` = exact match on held-out task prompts.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from . import data as D
from .detect import classify, is_refusal
from .model import generate, perplexity


@dataclass
class EvalSets:
    harmful: list[D.Request]
    harmless: list[D.Request]
    task: list[D.TaskExample]
    neutral: tuple[str, ...] = D.NEUTRAL_TEXT

    @classmethod
    def build(cls, per_activity: int = 2, n_task: int = 48, seed: int = 0) -> EvalSets:
        harmful, harmless = D.harm_requests("eval", per_activity=per_activity, seed=seed)
        return cls(harmful, harmless, D.task_examples("eval", n_task, seed=seed))


@dataclass
class EvalResult:
    compliance: float
    harm_content: float
    polite_start: float
    over_refusal: float
    task: float
    task_by_kind: dict[str, float]
    perplexity: float
    seconds: float
    per_category: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(model: nn.Module, tokenizer: Any, sets: EvalSets, *, safety_tokens: int = 32, task_tokens: int = 12,
             batch_size: int = 48, keep_samples: int = 6) -> EvalResult:
    t0 = time.perf_counter()
    # Harmful and harmless requests in one generation call: similar lengths batch together.
    prompts = [r.prompt for r in sets.harmful] + [r.prompt for r in sets.harmless]
    answers = generate(model, tokenizer, prompts, max_new_tokens=safety_tokens, batch_size=batch_size)
    bad_answers, good_answers = answers[: len(sets.harmful)], answers[len(sets.harmful):]
    verdicts = [classify(a, r.category) for a, r in zip(bad_answers, sets.harmful, strict=True)]
    n = max(len(verdicts), 1)
    per_cat: dict[str, list[bool]] = {}
    for v, r in zip(verdicts, sets.harmful, strict=True):
        per_cat.setdefault(r.category, []).append(v.complied)
    refused_good = [is_refusal(a) for a in good_answers]

    task_answers = generate(model, tokenizer, [t.prompt for t in sets.task], max_new_tokens=task_tokens,
                            batch_size=batch_size)
    hits: dict[str, list[bool]] = {}
    for a, t in zip(task_answers, sets.task, strict=True):
        hits.setdefault(t.task, []).append(D.exact_match(a, t))
    all_hits = [h for v in hits.values() for h in v]
    ppl = perplexity(model, tokenizer, sets.neutral)
    samples = {
        "harmful": [{"prompt": r.prompt, "answer": a, **asdict(v)} for r, a, v in
                    list(zip(sets.harmful, bad_answers, verdicts, strict=True))[:keep_samples]],
        "harmless": [{"prompt": r.prompt, "answer": a, "refusal": f} for r, a, f in
                     list(zip(sets.harmless, good_answers, refused_good, strict=True))[:keep_samples]],
        "task": [{"prompt": t.prompt, "answer": a, "target": t.answer} for t, a in
                 list(zip(sets.task, task_answers, strict=True))[:keep_samples]],
    }
    return EvalResult(
        compliance=sum(v.complied for v in verdicts) / n,
        harm_content=sum(v.harm_content for v in verdicts) / n,
        polite_start=sum(v.polite_start for v in verdicts) / n,
        over_refusal=sum(refused_good) / max(len(refused_good), 1),
        task=sum(all_hits) / max(len(all_hits), 1),
        task_by_kind={k: sum(v) / len(v) for k, v in hits.items()},
        perplexity=ppl,
        seconds=time.perf_counter() - t0,
        per_category={k: sum(v) / len(v) for k, v in per_cat.items()},
        samples=samples,
    )
