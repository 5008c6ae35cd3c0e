"""Batched, seeded sampling of answers, split over the ranks and gathered on rank 0.

Each rank takes every ``world_size``-th prompt, pads its share to the common length (ZeRO-3/FSDP ranks must run the
same number of forward passes; ``synced_gpus`` keeps their decoding steps in lockstep), samples in left-padded batches
with ``torch.manual_seed(seed + global index of the batch's first prompt)``, and the answers are gathered back into
prompt order on rank 0 (other ranks get ``None``). The same seed, prompts and world size give the same answers.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .launch import LaunchInfo


def render_prompt(tokenizer, prompt: str, system: str | None = None) -> tuple[str, bool]:
    """The text fed to the model for one question, and whether special tokens are already in it (chat template)."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
    return (f"{system}\n\n{prompt}" if system else prompt), False


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: list[str],
    *,
    info: LaunchInfo,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    system: str | None = None,
    max_prompt_length: int | None = None,
    progress: bool = True,
    synced_gpus: bool = False,
) -> list[str] | None:
    """One sampled answer per prompt (repeat a prompt to sample it several times); the list on rank 0 only."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    world, rank = max(info.world_size, 1), info.rank
    mine = list(range(rank, len(prompts), world))
    share = math.ceil(len(prompts) / world)
    padded = mine + [mine[-1] if mine else 0] * (share - len(mine))  # equal work on every rank
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: dict[int, str] = {}
    try:
        bar = tqdm(total=len(padded), desc="generate", unit="answer", disable=not (progress and info.is_main))
        for start in range(0, len(padded), batch_size):
            chunk = padded[start:start + batch_size]
            rendered = [render_prompt(tokenizer, prompts[i], system) for i in chunk]
            special = rendered[0][1]
            batch = tokenizer([text for text, _ in rendered], return_tensors="pt", padding=True,
                              add_special_tokens=not special, truncation=max_prompt_length is not None,
                              max_length=max_prompt_length).to(device)
            torch.manual_seed(seed + chunk[0])
            kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
            else:
                kwargs.update(do_sample=False)
            if synced_gpus:
                kwargs["synced_gpus"] = True
            out = model.generate(**batch, **kwargs)
            new_tokens = out[:, batch["input_ids"].shape[1]:]
            for j, i in enumerate(chunk):
                if start + j < len(mine):
                    answers[i] = tokenizer.decode(new_tokens[j], skip_special_tokens=True).strip()
            bar.update(len(chunk))
        bar.close()
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    gathered = gather_to_main(answers, info)
    if gathered is None:
        return None
    merged: dict[int, str] = {}
    for part in gathered:
        merged.update(part)
    return [merged[i] for i in range(len(prompts))]


def gather_to_main(obj, info: LaunchInfo):
    """``[obj of rank 0, obj of rank 1, …]`` on rank 0, ``None`` elsewhere (``[obj]`` when not distributed)."""
    if not info.distributed:
        return [obj]
    import torch.distributed as dist

    box = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, box, dst=0)
    return box
