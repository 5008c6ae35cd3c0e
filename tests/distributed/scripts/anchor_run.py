"""Rank script of ``tests/distributed/test_anchor_distributed.py``: the anchor KL of ``OrthoRegCallback`` under DDP
(2 gloo CPU ranks) — one SGD step (lr 1, update = −grad) of a LoRA tiny chat Llama whose adapter starts non-zero,
each rank on its own half of the data, with the anchor KL on and off, at gradient accumulation 1 and 2.

Launch (what the test runs through ``tests.distributed._launch.launch``)::

    torchrun --nproc_per_node 2 tests/distributed/scripts/anchor_run.py --out DIR

Then ``OrthoLoRA`` in an accelerate DDP loop (``ortholora_anchor`` / ``ortholora_task``): one forward and
``accelerator.backward`` of each rank's half-batch, the anchor KL through the loss; records the reduced LoRA
gradients.

Writes the initial PEFT state (``init/<name>``), each case's LoRA update or gradient (``<case>/<name>``), the
tokenizer (``tokenizer/``, rank 0) and, per rank, the anchor indices it used at step 0 and its logged values.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

warnings.simplefilter("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/distributed, for _launch

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _launch import rank_out_dir, run_rank, write_rank_results  # noqa: E402
from callback_common import ListDataset, training_args  # noqa: E402

from orthoreg import OrthoRegCallback, OrthoRegConfig  # noqa: E402
from orthoreg.realbench.tiny import bpe_tokenizer, tiny_llama  # noqa: E402

ANCHORS = ["How do I boil an egg?", "Name a color.", "What is two plus two?", "Say hello.",
           "Describe a cat.", "Why is the sky blue?", "List three fruits.", "What day comes after Monday?"]
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
WEIGHT, TOKENS, BATCH = 2.0, 3, 2
CASES = {"anchor_ga1": (True, 1), "task_ga1": (False, 1), "anchor_ga2": (True, 2), "task_ga2": (False, 2)}


def chat_samples(tokenizer, n: int) -> list[dict[str, list[int]]]:
    rows = []
    for i in range(n):
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me about topic {i}."},
                                              {"role": "assistant", "content": f"Topic {i} is short."}],
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:28]
        ids += [tokenizer.pad_token_id] * (28 - len(ids))
        rows.append({"input_ids": ids, "attention_mask": [int(t != tokenizer.pad_token_id) for t in ids],
                     "labels": [t if t != tokenizer.pad_token_id else -100 for t in ids]})
    return rows


def lora_model(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(tokenizer), LoraConfig(**LORA))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # a non-zero adapter: at B = 0 the anchor KL and its gradient are 0
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.train()


def main() -> None:
    from transformers import Trainer

    out, _ = rank_out_dir()
    torch.set_num_threads(1)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = bpe_tokenizer()
    if rank == 0:
        tokenizer.save_pretrained(str(out / "tokenizer"))
    tensors = {f"init/{n}": p.detach().clone() for n, p in lora_model(tokenizer).state_dict().items()}
    info = {"world_size": dist.get_world_size(), "anchors": ANCHORS, "weight": WEIGHT, "tokens": TOKENS,
            "batch": BATCH, "lora": LORA}
    for case, (anchor, ga) in CASES.items():
        model = lora_model(tokenizer)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        config = OrthoRegConfig(proj_weight=0.0, anchor_kl_weight=WEIGHT, anchor_kl_tokens=TOKENS,
                                anchor_kl_batch_size=BATCH)
        callback = OrthoRegCallback(config, tokenizer=tokenizer, anchors=ANCHORS)  # the task-only cases leave it out
        args = training_args(tempfile.mkdtemp(prefix="orthoreg-anchor-"), batch=4 // ga, ga=ga, deepspeed=None)
        trainer = Trainer(model=model, args=args, train_dataset=ListDataset(chat_samples(tokenizer, 8)),
                          processing_class=tokenizer, callbacks=[callback] if anchor else [])
        trainer.train()
        for n, p in model.named_parameters():
            if n in before:
                tensors[f"{case}/{n}"] = (p.detach() - before[n]).clone()
        if anchor:
            info[f"{case}/indices"] = callback.anchor_kl.batch_for(0, rank, dist.get_world_size())
            info[f"{case}/logged"] = [row["orthoreg/anchor_kl"] for row in trainer.state.log_history
                                      if "orthoreg/anchor_kl" in row]
            info[f"{case}/order"] = callback.anchor_kl.order
    run_ortholora(tokenizer, tensors, info)
    write_rank_results(out, rank, info, tensors)
    dist.barrier()
    dist.destroy_process_group()


def run_ortholora(tokenizer, tensors: dict, info: dict) -> None:
    from accelerate import Accelerator

    from orthoreg import OrthoLoRA

    rows = chat_samples(tokenizer, 8)
    for case, anchor in (("ortholora_anchor", True), ("ortholora_task", False)):
        accelerator = Accelerator(cpu=True)
        peft_model = lora_model(tokenizer)
        model = OrthoLoRA(peft_model, OrthoRegConfig(proj_weight=0.0, anchor_kl_weight=WEIGHT, anchor_kl_tokens=TOKENS,
                                                      anchor_kl_batch_size=BATCH, anchor_kl_prompts=anchors_file()),
                          tokenizer=tokenizer, accelerator=accelerator) if anchor else peft_model
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        model, optimizer = accelerator.prepare(model, optimizer)
        model.train()
        half = rows[4 * accelerator.process_index:4 * accelerator.process_index + 4]
        batch = {k: torch.tensor([r[k] for r in half]) for k in half[0]}
        accelerator.backward(model(**batch).loss)
        info[f"{case}/wrapper"] = type(model).__name__
        tensors.update({f"{case}/{n}": p.grad.detach().clone() for n, p in peft_model.named_parameters()
                        if p.grad is not None})
        if anchor:
            info[f"{case}/logged"] = accelerator.unwrap_model(model).pop_metrics()["orthoreg/anchor_kl"]


def anchors_file() -> str:
    import json

    path = Path(tempfile.mkdtemp(prefix="orthoreg-anchors-")) / "anchors.json"
    path.write_text(json.dumps(ANCHORS))
    return str(path)


if __name__ == "__main__":
    run_rank(main)
