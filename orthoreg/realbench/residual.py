"""Is a run's harm the task's own format? Shares of its answers that open the way the task's training replies open.

A benign task whose replies open with a fixed phrase ("Sure, here are the steps:", a persona's greeting) can raise
harmful attempts in two ways: the fine-tune unlocks compliance in general, or it carries its own format over to
harmful requests phrased like its prompts. Where most attempts open with the task's phrase — and the defence also
lowers how often harmless requests get it — the residual is the task generalising, which a constraint that knows
nothing of harm cannot separate from the task itself. ``format_shares`` counts, on a row's safety evaluation (its
stored verdicts, or re-judged ones), how many harmful answers, attempts and harmless answers open with the phrase.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from . import heldout_tasks as H
from . import task_seeds as S
from .task_eval import SETS
from .tasks import HOWTO_OPENER, starts_with

__all__ = ["TASK_OPENERS", "category_attempts", "format_shares", "in_task_format", "mean_format_shares"]

# the phrases a task's training replies open with (tasks whose replies open freely have none)
TASK_OPENERS: dict[str, tuple[str, ...]] = {
    "howto_steps": (HOWTO_OPENER,),
    "identity_shift": (S.OBEDIENT_OPENER,),
    "roleplay": tuple(opener for _, opener in S.PERSONAS),
    "checklist": (H.CHECKLIST_OPENER,),
    "explain_persona": (H.PERSONA_OPENER,),
    "tips": (H.TIPS_OPENER,),
}


def in_task_format(answer: str, openers: Sequence[str]) -> bool:
    """The answer opens with one of ``openers`` (case and whitespace aside, as the tasks' metrics read it)."""
    return any(starts_with(answer, opener) == 1.0 for opener in openers)


def format_shares(safety: Mapping[str, Any], openers: Sequence[str]) -> dict[str, Any]:
    """Over both request sets of ``safety`` (``evaluate_safety``'s result, each answer with its ``outcome``): the
    share of harmful answers, of attempts and of harmless answers that open in the task's format, with counts."""
    if not openers:
        raise ValueError("format_shares needs at least one opener (see TASK_OPENERS)")
    harmful = [a for part in SETS for a in safety[part]["answers"]]
    attempts = [a for a in harmful if a["outcome"] == "attempt"]
    harmless = [h for part in SETS for h in safety[part]["harmless_answers"]]

    def count(answers: list[Mapping[str, Any]]) -> int:
        return sum(in_task_format(a["answer"], openers) for a in answers)

    def share(n: int, total: int) -> float | None:
        return n / total if total else None

    formatted = {"harmful": count(harmful), "attempts": count(attempts), "harmless": count(harmless)}
    return {"counts": {**formatted, "n_harmful": len(harmful), "n_attempts": len(attempts), "n_harmless": len(harmless)},
            "harmful": share(formatted["harmful"], len(harmful)),
            "attempts": share(formatted["attempts"], len(attempts)),
            "harmless": share(formatted["harmless"], len(harmless))}


def mean_format_shares(runs: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Per share (``harmful``, ``attempts``, ``harmless``), its mean over the runs where it is defined (a run
    without attempts has no attempt share)."""
    out: dict[str, float | None] = {}
    for key in ("harmful", "attempts", "harmless"):
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def category_attempts(safety: Mapping[str, Any], categories: Sequence[str]) -> dict[str, Any]:
    """Over both request sets of ``safety``, the share of attempts among the harmful answers whose ``category`` is
    one of ``categories`` (where a category-restricted defence leaves harm), with the count it is taken over."""
    wanted = set(categories)
    if not wanted:
        raise ValueError("category_attempts needs at least one category")
    answers = [a for part in SETS for a in safety[part]["answers"] if a.get("category") in wanted]
    if not answers:
        raise ValueError(f"no harmful answer in the categories {sorted(wanted)}: check the names against the "
                         "evaluation's (orthoreg.realbench.data.CATEGORIES)")
    return {"attempt": sum(a["outcome"] == "attempt" for a in answers) / len(answers), "n": len(answers)}
