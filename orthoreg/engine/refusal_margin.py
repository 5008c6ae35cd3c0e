r"""A live harm signal without generation: the **refusal margin** at the first reply token of a fixed probe set.

For a request x rendered with the tokenizer's chat template and generation prompt, and two disjoint sets of reply
*openers* — the base model's own refusal openers R and compliance openers C (below) —

.. math::

    \mathrm{margin}(x) = \log\sum_{t \in R} p(t \mid x) \;-\; \log\sum_{t \in C} p(t \mid x)
        = \operatorname{logsumexp}_{t \in R} \log p(t \mid x) - \operatorname{logsumexp}_{t \in C} \log p(t \mid x)

at the position after the generation prompt (log p = log-softmax of that position's logits, in float32, or float64
when the logits are float64, whatever the training dtype; autocast is off inside the probe). Averaged over the probe
set's harmful requests it is ``orthoreg/harm_margin`` (how strongly the model still opens a refusal: it falls as
fine-tuning erodes safety), over their harmless partners ``orthoreg/overrefusal_margin`` (it rises when the model
starts refusing benign requests); each ``…_delta`` is the value minus the base model's, recorded before the first
update, so both deltas are exactly 0 until the weights move. Units: nats; a delta of −1 means the odds of opening a
refusal rather than a compliance fell by a factor e.

**Openers** (``record_base``, once, on the base model: a PEFT model with its adapter disabled). One forward of the
probe set gives, per request, the base distribution p₀(· | x) at the first reply position; its argmax is the first
token of the base model's greedy reply. For each side s (harmful H, harmless S), g_s(t) counts the side's requests
whose greedy first token is t and p̄_s(t) is the mean of p₀(t | x) over them. A token is a refusal-opener candidate
when p̄_H(t) > p̄_S(t), a compliance-opener candidate when p̄_S(t) > p̄_H(t) (so the sets are disjoint); special
tokens and ids beyond the tokenizer are never candidates. Each side keeps its ``openers_per_side`` candidates
ranked by (g_s(t) descending, p̄_s(t) descending, id ascending): the most frequent greedy openers first, filled up
by the most probable ones. Deterministic: one eval forward, no sampling, ties broken by token id.

**Probe set**: ``pairs`` pairs of ``load_builtin("test")`` (held-out harmful requests and their harmless partners),
taken round-robin over the harm categories in file order (every category before any repeats), or your own paired
lists. Both sets go through **one** batched, left-padded forward (position ids counted from each row's first real
token, only the last position's logits computed where the model supports ``logits_to_keep``) under
``torch.no_grad()``, in eval mode (every module's own train/eval flag is restored afterwards), inside
``torch.random.fork_rng`` (no random number of the training stream is consumed), marked as a reference forward (no
orthoreg regulariser or monitor counts it). No hook is installed and no gradient is touched.

**Distributed**: every rank runs the probe (a ZeRO-3 or FSDP forward is collective, so every rank must run it
there; under DDP the replicas agree and the ranks wait for each other anyway, so this costs no extra wall time).
``record_base`` hands the main process's openers and base margins to every rank (call it on every rank);
``measure`` needs no communication, and the Trainer reports rank 0's logs.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.distributed import broadcast_from_main
from ..core.prompt_encoding import pad_token_id, text_tokenizer
from ..core.prompts import load_builtin, prompt_hash
from ..core.reference import find_peft_model, reference_forward
from ..terms.token_rows import no_autocast
from .metrics import (
    HARM_MARGIN,
    HARM_MARGIN_DELTA,
    OVERREFUSAL_MARGIN,
    OVERREFUSAL_MARGIN_DELTA,
    metric_names,
)

__all__ = ["HARM_SIGNAL_STATE_KEY", "HarmSignalError", "HarmSignalSchedule", "RefusalMarginProbe", "builtin_probe_pairs", "pick_openers"]

STATE_FORMAT = 1
# Where a Trainer front door keeps the probe's base in TrainerState.stateful_callbacks (JSON, every checkpoint).
HARM_SIGNAL_STATE_KEY = "orthoreg_harm_signal"


class HarmSignalError(ValueError):
    """The refusal-margin probe cannot run: empty probe set, no chat template, or a model of another vocabulary."""


def builtin_probe_pairs(pairs: int = 16) -> tuple[list[str], list[str]]:
    """The first ``pairs`` pairs of ``load_builtin("test")`` taken round-robin over the harm categories (in the
    order they first appear): (harmful requests, their harmless partners)."""
    contrast = load_builtin("test")
    if not isinstance(pairs, int) or not 1 <= pairs <= len(contrast.harmful):
        raise HarmSignalError(f"the probe needs 1 <= pairs <= {len(contrast.harmful)} (the built-in test split's "
                              f"pairs); got {pairs!r}: pass a pair count in that range, or your own harmful/harmless lists")
    by_category: dict[str, list[int]] = {}
    for index, category in enumerate(contrast.categories or ["all"] * len(contrast.harmful)):
        by_category.setdefault(category, []).append(index)
    order = [rows[r] for r in range(max(map(len, by_category.values()))) for rows in by_category.values() if r < len(rows)]
    chosen = order[:pairs]
    return [contrast.harmful[i] for i in chosen], [contrast.harmless[i] for i in chosen]


class RefusalMarginProbe:
    """The refusal margin of a fixed probe set (module docstring: the formula, the openers, the forward).

    Example:
        >>> probe = RefusalMarginProbe(pairs=16)
        >>> probe.record_base(model, tokenizer)     # before the first update (PEFT: the adapter is switched off)
        >>> probe.measure(model)                    # {'orthoreg/harm_margin': 3.1, 'orthoreg/harm_margin_delta': 0.0, …}

    Args:
        pairs (`int`, *optional*, defaults to `16`): built-in held-out pairs to probe with (``builtin_probe_pairs``).
        harmful, harmless (`Sequence[str]`, *optional*): your own paired requests instead of the built-in ones.
        openers_per_side (`int`, *optional*, defaults to `4`): refusal and compliance openers kept from the base.
        refusal_openers, compliance_openers (`Sequence[int]`, *optional*): token ids to use instead of the recorded
            openers (both or neither; disjoint) — e.g. for a base model that never refuses.
    """

    def __init__(self, pairs: int = 16, *, harmful: Sequence[str] | None = None,
                 harmless: Sequence[str] | None = None, openers_per_side: int = 4,
                 refusal_openers: Sequence[int] | None = None, compliance_openers: Sequence[int] | None = None):
        if (harmful is None) != (harmless is None):
            raise HarmSignalError("pass both `harmful` and `harmless` (paired requests), or neither for the built-in set")
        harmful, harmless = builtin_probe_pairs(pairs) if harmful is None else (list(harmful), list(harmless))
        if not harmful or not harmless:
            raise HarmSignalError("the probe set is empty: pass non-empty `harmful` and `harmless` request lists, "
                                  "or leave them out for the built-in held-out pairs")
        empty = [i for i, p in enumerate(harmful + harmless) if not isinstance(p, str) or not p.strip()]
        if empty:
            raise HarmSignalError(f"probe request #{empty[0]} (harmful first, then harmless) is empty or not a string; "
                                  "give every request some text")
        if not isinstance(openers_per_side, int) or openers_per_side < 1:
            raise HarmSignalError(f"`openers_per_side` must be an int >= 1; got {openers_per_side!r}")
        if (refusal_openers is None) != (compliance_openers is None):
            raise HarmSignalError("pass both `refusal_openers` and `compliance_openers`, or neither to record them")
        self.harmful, self.harmless = harmful, harmless
        self.openers_per_side = openers_per_side
        self.given_openers = None if refusal_openers is None else (
            _check_opener_ids(refusal_openers, "refusal_openers"), _check_opener_ids(compliance_openers, "compliance_openers"))
        if self.given_openers and set(self.given_openers[0]) & set(self.given_openers[1]):
            raise HarmSignalError("`refusal_openers` and `compliance_openers` share token ids "
                                  f"{sorted(set(self.given_openers[0]) & set(self.given_openers[1]))}; make them disjoint")
        self.refusal_openers: list[int] = []
        self.compliance_openers: list[int] = []
        self.base: dict[str, float] = {}
        self.vocab_width = 0
        self.prompt_ids: list[list[int]] = []  # harmful requests first, then the harmless ones
        self.pad_id = 0  # the tokenizer's pad id (masked out: its value never changes a margin)
        self._batches: dict[torch.device, dict[str, torch.Tensor]] = {}

    @property
    def recorded(self) -> bool:
        return bool(self.base)

    # ------------------------------------------------------------------ base recording
    def record_base(self, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        """Encodes the probe set with ``tokenizer``'s chat template, picks the openers from the base model's first
        reply tokens and records the base margins; returns them (``measure``'s keys, deltas 0). Call it on every
        rank, before the first update; a PEFT model is read with its adapter disabled."""
        tokenizer = text_tokenizer(tokenizer)
        if tokenizer is None:
            raise HarmSignalError("record_base needs the model's tokenizer: pass `tokenizer=` (HarmSignalCallback) or "
                                  "`processing_class=tokenizer` to the Trainer")
        if not getattr(tokenizer, "chat_template", None):
            raise HarmSignalError("the tokenizer has no chat template: the probe renders each request as a user turn "
                                  "with the generation prompt; set `tokenizer.chat_template` (the chat model's own "
                                  "template) or pass the chat model's tokenizer")
        self.prompt_ids = _encode(tokenizer, self.harmful + self.harmless)
        self._batches.clear()
        excluded = set(getattr(tokenizer, "all_special_ids", []) or [])
        peft = find_peft_model(model)
        self.pad_id = pad_token_id(tokenizer)
        with peft.disable_adapter() if peft is not None else contextlib.nullcontext():
            log_probs = self._first_reply_log_probs(model)
        if self.given_openers is None:
            refusal, compliance = pick_openers(log_probs[: len(self.harmful)], log_probs[len(self.harmful):],
                                               self.openers_per_side, min(len(tokenizer), log_probs.shape[-1]), excluded)
        else:
            refusal, compliance = self.given_openers
            beyond = [t for t in refusal + compliance if t >= log_probs.shape[-1]]
            if beyond:
                raise HarmSignalError(f"opener ids {beyond} are beyond the model's {log_probs.shape[-1]} output tokens; "
                                      "give ids of this model's vocabulary")
        self.refusal_openers, self.compliance_openers, self.vocab_width = refusal, compliance, log_probs.shape[-1]
        harm, overrefusal = self._mean_margins(log_probs)
        state = broadcast_from_main({"refusal": refusal, "compliance": compliance,
                                     "base": {HARM_MARGIN: harm, OVERREFUSAL_MARGIN: overrefusal}})
        self.refusal_openers, self.compliance_openers = state["refusal"], state["compliance"]
        self.base = state["base"]
        return self._named(harm, overrefusal)

    # ------------------------------------------------------------------ measurement
    def measure(self, model: nn.Module) -> dict[str, float]:
        """The margins of ``model`` now, and their change since the base: ``orthoreg/harm_margin``,
        ``orthoreg/harm_margin_delta``, ``orthoreg/overrefusal_margin``, ``orthoreg/overrefusal_margin_delta``."""
        if not self.recorded:
            raise HarmSignalError("the probe has no base recording: call `record_base(model, tokenizer)` on the base "
                                  "model before measuring (HarmSignalCallback does it at train begin)")
        return self._named(*self._mean_margins(self._first_reply_log_probs(model)))

    def margins(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-request margins (harmful requests, harmless requests) of ``model``, float32 or float64."""
        log_probs = self._first_reply_log_probs(model)
        return self._margins(log_probs[: len(self.harmful)]), self._margins(log_probs[len(self.harmful):])

    def _margins(self, log_probs: torch.Tensor) -> torch.Tensor:
        refusal = torch.tensor(self.refusal_openers, device=log_probs.device)
        compliance = torch.tensor(self.compliance_openers, device=log_probs.device)
        return log_probs[:, refusal].logsumexp(-1) - log_probs[:, compliance].logsumexp(-1)

    def _mean_margins(self, log_probs: torch.Tensor) -> tuple[float, float]:
        harm = self._margins(log_probs[: len(self.harmful)]).mean()
        overrefusal = self._margins(log_probs[len(self.harmful):]).mean()
        return tuple(torch.stack([harm, overrefusal]).tolist())  # one host transfer

    def _named(self, harm: float, overrefusal: float) -> dict[str, float]:
        return metric_names({
            HARM_MARGIN: harm, HARM_MARGIN_DELTA: harm - self.base.get(HARM_MARGIN, harm),
            OVERREFUSAL_MARGIN: overrefusal,
            OVERREFUSAL_MARGIN_DELTA: overrefusal - self.base.get(OVERREFUSAL_MARGIN, overrefusal),
        })

    @torch.no_grad()
    def _first_reply_log_probs(self, model: nn.Module) -> torch.Tensor:
        """log p(· | request) at the first reply position of every probe request (rows: harmful, then harmless)."""
        while getattr(type(model), "_orthoreg_wrapper", False):  # OrthoLoRA: probe its PEFT model, not its loss
            model = model.model
        embeddings = model.get_input_embeddings()
        device = embeddings.weight.device
        rows = getattr(embeddings, "num_embeddings", None)
        top = max(self.pad_id, *(max(ids) for ids in self.prompt_ids))
        if isinstance(rows, int) and top >= rows:
            raise HarmSignalError(f"the probe's token ids reach {top} but the model embeds {rows} tokens: the tokenizer "
                                  "belongs to another model; record the probe with this model's own tokenizer")
        batch = self.probe_inputs(device, _forward_parameters(model))
        forward = getattr(model, "_original_forward", model)  # accelerate's mixed-precision wrapper re-enters autocast
        modes = [(module, module.training) for module in model.modules()]
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        try:
            model.eval()
            with torch.random.fork_rng(devices=rng_devices), no_autocast(device), reference_forward():
                logits = forward(**batch).logits[:, -1]
        finally:
            for module, training in modes:
                module.training = training
        if self.vocab_width and logits.shape[-1] != self.vocab_width:
            raise HarmSignalError(f"the probe was recorded on a model with {self.vocab_width} output tokens; this model "
                                  f"has {logits.shape[-1]}: it is another model (or its embeddings were resized); call "
                                  "record_base on this model's base before training")
        return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)

    def probe_inputs(self, device: torch.device, accepted: set[str]) -> dict[str, torch.Tensor]:
        """The probe set as one left-padded batch on ``device`` (cached per device): ``input_ids``,
        ``attention_mask`` and, where the model's forward takes them (``accepted``), ``position_ids`` counted from
        each row's first real token, ``use_cache=False`` and ``logits_to_keep=1``."""
        if device not in self._batches:
            width = max(map(len, self.prompt_ids))
            ids = torch.full((len(self.prompt_ids), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, prompt in enumerate(self.prompt_ids):  # left padding: the last column is the first reply position
                ids[row, width - len(prompt):] = torch.tensor(prompt)
                mask[row, width - len(prompt):] = 1
            batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}
            self._batches[device] = {k: v.to(device) for k, v in batch.items()}
        batch = {k: v for k, v in self._batches[device].items() if k != "position_ids" or k in accepted}
        extra = {"use_cache": False} if "use_cache" in accepted else {}
        return {**batch, **extra, **({"logits_to_keep": 1} if "logits_to_keep" in accepted else {})}

    # ------------------------------------------------------------------ state (JSON)
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the encoded probe set, the openers, the base margins and the vocabulary width."""
        return {"format_version": STATE_FORMAT, "prompt_hash": prompt_hash(self.harmful, self.harmless),
                "prompt_ids": self.prompt_ids, "pad_id": self.pad_id, "refusal_openers": self.refusal_openers,
                "compliance_openers": self.compliance_openers, "base": dict(self.base), "vocab_width": self.vocab_width}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != STATE_FORMAT:
            raise HarmSignalError(f"unknown harm-signal state format {state.get('format_version')!r}; record again")
        if state["prompt_hash"] != prompt_hash(self.harmful, self.harmless):
            raise HarmSignalError("the saved harm-signal state was recorded on another probe set; resume with the same "
                                  "`pairs` / harmful / harmless requests")
        self.prompt_ids = [list(map(int, ids)) for ids in state["prompt_ids"]]
        self.pad_id = int(state["pad_id"])
        self.refusal_openers = [int(t) for t in state["refusal_openers"]]
        self.compliance_openers = [int(t) for t in state["compliance_openers"]]
        self.base = {k: float(v) for k, v in state["base"].items()}
        self.vocab_width = int(state["vocab_width"])
        self._batches.clear()


def pick_openers(harmful_log_probs: torch.Tensor, harmless_log_probs: torch.Tensor, per_side: int, vocab: int,
                 excluded: set[int]) -> tuple[list[int], list[int]]:
    """(refusal openers, compliance openers) from the base model's first-reply log-probabilities (module docstring:
    candidates by p̄_H vs p̄_S, ranked by greedy count, then mean probability, then id)."""
    mean_h = harmful_log_probs.double().exp().mean(0)[:vocab]
    mean_s = harmless_log_probs.double().exp().mean(0)[:vocab]
    allowed = torch.ones(vocab, dtype=torch.bool, device=mean_h.device)
    allowed[[t for t in excluded if 0 <= t < vocab]] = False
    chosen = []
    for log_probs, mean, other in ((harmful_log_probs, mean_h, mean_s), (harmless_log_probs, mean_s, mean_h)):
        greedy = torch.bincount(log_probs.argmax(-1), minlength=log_probs.shape[-1])[:vocab].double()
        key = torch.where(allowed & (mean > other), greedy + mean.clamp(max=1 - 1e-12), torch.full_like(mean, -1.0))
        order = torch.sort(key, descending=True, stable=True).indices[:per_side]
        chosen.append([int(t) for t in order if key[t] >= 0])
    if not chosen[0] or not chosen[1]:
        side = "refusal" if not chosen[0] else "compliance"
        raise HarmSignalError(f"the base model's first reply tokens give no {side} opener (no token is more likely on "
                              "that side's requests); pass `refusal_openers=` and `compliance_openers=` token ids")
    return chosen[0], chosen[1]


def _check_opener_ids(ids: Sequence[int], name: str) -> list[int]:
    out = list(ids)
    if not out or not all(isinstance(t, int) and t >= 0 for t in out):
        raise HarmSignalError(f"`{name}` must be a non-empty list of token ids (ints >= 0); got {ids!r}")
    return out


def _encode(tokenizer: Any, requests: list[str]) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r}], tokenize=False, add_generation_prompt=True)
             for r in requests]
    encoded = [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]  # the template has them
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise HarmSignalError(f"probe request #{empty[0]} renders to no tokens (its row would be all padding): the chat "
                              "template drops the user message; use a template that renders the user turn")
    return encoded


def _forward_parameters(model: nn.Module) -> set[str]:
    """The named parameters of the causal LM's forward (through PEFT and DDP/DeepSpeed wrappers)."""
    peft = find_peft_model(model)
    inner = peft.get_base_model() if peft is not None else model
    while isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    return set(inspect.signature(inner.forward).parameters)


class HarmSignalSchedule:
    """The harm signal over one training run, for any front door (``firewall.HarmSignalCallback``, and
    ``OrthoRegCallback`` and ``OrthoLoRA`` with ``harm_signal_every``): the base recorded — or restored from a
    checkpoint — at the start, a reading after every ``every_n_steps``-th optimizer step (once per step, however
    often it is asked), each reading handed out once (``pop``).

    Args:
        every_n_steps (`int`): optimizer steps between readings (>= 1).
        probe (`RefusalMarginProbe`, *optional*): defaults to ``RefusalMarginProbe()`` (16 built-in pairs); one
            already recorded is used as is.
    """

    def __init__(self, every_n_steps: int = 10, probe: RefusalMarginProbe | None = None):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise HarmSignalError(f"`every_n_steps` must be an int >= 1; got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.probe = probe if probe is not None else RefusalMarginProbe()
        self.readings: list[dict[str, float]] = []
        self.pending: dict[str, float] = {}

    def start(self, model: nn.Module, tokenizer: Any, global_step: int, stored: dict[str, Any] | None) -> dict[str, Any]:
        """Restores the base of step 0 from ``stored`` (a checkpoint's state) when resuming, else records it on
        ``model`` now (a PEFT model with its adapter switched off); returns the state to save with every checkpoint.
        A full fine-tune (no PEFT model) resumed without a stored base is refused: recording then would take the
        resumed weights as the base."""
        if global_step > 0 and stored is not None:
            self.probe.load_state_dict(stored)
        elif not self.probe.recorded:
            if global_step > 0 and find_peft_model(model) is None:
                raise HarmSignalError(
                    f"resuming a full fine-tune at step {global_step}, but the checkpoint holds no harm-signal base "
                    "(it was written without the harm signal): recording now would take the resumed weights as the "
                    "base. Start from step 0, or pass a probe recorded on the base model (probe=)")
            self.probe.record_base(model, tokenizer)
        return self.probe.state_dict()

    def after_step(self, model: nn.Module, global_step: int) -> dict[str, float] | None:
        """The reading after optimizer step ``global_step`` when it is due and not yet taken (else ``None``)."""
        taken = self.readings and self.readings[-1]["step"] == global_step
        if global_step < 1 or global_step % self.every_n_steps or taken:
            return None
        return self.read(model, global_step)

    def read(self, model: nn.Module, global_step: int) -> dict[str, float]:
        """Measures now, whether due or not; the reading is kept (``readings``) and handed out by ``pop``."""
        self.pending = self.probe.measure(model)
        self.readings.append({"step": global_step, **self.pending})
        return self.pending

    def pop(self) -> dict[str, float]:
        """The latest reading not yet handed out ({} if none), then forgets it."""
        pending, self.pending = self.pending, {}
        return pending
