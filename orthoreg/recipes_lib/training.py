"""Fine-tuning through TRL's ``SFTTrainer``: LoRA or full, bf16 when the hardware has it, checkpoints in the run dir.

``finetune`` group keys map one-to-one onto ``SFTConfig`` (a ``TrainingArguments`` subclass); the recipe adds:

- ``method``: ``lora`` (PEFT ``LoraConfig`` from ``finetune.lora``; targets default to the model's
  ``lora_target_modules``) or ``full``.
- ``bf16``: ``auto`` (bf16 where CUDA supports it, fp32 elsewhere), ``true`` or ``false``. fp16 is not offered:
  orthoreg's gradient injection bypasses the fp16 loss scaler.
- ``resume_from_checkpoint``: ``null``, ``true`` (latest checkpoint under ``<run_dir>/checkpoints``; pass the old
  ``hydra.run.dir``) or a checkpoint path. The orthoreg callback restores its recorded reference on resume.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import RecipeError
from .launch import LaunchInfo

METHODS = ("lora", "full")


def resolve_bf16(value: Any, info: LaunchInfo) -> bool:
    if value in (True, False):
        return bool(value)
    if value != "auto":
        raise RecipeError(f"`finetune.bf16` must be auto, true or false; got {value!r}")
    return (not info.use_cpu) and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def lora_config(ft_cfg: Any, model_cfg: Any):
    from peft import LoraConfig

    lcfg = ft_cfg.lora or {}
    targets = lcfg.get("target_modules") or model_cfg.lora_target_modules
    if not targets:
        raise RecipeError("finetune=lora needs `finetune.lora.target_modules` or `model.lora_target_modules`")
    return LoraConfig(r=int(lcfg.get("r", 16)), lora_alpha=int(lcfg.get("alpha", 32)),
                      lora_dropout=float(lcfg.get("dropout", 0.0)), target_modules=list(targets),
                      bias="none", task_type="CAUSAL_LM")


def prepare_model(model: nn.Module, ft_cfg: Any, model_cfg: Any) -> nn.Module:
    """Wraps the model for the chosen method (a PeftModel for LoRA); full fine-tuning returns it unchanged."""
    method = ft_cfg.method
    if method not in METHODS:
        raise RecipeError(f"`finetune.method` must be one of {METHODS}; got {method!r}")
    if ft_cfg.gradient_checkpointing:
        model.config.use_cache = False
    if method == "full":
        return model
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(ft_cfg, model_cfg))
    except ValueError as err:
        raise RecipeError(f"LoRA: {err} (check finetune.lora.target_modules / model.lora_target_modules)") from err


def _checkpointing_kwargs(enabled: bool) -> dict[str, Any]:
    """Activation checkpointing under its current name (transformers >= 5.23 renamed ``gradient_checkpointing``)."""
    import dataclasses

    from trl import SFTConfig

    name = "activation_checkpointing" if any(f.name == "activation_checkpointing"
                                             for f in dataclasses.fields(SFTConfig)) else "gradient_checkpointing"
    if not enabled:
        return {}
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def sft_config(cfg: Any, info: LaunchInfo, run_dir: Path):
    """The ``SFTConfig`` of a run (validated by TrainingArguments itself)."""
    from trl import SFTConfig

    ft = cfg.finetune
    save_steps = ft.save_steps or 0
    kwargs = dict(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=ft.max_steps,
        num_train_epochs=ft.num_train_epochs,
        per_device_train_batch_size=ft.per_device_train_batch_size,
        gradient_accumulation_steps=ft.gradient_accumulation_steps,
        learning_rate=ft.learning_rate,
        lr_scheduler_type=ft.lr_scheduler_type,
        warmup_steps=ft.warmup_steps,
        weight_decay=ft.weight_decay,
        max_grad_norm=ft.max_grad_norm,
        bf16=resolve_bf16(ft.bf16, info),
        fp16=False,
        **_checkpointing_kwargs(ft.gradient_checkpointing),
        logging_steps=ft.logging_steps,
        save_strategy="steps" if save_steps > 0 else "no",
        save_steps=save_steps if save_steps > 0 else 500,
        save_total_limit=ft.save_total_limit,
        report_to=ft.report_to or "none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=info.use_cpu,
        max_length=cfg.task.max_length or 1024,
        packing=ft.packing,
        ddp_find_unused_parameters=False if info.strategy == "ddp" else None,
        disable_tqdm=not cfg.progress,
        dataset_num_proc=None,
    )
    try:
        return SFTConfig(**kwargs)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"the finetune settings do not make a valid SFTConfig: {err}") from err


def causal_lm_loss(outputs, labels, num_items_in_batch=None):
    """Next-token cross-entropy from ``outputs.logits`` (labels unshifted, -100 ignored), summed then divided by
    ``num_items_in_batch`` (the step's label tokens, as Trainer counts them) or by this batch's label tokens."""
    logits = outputs.logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    return loss / torch.as_tensor(count, device=loss.device).clamp(min=1)


def build_trainer(cfg: Any, model: nn.Module, tokenizer, examples: list[dict], callbacks: list, info: LaunchInfo,
                  run_dir: Path):
    """The SFTTrainer of a run.

    TRL >= 1.x computes the SFT loss through a fused LM head that returns no logits; a regulariser that reads the
    logits (``reg.needs_logits``, e.g. the KL baseline) gets them through ``compute_loss_func`` (TRL then runs one
    extra no-grad fused forward per micro-batch for its token metrics).
    """
    from datasets import Dataset
    from trl import SFTTrainer

    if not examples:
        raise RecipeError(f"task {cfg.task.name!r} produced no training examples")
    args = sft_config(cfg, info, run_dir)
    extra = {"compute_loss_func": causal_lm_loss} if cfg.reg.needs_logits else {}
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=tokenizer,
                      callbacks=callbacks, **extra)


def train(trainer, cfg: Any) -> dict[str, Any]:
    """Runs ``trainer.train()`` (resuming if asked) and returns the numbers that go into the results."""
    resume = cfg.finetune.resume_from_checkpoint
    resumed_from, start_step = None, 0
    if resume not in (None, False):
        from transformers.trainer_utils import get_last_checkpoint

        resumed_from = get_last_checkpoint(trainer.args.output_dir) if resume is True else str(resume)
        if resumed_from is None or not Path(resumed_from).is_dir():
            raise RecipeError(f"finetune.resume_from_checkpoint={resume}: no checkpoint found "
                              f"({resumed_from or trainer.args.output_dir}); relaunch with the interrupted run's "
                              "hydra.run.dir, or give a checkpoint folder")
        state_file = Path(resumed_from) / "trainer_state.json"
        if state_file.is_file():
            start_step = int(json.loads(state_file.read_text()).get("global_step", 0))
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resumed_from)
    seconds = time.perf_counter() - start
    history = trainer.state.log_history
    # regularisers log namespaced metrics: orthoreg/…, kl_to_base/…, ldifs/…, caft/…
    reg_metrics = {k: v for entry in history for k, v in entry.items() if "/" in k}
    losses = [e["loss"] for e in history if "loss" in e and math.isfinite(e["loss"])]
    return {
        "global_step": int(output.global_step),
        "train_loss": float(output.training_loss),
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "resumed_from": resumed_from,
        "steps_this_run": int(output.global_step) - start_step,
        "seconds": seconds,
        "seconds_per_step": seconds / max(int(output.global_step) - start_step, 1),
        "last_regularizer_metrics": reg_metrics,
        "bf16": bool(trainer.args.bf16),
        "world_size": info_world(trainer),
        "effective_batch_size": trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
        * max(info_world(trainer), 1),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }


def info_world(trainer) -> int:
    return int(getattr(trainer.args, "world_size", 1) or 1)


class AdapterDisabled(nn.Module):
    """A view of a PeftModel with its adapter switched off: the base model, sharing every weight (for the
    activation-shift overlap score after LoRA training)."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model
        self.config = peft_model.get_base_model().config

    def get_base_model(self) -> nn.Module:
        return self.peft_model.get_base_model()

    def get_input_embeddings(self):
        return self.peft_model.get_input_embeddings()

    def forward(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)
