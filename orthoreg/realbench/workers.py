"""The scaffold the task-benchmark drivers share: settings, resumable rows, worker processes, the README section.

``scripts/bench_smollm2_tasks.py`` (which tasks erode) and ``scripts/bench_defences.py`` (which defences hold) run
many independent fine-tunes of the same aligned base on a CPU, and both need the same plumbing around them:

- ``driver_settings``: the fine-tune config (``TaskBenchConfig``, or ``--quick``'s tiny one with a 2-step safety
  tune in a temporary cache dir), ``--steps`` applied, the run dir created, one intra-op thread;
- ``RowsFile``: ``<run-dir>/rows.jsonl``, one JSON row per finished fine-tune, appended the moment it finishes, so an
  interrupted run loses only the fine-tunes in flight and a rerun skips what is there;
- ``run_in_workers``: the fine-tunes one after the other in this process (``--workers 0``: tests, debugging) or in
  ``--workers`` spawned processes with one thread each (two fine-tunes on two cores beat one with two threads);
- ``write_generated_section``: the part of a README between the ``auto`` markers that a driver regenerates.

What to run, what a row holds and how rows are summarised stay in each driver.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import json
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .aligned import DEFAULT_CACHE
from .task_runs import TaskBenchConfig


def log(msg: str) -> None:
    """A timestamped progress line, flushed at once (the drivers run for hours; their output is tailed)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def init_worker() -> None:
    """Initializer of every worker process: one intra-op thread (the workers share the cores), quiet tokenizers
    and warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)


def add_worker_arguments(ap: argparse.ArgumentParser) -> None:
    """The command-line flags ``driver_settings`` and ``run_in_workers`` read: ``--workers``, ``--cache-dir``,
    ``--quick``."""
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE)
    ap.add_argument("--quick", action="store_true", help="tiny config-built model, a few steps (tests)")


def quick_configs(**overrides: Any) -> tuple[TaskBenchConfig, Any]:
    """``--quick``'s (fine-tune config, safety-tune recipe): 2 steps of 2 examples, 4-token generations and
    200-token examples (the tiny tokenizer splits words finely), a 2-step safety tune; ``overrides`` replace
    further ``TaskBenchConfig`` fields."""
    from .aligned_v2 import AlignV2Config

    config = TaskBenchConfig(steps=2, batch_size=2, safety_tokens=4, task_tokens=4, max_length=200, **overrides)
    return config, AlignV2Config(steps=2, harmless_answer_tokens=4)


def driver_settings(args: argparse.Namespace, **quick_overrides: Any) -> tuple[TaskBenchConfig, Any, Path]:
    """(config, safety-tune recipe or None for the default, run dir) of a driver's command line.

    ``--quick``: ``quick_configs(**quick_overrides)``, and a fresh temporary cache dir unless ``--cache-dir`` names
    one (``args.cache_dir`` is rewritten). ``--steps`` replaces the config's steps. The run dir (``--run-dir``, by
    default ``<out>.runs``) is created. This process keeps one intra-op thread, like the workers."""
    config, align = TaskBenchConfig(), None
    if args.quick:
        config, align = quick_configs(**quick_overrides)
        if args.cache_dir == DEFAULT_CACHE:
            args.cache_dir = tempfile.mkdtemp(prefix="orthoreg-quick-")
    if args.steps:
        config = dataclasses.replace(config, steps=args.steps)
    run_dir = Path(args.run_dir or Path(args.out).with_suffix(".runs"))
    run_dir.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(1)
    return config, align, run_dir


class RowsFile:
    """A run dir's ``rows.jsonl``: the rows already there (when resuming) in ``rows``, and ``append`` to add one.

    Each row is written as one line the moment its fine-tune finishes, so a crash or an interrupt loses only the
    fine-tunes still running."""

    def __init__(self, path: str | os.PathLike, resume: bool = True):
        self.path = Path(path)
        resumed = resume and self.path.is_file()
        self.rows: list[dict[str, Any]] = ([json.loads(line) for line in self.path.read_text().splitlines()]
                                           if resumed else [])

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def run_in_workers(job: Callable[..., dict[str, Any]], arguments: Iterable[tuple], workers: int,
             on_row: Callable[[dict[str, Any]], None]) -> None:
    """``job(*a)`` for every ``a`` in ``arguments``, each row handed to ``on_row`` as soon as it exists.

    ``workers <= 0``: in this process, in order. Otherwise in ``workers`` spawned processes (``init_worker``), the
    rows in the order they finish; ``job`` must then be picklable (a module-level function or a
    ``functools.partial`` of one) and so must the arguments."""
    if workers <= 0:
        for a in arguments:
            on_row(job(*a))
        return
    ctx = mp.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker) as pool:
        for fut in futures.as_completed([pool.submit(job, *a) for a in arguments]):
            on_row(fut.result())


def write_generated_section(readme: Path, section: str, *, writer: str) -> None:
    """Replaces the part of ``readme`` between ``<!-- auto:begin`` and ``<!-- auto:end -->`` with ``section``
    (the begin marker names ``writer``, the script that rewrites it); a missing README gets just the markers."""
    text = readme.read_text() if readme.is_file() else "<!-- auto:begin -->\n<!-- auto:end -->\n"
    head, rest = text.split("<!-- auto:begin", 1)
    _, tail = rest.split("<!-- auto:end -->", 1)
    readme.write_text(f"{head}<!-- auto:begin ({writer} rewrites this part) -->\n{section}\n<!-- auto:end -->{tail}")
