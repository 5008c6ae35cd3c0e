"""Pooled activations of decoder layers, streamed batch by batch under forward hooks (extraction's data path).

Pooling: ``"last"`` takes the last prompt token (with a chat template, the last token of the generation prompt —
the position refusal-direction work reads); ``"mean"`` averages over all tokens of the (templated) prompt. Batches
are right-padded and padded positions are masked out; the forward stops at the deepest needed layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .capture import layer_hidden
from .prompt_encoding import ExtractionError


class StopForward(Exception):
    """Raised by the hook on the deepest needed layer: later layers and the LM head are never computed."""


@dataclass
class PromptItem:
    ids: list[int]
    side: int  # 0 = harmful, 1 = harmless
    index: int  # position in its own list (the pair index for paired sets)
    category: int  # harm category index, -1 for harmless prompts or unknown


def collate(items: Sequence[PromptItem], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(item.ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, : len(item.ids)] = torch.tensor(item.ids, dtype=torch.long)
        attention_mask[row, : len(item.ids)] = 1
    return input_ids.to(device), attention_mask.to(device)


# ----------------------------------------------------------------------------------------------- streaming


def input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def stream_pooled(
    model: nn.Module,
    layer_modules: dict[int, nn.Module],
    batches: Sequence[Sequence[PromptItem]],
    *,
    pooling: str,
    pad_id: int,
    on_batch: Callable[[Sequence[PromptItem], dict[int, torch.Tensor]], None],
    progress: bool,
    desc: str,
) -> None:
    """Runs ``model`` over ``batches`` and hands each batch's pooled activations (B, d) per layer to
    ``on_batch`` (float32). Hooks are removed and the train/eval mode restored however this exits."""
    from tqdm.auto import tqdm

    device = input_device(model)
    deepest = max(layer_modules)
    state: dict[str, torch.Tensor] = {}
    pooled: dict[int, torch.Tensor] = {}

    def hook(layer: int, module: nn.Module, args: Any, output: Any) -> None:
        h = layer_hidden(output)  # (B, T, d)
        mask = state["mask"].to(h.device)
        if pooling == "last":
            last = mask.sum(dim=1) - 1  # right padding: the last real token of each row
            vec = h[torch.arange(h.shape[0], device=h.device), last].float()
        else:
            weights = mask.to(torch.float32).unsqueeze(-1)
            vec = (h.float() * weights).sum(dim=1) / weights.sum(dim=1)
        pooled[layer] = vec  # float32; the accumulators promote to float64 on their own device
        if layer == deepest:
            raise StopForward

    handles = [module.register_forward_hook(lambda m, a, o, i=i: hook(i, m, a, o)) for i, module in layer_modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
                input_ids, attention_mask = collate(batch, pad_id, device)
                state["mask"] = attention_mask.bool()
                pooled.clear()
                try:
                    model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                except StopForward:
                    pass
                missing = set(layer_modules) - set(pooled)
                if missing:
                    raise ExtractionError(f"decoder layers {sorted(missing)} did not run during the forward pass")
                on_batch(batch, pooled)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

