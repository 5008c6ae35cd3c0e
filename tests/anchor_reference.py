"""Float64 references of the anchor KL, written from its docstring's definition (not the library's code): a PEFT
tiny model with a non-zero adapter, greedy decoding of its base, and λ∇AKL of one anchor batch by autograd."""

from __future__ import annotations

import copy
import random

import torch
from peft import LoraConfig, get_peft_model

from tests.models import tiny_model

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
ANCHORS = ["w10 w11 w12", "w20 w21", "w30 w31 w32 w33", "w40 w41 w42", "w50", "w60 w61 w62 w63 w64"]


def peft_pair(seed: int = 0):
    """(a PEFT model whose adapter is switched on and non-zero, a float64 copy of its base without adapter)."""
    base = tiny_model(seed=seed)
    base64 = copy.deepcopy(base).double().eval()
    model = get_peft_model(base, LoraConfig(**LORA))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model, base64


def hand_greedy(base64, ids: list[int], n: int, eos: int) -> list[int]:
    reply = []
    for _ in range(n):
        token = int(base64(input_ids=torch.tensor([ids + reply])).logits[0, -1].argmax())
        reply.append(token)
        if token == eos:
            break
    return reply


def float64_anchor_grads(model, tok, weight: float, num_tokens: int, batch_size: int, seed: int):
    """λ·∇AKL of the first anchor batch on a float64 copy, derived here from the docstring's definition."""
    model64 = copy.deepcopy(model).double()
    with model64.disable_adapter(), torch.no_grad():
        replies, base = [], []
        for prompt in ANCHORS:
            ids = tok(prompt + " ", add_special_tokens=False)["input_ids"]
            reply = hand_greedy(model64, ids, num_tokens, tok.eos_token_id)
            logits = model64(input_ids=torch.tensor([ids + reply])).logits[0]
            replies.append((ids, reply))
            base.append(torch.log_softmax(logits[len(ids) - 1:len(ids) + len(reply) - 1], -1))
    order = list(range(len(ANCHORS)))
    random.Random(f"anchor-kl-{seed}").shuffle(order)
    terms = []
    for i in order[:batch_size]:
        ids, reply = replies[i]
        logits = model64(input_ids=torch.tensor([ids + reply])).logits[0, len(ids) - 1:len(ids) + len(reply) - 1]
        log_p = torch.log_softmax(logits, -1)
        terms.append((log_p.exp() * (log_p - base[i])).sum(-1))
    (weight * torch.cat(terms).mean()).backward()
    return {n: p.grad.float() for n, p in model64.named_parameters() if p.grad is not None}
