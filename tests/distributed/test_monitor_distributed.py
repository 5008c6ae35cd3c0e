"""DriftMonitor across two gloo ranks: one all-reduce of the step's sums makes every rank's calibration and
readings those of one process that saw every rank's micro-batches — including a step where one rank saw none."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "scripts"))
from _launch import launch  # noqa: E402
from monitor_common import MICRO_BATCHES, batch, directions, model  # noqa: E402

from orthoreg.firewall.monitor import DriftMonitor  # noqa: E402

pytestmark = pytest.mark.distributed


def single_process_reference():
    net = model().train()
    monitor = DriftMonitor(directions(), mask="labels").attach(net)
    readings = []
    for per_rank in MICRO_BATCHES:
        for seeds in per_rank:
            for seed in seeds:
                net(**batch(seed))
        readings.append(monitor.update())
    return monitor, readings


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return launch("monitor_run.py", nproc=2, tmp_path=tmp_path_factory.mktemp("monitor"), timeout=240)


def test_ranks_agree_with_one_process_over_all_micro_batches(two_ranks):
    monitor, readings = single_process_reference()
    for rank, got in enumerate(two_ranks.json):
        assert got["calibration_tokens"] == monitor.calibration_tokens, rank
        for layer in monitor.layers:
            key = str(layer)
            assert got["base_mean"][key] == pytest.approx(monitor.base_mean[layer], rel=1e-5, abs=1e-6)
            assert got["base_std"][key] == pytest.approx(monitor.base_std[layer], rel=1e-5)
            assert got["base_cov"][key] == pytest.approx(monitor.base_cov[layer], rel=1e-5)
        assert got["readings"][0] is None  # the calibration step
        for step in (1, 2):
            want = readings[step]
            for layer in monitor.layers:
                key = str(layer)
                assert got["readings"][step]["drift"][key] == pytest.approx(want.drift[layer], rel=1e-4, abs=1e-5)
                assert got["readings"][step]["cov_change"][key] == pytest.approx(want.cov_change[layer], rel=1e-4,
                                                                                  abs=1e-6)


def test_the_all_reduce_changes_the_numbers(two_ranks):
    # Rank 0's own micro-batches alone give a different calibration: the agreement above is not a coincidence.
    net = model().train()
    alone = DriftMonitor(directions(), mask="labels").attach(net)
    for seed in MICRO_BATCHES[0][0]:
        net(**batch(seed))
    alone.update()
    layer = alone.layers[0]
    assert alone.calibration_tokens < two_ranks.json[0]["calibration_tokens"]
    assert alone.base_mean[layer] != pytest.approx(two_ranks.json[0]["base_mean"][str(layer)], rel=1e-3)
