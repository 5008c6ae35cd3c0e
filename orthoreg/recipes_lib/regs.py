"""The regulariser of a run (``reg`` group) as Trainer callbacks: none, orthoreg presets, or a baseline.

``reg.kind``:

- ``none``: plain fine-tuning.
- ``orthoreg``: ``OrthoRegCallback(reg.orthoreg, directions)`` — ``reg.orthoreg`` is an ``OrthoRegConfig``, built and
  checked once when the recipe is loaded (``schema.load_recipe``).
- ``baseline``: a callback class named ``"module:Class"`` in ``reg.callback`` (the KL / LDIFS / CAFT baselines of
  ``orthoreg.baselines``), imported only when selected. ``reg.config_class`` (optional) is built from ``reg.params``
  and passed first; otherwise ``reg.params`` are the callback's keyword arguments. With ``reg.needs_directions`` the
  harmful directions are passed as ``directions=``; ``reg.reference_model: auto`` passes a frozen copy of the base
  model as ``reference_model=`` for full fine-tuning (LoRA uses the same model with its adapter off).
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import RecipeError

KINDS = ("none", "orthoreg", "baseline")


def _orthoreg_config(reg_cfg: Any):
    """``reg.orthoreg`` of a loaded recipe (an ``OrthoRegConfig``, already validated by ``schema.load_recipe``)."""
    from orthoreg import OrthoRegConfig

    config = reg_cfg.orthoreg
    if not isinstance(config, OrthoRegConfig):
        raise RecipeError(f"reg={reg_cfg.name}: `reg.orthoreg` is a {type(config).__name__}, not an OrthoRegConfig; "
                          "pass the recipe through orthoreg.recipes_lib.schema.load_recipe first")
    return config


def needs_directions(reg_cfg: Any) -> bool:
    if reg_cfg.kind == "orthoreg":
        return _orthoreg_config(reg_cfg).needs_directions
    return reg_cfg.kind == "baseline" and reg_cfg.needs_directions


def _import(spec: str, what: str, reg_name: str):
    module_name, _, attr = str(spec).partition(":")
    if not attr:
        raise RecipeError(f"reg={reg_name}: `{what}` must look like 'package.module:ClassName'; got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise RecipeError(
            f"reg={reg_name} needs {module_name} ({err}), which is not in this installation; pick another reg "
            "(none, orthoreg*, …) or install the module"
        ) from err
    if not hasattr(module, attr):
        raise RecipeError(f"reg={reg_name}: {module_name} has no {attr!r} (it has "
                          f"{sorted(n for n in dir(module) if not n.startswith('_'))})")
    return getattr(module, attr)


def preflight(reg_cfg: Any) -> None:
    """Checks what can be checked without a model: the kind, the OrthoRegConfig, baseline imports."""
    kind = reg_cfg.kind
    if kind not in KINDS:
        raise RecipeError(f"reg={reg_cfg.name}: `reg.kind` must be one of {KINDS}; got {kind!r}")
    if kind == "orthoreg":
        _orthoreg_config(reg_cfg)
    elif kind == "baseline":
        _import(reg_cfg.callback, "reg.callback", reg_cfg.name)
        if reg_cfg.config_class:
            _import(reg_cfg.config_class, "reg.config_class", reg_cfg.name)


def validate(reg_cfg: Any, num_layers: int, finetune_method: str, directions_layers: list[int] | None = None,
             import_baselines: bool = True) -> dict[str, Any]:
    """Checks a reg config against the model without building anything heavy; returns a summary.

    Raises:
        RecipeError: unknown kind, invalid OrthoRegConfig, layers outside the model, directions missing for a guarded
            layer, ``anchor='paired'`` without LoRA, or a baseline that cannot be imported.
    """
    kind, name = reg_cfg.kind, reg_cfg.name
    if kind not in KINDS:
        raise RecipeError(f"reg={name}: `reg.kind` must be one of {KINDS}; got {kind!r}")
    if kind == "none":
        return {"kind": "none"}
    if kind == "orthoreg":
        from orthoreg.core.capture import resolve_layers

        config = _orthoreg_config(reg_cfg)
        try:
            layers = resolve_layers(config.layers, num_layers)
        except (ValueError, IndexError) as err:
            raise RecipeError(f"reg={name}: `reg.orthoreg.layers` {config.layers!r}: {err}") from err
        if config.anchor == "paired" and finetune_method != "lora":
            raise RecipeError(f"reg={name} uses anchor='paired' (the base model = the adapter switched off), which "
                              "needs finetune=lora")
        if config.lora_weight > 0:
            raise RecipeError(f"reg={name}: `lora_weight` > 0 needs OrthoLoRA in a custom loop; the Trainer callback "
                              "applies cov/proj only. Set reg.orthoreg.lora_weight=0")
        if directions_layers is not None and config.needs_directions:
            missing = sorted(set(layers) - set(directions_layers))
            if missing:
                raise RecipeError(f"reg={name} guards layers {missing} that have no harmful directions (directions "
                                  f"cover {directions_layers}); extract at those layers (directions.layers)")
        return {"kind": "orthoreg", "guarded_layers": layers, "config": config.to_dict()}
    summary = {"kind": "baseline", "callback": reg_cfg.callback}
    if import_baselines:
        _import(reg_cfg.callback, "reg.callback", name)
        if reg_cfg.config_class:
            _import(reg_cfg.config_class, "reg.config_class", name)
    return summary


def build_callbacks(reg_cfg: Any, directions=None, method: str = "lora", base_model=None) -> list:
    """The TrainerCallbacks that implement ``reg`` (empty for ``none``); ``base_model`` is copied when a baseline
    needs a frozen reference for full fine-tuning."""
    kind, name = reg_cfg.kind, reg_cfg.name
    if kind == "none":
        return []
    if kind == "orthoreg":
        from orthoreg import OrthoRegCallback

        config = _orthoreg_config(reg_cfg)
        return [OrthoRegCallback(config, directions=directions if config.needs_directions else None)]
    if kind == "baseline":
        cls = _import(reg_cfg.callback, "reg.callback", name)
        params = dict(reg_cfg.params)
        extra = {"directions": directions} if reg_cfg.needs_directions else {}
        if reg_cfg.reference_model == "auto" and method == "full":
            if base_model is None:
                raise RecipeError(f"reg={name} with finetune=full needs the base model as a frozen reference")
            import copy

            extra["reference_model"] = copy.deepcopy(base_model).eval().requires_grad_(False)
        try:
            if reg_cfg.config_class:
                config_cls = _import(reg_cfg.config_class, "reg.config_class", name)
                return [cls(config_cls(**params), **extra)]
            return [cls(**params, **extra)]
        except TypeError as err:
            raise RecipeError(f"reg={name}: cannot build {reg_cfg.callback} from reg.params {params}: {err}") from err
    raise RecipeError(f"reg={name}: `reg.kind` must be one of {KINDS}; got {kind!r}")
