"""The task's feature direction t_ℓ at each layer: where a fine-tuning task pushes (or pushed) the features.

Feature direction of the task at layer ℓ (h_ℓ = output of decoder layer ℓ; N = number of counted tokens, those
selected by ``mask``; the loss L_task = (1/N_lab) Σ_{label tokens} CE is the model's causal-LM loss on the data):

- before training (``mode="gradient"``):  t_ℓ = −(1/N) Σ_{counted tokens} ∂L_task/∂h_ℓ — the direction the first
  gradient steps push the features (the model runs in eval mode, so dropout does not add noise);
- after training (``mode="shift"``):      t_ℓ = (1/N) Σ_{counted tokens} (h_ℓ^fine-tuned − h_ℓ^base).

``orthoreg.audit.overlap`` scores these directions against the harmful directions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..core.activations import StopForward, input_device
from ..core.capture import find_decoder_stack, layer_hidden, token_mask
from ..core.prompt_encoding import model_context_length, pad_token_id
from .task_data import TaskDataError, encode_task_examples, task_batches

__all__ = ["task_features"]


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:]) if isinstance(output, tuple) else [hidden, *output[1:]]


def _gradient_features(model, stack, layers, batches, n_batches, mask_policy, progress):
    from tqdm.auto import tqdm

    first = min(layers)
    captured: dict[int, torch.Tensor] = {}

    def hook(layer: int, module: nn.Module, args: Any, output: Any) -> Any:
        h = layer_hidden(output)
        if layer == first:
            # Cut the graph here: gradients are needed only w.r.t. h_ℓ for ℓ >= first, never w.r.t. parameters, so
            # the backward pass neither touches earlier layers nor needs any parameter to require grad.
            h = h.detach().requires_grad_(True)
            captured[layer] = h
            return _replace_hidden(output, h)
        captured[layer] = h
        return None

    handles = [stack.layers[i].register_forward_hook(lambda m, a, o, i=i: hook(i, m, a, o)) for i in layers]
    sums = {i: torch.zeros(stack.hidden_size, dtype=torch.float64) for i in layers}
    n_tokens, n_labels = 0, 0
    try:
        for batch in tqdm(batches, total=n_batches, desc="task gradient", disable=not progress, unit="batch"):
            captured.clear()
            mask = token_mask(batch, tuple(batch["input_ids"].shape), mask_policy)
            n_tokens += int(mask.sum())  # label-less examples still count in N (their gradient is 0)
            with torch.enable_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits
                targets = batch["labels"][:, 1:].to(logits.device)
                # Σ over label tokens of the next-token cross-entropy; divided by N_lab once all batches are seen.
                ce_sum = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
                )
                n_lab = int((targets != -100).sum())
                if n_lab == 0:
                    continue
                hs = [captured[i] for i in layers]
                grads = torch.autograd.grad(ce_sum, hs, allow_unused=True)
            for i, g in zip(layers, grads, strict=True):
                if g is not None:
                    sums[i] -= g[mask.to(g.device)].to(torch.float64).sum(dim=0).cpu()
            n_labels += n_lab
    finally:
        for handle in handles:
            handle.remove()
    if n_labels == 0:
        raise TaskDataError("no task token carries a label, so there is no task loss to differentiate; check that "
                            "completions are not empty and not truncated away")
    # t_ℓ = −(1/N) Σ ∂(Σ CE / N_lab)/∂h_ℓ; the sums hold −Σ ∂(Σ CE)/∂h_ℓ.
    return {i: s / (n_labels * max(n_tokens, 1)) for i, s in sums.items()}, n_tokens


def _masked_sums(model, stack, layers, batch, mask_policy) -> dict[int, torch.Tensor]:
    deepest, sums = max(layers), {}
    mask = token_mask(batch, tuple(batch["input_ids"].shape), mask_policy)

    def hook(layer: int, module: nn.Module, args: Any, output: Any) -> None:
        h = layer_hidden(output)
        sums[layer] = h[mask.to(h.device)].to(torch.float64).sum(dim=0).cpu()
        if layer == deepest:
            raise StopForward

    handles = [stack.layers[i].register_forward_hook(lambda m, a, o, i=i: hook(i, m, a, o)) for i in layers]
    try:
        with torch.inference_mode():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return sums


def task_features(
    model: nn.Module,
    tokenizer: Any,
    data: Iterable[Any],
    layers: Sequence[int],
    *,
    finetuned: nn.Module | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    mask: Literal["attention", "labels"] = "attention",
    progress: bool = True,
) -> tuple[dict[int, torch.Tensor], int, int]:
    """The task's feature direction t_ℓ (float64, CPU) at each of ``layers`` (formulas in the module docstring).

    Returns:
        `(features, n_examples, n_tokens)`.
    """
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1; got {batch_size!r}")
    stack = find_decoder_stack(model)
    if max_length is None:
        max_length = model_context_length(model)
    encoded = encode_task_examples(tokenizer, data, max_length=max_length)
    layers = sorted(layers)
    device = input_device(model)
    # A generator: one padded batch exists at a time.
    batches = task_batches(encoded, batch_size, pad_token_id(tokenizer) if tokenizer is not None else 0, device)
    n_batches = math.ceil(len(encoded) / batch_size)
    models = [model] + ([finetuned] if finetuned is not None else [])
    modes = [m.training for m in models]
    for m in models:
        m.eval()  # no dropout: the direction of the expected push, not of one noisy step
    try:
        if finetuned is None:
            features, n_tokens = _gradient_features(model, stack, layers, batches, n_batches, mask, progress)
            return features, len(encoded), n_tokens
        tuned_stack = find_decoder_stack(finetuned)
        if (tuned_stack.hidden_size, tuned_stack.num_layers) != (stack.hidden_size, stack.num_layers):
            raise ValueError(
                f"the fine-tuned model ({tuned_stack.num_layers} layers × {tuned_stack.hidden_size}) does not match "
                f"the base model ({stack.num_layers} × {stack.hidden_size}); compare a model with its own fine-tune"
            )
        tuned_device = input_device(finetuned)
        shift = {i: torch.zeros(stack.hidden_size, dtype=torch.float64) for i in layers}
        n_tokens = 0
        for batch in tqdm(batches, total=n_batches, desc="activation shift", disable=not progress, unit="batch"):
            base = _masked_sums(model, stack, layers, batch, mask)
            tuned = _masked_sums(finetuned, tuned_stack, layers, {k: v.to(tuned_device) for k, v in batch.items()},
                                 mask)
            for i in layers:
                shift[i] += tuned[i] - base[i]
            n_tokens += int(token_mask(batch, tuple(batch["input_ids"].shape), mask).sum())
        return {i: s / max(n_tokens, 1) for i, s in shift.items()}, len(encoded), n_tokens
    finally:
        for m, was_training in zip(models, modes, strict=True):
            m.train(was_training)
