r"""The known defences against safety drift, as plain ``transformers.TrainerCallback``\ s in orthoreg's harness.

So that the benchmarks compare them with orthoreg side by side — same Trainer, same data, same logging — every
baseline here is a callback that plugs into ``Trainer``, TRL's ``SFTTrainer``/``DPOTrainer`` or the testbed's
``finetune(callbacks=...)`` unchanged, and reuses orthoreg's hook machinery (``orthoreg.core.capture``,
``orthoreg.engine.regularizer``):

- ``KLToBaseCallback`` (``kl``): :math:`\lambda\,\mathrm{mean}_t\,\mathrm{KL}(\pi_\theta\|\pi_{ref})`, entering
  through a gradient hook on the LM's output logits;
- ``LDIFSCallback`` (``ldifs``): :math:`\lambda \sum_\ell \mathrm{mean}_t \|h_\ell - h_\ell^{ref}\|^2`, injected at the
  decoder-stack output by ``OrthoRegularizer``'s engine;
- ``CAFTCallback`` (``caft``): :math:`h_\ell \leftarrow h_\ell - (h_\ell U_\ell^\top) U_\ell` at the guarded layers' outputs, in
  training forwards only;
- ``FirstTokenKLCallback`` (``first_token``): Qi et al.'s first-token constraint, a token-weighted KL to the base
  on the first reply tokens, most weight on the first;
- ``HardProjectionCallback`` (``hard_projection``): GuardSpace-style, LoRA's A projected off each module's input
  subspace V_m after every optimizer step (A Vᵀ = 0);
- ``TReFTCallback`` (``treft``): Zhao et al.'s TReFT, :math:`\lambda\,\mathrm{mean}_\ell\,\mathrm{mean}_t
  (\|k-k_0\|^2/\|k_0\|^2 + \|v-v_0\|^2/\|v_0\|^2)` on the chat template's prefix (or postfix / query) positions,
  injected at the ``k_proj``/``v_proj`` outputs;
- ``AnchorKLCallback`` (``anchor_kl``): the anchor KL of ``orthoreg.anchor`` on its own — KL to the base on its
  own first reply tokens to *anchor* prompts the fine-tune never trains on (here by default the built-in harmful
  requests; ``OrthoRegConfig.recommended()`` runs it on the harmless ones inside ``OrthoRegCallback``);
- ``interleave`` (``mixing``): aligned examples mixed into the task data;
- ``EarlyStoppingOnMetric`` (``stopping``): stop once a logged/evaluated metric crosses a threshold.

The reference policy / features (:math:`\pi_{ref}`, :math:`h^{ref}`) come from the *same* PEFT model with its
adapter disabled (no extra weights), or from a frozen ``reference_model`` copy for full fine-tuning.

Like orthoreg's own penalties, each micro-batch's term is divided by the micro-batches of its optimizer step
(``gradient_accumulation_steps``, fewer in an epoch's uneven last step; scaled like the task loss), so the weight
per optimizer step does not depend on the number of micro-batches. The gradients skip fp16 loss scaling, so fp16
with a GradScaler is refused (use bf16 or fp32).

**Early stopping.** The benchmarks evaluate the early-stopping defence from the plain run's own trajectory (its
checkpoints / evaluations at several steps, at matched narrow-task accuracy): that costs no extra training and
gives every stopping point at once. For a single run that should stop by itself (recipes), use
``EarlyStoppingOnMetric``.

**Composition.** The benchmarks run one defence per arm. ``KLToBaseCallback`` composes with ``OrthoRegCallback`` (its
reference forward runs after orthoreg's session has closed; tested). ``LDIFSCallback`` runs on ``OrthoRegularizer``'s
engine and, like two ``OrthoRegCallback``\ s with ``anchor="paired"``, must not share a model with another regulariser
whose reference forward runs the same decoder stack (each would capture the other's reference activations). A
layer guarded by both ``CAFTCallback`` and orthoreg sees the ablated or the raw output depending on hook order:
guard different layers.

One module per baseline family; ``common`` holds the shared argument checks and callback lifecycle. Every public name
is re-exported here, so ``from orthoreg.baselines import X`` works for all of them.
"""

from __future__ import annotations

from ..anchor import AnchorKLError, greedy_replies
from .anchor_kl import AnchorKLCallback
from .caft import CAFTCallback, ConceptAblation
from .first_token import FirstTokenKLCallback, FirstTokenKLRegularizer, first_token_weights
from .hard_projection import HardProjectionCallback, InputNullSpaceProjection
from .kl import KLToBaseCallback, KLToBaseRegularizer, kl_to_reference
from .ldifs import LDIFSCallback, LDIFSRegularizer, feature_distance
from .mixing import interleave
from .stopping import EarlyStoppingOnMetric
from .treft import TReFTCallback, TReFTRegularizer, template_positions, template_token_ids

__all__ = [
    "AnchorKLCallback",
    "AnchorKLError",
    "CAFTCallback",
    "ConceptAblation",
    "EarlyStoppingOnMetric",
    "FirstTokenKLCallback",
    "FirstTokenKLRegularizer",
    "HardProjectionCallback",
    "InputNullSpaceProjection",
    "KLToBaseCallback",
    "KLToBaseRegularizer",
    "LDIFSCallback",
    "LDIFSRegularizer",
    "TReFTCallback",
    "TReFTRegularizer",
    "feature_distance",
    "first_token_weights",
    "greedy_replies",
    "interleave",
    "kl_to_reference",
    "template_positions",
    "template_token_ids",
]
