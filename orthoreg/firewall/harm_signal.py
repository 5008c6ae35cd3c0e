"""``HarmSignalCallback``: the live harm signal (``orthoreg.engine.refusal_margin``: the refusal margin at the first
reply token of a fixed probe set, its formula, openers and forward) in any ``transformers.Trainer``.

At train begin the base is recorded (tokenizer: ``tokenizer=`` if given, else the Trainer's ``processing_class``) and
saved in ``TrainerState.stateful_callbacks["orthoreg_harm_signal"]`` (JSON, in every checkpoint), so a resumed run
keeps the base of step 0; after every ``every_n_steps``-th optimizer step the margins are read and join the next
logs once (``orthoreg/harm_margin``, ``…_delta``, ``orthoreg/overrefusal_margin``, ``…_delta``:
``orthoreg.engine.metrics``). ``OrthoRegCallback`` does the same by itself with ``OrthoRegConfig(harm_signal_every=N)``
(``recommended()``: every 10 steps); ``margin_guard.MarginGuardCallback`` acts on it.

**Distributed**: every rank runs the probe (a ZeRO-3 or FSDP forward is collective, so every rank must run it
there; under DDP the replicas agree and the ranks wait for each other anyway, so this costs no extra wall time).
The base is recorded on the main process and handed to every rank; readings need no communication, and the
Trainer reports rank 0's logs.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..core.trainer_callbacks import add_to_logs, move_ahead_of_reporters
from ..engine.refusal_margin import (
    HARM_SIGNAL_STATE_KEY,
    HarmSignalError,
    HarmSignalSchedule,
    RefusalMarginProbe,
    builtin_probe_pairs,
)

__all__ = ["HarmSignalCallback", "HarmSignalError", "RefusalMarginProbe", "builtin_probe_pairs"]

STATE_KEY = HARM_SIGNAL_STATE_KEY


class HarmSignalCallback(TrainerCallback):
    """Logs the refusal margins (``RefusalMarginProbe``) every ``every_n_steps`` optimizer steps of a Trainer.

    At train begin it records the base (tokenizer: ``tokenizer=`` if given, else the Trainer's ``processing_class``)
    and saves the recording in ``TrainerState.stateful_callbacks["orthoreg_harm_signal"]`` (JSON, in every
    checkpoint), so a resumed run keeps the base of step 0. After every optimizer step whose number is a multiple of
    ``every_n_steps`` it measures; the values join the next logs (``orthoreg/harm_margin``, ``…_delta``,
    ``orthoreg/overrefusal_margin``, ``…_delta``: ``orthoreg.engine.metrics``) once, and every reading is kept in
    ``readings`` with its step. Works next to ``OrthoRegCallback`` or alone.

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
        ...                   callbacks=[HarmSignalCallback(every_n_steps=10)])

    Args:
        every_n_steps (`int`, *optional*, defaults to `10`): optimizer steps between measurements.
        probe (`RefusalMarginProbe`, *optional*): the probe (defaults to ``RefusalMarginProbe()``: 16 built-in pairs);
            one already recorded (``probe.record_base(base, tokenizer)``) is used as is.
        tokenizer (*optional*): the chat tokenizer, for Trainers without a ``processing_class``.
    """

    def __init__(self, every_n_steps: int = 10, probe: RefusalMarginProbe | None = None, tokenizer: Any = None):
        self.schedule = HarmSignalSchedule(every_n_steps, probe)
        self.tokenizer = tokenizer

    @property
    def every_n_steps(self) -> int:
        return self.schedule.every_n_steps

    @property
    def probe(self) -> RefusalMarginProbe:
        return self.schedule.probe

    @property
    def readings(self) -> list[dict[str, float]]:
        """Every reading of the run, with its step."""
        return self.schedule.readings

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        move_ahead_of_reporters(self)  # its values must be in `logs` before TensorBoard/W&B read them

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                       **kwargs):
        if model is None:
            raise HarmSignalError("HarmSignalCallback received no model in on_train_begin")
        move_ahead_of_reporters(self)
        stored = state.stateful_callbacks.get(STATE_KEY) if state.stateful_callbacks else None
        state.stateful_callbacks[STATE_KEY] = self.schedule.start(
            model, self.tokenizer or kwargs.get("processing_class"), state.global_step, stored)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                    **kwargs):
        self.schedule.after_step(model, state.global_step)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        add_to_logs(self.schedule.pop(), logs, state)

