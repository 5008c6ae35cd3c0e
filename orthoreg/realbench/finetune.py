"""LoRA fine-tuning through ``transformers.Trainer`` (so orthoreg's and the baselines' callbacks plug in unchanged).

One function, ``train_lora``: wraps a model in a fresh LoRA adapter (seeded), trains it for exactly ``steps``
optimizer steps on a pre-shuffled example list with loss on assistant tokens only, in the CPU's compute dtype
(``model.compute_dtype``: bf16 autocast where the CPU has native bf16, else fp32), and reports per-step times. The adapter stays attached (the caller evaluates, merges or discards it).

Full fine-tuning goes through the same ``train_lora`` (it trains whatever requires grad); ``FrozenBase`` keeps the
base weights so that what reads "the base" through a PEFT model's ``disable_adapter()`` (the judge's perplexity,
the capability read) reads them for a fully fine-tuned model too.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import median
from typing import Any

import torch
from torch import nn

from ..core.layers import DECODER_PROJECTIONS
from .model import collate

LORA_TARGETS = DECODER_PROJECTIONS


# Steps between readings of the live harm signal in the benchmarks' fine-tunes (steps 5, 10, …: an early reading
# at step ≤ 10 of 50, what the early-warning study of the harm signal needs).
HARM_SIGNAL_EVERY = 5


@dataclass
class TrainReport:
    steps: int
    wall_per_step: float  # median wall-clock seconds per optimizer step (shared machine: noisy)
    cpu_per_step: float  # median process CPU seconds per step (stable under contention with one thread)
    wall_total: float
    losses: list[float] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    # The live harm signal (orthoreg.firewall.harm_signal): the base margins and one reading every N steps.
    harm_signal: dict[str, Any] | None = None


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[dict[str, list[int]]]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.wall, self.cpu, self._t = [], [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            if self._t is not None:
                self.wall.append(time.perf_counter() - self._t[0])
                self.cpu.append(time.process_time() - self._t[1])

    return StepTimer()


def add_lora(model: nn.Module, seed: int, r: int = 16, alpha: int = 32, targets: Sequence[str] = LORA_TARGETS):
    """A PEFT model with a fresh LoRA adapter on every projection; the adapter's init depends only on ``seed``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


class FrozenBase:
    """A copy of a model's parameters taken before full fine-tuning, and ``disable_adapter()``: a context in which
    the model computes with them again (PEFT's name for "the base model"), its trained values restored on exit.

    ``attach`` sets the context as the model's ``disable_adapter`` attribute, so code that reads the base through a
    PEFT model (``task_eval.base_context``) reads it here too. Tied parameters (SmolLM2's embedding and LM head) are
    one parameter and swapped once."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.saved = {name: p.detach().clone() for name, p in model.named_parameters()}

    @contextlib.contextmanager
    def disable_adapter(self):
        params = dict(self.model.named_parameters())
        trained = {name: params[name].detach().clone() for name in self.saved}
        try:
            with torch.no_grad():
                for name, value in self.saved.items():
                    params[name].copy_(value)
            yield self.model
        finally:
            with torch.no_grad():
                for name, value in trained.items():
                    params[name].copy_(value)

    def attach(self) -> nn.Module:
        self.model.disable_adapter = self.disable_adapter
        return self.model


def schedule(examples: Sequence[dict[str, list[int]]], steps: int, batch_size: int, seed: int) -> list[dict]:
    """Exactly ``steps * batch_size`` examples: epochs of ``examples``, each shuffled by ``seed``."""
    rng = random.Random(f"order-{seed}")
    need, out = steps * batch_size, []
    while len(out) < need:
        epoch = list(examples)
        rng.shuffle(epoch)
        out.extend(epoch)
    return out[:need]


def train_lora(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, list[int]]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    callbacks: Sequence[Any] = (),
    bf16: bool | None = None,
    warmup_steps: int = 0,
    log_every: int = 10,
    harm_signal_every: int | None = None,
) -> TrainReport:
    """Trains ``model`` (PEFT-wrapped, or with its own weights requiring grad: full fine-tuning) in place; the data order is ``schedule(examples, steps, batch_size,
    seed)`` and the Trainer's sampler keeps it (no reshuffle). With ``harm_signal_every`` the refusal margins
    (``HarmSignalCallback``: 16 built-in held-out pairs, no generation) are read every that many steps; the
    training itself is unchanged (the probe runs under no_grad with the RNG state restored)."""
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from orthoreg.firewall import HarmSignalCallback

    from .model import compute_dtype

    if bf16 is None:  # by what the CPU runs natively (model.compute_dtype)
        bf16 = compute_dtype() == "bf16"
    data = _ListDataset(schedule(examples, steps, batch_size, seed))
    pad_id = tokenizer.pad_token_id
    timer = _step_timer()
    # A HarmSignalCallback among `callbacks` (the harm-margin guard is one) is the run's signal: one probe, not two.
    given = [c for c in callbacks if isinstance(c, HarmSignalCallback)]
    signal = given[0] if given else HarmSignalCallback(harm_signal_every, tokenizer=tokenizer) \
        if harm_signal_every else None
    extra = [signal] if signal is not None and not given else []
    with tempfile.TemporaryDirectory(prefix="realbench-") as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
            lr_scheduler_type="constant_with_warmup" if warmup_steps else "constant", warmup_steps=warmup_steps,
            weight_decay=0.0, max_grad_norm=1.0, logging_steps=log_every, save_strategy="no", report_to=[],
            use_cpu=True, bf16=bf16, seed=seed, data_seed=seed, dataloader_num_workers=0, disable_tqdm=True,
            remove_unused_columns=False,
        )

        class _InOrderTrainer(Trainer):
            def _get_train_sampler(self, *a, **k):  # the schedule is already shuffled by seed
                return torch.utils.data.SequentialSampler(self.train_dataset)

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer = _InOrderTrainer(model=model, args=args, train_dataset=data,
                                          data_collator=lambda b: collate(b, pad_id),
                                          callbacks=[*callbacks, timer, *extra])
                t0 = time.perf_counter()
                trainer.train()
                wall = time.perf_counter() - t0
        finally:
            hf_logging.set_verbosity(verbosity)
    logs = [dict(e) for e in trainer.state.log_history]
    losses = [e["loss"] for e in logs if "loss" in e]
    # The first step includes one-off work (optimizer state allocation); the median ignores it.
    return TrainReport(steps=steps, wall_per_step=median(timer.wall) if timer.wall else float("nan"),
                       cpu_per_step=median(timer.cpu) if timer.cpu else float("nan"), wall_total=wall,
                       losses=losses, logs=logs,
                       harm_signal=None if signal is None else {"every": signal.every_n_steps, "base": signal.probe.base,
                                                                "readings": signal.readings})
