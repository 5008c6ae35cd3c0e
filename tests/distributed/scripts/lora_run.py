"""Rank script of the OrthoLoRA distributed tests: ``--backends ddp,fsdp2`` or ``--backends zero3``.

Launch (what ``tests/distributed/test_lora_distributed.py`` runs through ``_launch.launch``)::

    torchrun --nproc_per_node 2 tests/distributed/scripts/lora_run.py --out DIR --backends ddp,fsdp2
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/distributed/scripts/lora_run.py --out DIR --backends zero3

Backends (2 gloo ranks each):

- ``ddp``: accelerate DDP, ``gather=True``; each rank takes its half of a batch; one SGD step; records the updated
  LoRA parameters (``ddp.<param>``).
- ``fsdp2``: raw ``fully_shard`` on every decoder layer and on the OrthoLoRA; the same batch on both ranks; records
  the full LoRA gradients of two backward passes: ``fsdp2.penalty.*`` from ``outputs.orthoreg_penalty`` of a
  weight-penalty-only config without labels, ``fsdp2.full.*`` from ``outputs.loss`` with every term on.
- ``zero3``: accelerate + DeepSpeed ZeRO-3 (parameter persistence threshold 0, so even the tiny LoRA matrices are
  partitioned), otherwise as ``fsdp2`` (``zero3.penalty.*``, ``zero3.full.*``; gradients via
  ``deepspeed.utils.safe_get_full_grad``); then saves the adapter from ``accelerator.get_state_dict`` into
  ``DIR/saved`` (and records the error for a save without it).

Each rank writes ``rank{r}.json``/``rank{r}.safetensors`` and ends with ``os._exit`` (``_launch.finish``).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

warnings.simplefilter("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/distributed, for _launch

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _launch import finish, rank_out_dir, write_rank_results  # noqa: E402
from lora_common import directions, lora_llama, lora_params, make_batch  # noqa: E402

from orthoreg import OrthoRegConfig  # noqa: E402
from orthoreg.lora.wrapper import OrthoLoRA  # noqa: E402

LR = 0.1
# DDP: the covariance weight is large enough that gathering vs not changes the update by ~0.2 of its size.
DDP_CONFIG = dict(layers=[0, 1], cov_weight=200.0, proj_weight=0.7, lora_weight=0.3, anchor="paired", gather=True)
PENALTY_ONLY = dict(layers="all", cov_weight=0.0, proj_weight=0.0, lora_weight=0.7)
# paired: the no-grad reference forward with the adapter disabled also runs through the sharded model.
FULL = dict(layers=[0, 1], cov_weight=5.0, proj_weight=0.7, lora_weight=0.3, anchor="paired")
ZERO3 = {
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5000,
        "stage3_prefetch_bucket_size": 0,
        "stage3_param_persistence_threshold": 0,  # partition every parameter, LoRA's tiny A and B included
        "stage3_max_live_parameters": 0,  # release every gathered parameter as early as possible
        "stage3_max_reuse_distance": 0,
        "stage3_gather_16bit_weights_on_model_save": True,  # accelerator.get_state_dict gathers for saving
    },
    "zero_allow_untested_optimizer": True,
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 0.0,
}


def ddp_rank_batches() -> list[dict[str, torch.Tensor]]:
    """The two ranks' micro-batches (no padding: equal token counts, so the mean over ranks of the per-rank token
    means is the global token mean); the single-process reference uses their concatenation."""
    return [make_batch(batch=2, seq=6, seed=10 + r, pad=0) for r in range(2)]


def sharded_batch() -> dict[str, torch.Tensor]:
    return make_batch(batch=2, seq=6, seed=3)


def penalty_only_batch() -> dict[str, torch.Tensor]:
    return {k: v for k, v in sharded_batch().items() if k != "labels"}


def run_ddp(tensors: dict, info: dict, out_dir: str) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    info["ddp.num_processes"] = accelerator.num_processes
    info["ddp.distributed_type"] = str(accelerator.distributed_type)
    model = OrthoLoRA(lora_llama(seed=0), OrthoRegConfig(**DDP_CONFIG), directions(), accelerator=accelerator)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    info["ddp.wrapper"] = type(model).__name__
    model.train()
    batch = ddp_rank_batches()[accelerator.process_index]
    with accelerator.accumulate(model):
        outputs = model(**batch)
        accelerator.backward(outputs.loss)
        optimizer.step()
        optimizer.zero_grad()
    unwrapped = accelerator.unwrap_model(model)
    tensors.update({f"ddp.{n}": p.detach().clone() for n, p in lora_params(unwrapped.model).items()})
    info["ddp.penalty"] = outputs.orthoreg_penalty.item()


def _full_grads(params: dict, get) -> dict[str, torch.Tensor]:
    # Parameters outside the penalty (q_proj's LoRA in the penalty-only pass) have no gradient: report zeros.
    out = {}
    for name, p in params.items():
        grad = get(p)
        out[name] = grad.detach().clone() if grad is not None else torch.zeros(tuple(getattr(p, "ds_shape", p.shape)))
    return out


def run_fsdp2(tensors: dict, info: dict, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for tag, config, batch in (("penalty", PENALTY_ONLY, penalty_only_batch()), ("full", FULL, sharded_batch())):
        peft_model = lora_llama(seed=0)
        model = OrthoLoRA(peft_model, OrthoRegConfig(**config), directions())
        for layer in peft_model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = lora_params(peft_model)
        # Only meaningful if A and B really are shards outside the forward.
        info[f"fsdp2.{tag}.sharded"] = all(isinstance(p, DTensor) for p in params.values())
        model.train()
        outputs = model(**batch)
        (outputs.loss if "labels" in batch else outputs.orthoreg_penalty).backward()
        grads = _full_grads(params, lambda p: None if p.grad is None else p.grad.full_tensor())
        tensors.update({f"fsdp2.{tag}.{n}": g for n, g in grads.items()})
        info[f"fsdp2.{tag}.penalty"] = outputs.orthoreg_penalty.item()
        info[f"fsdp2.{tag}.lora"] = model.last_metrics["orthoreg/lora"]


def run_zero3(tensors: dict, info: dict, out_dir: str) -> None:
    # DeepSpeed on CPU ranks: configure the state before the Accelerator, else
    # accelerate silently falls back to DDP.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    from deepspeed.utils import safe_get_full_grad

    PartialState(backend="gloo")
    for tag, config, batch in (("penalty", PENALTY_ONLY, penalty_only_batch()), ("full", FULL, sharded_batch())):
        AcceleratorState._reset_state(reset_partial_state=False)  # one DeepSpeed engine per Accelerator
        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=dict(ZERO3)))
        assert accelerator.distributed_type == DistributedType.DEEPSPEED, accelerator.distributed_type
        peft_model = lora_llama(seed=0)
        model = OrthoLoRA(peft_model, OrthoRegConfig(**config), directions(), accelerator=accelerator)
        # lr = 0: the parameters stay at their initial values, so every step has the same reference gradients.
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        engine, optimizer = accelerator.prepare(model, optimizer)
        info["zero3.engine"] = type(engine).__name__
        info["zero3.stage"] = engine.zero_optimization_stage()
        info["zero3.writers_registered"] = all(  # the writers' A and B: ZeRO-3 external parameters of their layer
            {id(w.module.lora_A["default"].weight), id(w.module.lora_B["default"].weight)}
            <= set(getattr(w.module, "_external_params", {})) for w in model.writers)
        params = lora_params(peft_model)
        # Partitioned outside a forward: an empty local tensor (the full shape is in ds_shape).
        info[f"zero3.{tag}.sharded"] = all(p.numel() == 0 for p in params.values())
        engine.train()
        # ZeRO-3 records the module order during the first step and releases/prefetches by it afterwards: step 1
        # and step 3 (trace complete) exercise both regimes.
        for step in range(3):
            outputs = engine(**batch)
            accelerator.backward(outputs.loss if "labels" in batch else outputs.orthoreg_penalty)
            if step in (0, 2):
                grads = _full_grads(params, safe_get_full_grad)
                tensors.update({f"zero3.{tag}.step{step}.{n}": g for n, g in grads.items()})
            optimizer.step()
            optimizer.zero_grad()
        info[f"zero3.{tag}.penalty"] = outputs.orthoreg_penalty.item()
        info[f"zero3.{tag}.lora"] = model.last_metrics["orthoreg/lora"]
        if tag == "full":
            # Saving sharded parameters directly would write empty tensors: refused with a clear error.
            try:
                model.save_pretrained(os.path.join(out_dir, "unsafe"))
                info["zero3.save_unsharded_error"] = None
            except ValueError as err:
                info["zero3.save_unsharded_error"] = str(err)
            # The supported form: a gathered state dict, every rank calls (a collective), rank 0 writes.
            model.save_pretrained(os.path.join(out_dir, "saved"), state_dict=accelerator.get_state_dict(engine))
            accelerator.wait_for_everyone()


def main() -> None:
    out, rest = rank_out_dir()
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", required=True)
    backends = parser.parse_args(rest).backends.split(",")
    if "zero3" not in backends and not dist.is_initialized():
        dist.init_process_group("gloo")
    tensors: dict[str, torch.Tensor] = {}
    info: dict = {}
    for backend in backends:
        {"ddp": run_ddp, "fsdp2": run_fsdp2, "zero3": run_zero3}[backend](tensors, info, str(out))
    rank = dist.get_rank()
    info["world_size"] = dist.get_world_size()
    info["out_dir"] = str(out)
    write_rank_results(out, rank, info, tensors)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    finish(0)  # os._exit: gloo can SIGABRT at interpreter exit; results are on disk
