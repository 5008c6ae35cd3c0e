"""What the two-rank monitor run and its single-process reference share: model, directions, batches, schedule."""

from __future__ import annotations

import torch

from orthoreg import HarmfulDirections
from tests.models import tiny_model

# Per step, per rank: the seeds of the micro-batches that rank forwards (step 0 is the calibration).
MICRO_BATCHES = [
    [[0], [1]],
    [[2, 3], [4, 5]],
    [[6], []],
]


def model() -> torch.nn.Module:
    return tiny_model("llama", seed=0)


def directions() -> HarmfulDirections:
    g = torch.Generator().manual_seed(0)
    return HarmfulDirections({i: torch.randn(2, 32, generator=g) for i in (1, 2)})


def batch(seed: int, n: int = 3, T: int = 7) -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths (so ranks hold different token counts), prompt labels -100."""
    g = torch.Generator().manual_seed(100 + seed)
    ids = torch.randint(3, 99, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[-1, T - 1 - seed % 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
