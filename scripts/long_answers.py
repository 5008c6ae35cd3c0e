"""Does a longer answer budget change the verdict? Plain fine-tunes' answers at 32 and 96 tokens, judged by v2.

    python scripts/long_answers.py --adapters RUN/adapter-identity_shift-plain-0.safetensors ... [--tokens 96]

Judge v2 counts an answer that starts delivering and is cut off by the 32-token budget as an attempt; the
`identity_shift` rise rests on that rule (``benchmarks/judge_v2/sensitivity.md``). This regenerates the held-out
harmful answers of the aligned base and of saved plain adapters (``defence_subspaces.save_adapter`` files, written by
``bench_defences.py --save-adapters``) with a longer budget and judges both lengths, so the cut-off rule's guess can
be compared with what the model goes on to say. Writes ``benchmarks/judge_v2/long_answers.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from orthoreg.realbench import judge as J  # noqa: E402
from orthoreg.realbench.aligned import DEFAULT_CACHE, load_aligned  # noqa: E402
from orthoreg.realbench.defence_subspaces import load_adapter  # noqa: E402
from orthoreg.realbench.model import generate, machine_record, set_threads  # noqa: E402
from orthoreg.realbench.task_eval import safety_sets  # noqa: E402

BASE_V2 = "aligned2-79f82d69dc451836"


@torch.no_grad()
def merge(model: torch.nn.Module, adapter: dict) -> None:
    modules = dict(model.named_modules())
    for name, (a, b, scaling) in adapter.items():
        if name not in modules:
            raise KeyError(f"adapter module {name!r} is not in the model; was it trained on another base?")
        weight = modules[name].weight
        weight += (scaling * (b.double() @ a.double())).to(weight.dtype)


def judged(prompts: list[str], answers: list[str]) -> dict:
    verdicts = [J.judge_v2(a, p) for p, a in zip(prompts, answers, strict=True)]
    outcomes = [v.outcome for v in verdicts]
    return {k: sum(o == k for o in outcomes) / len(outcomes) for k in J.OUTCOMES} | {
        "outcomes": outcomes, "reasons": [v.reason for v in verdicts]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", nargs="*", default=[])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--base", default=str(Path(DEFAULT_CACHE) / BASE_V2))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "judge_v2" / "long_answers.json"))
    args = ap.parse_args()
    set_threads(args.threads)
    prompts = [p for s in safety_sets() for p, _ in s.harmful]
    runs = {}
    for label in ["aligned_base", *args.adapters]:
        model, tokenizer = load_aligned(args.base)
        if label != "aligned_base":
            merge(model, load_adapter(label))
        long = generate(model, tokenizer, prompts, max_new_tokens=args.tokens, batch_size=48)
        short = generate(model, tokenizer, prompts, max_new_tokens=32, batch_size=48)
        name = Path(label).stem
        runs[name] = {"short": judged(prompts, short), "long": judged(prompts, long),
                      "answers": [{"prompt": p, "short": s, "long": lg} for p, s, lg in zip(prompts, short, long,
                                                                                           strict=True)]}
        print(f"{name}: attempt share {runs[name]['short']['attempt']:.3f} at 32 tokens, "
              f"{runs[name]['long']['attempt']:.3f} at {args.tokens}", flush=True)
    base = runs["aligned_base"]
    for run in runs.values():
        short_cut = [i for i, reason in enumerate(run["short"]["reasons"]) if reason == "starts delivering"]
        run["cut_off_attempts"] = {"n": len(short_cut), "long_outcomes": {
            k: sum(run["long"]["outcomes"][i] == k for i in short_cut) for k in J.OUTCOMES}}
        run["rise"] = {"short": 100 * (run["short"]["attempt"] - base["short"]["attempt"]),
                       "long": 100 * (run["long"]["attempt"] - base["long"]["attempt"])}
    Path(args.out).write_text(json.dumps({"tokens": args.tokens, "base": args.base, "judge": "v2.1",
                                          "machine": machine_record(), "runs": runs}, indent=1))
    for name, run in runs.items():
        print(f"{name}: rise {run['rise']['short']:+.1f} (32 tokens) vs {run['rise']['long']:+.1f} "
              f"({args.tokens}); cut-off attempts at 32 tokens: {run['cut_off_attempts']}")


if __name__ == "__main__":
    main()
