"""Tiny config-built causal LMs of every supported family (no downloads), shared by the tests."""

from __future__ import annotations

import torch
import transformers

# family → (config class name, model class name, config kwargs)
_COMMON = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_COMMON, num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_COMMON, num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_COMMON, num_key_value_heads=2)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_COMMON, num_key_value_heads=2, head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_COMMON, num_key_value_heads=2, head_dim=8)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_COMMON, num_key_value_heads=2)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(_COMMON, num_key_value_heads=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=99, n_embd=32, n_layer=3, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(_COMMON, max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)),
}


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    config_name, model_name, kwargs = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config)


def tiny_tokenizer(vocab_size: int = 99, chat_template: bool = True):
    """A word-level ``PreTrainedTokenizerFast`` built in code: tokens ``w3`` … ``w{vocab-1}`` plus specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<pad>")
    if chat_template:
        tokenizer.chat_template = (
            "{% for m in messages %}{{ m['content'] }} {% if m['role'] == 'assistant' %}</s> {% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{% endif %}"
        )
    return tokenizer


def word_text(g, n: int, vocab_size: int = 99) -> str:
    import torch

    return " ".join(f"w{int(i)}" for i in torch.randint(3, vocab_size, (n,), generator=g))


def random_directions(layers=(1, 2), d: int = 32, k: int = 1, seed: int = 0):
    """Seeded random (k, d) harmful directions per layer (``HarmfulDirections`` orthonormalises them)."""
    from orthoreg import HarmfulDirections

    g = torch.Generator().manual_seed(seed)
    return HarmfulDirections({i: torch.randn(k, d, generator=g) for i in layers})
