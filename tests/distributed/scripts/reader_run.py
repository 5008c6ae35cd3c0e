"""Rank script of ``tests/test_reader_sharded.py``: the reader-side weight penalty under ``--backends fsdp2`` or
``--backends zero3`` (2 gloo CPU ranks, the same batch on both ranks unless said otherwise).

Launch (what the test runs through ``tests.distributed._launch.launch``)::

    torchrun --nproc_per_node 2 tests/distributed/scripts/reader_run.py --out DIR --backends fsdp2
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/distributed/scripts/reader_run.py --out DIR --backends zero3

What each backend records (``<backend>.<form>.<what>``):

- ``fsdp2.lora``: ``OrthoLoRA`` (reader term only) on a PEFT tiny Llama with every decoder layer and the OrthoLoRA
  ``fully_shard``-ed. Two backward passes at the initial weights: ``penalty`` (``outputs.orthoreg_penalty`` of a
  batch without labels) and ``full`` (``outputs.loss`` = task + penalty). Records the full LoRA gradients, the
  returned penalty, ``pop_metrics()["orthoreg/reader"]``, the gathered A and B and each module's scaling.
- ``fsdp2.full``: full fine-tuning of the tiny Llama with every decoder layer and the root ``fully_shard``-ed and
  the reader engine of ``OrthoRegCallback`` (``reader_penalty_for(config, subspaces, mode="inject")``) attached
  *after* sharding, so W₀V_mᵀ is recorded inside the first forward's unsharded region. Step 0: task loss, one SGD
  step (the penalty is 0 there). Step 1: ``(0 · loss).backward()`` (the injected penalty gradient alone), then
  ``loss.backward()`` (task + penalty). Records the gradients, the logged values, the stored W₀V_mᵀ and the
  gathered weights W₁ of step 1.
- ``zero3.lora``: ``OrthoLoRA`` + accelerate + DeepSpeed ZeRO-3 (persistence threshold 0, max live parameters 0:
  A and B are partitioned outside their module's forward — recorded), lr = 0, the same two backward passes at the
  first step (ZeRO recording its trace) and the third (prefetching by the recorded trace), via
  ``deepspeed.utils.safe_get_full_grad``; the returned and logged penalties, the gathered A and B, the scalings.
  Also records whether A and B are registered as the LoraLayer's ZeRO-3 external parameters
  (``orthoreg.core.zero3.register_external_parameters``; before that helper, ``from deepspeed.zero import …`` raised
  ImportError in deepspeed 0.19.8 and nothing was registered — the term stayed exact only through DeepSpeed's own
  discovery of external parameters inside ``engine.forward``).
- ``zero3.full``: HF ``Trainer`` + ``OrthoRegCallback(config, input_subspaces=...)`` (reader term only) under
  ZeRO-3, full fine-tuning, two SGD steps, each rank its own half of the data (``callback_common``), and the same
  two steps without the callback (``zero3.task``). Records the gathered weights before, after step 1 and after
  step 2, and the logged ``orthoreg/reader`` of both steps. Step 1's penalty is 0 (W = W₀) and so is its gradient,
  so W₁ is the same in both runs and their step-2 updates differ by exactly −lr·λ·∇reader(W₁).

Each rank writes ``rank{r}.json``/``rank{r}.safetensors`` and ends with ``os._exit`` (``_launch.finish``).
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
from callback_common import (  # noqa: E402
    GLOBAL_BATCH,
    ListDataset,
    build_model,
    full_values,
    samples,
    training_args,
    zero3_sharded,
)
from lora_common import lora_llama, lora_params, make_batch, tiny_llama  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from orthoreg import OrthoRegConfig  # noqa: E402
from orthoreg.reader import InputSubspaces  # noqa: E402

# LoRA: λ with which the reader part is about 2/3 of the task + reader gradient (value ≈ 10 at the random init).
LAMBDA = 0.02
K = 3
# LoRA (lora_common.lora_llama: r = 4, α = 8, so s = 2 and s² = 4 ≠ s): q_proj, o_proj and down_proj of 3 layers.
LORA_TARGETS = ("q_proj", "o_proj", "down_proj")
# Full fine-tuning: a reading (q_proj, up_proj) and a writing (down_proj) module of every layer.
FULL_TARGETS = ("q_proj", "up_proj", "down_proj")
# Full fine-tuning: SGD lr and a λ that make the step-1 (FSDP2) / step-2 (ZeRO-3, lr = callback_common.LR = 1)
# reader gradient comparable to the task gradient, so a wrong reader part cannot hide below the tolerance.
FSDP2_LR = 8.0
FULL_LAMBDA = 2.0
READER_ONLY = dict(layers="all", cov_weight=0.0, proj_weight=0.0, lora_weight=0.0, reader_weight=LAMBDA)


def reader_subspaces(targets=LORA_TARGETS, seed: int = 0) -> InputSubspaces:
    """Random (k, d_in) bases (orthonormalised by ``InputSubspaces``) for the ``targets`` of every layer of the
    3-layer tiny Llama (d = 32; down_proj reads 37)."""
    g = torch.Generator().manual_seed(seed)
    bases = {name: torch.randn(K, module.in_features, generator=g)
             for name, module in tiny_llama(seed=0).named_modules()
             if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear)}
    return InputSubspaces(bases)


def reader_batch() -> dict[str, torch.Tensor]:
    return make_batch(batch=2, seq=6, seed=3)


def _lora_modules(peft_model) -> dict[str, torch.nn.Module]:
    """Canonical module name → LoraLayer, for the modules the subspaces name."""
    prefix = "base_model.model."
    return {name[len(prefix):]: module for name, module in peft_model.named_modules()
            if hasattr(module, "lora_A") and name.startswith(prefix)}


def _zeros_if_none(params: dict, get) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in params.items():
        grad = get(p)
        out[name] = grad.detach().clone().float() if grad is not None else \
            torch.zeros(tuple(getattr(p, "ds_shape", p.shape)))
    return out


# ------------------------------------------------------------------------------------------------ FSDP2
def run_fsdp2(tensors: dict, info: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from orthoreg.lora.wrapper import OrthoLoRA
    from orthoreg.reader.wiring import reader_penalty_for

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    batch = reader_batch()
    no_labels = {k: v for k, v in batch.items() if k != "labels"}

    # ---- LoRA through OrthoLoRA
    for tag, inputs in (("penalty", no_labels), ("full", batch)):
        peft_model = lora_llama(seed=0)
        model = OrthoLoRA(peft_model, OrthoRegConfig(**READER_ONLY), input_subspaces=reader_subspaces())
        scalings = {name: float(m.scaling["default"]) for name, m in _lora_modules(peft_model).items()}
        for layer in peft_model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = lora_params(peft_model)
        info[f"fsdp2.lora.{tag}.sharded"] = all(isinstance(p, DTensor) for p in params.values())
        model.train()
        outputs = model(**inputs)
        (outputs.loss if "labels" in inputs else outputs.orthoreg_penalty).backward()
        grads = _zeros_if_none(params, lambda p: None if p.grad is None else p.grad.full_tensor())
        tensors.update({f"fsdp2.lora.{tag}.grad.{n}": g for n, g in grads.items()})
        tensors.update({f"fsdp2.lora.{tag}.param.{n}": p.full_tensor().detach().clone() for n, p in params.items()})
        info[f"fsdp2.lora.{tag}.returned"] = outputs.orthoreg_penalty.item()
        info[f"fsdp2.lora.{tag}.logged"] = model.pop_metrics()["orthoreg/reader"]
        info["fsdp2.lora.scaling"] = scalings

    # ---- full fine-tuning through the callback's engine (inject mode)
    spaces = reader_subspaces(FULL_TARGETS, seed=1)
    model = tiny_llama(seed=0)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    reader = reader_penalty_for(OrthoRegConfig(**{**READER_ONLY, "reader_weight": FULL_LAMBDA}), spaces, mode="inject")
    reader.attach(model)
    weights = {n: dict(model.named_parameters())[f"{n}.weight"] for n in spaces.names}
    info["fsdp2.full.sharded_at_attach"] = all(isinstance(w, DTensor) for w in weights.values())
    info["fsdp2.full.recorded_at_attach"] = len(reader.reference_state())
    optimizer = torch.optim.SGD(model.parameters(), lr=FSDP2_LR)
    model.train()
    model(**batch).loss.backward()  # step 0: W = W₀, the penalty and its gradient are 0
    optimizer.step()
    optimizer.zero_grad()
    info["fsdp2.full.step0.logged"] = reader.pop_metrics()["reader"]
    tensors.update({f"fsdp2.full.base.{n}": t for n, t in reader.reference_state().items()})
    tensors.update({f"fsdp2.full.w1.{n}": p.full_tensor().detach().clone() for n, p in model.named_parameters()})
    all_params = dict(model.named_parameters())
    for tag in ("penalty", "full"):
        loss = model(**batch).loss
        (loss * 0.0 if tag == "penalty" else loss).backward()  # penalty: the task gradient is exactly 0
        grads = _zeros_if_none(all_params, lambda p: None if p.grad is None else p.grad.full_tensor())
        tensors.update({f"fsdp2.full.{tag}.grad.{n}": g for n, g in grads.items()})
        optimizer.zero_grad()
        info[f"fsdp2.full.{tag}.logged"] = reader.pop_metrics()["reader"]
    reader.detach()


# ------------------------------------------------------------------------------------------------ ZeRO-3
def _zero3_lora(tensors: dict, info: dict) -> None:
    import deepspeed
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType
    from deepspeed.utils import safe_get_full_grad
    from lora_run import ZERO3

    from orthoreg.lora.wrapper import OrthoLoRA

    batch = reader_batch()
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    for tag, inputs in (("penalty", no_labels), ("full", batch)):
        AcceleratorState._reset_state(reset_partial_state=False)  # one DeepSpeed engine per Accelerator
        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=dict(ZERO3)))
        assert accelerator.distributed_type == DistributedType.DEEPSPEED, accelerator.distributed_type
        peft_model = lora_llama(seed=0)
        model = OrthoLoRA(peft_model, OrthoRegConfig(**READER_ONLY), input_subspaces=reader_subspaces(),
                          accelerator=accelerator)
        scalings = {name: float(m.scaling["default"]) for name, m in _lora_modules(peft_model).items()}
        info["zero3.lora.registered"] = all(  # A and B are the LoraLayer's ZeRO-3 external parameters
            {id(m.lora_A["default"].weight), id(m.lora_B["default"].weight)} <= set(getattr(m, "_external_params", {}))
            for m in _lora_modules(peft_model).values())
        # lr = 0: the parameters stay at their initial values, so every step has the same reference.
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        engine, optimizer = accelerator.prepare(model, optimizer)
        info["zero3.engine"] = type(engine).__name__
        info["zero3.stage"] = engine.zero_optimization_stage()
        params = lora_params(peft_model)
        info[f"zero3.lora.{tag}.sharded"] = all(p.numel() == 0 for p in params.values())
        engine.train()
        returned = []
        for step in range(3):  # step 0: ZeRO records its trace; step 2: releases/prefetches by it
            outputs = engine(**inputs)
            returned.append(outputs.orthoreg_penalty.item())
            accelerator.backward(outputs.loss if "labels" in inputs else outputs.orthoreg_penalty)
            if step in (0, 2):
                grads = _zeros_if_none(params, safe_get_full_grad)
                tensors.update({f"zero3.lora.{tag}.step{step}.grad.{n}": g for n, g in grads.items()})
            optimizer.step()
            optimizer.zero_grad()
        info[f"zero3.lora.{tag}.returned"] = returned
        info[f"zero3.lora.{tag}.logged"] = model.pop_metrics()["orthoreg/reader"]  # mean over the 3 forwards
        info["zero3.lora.scaling"] = scalings
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            tensors.update({f"zero3.lora.{tag}.param.{n}": p.detach().clone() for n, p in params.items()})
        del engine, optimizer, model


class _Probe(TrainerCallback):
    """Records how many parameters are ZeRO-3 partitions when training begins (the callback attaches then) and the
    gathered weights after step 1 (every rank: ``GatheredParameters`` is a collective)."""

    def __init__(self, seen: dict, names: list[str]):
        self.seen, self.names = seen, names

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.seen["sharded_at_begin"] = zero3_sharded(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            self.seen["w1"] = full_values(model, self.names)


def _zero3_full(tensors: dict, info: dict) -> None:
    from lora_run import ZERO3
    from transformers import Trainer

    from orthoreg import OrthoRegCallback

    spaces = reader_subspaces(FULL_TARGETS, seed=1)
    config = OrthoRegConfig(**{**READER_ONLY, "reader_weight": FULL_LAMBDA})
    ds_config = {**ZERO3, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 "gradient_clipping": "auto"}
    work = tempfile.mkdtemp(prefix="orthoreg-reader-")
    for tag in ("full", "task"):
        model = build_model()
        names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen: dict = {}
        callbacks = [_Probe(seen, names)]
        if tag == "full":
            # Listed first: its on_train_begin (attach) runs while the weights are partitioned.
            callbacks.insert(0, OrthoRegCallback(config, input_subspaces=spaces))
        args = training_args(f"{work}/{tag}", batch=GLOBAL_BATCH // 2, ga=1, deepspeed=ds_config)
        args.max_steps = 2
        trainer = Trainer(model=model, args=args, train_dataset=ListDataset(samples(2 * GLOBAL_BATCH)),
                          callbacks=callbacks)
        trainer.train()
        after = full_values(trainer.model, names)
        info[f"zero3.{tag}.model_class"] = type(trainer.model_wrapped).__name__
        info[f"zero3.{tag}.sharded_at_begin"] = seen["sharded_at_begin"]
        info[f"zero3.{tag}.logs"] = [e for e in trainer.state.log_history if "orthoreg/reader" in e]
        for n in names:
            tensors[f"zero3.{tag}.w0.{n}"] = before[n]
            tensors[f"zero3.{tag}.w1.{n}"] = seen["w1"][n]
            tensors[f"zero3.{tag}.w2.{n}"] = after[n]
        del trainer, model


def run_zero3(tensors: dict, info: dict) -> None:
    # DeepSpeed on CPU ranks: configure the state before any Accelerator/Trainer, else accelerate falls back to DDP.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate.state import PartialState

    skip_deepspeed_shm_comm_build()
    PartialState(backend="gloo")
    _zero3_full(tensors, info)
    _zero3_lora(tensors, info)


def main() -> None:
    out, rest = rank_out_dir()
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", required=True)
    backends = parser.parse_args(rest).backends.split(",")
    torch.set_num_threads(1)
    if "zero3" not in backends and not dist.is_initialized():
        dist.init_process_group("gloo")
    tensors: dict[str, torch.Tensor] = {}
    info: dict = {}
    for backend in backends:
        {"fsdp2": run_fsdp2, "zero3": run_zero3}[backend](tensors, info)
    info["world_size"] = dist.get_world_size()
    write_rank_results(out, dist.get_rank(), info, tensors)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_rank(main)
