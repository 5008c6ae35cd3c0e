"""The benchmark's models and inputs: Llama-shaped model specs, the model built from one, its batch, random harmful
directions U_ℓ and random reader subspaces V_m, and its parameter counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

READER_K = 16  # rows of V_m per module (the reader arm)
READER_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelSpec:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    batch: int
    seq: int
    guarded: list[int]
    lengths: list[int]  # real (non-padding) tokens per row; the rest is right padding
    k: int = 4
    lora_r: int = 16
    rope_theta: float = 10000.0

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def selected(self) -> int:
        return sum(self.lengths)


def _lengths(batch: int, seq: int, fractions: list[float]) -> list[int]:
    return [max(2, int(round(seq * fractions[i % len(fractions)]))) for i in range(batch)]


def model_specs(quick: bool) -> dict[str, ModelSpec]:
    pad = [1.0, 1.0, 0.875, 0.75]  # some rows padded, so the token-selection path is exercised
    if quick:
        return {"tiny": ModelSpec("tiny", 32, 4, 4, 2, 64, 128, 2, 16, [0, 1, 2, 3], _lengths(2, 16, [1.0, 0.75]),
                                  k=2, lora_r=4)}
    return {
        "tiny": ModelSpec("tiny", 64, 6, 4, 2, 172, 512, 4, 64, [1, 2, 3, 4], _lengths(4, 64, pad), k=4, lora_r=8),
        # ≥ 30M parameters, d ≥ 512, ≥ 8 layers; N = selected tokens ≥ d so the covariance takes its d×d form
        # (the costlier of the two regimes relative to the model).
        "small": ModelSpec("small", 512, 8, 8, 8, 1376, 8192, 4, 192, [2, 3, 4, 5], _lengths(4, 192, pad),
                           k=4, lora_r=16),
        # Llama-3-8B shape (GPU mode only).
        "llama3-8b": ModelSpec("llama3-8b", 4096, 32, 32, 8, 14336, 128256, 2, 2048, [14, 15, 16, 17],
                               _lengths(2, 2048, [1.0, 0.875]), k=4, lora_r=16, rope_theta=500000.0),
    }


def build_model(spec: ModelSpec, mode: str, checkpointing: bool, device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=max(spec.seq, 64), rope_theta=spec.rope_theta, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # built in place in its dtype: the 8B shape never exists in float32
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.config.use_cache = False
    if checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5.23
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=spec.lora_r, lora_alpha=2 * spec.lora_r, lora_dropout=0.0, init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ))
    model.train()
    return model


def make_batch(spec: ModelSpec, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, spec.vocab_size, (spec.batch, spec.seq), generator=g)
    mask = torch.zeros(spec.batch, spec.seq, dtype=torch.long)
    for row, n in enumerate(spec.lengths):
        mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def make_directions(spec: ModelSpec, seed: int = 0):
    from orthoreg.directions.harmful import HarmfulDirections

    g = torch.Generator().manual_seed(seed + 1)
    return HarmfulDirections({i: torch.randn(spec.k, spec.hidden_size, generator=g) for i in spec.guarded},
                             metadata={"source": "bench_overhead random directions"})


def make_input_subspaces(model, k: int = READER_K, seed: int = 0):
    """``InputSubspaces`` of k random orthonormal rows for every ``READER_MODULES`` linear module of every layer (the
    reader arm's V_m; module names as in the base model, so they fit it bare or PEFT-wrapped)."""
    from orthoreg.core.layers import in_width
    from orthoreg.reader.subspaces import InputSubspaces, named_input_modules

    g = torch.Generator().manual_seed(seed + 2)
    bases = {}
    for name, module in named_input_modules(model).items():
        if name.rsplit(".", 1)[-1] in READER_MODULES:
            d_in = in_width(module)
            bases[name] = torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=torch.float64)).Q.T.float()
    return InputSubspaces(bases, metadata={"source": "bench_overhead random orthonormal rows", "k": k})


def count_params(model) -> dict[str, int]:
    from orthoreg.core.capture import find_decoder_stack

    stack = find_decoder_stack(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embed = stack.lm.get_input_embeddings().weight.numel()
    return {"total": total, "trainable": trainable, "matmul": total - embed}
