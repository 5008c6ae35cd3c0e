"""Peak resident set (``--rss``): every arm runs in a fresh ``bench_overhead.py --_rss-child`` process, which reports
its ``VmHWM`` after the warm-up steps (reset through ``/proc/self/clear_refs``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import torch

from .arms import Context, make_arm
from .measure import train_step
from .models import ModelSpec, build_model, make_batch, make_directions

# The entry point the child processes run (scripts/bench_overhead.py, next to this package).
BENCH_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench_overhead.py")


def _read_status(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return -1


def rss_child(payload: str) -> None:
    """Runs one arm of one configuration in this (fresh) process and prints its peak RSS as JSON."""
    job = json.loads(payload)
    torch.set_num_threads(job["threads"])
    spec = ModelSpec(**job["spec"])
    model = build_model(spec, job["mode"], job["checkpointing"], "cpu", torch.float32, seed=job["seed"])
    batch = make_batch(spec, "cpu", seed=job["seed"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, foreach=False)
    ctx = Context(spec, job["mode"], job["checkpointing"], "cpu", model, batch,
                  {k: v for k, v in batch.items() if k != "labels"}, make_directions(spec, job["seed"]), optimizer,
                  seed=job["seed"])
    arm = make_arm(job["arm"], ctx)
    arm.setup()
    for _ in range(2):
        train_step(arm, ctx)
    rss_before = _read_status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    train_step(arm, ctx)
    print(json.dumps({"vmhwm_bytes": _read_status("VmHWM"), "rss_before_bytes": rss_before, "hwm_reset": reset}))


def run_rss(spec: ModelSpec, mode: str, checkpointing: bool, names: list[str], args) -> dict[str, dict[str, int]]:
    out = {}
    for name in names:
        job = dict(spec=asdict(spec), mode=mode, checkpointing=checkpointing, arm=name, seed=args.seed,
                   threads=args.threads)
        proc = subprocess.run([sys.executable, BENCH_SCRIPT, "--_rss-child", json.dumps(job)],
                              capture_output=True, text=True, check=True)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out
