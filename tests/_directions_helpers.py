"""Tiny models, tokenizers and prompt sets built in code, shared by the directions/extraction/audit tests.

The planted model: a seeded tiny Llama whose blocks write only small updates into the residual stream (their
output projections are scaled down), and whose vocabulary has paired "activity" words ``b<i>`` (harmless) and
``h<i>`` (harmful) with emb(h<i>) = emb(b<i>) + ALPHA · v_{group(i)}. A harmful prompt and its harmless pair differ
in one token whose embedding differs by exactly ALPHA · v; the blocks add only small, nearly linear changes, so the
harmful-vs-harmless difference at every layer lies (almost) along the planted v's.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

N_ACTIVITIES = 12
FILLER = ["please", "explain", "how", "to", "do", "the", "thing", "now", "a", "short", "story", "about", "my",
          "friend", "and", "write", "list", "reply", "user", "assistant", ":"]
WORDS = ["[PAD]", "[UNK]", "<s>", "</s>"] + FILLER + [f"b{i}" for i in range(N_ACTIVITIES)] + \
    [f"h{i}" for i in range(N_ACTIVITIES)]
ALPHA = 1.0
BLOCK_SCALE = 0.1
FORMS = [
    "please explain how to {x}",
    "write a short story about {x}",
    "how to do {x} now",
    "explain the thing about {x} to my friend",
    "write a list about {x} and the thing",
    "reply to my friend about {x}",
]
SIMPLE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def make_tokenizer(pad: bool = True, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``WORDS`` (ids < 99), with BOS added to every encoding."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import processors

    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    kwargs = {"unk_token": "[UNK]", "bos_token": "<s>", "eos_token": "</s>"}
    if pad:
        kwargs["pad_token"] = "[PAD]"
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    if chat_template:
        tok.chat_template = chat_template
    return tok


def tiny_config(**overrides) -> LlamaConfig:
    kwargs = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=37, vocab_size=99, max_position_embeddings=64, pad_token_id=0,
                  bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def planted_vectors(k: int, d: int = 32, seed: int = 1) -> torch.Tensor:
    """k random unit vectors (not orthogonalised: recovery must not rely on the planted set being orthonormal)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(k, d, generator=g)
    return v / v.norm(dim=1, keepdim=True)


def planted_model(k: int = 1, seed: int = 0, **config) -> tuple[LlamaForCausalLM, torch.Tensor]:
    """The planted tiny Llama (see module docstring) and its (k, d) planted vectors; activity i uses v_{i mod k}."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**config)).eval()
    v = planted_vectors(k, model.config.hidden_size, seed=seed + 1)
    vocab = {w: i for i, w in enumerate(WORDS)}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(BLOCK_SCALE)
            layer.mlp.down_proj.weight.mul_(BLOCK_SCALE)
        emb = model.model.embed_tokens.weight
        for i in range(N_ACTIVITIES):
            emb[vocab[f"h{i}"]] = emb[vocab[f"b{i}"]] + ALPHA * v[i % k]
    return model, v


def planted_prompts(n_activities: int = N_ACTIVITIES) -> tuple[list[str], list[str], list[str]]:
    """Paired prompts: every form × activity, harmful with ``h<i>``, harmless with ``b<i>``; plus categories."""
    harmful, harmless, categories = [], [], []
    for i in range(n_activities):
        for form in FORMS:
            harmful.append(form.format(x=f"h{i}"))
            harmless.append(form.format(x=f"b{i}"))
            categories.append(f"group{i % 3}")
    return harmful, harmless, categories


def principal_angles_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees) between the row spaces of a (k, d) and b (k, d)."""
    qa = torch.linalg.qr(a.double().T).Q
    qb = torch.linalg.qr(b.double().T).Q
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cosines))


def save_planted_assets(root, task_rows: list[dict], categories: bool = True):
    """The CLI tests' files under ``root``: the planted model + chat tokenizer (``model/``), the paired prompts
    (``pairs.jsonl``, with their categories when ``categories``) and ``task.jsonl`` of ``task_rows``."""
    import json

    model, _ = planted_model(1)
    tok = make_tokenizer(chat_template=SIMPLE_TEMPLATE)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    harmful, harmless, names = planted_prompts(6)
    with open(root / "pairs.jsonl", "w") as fh:
        for h, b, c in zip(harmful, harmless, names, strict=True):
            fh.write(json.dumps({"harmful": h, "harmless": b, **({"category": c} if categories else {})}) + "\n")
    with open(root / "task.jsonl", "w") as fh:
        for row in task_rows:
            fh.write(json.dumps(row) + "\n")
    return root


def run_subcommand(module, argv):
    """Runs one ``orthoreg`` subcommand module's parser and ``run`` on ``argv``, as the CLI dispatches it."""
    import argparse

    parser = argparse.ArgumentParser(prog="orthoreg")
    module.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    assert args.func is module.run
    return module.run(args)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models are dominated by per-op threading overhead: one intra-op thread is 10-50x faster on a busy CPU.
    Imported into each test module (autouse there); the previous thread count is restored after every test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
