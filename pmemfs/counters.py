"""Event counters: a row of int64 per serving process, summed when read.

Protocol: process ``c`` adds to row ``c`` only (no lock, no atomic: a row has one writer); a
reader sums the rows and may see one process's update a moment late, never a torn one (aligned
8-byte stores). Counters only grow; what is open now is a difference of two of them.
"""

from __future__ import annotations

from .shared import COUNTER_SLOTS, FILES, SharedState

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
# The I/O counters again per data file, for ``pmemfs top``; the pair of each is laid out in FILES
# order, so that the I/O path finds its file's slot by adding the handle's file code (no lookup).
# Only pmem0 does direct I/O, so its buffered share is its total less the direct_* counters.
PER_FILE = ("reads", "writes", "read_bytes", "write_bytes")
DATA_FILES = tuple(name for name in FILES if name)
FILE_IO_COUNTERS = tuple(f"{file}_{what}" for what in PER_FILE for file in DATA_FILES) + (
    "direct_read_bytes",
    "direct_write_bytes",
)
# The totals over both files are sums of the per-file counters, made when read: the I/O path
# counts a request once, in its file's slots.
DERIVED = {what: tuple(f"{file}_{what}" for file in DATA_FILES) for what in PER_FILE}
COUNTERS = REGISTRY_COUNTERS + tuple(n for n in IO_COUNTERS if n not in DERIVED) + HANDLE_COUNTERS + FILE_IO_COUNTERS
COUNTER = {name: i for i, name in enumerate(COUNTERS)}
assert len(COUNTERS) <= COUNTER_SLOTS


def file_slot_base(what: str) -> int:
    """The slot that the file code (FILES.index(name)) is added to for that file's ``what`` counter."""
    base = COUNTER[f"{DATA_FILES[0]}_{what}"] - FILES.index(DATA_FILES[0])
    assert all(COUNTER[f"{file}_{what}"] == base + FILES.index(file) for file in DATA_FILES)
    return base


class Counters:
    def __init__(self, shared: SharedState) -> None:
        self._rows = shared.array("counters")

    def row(self, column: int) -> memoryview:
        """Column ``column``'s counters, indexed by ``COUNTER[name]``: only that process writes them."""
        return self._rows[column].data.cast("B").cast("q")

    def totals(self) -> dict[str, int]:
        sums = self._rows.sum(axis=0)
        totals = {name: int(sums[i]) for i, name in enumerate(COUNTERS)}
        totals.update({what: sum(totals[name] for name in per_file) for what, per_file in DERIVED.items()})
        return totals

    def open_data_files(self) -> int:
        """pmem0/dax0 handles open now, over all serving processes (a mapping holds one until unmapped)."""
        totals = self.totals()
        return totals["data_opens"] - totals["data_releases"]

    def statistics(self) -> dict[str, int]:
        return self.totals()


# What the I/O path counts for every request, in the order transfer.Transfers takes them.
IO_PATH_SLOTS = (
    *(file_slot_base(what) for what in PER_FILE),
    *(COUNTER[name] for name in ("direct_reads", "direct_writes", "direct_read_bytes", "direct_write_bytes")),
)
