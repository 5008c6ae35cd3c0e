"""A tiny config-built Llama and a byte-level BPE tokenizer trained in code, for ``--quick`` runs and tests.

No GGUF and no network: the tokenizer is trained on the benchmark's own text (harm requests, task data, the
built-in contrast prompts) with SmolLM2's special tokens and the benchmark's chat template, and the model is a
randomly initialised 4-layer Llama (hidden size 48). Numbers from it mean nothing; it exercises every code path.
"""

from __future__ import annotations

from typing import Any


def corpus() -> list[str]:
    from orthoreg.core.prompts import load_builtin

    from . import data as D
    from . import natural as N
    from . import task_seeds as S

    texts = []
    for split, templates in (("train", D.TRAIN_TEMPLATES), ("eval", D.EVAL_TEMPLATES)):
        harmful, harmless = D.harm_requests(split, per_activity=len(templates))
        texts += [r.prompt for r in harmful + harmless]
    texts += [p.harmful + " " + p.harmless for p in N.HELDOUT + N.TRAIN]
    texts += [r for rs in N.FITTED_REASONS.values() for r in rs]
    texts += [f"{t.prompt} {t.answer}" for t in D.task_examples("train", 120) + D.task_examples("eval", 30)]
    texts += list(S.QA_TOPICS) + [f"{a} {n} {x}" for a, n, x in S.HOWTO] + [f"{n} {w} {b}" for n, w, _, b in S.CODE]
    builtin = load_builtin("all")
    return texts + list(D.NEUTRAL_TEXT) + builtin.harmful + builtin.harmless


def bpe_tokenizer(vocab_size: int = 600) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .model import CHAT_TEMPLATE, prepare_tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|im_start|>")
    return prepare_tokenizer(tok, CHAT_TEMPLATE)


def tiny_llama(tokenizer: Any, seed: int = 0) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.config._name_or_path = "tiny-llama"
    return model.eval()
