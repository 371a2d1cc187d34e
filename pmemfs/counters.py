"""Event counters: a row of int64 per serving process, summed when read.

Protocol: process ``c`` adds to row ``c`` only (no lock, no atomic: a row has one writer); a
reader sums the rows and may see one process's update a moment late, never a torn one (aligned
8-byte stores). Counters only grow; what is open now is a difference of two of them.
"""

from __future__ import annotations

from .shared import COUNTER_SLOTS, SharedState

# The registry's counters, named as /proc/vmstat names them where it has them, then the I/O path's.
REGISTRY_COUNTERS = (
    "nr_foll_pin_acquired",
    "nr_foll_pin_released",
    "nr_get_page",
    "nr_put_page",
    "nr_unbalanced",
    "nr_refused",
)
IO_COUNTERS = (
    "reads",
    "writes",
    "read_bytes",
    "write_bytes",
    "direct_reads",
    "direct_writes",
    "fsyncs",
    "errors",
    "internal_errors",
)
# Opens and releases of pmem0/dax0, counted where they land: the difference is what is open now.
HANDLE_COUNTERS = ("data_opens", "data_releases")
COUNTERS = REGISTRY_COUNTERS + IO_COUNTERS + HANDLE_COUNTERS
COUNTER = {name: i for i, name in enumerate(COUNTERS)}
assert len(COUNTERS) <= COUNTER_SLOTS


class Counters:
    def __init__(self, shared: SharedState) -> None:
        self._rows = shared.array("counters")

    def row(self, column: int) -> memoryview:
        """Column ``column``'s counters, indexed by ``COUNTER[name]``: only that process writes them."""
        return self._rows[column].data.cast("B").cast("q")

    def totals(self) -> dict[str, int]:
        totals = self._rows.sum(axis=0)
        return {name: int(totals[i]) for i, name in enumerate(COUNTERS)}

    def open_data_files(self) -> int:
        """pmem0/dax0 handles open now, over all serving processes (a mapping holds one until unmapped)."""
        totals = self.totals()
        return totals["data_opens"] - totals["data_releases"]

    def statistics(self) -> dict[str, int]:
        return self.totals()
