"""The anchor KL of ``OrthoRegCallback`` (and of ``OrthoLoRA`` in an accelerate loop) under DDP (two gloo CPU ranks): each rank adds λ∇AKL of its own anchors to
its ``.grad`` outside DDP's forward, and the task's synchronised backward averages the sum — so the update with the
term minus the update without it is −lr · mean over ranks of λ∇AKL(rank's anchors), at gradient accumulation 1 and
2 (where the first micro-batch runs under ``no_sync``).

The reference is float64 math written here, from the saved initial weights and tokenizer: greedy decoding of the
base (adapter off), its log-probabilities, each rank's anchors from the seeded cycle, and autograd of
λ·mean-over-positions Σ_v p (log p − log p_base). Tolerance 1e-4 of the largest entry: the runs are float32 and
differ from float64 by summation order and rounding (measured ≤ 2e-6); the two ranks' anchor gradients differ by
far more than that (checked), so averaging wrongly — or not at all — fails.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _launch import launch  # noqa: E402

pytestmark = pytest.mark.distributed


def _float64_anchor_grads(tokenizer, init, info, indices):
    """λ∇AKL (float64) of the anchors ``indices``, and AKL, on the saved initial PEFT model."""
    from peft import LoraConfig, get_peft_model

    from orthoreg.realbench.tiny import tiny_llama

    model = get_peft_model(tiny_llama(tokenizer), LoraConfig(**info["lora"]))
    model.load_state_dict({n[len("init/"):]: t for n, t in init.items()})
    model = model.double().train()
    sequences, base = {}, {}
    with model.disable_adapter(), torch.no_grad():
        for i in indices:
            text = tokenizer.apply_chat_template([{"role": "user", "content": info["anchors"][i]}],
                                                 add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            reply = []
            for _ in range(info["tokens"]):
                token = int(model(input_ids=torch.tensor([ids + reply])).logits[0, -1].argmax())
                reply.append(token)
                if token == tokenizer.eos_token_id:
                    break
            logits = model(input_ids=torch.tensor([ids + reply])).logits[0, len(ids) - 1:len(ids) + len(reply) - 1]
            sequences[i], base[i] = (ids, reply), torch.log_softmax(logits, -1)
    terms = []
    for i in indices:
        ids, reply = sequences[i]
        logits = model(input_ids=torch.tensor([ids + reply])).logits[0, len(ids) - 1:len(ids) + len(reply) - 1]
        log_p = torch.log_softmax(logits, -1)
        terms.append((log_p.exp() * (log_p - base[i])).sum(-1))
    kl = torch.cat(terms).mean()
    (info["weight"] * kl).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, float(kl.detach())


def test_under_ddp_the_update_carries_the_mean_of_the_ranks_anchor_gradients(tmp_path):
    from transformers import PreTrainedTokenizerFast

    result = launch("anchor_run.py", nproc=2, tmp_path=tmp_path, timeout=400)
    (info0, info1), (t0, t1) = result.json, result.tensors
    assert info0["world_size"] == info1["world_size"] == 2
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(next(tmp_path.glob("anchor_run-*/tokenizer"))))
    order = list(range(len(info0["anchors"])))
    random.Random("anchor-kl-0").shuffle(order)  # TrainingArguments.seed = 0 seeds the cycle
    batch = info0["batch"]
    want_indices = [order[:batch], order[batch:2 * batch]]  # step 0: rank r starts at r·batch
    init = {n: t for n, t in t0.items() if n.startswith("init/")}
    grads, kls = [], []
    for rank, info in enumerate((info0, info1)):
        assert info["anchor_ga1/indices"] == info["anchor_ga2/indices"] == want_indices[rank]
        g, kl = _float64_anchor_grads(tokenizer, init, info0, want_indices[rank])
        grads.append(g)
        kls.append(kl)
    names = sorted(grads[0])
    spread = max(float((grads[0][n] - grads[1][n]).abs().max()) for n in names)
    size = max(float(grads[0][n].abs().max()) for n in names)
    assert size > 1e-3 and spread > 0.1 * size  # the ranks' anchors pull differently: a wrong mean shows
    for ga in (1, 2):
        for n in names:
            added0 = t0[f"anchor_ga{ga}/{n}"].double() - t0[f"task_ga{ga}/{n}"].double()
            added1 = t1[f"anchor_ga{ga}/{n}"].double() - t1[f"task_ga{ga}/{n}"].double()
            want = -(grads[0][n] + grads[1][n]) / 2  # SGD, lr 1
            torch.testing.assert_close(added0, want, atol=1e-4 * size, rtol=0)
            torch.testing.assert_close(added1, added0, atol=1e-7, rtol=0)  # one update on both ranks
        logged = info0[f"anchor_ga{ga}/logged"]
        assert logged == info1[f"anchor_ga{ga}/logged"] and logged[0] == pytest.approx(sum(kls) / 2, rel=1e-4)
    # OrthoLoRA in an accelerate DDP loop: the anchor KL goes through the loss, DDP averages it with the task's
    assert info0["ortholora_anchor/wrapper"] == "DistributedDataParallel"
    for n in names:
        added0 = t0[f"ortholora_anchor/{n}"].double() - t0[f"ortholora_task/{n}"].double()
        added1 = t1[f"ortholora_anchor/{n}"].double() - t1[f"ortholora_task/{n}"].double()
        torch.testing.assert_close(added0, (grads[0][n] + grads[1][n]) / 2, atol=1e-4 * size, rtol=0)
        torch.testing.assert_close(added1, added0, atol=1e-7, rtol=0)
    assert info0["ortholora_anchor/logged"] == pytest.approx(kls[0], rel=1e-4)  # each rank logs its own anchors
    assert info1["ortholora_anchor/logged"] == pytest.approx(kls[1], rel=1e-4)
