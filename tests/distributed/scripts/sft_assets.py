"""A tiny model folder and dataset on disk for the ``orthoreg sft`` tests (one process and two ranks).

The model is a config-built ``LlamaForCausalLM`` saved with ``save_pretrained``; its tokenizer is a byte-level BPE
trained in code on orthoreg's built-in contrast prompts (so the built-in extraction sees real, distinct tokens) with
a small chat template; the dataset is ``train.jsonl`` of prompt/completion rows in a folder, as ``load_dataset``
reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

NUM_LAYERS = 3
HIDDEN = 32
QA = [
    ("What is the capital of France?", "Paris."),
    ("How many legs does a spider have?", "Eight."),
    ("What colour is the sky on a clear day?", "Blue."),
    ("Which planet is closest to the sun?", "Mercury."),
    ("What is two plus three?", "Five."),
    ("What do bees make?", "Honey."),
    ("What is frozen water called?", "Ice."),
    ("How many days are in a week?", "Seven."),
]


def write_tiny_sft_assets(root: str | Path, n_rows: int = 32) -> dict[str, str]:
    """Writes ``root/model`` (weights + tokenizer) and ``root/data/train.jsonl``; returns their paths."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orthoreg.recipes_lib.models import train_bpe_tokenizer

    root = Path(root)
    tokenizer = train_bpe_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=37,
                         num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": QA[i % len(QA)][0], "completion": " " + QA[i % len(QA)][1]} for i in range(n_rows)]
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": str(model_dir), "data": str(data_dir), "data_file": str(data_dir / "train.jsonl")}
