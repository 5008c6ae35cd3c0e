"""Rank script of ``tests/distributed/test_builtin_subspaces.py``: ``OrthoRegCallback(OrthoRegConfig.recommended())``
in an HF ``Trainer`` on 2 gloo CPU ranks, full fine-tuning of a tiny chat Llama, under DDP (``--backend ddp``) or
DeepSpeed ZeRO-3 (``--backend zero3``, every parameter partitioned: the recording forward is collective there).

Launch (what the test runs through ``tests.distributed._launch.launch``)::

    torchrun --nproc_per_node 2 tests/distributed/scripts/builtin_subspaces_run.py --out DIR --backend ddp
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/distributed/scripts/builtin_subspaces_run.py --out DIR \\
        --backend zero3

Each rank records the V_m its callback penalises (``rank{r}.safetensors``), whether the weights were partitioned
when training began, and the logged ``orthoreg/reader`` of the two steps (``rank{r}.json``). A harm-margin guard in
budget mode (read after every step, a bound it crosses) rides along: each rank records its readings, the falls it
acted on and the reader λ it set.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

warnings.simplefilter("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/distributed, for _launch

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _launch import rank_out_dir, run_rank, skip_deepspeed_shm_comm_build, write_rank_results  # noqa: E402
from callback_common import ListDataset, training_args, zero3_sharded  # noqa: E402

from orthoreg import OrthoRegCallback, OrthoRegConfig  # noqa: E402
from orthoreg.firewall import MarginGuardCallback, MarginGuardConfig, RefusalMarginProbe  # noqa: E402
from orthoreg.realbench.tiny import bpe_tokenizer, tiny_llama  # noqa: E402


def chat_samples(tokenizer, n: int) -> list[dict[str, list[int]]]:
    rows = []
    for i in range(n):
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me about topic {i}."},
                                              {"role": "assistant", "content": "Here is a short answer."}],
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:32]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    return rows


def main() -> None:
    out, rest = rank_out_dir()
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=("ddp", "zero3"), required=True)
    backend = parser.parse_args(rest).backend
    torch.set_num_threads(1)
    ds_config = None
    if backend == "zero3":
        from lora_run import ZERO3

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        from accelerate.state import PartialState

        skip_deepspeed_shm_comm_build()
        PartialState(backend="gloo")
        ds_config = {**ZERO3, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                     "gradient_clipping": "auto"}
    elif not dist.is_initialized():
        dist.init_process_group("gloo")
    tokenizer = bpe_tokenizer()
    model = tiny_llama(tokenizer).train()
    # the anchor KL refuses ZeRO (its separate backward would bypass the partitioned reduction); under DDP it runs
    config = OrthoRegConfig.recommended(anchor_kl_weight=0.0) if backend == "zero3" else OrthoRegConfig.recommended()
    callback = OrthoRegCallback(config, tokenizer=tokenizer)
    guard = MarginGuardCallback(MarginGuardConfig(max_fall=1e-6, action="adapt"), orthoreg=callback, every_n_steps=1,
                                probe=RefusalMarginProbe(pairs=4), tokenizer=tokenizer)
    seen: dict = {}
    from transformers import Trainer, TrainerCallback

    class ShardingProbe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["sharded_at_begin"] = zero3_sharded(model) > 0

    args = training_args(tempfile.mkdtemp(prefix="orthoreg-builtin-"), batch=2, ga=1, deepspeed=ds_config)
    args.max_steps, args.learning_rate = 2, 0.05
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(chat_samples(tokenizer, 8)),
                      callbacks=[ShardingProbe(), callback, guard])
    trainer.train()
    reader = [row["orthoreg/reader"] for row in trainer.state.log_history if "orthoreg/reader" in row]
    info = {"world_size": dist.get_world_size(), "backend": backend, "reader": reader,
            "sharded_at_begin": seen["sharded_at_begin"], "modules": callback.input_subspaces.names,
            "prompt_count": callback.input_subspaces.metadata["prompt_set"]["count"],
            "guard": guard.history, "readings": guard.readings, "reader_weight": callback.reader.weight}
    write_rank_results(out, dist.get_rank(), info, dict(callback.input_subspaces.items()))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_rank(main)
