"""Two gloo ranks, one ``DriftMonitor`` each (``sync=True``), the same tiny model, different micro-batches.

Step 0 calibrates on each rank's calibration batch; step 1 observes two micro-batches per rank; at step 2 rank 0
observes one micro-batch and rank 1 none (it must still call ``update``). Each rank writes its calibration and its
readings to ``rank{r}.json``; the test compares them with one process that saw every rank's micro-batches.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/distributed, for _launch

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _launch import rank_out_dir, run_rank, write_rank_results  # noqa: E402


def main() -> None:
    out, _ = rank_out_dir()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from monitor_common import MICRO_BATCHES, batch, directions, model

    from orthoreg.firewall.monitor import DriftMonitor

    net = model().train()
    monitor = DriftMonitor(directions(), mask="labels").attach(net)
    readings = []
    for _step, per_rank in enumerate(MICRO_BATCHES):
        for seed in per_rank[rank]:
            net(**batch(seed))
        reading = monitor.update()
        readings.append(None if reading is None else {"drift": {str(k): v for k, v in reading.drift.items()},
                                                      "cov_change": {str(k): v for k, v in reading.cov_change.items()}})
    write_rank_results(out, rank, {
        "base_mean": {str(k): v for k, v in monitor.base_mean.items()},
        "base_std": {str(k): v for k, v in monitor.base_std.items()},
        "base_cov": {str(k): v for k, v in monitor.base_cov.items()},
        "calibration_tokens": monitor.calibration_tokens,
        "readings": readings,
    })


if __name__ == "__main__":
    run_rank(main)
