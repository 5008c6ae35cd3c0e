"""A dry run: compose and validate a recipe and build everything but the weights.

The model is built from its config on the ``meta`` device (shapes, no storage) — from ``model.config_json`` shipped
in ``recipes/model/configs/`` (written from the published architecture numbers, since the real configs cannot be
downloaded here) or from ``model.local_path`` — and checked against the published parameter count and shape. Then
LoRA is applied (on meta too), the regulariser is validated against the model's depth, the task and eval settings are
checked without downloading anything (a judge endpoint must be configured but is not contacted), and the
``SFTConfig`` is built. The plan is returned (and written as ``dry_run.json`` by rank 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import resolve_recipe_path
from .errors import RecipeError
from .launch import LaunchInfo

PARAM_TOLERANCE = 0.005  # relative; the published counts are rounded to 3-4 significant digits


def _bytes(dtype_name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype_name, 4)


def check_published(model_cfg: Any, parameters: int, num_layers: int, hidden_size: int) -> dict[str, Any]:
    """Compares the skeleton with ``model.published`` (parameters, layers, hidden_size); raises on a mismatch."""
    published = model_cfg.published or {}
    out: dict[str, Any] = {}
    if "parameters" in published:
        want = float(published["parameters"])
        rel = abs(parameters - want) / want
        out["parameters_published"], out["parameters_rel_error"] = want, rel
        if rel > PARAM_TOLERANCE:
            raise RecipeError(
                f"model {model_cfg.get('name')!r}: the config builds {parameters:,} parameters but the published count "
                f"is {want:,.0f} ({100 * rel:.2f}% off); fix {model_cfg.get('config_json')}"
            )
    for key, value in (("num_hidden_layers", num_layers), ("hidden_size", hidden_size)):
        if key in published and int(published[key]) != value:
            raise RecipeError(f"model {model_cfg.get('name')!r}: {key} is {value}, published {published[key]}")
    return out


def dry_run(cfg: Any, info: LaunchInfo) -> dict[str, Any]:
    from orthoreg.core.capture import find_decoder_stack, resolve_layers

    from . import regs, training
    from .evaluation import build_evaluator
    from .models import build_skeleton
    from .schema import load_recipe

    cfg = load_recipe(cfg)  # a composed DictConfig (tests, notebooks) or an already loaded recipe
    model_cfg, ft = cfg.model, cfg.finetune

    model = build_skeleton(model_cfg)
    stack = find_decoder_stack(model)
    parameters = sum(p.numel() for p in model.parameters())
    plan: dict[str, Any] = {
        "model": {"name": model_cfg.name, "display_name": model_cfg.display_name,
                  "stand_in_for": model_cfg.stand_in_for, "model_type": stack.model_type,
                  "num_hidden_layers": stack.num_layers, "hidden_size": stack.hidden_size, "parameters": parameters,
                  "device": str(next(model.parameters()).device),
                  **check_published(model_cfg, parameters, stack.num_layers, stack.hidden_size)},
    }
    with torch.device("meta"):  # LoRA matrices get shapes but no storage either
        wrapped = training.prepare_model(model, ft, model_cfg)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    dtype_bytes = _bytes(model_cfg.dtype)
    # Per trainable parameter: gradient + AdamW's m and v, in fp32 for LoRA (PEFT keeps adapters in fp32) and in the
    # model's dtype for full fine-tuning (torch's AdamW keeps its states in the parameter dtype).
    state_bytes = 3 * (4 if ft.method == "lora" else dtype_bytes)
    plan["finetune"] = {
        "method": ft.method, "trainable_parameters": trainable,
        "memory_estimate_gib": {  # rough, one replica, activations not included
            "weights": parameters * dtype_bytes / 2**30,
            "grads_and_adam_states": trainable * state_bytes / 2**30,
        },
    }
    directions_layers = None
    dfile = resolve_recipe_path(cfg.directions.file) if cfg.directions.source == "file" else None
    if dfile:
        from orthoreg import HarmfulDirections

        directions = HarmfulDirections.load(dfile)
        directions.check_compatible(stack.hidden_size, stack.num_layers, stack.model_type)
        directions_layers = directions.layers
    else:
        directions_layers = resolve_layers(cfg.directions.layers, stack.num_layers)
    plan["directions"] = {"source": cfg.directions.source, "layers": directions_layers}
    plan["reg"] = regs.validate(cfg.reg, stack.num_layers, ft.method, directions_layers)
    plan["task"] = _check_task(cfg.task)
    evaluator = build_evaluator(cfg)  # a judge without an endpoint, a bad eval kind etc. fail here
    plan["eval"] = {"kind": evaluator.kind, "endpoint_contacted": False}
    args = training.sft_config(cfg, info, Path(cfg.output_dir or "."))
    plan["sft_config"] = {"bf16": args.bf16, "max_steps": args.max_steps, "learning_rate": args.learning_rate,
                          "per_device_train_batch_size": args.per_device_train_batch_size,
                          "gradient_accumulation_steps": args.gradient_accumulation_steps,
                          "gradient_checkpointing": ft.gradient_checkpointing, "save_steps": args.save_steps}
    plan["launch"] = {"world_size": info.world_size, "strategy": info.strategy, "use_cpu": info.use_cpu}
    return plan


def _check_task(task_cfg: Any) -> dict[str, Any]:
    kind = task_cfg.kind
    local = resolve_recipe_path(task_cfg.local_file)
    if local and not Path(local).is_file():
        raise RecipeError(f"`task.local_file` {local} does not exist")
    if kind == "hub" and not local:
        spec = task_cfg.dataset or {}
        if not spec.get("path"):
            raise RecipeError(f"task {task_cfg.name!r}: `task.dataset.path` is not set")
        fmt = task_cfg.format or {}
        if not fmt.get("prompt") or not fmt.get("completion"):
            raise RecipeError(f"task {task_cfg.name!r}: `task.format.prompt` and `.completion` are needed")
        return {"kind": kind, "dataset": spec, "downloaded": False}
    if kind == "toy":
        from .data import load_records

        load_records(task_cfg)
    elif kind not in ("hub", "local"):
        raise RecipeError(f"`task.kind` must be hub, local or toy; got {kind!r}")
    return {"kind": kind, "local_file": local}
