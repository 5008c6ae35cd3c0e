r"""TReFT, token-regularised fine-tuning (Zhao et al. 2026, "The Piggyback Hypothesis of Generalization"): the
attention keys and values at chat-template positions are anchored to the initial model's, so the fine-tune cannot
bind its new behaviour to the template tokens every example shares. No harm data is used.

With :math:`k^{\ell}_{p}`, :math:`v^{\ell}_{p}` layer ℓ's ``k_proj``/``v_proj`` outputs at position p = (b, t) (KV
heads concatenated, before RoPE / ``k_norm``), :math:`k^{\ell,0}_{p}`, :math:`v^{\ell,0}_{p}` the initial model's on
the (PEFT adapter disabled, or a frozen ``reference_model``), P the N selected positions of the micro-batch, ℒ the
regularised layers (default: all), ε = 1e-12, in float32; the micro-batch adds max(λℒ_KV − τ, 0)/GA to the loss:

.. math:: \mathcal{L}_{KV} = \frac{1}{|\mathcal{L}|} \sum_{\ell \in \mathcal{L}} \frac{1}{N} \sum_{p \in P}
          \Big( \frac{\|k^{\ell}_{p} - k^{\ell,0}_{p}\|^2}{\max(\|k^{\ell,0}_{p}\|, \varepsilon)^2}
          + \frac{\|v^{\ell}_{p} - v^{\ell,0}_{p}\|^2}{\max(\|v^{\ell,0}_{p}\|, \varepsilon)^2} \Big)

**Positions**, matched in ``input_ids`` (padding excluded) against the template's ids (``template_token_ids``):
``"prefix"`` (default, their headline variant) — the first occurrence of the text before the user content (system
block + user header); ``"postfix"`` — every occurrence of the text between user content and reply (the assistant
header, e.g. ``<|im_end|>\n<|im_start|>assistant\n``); ``"query"`` (the paper's control) — from the end of that
prefix to the next postfix (the first user turn's content); ``"prompt"`` (their "all input tokens") — every token
before the first label.

**Checked against their code** (github.com/CHATS-lab/Token-Regularized-Fine-Tuning ``release/src/sft.py``, configs,
paper PDF): the formula, τ (``trust_drift_threshold``, 0 in their configs), the prefix/postfix spans, all layers; λ
10 (prefix, Qwen2.5-7B config), 1 (postfix, Qwen3-8B config), 1–30 tuned in the paper. Their main variant is the
*prefix*; postfix is their Qwen3 recipe. **Differences:** (1) they apply ``k_proj``/``v_proj`` to
``output_hidden_states[ℓ]``, the residual stream *before* the layer's input norm; we read the real projections. (2)
Their reference is computed once (prefix: from the template text alone, equal to ours when every row starts with it;
postfix: from the first training example, for all rows); ours is each row's own initial K/V (0 at the start). (3)
Their query/all controls are not released (paper, appendix D.4): the query span is unverified. (4) No step window.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from ..core.capture import unwrap_model
from ..core.reference import StopReferenceForward, find_peft_model, reference_forward, reference_forward_active
from ..engine.health import NonFiniteHiddenStateError
from ..terms.injection import PenaltyScale, inject_penalty
from . import common
from .common import EngineCallback, call_kwargs, check_weight, no_reference_error, prepare_reference_model

__all__ = ["POSITION_SETS", "TReFTCallback", "TReFTRegularizer", "template_positions", "template_token_ids"]

POSITION_SETS = ("postfix", "prefix", "query", "prompt")
_NEEDS = {"postfix": ("postfix",), "prefix": ("prefix",), "query": ("prefix", "postfix"), "prompt": ()}
EPS = 1e-12


def template_token_ids(tokenizer: Any, system: str | None = None, **template_kwargs) -> dict[str, list[int]]:
    """``{"prefix": ids, "postfix": ids}``: the chat template's tokens before the user content and between it and the
    reply, in a rendered ``[system?, user, assistant]`` chat (``template_kwargs`` go to ``apply_chat_template``, e.g.
    ``enable_thinking=False``). Tokens straddling the contents are left out. Needs a fast tokenizer (offsets)."""
    user, reply = "TREFTUSERCONTENT", "TREFTREPLYCONTENT"
    chat = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, **template_kwargs)
    a, b = text.find(user), text.find(reply)
    if a < 0 or b < a:
        raise ValueError("the chat template did not render the user and assistant contents in order")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("template_token_ids needs a fast tokenizer (offsets); pass prefix_ids=/postfix_ids= instead")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))
    return {"prefix": [i for i, (_, e) in spans if e <= a],
            "postfix": [i for i, (s, e) in spans if s >= a + len(user) and e <= b]}


def _starts(ids: torch.Tensor, real: torch.Tensor, pattern: Sequence[int], first: bool = False) -> torch.Tensor:
    """(B, T) bool: where ``pattern`` starts (all its tokens real; only the first occurrence with ``first``)."""
    (B, T), n = ids.shape, len(pattern)
    out = torch.zeros(B, T, dtype=torch.bool, device=ids.device)
    if 0 < n <= T:
        pat = torch.tensor(list(pattern), device=ids.device, dtype=ids.dtype)
        out[:, :T - n + 1] = (ids.unfold(1, n, 1) == pat).all(-1) & real.unfold(1, n, 1).all(-1)
    return out & (out.cumsum(1) == 1) if first else out


def _spans(starts: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([torch.nn.functional.pad(starts, (j, 0))[:, :starts.shape[1]] for j in range(n)]).any(0)


def template_positions(input_ids: torch.Tensor, which: str, prefix_ids: Sequence[int] | None = None,
                       postfix_ids: Sequence[int] | None = None, attention_mask: torch.Tensor | None = None,
                       labels: torch.Tensor | None = None) -> torch.Tensor:
    """The (B, T) bool mask of the position set ``which`` (module docstring); rows without a match select nothing."""
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    ar = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    if which == "prompt":
        if labels is None:
            raise ValueError("TReFTCallback(positions='prompt') finds the reply from `labels` (-100 on the prompt), "
                             "but this forward carries none; pass labels or use positions='postfix'/'prefix'")
        labelled = labels != -100
        first = torch.where(labelled.any(1), labelled.int().argmax(1), 0)  # no reply: nothing
        return real & (ar < first.unsqueeze(1))
    if which == "postfix":
        return _spans(_starts(input_ids, real, postfix_ids), len(postfix_ids)) & real
    pre = _starts(input_ids, real, prefix_ids, first=True)
    if which == "prefix":
        return _spans(pre, len(prefix_ids)) & real
    end = torch.where(pre.any(1), pre.int().argmax(1) + len(prefix_ids), input_ids.shape[1] + 1).unsqueeze(1)
    post = _starts(input_ids, real, postfix_ids) & (ar >= end)
    stop = torch.where(post.any(1), post.int().argmax(1), -1).unsqueeze(1)
    return real & (ar >= end) & (ar < stop)


def kv_modules(lm: nn.Module, kv_names: tuple[str, str] = ("k_proj", "v_proj")) -> list[tuple[nn.Module, nn.Module]]:
    """(key, value) projection modules of each attention module of ``lm``'s decoder, in layer order."""
    decoder = lm.get_decoder() if callable(getattr(lm, "get_decoder", None)) else lm
    pairs = [(getattr(m, kv_names[0]), getattr(m, kv_names[1])) for m in decoder.modules()
             if all(isinstance(getattr(m, n, None), nn.Module) for n in kv_names)]
    if not pairs:
        raise ValueError(f"TReFTCallback reads K/V from each attention module's `{kv_names[0]}`/`{kv_names[1]}` "
                         f"(Llama-family naming: Llama, Mistral, Qwen2/3, Gemma, OLMo); {type(lm).__name__} has none. "
                         "Pass kv_names=(key, value) if this family names them otherwise; fused QKV projections "
                         "(GPT-2 `c_attn`, Phi-3 `qkv_proj`, GPT-NeoX `query_key_value`) are not supported.")
    return pairs


class TReFTRegularizer:
    r"""max(λℒ_KV − τ, 0) (module docstring) as gradients: a pre-hook on the LM finds the positions and runs the
    reference forward (no grad, cut after the last position, stopped after the deepest regularised layer); hooks on
    each ``k_proj``/``v_proj`` send their share of λ·grad_scale·ℒ_KV into the task's own backward by ``inject_penalty``
    (exact under activation checkpointing, reentrant or not). ``grad_scale``: 1/GA, set by the callback."""

    def __init__(self, weight: float, positions: str = "prefix", tokenizer: Any = None,
                 prefix_ids: Sequence[int] | None = None, postfix_ids: Sequence[int] | None = None,
                 layers: Sequence[int] | None = None, threshold: float = 0.0, reference_model: nn.Module | None = None,
                 kv_names: tuple[str, str] = ("k_proj", "v_proj"), truncate_reference: bool = True):
        self.weight = check_weight("weight", weight)
        if positions not in POSITION_SETS:
            raise ValueError(f"`positions` must be one of {POSITION_SETS}; got {positions!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < math.inf:
            raise ValueError(f"`threshold` (τ) must be a finite number >= 0; got {threshold!r}")
        self.positions, self.threshold, self.kv_names = positions, float(threshold), tuple(kv_names)
        self.truncate_reference, self.reference_model, self.grad_scale = bool(truncate_reference), reference_model, 1.0
        self.ids = {"prefix": prefix_ids, "postfix": postfix_ids}
        if tokenizer is not None and any(self.ids[k] is None for k in _NEEDS[positions]):
            self.ids = {k: template_token_ids(tokenizer)[k] if v is None else v for k, v in self.ids.items()}
        for k in _NEEDS[positions]:
            if self.ids[k] is None or len(self.ids[k]) == 0:
                raise ValueError(f"TReFTCallback(positions={positions!r}) needs the chat template's {k} token "
                                 f"ids: pass tokenizer=<the tokenizer whose template rendered the data> or {k}_ids=")
            self.ids[k] = [int(i) for i in self.ids[k]]
        self.layers = None if layers is None else [int(i) for i in layers]
        self._handles, self._session = [], None
        self.last_kv: torch.Tensor | None = None  # ℒ_KV of the latest regularised forward (float32, detached)
        self._reset_metrics()

    attached = property(lambda self: bool(self._handles))

    def attach(self, model: nn.Module) -> TReFTRegularizer:
        if self._handles:
            raise RuntimeError("this TReFTRegularizer is already attached; call detach() first")
        lm, self._peft = unwrap_model(model), find_peft_model(model)
        if self.reference_model is None and self._peft is None:
            raise no_reference_error("TReFTCallback")
        pairs = ref_pairs = kv_modules(lm, self.kv_names)
        layers = list(range(len(pairs))) if self.layers is None else self.layers
        if not layers or any(not 0 <= i < len(pairs) for i in layers):
            raise ValueError(f"`layers` must be attention-layer indices in [0, {len(pairs)}); got {self.layers}")
        if self.reference_model is not None:
            prepare_reference_model(self.reference_model, model, "TReFTCallback")
            ref_pairs = kv_modules(unwrap_model(self.reference_model), self.kv_names)
            if len(ref_pairs) != len(pairs):
                raise ValueError(f"TReFTCallback: the reference model has {len(ref_pairs)} attention layers, the "
                                 f"model {len(pairs)}; the reference must be a copy of the initial model")
        self._n_layers, self._ref_modules = len(layers), {(i, j): ref_pairs[i][j] for i in layers for j in (0, 1)}
        self._devices = sorted({p.device.index for p in lm.parameters() if p.device.type == "cuda"})
        self._handles += [lm.register_forward_pre_hook(self._open, with_kwargs=True),
                          lm.register_forward_hook(self._close)]
        self._handles += [pairs[i][j].register_forward_hook(partial(self._kv_hook, (i, j)))
                          for i, j in self._ref_modules]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._session = None

    def _open(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if reference_forward_active():
            return
        self._session = None  # a new forward: the previous one's backward (and its recomputes) are over
        if not (module.training and torch.is_grad_enabled()):
            return
        inputs = call_kwargs(module, args, kwargs)
        ids = inputs.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            raise ValueError("TReFTCallback finds the template positions in `input_ids`; this forward has none")
        mask = template_positions(ids, self.positions, self.ids["prefix"], self.ids["postfix"],
                                  inputs.get("attention_mask"), inputs.get("labels"))
        if not bool(mask.any()):
            raise ValueError(
                f"TReFTCallback(positions={self.positions!r}) found no template positions in this batch (template ids "
                f"{self.ids}): render the training data with the chat template of the tokenizer given here, or pass "
                "the ids of the template that rendered them (prefix_ids=/postfix_ids=).")
        index = mask.nonzero(as_tuple=True)
        cut = int(index[1].max()) + 1 if self.truncate_reference else ids.shape[1]
        self._session = {"index": index, "refs": self._reference_kv(module, inputs, index, cut), "values": {},
                         "scale": PenaltyScale(self.weight * self.grad_scale)}

    @torch.no_grad()
    def _reference_kv(self, lm: nn.Module, inputs: dict, index: tuple, cut: int) -> dict:
        kwargs = {k: v for k, v in inputs.items() if k not in common.NOT_FOR_REFERENCE}
        B, T = inputs["input_ids"].shape
        mask = kwargs.get("attention_mask")
        if not (isinstance(mask, torch.Tensor) and mask.dim() > 2):  # causal: earlier positions ignore later tokens
            kwargs = {k: v[:, :cut] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[:2] == (B, T) else v
                      for k, v in kwargs.items()}
        refs: dict = {}

        def capture(key, module, args, output):
            refs.setdefault(key, output[index].float())
            if len(refs) == len(self._ref_modules):
                raise StopReferenceForward  # every regularised projection has run

        handles = [m.register_forward_hook(partial(capture, key)) for key, m in self._ref_modules.items()]
        adapter_off = self._peft.disable_adapter() if self.reference_model is None else contextlib.nullcontext()
        try:  # the RNG is restored, so the training forward draws the dropout masks it would without TReFT
            with (contextlib.suppress(StopReferenceForward), torch.random.fork_rng(devices=self._devices),
                  adapter_off, reference_forward()):
                (lm if self.reference_model is None else self.reference_model)(**kwargs, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        if len(refs) != len(self._ref_modules):
            raise RuntimeError("TReFTCallback: the reference forward did not run every regularised k/v projection")
        return refs

    def _kv_hook(self, key: tuple[int, int], module: nn.Module, args: tuple, output: torch.Tensor):
        s = self._session
        if s is None or reference_forward_active():
            return None
        ref = s["refs"][key]
        drift = (output[s["index"]].float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(EPS)
        share = drift.square().mean() / self._n_layers
        s["values"].setdefault(key, share.detach())  # the first call (checkpointing re-runs the layer)
        return inject_penalty(output, share, s["scale"]) if torch.is_grad_enabled() and output.requires_grad else None

    def _close(self, module: nn.Module, args: tuple, output: Any) -> None:
        s = self._session
        if s is None or reference_forward_active() or "kv" in s:
            return
        kv = s["kv"] = torch.stack(list(s["values"].values())).sum()
        if not torch.isfinite(kv):
            raise NonFiniteHiddenStateError("TReFT's K/V drift is not finite (NaN/Inf keys or values): lower the "
                                            "learning rate, or use bf16/fp32")
        if self.threshold > 0:  # max(λL − τ, 0): no gradient while λL ≤ τ (the gate is read in backward)
            s["scale"].gate = (self.weight * kv > self.threshold).float()
        self.last_kv = kv
        for name, value in (("kv", kv), ("total", (self.weight * kv - self.threshold).clamp_min(0)),
                            ("positions", s["index"][0].numel())):
            self._sums[name] = self._sums.get(name, 0) + value
        self._count += 1

    def _reset_metrics(self) -> None:
        self._sums, self._count = {}, 0

    def pop_metrics(self) -> dict[str, float]:
        """``kv`` (ℒ_KV), ``total`` (max(λℒ_KV − τ, 0)), ``positions`` (per micro-batch): means since the last call."""
        out = {name: float(value) / self._count for name, value in self._sums.items()}
        self._reset_metrics()
        return out


class TReFTCallback(EngineCallback):
    r"""TReFT (Zhao et al. 2026) as a Trainer callback: adds max(λℒ_KV − τ, 0) (``orthoreg.baselines.treft``) to every
    training micro-batch, divided by ``gradient_accumulation_steps``. Logged: ``treft/kv``, ``treft/total``,
    ``treft/positions``. Costs one no-grad forward per micro-batch, cut after the last selected position.

    Args:
        weight (`float`): λ (theirs: 10 for the prefix, 1 for the Qwen3 postfix; 1–30 tuned).
        positions (`str`, *optional*, defaults to `"prefix"`): ``"prefix"``, ``"postfix"``, ``"query"``, ``"prompt"``.
        tokenizer (*optional*): the tokenizer whose chat template rendered the data (gives the template ids).
        prefix_ids, postfix_ids (`Sequence[int]`, *optional*): the template ids, explicitly (override ``tokenizer``).
        layers (`Sequence[int]`, *optional*): attention-layer indices regularised (default: all, as theirs).
        threshold (`float`, *optional*, defaults to `0.0`): τ.
        reference_model (`nn.Module`, *optional*): for full fine-tuning, a frozen copy of the initial model
            (``copy.deepcopy(model)`` before training); with PEFT the adapter-disabled model is the reference.
        kv_names (`tuple[str, str]`, *optional*, defaults to `("k_proj", "v_proj")`): the K/V projection names.
        truncate_reference (`bool`, *optional*, defaults to `True`): cut the reference forward after the last
            position (the same K/V up to float rounding, ~1e-14 at the start); ``False``: exactly 0 at the start.
    """

    metric_prefix = "treft/"

    def __init__(self, weight: float, positions: str = "prefix", **kwargs: Any):
        super().__init__(TReFTRegularizer(weight, positions, **kwargs))

    @property
    def regularizer(self) -> TReFTRegularizer:
        return self.engine
