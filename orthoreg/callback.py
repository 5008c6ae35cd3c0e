"""``OrthoRegCallback``: orthoreg as one line in any ``transformers.Trainer`` (and TRL's SFT/DPO trainers)."""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .anchor import AnchorKL, AnchorKLError, check_anchor_backend, data_parallel_rank
from .config import OrthoRegConfig
from .core.layers import is_lora_layer
from .core.trainer_callbacks import (
    accumulation_scale,
    add_to_logs,
    checkpoint_folder,
    dataloader_length,
    find_trainer,
    move_ahead_of_reporters,
    report_metrics,
)
from .directions.harmful import HarmfulDirections
from .engine.metrics import METRIC_PREFIX
from .engine.refusal_margin import HARM_SIGNAL_STATE_KEY, HarmSignalError, HarmSignalSchedule
from .engine.regularizer import OrthoRegularizer
from .reader.wiring import (
    SUBSPACES_FOLDER,
    check_restored_base,
    configured_subspaces,
    reader_penalty_for,
    record_builtin_subspaces,
    restore_reader_base,
    save_reader_base,
    saved_subspaces,
)

logger = logging.getLogger(__name__)

STATE_KEY = "orthoreg"


class OrthoRegCallback(TrainerCallback):
    r"""Adds orthoreg's covariance and projection penalties to a Trainer's gradients.

    A callback cannot change a Trainer's loss, so the penalties enter through gradient injection (see
    ``orthoreg.engine.regularizer``): the parameter gradients are exactly those of

    .. math:: \mathcal{L}_{task} + w(t)\,\big(\lambda_{cov} \sum_\ell \mathrm{cov}(h_\ell)
              + \lambda_{proj} \sum_\ell \mathrm{proj}(h_\ell)\big)

    with each micro-batch's penalty divided by the number of micro-batches of its optimizer step — the
    ``gradient_accumulation_steps``, or fewer in the last step of an epoch whose length is not a multiple of it
    (the Trainer normalises the task loss over the same micro-batches). It works
    unchanged in ``Trainer``, TRL's ``SFTTrainer`` and ``DPOTrainer`` (whose reference passes run without grad and are
    not regularised), with or without activation checkpointing, PEFT, DDP, DeepSpeed ZeRO-2/3 and FSDP.

    Logged next to the task loss: ``orthoreg/cov``, ``orthoreg/proj`` (unweighted sums over guarded layers, means
    over the micro-batches since the last log, averaged over ranks), ``orthoreg/total`` (weighted), and per-layer
    values with ``per_layer_metrics=True``. The recorded base reference (``anchor="base_mean"``) is saved in every
    checkpoint's ``trainer_state.json`` and restored on ``resume_from_checkpoint``; the warm-up follows
    ``state.global_step``.

    With ``config.reader_weight > 0`` the reader-side weight penalty λ_reader·Σ_m reader(m) (``orthoreg.terms.reader``;
    a mean of relative changes with ``units="base"``) is added too, inside each module's forward (exact under
    ZeRO-3/FSDP2), logged as ``orthoreg/reader``. Its V_m are ``input_subspaces`` when given, else
    ``config.input_subspaces``: a saved set, or ``"builtin"`` — recorded at train start on the model before any update
    (LoRA: adapter off) with the Trainer's ``processing_class`` chat template, by one process and sent to every rank
    (``orthoreg.reader.wiring``). Recorded V_m are saved in ``output_dir`` and in every checkpoint
    (``orthoreg_input_subspaces/``) and read back on resume; for full fine-tuning W₀V_mᵀ is saved next to every
    checkpoint too (``orthoreg_reader_base.safetensors``).

    With ``config.anchor_kl_weight > 0`` (``recommended()``) the anchor KL λ_anchor·AKL (``orthoreg.anchor.term``) is
    added once per optimizer step, before the task's first micro-batch: the base's replies to the anchor requests
    are recorded at train start (LoRA: adapter off, so a resumed run records the same; a full fine-tune records its
    weights before the first update and cannot resume with the term), and under DDP each rank's anchor gradient is
    averaged with its task gradient. Logged as ``orthoreg/anchor_kl`` (unweighted; λ·AKL joins ``orthoreg/total``).
    DeepSpeed ZeRO and FSDP are refused by name while the term is on (its separate backward would bypass their
    reduction): there, set ``anchor_kl_weight=0``.

    Args:
        config (`OrthoRegConfig`): the regulariser's settings; ``OrthoRegConfig.recommended()`` needs nothing else.
        directions (`HarmfulDirections`, *optional*): harmful subspaces; required when ``config.proj_weight > 0``.
        input_subspaces (`InputSubspaces`, *optional*): V_m per module (``extract_input_subspaces``); overrides
            ``config.input_subspaces``.
        tokenizer (*optional*): the tokenizer whose chat template ``"builtin"`` subspaces and the anchor requests
            are rendered with, when the Trainer has no ``processing_class`` (it is used otherwise).
        anchors (`Sequence[str]`, *optional*): the anchor KL's requests; overrides ``config.anchor_kl_prompts``.

    Example:
        >>> from orthoreg import OrthoRegCallback, OrthoRegConfig
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
        ...                   callbacks=[OrthoRegCallback(OrthoRegConfig.recommended())])

        The projection onto harmful directions instead:

        >>> from orthoreg import HarmfulDirections
        >>> directions = HarmfulDirections.load("harmful.safetensors")
        >>> config = OrthoRegConfig(layers=directions.layers, proj_weight=0.1, cov_weight=0.01)
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds,
        ...                   callbacks=[OrthoRegCallback(config, directions=directions)])
    """

    def __init__(self, config: OrthoRegConfig, directions: HarmfulDirections | None = None,
                 input_subspaces: Any = None, tokenizer: Any = None, anchors: Sequence[str] | None = None):
        if not isinstance(config, OrthoRegConfig):
            raise TypeError(f"OrthoRegCallback needs an OrthoRegConfig; got {type(config).__name__}")
        self.config = config
        self.directions = directions
        self.tokenizer = tokenizer
        # The terms built for: set_weight may change their λ later (0 included), but cannot switch another one on.
        self.wired_terms = {t for t in ("reader", "proj", "cov") if getattr(config, f"{t}_weight") > 0}
        self.input_subspaces = configured_subspaces(config, input_subspaces)  # None: "builtin", recorded at train start
        self.reader = reader_penalty_for(config, self.input_subspaces, mode="inject")
        # Health is checked once per optimizer step, in on_pre_optimizer_step (one host sync), not per micro-batch.
        self.regularizer = OrthoRegularizer(config, directions, mode="inject", check="step")
        # The live harm signal (engine.refusal_margin), read after every `harm_signal_every`-th step.
        self.harm_signal = HarmSignalSchedule(config.harm_signal_every) if config.harm_signal_every else None
        self.anchor_kl = None
        if config.anchor_kl_weight > 0:
            self.anchor_kl = AnchorKL.from_config(config, anchors)
        self._saved_calibration = False
        self._steps_in_epoch: int | None = None

    # ------------------------------------------------------------------ lifecycle
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        move_ahead_of_reporters(self)
        _detach_when_train_exits(self)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                       **kwargs):
        if args.fp16:
            raise ValueError(
                "OrthoRegCallback does not support fp16 mixed precision: its gradients enter after the loss scaler "
                "and would be wrong by the loss scale. Train with bf16=True or in fp32, or use OrthoLoRA in a custom "
                "loop (its penalty goes through the loss)."
            )
        if model is None:
            raise ValueError("OrthoRegCallback received no model in on_train_begin")
        if self.reader is None and self.config.reader_weight > 0:
            self._build_builtin_reader(args, state, model, kwargs.get("processing_class") or self.tokenizer)
        if self.harm_signal is not None:  # the base margins, before any update and before this callback's hooks
            stored = state.stateful_callbacks.get(HARM_SIGNAL_STATE_KEY) if state.stateful_callbacks else None
            try:
                state.stateful_callbacks[HARM_SIGNAL_STATE_KEY] = self.harm_signal.start(
                    model, kwargs.get("processing_class") or self.tokenizer, state.global_step, stored)
            except HarmSignalError as err:  # a diagnostic: the penalty trains on without it, said out loud
                warnings.warn(f"orthoreg: the live harm signal (OrthoRegConfig(harm_signal_every="
                              f"{self.config.harm_signal_every})) is off for this run: {err}. Set harm_signal_every=0 "
                              "(--orthoreg_harm_signal_every 0) to silence this.", UserWarning, stacklevel=2)
                self.harm_signal = None
        if self.anchor_kl is not None:
            self._record_anchor_base(args, state, model, kwargs.get("processing_class") or self.tokenizer)
        move_ahead_of_reporters(self)
        if not self.regularizer.attached:
            for stale in self.regularizer.others_attached(model):
                if stale.owner is not state:  # another train() run's, left behind when it raised
                    warnings.warn(
                        "removing the hooks of an earlier OrthoRegCallback on this model whose train() did not "
                        "finish (it raised); they would otherwise inject their penalty a second time",
                        UserWarning,
                        stacklevel=2,
                    )
                    stale.detach()
            self.regularizer.attach(model)
        self.regularizer.owner = state
        self.regularizer.health.reset()
        self._steps_in_epoch = dataloader_length(kwargs.get("train_dataloader"))
        self.regularizer.step = state.global_step
        if self.reader is not None and not self.reader.attached:
            missing = restore_reader_base(self.reader, checkpoint_folder(args, state)) if state.global_step > 0 else None
            self.reader.attach(model)
            check_restored_base(self.reader, missing)
        self._set_scales(args, state)
        stored = state.stateful_callbacks.get(STATE_KEY) if state.stateful_callbacks else None
        if state.global_step > 0 and stored is not None:
            self.regularizer.load_state_dict(stored)
            self._saved_calibration = True
        elif state.global_step > 0 and self.config.anchor == "base_mean" and self.config.proj_weight > 0 \
                and not self.regularizer.base_reference:
            raise ValueError(
                f"resuming at step {state.global_step} but the checkpoint has no orthoreg state (it was written without "
                "OrthoRegCallback), so the base reference r cannot be restored; start from step 0 or call "
                "callback.regularizer.calibrate(model, batches) before train()"
            )

    def _build_builtin_reader(self, args, state, model, processing_class) -> None:
        """``input_subspaces="builtin"``: read V_m back on a resumed run, else record them now (before any update,
        and before the regulariser's hooks are attached), and save them with the run."""
        subspaces = None
        if state.global_step > 0:
            subspaces = saved_subspaces(checkpoint_folder(args, state)) or saved_subspaces(args.output_dir)
            if subspaces is None and not any(is_lora_layer(m) for m in model.modules()):
                raise ValueError(
                    f"resuming a full fine-tune at step {state.global_step} with input_subspaces='builtin', but "
                    f"neither the checkpoint nor {args.output_dir!r} holds the recorded subspaces "
                    f"({SUBSPACES_FOLDER}/): recording them from the resumed weights would anchor the penalty to the "
                    "wrong model. Resume from a checkpoint that OrthoRegCallback wrote, or start from step 0."
                )
        if subspaces is None:  # a LoRA run resumed without them records the same V: its adapter is switched off
            subspaces = record_builtin_subspaces(model, processing_class, self.config)
        self.input_subspaces = subspaces
        self.reader = reader_penalty_for(self.config, subspaces, mode="inject")
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            subspaces.save_pretrained(os.path.join(args.output_dir, SUBSPACES_FOLDER))

    def _record_anchor_base(self, args, state, model, tokenizer) -> None:
        """The anchor KL's base replies, before any hook is attached and (LoRA) with the adapter off."""
        check_anchor_backend(args, model, "OrthoRegCallback's anchor KL (anchor_kl_weight > 0)")
        if state.global_step > 0 and not any(is_lora_layer(m) for m in model.modules()):
            raise AnchorKLError(
                f"resuming a full fine-tune at step {state.global_step} with anchor_kl_weight > 0: the anchor KL's "
                "base replies are recorded before the first update and not saved, and recording them from the "
                "resumed weights would hold the wrong model. Start from step 0, or set anchor_kl_weight=0.")
        if tokenizer is None:
            raise AnchorKLError("the anchor KL (anchor_kl_weight > 0) renders its requests with the chat template: "
                                "pass the Trainer a processing_class, or OrthoRegCallback(..., tokenizer=tokenizer)")
        if not self.anchor_kl.recorded:
            self.anchor_kl.record_base(model, tokenizer, args.seed)

    def _set_scales(self, args, state) -> None:
        self.regularizer.grad_scale = accumulation_scale(args, state, self._steps_in_epoch)
        if self.reader is not None:
            self.reader.grad_scale = self.config.warmup_factor(state.global_step) * self.regularizer.grad_scale

    def on_step_begin(self, args, state, control, **kwargs):
        self.regularizer.step = state.global_step
        self._set_scales(args, state)
        if self.anchor_kl is not None:  # its gradient waits in .grad for the task's (synchronised) backward
            self.anchor_kl.backward(kwargs["model"], state.global_step, *data_parallel_rank())

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # The step's host sync: a NaN/Inf or ill-conditioned penalty raises here, before the update (the reader's
        # check follows the activation terms' at once, when the device queue is already drained).
        self.regularizer.check_step()
        if self.reader is not None:
            self.reader.check_step()

    def on_step_end(self, args, state, control, **kwargs):
        if self.harm_signal is not None:
            self.harm_signal.after_step(kwargs["model"], state.global_step)
        # Written into TrainerState so every later checkpoint's trainer_state.json (JSON, no pickle) carries it.
        if not self._saved_calibration and not self.regularizer.calibrating:
            state.stateful_callbacks[STATE_KEY] = self.regularizer.state_dict()
            self._saved_calibration = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        warmup = self.config.warmup_factor(max(state.global_step - 1, 0))
        metrics = self.regularizer.pop_metrics()
        if self.reader is not None:
            reader = self.reader.pop_metrics(per_module=self.config.per_layer_metrics)
            if "reader" in reader:
                metrics["total"] = metrics.get("total", 0.0) + warmup * self.reader.weighted_mean
            metrics.update(reader)
        if self.anchor_kl is not None and (anchor := self.anchor_kl.pop_metrics()):
            metrics["total"] = metrics.get("total", 0.0) + self.anchor_kl.weight * anchor["anchor_kl"]
            metrics.update(anchor)
        report_metrics(metrics, METRIC_PREFIX, logs, state, extra={"warmup": warmup})
        if self.harm_signal is not None:
            add_to_logs(self.harm_signal.pop(), logs, state)  # as measured: every rank probes the same weights

    def on_save(self, args, state, control, **kwargs):
        if self.reader is not None and state.is_world_process_zero:
            folder = checkpoint_folder(args, state)
            save_reader_base(self.reader, folder)
            if os.path.isdir(folder):
                self.input_subspaces.save_pretrained(os.path.join(folder, SUBSPACES_FOLDER))

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()

    def set_weight(self, term: str, value: float) -> None:
        """Sets λ of one term (``"reader"``, ``"proj"``, ``"cov"``) from the next forward on: the firewall's budget
        modes change the weight during training through this. A term that was off at construction (λ = 0, nothing
        built or attached for it) cannot be switched on here; one that was on may go to 0 and back."""
        if term not in ("reader", "proj", "cov"):
            raise ValueError(f"`term` must be 'reader', 'proj' or 'cov'; got {term!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ValueError(f"the weight of {term!r} must be a finite number >= 0; got {value!r}")
        if term not in self.wired_terms:
            raise ValueError(f"OrthoRegCallback was built with {term}_weight=0, so the {term} term is not wired; "
                             f"construct it with {term}_weight > 0 to adapt that weight")
        setattr(self.config, f"{term}_weight", float(value))
        if term == "reader" and self.reader is not None:
            self.reader.weight = float(value)

    def detach(self) -> None:
        """Removes every hook this callback installed (also when ``train()`` raised; see ``_detach_when_train_exits``)."""
        self.regularizer.detach()
        if self.reader is not None:
            self.reader.detach()


def _detach_when_train_exits(callback: OrthoRegCallback) -> None:
    """Wraps the Trainer's ``train`` so that orthoreg's hooks are removed however it exits: ``on_train_end`` runs
    only when training finishes, and hooks left behind by an exception would regularise whatever trains the model
    next (a plain Trainer, or a second OrthoRegCallback, which would then inject twice)."""
    trainer = find_trainer(callback)
    if trainer is None or getattr(trainer.train, "_orthoreg_detaching", False):
        return
    train = trainer.train

    @functools.wraps(train)
    def train_then_detach(*args, **kwargs):
        try:
            return train(*args, **kwargs)
        finally:
            for item in trainer.callback_handler.callbacks:
                if isinstance(item, OrthoRegCallback):
                    item.detach()

    train_then_detach._orthoreg_detaching = True
    trainer.train = train_then_detach
