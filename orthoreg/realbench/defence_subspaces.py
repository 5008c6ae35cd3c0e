"""The input subspaces V_m of the defence benchmark (issue 15), recorded once on the aligned base and cached.

Every set is ``orthoreg.extract_input_subspaces`` on the aligned base (k = 16 per module, the seven projections of
every layer but the first, 203 modules of SmolLM2; see ``adapted_modules``), from one prompt set at one choice of
positions:

==================  =====================================================  ================================  =======
name                prompts                                                positions                         method
==================  =====================================================  ================================  =======
``harmful_post``    the safety tune's 200 harmful prompts                  post-instruction + 1st reply tok  pca
``harmful_prompt``  the same                                               every prompt token                pca
``contrastive``     harmful vs their harmless twins¹ (``contrast``)        post-instruction + 1st reply tok  contr.
``harmless_post``   the harmless twins¹ (control: no harmful data)         post-instruction + 1st reply tok  pca
``task_post``       the task's own training prompts (control)              post-instruction + 1st reply tok  pca
``random``          none: a random orthonormal k-frame per module (seeded)  —                                 —
``builtin_harml…``  orthoreg's own 200 built-in harmless requests (train)   post-instruction + 1st reply tok  pca
``harm_matched``    harmful prompts against the built-in harmless ones     post-instruction + 1st reply tok  tilted
==================  =====================================================  ================================  =======

The levers on the residual (issue 23, item 1; ``LEVER_SETS``) are ``builtin_harmless_post`` with one thing changed:
``builtin_all_layers`` also covers layer 0 (210 modules of SmolLM2), ``builtin_reply4`` takes the first four reply
tokens instead of one, ``builtin_double_k`` keeps 2k directions (32 at the default k), ``builtin_and_task_post``
pools the built-in harmless requests with the task's own training prompts.

¹ the safety tune's harmless prompts: 368 on aligned base v2, 464 on v3.

``harm_matched`` is the energy-matched harm-specific V of the specificity test (``specificity``): per module the
top-k of M_harmful − t·M_builtin-harmless, t set so that it holds the pooled energy ``builtin_harmless_post`` holds.

``builtin_harmless_post`` is what a user has with no data of their own: the harmless side of the contrast set that
ships with the library (``orthoreg.core.prompts.load_builtin("train").harmless``), none of it seen by the fine-tunes.

The first reply token is the aligned base's own greedy reply (refusals on harmful prompts, answers on harmless).
``gradient_norm`` is the yardstick that scales a control to its arm: the norm of ∇_θ Σ_m s²‖B_m A_m V_mᵀ‖²_F over
the LoRA parameters θ of a trained adapter, in float64, computed from the adapter's tensors (no forward pass).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# name -> what differs from builtin_harmless_post
LEVER_SETS = {"builtin_all_layers": {"all_layers": True}, "builtin_reply4": {"reply_tokens": 4},
              "builtin_double_k": {"k_factor": 2}, "builtin_and_task_post": {"with_task": True}}
SUBSPACE_SETS = ("harmful_post", "harmful_prompt", "contrastive", "harmless_post", "task_post", "random",
                 "builtin_harmless_post", "harm_matched", *LEVER_SETS)
POST = ("post_instruction", "first_reply")
K = 16


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def random_subspaces(like: Any, seed: int = 0) -> Any:
    """A random orthonormal frame of the same shape per module (QR of a seeded Gaussian), as ``InputSubspaces``."""
    from orthoreg import InputSubspaces

    generator = torch.Generator().manual_seed(seed)
    frames = {}
    for name, v in like.items():
        q, _ = torch.linalg.qr(torch.randn(v.shape[1], v.shape[0], generator=generator, dtype=torch.float64))
        frames[name] = q.T.contiguous().to(torch.float32)
    return InputSubspaces(frames, metadata={"method": "random", "seed": seed, "k": int(next(iter(like.items()))[1]
                                                                                       .shape[0])})


def adapted_modules(model: Any, first_layer: bool = False) -> list[str]:
    """The seven projections of every decoder layer but the first (with ``first_layer``: of every layer). Layer 0
    is left out by default as the library's template-reader constraint leaves it out (``reader.template``)."""
    from .finetune import LORA_TARGETS

    names = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in LORA_TARGETS]
    return names if first_layer else [n for n in names if ".layers.0." not in f".{n}"]


def template_moments(model: Any, tokenizer: Any, info: Mapping[str, Any], log=print
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(M_harmful, M_builtin_harmless): per adapted module, the mean second moment of its inputs at the template
    positions (``POST``) of the safety tune's harmful prompts and of orthoreg's built-in harmless requests
    (``reader.extraction.input_moments``, float64)."""
    from orthoreg.core.prompts import load_builtin
    from orthoreg.reader.extraction import input_moments

    options = dict(modules=adapted_modules(model), positions=list(POST), batch_size=16)
    harmful = [t["prompt"] for t in info["harmful_targets"]]
    log(f"[subspaces] template moments of {len(harmful)} harmful and the built-in harmless prompts")
    m_harm, _ = input_moments(model, tokenizer, harmful, **options)
    m_harmless, _ = input_moments(model, tokenizer, list(load_builtin("train").harmless), **options)
    return m_harm, m_harmless


def build_subspaces(name: str, model: Any, tokenizer: Any, info: Mapping[str, Any], folder: str | Path,
                    task_prompts: Sequence[str] | None = None, task_name: str | None = None, k: int = K,
                    log=print) -> Any:
    """The cached subspace set ``name`` of the aligned base in ``folder`` (extracted on the first call)."""
    from orthoreg import InputSubspaces, extract_input_subspaces

    if name not in SUBSPACE_SETS:
        raise ValueError(f"unknown subspace set {name!r}; choose from {SUBSPACE_SETS}")
    if name == "random":
        return random_subspaces(build_subspaces("harmful_post", model, tokenizer, info, folder, k=k, log=log))
    harmful = [t["prompt"] for t in info["harmful_targets"]]
    harmless = [t["prompt"] for t in info["harmless_targets"]]
    if name == "harm_matched":
        from .specificity import harm_matched_subspaces

        generic = build_subspaces("builtin_harmless_post", model, tokenizer, info, folder, k=k, log=log)
        path = Path(folder) / f"subspaces-harm_matched-{_key({'harmful': harmful, 'k': k, 'v': 1})}.safetensors"
        if path.is_file():
            return InputSubspaces.load(path)
        subspaces = harm_matched_subspaces(*template_moments(model, tokenizer, info, log=log), generic, k)
        subspaces.save(path)
        return subspaces
    lever = LEVER_SETS.get(name, {})
    if name == "builtin_harmless_post" or lever:
        from orthoreg.core.prompts import load_builtin

        prompts, label = list(load_builtin("train").harmless), "orthoreg_builtin_harmless_train"
        if lever.get("with_task"):
            if not task_prompts:
                raise ValueError(f"the {name} subspace set needs the task's training prompts")
            prompts, label = prompts + list(task_prompts), f"orthoreg_builtin_harmless_train+task:{task_name}"
        k = k * lever.get("k_factor", 1)
    elif name == "task_post":
        if not task_prompts:
            raise ValueError("the task_post subspace set needs the task's training prompts")
        prompts, label = list(task_prompts), f"task:{task_name}"
    else:
        prompts, label = (harmless, "harmless_twins") if name == "harmless_post" else (harmful, "harmful_safety_tune")
    modules = adapted_modules(model, first_layer=lever.get("all_layers", False))
    settings = {"name": name, "prompts": prompts, "k": k, "modules": modules,
                "positions": list(POST) if name != "harmful_prompt" else ["prompt"],
                "method": "contrastive" if name == "contrastive" else "pca"}
    if "reply_tokens" in lever:  # only then, so that the other sets keep their cache keys
        settings["reply_tokens"] = lever["reply_tokens"]
    path = Path(folder) / f"subspaces-{name}-{_key(settings)}.safetensors"
    if path.is_file():
        return InputSubspaces.load(path)
    log(f"[subspaces] extracting {name} ({len(prompts)} prompts, positions {settings['positions']})")
    subspaces = extract_input_subspaces(
        model, tokenizer, prompts, modules=settings["modules"], k=k, positions=settings["positions"],
        method=settings["method"], reply_tokens=settings.get("reply_tokens", 1),
        contrast_prompts=harmless if name == "contrastive" else None, prompt_set=label, batch_size=16)
    subspaces.save(path)
    return subspaces


def lora_tensors(peft_model: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, scaling) of every LoRA module, keyed by the base model's module name."""
    from orthoreg.reader.subspaces import canonical_module_name

    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            out[canonical_module_name(name)] = (module.lora_A["default"].weight.detach().clone(),
                                                module.lora_B["default"].weight.detach().clone(),
                                                float(module.scaling["default"]))
    return out


def gradient_norm(adapter: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]], subspaces: Any,
                  base_readouts: Mapping[str, float] | None = None) -> float:
    """‖∇_{A,B} Σ_m s_m²‖B_m A_m V_mᵀ‖²_F‖ over all modules of ``subspaces``, in float64; with ``base_readouts``
    (‖W₀,m V_mᵀ‖²_F per module) the base-units term (1/M) Σ_m s_m²‖B_m A_m V_mᵀ‖²_F / ‖W₀,m V_mᵀ‖²_F instead."""
    total = torch.zeros((), dtype=torch.float64)
    for name, v in subspaces.items():
        a, b, s = adapter[name]
        a = a.double().requires_grad_(True)
        b = b.double().requires_grad_(True)
        penalty = s * s * (b @ (a @ v.double().T)).pow(2).sum()
        if base_readouts is not None:
            penalty = penalty / (base_readouts[name] * len(subspaces))
        ga, gb = torch.autograd.grad(penalty, (a, b))
        total = total + ga.pow(2).sum() + gb.pow(2).sum()
    return float(total.sqrt())


def base_readouts(model: Any, subspaces: Any) -> dict[str, float]:
    """‖W₀,m V_mᵀ‖²_F per module of ``subspaces`` (W₀ the base model's weight, ``nn.Linear`` layout), in float64."""
    return {name: float((model.get_submodule(name).weight.detach().double() @ v.double().T).pow(2).sum())
            for name, v in subspaces.items()}


def save_adapter(adapter: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]], path: str | Path) -> None:
    from safetensors.torch import save_file

    tensors = {f"{n}.A": a.contiguous() for n, (a, _, _) in adapter.items()}
    tensors.update({f"{n}.B": b.contiguous() for n, (_, b, _) in adapter.items()})
    save_file(tensors, str(path), metadata={"scaling": json.dumps({n: s for n, (_, _, s) in adapter.items()})})


def load_adapter(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        scaling = json.loads(handle.metadata()["scaling"])
        return {n: (handle.get_tensor(f"{n}.A"), handle.get_tensor(f"{n}.B"), float(s)) for n, s in scaling.items()}
