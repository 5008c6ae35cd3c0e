"""Fine-tuning a testbed model on a narrow task with a real ``transformers.Trainer``.

Because it is the stock ``Trainer``, any ``TrainerCallback`` (e.g. ``orthoreg.OrthoRegCallback``)
plugs in unchanged, and LoRA goes through ``peft.get_peft_model``.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments

from . import world
from .tokenizer import encode_task


class PadCollator:
    """Right-pads ``input_ids`` (pad id), ``labels`` (-100) and builds ``attention_mask``."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)

        def pad(key, value):
            return torch.tensor([list(e[key]) + [value] * (width - len(e[key])) for e in examples])

        mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples])
        return {"input_ids": pad("input_ids", self.pad_id), "attention_mask": mask, "labels": pad("labels", -100)}


@dataclass
class FinetuneResult:
    """The fine-tuned model (a ``PeftModel`` with LoRA), wall time of ``trainer.train()``, and its log."""

    model: torch.nn.Module
    seconds: float
    steps: int
    train_loss: float
    log_history: list[dict]

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)


def finetune(model, tokenizer, task: str | world.NarrowTask | list[dict], *, steps: int = 300, lr: float = 3e-4,
             seed: int = 0, batch_size: int = 16, callbacks=(), lora=None, extra_examples=(),
             n_examples: int | None = None, lr_scheduler_type: str = "constant", warmup_steps: int = 0,
             output_dir: str | None = None, **training_args) -> FinetuneResult:
    """Fine-tune ``model`` on a narrow task, loss on assistant tokens only; trains ``model`` in place.

    Args:
        task: a narrow-task name, a ``NarrowTask``, or already-encoded examples
            (dicts with ``input_ids`` and ``labels``).
        steps: optimizer steps (``max_steps``). lr, seed, batch_size: as in ``TrainingArguments``;
            ``seed`` also draws the task's examples.
        callbacks: ``TrainerCallback`` instances, passed to the ``Trainer`` unchanged.
        lora: *optional* ``peft.LoraConfig``; the model is wrapped with ``get_peft_model`` and only
            the adapter trains. Default None: full fine-tuning.
        extra_examples: encoded examples mixed into the training set (e.g. aligned data for an
            interleaving baseline); the Trainer shuffles them with the task's examples.
        n_examples: task examples to draw (default ``steps * batch_size``, one pass without repeats).
        lr_scheduler_type, warmup_steps, output_dir, **training_args: forwarded to ``TrainingArguments``.
    """
    if isinstance(task, (str, world.NarrowTask)):
        task = encode_task(tokenizer, task, n_examples or steps * batch_size, seed=seed)
    train_set = list(task) + list(extra_examples)
    if lora is not None:
        from peft import get_peft_model  # optional dependency path, imported only when used

        model = get_peft_model(model, lora)
    with tempfile.TemporaryDirectory() as tmp:
        settings = dict(
            output_dir=output_dir or tmp, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
            lr_scheduler_type=lr_scheduler_type, warmup_steps=warmup_steps, weight_decay=0.0, seed=seed,
            data_seed=seed, use_cpu=True, report_to=[], save_strategy="no", logging_steps=max(1, steps // 10),
            disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        )
        args = TrainingArguments(**{**settings, **training_args})
        trainer = Trainer(model=model, args=args, train_dataset=train_set, processing_class=tokenizer,
                          data_collator=PadCollator(tokenizer.pad_token_id), callbacks=list(callbacks))
        trainer.remove_callback(PrinterCallback)  # keep stdout quiet; the losses stay in `log_history`
        t0 = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - t0
    model.eval()
    return FinetuneResult(model, seconds, out.global_step, out.training_loss, trainer.state.log_history)
