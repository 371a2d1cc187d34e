"""Sizes as people write them: '1G', '512M', '3G+4K' (binary suffixes), and back.

Kept apart from infoblock.py (which loads numpy) so that the CLI starts fast.
"""

from __future__ import annotations


def parse_size(text: str) -> int:
    """Parse '1G', '512M', '4096', '3G+4K' style sizes (binary suffixes)."""
    total = 0
    for part in text.strip().split("+"):
        part = part.strip().upper().removesuffix("IB").removesuffix("B")
        if not part:
            raise ValueError(f"bad size {text!r}")
        shift = {"K": 10, "M": 20, "G": 30, "T": 40}.get(part[-1], 0)
        digits = part[:-1] if shift else part
        if not digits.isdigit():
            raise ValueError(f"bad size {text!r}: use a number with an optional K, M, G or T suffix")
        total += int(digits) << shift
    return total


def format_size(size_bytes: int) -> str:
    for suffix, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size_bytes and size_bytes % (1 << shift) == 0:
            return f"{size_bytes >> shift}{suffix}"
    return str(size_bytes)
