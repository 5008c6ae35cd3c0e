"""One launch of the OrthoRegCallback distributed checks: ``--backend single|ddp|zero2|zero3 --cases a,b,...``.

``single`` runs in one process with per-device batch 4 (the concatenated batch) and also computes an explicit
float64 reference update by hand (no Trainer, no callback: CE as a global token mean plus ``cov_weight/GA ·
Σ_layers cov`` with its own covariance code). The other backends run on 2 ranks with per-device batch 2 under DDP
or a DeepSpeed ZeRO config. Every case records the one-step SGD update of each trainable parameter (see
``callback_common``); results go to ``rank{r}.json``/``rank{r}.safetensors`` and the rank ends with ``os._exit``.

Cases: ``full_ga1_gather``, ``full_ga1_local`` (gather=False), ``full_ga1_task`` (no callback),
``full_ga2_gather``, ``lora_ga1_gather``, ``lora_ga1_task``, ``full_ga1_proj`` / ``full_ga2_proj`` (gather=True
plus the base-mean projection: r recorded over every rank's tokens, the projection a global token mean).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from callback_common import (
    COV_WEIGHT,
    GLOBAL_BATCH,
    LENGTHS,
    LR,
    build_model,
    local_and_global_cov,
    rank_out_dir,
    run_rank,
    skip_deepspeed_shm_comm_build,
    train_once,
    write_rank_results,
)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def parse_case(case: str) -> dict:
    kind, ga, mode = case.split("_")
    return {
        "lora": kind == "lora",
        "ga": int(ga.removeprefix("ga")),
        "gather": {"gather": True, "local": False, "task": None, "proj": True}[mode],
        "proj": mode == "proj",
    }


def explicit_reference(batches: list[dict], lora: bool, with_reg: bool) -> dict[str, torch.Tensor]:
    """−LR · ∂/∂θ [ Σ_k CE_sum(mb_k) / N_total + (cov_weight/GA) Σ_k Σ_ℓ cov(h_ℓ(mb_k)) ] in float64.

    ``batches`` are the micro-batches the Trainer actually fed (recorded by a hook: with transformers 4.x the
    sampler is random), as input_ids/attention_mask; labels are rebuilt as in ``callback_common.samples``.
    """
    model = build_model(lora=lora).double()
    model.train()
    lm = model.get_base_model() if lora else model
    ga = len(batches)
    micro = []
    for b in batches:
        ids, attn = torch.tensor(b["input_ids"]), torch.tensor(b["attention_mask"])
        labels = torch.where(attn.bool(), ids, torch.full_like(ids, -100))
        labels[:, 0] = -100
        micro.append((ids, attn, labels))
    n_total = sum(int((labels[:, 1:] != -100).sum()) for _, _, labels in micro)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = 0.0
    for ids, attn, labels in micro:
        hs: list[torch.Tensor] = []
        hooks = [layer.register_forward_hook(lambda m, a, o, hs=hs: hs.append(o[0] if isinstance(o, tuple) else o))
                 for layer in lm.model.layers]
        logits = model(input_ids=ids, attention_mask=attn).logits
        for h in hooks:
            h.remove()
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
            reduction="sum")
        total = total + ce / n_total
        if with_reg:
            for h in hs:
                x = h[attn.bool()]
                xc = x - x.mean(0, keepdim=True)
                c = xc.T @ xc / (x.shape[0] - 1)
                off = c - torch.diag(torch.diag(c))
                total = total + (COV_WEIGHT / ga) * off.square().sum() / x.shape[1]
    grads = torch.autograd.grad(total, list(params.values()))
    return {n: (-LR * g).float() for n, g in zip(params, grads, strict=True)}


def main() -> None:
    out, argv = rank_out_dir()
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["single", "ddp", "zero2", "zero3"], required=True)
    parser.add_argument("--cases", required=True)
    opts = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    torch.set_num_threads(1)
    deepspeed = os.path.join(CONFIG_DIR, f"{opts.backend}.json") if opts.backend.startswith("zero") else None
    if deepspeed is not None:
        skip_deepspeed_shm_comm_build()
    batch = GLOBAL_BATCH if opts.backend == "single" else GLOBAL_BATCH // 2
    results: dict = {"backend": opts.backend, "cases": {}, "seconds": {}, "lengths": LENGTHS}
    tensors: dict[str, torch.Tensor] = {}
    work = tempfile.mkdtemp(prefix="orthoreg-trainer-")
    for case in opts.cases.split(","):
        spec = parse_case(case)
        start = time.monotonic()
        info, case_tensors = train_once(case, batch=batch, ga=spec["ga"], lora=spec["lora"], gather=spec["gather"],
                                        deepspeed=deepspeed, work=work, proj=spec["proj"])
        results["seconds"][case] = time.monotonic() - start
        tensors.update(case_tensors)
        if opts.backend == "ddp" and spec["gather"] is not None and not spec["lora"] and spec["ga"] == 1:
            info["cov_at_init"] = local_and_global_cov(info["batches"][0])
        if opts.backend == "single" and not spec["proj"]:  # the proj cases compare runs with one another only
            ref = explicit_reference(info["batches"], spec["lora"], with_reg=spec["gather"] is not None)
            tensors.update({f"{case}/explicit/{n}": g for n, g in ref.items()})
        results["cases"][case] = info
    import torch.distributed as dist

    results["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
    write_rank_results(out, rank, results, tensors)


if __name__ == "__main__":
    run_rank(main)
