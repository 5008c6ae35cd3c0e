"""Shared pieces of the OrthoRegCallback distributed scripts: the tiny model, the data, one training run.

Every run starts from the same weights (built under a fixed seed, recorded and compared by the test), trains ONE
optimizer step of plain SGD (lr = 1, constant schedule, no clipping, no weight decay, no momentum), so the
parameter update is exactly −grad, and records that update for every trainable parameter.

The data are right-padded sequences of different real lengths (label of position 0 set to -100, so transformers
4.x and 5.x count the same ``num_items_in_batch``). With ``train_sampling_strategy="sequential"`` (transformers
>= 5) accelerate hands data-parallel rank r the r-th ``per_device_train_batch_size`` block of each group of W
blocks, so micro-batch k of the 2-rank run is samples [4k, 4k + 4) split in half (rank 0: 23 real tokens, rank 1:
13 in micro-batch 0), and the single-process reference with batch 4 sees exactly those samples as its micro-batch
k. Transformers 4.x samples randomly, but with the same seeded permutation in both runs, so the micro-batches still
correspond; the test checks only that the ranks' token counts differ (no split of samples 0-3 is even). Unequal
counts exercise the padded all-gather of ``gather_rows``. Hooks record each rank's actual micro-batches, which the
explicit float64 reference reuses.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/distributed, for _launch

from _launch import finish, rank_out_dir, run_rank, skip_deepspeed_shm_comm_build, write_rank_results  # noqa: E402,F401

SEQ_LEN = 12
HIDDEN = 32
# Real lengths of the 8 samples. Micro-batch 0 = samples 0-3: rank 0 gets 12 + 11 = 23 real tokens (< d = 32: the
# Gram path locally), rank 1 gets 9 + 4 = 13, the global batch has 36 (> d: the direct d×d path).
LENGTHS = [12, 11, 9, 4, 10, 3, 12, 7]
COV_WEIGHT = 0.005
PROJ_WEIGHT = 0.05
LAYERS = "all"
LR = 1.0
GLOBAL_BATCH = 4  # 2 ranks x 2, or 1 process x 4


def build_model(lora: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=99, hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(4321)
        model = get_peft_model(model, LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
            target_modules=["q_proj", "o_proj", "down_proj"],
        ))
    return model


def samples(n: int) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(99)
    out = []
    for length in LENGTHS[:n]:
        ids = torch.randint(3, 99, (SEQ_LEN,), generator=g)
        ids[length:] = 0
        attn = (torch.arange(SEQ_LEN) < length).long()
        labels = torch.where(attn.bool(), ids, torch.full_like(ids, -100))
        # Position 0 is never a target of the shifted CE; marking it -100 makes transformers 4.x (which counts
        # unshifted labels for num_items_in_batch) and 5.x (which counts labels[..., 1:]) normalise the same way.
        labels[0] = -100
        out.append({"input_ids": ids.tolist(), "attention_mask": attn.tolist(), "labels": labels.tolist()})
    return out


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {k: torch.tensor(v) for k, v in self.items[i].items()}


def orthoreg_config(gather: bool, proj: bool = False):
    """Covariance on every layer; with ``proj`` also the base-mean projection (global r, global token mean)."""
    from orthoreg import OrthoRegConfig

    return OrthoRegConfig(layers=LAYERS, cov_weight=COV_WEIGHT, proj_weight=PROJ_WEIGHT if proj else 0.0,
                          anchor="base_mean", gather=gather)


def projection_directions():
    """Two fixed random directions per layer (d = 32), for the ``proj`` cases."""
    from orthoreg import HarmfulDirections

    g = torch.Generator().manual_seed(7)
    return HarmfulDirections({i: torch.randn(2, HIDDEN, generator=g) for i in range(3)})


def deepspeed_cpu_state() -> None:
    """Sets up accelerate's state for DeepSpeed on CPU ranks, before ``TrainingArguments`` is built.

    With transformers 5.24 / accelerate 1.15 neither plain route works on a CPU-only machine, and both fail silently:
    ``TrainingArguments(deepspeed=..., use_cpu=True)`` builds a plain multi-CPU state and trains under DDP (no
    DeepSpeed engine at all); with ``use_cpu=False`` the DeepSpeed engine is used but accelerate, finding no GPU
    backend, records ``num_processes=1`` — the data are not sharded (every rank trains on the same batch) and
    ``num_items_in_batch`` is not summed over ranks. Configuring ``PartialState(backend="gloo")`` with
    ``ACCELERATE_USE_DEEPSPEED=true`` first (and ``accelerator_config={"use_configured_state": True}``) gives a
    DeepSpeed state with the real world size. On GPUs none of this is needed.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    AcceleratorState._reset_state(reset_partial_state=False)  # a fresh DeepSpeed plugin for each Trainer
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state = PartialState(backend="gloo")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if state.distributed_type != DistributedType.DEEPSPEED or state.num_processes != world:
        raise RuntimeError(f"DeepSpeed state not set up: {state.distributed_type}, {state.num_processes} processes")


def training_args(out_dir: str, batch: int, ga: int, deepspeed: str | None):
    """One SGD step, update = −grad. ``use_cpu=True`` for DDP; with DeepSpeed see ``deepspeed_cpu_state``."""
    from transformers import TrainingArguments

    extra = {}
    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:  # transformers >= 5; 4.x samples randomly
        extra["train_sampling_strategy"] = "sequential"
    if deepspeed is not None:
        deepspeed_cpu_state()
        extra["accelerator_config"] = {"use_configured_state": True}
    return TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=ga, max_steps=1,
        learning_rate=LR, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0, use_cpu=deepspeed is None, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, deepspeed=deepspeed,
        average_tokens_across_devices=True, remove_unused_columns=False, **extra,
    )


def trainable_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def full_values(model, names) -> dict[str, torch.Tensor]:
    """Full (unsharded) values of the named parameters; gathers ZeRO-3 partitions."""
    params = dict(model.named_parameters())
    chosen = [params[n] for n in names]
    if any(hasattr(p, "ds_id") for p in chosen):
        import deepspeed

        with deepspeed.zero.GatheredParameters(chosen, modifier_rank=None):
            return {n: params[n].detach().clone().float() for n in names}
    return {n: params[n].detach().clone().float() for n in names}


def zero3_sharded(model) -> int:
    """How many parameters are held as ZeRO-3 partitions smaller than the full tensor."""
    return sum(
        1 for p in model.parameters()
        if hasattr(p, "ds_tensor") and p.ds_tensor is not None and p.ds_tensor.numel() < p.ds_numel
    )


def train_once(name: str, *, batch: int, ga: int, lora: bool, gather: bool | None, deepspeed: str | None,
               work: str, proj: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """One optimizer step; ``gather=None`` means no callback (the task-loss-only update); ``proj`` adds the
    base-mean projection penalty."""
    from transformers import Trainer, TrainerCallback

    from orthoreg import OrthoRegCallback

    model = build_model(lora=lora)
    names = sorted(trainable_params(model))
    before = {n: p.detach().clone().float() for n, p in model.named_parameters() if n in names}
    data = ListDataset(samples(GLOBAL_BATCH * ga))  # exactly one optimizer step
    seen = {"tokens": [], "hidden_shapes": [], "input_ids": [], "attention_mask": []}

    def record_batch(module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            seen["tokens"].append(int(kwargs["attention_mask"].sum()))
            seen["input_ids"].append(kwargs["input_ids"].tolist())
            seen["attention_mask"].append(kwargs["attention_mask"].tolist())

    def record_hidden(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if module.training and torch.is_grad_enabled():
            seen["hidden_shapes"].append(list(h.shape))

    lm = model.get_base_model() if lora else model
    hooks = [lm.register_forward_pre_hook(record_batch, with_kwargs=True),
             lm.model.layers[1].register_forward_hook(record_hidden)]
    sharding = {"zero3_sharded_params": 0}

    class Probe(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            sharding["zero3_sharded_params"] = zero3_sharded(model)

    callbacks = [Probe()]
    if gather is not None:
        callbacks.append(OrthoRegCallback(orthoreg_config(gather, proj),
                                          directions=projection_directions() if proj else None))
    trainer = Trainer(model=model, args=training_args(f"{work}/{name}", batch, ga, deepspeed),
                      train_dataset=data, callbacks=callbacks)
    trainer.train()
    for h in hooks:
        h.remove()
    after = full_values(trainer.model, names)
    logs = [e for e in trainer.state.log_history if any(k.startswith("orthoreg/") for k in e)]
    info = {
        "trainable": names,
        "tokens": seen["tokens"],
        "hidden_shapes": seen["hidden_shapes"],
        "batches": [{"input_ids": i, "attention_mask": a} for i, a in zip(seen["input_ids"], seen["attention_mask"],
                                                                        strict=True)],
        "orthoreg_logs": logs[-1] if logs else {},
        "train_loss": trainer.state.log_history[-1].get("train_loss"),
        "model_class": type(trainer.model_wrapped).__name__,
        **sharding,
    }
    tensors = {}
    for n in names:
        tensors[f"{name}/before/{n}"] = before[n]
        tensors[f"{name}/delta/{n}"] = after[n] - before[n]
    del trainer, model
    return info, tensors


def local_and_global_cov(batch: dict) -> dict[str, list[float]]:
    """Per-layer covariance penalty of this rank's batch at the initial weights: local and gathered (global)."""
    from orthoreg.terms.penalties import covariance_penalty

    model = build_model()
    model.eval()
    ids = torch.tensor(batch["input_ids"])
    mask = torch.tensor(batch["attention_mask"])
    hs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: hs.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    local = [float(covariance_penalty(h, mask.bool(), gather=False)) for h in hs]
    glob = [float(covariance_penalty(h, mask.bool(), gather=True)) for h in hs]
    return {"local": local, "global": glob}
