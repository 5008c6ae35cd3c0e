"""The reader-side weight term: keep an update from changing how each adapted linear module m reads a subspace
span(V_m) of its inputs.

One module a role:

- ``subspaces``: ``InputSubspaces``, the V_m container (module names, widths, files, Hub);
- ``extraction``: recording V_m from a base model's inputs at chosen prompts and token positions;
- ``template``: the template-reader setting (V_m from the chat template's post-instruction and first-reply positions);
- ``penalty``: ``ReaderPenalty``, the hooks that add λ·Σ_m reader(m) to the loss (the formulas: ``orthoreg.terms.reader``);
- ``wiring``: building it from an ``OrthoRegConfig`` for the front doors, and full fine-tuning's W₀V_mᵀ in a checkpoint.

Never imports ``orthoreg.lora``: the PEFT layer facts both wings need are in ``orthoreg.core.layers``.
"""

from .extraction import METHODS, extract_input_subspaces
from .penalty import NonFiniteReaderPenaltyError, ReaderModule, ReaderPenalty
from .positions import POSITIONS, token_positions
from .subspaces import InputSubspaces, InputSubspacesError, canonical_module_name, named_input_modules
from .template import TEMPLATE_POSITIONS, TEMPLATE_READER_WEIGHT, extract_template_subspaces, template_reader_modules
from .wiring import READER_BASE_FILE, reader_penalty_for

__all__ = [
    "METHODS",
    "POSITIONS",
    "READER_BASE_FILE",
    "TEMPLATE_POSITIONS",
    "TEMPLATE_READER_WEIGHT",
    "InputSubspaces",
    "InputSubspacesError",
    "NonFiniteReaderPenaltyError",
    "ReaderModule",
    "ReaderPenalty",
    "canonical_module_name",
    "extract_input_subspaces",
    "extract_template_subspaces",
    "named_input_modules",
    "reader_penalty_for",
    "template_reader_modules",
    "token_positions",
]
