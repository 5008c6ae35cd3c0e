"""Interleaving: aligned examples mixed into the task data."""

from __future__ import annotations

import random

__all__ = ["interleave"]


def interleave(task_dataset, aligned_dataset, fraction: float, seed: int = 0, replacement: bool = False):
    r"""Mixes aligned examples into the task data (the "interleaving" defence), deterministically.

    The result holds every task example plus :math:`n_a = \mathrm{round}\big(n_{task} \cdot f / (1 - f)\big)`
    aligned examples, so that a fraction ``f`` of it is aligned data, in an order shuffled by ``seed``. The aligned
    examples are drawn without replacement (``replacement=True`` allows repeats when the aligned set is smaller).

    Args:
        task_dataset (`datasets.Dataset` or a sequence of examples): the narrow task.
        aligned_dataset (`datasets.Dataset` or a sequence of examples): aligned examples in the same format.
        fraction (`float`): f, in [0, 1).
        seed (`int`, *optional*, defaults to `0`): draws the aligned examples and the order.
        replacement (`bool`, *optional*, defaults to `False`).

    Returns:
        A ``datasets.Dataset`` when ``task_dataset`` is one (columns must match), otherwise a list.

    Example:
        >>> mixed = interleave(task, aligned, fraction=0.1, seed=0)  # 10% aligned
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"`fraction` is the share of aligned examples in the result, in [0, 1); got {fraction!r}")
    n_task = len(task_dataset)
    n_aligned = round(n_task * fraction / (1 - fraction))
    if n_aligned > 0 and len(aligned_dataset) == 0:
        raise ValueError("`aligned_dataset` is empty; nothing to interleave")
    if n_aligned > len(aligned_dataset) and not replacement:
        raise ValueError(
            f"interleaving {fraction:.0%} aligned data into {n_task} task examples needs {n_aligned} aligned "
            f"examples but `aligned_dataset` has {len(aligned_dataset)}; lower `fraction`, add aligned data, or pass "
            "replacement=True to repeat examples"
        )
    rng = random.Random(seed)
    if replacement:
        picks = [rng.randrange(len(aligned_dataset)) for _ in range(n_aligned)]
    else:
        picks = rng.sample(range(len(aligned_dataset)), n_aligned)
    order = list(range(n_task + n_aligned))
    rng.shuffle(order)

    try:
        from datasets import Dataset, concatenate_datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        Dataset = None
    if Dataset is not None and isinstance(task_dataset, Dataset):
        aligned = aligned_dataset
        if not isinstance(aligned, Dataset):
            aligned = Dataset.from_list([dict(aligned[i]) for i in range(len(aligned))])
        if set(aligned.column_names) != set(task_dataset.column_names):
            raise ValueError(
                f"task and aligned datasets have different columns ({sorted(task_dataset.column_names)} vs "
                f"{sorted(aligned.column_names)}); format both the same way before interleaving"
            )
        aligned = aligned.select_columns(task_dataset.column_names).select(picks)
        aligned = aligned.cast(task_dataset.features) if aligned.features != task_dataset.features else aligned
        return concatenate_datasets([task_dataset, aligned]).select(order)
    examples = [task_dataset[i] for i in range(n_task)] + [aligned_dataset[i] for i in picks]
    return [examples[i] for i in order]
