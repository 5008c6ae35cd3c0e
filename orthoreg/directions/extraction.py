"""Harmful directions from contrast prompts: streamed activation statistics → per-layer k-dimensional subspaces.

One forward pass over the training prompts accumulates, per guarded layer and in float64, only what the chosen
method needs — class sums (2·d numbers), the second moment of paired differences (d² numbers, ``pca_diff``) or
per-category sums (C·d numbers, ``class_means``) — so memory does not grow with the number of prompts. A second
pass over held-out prompts measures how well each layer's subspace separates the two sets.

Methods (a = pooled activation of a prompt at layer ℓ; μ_H, μ_B = mean over harmful / harmless prompts):

- ``"diff_means"`` (k = 1): u = (μ_H − μ_B) / ‖μ_H − μ_B‖ (Arditi et al. 2024; ProCon).
- ``"pca_diff"`` (k ≥ 1, paired sets): the top-k eigenvectors of the *uncentred* second moment of paired
  differences M = (1/n) Σ_i (a_H,i − a_B,i)(a_H,i − a_B,i)ᵀ. Uncentred so that the mean difference itself is a
  principal direction (for k = 1 it is close to ``diff_means``); centring would discard exactly that direction.
- ``"class_means"`` (k ≤ number of harm categories): the top-k right singular vectors of the C × d matrix whose
  rows are μ_H,c − μ_B,c for each harm category c, where μ_B,c is the mean over the harmless partners of category
  c's prompts for a paired set, and the mean over all harmless prompts otherwise.

Each direction's sign is chosen so that u·(μ_H − μ_B) ≥ 0 (it points toward "harmful"); rows are ordered by
importance (eigen/singular value) and orthonormalised by ``HarmfulDirections``.

Pooling: ``"last"`` takes the last prompt token (with a chat template, the last token of the generation prompt —
the position refusal-direction work reads); ``"mean"`` averages over all tokens of the (templated) prompt.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..core.activations import PromptItem, StopForward, input_device, stream_pooled
from ..core.capture import find_decoder_stack, resolve_layers
from ..core.prompt_encoding import (
    ExtractionError,
    UnknownTokenWarning,
    encode_prompts,
    model_context_length,
    pad_token_id,
    unknown_token_share,
    warn_if_unknown_tokens,
)
from ..core.prompts import ContrastSet, prompt_hash, validate_contrast
from .harmful import HarmfulDirections
from .statistics import LayerStats, SeparationStats, subspace_directions

__all__ = ["METHODS", "POOLINGS", "ExtractionError", "UnknownTokenWarning", "encode_prompts", "extract_directions",
           "model_context_length", "unknown_token_share"]

METHODS = ("diff_means", "pca_diff", "class_means")
POOLINGS = ("last", "mean")

# Former private names, kept for code that imported them from here before the split.
_pad_id, _input_device, _StopForward = pad_token_id, input_device, StopForward

# ----------------------------------------------------------------------------------------------- public API


def _split_heldout(n: int, fraction: float, rng: random.Random) -> tuple[list[int], list[int]]:
    order = list(range(n))
    rng.shuffle(order)
    n_test = int(n * fraction)
    if n_test == 0 or n_test == n:
        return list(range(n)), []
    return sorted(order[n_test:]), sorted(order[:n_test])


def _batches(items: list[PromptItem], batch_size: int, paired: bool) -> list[list[PromptItem]]:
    if paired:
        # Pair i's two prompts go in the same batch, harmful block first, so differences are formed per batch.
        harmful = [it for it in items if it.side == 0]
        harmless = {it.index: it for it in items if it.side == 1}
        per = max(1, batch_size // 2)
        return [chunk + [harmless[it.index] for it in chunk] for chunk in
                (harmful[i : i + per] for i in range(0, len(harmful), per))]
    ordered = sorted(items, key=lambda it: len(it.ids))  # similar lengths together: less padding
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def extract_directions(
    model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[str] | ContrastSet,
    harmless: Sequence[str] | None = None,
    layers: int | str | Sequence[int | str] = "all",
    k: int = 1,
    method: Literal["diff_means", "pca_diff", "class_means"] = "diff_means",
    pooling: Literal["last", "mean"] = "last",
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
    *,
    categories: Sequence[str] | None = None,
    paired: bool | None = None,
    heldout: float | ContrastSet | tuple[Sequence[str], Sequence[str]] = 0.2,
    chat_template: bool | None = None,
    truncate: bool = False,
    balance: Literal["error", "truncate"] = "error",
    seed: int = 0,
    layers_path: str | None = None,
    source_model: str | None = None,
    source_revision: str | None = None,
) -> HarmfulDirections:
    """Extracts per-layer harmful subspaces from contrast prompts (see the module docstring for the formulas).

    Example:
        >>> from orthoreg.core.prompts import load_builtin
        >>> dirs = extract_directions(model, tokenizer, load_builtin("train"), layers="middle_third",
        ...                           heldout=load_builtin("test"))
        >>> dirs.save("harmful.safetensors")

    Args:
        model (`nn.Module`): a causal LM (PEFT-wrapped is fine); runs on its own device, in eval mode, no grad.
        tokenizer: the model's tokenizer. It needs no pad token: batches are right-padded with the pad id, else EOS,
            else 0, and padded positions are masked out (they cannot affect earlier tokens under causal attention).
        harmful (`list[str]` or `ContrastSet`): harmful prompts, or a whole contrast set (then leave ``harmless``
            out; its categories and pairing are used).
        harmless (`list[str]`): harmless prompts; ``harmless[i]`` pairs with ``harmful[i]`` for ``pca_diff``.
        layers (`int | str | list`, *optional*, defaults to `"all"`): decoder layers to extract at (see
            ``orthoreg.core.capture.resolve_layers``).
        k (`int`, *optional*, defaults to 1): directions per layer.
        method (`str`, *optional*, defaults to `"diff_means"`): ``"diff_means"`` (k = 1), ``"pca_diff"`` or
            ``"class_means"``.
        pooling (`str`, *optional*, defaults to `"last"`): ``"last"`` prompt token or ``"mean"`` over its tokens.
        batch_size (`int`, *optional*, defaults to 16): prompts per forward pass (pairs count as two).
        max_length (`int`, *optional*): longest prompt in tokens; defaults to the model's context length.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm progress bar.
        categories (`list[str]`, *optional*): harm category of each harmful prompt (``class_means`` needs them).
        paired (`bool`, *optional*): whether ``harmless[i]`` is the matched partner of ``harmful[i]``; defaults to
            the ContrastSet's flag, else to ``True`` for ``pca_diff`` (which needs pairs) and ``False`` otherwise.
            Pairs are held out together, and ``class_means`` then uses each category's own harmless partners.
        heldout (`float | ContrastSet | (list, list)`, *optional*, defaults to 0.2): prompts for the separation
            statistics — a fraction of the given prompts held out from extraction (same pair indices on both sides
            for paired sets), or an explicit held-out set. With too few prompts to hold any out, the statistics are
            measured on the training prompts and ``metadata["separation_split"]`` says ``"train"``.
        chat_template (`bool`, *optional*): wrap each prompt as a user turn with the tokenizer's chat template;
            defaults to whether the tokenizer has one.
        truncate (`bool`, *optional*, defaults to `False`): keep the last ``max_length`` tokens of over-long
            prompts instead of raising.
        balance (`str`, *optional*, defaults to `"error"`): ``"truncate"`` cuts an unbalanced set to equal sizes.
        seed (`int`, *optional*, defaults to 0): seed of the held-out split.
        layers_path (`str`, *optional*): dotted path of the decoder layers, for unusual architectures.
        source_model, source_revision (`str`, *optional*): provenance for the metadata; default to the config's
            ``_name_or_path`` and ``_commit_hash``.

    Memory: besides one batch of activations, 2·d float64 numbers per layer (``diff_means``), plus d² for
    ``pca_diff`` (8·d² bytes per layer: 134 MB at d = 4096 — restrict ``layers`` for very wide, deep models) or C·d
    for ``class_means``; on the model's GPU when it has one, else on the CPU. Nothing grows with the prompt count.

    Returns:
        `HarmfulDirections` (on the CPU): U_ℓ (k, d) per layer; ``metadata`` holds ``source_model``, ``source_revision``,
        ``model_type``, ``num_layers``, ``method``, ``pooling``, ``prompt_hash``, ``chat_template``, counts and
        ``separation`` = {layer: {"d_prime", "accuracy", "gap_norm"[, "explained"]}} (layer keys are strings).

    Warns:
        UnknownTokenWarning: more than 20 % of the prompt tokens are unknown to the tokenizer (prompts in another
            language or vocabulary; see ``orthoreg.core.prompt_encoding.unknown_token_share``).

    Raises:
        PromptSetError: empty or unbalanced prompt sets.
        ExtractionError: a bad option, no chat template when one is required, or over-long prompts.
        DirectionsError: a layer's statistic spans fewer than k dimensions (rank-deficient subspace).
    """
    source = "the prompts"
    # ---- options
    if isinstance(harmful, ContrastSet):
        if harmless is not None:
            raise ExtractionError("pass either a ContrastSet or two prompt lists, not both")
        contrast = harmful
        source = contrast.source
        harmful, harmless = contrast.harmful, contrast.harmless
        categories = categories if categories is not None else contrast.categories
        paired = contrast.paired if paired is None else paired
    elif harmless is None:
        raise ExtractionError("`harmless` prompts are missing; pass two prompt lists or one ContrastSet")
    if method not in METHODS:
        raise ExtractionError(f"`method` must be one of {METHODS}; got {method!r}")
    if pooling not in POOLINGS:
        raise ExtractionError(f"`pooling` must be one of {POOLINGS}; got {pooling!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ExtractionError(f"`k` must be an int >= 1; got {k!r}")
    if method == "diff_means" and k != 1:
        raise ExtractionError(f"method='diff_means' gives one direction but k={k}; use method='pca_diff' or "
                              "'class_means' for several")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ExtractionError(f"`batch_size` must be an int >= 1; got {batch_size!r}")

    stack = find_decoder_stack(model, layers_path)
    if k > stack.hidden_size:
        raise ExtractionError(f"k={k} exceeds the hidden size {stack.hidden_size}")
    layer_ids = resolve_layers(layers, stack.num_layers)
    pair_batches = method == "pca_diff"
    if paired is None:
        paired = pair_batches
    elif pair_batches and not paired:
        raise ExtractionError("method='pca_diff' needs paired prompts (harmless[i] matching harmful[i]); use "
                              "method='diff_means' or 'class_means' for unpaired sets")
    harmful, harmless = validate_contrast(harmful, harmless, paired=paired, balance=balance)
    if categories is not None:
        categories = [str(c) for c in categories][: len(harmful)]
        if len(categories) != len(harmful):
            raise ExtractionError(f"{len(categories)} categories for {len(harmful)} harmful prompts; give one each")
    if method == "class_means":
        n_cat = len(set(categories or []))
        if n_cat < k:
            raise ExtractionError(
                f"method='class_means' needs at least k={k} harm categories (got {n_cat}); pass `categories=` "
                "(one per harmful prompt) or use method='pca_diff'"
            )

    context = model_context_length(model)
    if max_length is None:
        max_length = context
    elif context is not None and max_length > context:
        raise ExtractionError(f"max_length={max_length} exceeds the model's context length {context}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template is None:
        chat_template = has_template
    elif chat_template and not has_template:
        raise ExtractionError("chat_template=True but the tokenizer has no chat template; pass chat_template=False "
                              "(CLI: --no-chat-template) to use the raw prompts")

    # ---- prompts → items, held-out split
    cat_names = sorted(set(categories)) if (categories and method == "class_means") else []
    cat_index = {c: i for i, c in enumerate(cat_names)}
    warn_if_unknown_tokens(tokenizer, harmful + harmless, source=source)
    encode = dict(chat_template=chat_template, max_length=max_length, truncate=truncate)
    ids_h = encode_prompts(tokenizer, harmful, what="harmful prompt", **encode)
    ids_b = encode_prompts(tokenizer, harmless, what="harmless prompt", **encode)
    items_h = [PromptItem(ids, 0, i, cat_index.get(categories[i], -1) if cat_names else -1) for i, ids in enumerate(ids_h)]
    items_b = [PromptItem(ids, 1, i, items_h[i].category if paired else -1) for i, ids in enumerate(ids_b)]

    rng = random.Random(seed)
    if isinstance(heldout, (int, float)) and not isinstance(heldout, bool):
        if not 0 <= heldout < 1:
            raise ExtractionError(f"`heldout` must be a fraction in [0, 1); got {heldout}")
        train_h, test_h = _split_heldout(len(items_h), heldout, rng)
        if paired:
            train_b, test_b = train_h, test_h  # keep pairs whole
        else:
            train_b, test_b = _split_heldout(len(items_b), heldout, rng)
        if not test_h or not test_b:
            train_h, test_h, train_b, test_b = list(range(len(items_h))), [], list(range(len(items_b))), []
        train_items = [items_h[i] for i in train_h] + [items_b[i] for i in train_b]
        eval_items = [items_h[i] for i in test_h] + [items_b[i] for i in test_b]
    else:
        held = heldout if isinstance(heldout, ContrastSet) else ContrastSet(*heldout)
        held_h, held_b = validate_contrast(held.harmful, held.harmless, balance=balance, source="the held-out set")
        train_items = items_h + items_b
        eval_items = [PromptItem(ids, 0, i, -1) for i, ids in
                      enumerate(encode_prompts(tokenizer, held_h, what="held-out harmful prompt", **encode))]
        eval_items += [PromptItem(ids, 1, i, -1) for i, ids in
                       enumerate(encode_prompts(tokenizer, held_b, what="held-out harmless prompt", **encode))]
    separation_split = "heldout" if eval_items else "train"
    eval_items = eval_items or train_items

    # ---- pass 1: statistics on the training prompts
    acc_device = input_device(model)
    if acc_device.type != "cuda":
        acc_device = torch.device("cpu")  # float64 is unsupported on MPS; CPU sums are cheap next to the forward
    modules = {i: stack.layers[i] for i in layer_ids}
    stats = {i: LayerStats(stack.hidden_size, acc_device, pair_batches, len(cat_names)) for i in layer_ids}

    def accumulate(batch: Sequence[PromptItem], pooled: dict[int, torch.Tensor]) -> None:
        for i in layer_ids:
            stats[i].update(batch, pooled[i], paired_batch=pair_batches)

    pad_id = pad_token_id(tokenizer)
    stream_pooled(model, modules, _batches(train_items, batch_size, pair_batches), pooling=pooling, pad_id=pad_id,
                   on_batch=accumulate, progress=progress, desc="harmful directions")
    directions, infos = {}, {}
    for i in layer_ids:
        rows, infos[i] = subspace_directions(stats[i], i, method, k)
        directions[i] = rows

    # ---- pass 2: separation on held-out prompts
    separation = {i: SeparationStats(directions[i], *stats[i].means) for i in layer_ids}

    def measure(batch: Sequence[PromptItem], pooled: dict[int, torch.Tensor]) -> None:
        for i in layer_ids:
            separation[i].update(batch, pooled[i])

    stream_pooled(model, modules, _batches(eval_items, batch_size, False), pooling=pooling, pad_id=pad_id,
                   on_batch=measure, progress=progress, desc="separation")

    config = getattr(stack.lm, "config", None)
    n_train_h = sum(1 for it in train_items if it.side == 0)
    metadata = {
        "source_model": source_model or str(getattr(config, "_name_or_path", "") or type(stack.lm).__name__),
        "source_revision": source_revision or getattr(config, "_commit_hash", None),
        "model_type": stack.model_type,
        "num_layers": stack.num_layers,
        "method": method,
        "pooling": pooling,
        "chat_template": bool(chat_template),
        "paired": bool(paired),
        "max_length": max_length,
        "prompt_hash": prompt_hash(harmful, harmless, categories),
        "n_harmful": n_train_h,
        "n_harmless": len(train_items) - n_train_h,
        "n_eval": len(eval_items),
        "separation_split": separation_split,
        "separation": {str(i): {**separation[i].summary(), **infos[i]} for i in layer_ids},
    }
    # Directions live on the CPU like a loaded file's; the consumers move them to the model's device.
    return HarmfulDirections({i: directions[i].to("cpu", torch.float32) for i in layer_ids}, metadata=metadata)

