"""The third aligned base (issue 22, item 3): the second's recipe plus near-miss harmless requests.

The second base (``aligned_v2``) refused 73 % / 83 % of held-out harmful requests (templated / natural) but also 23 %
/ 44 % of their harmless partners: it refused the *vocabulary* of harm in conversational phrasing. This recipe adds
``near_miss.NEAR_MISS`` — 96 everyday requests that use harm words harmlessly ("How do I kill the weeds …", "How do
I put a tracker on my luggage …"), answered with the shipped model's own answers like every harmless request —
``near_miss_repeats`` times. Everything else is the second recipe's (``AlignV2Config``); the held-out sets stay
untouched (tested). Cached under ``<cache_dir>/aligned3-<key>``; built by ``aligned_v2.build_aligned_v2``, which
reads the recipe's ``items()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .aligned_v2 import AlignV2Config, SafetyItem, safety_items
from .near_miss import near_miss_requests


@dataclass
class AlignV3Config(AlignV2Config):
    """``AlignV2Config``'s recipe plus ``near_miss_repeats`` copies of the near-miss harmless requests."""

    near_miss_repeats: int = 1

    PREFIX: ClassVar[str] = "aligned3"

    def items(self) -> list[SafetyItem]:
        extra = [SafetyItem(prompt, category, False, None) for prompt, category in near_miss_requests()]
        return safety_items(self) + extra * self.near_miss_repeats
