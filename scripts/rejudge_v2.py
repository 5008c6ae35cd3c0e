"""Re-judge every stored answer with judge v2, and test each headline verdict against the judge's free parameters.

    python scripts/rejudge_v2.py            # writes benchmarks/judge_v2/rejudge.json and prints the tables

It also records judge v2's agreement with its fresh hand labels in ``smollm2_tasks_base_v2.json`` (``judge.n_fresh``,
``judge.kappa_fresh``, ``judge.kappa_binary_fresh``; the file's older ``judge`` fields stay, as v1's provenance) and
adds a ``judge_v2`` entry (the re-judged headline) to ``smollm2_tasks_base_v2.json`` and ``defences.json``.

No fine-tune and no generation: the answers stored in ``benchmarks/smollm2_tasks_base_v2.json``, ``defences.json`` and
``defences_recommended.json`` are judged again (``verdicts.headline``). The sensitivity table varies one parameter
of ``judge.JudgeV2Params`` at a time over its plausible range (and v1 at its shipped and pre-registered perplexity
limits, for provenance) and lists every verdict that flips relative to v2's defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orthoreg.realbench import judge as J  # noqa: E402
from orthoreg.realbench import judge_validation as V  # noqa: E402
from orthoreg.realbench import verdicts as H  # noqa: E402

BENCH = ROOT / "benchmarks"
OUT = BENCH / "judge_v2" / "rejudge.json"
FRESH = BENCH / "judge_v2" / "fresh2_labels.jsonl"  # v2.1's fresh labels (v2.0's: fresh_labels.jsonl)
REVISION = "v2.1 (frozen in commit 9baa01d)"
# Each parameter's plausible range (the default first).
RANGES = {
    "min_hits": (1, 2, 3),
    "ppl_limit": (math.inf, 200.0, 68.65, 30.0, 6.87),
    "deflection": (True, False),
    "openers": (2, 1, 0),
    "commitment": (True, False),
    "cut_off_chars": (25, 10, 40, 60),
}
# the defence cells the README quotes (file | task | arm | strength)
TABLE_CELLS = (  # the defence cells the sensitivity table shows (file | task | arm | strength)
    "defences_recommended.json|identity_shift|recommended|None", "defences_recommended.json|roleplay|recommended|None",
    "defences.json|howto_steps|reader_builtin_harmless_post|0.05", "defences.json|rewrite|reader_builtin_harmless_post|0.05",
    "defences.json|identity_shift|reader_random|0.05", "defences.json|identity_shift|reader_harmless_post|0.05",
)
QUOTED_ARMS = ("reader_builtin_harmless_post", "recommended", "reader_harmless_post", "reader_random",
               "reader_task_post", "reader_contrastive", "activation_projection", "first_token_kl", "interleave")


def v2(params: J.JudgeV2Params):
    return lambda a: J.judge_v2(a["answer"], a["prompt"], a.get("perplexity"), params).outcome


def v1(limit: float):
    return lambda a: J.judge(a["answer"], a["prompt"], a.get("category"), a.get("perplexity"), limit).outcome


def _short(result: dict) -> dict:
    return {"plain_rise": result["plain_rise"], "erodes": result["erodes"],
            "removed": {k: c["removed"] for k, c in result["cells"].items()}}


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f} %"


def render(out: dict) -> str:
    """The sensitivity table (markdown), rendered from ``rejudge.json``'s content."""
    tasks = sorted(out["plain_rise"], key=lambda t: -out["plain_rise"][t])
    head = ["setting", *[f"plain {t}" for t in tasks], *[c.split("|")[1] + " " + c.split("|")[2] for c in TABLE_CELLS],
            "verdicts that flip"]
    rows = [("**v2.1 defaults**", {"plain_rise": out["plain_rise"],
                                   "removed": {k: c["removed"] for k, c in out["cells"].items()}, "flips": []}),
            *out["sensitivity"].items()]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, r in rows:
        flips = r["flips"]
        flip_text = "none" if not flips else (", ".join(flips) if len(flips) <= 3 else
                                              f"{len(flips)}: " + ", ".join(flips[:2]) + ", …")
        lines.append("| " + " | ".join([label, *[f"{r['plain_rise'][t]:+.1f}" for t in tasks],
                                        *[_pct(r["removed"].get(c)) for c in TABLE_CELLS], flip_text]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    tasks = json.loads((BENCH / "smollm2_tasks_base_v2.json").read_text())
    defences = {name: json.loads((BENCH / name).read_text()) for name in ("defences.json",
                                                                          "defences_recommended.json")}
    default = H.headline(tasks, defences, v2(J.JudgeV2Params()))
    limit = tasks["prep"]["ppl_limit"]
    settings = {f"v1 (shipped, ppl limit {limit:.1f})": v1(limit),
                f"v1 (pre-registered, ppl limit {tasks['prep']['ppl_limit_preregistered']:.1f})":
                    v1(tasks["prep"]["ppl_limit_preregistered"])}
    for name, values in RANGES.items():
        for value in values[1:]:
            settings[f"{name}={value}"] = v2(dataclasses.replace(J.JudgeV2Params(), **{name: value}))
    sensitivity = {}
    for label, judge in settings.items():
        result = H.headline(tasks, defences, judge)
        sensitivity[label] = {**_short(result), "flips": H.flips(default, result)}
        print(f"{label:38s} erodes {result['erodes']}  flips {sensitivity[label]['flips']}")
    out = {"judge": "v2 (JudgeV2Params defaults)", "definitions": {"erodes_at": H.ERODES_AT, "holds_at": H.HOLDS_AT},
           "base_attempt": default["base_attempt"], "plain_rise": default["plain_rise"], "erodes": default["erodes"],
           "cells": default["cells"], "ranges": {k: [str(v) for v in vs] for k, vs in RANGES.items()},
           "sensitivity": sensitivity}
    fresh = V.read_labels(FRESH)
    agreement = V.agreement(fresh, v2(J.JudgeV2Params()))
    both = [r for r in fresh if "second_label" in r]
    out["judge_agreement_fresh"] = {
        **agreement, "labels": str(FRESH.relative_to(ROOT)), "revision": REVISION,
        "inter_labeller": {"n": len(both), **({"kappa": J.cohen_kappa([r["label"] for r in both],
                                                                        [r["second_label"] for r in both])}
                                               if both else {})},
        "attempt_share_hand": sum(r["label"] == "attempt" for r in fresh) / len(fresh),
        "attempt_share_judge": sum(c["attempt"] for c in agreement["confusion_hand_to_judge"].values()) / len(fresh)}
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    (OUT.parent / "sensitivity.md").write_text(render(out))
    summary = {"revision": REVISION, "source": str(OUT.relative_to(ROOT)), "base_attempt": default["base_attempt"],
               "plain_rise": default["plain_rise"], "erodes": default["erodes"],
               "kappa_fresh": agreement["kappa"], "kappa_binary_fresh": agreement["kappa_binary"]}
    tasks["judge"].update({"n_fresh": agreement["n"], "kappa_fresh": agreement["kappa"],
                           "kappa_binary_fresh": agreement["kappa_binary"], "fresh_judge": REVISION,
                           "note": "kappa / n / accuracy / confusion above: judge v1 on the issue-14 labels "
                                   "(provenance); *_fresh: judge v2 on its fresh labels"})
    tasks["judge_v2"] = summary
    (BENCH / "smollm2_tasks_base_v2.json").write_text(json.dumps(tasks, indent=1))
    for name, data in defences.items():
        data["judge_v2"] = {**summary, "cells": {k.split("|", 1)[1]: c for k, c in default["cells"].items()
                                                 if k.startswith(name + "|")}}
        (BENCH / name).write_text(json.dumps(data, indent=1))
    print(f"fresh agreement ({FRESH.name}): kappa {agreement['kappa']:.3f}, attempt-vs-not "
          f"{agreement['kappa_binary']:.3f}, n {agreement['n']}")
    print(f"\nv2 defaults: base attempt {default['base_attempt']:.1f} %")
    for task, rise in sorted(default["plain_rise"].items(), key=lambda kv: -kv[1]):
        print(f"  plain {task:15s} rise {rise:+6.1f}")
    for key, cell in sorted(default["cells"].items()):
        if cell["arm"] in QUOTED_ARMS and cell["removed"] is not None:
            print(f"  {key:70s} rise {cell['rise']:+6.1f} of {cell['plain_rise']:+6.1f}  removed "
                  f"{100 * cell['removed']:5.0f} %  (n {cell['n_seeds']})")
    print(f"→ {OUT}")


if __name__ == "__main__":
    main()
