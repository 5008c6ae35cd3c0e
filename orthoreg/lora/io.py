"""Saving and loading an ``OrthoLoRA``: the PEFT adapter plus orthoreg's config, state, directions and input
subspaces, in safetensors and JSON only (never pickle)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import OrthoRegConfig
from ..core.layers import is_sharded
from ..directions.harmful import HarmfulDirections
from ..reader.subspaces import InputSubspaces

__all__ = ["CONFIG_NAME", "DIRECTIONS_NAME", "FORMAT_VERSION", "SUBSPACES_NAME", "load_ortholora", "save_ortholora"]

CONFIG_NAME = "orthoreg_config.json"
DIRECTIONS_NAME = "orthoreg_directions.safetensors"
SUBSPACES_NAME = "orthoreg_input_subspaces.safetensors"
FORMAT_VERSION = 1


def save_ortholora(
    ortho: Any,
    save_directory: str | os.PathLike,
    *,
    is_main_process: bool | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> None:
    """Writes the PEFT adapter (``adapter_model.safetensors``, ``adapter_config.json``) and, next to it,
    ``orthoreg_config.json`` (the config, the step and the regulariser's recorded references) and
    ``orthoreg_directions.safetensors``.

    Under ZeRO-3 or FSDP call it on every rank with ``state_dict=accelerator.get_state_dict(model)`` (a
    collective; ZeRO-3 needs ``stage3_gather_16bit_weights_on_model_save``); the ``model.`` prefix OrthoLoRA
    adds to the keys is removed. Only the main process writes; saving sharded LoRA parameters without a
    gathered ``state_dict`` raises instead of writing empty tensors.

    Args:
        save_directory: output folder (created).
        is_main_process (`bool`, *optional*): defaults to ``accelerator.is_main_process``, else rank 0.
        state_dict (`dict`, *optional*): a full state dict of this OrthoLoRA or of its PEFT model.
        kwargs: passed to ``PeftModel.save_pretrained`` (``safe_serialization`` is always ``True``).
    """
    if is_main_process is None:
        if ortho.accelerator is not None:
            is_main_process = ortho.accelerator.is_main_process
        else:
            dist = torch.distributed
            is_main_process = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if not is_main_process:
        return  # nothing is written here (accelerate's gathered state dict exists on the main process only)
    if state_dict is None and any(is_sharded(p) for n, p in ortho.model.named_parameters() if "lora_" in n):
        raise ValueError(
            "the LoRA parameters are sharded (DeepSpeed ZeRO-3 or FSDP), so saving them directly would write "
            "empty or partial tensors. Call `save_pretrained(dir, state_dict=accelerator.get_state_dict(model))` "
            "on every rank (for ZeRO-3 with `stage3_gather_16bit_weights_on_model_save: true`)."
        )
    if state_dict is not None and state_dict and all(k.startswith("model.") for k in state_dict):
        state_dict = {k[len("model."):]: v for k, v in state_dict.items()}
    kwargs["safe_serialization"] = True
    ortho.model.save_pretrained(save_directory, is_main_process=True, state_dict=state_dict, **kwargs)
    os.makedirs(save_directory, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "config": ortho.config.to_dict(),
        "state": ortho.state_dict_orthoreg(),
        "penalized_modules": ortho.penalized_modules,
    }
    path = os.path.join(save_directory, CONFIG_NAME)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
    os.replace(tmp, path)
    if ortho.directions is not None:
        ortho.directions.save(os.path.join(save_directory, DIRECTIONS_NAME))
    if ortho.input_subspaces is not None:
        ortho.input_subspaces.save(os.path.join(save_directory, SUBSPACES_NAME))


def load_ortholora(
    cls: type,
    base_model: nn.Module,
    pretrained_path: str | os.PathLike,
    accelerator: Any = None,
    *,
    is_trainable: bool = True,
    writer_modules: Sequence[str] | None = None,
    tokenizer: Any = None,
    **peft_kwargs: Any,
) -> Any:
    """Restores an OrthoLoRA written by ``save_pretrained``: the adapter (``PeftModel.from_pretrained`` on
    ``base_model``), the ``OrthoRegConfig``, the directions, the step and the recorded references. Reads only
    safetensors and JSON.

    Args:
        base_model: the same base model the adapter was trained on.
        pretrained_path: the folder ``save_pretrained`` wrote.
        accelerator: as in ``OrthoLoRA``.
        is_trainable (`bool`, *optional*, defaults to `True`): load the adapter trainable (to resume training);
            ``False`` freezes it (PEFT's inference mode).
        tokenizer (*optional*): the chat tokenizer; needed only to record the harm signal's base when the saved
            config reads it (``harm_signal_every``) and the folder holds no saved base (it is restored, not
            re-recorded).
        peft_kwargs: passed to ``PeftModel.from_pretrained`` (``adapter_name``, ``revision``, …).

    Raises:
        FileNotFoundError: a required file is missing (including a pickle-only ``adapter_model.bin`` adapter).
    """
    from peft import PeftModel

    folder = os.fspath(pretrained_path)
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"no {CONFIG_NAME} in {folder!r}; it is not a folder written by OrthoLoRA.save_pretrained (for a plain "
            "PEFT adapter use PeftModel.from_pretrained and build OrthoLoRA around it)"
        )
    if not os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):
        raise FileNotFoundError(
            f"no adapter_model.safetensors in {folder!r}; OrthoLoRA loads adapters from safetensors only (never "
            "pickle). Re-save the adapter with `save_pretrained(..., safe_serialization=True)`."
        )
    with open(config_path) as handle:
        payload = json.load(handle)
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path!r} has format {payload.get('format_version')!r}; this orthoreg reads {FORMAT_VERSION}"
        )
    config = OrthoRegConfig.from_dict(payload["config"])
    directions_path = os.path.join(folder, DIRECTIONS_NAME)
    directions = HarmfulDirections.load(directions_path) if os.path.isfile(directions_path) else None
    subspaces_path = os.path.join(folder, SUBSPACES_NAME)
    subspaces = InputSubspaces.load(subspaces_path) if os.path.isfile(subspaces_path) else None
    peft_model = PeftModel.from_pretrained(base_model, folder, is_trainable=is_trainable, **peft_kwargs)
    state = payload.get("state", {})
    ortho = cls(peft_model, config, directions, accelerator, writer_modules=writer_modules,
                input_subspaces=subspaces, tokenizer=tokenizer, harm_signal_state=state.get("harm_signal"))
    ortho.load_state_dict_orthoreg(state)
    return ortho
