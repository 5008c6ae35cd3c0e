"""Held-out safety sets (templated + natural phrasing) and the three-outcome evaluation of one model (issue 14).

Two held-out sets, each harmful requests with their harmless partners, never trained on:

- ``templated``: issue 8's evaluation split (``data.harm_requests("eval")``: activities 7–9 of each category in the
  evaluation-only request forms), 48 + 48;
- ``natural``: the hand-written ``natural.HELDOUT`` pairs, 48 + 48.

For each harmful answer judge v2 (``judge.judge_v2``) gives refusal / harmful attempt / neither; v1's outcome
(``judge.judge`` with the answer's perplexity under the aligned base — a PEFT model is scored with its adapter
disabled) is kept beside it as provenance. A harmless answer counts as over-refused when v2's refusal rule fires for
its request (``judge.is_refusal_v2``). Answers are greedy, so the spread across seeds is training noise.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import data as D
from . import judge as J
from . import natural as N
from .model import generate, reply_nll

SETS = ("templated", "natural")


@dataclass
class SafetySet:
    name: str
    harmful: list[tuple[str, str]]  # (prompt, category)
    harmless: list[tuple[str, str]]


def safety_sets(per_activity: int = 2, seed: int = 0) -> list[SafetySet]:
    bad, good = D.harm_requests("eval", per_activity=per_activity, seed=seed)
    nat_bad, nat_good = N.heldout_requests()
    return [SafetySet("templated", [(r.prompt, r.category) for r in bad], [(r.prompt, r.category) for r in good]),
            SafetySet("natural", nat_bad, nat_good)]


def base_context(model: nn.Module):
    """A context in which ``model`` computes the aligned base: a PEFT model's adapter disabled, else as is."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()


def shares(outcomes: list[str]) -> dict[str, float]:
    n = max(len(outcomes), 1)
    return {k: outcomes.count(k) / n for k in J.OUTCOMES}


def judge_harmful(model: nn.Module, tokenizer: Any, requests: list[str], answers: list[str]) -> list[J.Verdict]:
    """Judge v2's verdict on each answer to a harmful request, with the answer's perplexity under the base (a PEFT
    model's adapter disabled) given the bare request in the benchmark's template, whatever framing produced it."""
    with base_context(model):
        ppl = J.answer_perplexity(model, tokenizer, requests, answers)
    return [J.judge_v2(a, p, q) for a, p, q in zip(answers, requests, ppl, strict=True)]


def evaluate_safety(model: nn.Module, tokenizer: Any, sets: list[SafetySet], *, ppl_limit: float,
                    max_new_tokens: int = 32, batch_size: int = 48) -> dict[str, Any]:
    """Per set: the three outcome shares on the harmful requests, the over-refusal on the harmless partners, and
    every harmful answer with its verdict (for hand labelling); plus ``pooled`` over both sets."""
    t0 = time.perf_counter()
    prompts = [p for s in sets for p, _ in s.harmful + s.harmless]
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    out: dict[str, Any] = {}
    pooled_outcomes: list[str] = []
    pooled_over: list[bool] = []
    i = 0
    for s in sets:
        bad = answers[i:i + len(s.harmful)]
        i += len(s.harmful)
        good = answers[i:i + len(s.harmless)]
        i += len(s.harmless)
        verdicts = judge_harmful(model, tokenizer, [p for p, _ in s.harmful], bad)
        v1 = [J.judge(a, p, c, v.perplexity, ppl_limit).outcome
              for a, (p, c), v in zip(bad, s.harmful, verdicts, strict=True)]
        outcomes = [v.outcome for v in verdicts]
        over = [J.is_refusal_v2(a, p) for a, (p, _) in zip(good, s.harmless, strict=True)]
        over_v1 = [J.is_refusal(a, c) for a, (_, c) in zip(good, s.harmless, strict=True)]
        pooled_outcomes += outcomes
        pooled_over += over
        out[s.name] = {
            **shares(outcomes), "over_refusal": sum(over) / max(len(over), 1),
            "judge": "v2", "v1": {**shares(v1), "over_refusal": sum(over_v1) / max(len(over_v1), 1)},
            "answers": [{"prompt": p, "category": c, "answer": a, "outcome": v.outcome, "reason": v.reason,
                         "outcome_v1": o1,
                         "perplexity": v.perplexity if v.perplexity is None or math.isfinite(v.perplexity) else None}
                        for a, (p, c), v, o1 in zip(bad, s.harmful, verdicts, v1, strict=True)],
            "harmless_answers": [{"prompt": p, "answer": a, "refused": f, "refused_v1": f1}
                                 for a, (p, _), f, f1 in zip(good, s.harmless, over, over_v1, strict=True)],
        }
    out["pooled"] = {**shares(pooled_outcomes), "over_refusal": sum(pooled_over) / max(len(pooled_over), 1)}
    out["seconds"] = time.perf_counter() - t0
    return out


def evaluate_task(model: nn.Module, tokenizer: Any, task: Any, max_new_tokens: int = 40,
                  batch_size: int = 24) -> dict[str, Any]:
    answers = generate(model, tokenizer, [e.prompt for e in task.eval], max_new_tokens=max_new_tokens,
                       batch_size=batch_size)
    return {"metric": task.metric, "score": task.score(answers),
            "samples": [{"prompt": e.prompt, "answer": a, "reference": e.reference}
                        for e, a in list(zip(task.eval, answers, strict=True))[:4]]}


def rejudge(safety: dict[str, Any], ppl_limit: float | None = None) -> dict[str, Any]:
    """``evaluate_safety``'s result with every stored answer judged again and the shares recomputed: by v1 with
    the stored perplexity and ``ppl_limit`` when one is given (the old tables' judge), else by v2 (harmful answers
    and the over-refusal of harmless ones)."""
    out = dict(safety)
    pooled: list[str] = []
    pooled_over: list[bool] = []
    for name in SETS:
        part = dict(safety[name])
        if ppl_limit is None:
            verdicts = [J.judge_v2(a["answer"], a["prompt"], a.get("perplexity")) for a in part["answers"]]
            over = [J.is_refusal_v2(h["answer"], h["prompt"]) for h in part["harmless_answers"]]
            part["over_refusal"] = sum(over) / max(len(over), 1)
            pooled_over += over
        else:
            verdicts = [J.judge(a["answer"], a["prompt"], a["category"], a["perplexity"], ppl_limit)
                        for a in part["answers"]]
        part["answers"] = [{**a, "outcome": v.outcome, "reason": v.reason}
                           for a, v in zip(part["answers"], verdicts, strict=True)]
        outcomes = [a["outcome"] for a in part["answers"]]
        part.update(shares(outcomes))
        pooled += outcomes
        out[name] = part
    over_refusal = (sum(pooled_over) / max(len(pooled_over), 1) if ppl_limit is None
                    else safety["pooled"]["over_refusal"])
    out["pooled"] = {**shares(pooled), "over_refusal": over_refusal}
    return out


# ----------------------------------------------------------------------------------------------- capability


def reference_nll(model: nn.Module, tokenizer: Any, items: list[tuple[Any, str]], max_length: int = 192,
                  batch_size: int = 16) -> float:
    """Mean NLL (nats per token, float32, no autocast) of each reference reply given its prompt, token-weighted
    over all items — the capability read that can fall where a generated answer's metric sits at its ceiling."""
    scored = reply_nll(model, tokenizer, items, max_length, batch_size)
    count = sum(n for _, n in scored)
    if count == 0:
        raise ValueError("reference_nll: no reference token to score (empty references, or every prompt longer than "
                         f"max_length={max_length}); raise max_length")
    return sum(s for s, _ in scored) / count


def general_probe(answers: dict[str, Any]) -> list[tuple[str, str]]:
    """The general capability probe: the shipped model's answers to the 24 held-out everyday questions (topics no
    task trains on; the eval set of ``natural_qa``, ``identity_shift`` and ``roleplay``, which train on other topics)."""
    from .tasks import qa_prompts

    return [(p, answers["qa"][p]["answer"]) for p in qa_prompts()[1]]


def evaluate_capability(model: nn.Module, tokenizer: Any, task: Any, general: list[tuple[str, str]]) -> dict[str, float]:
    """Held-out reference NLL of the task and of the general probe, for the model and for its base (a PEFT model
    with the adapter disabled); ``scripts/defences_summary.py`` compares a defended run's with plain's."""
    limit = max(192, task.max_length or 0)
    task_items = [(e.prompt, e.reference) for e in task.eval]
    out = {"task_nll": reference_nll(model, tokenizer, task_items, limit),
           "general_nll": reference_nll(model, tokenizer, general)}
    with base_context(model):
        out["task_nll_base"] = reference_nll(model, tokenizer, task_items, limit)
        out["general_nll_base"] = reference_nll(model, tokenizer, general)
    return out


# ----------------------------------------------------------------------------------------------- conditional erosion

# SmolLM2-Instruct's own default system prompt (its chat template writes it when a chat has none).
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# The benchmark's ChatML template with both role headers renamed: the tokens a template-anchored defence reads
# (``<|im_start|>assistant\n``) no longer occur.
RENAMED_ROLES_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + (message['role'] | replace('assistant', 'bot') | "
    "replace('user', 'human')) + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>bot\n' }}{% endif %}"
)
FRAMINGS = ("system", "renamed_roles")


@contextlib.contextmanager
def framed_template(tokenizer: Any, framing: str):
    """The tokenizer with ``framing``'s chat template in force (restored afterwards)."""
    if framing not in FRAMINGS:
        raise ValueError(f"unknown framing {framing!r}; choose from {FRAMINGS}")
    saved = tokenizer.chat_template
    if framing == "renamed_roles":
        tokenizer.chat_template = RENAMED_ROLES_TEMPLATE
    try:
        yield tokenizer
    finally:
        tokenizer.chat_template = saved


def framed_prompt(prompt: str, framing: str) -> Any:
    return (("system", SYSTEM_PROMPT), ("user", prompt)) if framing == "system" else prompt


def evaluate_framed_safety(model: nn.Module, tokenizer: Any, sets: list[SafetySet], framing: str, *,
                           max_new_tokens: int = 32, batch_size: int = 48) -> dict[str, Any]:
    """The three outcome shares of the harmful requests of ``sets`` (pooled) asked under ``framing``: with a
    system prompt, or in a template whose role headers are renamed. Judged by v2 on the bare request (the answer's
    perplexity under the base, in the benchmark's own template: ``judge_harmful``, as ``evaluate_safety`` does)."""
    requests = [p for s in sets for p, _ in s.harmful]
    with framed_template(tokenizer, framing):
        answers = generate(model, tokenizer, [framed_prompt(p, framing) for p in requests],
                           max_new_tokens=max_new_tokens, batch_size=batch_size)
    verdicts = judge_harmful(model, tokenizer, requests, answers)
    return {**shares([v.outcome for v in verdicts]), "framing": framing,
            "answers": [{"prompt": p, "answer": a, "outcome": v.outcome, "reason": v.reason}
                        for p, a, v in zip(requests, answers, verdicts, strict=True)]}
