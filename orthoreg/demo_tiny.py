"""The interim demo: one tiny model, one fine-tune, with and without orthoreg (no efficacy claim is made here)."""

from __future__ import annotations

import copy
import time

import torch


def _tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def run_tiny_demo(steps: int = 60, seed: int = 0) -> dict:
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from orthoreg import OrthoRegCallback, OrthoRegConfig, extract_directions
    from orthoreg.prompts import load_builtin

    torch.manual_seed(seed)
    pairs = load_builtin("train")
    task = [f"question {i} : what is {i} plus {i + 1} ? answer : {2 * i + 1}" for i in range(64)]
    words = " ".join(pairs.harmful + pairs.harmless + task).replace("?", " ? ").split()
    tokenizer = _tokenizer(words)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)
    base = LlamaForCausalLM(config)
    directions = extract_directions(base, tokenizer, pairs.harmful, pairs.harmless, layers=[1, 2], k=1,
                                    progress=False)
    encoded = tokenizer(task, padding="max_length", max_length=16, truncation=True)
    dataset = Dataset.from_dict({**encoded, "labels": [
        [t if m else -100 for t, m in zip(ids, mask, strict=True)]
        for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)]})

    results = {}
    for arm, callbacks in (
        ("plain", []),
        ("orthoreg", [OrthoRegCallback(OrthoRegConfig(layers=[1, 2], cov_weight=0.1, proj_weight=1.0),
                                       directions=directions)]),
    ):
        model = copy.deepcopy(base)
        args = TrainingArguments(output_dir=f"/tmp/orthoreg-demo-{arm}", per_device_train_batch_size=8,
                                 max_steps=steps, learning_rate=3e-3, logging_steps=max(steps // 4, 1),
                                 use_cpu=True, report_to=[], save_strategy="no", seed=seed, disable_tqdm=True)
        start = time.perf_counter()
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        results[arm] = {"final_task_loss": logs[-1]["loss"], "log": logs,
                        "seconds": round(time.perf_counter() - start, 2)}

    print(f"\n{'arm':<10} {'task loss':>10} {'orthoreg/cov':>13} {'orthoreg/proj':>14} {'seconds':>8}")
    for arm, result in results.items():
        last = result["log"][-1]
        print(f"{arm:<10} {result['final_task_loss']:>10.4f} {last.get('orthoreg/cov', float('nan')):>13.4g} "
              f"{last.get('orthoreg/proj', float('nan')):>14.4g} {result['seconds']:>8.1f}")
    return results
