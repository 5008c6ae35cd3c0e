"""Rank script: OrthoLoRA under raw FSDP2 (``fully_shard`` on every decoder layer and on the wrapper), 2 gloo ranks,
the same batch on both ranks.

Launch: ``torchrun --nproc_per_node 2 lora_fsdp2.py OUT_DIR``. Writes ``OUT_DIR/rank{r}.safetensors`` with, for two
backward passes, the full (un-sharded) LoRA gradients: ``penalty.*`` from backpropagating ``outputs.orthoreg_penalty``
of a weight-penalty-only config (no labels), ``full.*`` from ``outputs.loss`` with every term on.
"""

import os
import sys
import warnings

warnings.simplefilter("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lora_common import directions, lora_llama, lora_params, make_batch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from orthoreg import OrthoRegConfig  # noqa: E402
from orthoreg.lora import OrthoLoRA  # noqa: E402

PENALTY_ONLY = dict(layers="all", cov_weight=0.0, proj_weight=0.0, lora_weight=0.7)
FULL = dict(layers=[0, 1], cov_weight=5.0, proj_weight=0.7, lora_weight=0.3, anchor="absolute")


def sharded_run(config: dict, batch: dict, mesh) -> tuple[dict, torch.Tensor]:
    peft_model = lora_llama(seed=0)
    model = OrthoLoRA(peft_model, OrthoRegConfig(**config), directions())
    for layer in peft_model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = lora_params(peft_model)
    # The test is only meaningful if A and B really are shards outside the forward.
    assert all(isinstance(p, DTensor) for p in params.values()), "LoRA parameters are not sharded"
    model.train()
    outputs = model(**batch)
    target = outputs.loss if "labels" in batch else outputs.orthoreg_penalty
    target.backward()
    # Parameters outside the penalty (q_proj's LoRA in the penalty-only pass) have no gradient: report zeros.
    grads = {
        n: p.grad.full_tensor().detach().clone() if p.grad is not None else torch.zeros(p.shape)
        for n, p in params.items()
    }
    return grads, outputs.orthoreg_penalty.detach()


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    batch = make_batch(batch=2, seq=6, seed=3)
    tensors = {}
    grads, penalty = sharded_run(PENALTY_ONLY, {k: v for k, v in batch.items() if k != "labels"}, mesh)
    tensors.update({f"penalty.{n}": g for n, g in grads.items()})
    tensors["penalty.value"] = penalty.reshape(1)
    grads, penalty = sharded_run(FULL, batch, mesh)
    tensors.update({f"full.{n}": g for n, g in grads.items()})
    tensors["full.value"] = penalty.reshape(1)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, f"rank{dist.get_rank()}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)  # gloo can SIGABRT at interpreter exit (shared/notes/cpu-testing.md); results are on disk
