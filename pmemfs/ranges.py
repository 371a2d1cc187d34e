"""Runs of consecutive indices, the unit in which pmemfs hands page ranges to the kernel and to users."""

from __future__ import annotations

import numpy as np


def runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive values in a sorted index array."""
    if not len(indices):
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts, ends = indices[np.r_[0, breaks]], indices[np.r_[breaks - 1, len(indices) - 1]] + 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))
