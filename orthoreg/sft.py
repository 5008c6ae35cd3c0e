"""``orthoreg sft``: TRL's SFT script with orthoreg's ``OrthoRegCallback`` and its ``--orthoreg_*`` flags.

Every flag of TRL's own ``trl sft`` (``trl/scripts/sft.py``) works unchanged — ``ScriptArguments``, ``SFTConfig``,
``ModelConfig`` and ``DatasetMixtureConfig`` through ``TrlParser``, so ``--packing``, ``--use_peft --lora_r 16``
and ``--config recipe.yaml`` (YAML keys are the flag names, ``orthoreg_*`` included) mean what they mean there.
Added: the fields of :class:`orthoreg.OrthoRegConfig` as ``--orthoreg_<field>`` and where the harmful directions
come from (``--orthoreg_directions``). Launch it like TRL's script::

    orthoreg sft --model_name_or_path ./my-model --dataset_name ./my-data --output_dir out --use_peft \\
        --orthoreg_layers middle_third --orthoreg_mask labels

    accelerate launch [--config_file ...] -m orthoreg.sft --model_name_or_path ./my-model ...

Differences from TRL's script: ``--dataset_name`` may also be one local ``.json``/``.jsonl``/``.csv``/``.parquet``
file; the trainer state (with the ``orthoreg/...`` metrics in its log history) is saved to ``output_dir`` at the
end, next to ``orthoreg_run.json`` (the regulariser's settings, the directions' provenance, the world size).

The default (no ``--orthoreg_*`` flag) is ``OrthoRegConfig.recommended()``: the template-reader constraint
(``--orthoreg_reader_weight`` in base-model units) with ``--orthoreg_input_subspaces builtin`` — V_m recorded when
training starts, on the main process, from the model before any update (``--use_peft``: adapter off) with its chat
template, sent to every rank and saved to ``<output_dir>/orthoreg_input_subspaces`` — or a file, folder or Hub repo
id of saved ``InputSubspaces`` (``orthoreg subspaces extract``) — and the anchor KL on orthoreg's 200 built-in harmless
requests (``--orthoreg_anchor_kl_weight``; one process or DDP: under ZeRO/FSDP pass ``--orthoreg_anchor_kl_weight 0``).
No harmful directions are needed for either.

Directions (only for ``--orthoreg_proj_weight > 0``): ``--orthoreg_directions builtin`` (the default) extracts them on the main process from orthoreg's
built-in contrast prompts, formatted with the model's chat template, at the guarded layers only; every other rank
receives rank 0's tensors, so all ranks regularise against identical directions. They are saved to
``--orthoreg_directions_out`` (default ``<output_dir>/harmful_directions.safetensors``) for ``orthoreg audit`` and
later runs. Or pass what ``orthoreg directions extract`` wrote (a file or a ``save_pretrained`` folder), or a Hub
repo id (``HarmfulDirections.from_pretrained``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import OrthoRegConfig
from .core.distributed import run_on_main, world_size

logger = logging.getLogger(__name__)

PREFIX = "orthoreg_"
BUILTIN = "builtin"
DIRECTIONS_FILE = "harmful_directions.safetensors"
RUN_FILE = "orthoreg_run.json"
LOCAL_DATA_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class _OrthoRegSFTOptions:
    """The ``orthoreg sft`` options that are not ``OrthoRegConfig`` fields (where directions come from)."""

    orthoreg: bool = field(default=True, metadata={
        "help": "Add orthoreg's penalties to the training loss; --no_orthoreg runs TRL's plain SFT (a baseline)."})
    orthoreg_directions: str = field(default=BUILTIN, metadata={
        "help": "Harmful directions of this model: a .safetensors file or save_pretrained folder from `orthoreg "
                "directions extract`, a Hub repo id, or 'builtin' to extract them on the main process from the "
                "built-in contrast prompts (with the model's chat template) and share them with every rank."})
    orthoreg_directions_out: str | None = field(default=None, metadata={
        "help": "Where 'builtin' directions are saved (default: <output_dir>/harmful_directions.safetensors)."})
    orthoreg_directions_k: int = field(default=1, metadata={
        "help": "Directions per layer for 'builtin' extraction (k > 1 needs --orthoreg_directions_method pca_diff)."})
    orthoreg_directions_method: Literal["diff_means", "pca_diff", "class_means"] = field(default="diff_means",
                                                                                          metadata={
        "help": "Extraction method for 'builtin' directions."})


def _prefixed_fields() -> list[tuple[str, Any, Any]]:
    """``OrthoRegConfig``'s fields as ``orthoreg_<name>`` (same type and help), so a field added to the config is a
    flag here without further code. The defaults are ``OrthoRegConfig.recommended()``'s: with no ``--orthoreg_*``
    flag, ``orthoreg sft`` runs the recommended setting."""
    import typing

    hints = typing.get_type_hints(OrthoRegConfig)
    recommended = OrthoRegConfig.recommended()
    out = []
    for f in dataclasses.fields(OrthoRegConfig):
        default = getattr(recommended, f.name) if f.default is not dataclasses.MISSING else None
        kwargs: dict[str, Any] = {"metadata": dict(f.metadata)}
        if f.default_factory is not dataclasses.MISSING:
            kwargs["default_factory"] = f.default_factory
        else:
            kwargs["default"] = default
        out.append((PREFIX + f.name, hints[f.name], field(**kwargs)))
    return out


def _post_init(self) -> None:
    """Validates at parse time: a bad ``--orthoreg_*`` value fails before any model or data is loaded."""
    if not self.orthoreg:
        return
    self.config = self.to_config()
    if self.config.lora_weight > 0:
        raise ValueError("--orthoreg_lora_weight > 0 needs OrthoLoRA in a custom training loop; the Trainer callback "
                         "that `orthoreg sft` uses applies the covariance and projection terms. Set it to 0")
    if self.orthoreg_directions != BUILTIN and self.config.needs_directions:
        where = self.orthoreg_directions
        looks_like_repo_id = where.count("/") == 1 and not where.startswith((".", "/", "~"))
        if not Path(where).exists() and not looks_like_repo_id:
            raise ValueError(f"--orthoreg_directions {where!r} is neither 'builtin', an existing file or folder, nor "
                             "a Hub repo id; write one with `orthoreg directions extract` or pass 'builtin'")
    if self.orthoreg_directions_k < 1:
        raise ValueError(f"--orthoreg_directions_k must be >= 1; got {self.orthoreg_directions_k}")
    where = self.config.input_subspaces
    if self.config.reader_weight > 0 and not self.config.uses_builtin_subspaces and not Path(where).exists() \
            and not (where.count("/") == 1 and not where.startswith((".", "/", "~"))):
        raise ValueError(f"--orthoreg_input_subspaces {where!r} is neither 'builtin', an existing file or folder "
                         "written by InputSubspaces.save/save_pretrained, nor a Hub repo id; record one with "
                         "`orthoreg subspaces extract` or pass 'builtin'")


def _to_config(self) -> OrthoRegConfig:
    """The ``OrthoRegConfig`` these flags describe."""
    return OrthoRegConfig(**{f.name: getattr(self, PREFIX + f.name) for f in dataclasses.fields(OrthoRegConfig)})


OrthoRegArguments = dataclasses.make_dataclass(
    "OrthoRegArguments", _prefixed_fields(), bases=(_OrthoRegSFTOptions,),
    namespace={"__post_init__": _post_init, "to_config": _to_config, "__module__": __name__},
)
OrthoRegArguments.__doc__ = (
    "The ``--orthoreg_*`` flags of ``orthoreg sft``: every ``OrthoRegConfig`` field prefixed with ``orthoreg_`` "
    "(``--orthoreg_layers``, ``--orthoreg_proj_weight``, ``--orthoreg_anchor``, ``--orthoreg_mask``, …), plus "
    "``--orthoreg`` / ``--no_orthoreg`` and where the harmful directions come from (``--orthoreg_directions``). "
    "``to_config()`` returns the ``OrthoRegConfig``; it is built (and validated) when the flags are parsed."
)


def make_parser(subparsers=None, prog: str | None = None):
    """TRL's SFT parser (``trl/scripts/sft.py`` ``make_parser``) with :class:`OrthoRegArguments` added."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    dataclass_types = (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, OrthoRegArguments)
    if subparsers is not None:
        return subparsers.add_parser("sft", help="SFT with orthoreg (TRL's SFT script + --orthoreg_* flags)",
                                     dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog=prog)


# ---------------------------------------------------------------------------------------------------- data


def load_train_dataset(script_args, dataset_args):
    """The datasets of TRL's script: ``--datasets`` mixtures, a Hub/local name for ``load_dataset`` — or one local
    JSON/JSONL/CSV/Parquet file (read with ``load_dataset(<format>, data_files=...)``)."""
    from datasets import load_dataset
    from trl import get_dataset

    name = script_args.dataset_name
    if dataset_args.datasets:
        if name:
            logger.warning("Both `datasets` and `dataset_name` are provided; `datasets` is used, `dataset_name` "
                           "ignored.")
        return get_dataset(dataset_args)
    if not name:
        raise ValueError("Either `datasets` or `dataset_name` must be provided.")
    if os.path.isfile(name):
        builder = LOCAL_DATA_BUILDERS.get(Path(name).suffix.lower())
        if builder is None:
            raise ValueError(f"--dataset_name {name!r} is a file of an unknown format; use one of "
                             f"{sorted(LOCAL_DATA_BUILDERS)} or a dataset folder / Hub name")
        return load_dataset(builder, data_files=name, streaming=script_args.dataset_streaming)
    check_dataset_name(script_args, dataset_args)
    return load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)


def check_dataset_name(script_args, dataset_args) -> None:
    """Refuses a ``--dataset_name`` that reads as a local path but does not exist, before anything loads (offline,
    ``load_dataset`` would otherwise try it as a Hub name and fail with a connection error)."""
    name = script_args.dataset_name
    if dataset_args.datasets or not name or os.path.exists(name):
        return
    if Path(name).suffix.lower() in LOCAL_DATA_BUILDERS or name.startswith((".", "/", "~")):
        raise ValueError(f"--dataset_name {name!r} looks like a local file or folder but does not exist (a Hub name "
                         "has the form org/name); check the path")


def _split(dataset, split: str, flag: str):
    if split not in dataset:
        raise ValueError(f"the dataset has no {split!r} split (it has {sorted(dataset)}); pass {flag} <split>")
    return dataset[split]


# ---------------------------------------------------------------------------------------------------- directions


def _extract_builtin(trainer, args, config: OrthoRegConfig, source_model: str, revision: str | None):
    """Extracts the built-in contrast set's directions at the guarded layers (main process only)."""
    from . import extract_directions
    from .core.capture import find_decoder_stack, resolve_layers
    from .core.prompts import load_builtin
    from .directions.harmful import HarmfulDirections

    model = trainer.model
    stack = find_decoder_stack(model, layers_path=config.layers_path)
    layers = resolve_layers(config.layers, stack.num_layers)
    kwargs = dict(layers=layers, k=args.orthoreg_directions_k, method=args.orthoreg_directions_method,
                  heldout=load_builtin("test"), truncate=True, progress=not trainer.args.disable_tqdm,
                  seed=trainer.args.seed, layers_path=config.layers_path, source_model=source_model,
                  source_revision=revision)
    # A PEFT adapter is the identity at initialisation, but extract from the base model whatever its init.
    disable = getattr(model, "disable_adapter", None)
    with disable() if callable(disable) else contextlib.nullcontext():
        directions = extract_directions(model, trainer.processing_class, load_builtin("train"), **kwargs)
    # On the CPU: what is sent to the other ranks must not depend on the main process's device.
    return HarmfulDirections({layer: u.cpu() for layer, u in directions.directions.items()},
                             metadata=directions.metadata)


def obtain_directions(trainer, args, config: OrthoRegConfig, source_model: str, revision: str | None = None):
    """(HarmfulDirections, provenance) for this run, identical on every rank.

    ``builtin``: the main process extracts and saves them, every rank receives its tensors (an extraction error is
    raised on every rank, not only on rank 0). A file: every rank loads it and checks it against the model.
    """
    from .directions.harmful import HarmfulDirections

    if args.orthoreg_directions != BUILTIN:
        directions = HarmfulDirections.from_pretrained(args.orthoreg_directions, model=trainer.model)
        return directions, {"source": "file", "file": str(args.orthoreg_directions), "layers": directions.layers,
                            "k": directions.k}

    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ValueError("--orthoreg_directions builtin extracts on the main process alone, which ZeRO-3's "
                         "partitioned weights do not allow; extract first (`orthoreg directions extract ... --out "
                         "harmful.safetensors`) and pass --orthoreg_directions harmful.safetensors")
    out = Path(args.orthoreg_directions_out or Path(trainer.args.output_dir) / DIRECTIONS_FILE)
    # Every rank holds the main process's tensors: bit-identical directions everywhere.
    directions = run_on_main(lambda: _extract_builtin(trainer, args, config, source_model, revision),
                             "extracting the built-in harmful directions")
    if trainer.accelerator.is_main_process:
        out.parent.mkdir(parents=True, exist_ok=True)
        directions.save(out)
    separation = directions.metadata.get("separation") or {}
    return directions, {"source": BUILTIN, "file": str(out), "layers": directions.layers, "k": directions.k,
                        "method": directions.metadata.get("method"),
                        "separation_accuracy": {str(k): v.get("accuracy") for k, v in separation.items()}}


def attach_orthoreg(trainer, args, source_model: str, revision: str | None = None) -> dict[str, Any]:
    """Adds an ``OrthoRegCallback`` built from ``args`` to ``trainer``; returns what ``orthoreg_run.json`` records."""
    from .callback import OrthoRegCallback

    config = args.to_config()
    directions, provenance = (None, {"source": None})
    if config.needs_directions:
        directions, provenance = obtain_directions(trainer, args, config, source_model, revision)
    # V_m of the reader term: the callback reads config.input_subspaces, or records 'builtin' ones at train start
    # (main process, sent to every rank) and saves them in output_dir/orthoreg_input_subspaces.
    trainer.add_callback(OrthoRegCallback(config, directions=directions))
    return {"orthoreg": config.to_dict(), "directions": provenance, "world_size": world_size(),
            "input_subspaces": None if config.reader_weight == 0 else config.input_subspaces}


def check_combination(training_args, model_args, orthoreg_args) -> None:
    """Refuses flag combinations orthoreg cannot train with, before the model is loaded."""
    if not orthoreg_args.orthoreg:
        return
    config = orthoreg_args.config
    if training_args.fp16:
        raise ValueError("--fp16 cannot be used with orthoreg: its gradients enter after the fp16 loss scaler. Use "
                         "--bf16 (or fp32), or pass --no_orthoreg")
    if config.anchor == "paired" and config.proj_weight > 0 and not model_args.use_peft:
        raise ValueError("--orthoreg_anchor paired compares with the base model = the PEFT adapter switched off, "
                         "so it needs --use_peft (or another --orthoreg_anchor)")


# ---------------------------------------------------------------------------------------------------- the script


def main(script_args, training_args, model_args, dataset_args, orthoreg_args) -> None:
    """TRL's ``trl/scripts/sft.py`` ``main``, with the orthoreg callback attached before training."""
    import transformers
    from packaging.version import Version
    from trl import SFTTrainer, get_peft_config, get_quantization_config

    check_combination(training_args, model_args, orthoreg_args)
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    dataset = load_train_dataset(script_args, dataset_args)
    trainer = SFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=_split(dataset, script_args.dataset_train_split, "--dataset_train_split"),
        eval_dataset=_split(dataset, script_args.dataset_test_split, "--dataset_test_split")
        if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    run_info: dict[str, Any] = {"orthoreg": None, "world_size": world_size()}
    if orthoreg_args.orthoreg:
        run_info = attach_orthoreg(trainer, orthoreg_args, model_args.model_name_or_path, model_args.model_revision)
        trainer.accelerator.print(f"orthoreg: {run_info['orthoreg']}; directions: {run_info['directions']}")

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("✅ Training completed.")
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the log history, orthoreg/... metrics included
    if trainer.accelerator.is_main_process:
        Path(training_args.output_dir, RUN_FILE).write_text(json.dumps(run_info, indent=2, default=str) + "\n")
    trainer.accelerator.print(f"💾 Model saved to {training_args.output_dir}.")

    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"🤗 Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")

    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()


def run(argv: list[str] | None = None, prog: str | None = "orthoreg sft") -> int:
    """Parses the command line (a bad flag value: one ``error:`` line, status 2) and runs :func:`main`.

    Under several processes each rank ends with ``os._exit`` after its work: gloo processes sometimes abort at
    interpreter exit after finishing, which would turn a finished run into a failed launch.
    """
    parser = make_parser(prog=prog)
    try:
        parsed = parser.parse_args_and_config(args=argv, fail_with_unknown_args=True)
        script_args, training_args, model_args, dataset_args, orthoreg_args = parsed
        check_combination(training_args, model_args, orthoreg_args)
        check_dataset_name(script_args, dataset_args)
    except ValueError as err:
        print(f"{prog or 'orthoreg.sft'}: error: {err}", file=sys.stderr)
        return 2
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    main(*parsed)
    if distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(run(prog="python -m orthoreg.sft"))
