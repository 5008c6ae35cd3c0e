"""Markdown tables and the plot of the defence summary (``scripts/defences_summary.py``): pure functions of its
JSON, each rendering one part of ``benchmarks/README_defences_summary.md``."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .defences import SPECIFICITY_ARMS
from .task_eval import FRAMINGS

__all__ = ["categories_table", "fmt", "format_table", "front_door_table", "levers_reference", "mean", "percent", "plot", "rival_entry",
           "rival_means", "rivals_table", "specificity_table", "table", "target_table"]


def mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def fmt(value: float | None, spec: str = "+.1f") -> str:
    return "–" if value is None else format(value, spec)


def whole(value: float | None) -> str:
    """Signed whole points, "–" where undefined; a value just below zero reads "+0", not "-0"."""
    return "–" if value is None else f"{round(value):+d}"


def percent(share: float | None) -> str:
    """A share (0–1) as whole percent, "–" where it is undefined."""
    return "–" if share is None else f"{round(100 * share)} %"  # an int: a share just below 0 reads "0 %", not "-0 %"


def format_table(summary: dict[str, Any]) -> str:
    lines = ["| task | seeds | harmful answers in it (plain → prot.) | attempts in it (plain → prot.) | harmless answers in "
             "it (plain → prot.) |", "|---|---|---|---|---|"]
    for task, e in summary.get("task_format", {}).items():
        cells = [f"{percent(e['plain'][k])} → {percent(e['protected'][k])}" for k in ("harmful", "attempts", "harmless")]
        lines.append(f"| {task} | {','.join(map(str, e['seeds']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rival_entry(rival: dict[str, Any], plain: dict[str, Any] | None, protected: dict[str, Any] | None) -> dict:
    """A rival arm's rise, over-refusal and PPL ratio to plain (same seed), beside plain's and recommended's."""
    def ppl(m: dict[str, Any] | None) -> float | None:
        if m is None or plain is None or "capability" not in m or "capability" not in plain:
            return None
        return math.exp(plain["capability"]["task_nll"] - m["capability"]["task_nll"])

    return {"rise": rival["rise"], "over_refusal": rival["over_refusal"], "ppl_ratio": ppl(rival),
            "metric_ratio": rival["metric"] / plain["metric"] if plain and plain["metric"] else None,
            "conditional": rival.get("conditional"),
            "plain_rise": plain["rise"] if plain else None, "recommended_rise": protected["rise"] if protected else None,
            "recommended_ppl_ratio": ppl(protected)}


def rival_means(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task and rival arm, over the seeds it ran: its mean rise beside plain's and recommended's on those seeds,
    and which of the rival and recommended wins (the lower mean rise; PLAN.md's amendment 7)."""
    out = {}
    for key, seeds in summary.get("rivals", {}).items():
        by_seed = {s: e for s, e in seeds.items() if e["plain_rise"] is not None and e["recommended_rise"] is not None}
        paired = list(by_seed.values())
        rival, recommended = mean([e["rise"] for e in paired]), mean([e["recommended_rise"] for e in paired])
        out[key] = {"seeds": list(by_seed), "rise": rival,
                    "plain_rise": mean([e["plain_rise"] for e in paired]), "recommended_rise": recommended,
                    "over_refusal": mean([e["over_refusal"] for e in paired]),
                    "ppl_ratio": mean([e["ppl_ratio"] for e in paired if e["ppl_ratio"] is not None]),
                    "recommended_ppl_ratio": mean([e["recommended_ppl_ratio"] for e in paired
                                                   if e["recommended_ppl_ratio"] is not None]),
                    "wins": None if rival is None else ("recommended" if recommended < rival else
                                                        "rival" if rival < recommended else "tie")}
    return out


def rivals_table(summary: dict[str, Any]) -> str:
    if not summary.get("rivals"):
        return ""
    lines = ["| task, seed | arm | rise | plain rise | recommended rise | PPL ratio (arm / recommended) | metric ratio | "
             "over-refusal |", "|---|---|---|---|---|---|---|---|"]
    for key, seeds in summary["rivals"].items():
        task, arm = key.split("|")
        for seed, e in seeds.items():
            lines.append(f"| {task}, {seed} | {arm} | {fmt(e['rise'])} | {fmt(e['plain_rise'])} | "
                         f"{fmt(e['recommended_rise'])} | {fmt(e['ppl_ratio'], '.2f')} / "
                         f"{fmt(e['recommended_ppl_ratio'], '.2f')} | {fmt(e['metric_ratio'], '.2f')} | "
                         f"{fmt(e['over_refusal'], '.0f')} |")
    lines += ["", "Per task, over the seeds each ran (mean rise; the lower wins):", "",
              "| task | arm | seeds | rise | plain rise | recommended rise | PPL ratio (arm / recommended) | over-refusal "
              "| wins |", "|---|---|---|---|---|---|---|---|---|"]
    for key, e in summary.get("rival_means", {}).items():
        task, arm = key.split("|")
        lines.append(f"| {task} | {arm} | {','.join(e['seeds'])} | {fmt(e['rise'])} | {fmt(e['plain_rise'])} | "
                     f"{fmt(e['recommended_rise'])} | {fmt(e['ppl_ratio'], '.2f')} / "
                     f"{fmt(e['recommended_ppl_ratio'], '.2f')} | {fmt(e['over_refusal'], '.0f')} | {e['wins']} |")
    return "\n".join(lines)


def specificity_table(summary: dict[str, Any], energies: dict[str, Any] | None, specific_by: float) -> str:
    """``specific_by``: the points by which the harm-specific V must beat the generic one (the plan's rule)."""
    if not summary.get("specificity"):
        return ""
    names = {"recommended": "generic V (recommended)", "recommended_harm_matched": "harm-specific V, energy-matched",
             "recommended_random_seed": "random V, fresh per seed"}
    # each arm's V in specificity.json (the random V: seed 0's frame, one of the fresh ones)
    sets = {"recommended": "builtin_harmless_post",
            **{arm: "random:0" if v == "random" else v for arm, v in SPECIFICITY_ARMS.items()}}
    lines = ["| task | V | rise per seed | mean rise | over-refusal | pooled energy | harm contrast | overlap with generic "
             "| grad. norm at plain (base units) |", "|---|---|---|---|---|---|---|---|---|"]
    for task, e in summary["specificity"].items():
        for arm, a in e["arms"].items():
            d = (energies or {}).get(sets[arm])
            norms = [v for k, v in (d or {}).get("gradient_norm_base_units", {}).items() if k.startswith(task)]
            described = ("| – | – | – | – |" if d is None else f"| {d['energy_pooled']:.3f} | {d['harm_contrast']:+.4f} | "
                         f"{d['overlap_generic']:.3f} | {fmt(mean(norms), '.3g')} |")
            lines.append(f"| {task} (plain {fmt(e['plain_rise_mean'])}) | {names[arm]} | "
                         + ", ".join(f"{v:+.0f}" for v in a["rise"]) + f" | {fmt(a['rise_mean'])} | "
                         f"{fmt(a['over_refusal'], '.0f')} " + described)
    lines.append("\nHarm-specific V minus generic V, mean rise on the paired seeds: " + "; ".join(
        f"{t} {fmt(None if e['harm_matched_advantage'] is None else -e['harm_matched_advantage'])} "
        f"({'harm-specific' if e['harm_specific'] else 'not harm-specific' if e['harm_specific'] is False else '–'}"
        f" by the ≥ {specific_by:.0f}-point rule)" for t, e in summary["specificity"].items()))
    return "\n".join(lines)


def table(summary: dict[str, Any], key: str = "tasks") -> str:
    lines = ["| task | held out | seeds | plain rise | protected rise | kept | task ratio (NLL gain) | PPL ratio | metric ratio | "
             "general NLL Δ (plain / prot.) | over-refusal (base " f"{summary['base']['over_refusal']:.0f}) | "
             "system prompt (plain → prot.) | renamed roles (plain → prot.) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, e in summary[key].items():
        per_seed = (" [" + ", ".join(f"{v:+.0f}" for v in e["protected_rise"]) + "]") if e["protected_rise"] else ""
        cond = e["conditional"] or {}
        framed = [f"{fmt(cond[f]['plain_rise_mean'])} → {fmt(cond[f]['protected_rise_mean'])}" if f in cond else "–"
                  for f in FRAMINGS]
        gen = e["general_nll_change"]
        general = "–" if gen is None else f"{gen['plain']:+.2f} / {gen['protected']:+.2f}"
        lines.append(
            f"| {task} | {'yes' if e['held_out'] else 'no'} | {','.join(map(str, e['seeds']))} | "
            f"{fmt(e['plain_rise_mean'])} | {fmt(e['protected_rise_mean'])}{per_seed} | "
            f"{percent(e['kept'])} | "
            f"{fmt(e['task_ratio'], '.2f')}{'' if e['plain_nll_gain'] is None or e['plain_nll_gain'] > 0 else '¹'} | "
            f"{fmt(e['ppl_ratio'], '.2f')} | {fmt(e['metric_ratio'], '.2f')} | "
            f"{general} | "
            f"{fmt(e['over_refusal'], '.0f')} | {framed[0]} | {framed[1]} |")
    if any(e["plain_nll_gain"] is not None and e["plain_nll_gain"] <= 0 for e in summary[key].values()):
        lines.append("\n¹ plain's own NLL gain on the held-out replies is negative here (the fine-tune overfits replies "
                     "the base already predicts), so the gain ratio reads upside down; the PPL ratio "
                     "exp(NLL_plain − NLL_protected), added after these rows were read, needs no base.")
    return "\n".join(lines)


def categories_table(summary: dict[str, Any]) -> str:
    """Per task, each arm's mean rise on the harm categories the ``unseen`` anchor never saw (seeds it ran)."""
    labels = {"plain": "plain", "recommended": "recommended", "recommended+anchor_kl": "+ harm-anchor KL (all)",
              "recommended+anchor_kl_unseen": "+ harm-anchor KL (without them)"}
    lines = ["| task | seeds | " + " | ".join(labels.values()) + " | kept (without them) |",
             "| --- | --- |" + " --- |" * (len(labels) + 1)]
    for task, e in summary["unanchored_categories"].items():
        cells = [f"{fmt(e['arms'][arm]['rise_mean'])} [{', '.join(fmt(r, '+.0f') for r in e['arms'][arm]['rise'])}]"
                 for arm in labels]
        lines.append(f"| `{task}` | {','.join(map(str, e['seeds']))} | " + " | ".join(cells)
                     + f" | {percent(e['kept'])} |")
    return "\n".join(lines)


def target_table(summary: dict[str, Any]) -> str:
    """Issue 23's target per anchor arm on fresh seeds (``summary["target"]``): one row per eroding task."""
    if not summary.get("target"):
        return ""
    floor = summary["base"]["over_refusal"] + summary["targets"]["over_refusal_slack"]
    lines = [f"| arm | task | held out | fresh seeds | plain rise | arm rise [per seed] | kept | over-refusal (≤ {floor:.0f}) "
             "| PPL ratio | meets |", "|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for arm, check in summary["target"].items():
        for task, e in check["tasks"].items():
            per_seed = ", ".join(f"{r:+.0f}" for r in e.get("protected_rise") or [])
            lines.append(f"| `{arm}` | {task} | {'yes' if e['held_out'] else 'no'} | "
                         f"{','.join(map(str, e['seeds'])) or '–'} | {fmt(e.get('plain_rise_mean'))} | "
                         f"{fmt(e.get('protected_rise_mean'))} [{per_seed}] | {percent(e['kept'])} | "
                         f"{fmt(e.get('over_refusal'), '.0f')} | {fmt(e.get('ppl_ratio'), '.2f')} | "
                         f"{'yes' if e['meets'] else 'no'} |")
        verdicts.append(f"`{arm}`: {len(check['met'])} of {len(check['tasks'])} eroding tasks meet it "
                        f"({len(check['held_out_met'])} held out) — the target is "
                        f"{'met' if check['meets'] else 'missed'}.")
    return "\n".join(lines + [""] + verdicts)


def front_door_table(summary: dict[str, Any]) -> str:
    """``summary["front_door"]`` per base build: issue 23's target as ``target_table`` reads it (each build's own
    over-refusal limit), with the framed rises (system prompt / renamed roles, plain → front door) beside it."""
    parts = []
    for sha, check in summary.get("front_door", {}).items():
        limit = check["base_over_refusal"] + summary["targets"]["over_refusal_slack"]
        lines = [f"| task | held out | seeds | plain rise | front door rise [per seed] | kept | over-refusal (≤ {limit:.0f}) "
                 "| PPL ratio | system prompt / renamed roles (plain → front door) | meets |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for task, e in check["tasks"].items():
            per_seed = ", ".join(f"{r:+.0f}" for r in e.get("protected_rise") or [])
            framed = " / ".join(f"{whole(c['plain_rise_mean'])} → {whole(c['protected_rise_mean'])}"
                                for c in (e.get("conditional") or {}).values()) or "–"
            lines.append(f"| {task} | {'yes' if e['held_out'] else 'no'} | {','.join(map(str, e['seeds'])) or '–'} | "
                         f"{fmt(e.get('plain_rise_mean'))} | {fmt(e.get('protected_rise_mean'))} [{per_seed}] | "
                         f"{percent(e['kept'])} | {fmt(e.get('over_refusal'), '.0f')} | "
                         f"{fmt(e.get('ppl_ratio'), '.2f')} | {framed} | {'yes' if e['meets'] else 'no'} |")
        verdict = (f"`front_door`: {len(check['met'])} of {len(check['tasks'])} eroding tasks meet it "
                   f"({len(check['held_out_met'])} held out) — the target is {'met' if check['meets'] else 'missed'}.")
        parts.append(f"Base build `{sha}` (base attempts {check['base_attempt']:.1f} %, over-refusal "
                     f"{check['base_over_refusal']:.0f} %):\n\n" + "\n".join(lines) + "\n\n" + verdict)
    return "\n\n".join(parts)


def levers_reference(summary: dict[str, Any]) -> str:
    """The shipped setting's rise on the seeds each lever ran, the yardstick the plan's rules compare against."""
    seen: dict[tuple[str, tuple[int, ...]], list[float | None]] = {}
    for key, e in summary.get("levers", {}).items():
        seen.setdefault((key.split(" ")[0], tuple(e["seeds"])), e["recommended_rise"])
    parts = [f"`{task}` seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}: "
             f"{fmt(mean([r for r in rises if r is not None]))}" for (task, seeds), rises in sorted(seen.items())]
    return "The shipped setting (λ 5000, V recorded by the callback) on the same seeds: " + "; ".join(parts) + "."


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"])
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(tasks)), 3.6))
    for i, task in enumerate(tasks):
        e = summary["tasks"][task]
        for j, (key, colour) in enumerate((("plain_rise", "tab:red"), ("protected_rise", "tab:blue"))):
            values = e[key] or []
            if values:
                x = i + (j - 0.5) * 0.35
                ax.bar(x, statistics.fmean(values), 0.33, color=colour, alpha=0.5,
                       label=("plain" if j == 0 else "recommended") if i == 0 else None)
                ax.scatter([x] * len(values), values, color=colour, s=10, zorder=3)
    ax.axhline(0, color="black", lw=0.6)
    ax.axhline(summary["targets"]["eroding_from"], color="grey", lw=0.6, ls=":")
    ax.set_xticks(range(len(tasks)), [t + ("\n(held out)" if summary["tasks"][t]["held_out"] else "") for t in tasks],
                  fontsize=8)
    ax.set_ylabel("rise in harmful attempts (points)")
    ax.legend(fontsize=8)
    ax.set_title("SmolLM2-135M, base v3, judge v2.1: plain vs recommended (bars: mean, dots: seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
