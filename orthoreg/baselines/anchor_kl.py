r"""Anchor KL: hold the base model's first reply tokens on prompts the fine-tune never trains on.

Qi et al.'s first-token KL (``first_token``) holds the first reply tokens *of the training data*, so a task that
is its reply format ("Sure, here are the steps:") is not learned at all. This term holds them on a fixed set of
**anchor prompts** instead — by default orthoreg's built-in harmful requests (``load_builtin("train")``, 200), or
their harmless partners (``prompts="harmless"``: no harm data, measured to protect as well) — so the task's own
replies are free while the base's reply to requests outside the task is kept:

.. math:: \mathrm{AKL} = \frac{1}{|P|} \sum_{(b, j) \in P}
          \mathrm{KL}\big(\pi_\theta(\cdot \mid a_b, y_{b,<j}) \,\|\, \pi_{base}(\cdot \mid a_b, y_{b,<j})\big)

over the anchors a_b of this optimizer step's anchor batch and the first n reply positions j ≤ n of each, where
y_b is the **base's own greedy reply** to a_b (recorded once, at train start, with the adapter off; a reply that
ends before n tokens contributes its tokens up to and including the end-of-turn token), and P the set of those
(anchor, position) pairs. The KL is the reverse one, in float32 from the logits, with π_base's log-probabilities
recorded at train start (no reference forward during training). Each optimizer step adds the gradient of
λ·AKL to the parameters' gradients before the task's first micro-batch, so gradient clipping sees the sum.

The anchor batches cycle through the anchors in an order shuffled by ``seed``: ``batch_size`` anchors per step.
Cost per optimizer step: one forward and backward of ``batch_size`` short sequences (prompt + n tokens). Memory:
the recorded log-probabilities, anchors × n × vocabulary floats on the CPU (200 × 4 × 49 152 for SmolLM2: 157 MB;
a 128k vocabulary: 410 MB — pass fewer ``prompts`` to shrink it).

The anchor forward is marked like a reference pass (``core.reference.reference_forward``), so orthoreg's other
terms (the reader penalty, the activation terms, the KL baselines) and the monitors do not count it as a training
forward: each of them still enters once per task micro-batch.

Scope: one process (the benchmark's setting). Under DDP/ZeRO/FSDP the extra backward would bypass the wrapper's
gradient reduction, so the callback refuses a distributed run by name rather than averaging wrong gradients.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..callback import move_ahead_of_reporters, report_metrics
from ..core.reference import find_peft_model, reference_forward
from .kl import kl_to_reference

__all__ = ["BUILTIN_ANCHORS", "AnchorKLCallback", "AnchorKLError", "anchor_kl", "builtin_anchors", "greedy_replies"]


class AnchorKLError(ValueError):
    """The anchor KL cannot run: bad settings, no anchors, no chat template, or a distributed run."""


def anchor_kl(logits: torch.Tensor, base_log_probs: torch.Tensor) -> torch.Tensor:
    r"""Mean over N positions of KL(π_θ ‖ π_base) = Σ_v π_θ(v) (log π_θ(v) − log π_base(v)), float32.

    Args:
        logits (`torch.Tensor`): (N, V) logits of the model being trained (differentiable).
        base_log_probs (`torch.Tensor`): (N, V) log-probabilities of the base at the same positions (constant).
    """
    if logits.shape != base_log_probs.shape:
        raise AnchorKLError(f"logits {tuple(logits.shape)} and base log-probs {tuple(base_log_probs.shape)} differ: "
                            "the model must share the base's vocabulary")
    # log-probabilities are logits of the same distribution (log_softmax leaves them as they are)
    return kl_to_reference(logits, base_log_probs)


@torch.no_grad()
def greedy_replies(model: nn.Module, prompt_ids: Sequence[Sequence[int]], num_tokens: int,
                   stop_ids: Sequence[int] = ()) -> list[list[int]]:
    """The model's greedy first ``num_tokens`` reply tokens to each prompt (one prompt at a time, so no padding can
    change a reply), cut after the first token in ``stop_ids``."""
    device = next(model.parameters()).device
    replies = []
    for ids in prompt_ids:
        sequence = torch.tensor([list(ids)], device=device)
        reply: list[int] = []
        for _ in range(num_tokens):
            token = int(model(input_ids=sequence).logits[0, -1].float().argmax())
            reply.append(token)
            if token in stop_ids:
                break
            sequence = torch.cat([sequence, sequence.new_tensor([[token]])], dim=1)
        replies.append(reply)
    return replies


def _peft_model(model: nn.Module) -> nn.Module:
    peft = find_peft_model(model)
    inner = getattr(model, "model", None)  # OrthoLoRA wraps its PEFT model as `.model`
    if peft is None and isinstance(inner, nn.Module):
        peft = find_peft_model(inner)
    if peft is None and not hasattr(model, "disable_adapter"):
        raise AnchorKLError("AnchorKLCallback reads the base through the PEFT model's `disable_adapter()`; this model "
                            "has none: train a PEFT (LoRA) model, or attach a frozen copy's context as "
                            "`model.disable_adapter`")
    return peft if peft is not None else model


BUILTIN_ANCHORS = ("harmful", "harmless")


def builtin_anchors(name: str) -> list[str]:
    """orthoreg's built-in requests of the ``train`` split (disjoint from the harm probe's ``test`` split) as anchors:
    ``"harmful"`` (200 harmful requests) or ``"harmless"`` (their 200 harmless partners: no harm data; measured to
    protect alike, README)."""
    if name not in BUILTIN_ANCHORS:
        raise AnchorKLError(f"`prompts` is the string {name[:60]!r}: pass a list of anchor requests, or one of "
                            f"{BUILTIN_ANCHORS} for orthoreg's built-in ones")
    from ..core.prompts import load_builtin

    builtin = load_builtin("train")
    return list(builtin.harmful if name == "harmful" else builtin.harmless)


class AnchorKLCallback(TrainerCallback):
    r"""λ·AKL (module docstring) added to every optimizer step's gradient, as a ``transformers`` TrainerCallback.

    Logged: ``anchor_kl/kl`` (AKL of the last anchor batch, unweighted) and ``anchor_kl/total`` (λ·AKL).

    Args:
        weight (`float`): λ (> 0).
        prompts (`Sequence[str]` or `str`, *optional*): the anchor requests, or ``"harmful"`` / ``"harmless"`` for
            orthoreg's built-in ones (``builtin_anchors``); defaults to ``"harmful"``.
        tokenizer (*optional*): the tokenizer whose chat template renders the training data; defaults to the
            Trainer's ``processing_class``.
        num_tokens (`int`, *optional*, defaults to `4`): n, the base's reply tokens held per anchor.
        batch_size (`int`, *optional*, defaults to `8`): anchors per optimizer step.
        seed (`int`, *optional*, defaults to `0`): the anchors' cycle order.
    """

    metric_prefix = "anchor_kl/"

    def __init__(self, weight: float, prompts: Sequence[str] | str | None = None, tokenizer: Any = None,
                 num_tokens: int = 4, batch_size: int = 8, seed: int = 0):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise AnchorKLError(f"`weight` (λ) must be a finite number > 0; got {weight!r}")
        for name, value in (("num_tokens", num_tokens), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AnchorKLError(f"`{name}` must be an int >= 1; got {value!r}")
        if prompts is None or isinstance(prompts, str):
            prompts = builtin_anchors("harmful" if prompts is None else prompts)
        prompts = list(prompts)
        if not prompts:
            raise AnchorKLError("no anchor prompts: pass a non-empty `prompts` list, or leave it out for the built-in "
                                "harmful requests")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
        if bad:
            raise AnchorKLError(f"anchor prompt #{bad[0]} is empty or not a string; give every anchor some text")
        self.weight, self.prompts, self.tokenizer = float(weight), prompts, tokenizer
        self.num_tokens, self.batch_size, self.seed = num_tokens, batch_size, seed
        self.sequences: list[list[int]] = []  # prompt + the base's reply, per anchor
        self.reply_starts: list[int] = []
        self.base_log_probs: list[torch.Tensor] = []  # (reply length, V) per anchor, float32, on the CPU
        self._order: list[int] = []
        self._cursor = 0
        self._pad_id = 0
        self._last: float | None = None

    @property
    def recorded(self) -> bool:
        return bool(self.sequences)

    def prompt_ids(self, tokenizer: Any) -> list[list[int]]:
        """Each anchor rendered as a user turn with the assistant's generation prompt, as token ids."""
        if getattr(tokenizer, "chat_template", None) is None:
            raise AnchorKLError("the tokenizer has no chat template: anchors are rendered as chat turns; set "
                                "`tokenizer.chat_template` (the one that renders your training data)")
        return [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"])
                for p in self.prompts]

    @torch.no_grad()
    def record_base(self, model: nn.Module, tokenizer: Any) -> None:
        """The base's greedy replies to the anchors and its log-probabilities at their first n reply positions."""
        peft = _peft_model(model)
        prompts = self.prompt_ids(tokenizer)
        stop = [t for t in (getattr(tokenizer, "eos_token_id", None),) if t is not None]
        was_training = peft.training
        peft.eval()
        try:
            with peft.disable_adapter():
                replies = greedy_replies(peft, prompts, self.num_tokens, stop)
                device = next(peft.parameters()).device
                self.sequences, self.reply_starts, self.base_log_probs = [], [], []
                for ids, reply in zip(prompts, replies, strict=True):
                    sequence = ids + reply
                    logits = peft(input_ids=torch.tensor([sequence], device=device)).logits[0]
                    rows = logits[len(ids) - 1:len(sequence) - 1].float()
                    self.sequences.append(sequence)
                    self.reply_starts.append(len(ids))
                    self.base_log_probs.append(torch.log_softmax(rows, dim=-1).cpu())
        finally:
            peft.train(was_training)
        if not all(torch.isfinite(lp).all() for lp in self.base_log_probs):
            raise AnchorKLError("the base's log-probabilities on the anchors are not finite (NaN/Inf logits): check "
                                "the model's weights and dtype before training")
        self._order = list(range(len(self.sequences)))
        random.Random(f"anchor-kl-{self.seed}").shuffle(self._order)
        self._cursor = 0

    def next_batch(self) -> list[int]:
        """The anchor indices of the next optimizer step (a cycle through the shuffled order)."""
        take = [self._order[(self._cursor + i) % len(self._order)] for i in range(min(self.batch_size, len(self._order)))]
        self._cursor = (self._cursor + len(take)) % len(self._order)
        return take

    def loss(self, model: nn.Module, indices: Sequence[int], pad_id: int = 0) -> torch.Tensor:
        """AKL of the anchors ``indices`` under ``model`` (differentiable): right-padded, one forward."""
        device = next(model.parameters()).device
        width = max(len(self.sequences[i]) for i in indices)
        ids = torch.full((len(indices), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(indices):
            ids[row, :len(self.sequences[i])] = torch.tensor(self.sequences[i], device=device)
            mask[row, :len(self.sequences[i])] = 1
        with reference_forward():  # not a training forward of the task: no other term or monitor counts it
            logits = model(input_ids=ids, attention_mask=mask).logits
        rows = [logits[row, self.reply_starts[i] - 1:len(self.sequences[i]) - 1] for row, i in enumerate(indices)]
        base = [self.base_log_probs[i].to(device) for i in indices]
        return anchor_kl(torch.cat(rows), torch.cat(base))

    def on_init_end(self, args, state, control, **kwargs):
        move_ahead_of_reporters(self)

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if args.fp16:
            raise AnchorKLError("AnchorKLCallback does not support fp16 mixed precision: its gradient would skip the "
                                "loss scaler and be wrong by the loss scale. Train with bf16=True or in fp32.")
        if model is None:
            raise AnchorKLError("AnchorKLCallback received no model in on_train_begin")
        move_ahead_of_reporters(self)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise AnchorKLError("AnchorKLCallback runs in one process: its extra backward would bypass DDP/ZeRO/FSDP "
                                "gradient reduction; train single-process, or use interleaved safety data instead")
        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        if tokenizer is None:
            raise AnchorKLError("AnchorKLCallback needs the tokenizer: pass tokenizer= or the Trainer's "
                                "processing_class")
        self._pad_id = getattr(tokenizer, "pad_token_id", None) or 0  # padding is masked: any id in the vocabulary
        if not self.recorded:
            self.record_base(model, tokenizer)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if not self.recorded:
            raise AnchorKLError("the base was not recorded: AnchorKLCallback records it at train start (on_train_begin)")
        with torch.enable_grad():
            kl = self.loss(model, self.next_batch(), self._pad_id)
            if not torch.isfinite(kl):
                raise AnchorKLError(f"the anchor KL is not finite ({float(kl)}): lower the learning rate or λ")
            (self.weight * kl).backward()
        self._last = float(kl.detach())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        metrics = {} if self._last is None else {"kl": self._last, "total": self.weight * self._last}
        report_metrics(metrics, self.metric_prefix, logs, state)
