"""Harmful directions U_ℓ: per decoder layer, an orthonormal basis of the residual-stream subspace that separates
harmful from harmless requests.

One module a role:

- ``harmful``: ``HarmfulDirections`` (the container, its file and folder formats, compatibility checks) and
  ``DirectionsOnDevice`` (the float32 per-device copy the hooks read);
- ``extraction``: ``extract_directions`` from paired contrast prompts (diff of means, PCA of differences, class means);
- ``statistics``: the per-layer statistics extraction accumulates, and the held-out separation it reports.
"""

from .extraction import METHODS, POOLINGS, ExtractionError, extract_directions
from .harmful import DirectionsError, DirectionsOnDevice, HarmfulDirections
from .statistics import LayerStats, SeparationStats, subspace_directions

__all__ = [
    "METHODS",
    "POOLINGS",
    "DirectionsError",
    "DirectionsOnDevice",
    "ExtractionError",
    "HarmfulDirections",
    "LayerStats",
    "SeparationStats",
    "extract_directions",
    "subspace_directions",
]
