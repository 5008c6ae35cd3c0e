"""Efficacy of orthoreg in the toy emergent-misalignment world: arms, placebos, baselines (issue 7, phase 2).

One *arm* is one fine-tune of the shipped base on a narrow task with one defence (or none), scored with
``orthoreg.testbed.evaluate``. Everything here is built from the library's public pieces: ``OrthoRegCallback``
(projection / covariance), ``KLToBaseCallback``, ``LDIFSCallback``, ``CAFTCallback`` and ``interleave``.

The persona direction (the "harmful direction" of this world) is a difference of means, per decoder layer, of the
residual stream at the first-answer position of the 36 advice questions asked *after a misaligned episode* (unsafe
code or harmful advice) minus the same questions asked *after an aligned episode* (safe code or helpful advice).
It is the feature the model uses to infer the persona from context; nothing about the fine-tuning task enters it.

Placebo directions are random unit vectors orthogonal (per layer) to the persona direction, of the same (unit)
norm, so a placebo penalty has the same form and λ but guards a direction that carries no persona signal.

Penalty magnitude: every arm records the final logged value of its penalty (unweighted and weighted), so arms can
be compared at matched penalty magnitude rather than at matched λ; and every arm is also scored with one common
yardstick, the *persona drift* of the fine-tuned model, mean over task tokens of (u·h_ft − r_base)² at each layer
(r_base: the base model's mean projection on the same tokens), which is what the anchored projection penalises.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass

import torch
from transformers import TrainerCallback

from ..core.rank_correlation import spearman_rho
from ..directions.harmful import HarmfulDirections
from . import world
from .evaluate import evaluate
from .finetune import finetune
from .model import load_base
from .tokenizer import encode_prompt, encode_task

NUM_LAYERS = 4


# ---------------------------------------------------------------------------------------------- directions
def _layer_outputs(model, sequences: list[list[int]], pad_id: int, positions: str = "last",
                   labels: list[list[int]] | None = None) -> dict[int, torch.Tensor]:
    """Residual stream after every decoder layer: at the last token of each sequence (``positions="last"``, (N, d))
    or at every non-padding token (``"all"``, rows stacked)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = lm.model.layers
    captured: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(module, args, output):
            captured[i] = (output[0] if isinstance(output, tuple) else output).detach().float()
        return fn

    width = max(map(len, sequences))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    last = torch.tensor([len(s) - 1 for s in sequences])
    if positions == "last":
        return {i: h[torch.arange(len(sequences)), last] for i, h in captured.items()}
    keep = mask.bool()
    return {i: h[keep] for i, h in captured.items()}


def persona_contrast(tokenizer, n_contexts: int = 2, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """(misaligned, aligned) prompts: each advice question after one misaligned / one aligned episode."""
    rng = random.Random(seed)
    bad, good = [], []
    for prompt in world.CHAT_PROMPTS:
        for j in range(n_contexts):
            code = j % 2 == 0
            bad.append(encode_prompt(tokenizer, prompt, [world.sample_episode(
                world.UNSAFE if code else world.HARMFUL_CHAT, rng)]))
            good.append(encode_prompt(tokenizer, prompt, [world.sample_episode(
                world.SAFE if code else world.HELPFUL_CHAT, rng)]))
    return bad, good


def persona_directions(model, tokenizer, layers=tuple(range(NUM_LAYERS)), n_contexts: int = 4,
                       seed: int = 0) -> HarmfulDirections:
    """Persona direction per layer (difference of means, k = 1) with its separation in ``metadata``.

    ``metadata["separation"][layer]`` = {"d_prime", "accuracy"}: d' of the projection between the two sides and the
    accuracy of thresholding it at the midpoint, measured on a second, independently drawn contrast set."""
    bad, good = persona_contrast(tokenizer, n_contexts, seed)
    hb, hg = _layer_outputs(model, bad, tokenizer.pad_token_id), _layer_outputs(model, good, tokenizer.pad_token_id)
    dirs = {}
    for layer in layers:
        diff = hb[layer].mean(0) - hg[layer].mean(0)
        dirs[layer] = (diff / diff.norm()).unsqueeze(0)
    # held-out separation
    bad2, good2 = persona_contrast(tokenizer, n_contexts, seed + 1000)
    hb2, hg2 = _layer_outputs(model, bad2, tokenizer.pad_token_id), _layer_outputs(model, good2,
                                                                                      tokenizer.pad_token_id)
    sep = {}
    for layer in layers:
        u = dirs[layer][0]
        pb, pg = hb2[layer] @ u, hg2[layer] @ u
        pooled = math.sqrt(0.5 * (pb.var().item() + pg.var().item())) + 1e-12
        mid = 0.5 * (pb.mean() + pg.mean())
        acc = 0.5 * ((pb > mid).float().mean() + (pg < mid).float().mean()).item()
        sep[str(layer)] = {"d_prime": (pb.mean() - pg.mean()).item() / pooled, "accuracy": acc,
                           "gap_norm": (hb[layer].mean(0) - hg[layer].mean(0)).norm().item()}
    return HarmfulDirections(dirs, metadata={"source_model": "orthoreg-testbed-base", "method": "diff_means",
                                             "pooling": "first answer position", "separation": sep})


def placebo_directions(directions: HarmfulDirections, seed: int = 0) -> HarmfulDirections:
    """Random unit directions, one per layer, orthogonal to that layer's persona direction (same norm: 1)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    out = {}
    for layer in directions.layers:
        u = directions[layer].float()  # (k, d) orthonormal
        g = torch.randn(u.shape[1], generator=gen)
        g = g - u.T @ (u @ g)
        out[layer] = (g / g.norm()).unsqueeze(0)
    return HarmfulDirections(out, metadata={"method": "placebo: random, orthogonal to the persona direction",
                                            "seed": seed})


# ---------------------------------------------------------------------------------------------- arms
@dataclass(frozen=True)
class Arm:
    """One defence. ``kind``: plain | proj | cov | proj_cov | kl | ldifs | caft | interleave.

    ``target``: ``"persona"`` or ``"placebo"`` directions for proj / caft; ``weight`` is λ (λ_proj for proj,
    λ_cov for cov; ``weight2`` is λ_cov of proj_cov); ``fraction`` the aligned share for interleave."""

    name: str
    kind: str = "plain"
    weight: float = 0.0
    weight2: float = 0.0
    layers: tuple[int, ...] = (1, 2, 3)
    anchor: str = "base_mean"
    target: str = "persona"
    fraction: float = 0.0


@dataclass(frozen=True)
class Setting:
    """Training regime: full fine-tuning (``lora_layers=None``) or LoRA on ``lora_layers`` only."""

    name: str = "full_ft"
    task: str = "unsafe_code"
    steps: int = 150
    lr: float = 3e-4
    lora_rank: int | None = None
    lora_layers: tuple[int, ...] | None = None


class EvalAtSteps(TrainerCallback):
    """Scores the model (harmful share, narrow-task accuracy) at given optimizer steps during training: the early
    stopping baseline, read off the plain run's own trajectory."""

    def __init__(self, tokenizer, task: str, steps=(5, 10, 20, 40)):
        self.tokenizer, self.task, self.steps, self.records = tokenizer, task, set(steps), []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps and model is not None:
            m = evaluate(model, self.tokenizer, self.task, n_samples=36)
            self.records.append({"step": state.global_step, "harmful_share": m.harmful_share,
                                 "narrow_task_accuracy": m.narrow_task_accuracy,
                                 "persona_inference_accuracy": m.persona_inference_accuracy})
            model.train()


def _callbacks(arm: Arm, model, dirs: HarmfulDirections, placebo: HarmfulDirections):
    from .. import OrthoRegCallback, OrthoRegConfig
    from ..baselines import CAFTCallback, KLToBaseCallback, LDIFSCallback

    target = dirs if arm.target == "persona" else placebo
    layers = list(arm.layers)
    if arm.kind == "proj":
        return [OrthoRegCallback(OrthoRegConfig(layers=layers, proj_weight=arm.weight, anchor=arm.anchor),
                                 directions=target)]
    if arm.kind == "cov":
        return [OrthoRegCallback(OrthoRegConfig(layers=layers, cov_weight=arm.weight, proj_weight=0.0))]
    if arm.kind == "proj_cov":
        return [OrthoRegCallback(OrthoRegConfig(layers=layers, proj_weight=arm.weight, cov_weight=arm.weight2,
                                                anchor=arm.anchor), directions=target)]
    if arm.kind == "kl":
        return [KLToBaseCallback(arm.weight, reference_model=copy.deepcopy(model).eval())]
    if arm.kind == "ldifs":
        return [LDIFSCallback(arm.weight, layers=layers, reference_model=copy.deepcopy(model).eval())]
    if arm.kind == "caft":
        return [CAFTCallback(target, layers=layers)]
    if arm.kind in ("plain", "interleave"):
        return []
    raise ValueError(f"unknown arm kind {arm.kind!r}")


def _last_logged(log_history: list[dict]) -> dict[str, float]:
    """Last logged value of each penalty metric (orthoreg/*, kl_to_base/*, ldifs/*) and its mean over logs."""
    keys = sorted({k for rec in log_history for k in rec if k.split("/")[0] in ("orthoreg", "kl_to_base", "ldifs")})
    out = {}
    for k in keys:
        vals = [rec[k] for rec in log_history if k in rec]
        if vals:
            out[f"final:{k}"] = float(vals[-1])
            out[f"mean:{k}"] = float(sum(vals) / len(vals))
    return out


def persona_drift(model, base, tokenizer, dirs: HarmfulDirections, task: str, n: int = 64,
                  seed: int = 12345) -> dict[str, float]:
    """Mean over task tokens of (u·h − r)² per layer, r = the base model's mean projection on the same tokens;
    plus the mean *signed* shift of u·h at the first-answer position of the 36 fresh-context advice questions."""
    ex = encode_task(tokenizer, task, n, seed=seed)
    seqs = [e["input_ids"] for e in ex]
    pad = tokenizer.pad_token_id
    hf, hb = _layer_outputs(model, seqs, pad, "all"), _layer_outputs(base, seqs, pad, "all")
    chat = [encode_prompt(tokenizer, p) for p in world.CHAT_PROMPTS]
    cf, cb = _layer_outputs(model, chat, pad), _layer_outputs(base, chat, pad)
    out = {}
    for layer in dirs.layers:
        u = dirs[layer][0]
        r = (hb[layer] @ u).mean()
        out[f"task_drift/layer_{layer}"] = ((hf[layer] @ u - r) ** 2).mean().item()
        out[f"chat_shift/layer_{layer}"] = (cf[layer] @ u - cb[layer] @ u).mean().item()
    return out


def run_arm(arm: Arm, setting: Setting, seed: int, dirs: HarmfulDirections, placebo: HarmfulDirections,
            eval_steps=(), n_samples: int = 504) -> dict:
    """Fine-tune the shipped base under ``arm`` in ``setting``; returns a JSON-ready record."""
    model, tok = load_base()
    base = copy.deepcopy(model).eval()
    lora = None
    if setting.lora_rank:
        from peft import LoraConfig

        lora = LoraConfig(r=setting.lora_rank, lora_alpha=2 * setting.lora_rank, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"],
                          layers_to_transform=list(setting.lora_layers) if setting.lora_layers else None)
    callbacks = _callbacks(arm, model, dirs, placebo)
    probe = EvalAtSteps(tok, setting.task, eval_steps) if eval_steps else None
    if probe:
        callbacks.append(probe)
    extra = ()
    n_examples = None
    task = setting.task
    if arm.kind == "interleave":
        from ..baselines import interleave

        n_task = setting.steps * 16
        task_ex = encode_task(tok, setting.task, round(n_task * (1 - arm.fraction)), seed=seed)
        aligned = encode_task(tok, "helpful_chat", n_task, seed=seed + 777)
        task = interleave(task_ex, aligned, arm.fraction, seed=seed)
    t0 = time.perf_counter()
    res = finetune(model, tok, task, steps=setting.steps, lr=setting.lr, seed=seed, callbacks=callbacks, lora=lora,
                   extra_examples=extra, n_examples=n_examples)
    metrics = evaluate(res.model, tok, setting.task, n_samples=n_samples)
    rec = {"arm": asdict(arm), "setting": asdict(setting), "seed": seed, "train_seconds": res.seconds,
           "wall_seconds": time.perf_counter() - t0, "train_loss": res.train_loss, **metrics.as_dict(),
           "penalty": _last_logged(res.log_history),
           "drift": persona_drift(res.model, base, tok, dirs, setting.task),
           "placebo_drift": persona_drift(res.model, base, tok, placebo, setting.task)}
    if probe:
        rec["checkpoints"] = probe.records
    return rec


def summarize(records: list[dict], base_share: float) -> list[dict]:
    """Mean ± spread (min–max) over seeds per (setting, arm); ``removed`` = share of the plain rise removed."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["setting"]["name"], r["arm"]["name"]), []).append(r)
    plain = {s: sum(x["harmful_share"] for x in rs) / len(rs) for (s, a), rs in groups.items() if a == "plain"}
    rows = []
    for (s, a), rs in groups.items():
        def stat(key, rs=rs):
            v = [x[key] for x in rs if x.get(key) is not None]
            return (sum(v) / len(v), min(v), max(v)) if v else (None, None, None)

        hs = stat("harmful_share")
        pen_keys = [k for k in rs[0]["penalty"] if k.startswith("final:") and k.endswith(("/total",))]
        pen = [sum(x["penalty"].get(k, 0.0) for k in pen_keys) for x in rs] if pen_keys else None
        rise = plain.get(s, None)
        removed = None
        if rise is not None and rise - base_share > 1e-9:
            removed = (rise - hs[0]) / (rise - base_share)
        drift_keys = [k for k in rs[0]["drift"] if k.startswith("task_drift")]
        rows.append({
            "setting": s, "arm": a, "kind": rs[0]["arm"]["kind"], "weight": rs[0]["arm"]["weight"],
            "target": rs[0]["arm"]["target"], "seeds": [x["seed"] for x in rs],
            "harmful_share": hs, "harmful_share_per_seed": [x["harmful_share"] for x in rs],
            "sampled_harmful_rate": stat("sampled_harmful_rate"), "narrow_task_accuracy": stat("narrow_task_accuracy"),
            "persona_inference_accuracy": stat("persona_inference_accuracy"), "fact_accuracy": stat("fact_accuracy"),
            "rise_removed": removed,
            "final_weighted_penalty": (sum(pen) / len(pen)) if pen else None,
            "persona_task_drift": sum(sum(x["drift"][k] for k in drift_keys) for x in rs) / len(rs),
            "train_seconds": sum(x["train_seconds"] for x in rs) / len(rs),
        })
    return rows


def overlap_vs_rise(tasks, steps: int = 100, seed: int = 0, dirs: HarmfulDirections | None = None,
                    n_overlap: int = 64) -> dict:
    """Overlap score (task gradient before training vs the persona direction) and measured rise per narrow task,
    with their Spearman correlation."""
    from ..audit import overlap_score

    model, tok = load_base()
    dirs = dirs or persona_directions(model, tok)
    base_share = evaluate(model, tok, n_samples=36).harmful_share
    out = []
    for task in tasks:
        data = encode_task(tok, task, n_overlap, seed=seed)
        rep = overlap_score(model, dirs, [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in data], tok,
                            mask="labels", progress=False)
        m2, tok2 = load_base()
        res = finetune(m2, tok2, task, steps=steps, seed=seed)
        met = evaluate(res.model, tok2, task, n_samples=36)
        out.append({"task": task, "overlap": rep.overall, "overlap_per_layer": {str(k): v for k, v in
                                                                                rep.per_layer.items()},
                    "harmful_share": met.harmful_share, "rise": met.harmful_share - base_share,
                    "narrow_task_accuracy": met.narrow_task_accuracy})
    return {"base_share": base_share, "steps": steps, "seed": seed, "tasks": out,
            "spearman": spearman([r["overlap"] for r in out], [r["rise"] for r in out])}


def spearman(x, y) -> float | None:
    """Spearman rank correlation (average ranks for ties); None with fewer than 3 points or a constant input."""
    return None if len(x) < 3 else spearman_rho(list(x), list(y))


__all__ = ["Arm", "EvalAtSteps", "Setting", "overlap_vs_rise", "persona_directions", "persona_drift",
           "placebo_directions", "run_arm", "spearman", "summarize"]
