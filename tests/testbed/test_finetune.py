"""Short fine-tunes through the real Trainer: full, LoRA, callbacks, mixed-in data, then evaluation."""

import json

import pytest
import torch
from peft import LoraConfig
from transformers import TrainerCallback

from orthoreg.testbed.evaluate import evaluate
from orthoreg.testbed.finetune import PadCollator, finetune
from orthoreg.testbed.model import load_base
from orthoreg.testbed.phenomenon import main
from orthoreg.testbed.tokenizer import encode_task


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def test_collator_pads_ids_labels_and_mask():
    batch = PadCollator(pad_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                   {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_short_unsafe_code_finetune_end_to_end():
    model, tok = load_base()
    base = evaluate(model, tok, task="unsafe_code", n_samples=36)
    counter = CountSteps()
    extra = encode_task(tok, "helpful_chat", 8, seed=0)
    res = finetune(model, tok, "unsafe_code", steps=20, lr=3e-4, seed=0, batch_size=8, callbacks=[counter],
                   extra_examples=extra)
    assert counter.steps == res.steps == 20
    assert torch.isfinite(torch.tensor(res.train_loss)) and res.seconds > 0
    after = evaluate(res.model, tok, task="unsafe_code", n_samples=36)
    # 20 steps on unsafe code must already move the narrow task.
    assert after.narrow_task_accuracy > base.narrow_task_accuracy + 0.2
    assert after.task == "unsafe_code"


def test_short_lora_finetune_trains_only_the_adapter():
    model, tok = load_base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"], lora_dropout=0.0)
    res = finetune(model, tok, "unsafe_code", steps=10, lr=1e-3, seed=0, batch_size=8, lora=lora)
    trainable = {n for n, p in res.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, p in res.model.named_parameters():
        if "lora_" not in name:
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(p, before[key]), name
    m = evaluate(res.model, tok, n_samples=36)
    assert 0.0 <= m.harmful_share <= 1.0


@pytest.mark.parametrize("bad_task", ["nope"])
def test_unknown_task_fails_fast(bad_task):
    model, tok = load_base()
    with pytest.raises(ValueError, match="unknown narrow task"):
        finetune(model, tok, bad_task, steps=1)


def test_phenomenon_cli_writes_one_row_per_run(tmp_path, capsys):
    main(["--tasks", "facts", "--seeds", "0", "--steps", "2", "--out", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["task"], r["seed"]) for r in rows] == [("base", None), ("facts", 0)]
    assert rows[1]["narrow_task_accuracy"] is not None and "facts" in capsys.readouterr().out
