r"""The anchor KL: hold the base model's first reply tokens on requests the fine-tune never trains on.

Qi et al.'s first-token KL holds the first reply tokens *of the training data*, so a task that is its reply format
("Sure, here are the steps:") is not learned at all. This term holds them on a fixed set of **anchor requests**
instead — orthoreg's 200 built-in harmless requests in ``OrthoRegConfig.recommended()`` (no harm data) — so the
task's own replies are free while the base's reply to requests outside the task is kept:

.. math:: \mathrm{AKL} = \frac{1}{|P|} \sum_{(b, j) \in P}
          \mathrm{KL}\big(\pi_\theta(\cdot \mid a_b, y_{b,<j}) \,\|\, \pi_{base}(\cdot \mid a_b, y_{b,<j})\big)

over the anchors a_b of this optimizer step's anchor batch and the first n reply positions j ≤ n of each, where
y_b is the **base's own greedy reply** to a_b (recorded once, at train start, on the model before any update — a
PEFT adapter switched off; a reply that ends before n tokens contributes its tokens up to and including the
end-of-turn token), and P the set of those (anchor, position) pairs. The KL is ``terms.reply_kl``'s (reverse, float32
from the logits), with π_base's log-probabilities recorded at train start (no reference forward during training).
Each optimizer step adds the gradient of λ·AKL to the parameters' gradients (``backward``) before the task's first
micro-batch, so gradient clipping and the optimizer see the sum.

**Which anchors, when.** The anchors cycle in an order shuffled by the run's seed; optimizer step t of rank r (of W
data-parallel ranks) takes the ``batch_size`` anchors from position (t·W + r)·``batch_size`` of the cycle, so a
resumed run continues the same sequence and ranks hold different anchors.

**Data parallel.** The anchor backward runs on the bare model, outside DDP's forward, so DDP does not reduce it:
it accumulates in each rank's ``.grad`` (DDP's hooks fire only for a backward its own forward prepared), and the
task's synchronised backward then all-reduces the whole accumulated gradient. The update is therefore the mean over
ranks of (task gradient + λ∇AKL of that rank's anchors) — λ times the mean of the ranks' AKL, like the task loss.
DeepSpeed ZeRO and FSDP reduce (or shard) every backward as it runs, so there a separate backward would be wrong
(``sharded_backend`` names them; the front doors refuse the term there).

**Other terms.** The anchor forward runs under ``core.reference.reference_forward()``, so orthoreg's other terms
(reader, activation terms, the KL baselines) and the monitors do not count it as a training forward; it runs with
activation checkpointing switched off (``checkpointing_off``: the anchor batch is small), so no recompute of it can
run later, unmarked, inside a backward.

**Through the loss** (``OrthoLoRA``, a custom loop): ``weighted_loss`` returns λ·AKL of the anchor batch of the
c-th training forward, to be added to that forward's loss; with ``accelerator.backward``'s 1/GA the step's term is
λ times the mean of its micro-batches' AKL, and the backend reduces it with the task's (one backward).

Cost per optimizer step: one forward and backward of ``batch_size`` short sequences (request + n tokens). Memory:
the recorded log-probabilities, anchors × n × vocabulary float32 on the CPU (200 × 4 × 49 152 for SmolLM2: 157 MB;
a 128k vocabulary: 410 MB — fewer anchors shrink it).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.reference import find_peft_model, reference_forward
from ..core.zero3 import is_zero3_partitioned
from ..terms.reply_kl import reply_kl
from .prompts import AnchorKLError, anchor_prompts, check_prompts

__all__ = ["AnchorKL", "anchor_kl_for", "check_anchor_backend", "checkpointing_off", "data_parallel_rank",
           "greedy_replies", "sharded_backend"]


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


@contextlib.contextmanager
def checkpointing_off(model: nn.Module):
    """Switches HF activation checkpointing (every module's ``gradient_checkpointing`` flag) off inside the block."""
    switched = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in switched:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in switched:
            module.gradient_checkpointing = True


def sharded_backend(args: Any, model: nn.Module, accelerator: Any = None) -> str | None:
    """``"DeepSpeed"`` or ``"FSDP"`` when the run shards or reduces gradients inside every backward (TrainingArguments,
    an accelerator, an accelerate launch, or the parameters themselves say so), else ``None`` (one process, or DDP)."""
    def flag(name: str) -> bool:
        return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")

    kind = str(getattr(getattr(accelerator, "state", None), "distributed_type", "")).upper()
    if "DEEPSPEED" in kind or getattr(args, "deepspeed", None) or flag("ACCELERATE_USE_DEEPSPEED") \
            or is_zero3_partitioned(model):
        return "DeepSpeed"
    if "FSDP" in kind or getattr(args, "fsdp", None) or flag("ACCELERATE_USE_FSDP") \
            or any(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor" for p in model.parameters()):
        return "FSDP"
    return None


def data_parallel_rank() -> tuple[int, int]:
    """(rank, world size) of this process, (0, 1) without ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_anchor_backend(args: Any, model: Any, what: str) -> None:
    """Refuses fp16 and the sharded backends (``anchor.sharded_backend``) by name, with the fix."""
    if args.fp16:
        raise AnchorKLError(f"{what} does not support fp16 mixed precision: its gradient would skip the loss scaler "
                            "and be wrong by the loss scale. Train with bf16=True or in fp32.")
    backend = sharded_backend(args, model)
    if backend is not None:
        raise AnchorKLError(f"{what} runs in one process or under DDP: under {backend} its separate backward would "
                            "bypass the sharded gradient reduction. Train with DDP, or turn the anchor KL off "
                            "(OrthoRegConfig(anchor_kl_weight=0), --orthoreg_anchor_kl_weight 0).")


class AnchorKL:
    r"""λ·AKL (module docstring): records the base on the anchors, then adds its gradient once per optimizer step.

    Args:
        weight (`float`): λ (> 0).
        prompts (`Sequence[str]`): the anchor requests (``anchor.prompts.anchor_prompts`` resolves names and files).
        num_tokens (`int`, *optional*, defaults to `4`): n, the base's reply tokens held per anchor.
        batch_size (`int`, *optional*, defaults to `8`): anchors per optimizer step and rank.
    """

    def __init__(self, weight: float, prompts: Sequence[str], num_tokens: int = 4, batch_size: int = 8):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise AnchorKLError(f"the anchor KL's weight (λ) must be a finite number > 0; got {weight!r}")
        for name, value in (("num_tokens", num_tokens), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AnchorKLError(f"the anchor KL's `{name}` must be an int >= 1; got {value!r}")
        self.weight, self.prompts = float(weight), check_prompts(prompts)
        self.num_tokens, self.batch_size = num_tokens, batch_size
        self.sequences: list[list[int]] = []  # request + the base's reply, per anchor
        self.reply_starts: list[int] = []
        self.base_log_probs: list[torch.Tensor] = []  # (reply length, V) per anchor, float32, on the CPU
        self.order: list[int] = []
        self.pad_id = 0
        self._kl_sum: torch.Tensor | float = 0.0
        self._kl_count = 0

    @classmethod
    def from_config(cls, config: Any, anchors: Sequence[str] | None = None) -> AnchorKL:
        """The anchor KL ``config``'s ``anchor_kl_*`` fields describe (``anchor_kl_weight`` > 0); ``anchors``
        override ``config.anchor_kl_prompts``. Not recorded yet."""
        return cls(config.anchor_kl_weight, anchor_prompts(config.anchor_kl_prompts if anchors is None else anchors),
                   config.anchor_kl_tokens, config.anchor_kl_batch_size)

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
    def record_base(self, model: nn.Module, tokenizer: Any, seed: int = 0) -> None:
        """The base's greedy replies to the anchors and its log-probabilities at their first n reply positions, and
        the anchors' cycle order (shuffled by ``seed``).

        The base is ``model`` with its PEFT adapter switched off; a model without an adapter is read as it is, so
        the caller records a full fine-tune before its first update."""
        peft = find_peft_model(model)
        inner = getattr(model, "model", None)  # OrthoLoRA wraps its PEFT model as `.model`
        if peft is None and isinstance(inner, nn.Module):
            peft = find_peft_model(inner)
        reader = peft if peft is not None else model
        prompts = self.prompt_ids(tokenizer)
        stop = [t for t in (getattr(tokenizer, "eos_token_id", None),) if t is not None]
        was_training = reader.training
        reader.eval()
        try:
            with peft.disable_adapter() if peft is not None else contextlib.nullcontext():
                replies = greedy_replies(reader, prompts, self.num_tokens, stop)
                device = next(reader.parameters()).device
                self.sequences, self.reply_starts, self.base_log_probs = [], [], []
                for ids, reply in zip(prompts, replies, strict=True):
                    sequence = ids + reply
                    logits = reader(input_ids=torch.tensor([sequence], device=device)).logits[0]
                    self.sequences.append(sequence)
                    self.reply_starts.append(len(ids))
                    self.base_log_probs.append(torch.log_softmax(logits[len(ids) - 1:len(sequence) - 1].float(),
                                                                 dim=-1).cpu())
        finally:
            reader.train(was_training)
        if not all(torch.isfinite(lp).all() for lp in self.base_log_probs):
            raise AnchorKLError("the base's log-probabilities on the anchors are not finite (NaN/Inf logits): check "
                                "the model's weights and dtype before training")
        self.order = list(range(len(self.sequences)))
        random.Random(f"anchor-kl-{seed}").shuffle(self.order)
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0  # padding is masked: any id in the vocabulary

    def batch_for(self, step: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """The anchor indices of optimizer step ``step`` on ``rank`` (class docstring: a cycle through the order)."""
        if not self.recorded:
            raise AnchorKLError("the base was not recorded: the anchor KL records it when training starts")
        count = len(self.order)
        start = (step * world_size + rank) * self.batch_size
        return [self.order[(start + i) % count] for i in range(min(self.batch_size, count))]

    def loss(self, model: nn.Module, indices: Sequence[int]) -> torch.Tensor:
        """AKL of the anchors ``indices`` under ``model`` (differentiable): right-padded, one forward."""
        device = next(model.parameters()).device
        width = max(len(self.sequences[i]) for i in indices)
        ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(indices):
            ids[row, :len(self.sequences[i])] = torch.tensor(self.sequences[i], device=device)
            mask[row, :len(self.sequences[i])] = 1
        # not a training forward of the task: no other term or monitor counts it, and nothing recomputes it later
        with reference_forward(), checkpointing_off(model):
            logits = model(input_ids=ids, attention_mask=mask).logits
        rows = [logits[row, self.reply_starts[i] - 1:len(self.sequences[i]) - 1] for row, i in enumerate(indices)]
        return reply_kl(torch.cat(rows), torch.cat([self.base_log_probs[i].to(device) for i in indices]))

    def backward(self, model: nn.Module, step: int, rank: int = 0, world_size: int = 1) -> float:
        """Adds λ·∇AKL of step ``step``'s anchor batch on ``rank`` to the parameters' ``.grad``; returns AKL."""
        with torch.enable_grad():
            kl = self.loss(model, self.batch_for(step, rank, world_size))
            value = float(kl.detach())
            if not math.isfinite(value):
                raise AnchorKLError(f"the anchor KL is not finite ({value}): lower the learning rate or λ")
            (self.weight * kl).backward()
        self._record(kl)
        return value

    def weighted_loss(self, model: nn.Module, call: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """λ·AKL (differentiable) of the anchor batch of training forward ``call`` on ``rank``, for a loss."""
        kl = self.loss(model, self.batch_for(call, rank, world_size))
        self._record(kl)
        return self.weight * kl

    def _record(self, kl: torch.Tensor) -> None:
        self._kl_sum = self._kl_sum + kl.detach().float()  # a tensor: no host sync until the metrics are read
        self._kl_count += 1

    def pop_metrics(self) -> dict[str, float]:
        """``{"anchor_kl": AKL}``, the mean over the steps (forwards) since the last call (empty when none ran)."""
        out = {"anchor_kl": float(self._kl_sum) / self._kl_count} if self._kl_count else {}
        self._kl_sum, self._kl_count = 0.0, 0
        return out


def anchor_kl_for(config: Any, model: nn.Module, tokenizer: Any, anchors: Sequence[str] | None = None,
                  seed: int = 0) -> AnchorKL:
    """The anchor KL of ``config`` (``anchor_kl_weight`` > 0), recorded now on ``model`` (before any update; LoRA:
    adapter off) — ``anchors`` override ``config.anchor_kl_prompts``."""
    if tokenizer is None:
        raise AnchorKLError("the anchor KL (anchor_kl_weight > 0) renders its requests with the chat template: pass "
                            "tokenizer=tokenizer, or set anchor_kl_weight=0")
    term = AnchorKL.from_config(config, anchors)
    term.record_base(model, tokenizer, seed)
    return term

