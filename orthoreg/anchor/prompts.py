"""The anchor KL's anchor requests: orthoreg's built-in sets by name, or a JSON file of requests."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

__all__ = ["BUILTIN_ANCHORS", "AnchorKLError", "anchor_prompts", "builtin_anchors", "check_prompts"]

BUILTIN_ANCHORS = ("harmless", "harmful")


class AnchorKLError(ValueError):
    """The anchor KL cannot run: bad settings, no anchors, no chat template, or a backend it cannot serve."""


def builtin_anchors(name: str) -> list[str]:
    """orthoreg's built-in requests of the ``train`` split (disjoint from the harm probe's ``test`` split):
    ``"harmless"`` (200 harmless requests: no harm data) or ``"harmful"`` (their 200 harmful partners)."""
    if name not in BUILTIN_ANCHORS:
        raise AnchorKLError(f"`prompts` is the string {name[:60]!r}: pass a list of anchor requests, a JSON file of "
                            f"them, or one of {BUILTIN_ANCHORS} for orthoreg's built-in ones")
    from ..core.prompts import load_builtin

    builtin = load_builtin("train")
    return list(builtin.harmless if name == "harmless" else builtin.harmful)


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """``prompts`` as a list, refused by name when empty or holding an empty or non-text entry."""
    if isinstance(prompts, str):  # iterating it would anchor single characters
        raise AnchorKLError(f"`prompts` is the string {prompts[:60]!r}: pass a list of anchor requests, or one of "
                            f"{BUILTIN_ANCHORS} for orthoreg's built-in ones")
    prompts = list(prompts)
    if not prompts:
        raise AnchorKLError("no anchor prompts: pass a non-empty list, or one of "
                            f"{BUILTIN_ANCHORS} for orthoreg's built-in ones")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise AnchorKLError(f"anchor prompt #{bad[0]} is empty or not a string; give every anchor some text")
    return prompts


def anchor_prompts(spec: str | Sequence[str]) -> list[str]:
    """The anchor requests ``spec`` names: a list of requests, ``"harmless"`` / ``"harmful"`` (``builtin_anchors``),
    or the path of a ``.json`` file holding a list of requests (JSON only: no pickle is ever read)."""
    if not isinstance(spec, str):
        return check_prompts(spec)
    if spec in BUILTIN_ANCHORS:
        return builtin_anchors(spec)
    if not spec.endswith(".json"):
        builtin_anchors(spec)  # raises, naming the accepted forms
    if not os.path.isfile(spec):
        raise AnchorKLError(f"anchor prompts file {spec!r} does not exist: give the path of a .json list of "
                            f"requests, or one of {BUILTIN_ANCHORS}")
    try:
        with open(spec, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnchorKLError(f"anchor prompts file {spec!r} is not valid JSON ({err}); write a list of strings") from err
    if not isinstance(data, list):
        raise AnchorKLError(f"anchor prompts file {spec!r} holds a {type(data).__name__}, not a list of requests")
    return check_prompts(data)
