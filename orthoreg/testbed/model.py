"""The testbed's tiny Llama: its config, deterministic pretraining on the world, and the shipped base.

The shipped base lives in ``orthoreg/testbed/assets/`` (config.json, model.safetensors, tokenizer
files, base_card.json) and is regenerated bit-for-bit by ``scripts/make_testbed_base.py``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from . import world
from .tokenizer import build_tokenizer

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def tiny_llama_config(tokenizer) -> LlamaConfig:
    """Hidden 128, 4 layers, 4 heads, MLP 384: about 0.89M parameters for the 169-word vocabulary."""
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def init_model(tokenizer, seed: int) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama; the init draws from a forked RNG, so the caller's global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_llama_config(tokenizer))


@contextmanager
def deterministic_cpu(threads: int = 1):
    """Fixed thread count and deterministic kernels for the duration; the previous settings are restored.

    CPU reductions are bit-reproducible only for a fixed number of threads, hence the pin."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


@dataclass(frozen=True)
class PretrainConfig:
    """Pretraining settings of the shipped base (``scripts/make_testbed_base.py`` records them in base_card.json).

    One thread: bit-reproducibility needs a fixed thread count, and on a shared 2-core machine a second
    OpenMP thread made these tiny steps several times slower, not faster. The lr follows a linear warm-up over ``warmup_steps`` then a cosine decay to ``min_lr_ratio * lr``.
    The loss is next-token cross-entropy on every non-padding token of whole documents.

    Deliberately not built on ``orthoreg.realbench.hyperparams.FinetuneHyperparams``: this trains every weight
    from scratch (no LoRA rank/alpha), on sampled documents (no example length limit), under a warm-up/cosine
    schedule; only steps, batch_size and lr have the same names, and sharing them would need one frozen base for
    both (this class is frozen, the fine-tune recipes are not) and would move ``seed`` from the head of
    base_card.json's ``pretrain`` record.
    """

    seed: int = 0
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    threads: int = 1
    world_config: world.WorldConfig = field(default_factory=world.WorldConfig)


def _lr_factor(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def document_batch(tokenizer, docs: list[world.Document]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` and ``labels`` (= ids, -100 on padding) for whole documents."""
    enc = tokenizer([world.render(d.episodes) for d in docs], add_special_tokens=False, padding=True,
                    return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def pretrain(cfg: PretrainConfig = PretrainConfig(), log: Callable[[str], None] | None = print,
             log_every: int = 100) -> tuple[LlamaForCausalLM, object, list[dict]]:
    """Pretrain a fresh tiny Llama on world documents; bit-identical for the same ``cfg`` on the same machine.

    Returns ``(model, tokenizer, history)``, the model in eval mode; ``history`` holds the mean loss
    of every ``log_every`` steps. Documents come from ``random.Random(cfg.seed)``, the init from
    ``torch`` seeded with ``cfg.seed`` in a forked RNG.
    """
    tokenizer = build_tokenizer()
    with deterministic_cpu(cfg.threads):
        model = init_model(tokenizer, cfg.seed)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
        rng = random.Random(cfg.seed)
        history, running, t0 = [], 0.0, time.perf_counter()
        for step in range(cfg.steps):
            docs = [world.sample_document(rng, cfg.world_config) for _ in range(cfg.batch_size)]
            batch = document_batch(tokenizer, docs)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            running += loss.item()
            if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
                n = (step % log_every) + 1
                history.append({"step": step + 1, "loss": running / n, "seconds": time.perf_counter() - t0})
                running = 0.0
                if log:
                    log(f"pretrain step {step + 1}/{cfg.steps} loss {history[-1]['loss']:.4f} "
                        f"({history[-1]['seconds']:.0f}s)")
    model.eval()
    return model, tokenizer, history


def save_base(model, tokenizer, out_dir: str | Path) -> None:
    """Write the model (safetensors) and tokenizer files so that ``load_base(out_dir)`` reads them back."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def load_base(path: str | Path = ASSETS_DIR) -> tuple[LlamaForCausalLM, object]:
    """``(model, tokenizer)`` of the shipped base (or of any folder written by ``save_base``), offline, in eval mode.

    Each call returns a new model, so fine-tuning one never changes another."""
    model = LlamaForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    # tokenizer.json rather than AutoTokenizer: transformers 5 writes a tokenizer_config.json
    # ("TokenizersBackend", a list of extra special tokens) that 4.x cannot read.
    tokenizer = build_tokenizer(Path(path) / "tokenizer.json")
    return model.eval(), tokenizer
