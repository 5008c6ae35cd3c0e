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

import math
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .capture import find_decoder_stack, layer_hidden, resolve_layers, unwrap_model
from .directions import DirectionsError, HarmfulDirections
from .prompts import ContrastSet, prompt_hash, validate_contrast

METHODS = ("diff_means", "pca_diff", "class_means")
POOLINGS = ("last", "mean")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# An eigen/singular value below this fraction of the largest means the statistic spans fewer than k dimensions.
_RANK_RTOL = 1e-9
# A mean difference below this fraction of the mean activation norm is numerical noise, not a direction.
_GAP_RTOL = 1e-6


class ExtractionError(ValueError):
    """Extraction cannot run with these inputs (prompt too long, bad option, missing chat template, …)."""


class _StopForward(Exception):
    """Raised by the hook on the deepest needed layer: later layers and the LM head are never computed."""


@dataclass
class _Item:
    ids: list[int]
    side: int  # 0 = harmful, 1 = harmless
    index: int  # position in its own list (the pair index for paired sets)
    category: int  # harm category index, -1 for harmless prompts or unknown


# ----------------------------------------------------------------------------------------------- tokenisation


def model_context_length(model: nn.Module) -> int | None:
    """The model's maximum sequence length from its config, or ``None`` when the config does not say."""
    config = getattr(unwrap_model(model), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    chat_template: bool,
    max_length: int | None,
    truncate: bool,
    what: str = "prompt",
) -> list[list[int]]:
    """Token ids of each prompt, as a user turn with the generation prompt when ``chat_template``.

    Over-long prompts (more than ``max_length`` tokens) raise, or with ``truncate=True`` keep their *last*
    ``max_length`` tokens: the end of a prompt (and the generation prompt) is what ``pooling="last"`` reads.

    Raises:
        ExtractionError: a prompt tokenises to nothing, or is too long and ``truncate`` is off.
    """
    if chat_template:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        # The template already holds the special tokens (BOS etc.); adding them again would double them.
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        encoded = tokenizer(list(prompts))["input_ids"]
    out, too_long = [], []
    for i, ids in enumerate(encoded):
        ids = list(ids)
        if not ids:
            raise ExtractionError(f"{what} #{i} ({prompts[i]!r}) tokenises to no tokens")
        if max_length is not None and len(ids) > max_length:
            too_long.append((i, len(ids)))
            ids = ids[-max_length:]
        out.append(ids)
    if too_long:
        i, n = max(too_long, key=lambda t: t[1])
        message = (f"{len(too_long)} {what}(s) exceed max_length={max_length} tokens (longest: #{i}, {n} tokens: "
                   f"{prompts[i][:60]!r}…)")
        if not truncate:
            raise ExtractionError(
                f"{message}; shorten them, or pass truncate=True (CLI: --truncate) to keep each prompt's last "
                f"{max_length} tokens"
            )
        warnings.warn(f"{message}; kept the last {max_length} tokens of each", stacklevel=3)
    return out


def _pad_id(tokenizer: Any) -> int:
    # Fallback for tokenizers without a pad token: batches are padded on the right and every padded position is
    # masked out of pooling and comes after all real tokens, so (causal attention) the pad id never changes a
    # result. Use the pad token, else EOS, else id 0 — and never modify the caller's tokenizer.
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return 0


def _collate(items: Sequence[_Item], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(item.ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, : len(item.ids)] = torch.tensor(item.ids, dtype=torch.long)
        attention_mask[row, : len(item.ids)] = 1
    return input_ids.to(device), attention_mask.to(device)


# ----------------------------------------------------------------------------------------------- streaming


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _stream_pooled(
    model: nn.Module,
    layer_modules: dict[int, nn.Module],
    batches: Sequence[Sequence[_Item]],
    *,
    pooling: str,
    pad_id: int,
    on_batch: Callable[[Sequence[_Item], dict[int, torch.Tensor]], None],
    progress: bool,
    desc: str,
) -> None:
    """Runs ``model`` over ``batches`` and hands each batch's pooled activations (B, d) per layer to
    ``on_batch`` (float32). Hooks are removed and the train/eval mode restored however this exits."""
    from tqdm.auto import tqdm

    device = _input_device(model)
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
            raise _StopForward

    handles = [module.register_forward_hook(lambda m, a, o, i=i: hook(i, m, a, o)) for i, module in layer_modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
                input_ids, attention_mask = _collate(batch, pad_id, device)
                state["mask"] = attention_mask.bool()
                pooled.clear()
                try:
                    model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                except _StopForward:
                    pass
                missing = set(layer_modules) - set(pooled)
                if missing:
                    raise ExtractionError(f"decoder layers {sorted(missing)} did not run during the forward pass")
                on_batch(batch, pooled)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


class _LayerStats:
    """Running float64 sums for one layer. Holds O(d) numbers, plus d² for ``pca_diff`` and C·d for
    ``class_means``; never the activations themselves."""

    def __init__(self, d: int, device: torch.device, pca: bool, n_categories: int) -> None:
        kw = {"dtype": torch.float64, "device": device}
        self.sums = torch.zeros(2, d, **kw)  # row 0: Σ a over harmful prompts; row 1: over harmless prompts
        self.counts = torch.zeros(2, **kw)
        self.norm_sum = torch.zeros((), **kw)  # Σ ‖a‖ over all prompts, to judge when a mean gap is noise
        self.diff_m2 = torch.zeros(d, d, **kw) if pca else None  # Σ_i δ_i δ_iᵀ over pairs
        self.n_pairs = 0
        # Per-category sums: [0, c] over harmful prompts of category c, [1, c] over their harmless partners.
        self.cat_sums = torch.zeros(2, n_categories, d, **kw) if n_categories else None
        self.cat_counts = torch.zeros(2, n_categories, **kw) if n_categories else None

    def update(self, items: Sequence[_Item], a: torch.Tensor, paired_batch: bool) -> None:
        a = a.to(device=self.sums.device, dtype=torch.float64)
        side = torch.tensor([item.side for item in items], device=a.device)
        self.sums.index_add_(0, side, a)
        self.counts.index_add_(0, side, torch.ones_like(side, dtype=torch.float64))
        self.norm_sum += a.norm(dim=1).sum()
        if self.diff_m2 is not None and paired_batch:
            m = len(items) // 2  # paired batches hold harmful[i:i+m] then harmless[i:i+m]
            delta = a[:m] - a[m:]
            self.diff_m2 += delta.T @ delta
            self.n_pairs += m
        if self.cat_sums is not None:
            for s in (0, 1):
                rows = [r for r, item in enumerate(items) if item.side == s and item.category >= 0]
                if rows:
                    cats = torch.tensor([items[r].category for r in rows], device=a.device)
                    self.cat_sums[s].index_add_(0, cats, a[rows])
                    self.cat_counts[s].index_add_(0, cats, torch.ones_like(cats, dtype=torch.float64))

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp_min(1).unsqueeze(1)


def _subspace(stats: _LayerStats, layer: int, method: str, k: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The (k, d) float64 directions of one layer and method-specific diagnostics."""
    mu_h, mu_b = stats.means
    gap = mu_h - mu_b
    gap_norm = gap.norm()
    scale = stats.norm_sum / stats.counts.sum()
    if gap_norm <= _GAP_RTOL * scale:
        raise DirectionsError(
            f"layer {layer}: harmful and harmless activations have the same mean (gap {gap_norm:.3g} vs activation "
            f"norm {scale:.3g}), so there is no direction to extract; the two prompt sets are identical or the "
            "model ignores their difference. Use distinct harmful and harmless prompts"
        )
    info = {"gap_norm": float(gap_norm)}
    if method == "diff_means":
        return (gap / gap_norm).unsqueeze(0), info
    if method == "pca_diff":
        m2 = stats.diff_m2 / max(stats.n_pairs, 1)
        values, vectors = torch.linalg.eigh(m2)  # ascending
        values, vectors = values.flip(0), vectors.flip(1)
        rank_ok = values[k - 1] > _RANK_RTOL * values[0]
        rows, spectrum, what = vectors[:, :k].T, values, "paired differences"
        info["explained"] = float(values[:k].sum() / values.clamp_min(0).sum())
    else:  # class_means
        present = stats.cat_counts[0] > 0
        harmful_means = stats.cat_sums[0][present] / stats.cat_counts[0][present].unsqueeze(1)
        if bool((stats.cat_counts[1][present] > 0).all()):  # paired: each category's own harmless partners
            harmless_means = stats.cat_sums[1][present] / stats.cat_counts[1][present].unsqueeze(1)
        else:
            harmless_means = mu_b.expand_as(harmful_means)
        deltas = harmful_means - harmless_means
        _, singular, vh = torch.linalg.svd(deltas, full_matrices=False)
        rank_ok = singular.numel() >= k and singular[k - 1] > _RANK_RTOL * singular[0]
        rows, spectrum, what = vh[:k], singular, f"{int(present.sum())} category mean differences"
        info["explained"] = float((singular[:k] ** 2).sum() / (singular**2).sum())
    if not rank_ok:
        rank = int((spectrum > _RANK_RTOL * spectrum[0]).sum())
        raise DirectionsError(
            f"layer {layer}: the {what} span only {rank} dimension(s), fewer than k={k} (rank-deficient subspace); "
            f"use k <= {rank} or more varied contrast prompts"
        )
    signs = torch.sign(rows @ gap)
    rows = rows * torch.where(signs == 0, torch.ones_like(signs), signs).unsqueeze(1)  # point toward harmful
    return rows, info


class _SeparationStats:
    """Held-out separation per layer.

    With z = U a (the k coordinates of a prompt's activation in the subspace), c_H = U μ_H and c_B = U μ_B (training
    class means) and w = (c_H − c_B) / ‖c_H − c_B‖, the projection p = w·z is the in-subspace mean-difference axis
    (for k = 1, the direction itself). Reported: d' = (m_H − m_B) / sqrt((s²_H + s²_B) / 2), the standardised mean
    difference of p between held-out harmful and harmless prompts (unbiased variances), and ``accuracy``, the
    held-out accuracy of the nearest-class-mean classifier argmin_c ‖z − c_c‖."""

    def __init__(self, u: torch.Tensor, mu_h: torch.Tensor, mu_b: torch.Tensor) -> None:
        self.u = u  # (k, d) float64
        self.centres = torch.stack([u @ mu_h, u @ mu_b])  # (2, k)
        axis = self.centres[0] - self.centres[1]
        self.axis = axis / axis.norm().clamp_min(torch.finfo(torch.float64).tiny)
        self.s1 = torch.zeros(2, dtype=torch.float64)
        self.s2 = torch.zeros(2, dtype=torch.float64)
        self.n = torch.zeros(2, dtype=torch.float64)
        self.correct = 0

    def update(self, items: Sequence[_Item], a: torch.Tensor) -> None:
        z = a.to(device=self.u.device, dtype=torch.float64) @ self.u.T  # (B, k)
        side = torch.tensor([item.side for item in items], device=z.device)
        p = z @ self.axis
        for s in (0, 1):
            ps = p[side == s].cpu()
            self.s1[s] += ps.sum()
            self.s2[s] += (ps**2).sum()
            self.n[s] += ps.numel()
        nearest = torch.cdist(z, self.centres.to(z.device)).argmin(dim=1)
        self.correct += int((nearest == side).sum())

    def summary(self) -> dict[str, float | None]:
        mean = self.s1 / self.n
        var = (self.s2 / self.n - mean**2).clamp_min(0) * self.n / (self.n - 1).clamp_min(1)  # unbiased
        pooled_sd = math.sqrt(float(var.sum()) / 2)
        d_prime = float(mean[0] - mean[1]) / pooled_sd if pooled_sd > 0 else None
        return {"d_prime": d_prime, "accuracy": self.correct / float(self.n.sum())}


# ----------------------------------------------------------------------------------------------- public API


def _split_heldout(n: int, fraction: float, rng: random.Random) -> tuple[list[int], list[int]]:
    order = list(range(n))
    rng.shuffle(order)
    n_test = int(n * fraction)
    if n_test == 0 or n_test == n:
        return list(range(n)), []
    return sorted(order[n_test:]), sorted(order[:n_test])


def _batches(items: list[_Item], batch_size: int, paired: bool) -> list[list[_Item]]:
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
        >>> from orthoreg.prompts import load_builtin
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
            ``orthoreg.capture.resolve_layers``).
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

    Raises:
        PromptSetError: empty or unbalanced prompt sets.
        ExtractionError: a bad option, no chat template when one is required, or over-long prompts.
        DirectionsError: a layer's statistic spans fewer than k dimensions (rank-deficient subspace).
    """
    # ---- options
    if isinstance(harmful, ContrastSet):
        if harmless is not None:
            raise ExtractionError("pass either a ContrastSet or two prompt lists, not both")
        contrast = harmful
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
    encode = dict(chat_template=chat_template, max_length=max_length, truncate=truncate)
    ids_h = encode_prompts(tokenizer, harmful, what="harmful prompt", **encode)
    ids_b = encode_prompts(tokenizer, harmless, what="harmless prompt", **encode)
    items_h = [_Item(ids, 0, i, cat_index.get(categories[i], -1) if cat_names else -1) for i, ids in enumerate(ids_h)]
    items_b = [_Item(ids, 1, i, items_h[i].category if paired else -1) for i, ids in enumerate(ids_b)]

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
        eval_items = [_Item(ids, 0, i, -1) for i, ids in
                      enumerate(encode_prompts(tokenizer, held_h, what="held-out harmful prompt", **encode))]
        eval_items += [_Item(ids, 1, i, -1) for i, ids in
                       enumerate(encode_prompts(tokenizer, held_b, what="held-out harmless prompt", **encode))]
    separation_split = "heldout" if eval_items else "train"
    eval_items = eval_items or train_items

    # ---- pass 1: statistics on the training prompts
    acc_device = _input_device(model)
    if acc_device.type != "cuda":
        acc_device = torch.device("cpu")  # float64 is unsupported on MPS; CPU sums are cheap next to the forward
    modules = {i: stack.layers[i] for i in layer_ids}
    stats = {i: _LayerStats(stack.hidden_size, acc_device, pair_batches, len(cat_names)) for i in layer_ids}

    def accumulate(batch: Sequence[_Item], pooled: dict[int, torch.Tensor]) -> None:
        for i in layer_ids:
            stats[i].update(batch, pooled[i], paired_batch=pair_batches)

    pad_id = _pad_id(tokenizer)
    _stream_pooled(model, modules, _batches(train_items, batch_size, pair_batches), pooling=pooling, pad_id=pad_id,
                   on_batch=accumulate, progress=progress, desc="harmful directions")
    directions, infos = {}, {}
    for i in layer_ids:
        rows, infos[i] = _subspace(stats[i], i, method, k)
        directions[i] = rows

    # ---- pass 2: separation on held-out prompts
    separation = {i: _SeparationStats(directions[i], *stats[i].means) for i in layer_ids}

    def measure(batch: Sequence[_Item], pooled: dict[int, torch.Tensor]) -> None:
        for i in layer_ids:
            separation[i].update(batch, pooled[i])

    _stream_pooled(model, modules, _batches(eval_items, batch_size, False), pooling=pooling, pad_id=pad_id,
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
