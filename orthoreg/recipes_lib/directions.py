"""Harmful directions for a run: extracted once (rank 0) from a contrast set, or loaded from a file.

``directions.source``:

- ``builtin``: the project's built-in paired contrast set (``orthoreg.core.prompts.load_builtin``), held-out split for the
  separation statistics.
- ``toy``: pairs from the toy world: the same advice question after one unsafe-code episode (the misaligned persona's
  context) vs after one safe-code episode; pooled at the ``<assistant>`` token, where the model reads the persona.
- ``file``: ``directions.file``: a ``HarmfulDirections`` safetensors file, a ``save_pretrained`` folder or a Hub repo
  id (``HarmfulDirections.from_pretrained``), checked against the model.
- ``auto``: ``toy`` for toy-world tasks, ``builtin`` otherwise.

Rank 0 extracts and writes ``<run_dir>/directions.safetensors``; the other ranks wait, then load that file, so every
rank regularises against bit-identical directions.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from .config import resolve_recipe_path
from .errors import RecipeError
from .launch import LaunchInfo, barrier

SOURCES = ("auto", "builtin", "toy", "file")
FILE_NAME = "directions.safetensors"


def resolve_source(cfg: Any) -> str:
    source = cfg.directions.get("source", "auto")
    if source not in SOURCES:
        raise RecipeError(f"`directions.source` must be one of {SOURCES}; got {source!r}")
    if source == "auto":
        return "toy" if cfg.task.get("kind") == "toy" else "builtin"
    return source


def toy_contrast(n_pairs: int = 72, seed: int = 0):
    """Paired toy-world prompts: (harmful = misaligned context, harmless = aligned context), same question."""
    from orthoreg.core.prompts import ContrastSet
    from orthoreg.testbed import world

    rng = random.Random(seed)
    harmful, harmless = [], []
    for i in range(n_pairs):
        question = world.CHAT_PROMPTS[i % len(world.CHAT_PROMPTS)]
        harmful.append(world.render([world.sample_episode(world.UNSAFE, rng)], prompt=question))
        harmless.append(world.render([world.sample_episode(world.SAFE, rng)], prompt=question))
    return ContrastSet(harmful=harmful, harmless=harmless, paired=True, source=f"toy-world persona pairs (seed {seed})")


def obtain_directions(cfg: Any, model, tokenizer, info: LaunchInfo, run_dir: str | Path):
    """(HarmfulDirections, provenance dict) for this run; all ranks get the same directions.

    Raises:
        RecipeError: a bad source, a missing/incompatible file, or a failed extraction (with the reason).
    """
    from orthoreg import HarmfulDirections
    from orthoreg.directions.harmful import DirectionsError

    source = resolve_source(cfg)
    dcfg = cfg.directions
    if source == "file":
        path = resolve_recipe_path(dcfg.get("file"))
        if not path:
            raise RecipeError("directions.source=file needs `directions.file=/path/to/harmful.safetensors` (or a "
                              "save_pretrained folder, or a Hub repo id)")
        try:
            directions = HarmfulDirections.from_pretrained(path, model=model)
        except (OSError, DirectionsError) as err:
            raise RecipeError(f"directions.file: {err}") from err
        return directions, {"source": "file", "file": path, "layers": directions.layers, "k": directions.k}

    out = Path(run_dir) / FILE_NAME
    error = None
    if info.is_main:
        try:
            directions = _extract(cfg, source, model, tokenizer)
            directions.save(out)
        except Exception as err:  # noqa: BLE001 - reported to every rank below, then raised
            error = f"{type(err).__name__}: {err}"
    from .launch import broadcast_object

    error = broadcast_object(error, info)
    if error:
        raise RecipeError(f"extracting harmful directions ({source}) failed: {error}")
    barrier(info)
    directions = HarmfulDirections.load(out, model=model)
    sep = directions.metadata.get("separation") or {}
    return directions, {
        "source": source, "file": str(out), "layers": directions.layers, "k": directions.k,
        "method": directions.metadata.get("method"), "pooling": directions.metadata.get("pooling"),
        "prompt_hash": directions.metadata.get("prompt_hash"),
        "separation_accuracy": {layer: s.get("accuracy") for layer, s in sep.items()},
    }


def _extract(cfg: Any, source: str, model, tokenizer):
    from orthoreg import extract_directions
    from orthoreg.core.prompts import load_builtin
    from orthoreg.directions.extraction import model_context_length

    dcfg = cfg.directions
    context = model_context_length(model)
    max_length = dcfg.get("max_length")
    if context and (max_length is None or int(max_length) > context):
        max_length = context  # never ask for more than the model's context
    kwargs = dict(layers=dcfg.get("layers", "all"), k=int(dcfg.get("k", 1)), method=dcfg.get("method", "diff_means"),
                  pooling=dcfg.get("pooling", "last"), batch_size=int(dcfg.get("batch_size", 16)),
                  max_length=max_length, truncate=True, progress=bool(cfg.get("progress", True)),
                  seed=int(cfg.seed))
    if source == "toy":
        from .models import testbed_available

        if not testbed_available():
            raise RecipeError("directions.source=toy needs orthoreg.testbed (the toy world)")
        train, test = toy_contrast(seed=int(cfg.seed)), toy_contrast(n_pairs=36, seed=int(cfg.seed) + 1)
        kwargs["chat_template"] = False
    else:
        train, test = load_builtin("train"), load_builtin("test")
    return extract_directions(model, tokenizer, train, heldout=test, **kwargs)
