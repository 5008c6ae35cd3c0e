"""The benchmark pipeline after the aligned base: directions, layer choice by ablation, fine-tune arms, evaluation.

**Directions** come from the aligned base with ``orthoreg.extract_directions`` on the *train* split of orthoreg's
built-in contrast set (``load_builtin("train")``; separation measured on ``load_builtin("test")``): difference of
means at the last prompt token, at every candidate layer.

**Layer choice by ablation effect.** For each candidate layer ℓ the direction is ablated from that layer's output
(h ← h − (h·u)u at every position, prompt and generated tokens) while the aligned base answers probe prompts (the
harmful *safety-tune* requests — never the held-out evaluation requests); a layer's effect is how far its ablation
lowers the refusal rate. The ``guard_layers`` layers with the largest effect are guarded. Why not the best
separating layers: in the prototype the layer that separated best (15) did nothing when ablated, while ablating the
layer-10 direction cut refusal from 83% to 27% — separation says where harmfulness is *readable*, ablation says
where refusal *depends* on it.

**Arms** (every arm: the same aligned base, a fresh LoRA adapter seeded by the run's seed, the same task examples in
the same order, the same steps and learning rate; only the defence differs):

- ``plain``: no defence;
- ``orthoreg``: ``OrthoRegCallback`` projection penalty on the chosen layers' refusal directions, paired anchor
  (‖U(h − h_ref)‖², h_ref = the same model with the adapter disabled), ``mask="labels"``: the reply and the decision
  token (``orthoreg_mask="prompt_end"``: the decision token only, as in the issue's prototype);
- ``orthoreg_mean``: the same with the library's default ``base_mean`` anchor (‖Uh − r‖²);
- ``placebo``: ``orthoreg``'s exact penalty on random unit directions at the same layers;
- ``kl``: ``KLToBaseCallback`` (KL to the adapter-disabled model); ``ldifs``: ``LDIFSCallback`` (feature distance
  to it at the guarded layers); ``caft``: ``CAFTCallback`` (the refusal directions ablated during training);
- ``interleave``: a fraction of the training examples are the safety tune's own data — refusals and the harmless
  answers, 1:2 (``orthoreg.baselines.interleave``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import data as D
from .detect import is_refusal
from .evaluate import EvalSets, evaluate
from .finetune import add_lora, train_lora
from .hyperparams import FinetuneHyperparams
from .model import encode_example, generate

ARMS = ("plain", "orthoreg", "orthoreg_mean", "placebo", "kl", "ldifs", "caft", "interleave")


@dataclass
class BenchConfig(FinetuneHyperparams):
    """Everything a fine-tune arm and its evaluation depend on (one object, saved in the results JSON).

    The fine-tune (the same for every arm): ``FinetuneHyperparams``' fields (steps 50 × batch 8, lr 5e-4, LoRA
    r 16 / alpha 32), with 48-token examples, ``n_task_train`` task examples drawn with ``data_seed``. The other
    fields are grouped and commented below: evaluation, directions, defences.
    """

    # fine-tune (same for every arm): FinetuneHyperparams' fields, with shorter examples
    max_length: int = 48
    n_task_train: int = 600
    data_seed: int = 0
    # evaluation
    eval_per_activity: int = 2  # 24 held-out activities × 2 forms = 48 harmful + 48 matched harmless requests
    n_task_eval: int = 36
    safety_tokens: int = 24
    task_tokens: int = 12
    # directions
    candidate_layers: tuple[int, ...] = (4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 29)
    guard_layers: int = 2  # how many layers the ablation scan picks (when ``guarded`` is not given)
    guarded: tuple[int, ...] | None = None  # the guarded layers (set by the driver from the scan, or by hand)
    probe_prompts: int = 32
    probe_tokens: int = 6
    # defences
    orthoreg_weight: float = 0.02
    # Tokens the orthoreg penalty sees: "labels" = the reply + the decision token (the last prompt token, labelled,
    # see label_decision_token); "prompt_end" = the decision token only (where refusal is decided and where the
    # directions were read with pooling="last"), as in the prototype. Neither sees the attention sink. The
    # committed 3-seed run used "labels"; "prompt_end" was explored on single seeds and did no better than the
    # placebo (README_smollm2.md), so the default stays "labels".
    orthoreg_mask: str = "labels"
    # Whether the training examples label the decision token too (model.encode_example); ``None``: exactly when
    # orthoreg_mask is "labels" (where it puts the decision token under the penalty). It must be off with
    # "prompt_end": that mask selects the token before the first label, which would then be the token *before* the
    # decision token. The encoding is shared by every arm of a run (the near-zero loss of a labelled decision token
    # dilutes the mean loss of 4.8-token replies by ~17%, so arms compared with each other must share it).
    label_decision_token: bool | None = None
    ldifs_mask: str = "labels"  # LDIFS feature distance on the labelled tokens (the reply; + the decision token
    # when label_decision_token) — never the attention sink
    kl_weight: float = 0.3  # a first run at 0.1 (KL ≈ 0.7/token, λ·KL ≈ 0.07) barely changed anything
    ldifs_weight: float = 0.0002  # ‖h − h_ref‖² over the 576 dims (≈ 280 summed over 2 layers at λ = 0.001, which
    # held the task at 19% exact match against 56% plain)
    interleave_fraction: float = 0.1

    def __post_init__(self):
        if self.orthoreg_mask == "prompt_end" and self.label_decision_token:
            raise ValueError("orthoreg_mask='prompt_end' needs label_decision_token=False: with the decision token "
                             "labelled, the mask would select the token before it")

    @property
    def decision_token_labelled(self) -> bool:
        if self.label_decision_token is None:
            return self.orthoreg_mask == "labels"
        return bool(self.label_decision_token)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "decision_token_labelled": self.decision_token_labelled}


# ----------------------------------------------------------------------------------------------- directions


class _Ablate:
    """Forward hooks that remove u's component from chosen decoder layers' outputs (any mode, any position)."""

    def __init__(self, model: nn.Module, vectors: dict[int, torch.Tensor]):
        from orthoreg.core.capture import find_decoder_stack

        stack = find_decoder_stack(model)
        self.handles = [stack.layers[i].register_forward_hook(self._hook(u)) for i, u in vectors.items()]

    @staticmethod
    def _hook(u: torch.Tensor):
        u = u / u.norm()

        def hook(module, args, output):
            h = output if isinstance(output, torch.Tensor) else output[0]
            uu = u.to(h.device, torch.float32)
            new = (h.float() - (h.float() @ uu).unsqueeze(-1) * uu).to(h.dtype)
            return new if isinstance(output, torch.Tensor) else (new, *output[1:])

        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def decision_projections(model: nn.Module, tokenizer: Any, prompts: Sequence[str], directions: Any,
                         batch_size: int = 48) -> dict[int, float]:
    """Mean over ``prompts`` of u_ℓ · h_ℓ at the decision token (the last prompt token), for every layer of
    ``directions`` — where the request sits on each refusal direction. Comparing a fine-tuned model with its base
    tells whether the fine-tune moved harmful requests along the direction (what a projection penalty can prevent)
    or left them in place and changed what the later layers do with them."""
    from orthoreg.core.capture import find_decoder_stack

    from .model import autocast, chat_prompt

    stack = find_decoder_stack(model)
    sums = {i: 0.0 for i in directions.layers}
    captured: dict[int, torch.Tensor] = {}
    hooks = [stack.layers[i].register_forward_hook(
        lambda m, a, o, i=i: captured.__setitem__(i, (o if isinstance(o, torch.Tensor) else o[0])[:, -1].float()))
        for i in directions.layers]
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [chat_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            with autocast(True):
                model(**enc, use_cache=False)
            for i in directions.layers:
                sums[i] += float((captured[i] @ directions[i][0].float()).sum())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {i: v / max(len(prompts), 1) for i, v in sums.items()}


def direction_shift(peft_model: nn.Module, tokenizer: Any, sets: EvalSets, directions: Any) -> dict[str, Any]:
    """Decision-token projections of the held-out harmful and harmless requests, base (adapter disabled) vs
    fine-tuned, per layer; and the harmful−harmless gap of each (how well the layer still tells them apart)."""
    harmful = [r.prompt for r in sets.harmful]
    harmless = [r.prompt for r in sets.harmless]
    with peft_model.disable_adapter():
        base_h = decision_projections(peft_model, tokenizer, harmful, directions)
        base_b = decision_projections(peft_model, tokenizer, harmless, directions)
    tuned_h = decision_projections(peft_model, tokenizer, harmful, directions)
    tuned_b = decision_projections(peft_model, tokenizer, harmless, directions)
    return {str(i): {"base_harmful": base_h[i], "base_harmless": base_b[i], "tuned_harmful": tuned_h[i],
                     "tuned_harmless": tuned_b[i], "base_gap": base_h[i] - base_b[i],
                     "tuned_gap": tuned_h[i] - tuned_b[i]} for i in directions.layers}


def refusal_rate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> float:
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=len(prompts))
    return sum(is_refusal(a) for a in answers) / max(len(answers), 1)


def probe_prompts(n: int, seed: int = 0) -> list[str]:
    """Harmful *safety-tune* requests (never evaluation ones), one per activity first, for the ablation scan."""
    harmful, _ = D.harm_requests("train", per_activity=2, seed=seed)
    firsts = harmful[::2] + harmful[1::2]
    return [r.prompt for r in firsts[:n]]


def extract_and_select(model: nn.Module, tokenizer: Any, config: BenchConfig, log=print) -> tuple[Any, dict]:
    """(HarmfulDirections at every candidate layer, info) — info holds the separation, the ablation scan, the chosen
    layers and timings."""
    from orthoreg import extract_directions
    from orthoreg.core.prompts import load_builtin

    t0 = time.perf_counter()
    directions = extract_directions(
        model, tokenizer, load_builtin("train"), layers=list(config.candidate_layers), k=1, method="diff_means",
        pooling="last", heldout=load_builtin("test"), progress=False, batch_size=32,
    )
    t_extract = time.perf_counter() - t0
    prompts = probe_prompts(config.probe_prompts, config.data_seed)
    t1 = time.perf_counter()
    base_rate = refusal_rate(model, tokenizer, prompts, config.probe_tokens)
    scan = {}
    for layer in directions.layers:
        with _Ablate(model, {layer: directions[layer][0]}):
            scan[layer] = refusal_rate(model, tokenizer, prompts, config.probe_tokens)
        log(f"[directions] ablate layer {layer:2d}: refusal {base_rate:.0%} → {scan[layer]:.0%} "
            f"(d' {directions.metadata['separation'][str(layer)]['d_prime']:.2f})")
    # Largest drop first; ties broken by the held-out separation.
    sep = {int(k): v.get("d_prime") or 0.0 for k, v in directions.metadata["separation"].items()}
    ranked = sorted(directions.layers, key=lambda i: (scan[i], -sep[i]))
    chosen = sorted(ranked[: config.guard_layers])
    info = {
        "candidate_layers": list(directions.layers),
        "separation": directions.metadata["separation"],
        "probe_refusal": base_rate,
        "ablation_refusal": {str(k): v for k, v in scan.items()},
        "chosen_layers": chosen,
        "best_separating_layer": max(sep, key=sep.get),
        "seconds": {"extract": t_extract, "ablation_scan": time.perf_counter() - t1},
    }
    return directions, info


def subset(directions: Any, layers: Sequence[int]) -> Any:
    from orthoreg import HarmfulDirections

    return HarmfulDirections({i: directions[i] for i in layers}, metadata=dict(directions.metadata))


def random_directions(like: Any, seed: int) -> Any:
    """Placebo: one random unit direction per layer of ``like`` (seeded), same metadata shape."""
    from orthoreg import HarmfulDirections

    g = torch.Generator().manual_seed(10_000 + seed)
    vecs = {i: torch.randn(1, like.hidden_size, generator=g) for i in like.layers}
    meta = {**like.metadata, "method": "random (placebo)"}
    return HarmfulDirections(vecs, metadata=meta)


# ----------------------------------------------------------------------------------------------- arms


def task_training_examples(tokenizer: Any, config: BenchConfig) -> list[dict[str, list[int]]]:
    return [encode_example(tokenizer, t.prompt, t.answer, config.max_length,
                           label_decision_token=config.decision_token_labelled)
            for t in D.task_examples("train", config.n_task_train, seed=config.data_seed)]


def aligned_examples(tokenizer: Any, aligned_folder: str | os.PathLike, config: BenchConfig) -> list[dict]:
    """The interleaving baseline's aligned data: the safety tune's own mix — harmful safety-tune requests with their
    refusals and harmless ones with the shipped model's answers (stored with the aligned base), 1:2. Interleaving
    refusals alone made the model refuse 94% of the held-out harmless requests in a first run: the refusals then
    teach "refuse requests of this form" rather than "refuse harmful requests"."""
    from .aligned import AlignConfig, aligned_info

    info = aligned_info(aligned_folder)
    align = AlignConfig(**info["config"])
    harmful, _ = D.harm_requests("train", per_activity=align.harmful_per_activity, seed=align.seed)
    flag = config.decision_token_labelled
    out = [encode_example(tokenizer, r.prompt, D.refusal_for(r, align.seed), config.max_length + 32,
                          label_decision_token=flag) for r in harmful]
    out += [encode_example(tokenizer, t["prompt"], t["answer"], config.max_length + 32, close=t["finished"],
                           label_decision_token=flag) for t in info["harmless_targets"]]
    return out


def arm_callbacks(arm: str, config: BenchConfig, guarded: Any, seed: int) -> list[Any]:
    """The Trainer callbacks of one arm (``guarded``: HarmfulDirections at the chosen layers)."""
    from orthoreg import OrthoRegCallback, OrthoRegConfig
    from orthoreg.baselines import CAFTCallback, KLToBaseCallback, LDIFSCallback

    if arm in ("plain", "interleave"):
        return []
    if guarded is None:
        raise ValueError(f"arm {arm!r} needs harmful directions")
    layers = list(guarded.layers)
    if arm in ("orthoreg", "orthoreg_mean", "placebo"):
        anchor = "base_mean" if arm == "orthoreg_mean" else "paired"
        directions = random_directions(guarded, seed) if arm == "placebo" else guarded
        cfg = OrthoRegConfig(layers=layers, proj_weight=config.orthoreg_weight, anchor=anchor,
                             mask=config.orthoreg_mask)
        return [OrthoRegCallback(cfg, directions=directions)]
    if arm == "kl":
        return [KLToBaseCallback(config.kl_weight)]
    if arm == "ldifs":
        return [LDIFSCallback(config.ldifs_weight, layers=layers, mask=config.ldifs_mask)]
    if arm == "caft":
        return [CAFTCallback(guarded)]
    raise ValueError(f"unknown arm {arm!r}; choose from {ARMS}")


def run_arm(aligned_folder: str, directions_path: str | None, arm: str, seed: int, config: BenchConfig,
            threads: int | None = 1, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """One fine-tune of the aligned base and its evaluation; returns a JSON-ready row. ``directions_path`` holds
    the directions of every candidate layer; the arm guards ``config.guarded``. ``overrides`` replaces BenchConfig
    fields for this arm only (e.g. ``orthoreg_weight`` or ``guarded``) and is recorded in the row."""
    from orthoreg import HarmfulDirections

    from .aligned import load_aligned
    from .model import set_threads

    set_threads(threads)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    t0 = time.perf_counter()
    model, tokenizer = load_aligned(aligned_folder)
    guarded = directions = None
    if directions_path:
        directions = HarmfulDirections.load(directions_path)
        guarded = subset(directions, list(config.guarded) if config.guarded else directions.layers)
    examples = task_training_examples(tokenizer, config)
    if arm == "interleave":
        from orthoreg.baselines import interleave

        examples = interleave(examples, aligned_examples(tokenizer, aligned_folder, config),
                              config.interleave_fraction, seed=seed)
    peft_model = add_lora(model, seed=seed, r=config.rank, alpha=config.alpha)
    callbacks = arm_callbacks(arm, config, guarded, seed)
    report = train_lora(peft_model, tokenizer, examples, steps=config.steps, batch_size=config.batch_size,
                        lr=config.lr, seed=seed, callbacks=callbacks)
    sets = EvalSets.build(config.eval_per_activity, config.n_task_eval, seed=config.data_seed)
    cpu0 = time.process_time()
    result = evaluate(peft_model, tokenizer, sets, safety_tokens=config.safety_tokens, task_tokens=config.task_tokens)
    eval_cpu = time.process_time() - cpu0
    shift = direction_shift(peft_model, tokenizer, sets, directions) if directions is not None else None
    # The defences' own logged terms (``orthoreg/proj``, ``kl_to_base/kl``, …): their mean over the logging steps.
    logged: dict[str, list[float]] = {}
    for entry in report.logs:
        for k, v in entry.items():
            if "/" in k and isinstance(v, (int, float)):
                logged.setdefault(k, []).append(float(v))
    penalty_logs = {k: sum(v) / len(v) for k, v in logged.items()}
    return {
        "arm": arm, "seed": seed, "overrides": overrides or {},
        **{k: v for k, v in result.to_dict().items() if k != "samples"},
        "samples": result.samples,
        "train_loss_last": report.losses[-1] if report.losses else None,
        "losses": report.losses,
        "penalty_logs": penalty_logs,
        "wall_per_step": report.wall_per_step, "cpu_per_step": report.cpu_per_step,
        "train_seconds": report.wall_total, "eval_seconds": result.seconds, "eval_cpu_seconds": eval_cpu,
        "guarded": list(guarded.layers) if guarded is not None else None,
        "direction_shift": shift,
        "total_seconds": time.perf_counter() - t0,
    }


def evaluate_folder(aligned_folder: str, config: BenchConfig, threads: int | None = 1) -> dict[str, Any]:
    """The aligned base's own metrics (the reference for every arm's rise)."""
    from .aligned import load_aligned
    from .model import set_threads

    set_threads(threads)
    model, tokenizer = load_aligned(aligned_folder)
    sets = EvalSets.build(config.eval_per_activity, config.n_task_eval, seed=config.data_seed)
    result = evaluate(model, tokenizer, sets, safety_tokens=config.safety_tokens, task_tokens=config.task_tokens)
    return result.to_dict()


def directions_key(aligned_folder: str | os.PathLike, config: BenchConfig) -> str:
    fields = {k: getattr(config, k) for k in ("candidate_layers", "guard_layers", "probe_prompts", "probe_tokens",
                                              "data_seed")}
    from orthoreg.core.prompts import load_builtin

    fields["probe"] = probe_prompts(config.probe_prompts, config.data_seed)
    fields["contrast"] = [load_builtin("train").fingerprint(), load_builtin("test").fingerprint()]
    payload = json.dumps({"aligned": Path(aligned_folder).name, **fields}, sort_keys=True, default=list)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]
