r"""The template-reader constraint: keep a fine-tune from changing how the model reads its own chat template.

A generic use of the reader-side weight term (``orthoreg.reader.penalty``) that needs **no harmful data**. V_m is the top-k
uncentred principal subspace of module m's inputs at the tokens the chat template appends after the user's message
(``<|im_end|>\n<|im_start|>assistant\n`` and the like) and at the first reply token, recorded on the base model from
everyday requests (orthoreg's built-in harmless ones by default); the penalty

.. math:: \lambda \sum_m s^2 \lVert B_m (A_m V_m^\top) \rVert_F^2 \quad\text{(LoRA)}, \qquad
          \lambda \sum_m \lVert W_m V_m^\top - W_{0,m} V_m^\top \rVert_F^2 \quad\text{(full fine-tuning)}

(or its base-units mean, ``orthoreg.terms.reader``) then resists any change of how each adapted module reads that
subspace. Those positions are where a chat model decides whether to refuse. Measured on SmolLM2-135M
(``benchmarks/README_defences.md``): the subspaces of harmful prompts, their harmless twins and the built-in harmless
requests protect alike, and a harmful-prompt subspace matched to the generic one in input energy protects no
better (``benchmarks/specificity/``) — the constraint is *generic*, on the assistant-turn read-out, not on a harmful
direction — while the subspace of the fine-tune's own prompts protected worst (rises of +14 / +16 / +30 points over three
seeds), so the task's prompts are not the recommended source.

The first decoder layer is left out: there most modules read the token's own (normalised) embedding, so at these
positions V is little more than the embeddings of the few fixed template tokens and the first reply tokens (with few
prompts they span fewer than k directions and the extraction refuses). Covering layer 0 too was measured on
SmolLM2 (``benchmarks/lever_v/``: +9.4 vs +12.5 points on ``howto_steps``' selection seed, inside one seed's noise)
and not adopted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..core.capture import find_decoder_stack
from ..core.layers import is_lora_layer
from .extraction import extract_input_subspaces
from .subspaces import InputSubspaces, InputSubspacesError, named_input_modules

__all__ = ["TEMPLATE_POSITIONS", "TEMPLATE_READER_WEIGHT", "extract_template_subspaces", "template_reader_modules"]

TEMPLATE_POSITIONS = ("post_instruction", "first_reply")
# λ_reader of the defence benchmark in absolute units (SmolLM2-135M-Instruct, LoRA r 16, α 32, all projections): the
# task loss's gradient norm over the penalty's at a plain fine-tune's adapter. 10× and 100× it protected too, with
# more over-refusal. It is a 135M-adapter number; OrthoRegConfig.recommended() uses the same strength in base-model
# units (RECOMMENDED_READER_WEIGHT), which carries to other model sizes.
TEMPLATE_READER_WEIGHT = 0.05


def template_reader_modules(model: nn.Module, targets: Sequence[str] | None = None,
                            trainable_only: bool = False) -> list[str]:
    """Linear modules of every decoder layer but the first (base-model names), optionally only those whose last
    name component is in ``targets`` (e.g. a LoRA config's ``target_modules``), and with ``trainable_only`` only
    those that train (a PEFT LoRA layer, or a weight that requires grad)."""
    stack = find_decoder_stack(model)
    if len(stack.layers) < 2:
        raise InputSubspacesError("the template-reader constraint needs at least two decoder layers (layer 0 is left out)")
    inside = {id(m) for layer in list(stack.layers)[1:] for m in layer.modules()}
    names = [n for n, m in named_input_modules(model).items() if id(m) in inside]
    if targets is not None:
        names = [n for n in names if n.rsplit(".", 1)[-1] in set(targets)]
    if trainable_only:
        modules = named_input_modules(model)
        names = [n for n in names if is_lora_layer(modules[n]) or modules[n].weight.requires_grad]
    if not names:
        which = "trainable linear module" if trainable_only else "linear module"
        raise InputSubspacesError(f"no {which} after the first decoder layer matches targets {targets!r}; wrap the "
                                  "model with LoRA (or unfreeze its weights), or name other targets")
    return names


def extract_template_subspaces(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, k: int = 16,
                               targets: Sequence[str] | None = None, trainable_only: bool = False,
                               batch_size: int = 8, prompt_set: str | None = "template",
                               **kwargs: Any) -> InputSubspaces:
    """V_m of the template-reader constraint: ``extract_input_subspaces`` at ``TEMPLATE_POSITIONS`` (the base
    model's greedy first reply token) over ``template_reader_modules(model, targets)``, uncentred PCA.

    Args:
        model: the base causal LM (a PEFT model is read with its adapter disabled).
        tokenizer: its tokenizer; it must have a chat template.
        prompts: user messages — orthoreg's built-in harmless requests (``load_builtin("train").harmless``) are what
            the benchmark supports; the fine-tune's own prompts protected worst there.
        k (`int`, *optional*, defaults to `16`): directions per module.
        targets (`Sequence[str]`, *optional*): module name suffixes to keep (the LoRA ``target_modules``).
        trainable_only (`bool`, *optional*, defaults to `False`): keep only modules that train (LoRA-adapted, or
            with a weight that requires grad).
        kwargs: passed on to ``extract_input_subspaces`` (``replies``, ``reply_tokens``, ``progress``, …).

    Example:
        >>> v = extract_template_subspaces(base, tokenizer, load_builtin("train").harmless)
        >>> trainer = Trainer(..., callbacks=[OrthoRegCallback(OrthoRegConfig.recommended(), input_subspaces=v)])

        (``OrthoRegCallback(OrthoRegConfig.recommended())`` alone records these V_m itself when training starts.)
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InputSubspacesError("the template-reader constraint reads the chat template's tokens: this tokenizer has "
                                  "no chat template (set tokenizer.chat_template, or use extract_input_subspaces)")
    modules = template_reader_modules(model, targets, trainable_only)
    return extract_input_subspaces(model, tokenizer, prompts, modules=modules, k=k,
                                   positions=TEMPLATE_POSITIONS, method="pca", batch_size=batch_size,
                                   prompt_set=prompt_set, **kwargs)
