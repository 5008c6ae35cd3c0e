"""Rank script: one OrthoLoRA SGD step under DDP (2 gloo ranks, ``gather=True``), each rank on its half of the batch.

Launch: ``torchrun --nproc_per_node 2 lora_ddp.py OUT_DIR`` (or ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu
--num_processes 2 lora_ddp.py OUT_DIR``). Writes ``OUT_DIR/rank{r}.safetensors`` with the updated LoRA parameters.
"""

import os
import sys
import warnings

warnings.simplefilter("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from lora_common import directions, lora_llama, lora_params, make_batch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from orthoreg import OrthoRegConfig  # noqa: E402
from orthoreg.lora import OrthoLoRA  # noqa: E402

CONFIG = dict(layers=[0, 1], cov_weight=200.0, proj_weight=0.7, lora_weight=0.3, anchor="paired", gather=True)
LR = 0.1


def rank_batches():
    """The two ranks' micro-batches; the single-process reference uses their concatenation."""
    return [make_batch(batch=2, seq=6, seed=10 + r, pad=0) for r in range(2)]


def main(out_dir: str) -> None:
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, f"expected 2 processes, got {accelerator.num_processes}"
    model = OrthoLoRA(lora_llama(seed=0), OrthoRegConfig(**CONFIG), directions(), accelerator=accelerator)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    batch = rank_batches()[accelerator.process_index]
    with accelerator.accumulate(model):
        outputs = model(**batch)
        accelerator.backward(outputs.loss)
        optimizer.step()
        optimizer.zero_grad()
    unwrapped = accelerator.unwrap_model(model)
    tensors = {n: p.detach().clone().contiguous() for n, p in lora_params(unwrapped.model).items()}
    tensors["metric.loss"] = outputs.loss.detach().reshape(1)
    tensors["metric.penalty"] = outputs.orthoreg_penalty.detach().reshape(1)
    save_file(tensors, os.path.join(out_dir, f"rank{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)  # gloo can SIGABRT at interpreter exit (shared/notes/cpu-testing.md); results are on disk
