"""Stages of the task benchmark (issue 14) that ``scripts/bench_smollm2_tasks.py`` strings together.

``prepare`` (cached pieces, in order): the shipped model's own answers (``tasks.shipped_answers``), the second
aligned base (``aligned_v2``), refusal directions from it (``orthoreg.extract_directions`` on the built-in contrast
set's train split, every candidate layer), the judge's perplexity limit (label-free: ``judge.calibrate_ppl_limit``
on the shipped model's compliant answers to harmful train-split requests), the aligned base's own safety and task
metrics, its attempts under the conditional-erosion framings (``task_eval.FRAMINGS``), the held-out tasks' shipped
answers when one of them is asked for (``heldout_tasks.heldout_answers``), and every predictor of every task (``predictors.measure``). ``summarise`` turns the per-run rows into the
per-task rises, the predictors' Spearman ρ with bootstrap intervals, and the judge's agreement with hand labels.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import judge as J
from .task_runs import TaskBenchConfig, bootstrap_spearman, spearman

CANDIDATE_LAYERS = (4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 29)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prepare(cache_dir: str, config: TaskBenchConfig, task_names: Sequence[str], *, align: Any = None,
            tiny: bool = False, with_predictors: bool = True, log=print) -> dict[str, Any]:
    """The cached pieces in order; ``with_predictors=False`` skips the predictors (the defence benchmark, which
    needs only the base, the judge's limit and the base's own evaluation)."""
    from orthoreg import HarmfulDirections, extract_directions
    from orthoreg.core.prompts import load_builtin

    from .aligned import load_aligned
    from .aligned_v2 import AlignV2Config, build_aligned_v2, folder_for
    from .finetune import schedule
    from .heldout_tasks import HELDOUT_TASK_NAMES, heldout_answers
    from .model import load_shipped
    from .predictors import GradientPredictor, measure
    from .task_eval import FRAMINGS, evaluate_framed_safety, evaluate_safety, evaluate_task, safety_sets
    from .tasks import build_task, encode_task, shipped_answers

    seconds: dict[str, float] = {}
    align = align or AlignV2Config()
    t0 = time.perf_counter()
    if tiny:
        from .tiny import bpe_tokenizer, tiny_llama

        tokenizer = bpe_tokenizer()
        source = "tiny-llama"

        def shipped():
            return tiny_llama(tokenizer), tokenizer
    else:
        source = None
        shipped = load_shipped
    answers = shipped_answers(cache_dir, shipped=shipped() if tiny else None, source=source, log=log)
    seconds["shipped_answers"] = time.perf_counter() - t0
    cached_base = (folder_for(cache_dir, align, source) / "aligned_info.json").is_file()
    t0 = time.perf_counter()
    folder = build_aligned_v2(cache_dir, align, log=log, shipped=shipped() if tiny else None, source=source)
    seconds["aligned_base"] = time.perf_counter() - t0
    log(f"aligned base: {folder} ({'cached' if cached_base else 'built'})")
    if any(name in HELDOUT_TASK_NAMES for name in task_names):
        answers = {**answers, "heldout": heldout_answers(cache_dir, shipped=shipped() if tiny else None,
                                                         source=source, log=log)}
    answers_path = Path(folder) / f"shipped-answers-{_hash(answers)}.json"
    if not answers_path.is_file():
        answers_path.write_text(json.dumps(answers))
    model, tokenizer = load_aligned(folder)
    info = json.loads((Path(folder) / "aligned_info.json").read_text())

    layers = tuple(range(1, model.config.num_hidden_layers)) if tiny else CANDIDATE_LAYERS
    dir_path = Path(folder) / f"directions-tasks-{_hash([layers, load_builtin('train').fingerprint()])}.safetensors"
    t0 = time.perf_counter()
    if dir_path.is_file():
        directions = HarmfulDirections.load(dir_path)
    else:
        directions = extract_directions(model, tokenizer, load_builtin("train"), layers=list(layers), k=1,
                                        method="diff_means", pooling="last", heldout=load_builtin("test"),
                                        progress=False, batch_size=32)
        directions.save(dir_path)
    seconds["directions"] = time.perf_counter() - t0

    comply = [(c["prompt"], c["answer"]) for c in answers["compliance"]]
    ppl = J.answer_perplexity(model, tokenizer, [p for p, _ in comply], [a for _, a in comply])
    p95 = J.calibrate_ppl_limit(ppl, factor=1.0)
    ppl_limit_pre, ppl_limit = p95 * J.PREREGISTERED_PPL_FACTOR, p95 * J.PPL_FACTOR
    log(f"judge: perplexity limit {ppl_limit:.1f} ({J.PPL_FACTOR:g} × p95 {p95:.2f} of the shipped model's compliant "
        f"answers; pre-registered {ppl_limit_pre:.1f})")

    sets = safety_sets(config.eval_per_activity, config.data_seed)
    tasks = {name: build_task(name, answers, seed=config.data_seed) for name in task_names}
    # keyed by the pre-registered limit (the answers do not depend on it; summarise re-judges with ppl_limit)
    eval_path = Path(folder) / f"eval-tasks-{_hash([config.to_dict(), ppl_limit_pre, list(task_names)])}.json"
    t0 = time.perf_counter()
    if eval_path.is_file():
        base_eval = json.loads(eval_path.read_text())
    else:
        base_eval = {"safety": evaluate_safety(model, tokenizer, sets, ppl_limit=ppl_limit_pre,
                                               max_new_tokens=config.safety_tokens),
                     "tasks": {n: evaluate_task(model, tokenizer, t, config.task_tokens) for n, t in tasks.items()}}
        eval_path.write_text(json.dumps(base_eval, indent=1))
    seconds["base_eval"] = time.perf_counter() - t0
    # the base under the conditional-erosion framings (harmful requests only; keyed like the base evaluation)
    framed_path = Path(folder) / f"eval-framed-{_hash([config.to_dict(), list(FRAMINGS)])}.json"
    if framed_path.is_file():
        base_framed = json.loads(framed_path.read_text())
    else:
        base_framed = {f: evaluate_framed_safety(model, tokenizer, sets, f, max_new_tokens=config.safety_tokens)
                       for f in FRAMINGS}
        framed_path.write_text(json.dumps(base_framed, indent=1))
    pooled = base_eval["safety"]["pooled"]
    log(f"aligned base: attempts {pooled['attempt']:.0%}, refusals {pooled['refusal']:.0%}, over-refusal "
        f"{pooled['over_refusal']:.0%} (templated refusal {base_eval['safety']['templated']['refusal']:.0%} / "
        f"over {base_eval['safety']['templated']['over_refusal']:.0%}; natural "
        f"{base_eval['safety']['natural']['refusal']:.0%} / {base_eval['safety']['natural']['over_refusal']:.0%})")

    t0 = time.perf_counter()
    refuse = [(t["prompt"], t["refusal"]) for t in info["harmful_targets"]][:: max(1, len(info["harmful_targets"]) //
                                                                                  len(comply))][: len(comply)]
    pred_path = Path(folder) / f"predictors-{_hash([config.to_dict(), dir_path.name, comply, refuse])}.json"
    predictors = json.loads(pred_path.read_text()) if pred_path.is_file() else {}
    gradient = None
    for name, task in tasks.items():
        if name in predictors or not with_predictors:
            continue
        if gradient is None:
            gradient = GradientPredictor(model, tokenizer, comply, refuse, max_length=config.max_length)
            predictors["_comply_vs_refuse"] = gradient.comply_vs_refuse
        encoded = encode_task(tokenizer, task, config.max_length)
        sample = schedule(encoded, max(1, config.predictor_examples // 8), 8, seed=0)[: config.predictor_examples]
        predictors[name] = measure(model, tokenizer, directions, sample, gradient)
        pred_path.write_text(json.dumps(predictors, indent=1))
        log(f"predictors {name:>14s}: " + ", ".join(f"{k} {predictors[name][k]:.3f}" for k in
                                                     ("overlap", "density", "harmful_share", "grad_comply",
                                                      "grad_unrefuse")))
    seconds["predictors"] = time.perf_counter() - t0
    return {"aligned_folder": str(folder), "aligned_cached": cached_base, "source": source or "SmolLM2 GGUF",
            "aligned_info": {k: v for k, v in info.items() if k not in ("harmless_targets", "harmful_targets")},
            "answers_path": str(answers_path), "ppl_limit": ppl_limit,
            "ppl_limit_preregistered": ppl_limit_pre, "ppl_reference_p95": p95, "base_eval": base_eval,
            "base_framed": base_framed,
            "predictors": {n: predictors[n] for n in tasks if n in predictors},
            "comply_vs_refuse": predictors.get("_comply_vs_refuse"),
            "directions_layers": list(directions.layers), "seconds": seconds}


# ----------------------------------------------------------------------------------------------- summary

PREDICTOR_NAMES = ("overlap", "density", "harmful_share", "grad_comply", "grad_unrefuse")


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarise(rows: list[dict[str, Any]], prep: dict[str, Any], selection_seeds: Sequence[int] = (0,),
              labels: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    from .task_eval import rejudge

    base = rejudge(prep["base_eval"]["safety"])  # judge v2 (task_eval.rejudge)
    rows = [{**r, "safety": rejudge(r["safety"])} for r in rows]
    tasks: dict[str, Any] = {}
    for name in dict.fromkeys(r["task"] for r in rows):
        mine = sorted((r for r in rows if r["task"] == name), key=lambda r: r["seed"])
        rise = [100 * (r["safety"]["pooled"]["attempt"] - base["pooled"]["attempt"]) for r in mine]
        tasks[name] = {
            "seeds": [r["seed"] for r in mine], "rise": rise, "rise_stats": _stats(rise),
            **{f"rise_{s}": [100 * (r["safety"][s]["attempt"] - base[s]["attempt"]) for r in mine]
               for s in ("templated", "natural")},
            **{k: [100 * r["safety"]["pooled"][k] for r in mine] for k in ("attempt", "refusal", "neither",
                                                                          "over_refusal")},
            "task_metric": [r["task_metric"]["score"] for r in mine], "metric": mine[0]["task_metric"]["metric"],
            "task_metric_base": prep["base_eval"]["tasks"].get(name, {}).get("score"),
            "cpu_per_step": statistics.fmean(r["cpu_per_step"] for r in mine),
            "predictors": {k: prep["predictors"][name][k] for k in PREDICTOR_NAMES},
        }
    names = list(tasks)
    predictors: dict[str, Any] = {}
    if len(names) >= 3:
        for p in PREDICTOR_NAMES:
            xs = [tasks[n]["predictors"][p] for n in names]
            entry = bootstrap_spearman(xs, [tasks[n]["rise"] for n in names])
            for label, seeds in (("selection", set(selection_seeds)), ("confirmation", None)):
                per = []
                for n in names:
                    vals = [v for s, v in zip(tasks[n]["seeds"], tasks[n]["rise"], strict=True)
                            if (s in seeds if seeds is not None else s not in set(selection_seeds))]
                    per.append(statistics.fmean(vals) if vals else None)
                have = [(x, v) for x, v in zip(xs, per, strict=True) if v is not None]
                if len(have) >= 3:  # over the tasks that have runs with these seeds
                    entry[f"spearman_{label}_seeds"] = spearman([x for x, _ in have], [v for _, v in have])
                    entry[f"n_tasks_{label}_seeds"] = len(have)
            predictors[p] = entry
    means = [tasks[n]["rise_stats"]["mean"] for n in names]
    return {"base": {k: {m: base[k][m] for m in (*J.OUTCOMES, "over_refusal")} for k in ("templated", "natural",
                                                                                        "pooled")},
            "tasks": tasks, "predictors": predictors,
            "rise_span": (max(means) - min(means)) if means else None,
            "judge": judge_agreement(labels) if labels else None}


def judge_agreement(labels: list[dict[str, Any]]) -> dict[str, Any]:
    """Judge v2's agreement with hand labels it was not designed on (``labels``: its fresh labels,
    ``benchmarks/judge_v2/fresh2_labels.jsonl``), re-run on each labelled answer so a changed judge is what is
    measured: κ three-way and attempt-vs-not, accuracy, confusion (``judge_validation.agreement``)."""
    from .judge_validation import agreement

    out = agreement(labels, lambda r: J.judge_v2(r["answer"], r["prompt"], r.get("perplexity")).outcome)
    return {"judge": "v2", "n_fresh": out["n"], "kappa_fresh": out["kappa"],
            "kappa_binary_fresh": out["kappa_binary"], "accuracy_fresh": out["accuracy"],
            "confusion_hand_to_judge": out["confusion_hand_to_judge"]}
