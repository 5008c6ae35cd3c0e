"""What the baselines share: argument checks, the reference model's preparation, and the callback lifecycle."""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..core.capture import bind_forward_inputs, unwrap_model
from ..core.trainer_callbacks import accumulation_scale, dataloader_length, move_ahead_of_reporters, report_metrics

__all__ = [
    "MASK_POLICIES",
    "NOT_FOR_REFERENCE",
    "EngineCallback",
    "MaskPolicy",
    "call_kwargs",
    "check_mask",
    "check_weight",
    "no_reference_error",
    "prepare_reference_model",
]

MaskPolicy = Literal["attention", "labels"]
MASK_POLICIES = ("attention", "labels")
# Forward kwargs that must not reach the reference forward: it computes no loss and keeps no cache.
NOT_FOR_REFERENCE = ("labels", "num_items_in_batch", "past_key_values", "use_cache", "return_dict")


def check_weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"`{name}` must be a finite number > 0; got {value!r}. For the unregularised arm, train without the "
            "callback."
        )
    return float(value)


def check_mask(mask: Any) -> str:
    if mask not in MASK_POLICIES:
        raise ValueError(f"`mask` must be one of {MASK_POLICIES}; got {mask!r}")
    return mask


def call_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The keyword arguments of a forward call, with positional arguments named and ``**kwargs`` flattened."""
    inputs = dict(bind_forward_inputs(module, args, kwargs))
    if args:
        for name, param in inspect.signature(module.forward).parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and isinstance(inputs.get(name), dict):
                inputs.update(inputs.pop(name))
    return inputs


def prepare_reference_model(reference_model: nn.Module, model: nn.Module, what: str) -> nn.Module:
    """Freezes ``reference_model`` (eval mode, no grad) and moves it to ``model``'s device."""
    if not isinstance(reference_model, nn.Module):
        raise TypeError(f"`reference_model` must be an nn.Module; got {type(reference_model).__name__}")
    if reference_model is model or unwrap_model(reference_model) is unwrap_model(model):
        raise ValueError(
            f"{what}: `reference_model` is the model being trained; pass a frozen copy made before training, "
            "e.g. `reference_model=copy.deepcopy(model)`"
        )
    trained = {id(p) for p in model.parameters()}
    if any(id(p) in trained for p in reference_model.parameters()):
        raise ValueError(
            f"{what}: `reference_model` shares parameters with the model being trained, so it would move with "
            "training; pass an independent copy (`copy.deepcopy(model)` before training)"
        )
    reference_model.requires_grad_(False)
    reference_model.eval()
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "meta":
        ref_param = next(reference_model.parameters(), None)
        if ref_param is not None and ref_param.device != param.device:
            reference_model.to(param.device)
    return reference_model


def no_reference_error(what: str) -> ValueError:
    return ValueError(
        f"{what} needs a reference model and found none: train a PEFT model (the same model with its adapter "
        "disabled is the reference, no extra weights), or, for full fine-tuning, pass a frozen copy made before "
        "training: `reference_model=copy.deepcopy(model)`"
    )


class EngineCallback(TrainerCallback):
    """Shared lifecycle: attach on train begin (1/GA scaling), log on ``on_log`` ahead of reporters, detach at end."""

    metric_prefix = ""
    injects_gradients = True

    def __init__(self, engine):
        self.engine = engine
        self._steps_in_epoch: int | None = None

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        move_ahead_of_reporters(self)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                       **kwargs):
        name = type(self).__name__
        if self.injects_gradients and args.fp16:
            raise ValueError(
                f"{name} does not support fp16 mixed precision: its gradient enters after the loss scaler and would "
                "be wrong by the loss scale. Train with bf16=True or in fp32."
            )
        if model is None:
            raise ValueError(f"{name} received no model in on_train_begin")
        move_ahead_of_reporters(self)
        if not self.engine.attached:
            self.engine.attach(model)
        self._steps_in_epoch = dataloader_length(kwargs.get("train_dataloader"))
        self._set_scale(args, state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._set_scale(args, state)

    def _set_scale(self, args: TrainingArguments, state: TrainerState) -> None:
        if hasattr(self.engine, "grad_scale"):
            self.engine.grad_scale = accumulation_scale(args, state, self._steps_in_epoch)

    def _metrics(self) -> dict[str, float]:
        return self.engine.pop_metrics()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        report_metrics(self._metrics(), self.metric_prefix, logs, state)

    def on_train_end(self, args, state, control, **kwargs):
        self.engine.detach()

