"""Side-by-side cost of the penalty kernels: this checkout's ``orthoreg/penalties.py`` against another revision's.

    python scripts/bench_penalties_vs_revision.py --rev c141d84

Both are loaded into one process (the old revision's self-contained ``penalties.py`` as a file, this checkout's
``orthoreg.terms.penalties`` as the package), and each case's forward+backward is
timed interleaved, old and new alternating, on process CPU time, so machine load hits both alike. Prints the median
per-call time of each, their ratio with its interquartile range, and the difference as a share of a training step
whose time you give (``--step-ms``, default: the overhead benchmark's small model, 1.55 s on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# (name, N, d, k, dtype): the overhead benchmark's small model (N = 696 ≥ d = 512), a prompt_end-sized batch at
# SmolLM2's width (N < d, the Gram path), and bf16 hidden states.
CASES = [("cov N>=d", 696, 512, 4, torch.float32), ("cov N<d", 64, 576, 4, torch.float32),
         ("cov bf16 N>=d", 696, 512, 4, torch.bfloat16), ("proj", 696, 512, 4, torch.float32)]


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call(module, case: str, h: torch.Tensor, u: torch.Tensor) -> None:
    h = h.detach().requires_grad_(True)
    value = module.projection_penalty(h, u) if case == "proj" else module.covariance_penalty(h)
    value.backward()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="c141d84", help="git revision to compare against")
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--step-ms", type=float, default=1550.0)
    parser.add_argument("--layers", type=int, default=4, help="guarded layers per step (cost counted per layer)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    old_source = subprocess.run(["git", "show", f"{args.rev}:orthoreg/penalties.py"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        old_path = Path(tmp) / "penalties_old.py"
        old_path.write_text(old_source)
        old = load(old_path, "penalties_old")
    sys.path.insert(0, str(REPO))
    import orthoreg.terms.penalties as new  # the checkout's package (its penalties import sibling modules)
    print(f"{'case':15s} {'old ms':>8s} {'new ms':>8s} {'ratio':>6s} {'IQR':>15s} {'Δ step %':>9s}")
    for case, n, d, k, dtype in CASES:
        g = torch.Generator().manual_seed(0)
        h = torch.randn(n, d, generator=g).to(dtype)
        u = torch.linalg.qr(torch.randn(d, k, generator=g))[0].T.contiguous()
        times = {"old": [], "new": []}
        for module in (old, new):
            call(module, case, h, u)  # warm-up
        for rep in range(args.reps):
            order = (("old", old), ("new", new)) if rep % 2 == 0 else (("new", new), ("old", old))
            for label, module in order:
                start = time.process_time()
                call(module, case, h, u)
                times[label].append(time.process_time() - start)
        ratios = sorted(b / a for a, b in zip(times["old"], times["new"], strict=True) if a > 0)
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [ratios[0], ratios[0], ratios[-1]]
        o, w = statistics.median(times["old"]) * 1e3, statistics.median(times["new"]) * 1e3
        share = (w - o) * args.layers / args.step_ms * 100
        print(f"{case:15s} {o:8.3f} {w:8.3f} {statistics.median(ratios):6.3f} [{q[0]:.3f}, {q[2]:.3f}] {share:+8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
