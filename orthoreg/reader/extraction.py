r"""``extract_input_subspaces``: each linear module's input subspace V_m, from a base model's inputs at chosen
positions of chosen prompts.

Per module m, forward pre-hooks read the module's input x (B, T, d_in) during a no-grad pass over the prompts and
accumulate, in float64 and streamed (d_in² numbers per module whatever the number of prompts), the second moment
:math:`S_m = \sum_{x \in X_m} x x^\top` over the selected positions X_m, N_m = |X_m|. Then, with M = S/N:

- ``method="pca"``: V_m = the top-k eigenvectors of :math:`M_m` (uncentred principal directions: the mean input is
  itself a principal direction);
- ``method="contrastive"``: V_m = the top-k generalised eigenvectors of
  :math:`M_m v = \mu\,\big(M^{c}_m + \varepsilon\,\tfrac{\mathrm{tr}(M^{c}_m)}{d_{in}} I\big) v` (M^c from
  ``contrast_prompts``, ε = ``regularization``), orthonormalised by QR in order of μ.

Positions (``positions``, one name or several, whose union is used): ``"prompt"``, ``"post_instruction"`` (the
tokens the chat template appends after the user's message) and ``"first_reply"``; ``reader.positions`` says how
each is located.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..core.capture import find_decoder_stack, unwrap_model
from ..core.layers import in_width
from .positions import POSITIONS, token_positions
from .subspaces import (
    InputSubspaces,
    InputSubspacesError,
    canonical_module_name,
    named_input_modules,
)

__all__ = ["METHODS", "extract_input_subspaces", "input_moments"]

METHODS = ("pca", "contrastive")
_RANK_RTOL = 1e-10  # an eigenvalue below this fraction of the largest: the inputs span fewer than k dimensions


# ---------------------------------------------------------------------------------------------- statistics
def _select_modules(model: nn.Module, modules: str | Sequence[str]) -> dict[str, nn.Module]:
    available = named_input_modules(model)
    if modules == "all_linear":
        stack = find_decoder_stack(model)
        inside = {id(m) for layer in stack.layers for m in layer.modules()}
        chosen = {n: m for n, m in available.items() if id(m) in inside}
    else:
        if isinstance(modules, str):
            modules = [modules]
        chosen = {}
        for spec in modules:
            spec = canonical_module_name(spec)
            hits = {n: m for n, m in available.items() if n == spec or n.endswith("." + spec)}
            if not hits:
                raise InputSubspacesError(
                    f"`modules` names {spec!r}, which matches no linear module of the model (give full names such as "
                    f"'model.layers.3.mlp.up_proj' or suffixes such as 'mlp.up_proj'; e.g. {list(available)[:3]})"
                )
            chosen.update(hits)
    if not chosen:
        raise InputSubspacesError("no linear module selected; pass `modules=` names or suffixes")
    return chosen


@torch.no_grad()
def _second_moments(model: nn.Module, modules: dict[str, nn.Module], items: list[tuple[list[int], list[int], int]],
                    pad_id: int, batch_size: int) -> tuple[dict[str, torch.Tensor], int]:
    """Σ x xᵀ (float64, per module) over the selected positions, and the number of positions N."""
    lm = unwrap_model(model)
    device = next(lm.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {"mask": None, "cache": {}}

    def hook(name: str, module: nn.Module, args: tuple) -> None:
        if state["mask"] is None:
            return
        x = args[0]
        # q/k/v (and gate/up) read the same tensor: its rows' moment is computed once per batch. The cache holds x
        # itself, so its id cannot be reused by another tensor while the entry lives.
        cached = state["cache"].get(id(x))
        if cached is None or cached[0] is not x:
            rows = x[state["mask"].to(x.device)].to(torch.float64)  # (N_batch, d_in)
            cached = state["cache"][id(x)] = (x, rows.T @ rows)
        moment = cached[1]
        if name in sums:
            sums[name].add_(moment)
        else:
            sums[name] = moment.clone()

    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: hook(n, mod, a)) for n, m in modules.items()]
    was_training = lm.training
    lm.eval()
    total = 0
    try:
        for start in range(0, len(items), batch_size):
            batch = [(list(ids), sel, gen) for ids, sel, gen in items[start:start + batch_size]]
            for _ in range(max(gen for _, _, gen in batch)):  # greedy reply tokens, one forward each, not recorded
                input_ids, attention = _collate([ids for ids, _, _ in batch], pad_id, device)
                logits = lm(input_ids=input_ids, attention_mask=attention).logits
                last = attention.sum(dim=1) - 1
                next_ids = logits[torch.arange(len(batch), device=logits.device), last].argmax(dim=-1).tolist()
                for row, (ids, sel, _) in enumerate(batch):
                    if len(ids) < max(sel) + 1:
                        ids.append(int(next_ids[row]))
            input_ids, attention = _collate([ids for ids, _, _ in batch], pad_id, device)
            mask = torch.zeros(input_ids.shape, dtype=torch.bool)
            for row, (_, sel, _) in enumerate(batch):
                mask[row, sel] = True
            state["mask"], state["cache"] = mask, {}
            lm(input_ids=input_ids, attention_mask=attention)
            state["mask"], state["cache"] = None, {}
            total += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
        lm.train(was_training)
    return sums, total


def input_moments(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    modules: str | Sequence[str] = "all_linear",
    positions: str | Sequence[str] = "prompt",
    replies: Sequence[str] | None = None,
    reply_tokens: int = 1,
    chat_template: bool | None = None,
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
    what: str = "prompts",
) -> tuple[dict[str, torch.Tensor], int]:
    """The mean second moment M_m = (1/N) Σ x xᵀ (float64, d_in × d_in) of each selected module's inputs at the
    chosen positions of ``prompts``, read on the base model (a PEFT model with its adapter disabled), and N.
    ``extract_input_subspaces`` takes V_m from these; its docstring describes the arguments.

    Raises:
        InputSubspacesError: an unknown module or position kind, a position kind the tokenizer cannot locate, no
            prompts, or a reply count that differs from the prompts'.
    """
    kinds = [positions] if isinstance(positions, str) else list(positions)
    if not kinds or any(p not in POSITIONS for p in kinds):
        raise InputSubspacesError(f"`positions` must be among {POSITIONS} (one or several); got {positions!r}")
    if not prompts:
        raise InputSubspacesError(f"`{what}` is empty")
    if replies is not None and len(replies) != len(prompts):
        raise InputSubspacesError(f"{len(replies)} replies for {len(prompts)} {what}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    chat_template = has_template if chat_template is None else chat_template
    if chat_template and not has_template:
        raise InputSubspacesError("chat_template=True but the tokenizer has no chat template")
    chosen = _select_modules(model, modules)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    items = [token_positions(tokenizer, p, kinds, chat_template=chat_template, reply_tokens=reply_tokens,
                             reply=None if replies is None else replies[i], index=i)
             for i, p in enumerate(prompts)]
    if progress is not None:
        progress(f"recording {len(chosen)} modules' inputs on {len(prompts)} {what}")
    base = model.disable_adapter() if hasattr(model, "peft_config") and hasattr(model, "disable_adapter") else None
    with base if base is not None else contextlib.nullcontext():
        sums, n = _second_moments(model, chosen, items, pad_id, batch_size)
    return {name: sums[name] / n for name in chosen}, n


def _collate(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # right padding: causal attention never lets a pad change a real position
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attention[i, : len(r)] = 1
    return input_ids.to(device), attention.to(device)


def _top_eigenvectors(matrix: torch.Tensor, k: int, name: str) -> torch.Tensor:
    """The top-k eigenvectors of a symmetric PSD ``matrix`` as rows (k, d), each signed so its largest entry is
    positive; raises ``InputSubspacesError`` naming ``name`` when the matrix has rank below k."""
    values, vectors = torch.linalg.eigh(matrix)  # ascending
    values, vectors = values.flip(0), vectors.flip(1)
    if values[0] <= 0 or values[k - 1] <= _RANK_RTOL * values[0]:
        raise InputSubspacesError(
            f"{name}: the inputs at the chosen positions span fewer than k={k} dimensions; use a smaller k, more "
            "prompts or more positions. (In the first decoder layer a module's input is a function of the token "
            "alone, so fixed template positions give only as many directions as distinct tokens there: leave that "
            "layer out with `modules=`.)"
        )
    v = vectors[:, :k].T  # (k, d_in)
    signs = torch.sign(v.gather(1, v.abs().argmax(dim=1, keepdim=True)))  # deterministic: largest entry positive
    return v * signs


def _contrastive(m_prompt: torch.Tensor, m_contrast: torch.Tensor, k: int, eps: float, name: str) -> torch.Tensor:
    d = m_contrast.shape[0]
    regular = m_contrast + eps * (torch.trace(m_contrast) / d) * torch.eye(d, dtype=m_contrast.dtype,
                                                                           device=m_contrast.device)
    chol = torch.linalg.cholesky(regular)  # regular = L Lᵀ; M_p v = μ L Lᵀ v  ⇔  (L⁻¹ M_p L⁻ᵀ) w = μ w, v = L⁻ᵀ w
    whitened = torch.linalg.solve_triangular(chol, m_prompt, upper=False)
    whitened = torch.linalg.solve_triangular(chol, whitened.T, upper=False)
    w = _top_eigenvectors((whitened + whitened.T) / 2, k, name)  # (k, d)
    v = torch.linalg.solve_triangular(chol.T, w.T, upper=True)  # (d, k), columns in order of μ
    q, r = torch.linalg.qr(v)
    return (q * torch.sign(torch.diagonal(r))).T


def _hash(texts: Sequence[str] | None) -> str | None:
    if texts is None:
        return None
    payload = json.dumps(list(texts), ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


def extract_input_subspaces(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    modules: str | Sequence[str] = "all_linear",
    k: int = 16,
    positions: str | Sequence[str] = "prompt",
    method: Literal["pca", "contrastive"] = "pca",
    contrast_prompts: Sequence[str] | None = None,
    replies: Sequence[str] | None = None,
    contrast_replies: Sequence[str] | None = None,
    reply_tokens: int = 1,
    chat_template: bool | None = None,
    regularization: float = 1e-3,
    batch_size: int = 8,
    prompt_set: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> InputSubspaces:
    """Input subspaces V_m of ``model``'s linear modules (see the module docstring for the math).

    Run it on the *base* model (a PEFT model is read with its adapter disabled).

    Args:
        model: a causal LM (bare or PEFT-wrapped).
        tokenizer: its tokenizer; a fast tokenizer locates post-instruction tokens by character offsets.
        prompts (`Sequence[str]`): the prompt set (harmful, harmless, the task's, …).
        modules (`str | Sequence[str]`, *optional*, defaults to `"all_linear"`): every linear module inside the
            decoder layers, or names / name suffixes (``"mlp.up_proj"``) as in the base model's ``named_modules()``.
        k (`int`, *optional*, defaults to `16`): directions per module.
        positions (`str | Sequence[str]`, *optional*, defaults to `"prompt"`): ``"prompt"``, ``"post_instruction"``,
            ``"first_reply"``, or several (their union).
        method (`str`, *optional*, defaults to `"pca"`): ``"pca"`` or ``"contrastive"`` (needs ``contrast_prompts``).
        contrast_prompts (`Sequence[str]`, *optional*): the contrast set of ``"contrastive"`` (harmless, the task).
        replies, contrast_replies (`Sequence[str]`, *optional*): one reply per prompt for ``"first_reply"``;
            without them the base model's greedy reply is used.
        reply_tokens (`int`, *optional*, defaults to `1`): reply tokens that ``"first_reply"`` selects.
        chat_template (`bool`, *optional*): render prompts with the tokenizer's chat template (default: when it has
            one).
        regularization (`float`, *optional*, defaults to `1e-3`): ε of the contrastive method.
        batch_size (`int`, *optional*, defaults to `8`).
        prompt_set (`str`, *optional*): a name for the prompt set, stored in the metadata.

    Returns:
        ``InputSubspaces`` with metadata ``source_model``, ``model_type``, ``method``, ``positions``, ``k``,
        ``prompt_set`` (name, count, hash), ``contrast_set``, ``chat_template``, ``num_positions`` and ``energy``
        (per module, the share of the prompt set's input energy tr(V M Vᵀ)/tr(M) that V holds).

    Raises:
        InputSubspacesError: an unknown option, module or position kind, too few positions for k.
    """
    if method not in METHODS:
        raise InputSubspacesError(f"`method` must be one of {METHODS}; got {method!r}")
    if method == "contrastive" and not contrast_prompts:
        raise InputSubspacesError("method='contrastive' needs `contrast_prompts` (e.g. harmless prompts, or the task's)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputSubspacesError(f"`k` must be an int >= 1; got {k!r}")
    chosen = _select_modules(model, modules)
    too_narrow = [n for n, m in chosen.items() if in_width(m) < k]
    if too_narrow:
        raise InputSubspacesError(f"k={k} exceeds the input width of {too_narrow[:3]}; use a smaller k")
    options = dict(modules=list(chosen), positions=positions, reply_tokens=reply_tokens, chat_template=chat_template,
                   batch_size=batch_size, progress=progress)
    moments, n = input_moments(model, tokenizer, prompts, replies=replies, what="prompts", **options)
    contrast = None
    if method == "contrastive":
        contrast = input_moments(model, tokenizer, contrast_prompts, replies=contrast_replies,
                                 what="contrast prompts", **options)
    kinds = [positions] if isinstance(positions, str) else list(positions)
    chat_template = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template
    subspaces, energy = {}, {}
    for name in chosen:
        m = moments[name]
        if method == "pca":
            v = _top_eigenvectors(m, k, name)
        else:
            v = _contrastive(m, contrast[0][name], k, regularization, name)
        energy[name] = float(torch.trace(v @ m @ v.T) / torch.trace(m))
        subspaces[name] = v.to(torch.float32)
    lm = unwrap_model(model)
    config = getattr(lm, "config", None)
    metadata = {
        "source_model": getattr(config, "_name_or_path", None) or type(lm).__name__,
        "model_type": getattr(config, "model_type", None),
        "method": method, "positions": kinds, "k": k, "reply_tokens": reply_tokens if "first_reply" in kinds else None,
        "replies": None if "first_reply" not in kinds else ("given" if replies is not None else "greedy"),
        "prompt_set": {"name": prompt_set, "count": len(prompts), "hash": _hash(prompts)},
        "contrast_set": None if contrast is None else {"count": len(contrast_prompts), "hash": _hash(contrast_prompts)},
        "regularization": regularization if method == "contrastive" else None,
        "chat_template": bool(chat_template), "num_positions": n, "energy": energy,
    }
    return InputSubspaces(subspaces, metadata=metadata)
