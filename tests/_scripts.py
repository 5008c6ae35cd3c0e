"""Loads a driver from ``scripts/`` (or ``examples/``) as a module, the way the tests call their ``main``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    """The module of ``REPO/relative`` (e.g. ``"scripts/bench_defences.py"``), executed once per call."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
