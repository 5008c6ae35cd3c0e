"""The Hydra config tree under ``recipes/``: where it is, which options each group has, and checks on overrides.

Checks that need only the command line run before Hydra (and before any process group exists), so an unknown
``model=…`` fails in a second with the list of valid names instead of after model loading.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import RecipeError

# Groups a user selects with ``group=option`` (each is a folder of YAML files under recipes/).
GROUPS = ("model", "task", "reg", "eval", "finetune")
PRIMARY_CONFIG = "train"


def recipes_dir() -> Path:
    """The ``recipes/`` folder: ``$ORTHOREG_RECIPES`` if set, else the one next to the ``orthoreg`` package."""
    env = os.environ.get("ORTHOREG_RECIPES")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "recipes"
    if not (path / f"{PRIMARY_CONFIG}.yaml").is_file():
        raise RecipeError(
            f"no recipe tree at {path} (expected {PRIMARY_CONFIG}.yaml there); run from a source checkout of orthoreg "
            "or point ORTHOREG_RECIPES at its recipes/ folder"
        )
    return path


def group_options(group: str, root: Path | None = None) -> list[str]:
    """Sorted option names of a config group (YAML file stems in ``recipes/<group>/``)."""
    folder = (root or recipes_dir()) / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def resolve_recipe_path(path: str | os.PathLike | None) -> str | None:
    """A path from a config: absolute, relative to the working directory, or relative to ``recipes/``."""
    if path is None or str(path) == "":
        return None
    path = Path(os.path.expanduser(str(path)))
    if path.is_absolute() or path.exists():
        return str(path)
    candidate = recipes_dir() / path
    return str(candidate) if candidate.exists() else str(path)


_GROUP_OVERRIDE = re.compile(r"^(?P<prefix>[+~]{0,2})(?P<group>[A-Za-z_]+)=(?P<value>.*)$")


def check_overrides(overrides: Sequence[str], root: Path | None = None) -> None:
    """Refuses unknown group options and sweeps before Hydra runs.

    Raises:
        RecipeError: ``model=foo`` (etc.) names no file in ``recipes/model/``; the message lists the valid ones. A
            comma in a group value (a sweep) is refused too: sweeps loop over launches (see recipes/README.md).
    """
    root = root or recipes_dir()
    for item in overrides:
        match = _GROUP_OVERRIDE.match(item)
        if not match or match["group"] not in GROUPS or match["prefix"].startswith("~"):
            continue
        group, value = match["group"], match["value"]
        if "," in value or value.startswith(("choice(", "range(", "glob(")):
            raise RecipeError(
                f"`{item}` is a sweep; one launch runs one recipe. Loop over launches instead, e.g. "
                f"`for {group} in {value.replace(',', ' ')}; do accelerate launch ... {group}=${group}; done`"
            )
        options = group_options(group, root)
        if value not in options:
            raise RecipeError(f"unknown {group} {value!r}; valid {group} names: {', '.join(options)}")


def require(cfg: Any, dotted: str, what: str = "") -> Any:
    """``cfg.<dotted>``, or a RecipeError naming the missing key."""
    node = cfg
    for part in dotted.split("."):
        node = node.get(part) if hasattr(node, "get") else None
        if node is None:
            raise RecipeError(f"`{dotted}` is not set{': ' + what if what else ''}")
    return node


def to_container(cfg: Any) -> Any:
    """A resolved plain-Python copy of an OmegaConf node or a schema dataclass (dicts and lists), or the value itself.

    The recipe pipeline reads typed objects (``schema.load_recipe``); this is for values that may still come as
    ``DictConfig`` from code composing the tree itself."""
    import dataclasses

    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    return cfg
