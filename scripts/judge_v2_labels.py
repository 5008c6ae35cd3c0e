"""Judge v2's labels: draw a sample to hand-label, and measure the judge's agreement with hand labels (issue 22).

    python scripts/judge_v2_labels.py sample --n 240 --seed 2 --out benchmarks/judge_v2/fresh_sample.jsonl
    python scripts/judge_v2_labels.py agreement benchmarks/judge_v2/fresh_labels.jsonl

``sample`` draws from every stored harmful answer of the real-model benchmarks (``judge_validation.answer_pool``),
evenly over arm × task × phrasing, skipping every answer already hand-labelled (the issue-14 labels, judge v2's design
labels and v2.0's fresh labels). The rows it writes carry no verdict, so the labeller cannot see the judge. ``agreement`` prints κ
(three-way and attempt vs not) of v2 and of v1 against the labels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orthoreg.realbench import judge as J  # noqa: E402
from orthoreg.realbench import judge_validation as V  # noqa: E402

LABELLED = (ROOT / "benchmarks" / "smollm2_tasks_labels.jsonl", ROOT / "benchmarks" / "judge_v2" / "design_labels.jsonl",
            ROOT / "benchmarks" / "judge_v2" / "fresh_labels.jsonl")
FIELDS = ("uid", "source", "arm", "task", "seed", "set", "prompt", "category", "answer", "perplexity")


def v1_limit() -> float:
    return json.loads((ROOT / "benchmarks" / "smollm2_tasks_base_v2.json").read_text())["prep"]["ppl_limit"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--n", type=int, default=240)
    s.add_argument("--seed", type=int, default=2)
    s.add_argument("--out", required=True)
    a = sub.add_parser("agreement")
    a.add_argument("labels", nargs="+")
    args = parser.parse_args()
    if args.command == "sample":
        labelled = [row for path in LABELLED if path.exists() for row in V.read_labels(path)]
        rows = V.stratified_sample(V.answer_pool(ROOT / "benchmarks"), args.n, args.seed, exclude=labelled)
        with open(args.out, "w") as f:
            for row in rows:
                f.write(json.dumps({k: row.get(k) for k in FIELDS} | {"label": None, "reason": None}) + "\n")
        print(f"{len(rows)} answers to label → {args.out}")
        return
    labels = [row for path in args.labels for row in V.read_labels(path)]
    limit = v1_limit()
    for name, verdict in (("v2", lambda r: J.judge_v2(r["answer"], r["prompt"], r.get("perplexity")).outcome),
                          ("v1", lambda r: J.judge(r["answer"], r["prompt"], r.get("category"), r.get("perplexity"),
                                                   limit).outcome)):
        out = V.agreement(labels, verdict)
        print(f"{name}: n {out['n']}  kappa {out['kappa']:.3f}  kappa attempt-vs-not {out['kappa_binary']:.3f}  "
              f"accuracy {out['accuracy']:.3f}  confusion (hand → judge) {out['confusion_hand_to_judge']}")


if __name__ == "__main__":
    main()
