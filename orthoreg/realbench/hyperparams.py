"""The optimisation settings every LoRA fine-tune of ``orthoreg.realbench`` shares: one dataclass, four recipes.

The safety tunes that build the aligned bases (``aligned.AlignConfig``, ``aligned_v2.AlignV2Config``) and the
benign fine-tunes measured on them (``pipeline.BenchConfig``, ``task_runs.TaskBenchConfig``) all train through
``finetune.add_lora`` + ``finetune.train_lora`` and so are all parameterised by the same six numbers. Each recipe
subclasses ``FinetuneHyperparams`` and redeclares only the defaults it changes.

Serialised order: a dataclass lists its bases' fields before its own, so these six come first in
``dataclasses.asdict`` of a recipe — the order the recipes always had (the aligned bases' recipes put their data
fields first through a second base class, see ``aligned.AlignConfig``). A redeclared default keeps the field's
place, so results JSON and cache keys are the same as when each recipe spelled the fields out itself.

This module imports nothing heavy (no torch), so a config can be built and serialised without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FinetuneHyperparams:
    """One LoRA fine-tune's optimisation settings (the defaults: the benign task fine-tune of issue 8/14).

    Fields:
        steps: optimizer steps (exactly; the example list is cycled in seed-shuffled epochs, ``finetune.schedule``).
        batch_size: examples per optimizer step (one device, no gradient accumulation).
        lr: learning rate, constant (AdamW through ``transformers.Trainer``).
        rank: LoRA rank r on all seven projections (``finetune.LORA_TARGETS``).
        alpha: LoRA alpha (scaling alpha / r).
        max_length: token limit of one training example (prompt + reply); a longer one loses its end, so the
            reply's tail goes first (``model.encode_example``).
    """

    steps: int = 50
    batch_size: int = 8
    lr: float = 5e-4
    rank: int = 16
    alpha: int = 32
    max_length: int = 96
