"""Shared builders for the OrthoLoRA tests and their rank scripts: tiny config-built models, LoRA, directions,
batches, and the explicit reference loss ``task + λ·penalties`` computed without OrthoLoRA's hooks."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from orthoreg.core.capture import layer_hidden, resolve_layers
from orthoreg.directions.harmful import HarmfulDirections

hf_logging.set_verbosity_error()  # GPT-2's default bos/eos ids exceed the tiny vocabulary; the warning is noise

VOCAB = 99
HIDDEN = 32


def tiny_llama(seed: int = 0, layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=37, vocab_size=VOCAB, pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2(seed: int = 0, layers: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=HIDDEN, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def lora_llama(seed: int = 0, target_modules=("q_proj", "o_proj", "down_proj"), layers: int = 3, **lora_kwargs):
    """Tiny Llama + LoRA with random B (``init_lora_weights=False``), so every penalty is non-trivial."""
    model = tiny_llama(seed, layers)
    torch.manual_seed(seed + 1)
    kwargs = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **lora_kwargs}
    return get_peft_model(model, LoraConfig(target_modules=list(target_modules), **kwargs))


def lora_gpt2(seed: int = 0, target_modules=("c_attn", "c_proj"), **lora_kwargs):
    model = tiny_gpt2(seed)
    torch.manual_seed(seed + 1)
    kwargs = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "fan_in_fan_out": True, **lora_kwargs}
    return get_peft_model(model, LoraConfig(target_modules=list(target_modules), **kwargs))


def directions(layers=(0, 1, 2), k: int = 2, seed: int = 0, hidden: int = HIDDEN) -> HarmfulDirections:
    gen = torch.Generator().manual_seed(seed)
    return HarmfulDirections({i: torch.randn(k, hidden, generator=gen) for i in layers})


def make_batch(batch: int = 2, seq: int = 6, seed: int = 0, pad: int = 1) -> dict[str, torch.Tensor]:
    """Random tokens; the last ``pad`` positions of row 0 are padding (mask 0, label -100)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        attention_mask[0, seq - pad:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def concat_batches(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in lora_params(model).items()}


def _capture_layers(model, stack_layers, indices, run):
    captured = {}
    hooks = [
        # update() returns None: a forward hook's non-None return value would replace the layer's output.
        stack_layers[i].register_forward_hook(lambda m, a, o, i=i: captured.update({i: layer_hidden(o)}))
        for i in indices
    ]
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return out, captured


def _cov64(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1/d) Σ_{i≠j} C_ij² of the selected rows, C = XcᵀXc/(N−1), in float64 from the definition."""
    x = h.double()[mask]
    n, d = x.shape
    xc = x - x.mean(0, keepdim=True)
    c = xc.T @ xc / max(n - 1, 1)
    return (c.square().sum() - c.diagonal().square().sum()) / d


def explicit_loss(peft_model, batch, config, dirs, writers, base_reference=None, step: int = 0):
    """``task + w(t)·(λ_cov Σ cov + λ_proj Σ proj + λ_lora Σ ‖U ΔW‖²)`` in float64 math written here: hidden states
    from plain forward hooks, ΔW = s·B·A formed explicitly from the modules' weights, no orthoreg penalty function,
    OrthoLoRA or OrthoRegularizer involved. With ``anchor="base_mean"`` and no ``base_reference``, r is this batch's
    own mean of U x (detached): the batch is the calibration batch of a run's first step.

    ``writers`` is a list of (LoraLayer, layer index) pairs to weight-penalise. Returns (total, parts dict).
    """
    from orthoreg.core.capture import find_decoder_stack

    stack = find_decoder_stack(peft_model)
    indices = resolve_layers(config.layers, stack.num_layers)
    out, hidden = _capture_layers(peft_model, stack.layers, indices, lambda: peft_model(**batch))
    mask = batch["attention_mask"].bool()
    if config.mask == "labels":
        mask = mask & (batch["labels"] != -100)
    reference = {}
    if config.anchor == "paired" and config.proj_weight > 0:
        with torch.no_grad(), peft_model.disable_adapter():
            _, reference = _capture_layers(peft_model, stack.layers, indices, lambda: peft_model(**batch))
    cov = proj = torch.zeros((), dtype=torch.float64)
    for i in indices:
        if config.cov_weight > 0:
            cov = cov + _cov64(hidden[i], mask)
        if config.proj_weight > 0 and i in dirs:
            u = dirs[i].double()
            coords = hidden[i].double()[mask] @ u.T
            if config.anchor == "paired":
                coords = coords - reference[i].double()[mask] @ u.T
            elif config.anchor == "base_mean":
                r = coords.detach().mean(0) if base_reference is None else base_reference[i].double()
                coords = coords - r
            if config.one_sided:
                coords = coords.clamp(min=0)
            proj = proj + coords.square().sum(1).mean()
    lora = torch.zeros((), dtype=torch.float64)
    for module, layer in writers:
        delta = module.scaling["default"] * module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double()
        lora = lora + (dirs[layer].double() @ delta).square().sum()
    w = config.warmup_factor(step)
    total = out.loss.double() + w * (config.cov_weight * cov + config.proj_weight * proj + config.lora_weight * lora)
    return total, {"task": out.loss, "cov": cov, "proj": proj, "lora": lora, "logits": out.logits}
