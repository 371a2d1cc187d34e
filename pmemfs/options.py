"""The serving options' defaults and bounds, as the CLI offers them.

Kept apart from serving.py (which loads pyfuse3 and trio) so that the CLI starts fast.
"""

from __future__ import annotations

import os

from .limits import MAX_WORKERS

DEFAULT_SPIN_US = 50
MAX_SPIN_US = 10_000  # beyond this a "spin" is a busy daemon, not a saved wake-up


def default_workers() -> int:
    """What measured fastest: one serving process per CPU (the parent only supervises)."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))
