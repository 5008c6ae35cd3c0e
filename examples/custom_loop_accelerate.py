"""Fine-tune a causal LM with LoRA in a custom ``accelerate`` loop, regularised by ``OrthoLoRA``.

Launch commands::

    # one CPU process, a tiny config-built Llama (seconds, no downloads):
    python examples/custom_loop_accelerate.py --model tiny

    # two CPU processes (gloo DDP); NOT `accelerate launch --cpu`, which silently runs one process:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/custom_loop_accelerate.py \
        --model tiny --gather

    # GPUs, a real model, harmful directions extracted from it (`orthoreg directions extract ...`):
    accelerate launch --num_processes 8 --mixed_precision bf16 examples/custom_loop_accelerate.py \
        --model Qwen/Qwen2.5-0.5B-Instruct --directions harmful.safetensors --steps 500 --output-dir out/ortholora

    # DeepSpeed ZeRO-2/3 or FSDP: the same script with `accelerate launch --config_file <zero3.yaml | fsdp.yaml>`
    # (for ZeRO-3 set `zero3_save_16bit_model: true` in the config so the adapter can be gathered for saving).

What it shows: build the PEFT model, wrap it in ``OrthoLoRA`` *before* ``accelerator.prepare`` (so the weight-space
penalty's hooks sit ahead of DeepSpeed's), train with ``accelerator.accumulate``/``accelerator.backward`` on
``outputs.loss`` (the task loss plus every orthoreg penalty, scaled like it), log ``pop_metrics()`` averaged over
ranks, and save the adapter with its orthoreg config and directions (``OrthoLoRA.from_pretrained`` reloads them).

The tiny model trains on a synthetic sequence task with random harmful directions: it exercises the mechanics, not
safety. A real model uses a small built-in set of benign instruction/answer pairs (labels on the answers only).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from itertools import cycle

import torch
from torch.utils.data import DataLoader

BENIGN_PAIRS = [
    ("Give me a tip for staying focused while studying.", "Work in 25-minute blocks and put your phone in another room."),
    ("How do I boil an egg?", "Cover the egg with cold water, bring it to a boil, then simmer for 9 minutes."),
    ("What is a haiku?", "A three-line poem with five, seven and five syllables."),
    ("Suggest a name for a grey cat.", "Ash, Pebble or Smokey would all suit a grey cat."),
    ("How can I save water at home?", "Fix dripping taps, take shorter showers and run full dishwasher loads."),
    ("Explain photosynthesis in one sentence.", "Plants use light to turn water and carbon dioxide into sugar and oxygen."),
    ("What should I pack for a day hike?", "Water, snacks, a map, sunscreen, a rain layer and a charged phone."),
    ("How do I politely decline a meeting?", "Thank them, say you cannot attend, and offer an alternative time."),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' (config-built Llama) or a model name/path")
    p.add_argument("--directions", default=None, help="HarmfulDirections safetensors file (required for real models)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="per-device micro-batch size")
    p.add_argument("--grad-accum", type=int, default=2, help="gradient-accumulation steps")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--target-modules", default="all-linear", help="LoraConfig target_modules (comma list or all-linear)")
    p.add_argument("--rslora", action="store_true", help="rank-stabilised LoRA scaling α/√r")
    p.add_argument("--layers", default="middle_third", help="guarded layers (OrthoRegConfig.layers)")
    p.add_argument("--proj-weight", type=float, default=1.0, help="λ_proj")
    p.add_argument("--cov-weight", type=float, default=0.0, help="λ_cov")
    p.add_argument("--lora-weight", type=float, default=1.0, help="λ_lora, the weight-space penalty")
    p.add_argument("--anchor", default="base_mean", choices=["absolute", "base_mean", "paired"])
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--gather", action="store_true", help="covariance of the global batch across ranks")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"])
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--output-dir", default=None, help="save the adapter + orthoreg files here at the end")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ model and data
def build_model(args: argparse.Namespace):
    """(model, tokenizer or None). ``tiny`` needs no download; anything else goes through ``from_pretrained``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if args.model == "tiny":
        config = LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, vocab_size=64, pad_token_id=0)
        return LlamaForCausalLM(config), None
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    return model, tokenizer


def tiny_dataset(n: int = 256, seq: int = 16, vocab: int = 64, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Arithmetic progressions mod (vocab − 1), shifted past the pad id 0: learnable, so the loss visibly drops."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        start, step = torch.randint(0, vocab - 1, (2,), generator=gen).tolist()
        ids = (torch.arange(seq) * (step % 7 + 1) + start) % (vocab - 1) + 1
        items.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": ids.clone()})
    return items


def text_dataset(tokenizer, max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Prompt/answer pairs through the chat template (if any); labels only on the answer tokens."""
    items = []
    for prompt, answer in BENIGN_PAIRS:
        if getattr(tokenizer, "chat_template", None):
            prefix = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)
        else:
            prefix = f"Question: {prompt}\nAnswer: "
        prompt_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + answer_ids)[:max_length]
        labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
        items.append({"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long),
                      "labels": torch.tensor(labels)})
    return items


def collate(items: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pads to the longest item; padding has attention 0 and label −100."""
    length = max(len(it["input_ids"]) for it in items)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for it in items:
        pad = length - len(it["input_ids"])
        out["input_ids"].append(torch.cat([it["input_ids"], torch.full((pad,), pad_id)]))
        out["attention_mask"].append(torch.cat([it["attention_mask"], torch.zeros(pad, dtype=torch.long)]))
        out["labels"].append(torch.cat([it["labels"], torch.full((pad,), -100)]))
    return {k: torch.stack(v) for k, v in out.items()}


def load_directions(args: argparse.Namespace, model):
    from orthoreg import HarmfulDirections
    from orthoreg.core.capture import find_decoder_stack, resolve_layers

    if args.directions is not None:
        return HarmfulDirections.load(args.directions, model=model)
    if args.model != "tiny":
        raise SystemExit(
            "--directions is required for a real model: extract them first, e.g. `orthoreg directions extract "
            f"--model {args.model} --out harmful.safetensors`"
        )
    # Tiny model: random directions on the guarded layers (mechanics only, no safety meaning).
    stack = find_decoder_stack(model)
    gen = torch.Generator().manual_seed(args.seed + 1)
    layers = resolve_layers(args.layers, stack.num_layers)
    return HarmfulDirections({i: torch.randn(2, stack.hidden_size, generator=gen) for i in layers},
                             metadata={"source_model": "tiny-random", "num_layers": stack.num_layers})


# --------------------------------------------------------------------------------------------------------- loop
def main(argv: list[str] | None = None) -> dict[str, float]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model

    from orthoreg import OrthoRegConfig
    from orthoreg.lora.wrapper import OrthoLoRA

    args = parse_args(argv)
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum, mixed_precision=args.mixed_precision,
                              cpu=not torch.cuda.is_available())
    set_seed(args.seed)
    model, tokenizer = build_model(args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    peft_model = get_peft_model(
        model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=targets, use_rslora=args.rslora,
                          task_type="CAUSAL_LM")
    )
    directions = load_directions(args, peft_model)
    config = OrthoRegConfig(layers=args.layers, proj_weight=args.proj_weight, cov_weight=args.cov_weight,
                            lora_weight=args.lora_weight, anchor=args.anchor, gather=args.gather,
                            warmup_steps=args.warmup_steps)
    # Wrap BEFORE prepare: the weight penalty's hooks must run ahead of DeepSpeed's (see OrthoLoRA's docstring).
    ortho = OrthoLoRA(peft_model, config, directions, accelerator=accelerator)

    items = tiny_dataset(seed=args.seed) if tokenizer is None else text_dataset(tokenizer)
    pad_id = 0 if tokenizer is None else tokenizer.pad_token_id
    loader = DataLoader(items, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        collate_fn=lambda b: collate(b, pad_id))
    optimizer = torch.optim.AdamW([p for p in ortho.parameters() if p.requires_grad], lr=args.lr)
    ortho, optimizer, loader = accelerator.prepare(ortho, optimizer, loader)
    unwrapped = accelerator.unwrap_model(ortho)
    if accelerator.is_main_process:
        print(f"{accelerator.num_processes} process(es), {accelerator.distributed_type}; weight penalty on "
              f"{len(unwrapped.penalized_modules)} LoRA modules; guarded layers {unwrapped.guarded_layers}")

    ortho.train()
    step, task_sum, task_count, start, logged = 0, 0.0, 0, time.time(), {}
    batches = cycle(loader)
    while step < args.steps:
        batch = next(batches)
        with accelerator.accumulate(ortho):
            outputs = ortho(**batch)
            accelerator.backward(outputs.loss)  # task + penalties, divided by GA (and loss-scaled under fp16)
            task_sum += outputs.task_loss.detach().float().item()
            task_count += 1
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(ortho.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            metrics = {"task_loss": task_sum / max(task_count, 1), **unwrapped.pop_metrics()}
            names = sorted(metrics)
            values = accelerator.reduce(torch.tensor([metrics[n] for n in names], device=accelerator.device),
                                        reduction="mean")
            logged = dict(zip(names, values.tolist(), strict=True))
            task_sum, task_count = 0.0, 0
            if accelerator.is_main_process:
                shown = " ".join(f"{k}={v:.4g}" for k, v in logged.items() if math.isfinite(v))
                print(f"step {step}/{args.steps} ({time.time() - start:.1f}s) {shown}", flush=True)

    if args.output_dir is not None:
        # A full state dict (gathered under ZeRO-3/FSDP: a collective, so every rank calls it).
        state_dict = accelerator.get_state_dict(ortho)
        unwrapped.save_pretrained(args.output_dir, state_dict=state_dict, is_main_process=accelerator.is_main_process)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            print(f"saved adapter + {sorted(os.listdir(args.output_dir))} to {args.output_dir}")
    accelerator.end_training()
    return logged


if __name__ == "__main__":
    main()
