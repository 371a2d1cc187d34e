"""A bit a page: ranges set and tested over a numpy byte array (page p is bit p % 8 of byte p // 8).

Only the bytes a range touches are read or written, and the array comes from calloc, so a bitmap
for a huge image costs memory only where it is used.
"""

from __future__ import annotations

import numpy as np


def new_bitmap(npages: int) -> np.ndarray:
    return np.zeros(-(-npages // 8), dtype=np.uint8)


def set_range(bits: np.ndarray, first: int, last: int) -> None:
    """Set the bits of pages first..last (inclusive)."""
    lo, hi = first >> 3, last >> 3
    if lo == hi:
        bits[lo] |= ((1 << (last - first + 1)) - 1) << (first & 7)
        return
    bits[lo] |= (0xFF << (first & 7)) & 0xFF
    bits[lo + 1 : hi] = 0xFF
    bits[hi] |= (1 << ((last & 7) + 1)) - 1


def all_set(bits: np.ndarray, first: int, last: int) -> bool:
    """Whether the bits of pages first..last (inclusive) are all set."""
    lo, hi = first >> 3, last >> 3
    if lo == hi:
        mask = ((1 << (last - first + 1)) - 1) << (first & 7)
        return int(bits[lo]) & mask == mask
    head, tail = (0xFF << (first & 7)) & 0xFF, (1 << ((last & 7) + 1)) - 1
    return int(bits[lo]) & head == head and int(bits[hi]) & tail == tail and bool((bits[lo + 1 : hi] == 0xFF).all())
