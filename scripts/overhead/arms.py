"""The arms: one variant of the training step each (plain, orthoreg's terms alone and combined, the KL-to-base
baseline), the ``OrthoRegConfig`` behind each, and the context they share (model, batch, directions, optimizer)."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .models import ModelSpec, make_input_subspaces

ARMS_FULL = ["plain", "cov", "proj_absolute", "proj_base_mean", "reader", "cov+proj", "kl"]
ARMS_LORA = ["plain", "cov", "proj_absolute", "proj_base_mean", "proj_paired", "lora_w", "reader", "cov+proj",
             "cov+proj_paired", "all", "kl"]
WEIGHT_ARMS = ("lora_w", "reader")
ALL_ARMS = sorted(set(ARMS_FULL) | set(ARMS_LORA))


def arm_config(arm: str, guarded: list[int]):
    """The ``OrthoRegConfig`` of an arm (``None`` for plain/kl)."""
    from orthoreg.config import OrthoRegConfig

    table = {
        "cov": dict(cov_weight=1.0, proj_weight=0.0),
        "proj_absolute": dict(proj_weight=1.0, anchor="absolute"),
        "proj_base_mean": dict(proj_weight=1.0, anchor="base_mean"),
        "proj_paired": dict(proj_weight=1.0, anchor="paired"),
        "lora_w": dict(proj_weight=0.0, lora_weight=1.0),
        "reader": dict(proj_weight=0.0, reader_weight=1.0),
        "cov+proj": dict(cov_weight=1.0, proj_weight=1.0, anchor="base_mean"),
        "cov+proj_paired": dict(cov_weight=1.0, proj_weight=1.0, anchor="paired"),
        "all": dict(cov_weight=1.0, proj_weight=1.0, lora_weight=1.0, anchor="base_mean"),
    }
    if arm not in table:
        return None
    return OrthoRegConfig(layers=list(guarded), **table[arm])


class Arm:
    """One variant of the training step. ``setup``/``teardown`` run outside the timed region."""

    def __init__(self, name: str, ctx: Context):
        self.name, self.ctx = name, ctx

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.ctx.model(**batch).loss


class OrthoFullArm(Arm):
    """Full fine-tuning: the ``OrthoRegCallback`` engine (``OrthoRegularizer``, inject mode)."""

    def __init__(self, name, ctx, config):
        super().__init__(name, ctx)
        from orthoreg.engine.regularizer import OrthoRegularizer

        self.reg = OrthoRegularizer(config, ctx.directions, mode="inject")
        if config.anchor == "base_mean" and config.proj_weight > 0:  # r recorded once, outside the timed steps
            self.reg.calibrate(ctx.model, [ctx.batch_no_labels])
            self.reg.detach()

    def setup(self):
        self.reg.attach(self.ctx.model)
        self.reg.grad_scale = 1.0

    def teardown(self):
        self.reg.detach()
        self.reg.pop_metrics()


class ReaderFullArm(Arm):
    """Full fine-tuning, reader term alone: ``ReaderPenalty`` in inject mode (what ``OrthoRegCallback`` builds for
    ``reader_weight > 0``). W₀V_mᵀ is recorded at the first attach, outside the timed steps, and kept across blocks."""

    def __init__(self, name, ctx, config):
        super().__init__(name, ctx)
        from orthoreg.reader.wiring import reader_penalty_for

        self.reader = reader_penalty_for(config, make_input_subspaces(ctx.model, seed=ctx.seed), mode="inject")

    def setup(self):
        self.reader.attach(self.ctx.model)
        self.reader.grad_scale = 1.0

    def teardown(self):
        self.reader.detach()
        self.reader.pop_metrics()


class OrthoLoRAArm(Arm):
    """LoRA: ``OrthoLoRA`` (activation terms in return mode + the in-module weight-space term)."""

    def __init__(self, name, ctx, config):
        super().__init__(name, ctx)
        self.config = config
        self.state = None
        self.wrapper = None
        self.subspaces = make_input_subspaces(ctx.model, seed=ctx.seed) if config.reader_weight > 0 else None
        if config.anchor == "base_mean" and config.proj_weight > 0:
            self.setup()
            self.wrapper.regularizer.calibrate(ctx.model, [ctx.batch_no_labels])
            self.state = self.wrapper.state_dict_orthoreg()
            self.teardown()

    def setup(self):

        from orthoreg.lora.wrapper import OrthoLoRA

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unguarded writers
            self.wrapper = OrthoLoRA(self.ctx.model, self.config, self.ctx.directions,
                                     input_subspaces=self.subspaces)
        if self.state is not None:
            self.wrapper.load_state_dict_orthoreg(self.state)
        self.wrapper.train()

    def teardown(self):
        self.wrapper.remove_hooks()
        self.wrapper.pop_metrics()
        self.wrapper = None

    def loss(self, batch):
        return self.wrapper(**batch).loss


class KLArm(Arm):
    """KL-to-base: task loss + β·KL(p_θ ‖ p_base) over the non-padding positions, the base logits from a frozen copy
    (full fine-tuning) or from the same model with its adapter disabled (LoRA), under no_grad.

    Uses the project's ``orthoreg.baselines.KLToBaseRegularizer`` (gradient hook on the logits) when it is
    importable, else an inline loss-based version (``impl`` says which).
    """

    beta = 0.1

    def __init__(self, name, ctx):
        super().__init__(name, ctx)
        self.ref = None
        if ctx.mode == "full":
            self.ref = copy.deepcopy(ctx.model).eval()
            for p in self.ref.parameters():
                p.requires_grad_(False)
        try:
            from orthoreg.baselines import KLToBaseRegularizer
        except ImportError:
            self.reg, self.impl = None, "inline"
        else:
            self.reg, self.impl = KLToBaseRegularizer(self.beta, reference_model=self.ref), "orthoreg.baselines"

    def setup(self):
        if self.reg is not None:
            self.reg.attach(self.ctx.model)

    def teardown(self):
        if self.reg is not None:
            self.reg.detach()
            self.reg.pop_metrics()

    def loss(self, batch):
        model = self.ctx.model
        if self.reg is not None:
            return model(**batch).loss
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            if self.ref is not None:
                ref_logits = self.ref(**inputs).logits
            else:
                with model.disable_adapter():
                    ref_logits = model(**inputs).logits
        out = model(**batch)
        keep = batch["attention_mask"].bool()
        logp = F.log_softmax(out.logits[keep].float(), dim=-1)
        logq = F.log_softmax(ref_logits[keep].float(), dim=-1)
        kl = F.kl_div(logq, logp, log_target=True, reduction="batchmean")  # Σ p_θ (log p_θ − log p_base) / N
        return out.loss + self.beta * kl


@dataclass
class Context:
    spec: ModelSpec
    mode: str
    checkpointing: bool
    device: str
    model: Any
    batch: dict
    batch_no_labels: dict
    directions: Any
    optimizer: Any
    seed: int = 0


def make_arm(name: str, ctx: Context) -> Arm:
    if name == "plain":
        return Arm(name, ctx)
    if name == "kl":
        return KLArm(name, ctx)
    config = arm_config(name, ctx.spec.guarded)
    if ctx.mode == "full" and config.reader_weight > 0:
        return ReaderFullArm(name, ctx, config)
    return (OrthoLoRAArm if ctx.mode == "lora" else OrthoFullArm)(name, ctx, config)


def arms_for(mode: str, selected: list[str] | None) -> list[str]:
    arms = ARMS_LORA if mode == "lora" else ARMS_FULL
    if selected:
        arms = [a for a in arms if a in selected or a == "plain"]
    return arms
