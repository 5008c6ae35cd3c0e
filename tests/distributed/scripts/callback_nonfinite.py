"""Two DDP ranks, ``OrthoRegConfig(on_nonfinite="skip", gather=False)``, NaN hidden states on rank 0 only.

Rank 0 drops every penalty, rank 1 keeps its first one, so at the first logging step the ranks hold different
metric keys. The callback's logging must still run the same collectives on every rank (no hang, no mismatched
all-reduce) and report the same values everywhere. Writes each rank's orthoreg log entries to ``rank{r}.json``.
"""

from __future__ import annotations

import os
import tempfile

import torch
from callback_common import ListDataset, build_model, rank_out_dir, run_rank, samples, write_rank_results


def main() -> None:
    out, _ = rank_out_dir()
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    from transformers import Trainer, TrainingArguments

    from orthoreg import OrthoRegCallback, OrthoRegConfig

    model = build_model()
    if rank == 0:
        def poison(module, args, output):
            if module.training:
                return output * float("nan")

        model.model.layers[0].register_forward_hook(poison)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="orthoreg-nonfinite-"), per_device_train_batch_size=2, max_steps=2,
        learning_rate=0.0, optim="sgd", use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, max_grad_norm=0.0,
    )
    config = OrthoRegConfig(layers=[1], cov_weight=0.01, proj_weight=0.0, gather=False, on_nonfinite="skip")
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(samples(4) * 2),
                      callbacks=[OrthoRegCallback(config)])
    trainer.train()
    logs = [{k: v for k, v in entry.items() if k.startswith("orthoreg/")} for entry in trainer.state.log_history]
    write_rank_results(out, rank, {"logs": logs})


if __name__ == "__main__":
    run_rank(main)
