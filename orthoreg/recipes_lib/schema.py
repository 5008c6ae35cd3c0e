"""The typed schema of the Hydra recipes: one dataclass per config group, registered in Hydra's ConfigStore.

``recipes/train.yaml`` lists ``recipe_schema`` first in its defaults, so every group file (``model/*.yaml``,
``reg/*.yaml``, …) and every command-line override is merged into these typed nodes: an unknown key or a value of
the wrong type fails while Hydra composes, naming the key. :func:`load_recipe` then turns the composed config into
:class:`RecipeConfig` objects once, at the entry of ``orthoreg.train``; the pipeline reads attributes, never
converts ``DictConfig`` nodes. ``reg.orthoreg`` *is* :class:`orthoreg.OrthoRegConfig` — the dataclass
``orthoreg sft`` parses — so its checks (``__post_init__``) run at that entry too.

Every node also answers ``node.get(key, default)`` like a mapping (``default`` only when the key does not exist),
for code written against ``DictConfig``.

Composing the tree outside ``orthoreg.train`` (tests, notebooks): call :func:`register_schemas` first.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from orthoreg.config import OrthoRegConfig

from .errors import RecipeError

SCHEMA_NAME = "recipe_schema"
_ABSENT = object()


class Node:
    """Mapping-style reads on a schema dataclass (``cfg.get("key", default)``), as ``DictConfig`` offers."""

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key, _ABSENT)
        return default if value is _ABSENT else value

    def __getitem__(self, key: str) -> Any:
        if not hasattr(self, key):
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in {f.name for f in dataclasses.fields(self)}


# ------------------------------------------------------------------------------------------------ OmegaConf typing


def _omegaconf_type(hint: Any) -> Any:
    """The closest annotation OmegaConf accepts: ``Literal`` → ``str``, unions holding containers → ``Any``."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return str
    if origin is Union or isinstance(hint, types.UnionType):
        args = typing.get_args(hint)
        if any(typing.get_origin(a) in (list, dict) for a in args):
            return Any
        members = tuple(_omegaconf_type(a) for a in args)
        return Union[members]  # noqa: UP007 - built from a tuple at run time
    return hint


def omegaconf_schema(cls: type) -> type:
    """A subclass of the dataclass ``cls`` with the same fields, defaults, help and checks, annotated so OmegaConf
    can type it (it refuses ``Literal`` and unions that hold a list). ``OmegaConf.to_object`` builds the subclass,
    so ``cls.__post_init__`` validates the values."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        kwargs: dict[str, Any] = {"metadata": f.metadata}
        if f.default_factory is not dataclasses.MISSING:
            kwargs["default_factory"] = f.default_factory
        elif f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        fields.append((f.name, _omegaconf_type(hints[f.name]), field(**kwargs)))
    return dataclasses.make_dataclass(f"{cls.__name__}Node", fields, bases=(cls,), namespace={
        "__module__": __name__, "__doc__": f"``{cls.__name__}`` typed for OmegaConf (same fields and checks)."})


OrthoRegNode = omegaconf_schema(OrthoRegConfig)


def as_orthoreg_config(node: OrthoRegConfig) -> OrthoRegConfig:
    """The plain ``OrthoRegConfig`` of a (possibly OmegaConf-typed) node."""
    if type(node) is OrthoRegConfig:
        return node
    return OrthoRegConfig(**{f.name: getattr(node, f.name) for f in dataclasses.fields(OrthoRegConfig)})


# ------------------------------------------------------------------------------------------------ the groups


@dataclass
class ModelSchema(Node):
    """``recipes/model/*.yaml`` (loaders in ``models.py``)."""

    name: str = "???"
    display_name: str | None = None
    stand_in_for: str | None = None
    source: str = "hub"  # hub | gguf_package | tiny
    hub_id: str | None = None
    revision: str | None = None
    local_path: str | None = None
    config_json: str | None = None
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto (the checkpoint's own)
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    lora_target_modules: list[str] | None = None
    published: dict[str, Any] = field(default_factory=dict)
    package: str | None = None  # gguf_package: import name of the package holding the .gguf
    pip_name: str | None = None
    gguf_file: str | None = None
    assets: str | None = "auto"  # tiny: auto | a folder | null
    tokenizer: str = "auto"  # tiny: auto | world | bpe
    config: dict[str, Any] | None = None  # tiny: LlamaConfig numbers

    def __post_init__(self) -> None:
        if self.source not in ("hub", "gguf_package", "tiny"):
            raise ValueError(f"`model.source` must be hub, gguf_package or tiny; got {self.source!r}")


@dataclass
class TaskSchema(Node):
    """``recipes/task/*.yaml`` (readers in ``data.py``)."""

    name: str = "???"
    display_name: str | None = None
    kind: str = "hub"  # hub | local | toy
    dataset: dict[str, Any] | None = None  # hub: {path, name, split}
    local_file: str | None = None
    format: dict[str, Any] | None = None  # {prompt, completion} templates
    chat: bool = True
    num_examples: int | None = None
    max_length: int | None = None
    toy_task: str | None = None


@dataclass
class RegSchema(Node):
    """``recipes/reg/*.yaml``: ``none``, ``orthoreg`` (``orthoreg:`` is an ``OrthoRegConfig``) or a baseline."""

    name: str = "???"
    kind: str = "none"  # none | orthoreg | baseline
    orthoreg: OrthoRegNode | None = None  # type: ignore[valid-type]
    callback: str | None = None  # baseline: "package.module:Class"
    config_class: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    needs_directions: bool = False
    reference_model: str = "none"  # auto: a frozen base copy for full fine-tuning
    needs_logits: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("none", "orthoreg", "baseline"):
            raise ValueError(f"`reg.kind` must be none, orthoreg or baseline; got {self.kind!r}")
        if self.kind == "orthoreg":
            if self.orthoreg is None:
                raise ValueError(f"reg={self.name} is kind orthoreg but has no `reg.orthoreg` block")
            self.orthoreg = as_orthoreg_config(self.orthoreg)


@dataclass
class EvalSchema(Node):
    """``recipes/eval/*.yaml`` (plugins in ``evaluation.py``)."""

    name: str = "???"
    kind: str = "none"  # judge | classifier | toy | none
    prompts: str = "em_questions"
    samples_per_question: int = 1
    generation: dict[str, Any] | None = None
    judge: dict[str, Any] | None = None
    thresholds: dict[str, Any] | None = None
    judge_prompts: dict[str, Any] | None = None
    classifier: dict[str, Any] | None = None
    n_samples: int = 500
    sample_seed: int | None = None
    context_seed: int | None = None


@dataclass
class FinetuneSchema(Node):
    """``recipes/finetune/*.yaml``: keys map onto ``SFTConfig`` (``training.py``)."""

    name: str = "???"
    method: str = "lora"  # lora | full
    lora: dict[str, Any] | None = None  # {r, alpha, dropout, target_modules}
    max_steps: int = -1
    num_train_epochs: float = 1.0
    learning_rate: float = 1e-4
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: Any = "auto"  # auto | true | false
    gradient_checkpointing: bool = False
    packing: bool = False
    logging_steps: int = 10
    save_steps: int = 0
    save_total_limit: int | None = None
    resume_from_checkpoint: Any = None  # null | true | a checkpoint folder
    save_final: bool = True
    report_to: Any = "none"  # a name or a list of names

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise ValueError(f"`finetune.method` must be lora or full; got {self.method!r}")


@dataclass
class DirectionsSchema(Node):
    """``directions:`` in ``recipes/train.yaml`` (``directions.py``)."""

    source: str = "auto"  # auto | builtin | toy | file
    file: str | None = None
    layers: Any = "all"
    k: int = 1
    method: str = "diff_means"
    pooling: str = "last"
    batch_size: int = 16
    max_length: int | None = 256


@dataclass
class OverlapSchema(Node):
    """``overlap:`` in ``recipes/train.yaml`` (``orthoreg.audit.overlap.overlap_score``)."""

    enabled: bool = True
    num_examples: int = 64
    batch_size: int = 8
    mask: str = "labels"
    after_training: bool = True
    max_copy_parameters: float = 1e9


@dataclass
class RecipeConfig(Node):
    """One recipe: the composed ``recipes/train.yaml`` with one option of every group."""

    model: ModelSchema = field(default_factory=ModelSchema)
    task: TaskSchema = field(default_factory=TaskSchema)
    reg: RegSchema = field(default_factory=RegSchema)
    eval: EvalSchema = field(default_factory=EvalSchema)
    finetune: FinetuneSchema = field(default_factory=FinetuneSchema)
    directions: DirectionsSchema = field(default_factory=DirectionsSchema)
    overlap: OverlapSchema = field(default_factory=OverlapSchema)
    seed: int = 0
    dry_run: bool = False
    progress: bool = True
    output_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain Python (for results.json and config_resolved.yaml)."""
        return dataclasses.asdict(self)


def register_schemas() -> None:
    """Registers :class:`RecipeConfig` as ``recipe_schema`` in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=RecipeConfig)


def load_recipe(cfg: Any) -> RecipeConfig:
    """The composed config as typed objects, every check of the schema and of ``OrthoRegConfig`` run once.

    Raises:
        RecipeError: a value the schema or ``OrthoRegConfig`` refuses, naming it.
    """
    if isinstance(cfg, RecipeConfig):
        return cfg
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        recipe = OmegaConf.to_object(cfg)
    except (ValueError, TypeError, OmegaConfBaseException) as err:
        cause = err.__cause__ if isinstance(err, OmegaConfBaseException) and err.__cause__ else err
        raise RecipeError(f"the recipe's settings are not valid: {cause}") from err
    if not isinstance(recipe, RecipeConfig):
        raise RecipeError(f"the composed config is not typed by `{SCHEMA_NAME}` (got {type(recipe).__name__}); "
                          f"list `{SCHEMA_NAME}` first in the defaults of recipes/train.yaml")
    return recipe
