#!/usr/bin/env python
"""What every input subspace V of the defence benchmark holds, for the fair specificity test (issue 23, item 5;
plan: ``benchmarks/specificity/PLAN.md``; the math: ``orthoreg/realbench/specificity.py``).

No fine-tune runs here. On the aligned base (v3 unless ``--quick``), per V: its energy share of the harmful prompts',
the built-in harmless requests' and the pooled template-position inputs, its harm contrast, its overlap with the
generic V (the recommended setting's), and the gradient norm of the recommended penalty (base units, and absolute)
at plain fine-tunes' trained adapters (``--adapters``: files ``bench_defences.py`` writes for plain runs)::

    python scripts/specificity_report.py --adapters RUN/adapter-howto_steps-plain-0.safetensors ...

Writes ``benchmarks/specificity.json`` (``--out``). The outcomes of the fine-tunes that use these V are read by
``scripts/defences_summary.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orthoreg.realbench import task_bench as B  # noqa: E402
from orthoreg.realbench.aligned import DEFAULT_CACHE  # noqa: E402
from orthoreg.realbench.task_runs import TaskBenchConfig  # noqa: E402
from orthoreg.realbench.workers import add_worker_arguments, log, quick_configs  # noqa: E402

OUT = ROOT / "benchmarks" / "specificity.json"
GENERIC = "builtin_harmless_post"  # the recommended setting's V (what OrthoRegConfig.recommended() records)
SETS = ("builtin_harmless_post", "harm_matched", "harmful_post", "harmful_prompt", "harmless_post", "contrastive",
        "task_post")
RANDOM_SEEDS = (0, 1, 2)


def adapter_label(path: Path) -> str:
    return path.stem.removeprefix("adapter-")


def describe_all(model: Any, tokenizer: Any, info: dict[str, Any], folder: str, tasks: dict[str, list[str]],
                 adapters: list[Path], k: int) -> dict[str, Any]:
    """{V name: its numbers}; ``tasks`` maps a task to its training prompts (one task_post V each)."""
    from orthoreg.realbench.defence_subspaces import (
        base_readouts,
        build_subspaces,
        gradient_norm,
        load_adapter,
        random_subspaces,
        template_moments,
    )
    from orthoreg.realbench.specificity import describe_subspaces

    m_harm, m_harmless = template_moments(model, tokenizer, info, log=log)
    generic = build_subspaces(GENERIC, model, tokenizer, info, folder, k=k, log=log)
    subspaces: dict[str, Any] = {}
    for name in SETS:
        if name == "task_post":
            for task, prompts in tasks.items():
                subspaces[f"task_post:{task}"] = build_subspaces(name, model, tokenizer, info, folder,
                                                                 task_prompts=prompts, task_name=task, k=k, log=log)
        else:
            subspaces[name] = build_subspaces(name, model, tokenizer, info, folder, k=k, log=log)
    for seed in RANDOM_SEEDS:
        subspaces[f"random:{seed}"] = random_subspaces(generic, seed=seed)
    loaded = {adapter_label(p): load_adapter(p) for p in adapters}
    out = {}
    for name, v in subspaces.items():
        entry: dict[str, Any] = describe_subspaces(v, m_harm, m_harmless, generic)
        readouts = base_readouts(model, v)
        entry["gradient_norm_base_units"] = {label: gradient_norm(a, v, readouts) for label, a in loaded.items()}
        entry["gradient_norm_absolute"] = {label: gradient_norm(a, v) for label, a in loaded.items()}
        tilt = v.metadata.get("tilt")
        if tilt:
            values = sorted(tilt.values())
            entry["tilt"] = {"median": values[len(values) // 2], "max": values[-1],
                             "zero_share": sum(t == 0.0 for t in values) / len(values)}
        out[name] = entry
        log(f"{name}: pooled energy {entry['energy_pooled']:.3f}, harm contrast {entry['harm_contrast']:+.4f}, "
            f"overlap with the generic V {entry['overlap_generic']:.3f}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", nargs="*", default=[], help="plain runs' adapter files (bench_defences.py)")
    ap.add_argument("--tasks", nargs="+", default=["howto_steps", "identity_shift"], help="tasks of the task_post V")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--out", default=str(OUT))
    add_worker_arguments(ap)  # --cache-dir, --quick (--workers unused)
    args = ap.parse_args(argv)
    adapters = [Path(p) for p in args.adapters]
    missing = [str(p) for p in adapters if not p.is_file()]
    if missing:
        raise SystemExit(f"adapter files not found: {missing} (bench_defences.py writes them for plain runs)")
    config, align = quick_configs() if args.quick else (TaskBenchConfig(), None)
    if args.quick and args.cache_dir == DEFAULT_CACHE:
        args.cache_dir = tempfile.mkdtemp(prefix="orthoreg-quick-")
    import torch

    torch.set_num_threads(1)  # like the benchmark's workers: it shares the machine with fine-tunes
    if align is None:
        from orthoreg.realbench.aligned_v3 import AlignV3Config

        align = AlignV3Config()
    if args.quick:
        args.k = min(args.k, 4)
    prep = B.prepare(args.cache_dir, config, args.tasks, align=align, tiny=args.quick, with_predictors=False, log=log)
    from orthoreg.realbench.aligned import load_aligned
    from orthoreg.realbench.tasks import build_task

    folder = prep["aligned_folder"]
    model, tokenizer = load_aligned(folder)
    info = json.loads((Path(folder) / "aligned_info.json").read_text())
    answers = json.loads(Path(prep["answers_path"]).read_text())
    tasks = {t: [e.prompt for e in build_task(t, answers, seed=config.data_seed).train] for t in args.tasks}
    result = {"plan": "benchmarks/specificity/PLAN.md", "generic": GENERIC, "k": args.k,
              "base": Path(folder).name, "adapters": [adapter_label(p) for p in adapters],
              "subspaces": describe_all(model, tokenizer, info, folder, tasks, adapters, args.k)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
