"""The defence arms of issue 15 on the task benchmark of issue 14: one fine-tune of the aligned base per (task, arm,
seed, strength), evaluated like ``task_runs.run_task`` (three-outcome safety on 96 held-out harmful requests, over-
refusal on their harmless partners, the task's metric), plus what issue 23 asks of every row: the capability read
that can fall (``task_eval.evaluate_capability``: held-out reference NLL of the task and of a general probe, with
the adapter on and off) and the harmful requests again under two framings (``task_eval.FRAMINGS``: SmolLM2's own
system prompt; role headers renamed) — conditional erosion a template-anchored defence might hide.

Arms (``ARMS``) and what they add to the plain LoRA fine-tune (same adapter, data order, steps and lr):

- ``plain`` — nothing.
- ``reader_<set>`` — the reader-side weight penalty λ Σ_m s²‖B_m A_m V_mᵀ‖²_F (``OrthoRegConfig(reader_weight=λ)``,
  through ``OrthoRegCallback(input_subspaces=V)``) with V from the subspace set ``<set>`` of ``defence_subspaces``:
  ``harmful_post`` (the method), ``harmful_prompt`` and ``contrastive`` (its variants), ``harmless_post``,
  ``task_post`` and ``random`` (controls), ``builtin_harmless_post`` (the library's own harmless prompts: no data
  from the user). A control's λ is scaled so that its penalty's gradient norm at a fixed
  trained adapter (plain, seed 0, the selection task) equals that of ``reader_harmful_post`` at the same λ
  (``scales``, from ``defence_subspaces.gradient_norm``).
- ``recommended`` — ``OrthoRegCallback(OrthoRegConfig.recommended(reader_weight=λ))`` and nothing else: the
  template-reader constraint in base-model units, V_m recorded by the callback itself at train start from the
  built-in harmless requests (what ``reader_builtin_harmless_post`` does by hand, in absolute units).
- ``recommended_harm_matched``, ``recommended_random_seed`` — the specificity test (``specificity``): the
  recommended setting, same λ and units, with V swapped for the energy-matched harm-specific V (``harm_matched`` of
  ``defence_subspaces``) or for a random orthonormal 16-frame per module drawn afresh from the job's seed.
- ``recommended_layer0``, ``recommended_reply4``, ``recommended_double_k``, ``recommended_task_union`` — the levers on the
  residual (issue 23, item 1; ``LEVER_ARMS``): the recommended setting, same λ and units, with V from the built-in
  harmless requests changed in one way (``defence_subspaces.LEVER_SETS``): layer 0 covered too; the first four reply
  tokens; 2k directions (32); the task's own training prompts pooled with the built-in ones.
- ``full_plain``, ``full_recommended`` — full fine-tuning (every weight trains, no adapter; lr
  ``FULL_FINETUNE_LR``, otherwise the same steps, batches and data order): plain, and the recommended setting with the
  same λ in the same base units, where each module's term is ‖(W_m − W₀,m) V_mᵀ‖²_F / ‖W₀,m V_mᵀ‖²_F. The judge
  and the capability read take "the base" from a copy of the weights kept before training (``finetune.FrozenBase``).
- ``activation_projection`` — ``OrthoRegConfig.activation_projection`` (λ_proj 0.1, base-mean anchor, base units) on the
  refusal directions at the 14 candidate layers, ``mask="labels"`` (the attention-sink token excluded).
- ``writer`` — the writer term of ``OrthoLoRA`` (λ_lora Σ‖U_ℓ ΔW_m‖² on o_proj/down_proj of the same layers).
- ``covariance`` — the covariance penalty (λ_cov, base units, the same layers, ``mask="labels"``).
- ``first_token_kl`` — ``baselines.FirstTokenKLCallback`` (Qi et al. 2024: KL to the base on the first 5 reply
  tokens, weights 5 … 1).
- ``hard_projection`` — ``baselines.HardProjectionCallback`` with V = ``harmful_post`` (A_m ⟂ V_m after every step).
- ``interleave`` — 10 % of the examples replaced by safety-tune examples (refusals and harmless answers),
  ``baselines.interleave``, same number of steps.
- ``reader_harmless_post+first_token_kl`` — the generic reader term and the first-token KL together.
- ``margin_budget`` — ``recommended`` plus the harm-margin guard in budget mode
  (``firewall.MarginGuardCallback``, ``action="adapt"``, every 5 steps): the reader λ starts at the recommended
  value and is raised while the probe's refusal margin has fallen more than B nats below the base's. Its
  ``strength`` is B (nats), not a λ. ``margin_budget_fast``: the same read after every step, λ up to 1000 λ₀.
- ``recommended+anchor_kl`` — ``recommended`` plus ``baselines.AnchorKLCallback`` (strength = its λ): KL to the
  base on its own first 4 reply tokens to orthoreg's built-in harmful requests (``load_builtin("train")``, none of
  them an evaluation request), 8 per step; ``recommended+anchor_kl_harmless``: the same on their harmless partners
  (the placebo); ``recommended+anchor_kl_unseen``: the harmful anchors without the categories
  ``UNANCHORED_CATEGORIES`` (does the anchor reach harm categories it never saw?).
- ``front_door`` — ``OrthoRegCallback(OrthoRegConfig.recommended())`` as shipped, one callback: the reader term and
  the anchor KL on the built-in harmless requests (PLAN.md, amendment 12). ``recommended`` and every arm built on it
  keep their meaning — the reader term alone (``anchor_kl_weight=0``) — so rows of before the anchor moved into the
  default stay what they were.
- ``treft`` — ``baselines.TReFTCallback`` (Zhao et al. 2026), λ 10 (their prefix config): the attention keys and
  values at the template's prefix positions (``<|im_start|>user\n``) held to the base's, relative to their norm, at
  every layer; ``treft_query``: the same on the first user turn's content (their query-position control).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import RECOMMENDED_READER_WEIGHT
from .task_runs import TaskBenchConfig

READER_SETS = ("harmful_post", "harmful_prompt", "contrastive", "harmless_post", "task_post", "random",
               "builtin_harmless_post")
FULL_ARMS = ("full_plain", "full_recommended")
# Full fine-tuning's lr: the LoRA benchmark's 5e-4 moves every weight far too much; 2e-5 is the usual full-SFT
# scale for a model of this size (chosen before any full run; benchmarks/full_finetune/PLAN.md).
FULL_FINETUNE_LR = 2e-5
SPECIFICITY_ARMS = {"recommended_harm_matched": "harm_matched", "recommended_random_seed": "random"}
LEVER_ARMS = {"recommended_layer0": "builtin_all_layers", "recommended_reply4": "builtin_reply4",
              "recommended_double_k": "builtin_double_k", "recommended_task_union": "builtin_and_task_post"}
SWAPPED_V_ARMS = {**SPECIFICITY_ARMS, **LEVER_ARMS}  # the recommended setting with V given instead of recorded
# The recommended setting plus the anchor KL on the built-in harmful requests, its placebo on their harmless
# partners, and the harmful anchors without three of the benchmark's harm categories (``baselines.AnchorKLCallback``;
# strength = the anchor's λ).
ANCHOR_ARMS = {"recommended+anchor_kl": "harmful", "recommended+anchor_kl_harmless": "harmless",
               "recommended+anchor_kl_unseen": "harmful_unseen"}
# The categories ``recommended+anchor_kl_unseen`` never anchors: named alike in the built-in set and the benchmark.
UNANCHORED_CATEGORIES = ("cybercrime", "drugs", "fraud")
ARMS = ("plain", *(f"reader_{s}" for s in READER_SETS), "recommended", *SWAPPED_V_ARMS, *FULL_ARMS,
        "activation_projection", "writer", "covariance", "first_token_kl", "hard_projection", "interleave",
        "reader_harmless_post+first_token_kl", "margin_budget", "margin_budget_fast", "treft", "treft_query",
        *ANCHOR_ARMS, "front_door")
DEFAULT_STRENGTH = {"recommended": RECOMMENDED_READER_WEIGHT, "full_recommended": RECOMMENDED_READER_WEIGHT,
                    **dict.fromkeys(SWAPPED_V_ARMS, RECOMMENDED_READER_WEIGHT), "activation_projection": 0.1,
                    "writer": 1.0, "covariance": 1.0, "first_token_kl": 1.0, "interleave": 0.1, "margin_budget": 1.0,
                    "margin_budget_fast": 1.0, "treft": 10.0, "treft_query": 10.0,
                    **dict.fromkeys(ANCHOR_ARMS, 0.3)}  # the anchor's λ: chosen on howto_steps seed 0 (PLAN.md, am. 8)


@dataclass
class DefenceJob:
    task: str
    arm: str
    seed: int
    strength: float | None = None  # λ (reader arms: λ of reader_harmful_post before the control's scale)
    scale: float = 1.0  # the control's gradient-norm scale (1 for the method itself)
    k: int = 16  # directions per module of the input subspaces

    @property
    def key(self) -> str:
        return f"{self.task}|{self.arm}|{self.seed}|{self.strength}"

    @property
    def weight(self) -> float:
        base = self.strength if self.strength is not None else DEFAULT_STRENGTH.get(self.arm, 0.0)
        return base * self.scale


def reader_set(arm: str) -> str | None:
    head = arm.split("+")[0]
    return head[len("reader_"):] if head.startswith("reader_") else None


def anchor_prompts(arm: str) -> list[str]:
    """The anchor requests of an ``ANCHOR_ARMS`` arm, from orthoreg's built-in training split."""
    from orthoreg.anchor import BUILTIN_ANCHORS, builtin_anchors
    from orthoreg.core.prompts import builtin_categories, load_builtin

    kind = ANCHOR_ARMS[arm]
    if kind in BUILTIN_ANCHORS:
        return builtin_anchors(kind)
    kept = [c for c in builtin_categories() if c not in UNANCHORED_CATEGORIES]  # the unseen-category arm
    return load_builtin("train", categories=kept).harmful


def reader_constraint(**overrides: Any) -> Any:
    """``OrthoRegConfig.recommended()`` without the anchor KL: the reader term alone, what the arm ``recommended`` (and
    every arm built on it) ran before the anchor KL joined the default."""
    from orthoreg import OrthoRegConfig

    return OrthoRegConfig.recommended(**{"anchor_kl_weight": 0.0, **overrides})


def _callbacks_and_wrap(job: DefenceJob, subspaces: Any, directions: Any, tokenizer: Any) -> tuple[list[Any], Any]:
    """The Trainer callbacks of ``job`` and a function that wraps the PEFT model (identity except ``writer``)."""
    from orthoreg import OrthoLoRA, OrthoRegCallback, OrthoRegConfig
    from orthoreg.baselines import FirstTokenKLCallback, HardProjectionCallback, TReFTCallback

    callbacks: list[Any] = []
    wrap = None
    arm = job.arm
    if reader_set(arm) is not None:
        config = OrthoRegConfig(proj_weight=0.0, reader_weight=job.weight)
        callbacks.append(OrthoRegCallback(config, input_subspaces=subspaces))
        if arm.endswith("+first_token_kl"):
            callbacks.append(FirstTokenKLCallback(DEFAULT_STRENGTH["first_token_kl"]))
    elif arm in SWAPPED_V_ARMS:
        callbacks.append(OrthoRegCallback(reader_constraint(reader_weight=job.weight), input_subspaces=subspaces,
                                          tokenizer=tokenizer))
    elif arm in ("recommended", "full_recommended"):
        callbacks.append(OrthoRegCallback(reader_constraint(reader_weight=job.weight), tokenizer=tokenizer))
    elif arm == "front_door":
        callbacks.append(OrthoRegCallback(OrthoRegConfig.recommended(), tokenizer=tokenizer))
    elif arm in ANCHOR_ARMS:
        from orthoreg.baselines import AnchorKLCallback

        callbacks.append(OrthoRegCallback(reader_constraint(), tokenizer=tokenizer))
        callbacks.append(AnchorKLCallback(job.weight, anchor_prompts(arm), tokenizer=tokenizer, seed=job.seed))
    elif arm in ("margin_budget", "margin_budget_fast"):
        from orthoreg.firewall import MarginGuardCallback, MarginGuardConfig

        from .finetune import HARM_SIGNAL_EVERY

        fast = arm == "margin_budget_fast"
        orthoreg = OrthoRegCallback(reader_constraint(), tokenizer=tokenizer)
        guard = MarginGuardCallback(MarginGuardConfig(max_fall=job.weight, action="adapt",
                                                      max_factor=1000.0 if fast else 100.0),
                                    orthoreg=orthoreg, every_n_steps=1 if fast else HARM_SIGNAL_EVERY,
                                    tokenizer=tokenizer)
        callbacks += [orthoreg, guard]
    elif arm == "activation_projection":
        config = OrthoRegConfig.activation_projection(layers=list(directions.layers), proj_weight=job.weight,
                                                      mask="labels")
        callbacks.append(OrthoRegCallback(config, directions=directions))
    elif arm == "covariance":
        config = OrthoRegConfig(layers=list(directions.layers), proj_weight=0.0, cov_weight=job.weight,
                                units="base", mask="labels")
        callbacks.append(OrthoRegCallback(config))
    elif arm == "writer":
        config = OrthoRegConfig(layers=list(directions.layers), proj_weight=0.0, lora_weight=job.weight)
        callbacks.append(_orthlora_metrics_callback())

        def wrap(peft_model):
            return OrthoLoRA(peft_model, config, directions)
    elif arm == "first_token_kl":
        callbacks.append(FirstTokenKLCallback(job.weight))
    elif arm == "hard_projection":
        callbacks.append(HardProjectionCallback(subspaces))
    elif arm in ("treft", "treft_query"):
        callbacks.append(TReFTCallback(job.weight, "prefix" if arm == "treft" else "query", tokenizer=tokenizer))
    elif arm not in ("plain", "interleave", "full_plain"):
        raise ValueError(f"unknown arm {arm!r}; choose from {ARMS}")
    return callbacks, wrap


def _orthlora_metrics_callback() -> Any:
    """Logs ``OrthoLoRA.pop_metrics()`` with the Trainer's logs (the wrapper is the Trainer's model); the Trainer
    has already copied ``logs`` into ``state.log_history``, so the copy gets them too."""
    from transformers import TrainerCallback

    class OrthoLoRAMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            if logs is not None and hasattr(model, "pop_metrics"):
                metrics = model.pop_metrics()
                logs.update(metrics)
                if state.log_history:
                    state.log_history[-1].update(metrics)

    return OrthoLoRAMetrics()


def safety_examples(tokenizer: Any, info: Mapping[str, Any], max_length: int) -> list[dict[str, list[int]]]:
    """The aligned base's own safety-tune examples (harmful → its refusal, harmless → the shipped answer)."""
    from .model import encode_example

    out = [encode_example(tokenizer, t["prompt"], t["refusal"], max_length, label_decision_token=False)
           for t in info["harmful_targets"]]
    out += [encode_example(tokenizer, t["prompt"], t["answer"], max_length, close=t["finished"],
                           label_decision_token=False) for t in info["harmless_targets"]]
    return out


def run_defence(base_folder: str, answers_path: str, directions_path: str, job: DefenceJob,
                config: TaskBenchConfig, ppl_limit: float, threads: int | None = 1,
                adapter_out: str | None = None) -> dict[str, Any]:
    """One fine-tune of the aligned base under ``job``'s arm and its evaluation; a JSON-ready row. ``adapter_out``:
    save the trained adapter's (A, B, scaling) there (the yardstick of the controls' scales)."""
    from orthoreg import HarmfulDirections
    from orthoreg.baselines import interleave

    from .aligned import load_aligned
    from .defence_subspaces import build_subspaces, lora_tensors, random_subspaces, save_adapter
    from .finetune import HARM_SIGNAL_EVERY, FrozenBase, add_lora, schedule, train_lora
    from .model import machine_record, set_threads
    from .task_eval import (
        FRAMINGS,
        evaluate_capability,
        evaluate_framed_safety,
        evaluate_safety,
        evaluate_task,
        general_probe,
        safety_sets,
    )
    from .tasks import build_task, encode_task

    set_threads(threads)
    t0 = time.perf_counter()
    model, tokenizer = load_aligned(base_folder)
    info = json.loads(open(f"{base_folder}/aligned_info.json").read())
    answers = json.loads(open(answers_path).read())
    task = build_task(job.task, answers, seed=config.data_seed)
    examples = encode_task(tokenizer, task, config.max_length)
    subspaces = None
    name = reader_set(job.arm) or ("harmful_post" if job.arm == "hard_projection" else SWAPPED_V_ARMS.get(job.arm))
    if job.arm == "recommended_random_seed":  # a fresh frame per seed, shaped like the generic V's modules
        subspaces = random_subspaces(build_subspaces("builtin_harmless_post", model, tokenizer, info, base_folder,
                                                     k=job.k), seed=job.seed)
    elif name is not None:
        subspaces = build_subspaces(name, model, tokenizer, info, base_folder, task_prompts=[t.prompt for t in task.train],
                                    task_name=job.task, k=job.k)
    directions = HarmfulDirections.load(directions_path)
    if job.arm == "interleave":
        # the same number of examples as plain (steps × batch), a fraction of them from the safety tune; train_lora
        # then shuffles this one epoch by the seed
        ordered = schedule(examples, config.steps, config.batch_size, job.seed)
        n_task = round(len(ordered) * (1 - job.weight))
        examples = interleave(ordered[:n_task], safety_examples(tokenizer, info, config.max_length), job.weight,
                              seed=job.seed, replacement=True)
    callbacks, wrap = _callbacks_and_wrap(job, subspaces, directions, tokenizer)
    full = job.arm in FULL_ARMS
    if full:  # every weight trains; the base is kept for the judge and the capability read
        frozen = FrozenBase(model)
        model.requires_grad_(True)
        tuned = model
    else:
        tuned = add_lora(model, seed=job.seed, r=config.rank, alpha=config.alpha)
    trained = wrap(tuned) if wrap is not None else tuned
    report = train_lora(trained, tokenizer, examples, steps=config.steps, batch_size=config.batch_size,
                        lr=FULL_FINETUNE_LR if full else config.lr, seed=job.seed, callbacks=callbacks,
                        harm_signal_every=HARM_SIGNAL_EVERY)
    tuned.eval()
    if full:  # the judge and the capability read take the base from the weights kept before training
        frozen.attach()
    elif adapter_out:
        save_adapter(lora_tensors(tuned), adapter_out)
    sets = safety_sets(config.eval_per_activity, config.data_seed)
    safety = evaluate_safety(tuned, tokenizer, sets, ppl_limit=ppl_limit, max_new_tokens=config.safety_tokens)
    task_result = evaluate_task(tuned, tokenizer, task, max_new_tokens=config.task_tokens)
    capability = evaluate_capability(tuned, tokenizer, task, general_probe(answers))
    conditional = {f: evaluate_framed_safety(tuned, tokenizer, sets, f, max_new_tokens=config.safety_tokens)
                   for f in FRAMINGS}
    in_subspace = None
    if subspaces is not None and not full:  # the share of each trained A_m in span(V_m): ‖A Vᵀ‖_F / ‖A‖_F, max, mean
        fractions = [float((a.double() @ subspaces[n].double().T).norm() / a.double().norm().clamp_min(1e-30))
                     for n, (a, _, _) in lora_tensors(tuned).items() if n in subspaces]
        in_subspace = {"max": max(fractions), "mean": sum(fractions) / len(fractions)}
    penalty_logs = {k: v for e in report.logs for k, v in e.items() if "/" in k}  # the last logged value per key
    from orthoreg.firewall import MarginGuardCallback

    guard = next((c.history for c in callbacks if isinstance(c, MarginGuardCallback)), None)
    return {
        "task": job.task, "arm": job.arm, "seed": job.seed, "lr": FULL_FINETUNE_LR if full else config.lr,
        "strength": job.strength, "scale": job.scale,
        "weight": job.weight, "key": job.key, "safety": safety, "task_metric": task_result, "capability": capability,
        "conditional": conditional,
        "losses": report.losses, "penalty_logs": penalty_logs, "a_in_subspace": in_subspace, "cpu_per_step": report.cpu_per_step,
        "wall_per_step": report.wall_per_step, "train_seconds": report.wall_total,
        "total_seconds": time.perf_counter() - t0, "harm_signal": report.harm_signal, "machine": machine_record(),
        **({"guard": guard} if guard is not None else {}),
    }
