"""The holder table: who holds each reference taken for a client, in every serving process.

Protocol: process ``c`` fills and empties slots of row ``c`` only; a slot's ``in_use`` byte is
written last when it is filled (readers in other processes skip it until it is whole) and first
when it is emptied. Any process may drop a holder another took (a session's pins are dropped by
whichever process gets its release): it clears ``in_use`` in the other row, the one store to a
row by a process that does not own it, which a byte store makes safe. Holder ids are
column * ``ID_SPAN`` + a per-process count, so they never collide across processes. A process
that dies leaves its holders listed until the daemon ends.
"""

from __future__ import annotations

import bisect
import enum
import errno
import itertools
import time
from typing import NamedTuple

import numpy as np

from .errors import PmemfsError
from .shared import FILES, HOLDER_SLOTS, SharedState

ID_SPAN = 1_000_000_000  # ids per serving process


class Kind(enum.Enum):
    GET = "get"  # get_page: buffered page-cache fills and writebacks
    PIN = "pin"  # pin_user_pages (FOLL_PIN): a direct-I/O transfer, or a short-term session pin
    LONGTERM = "longterm"  # FOLL_PIN | FOLL_LONGTERM: an RDMA-style registration

    @property
    def code(self) -> int:
        return KIND_CODES[self]


KIND_CODES = {Kind.GET: 1, Kind.PIN: 2, Kind.LONGTERM: 3}
KINDS = {code: kind for kind, code in KIND_CODES.items()}


class Holder(NamedTuple):
    """Who holds a reference: the process that opened the file, the file, the range, the kind, since when."""

    id: int
    pid: int
    file: str
    pfn: int
    npages: int
    kind: Kind
    since_ns: int

    def as_dict(self, now_ns: int | None = None) -> dict[str, object]:
        now_ns = now_ns or time.time_ns()
        return {
            "id": self.id,
            "pid": self.pid,
            "file": self.file,
            "pfn": self.pfn,
            "npages": self.npages,
            "offset": self.pfn * 4096,
            "length": self.npages * 4096,
            "kind": self.kind.value,
            "age_s": round((now_ns - self.since_ns) / 1e9, 3),
        }


class HolderTable:
    def __init__(self, shared: SharedState, column: int = 0) -> None:
        self._table = shared.array("holders")
        self.set_column(column)

    def set_column(self, column: int) -> None:
        self._own = self._table[column]
        self._ids = itertools.count(column * ID_SPAN + 1)

    def free_slot(self) -> int:
        """A free slot of this process's row (PmemfsError ENOMEM when there is none): look before
        taking the reference, so that a full table refuses without touching refcounts."""
        free = np.flatnonzero(self._own["in_use"] == 0)
        if not len(free):
            raise PmemfsError(f"this serving process holds {HOLDER_SLOTS} references already", errno=errno.ENOMEM)
        return int(free[0])

    def add(self, slot_index: int, kind: Kind, pid: int, file: str, pfn: int, npages: int, session: int) -> Holder:
        holder = Holder(next(self._ids), pid, file, pfn, npages, kind, time.time_ns())
        slot = self._own[slot_index]
        slot["kind"], slot["file"], slot["pid"], slot["session"] = kind.code, FILES.index(file), pid, session
        slot["id"], slot["pfn"], slot["npages"], slot["since_ns"] = holder.id, pfn, npages, holder.since_ns
        slot["in_use"] = 1
        return holder

    def remove(self, holder_id: int) -> bool:
        """Forget holder ``holder_id``, whichever process added it; False if nobody holds it."""
        where = np.argwhere((self._table["in_use"] == 1) & (self._table["id"] == holder_id))
        if not len(where):
            return False
        self._table["in_use"][tuple(where[0])] = 0
        return True

    def holders(self, *, session: int | None = None) -> list[Holder]:
        table = self._table
        mask = table["in_use"] == 1
        if session is not None:
            mask &= table["session"] == session
        return [
            Holder(int(r["id"]), int(r["pid"]), FILES[r["file"]], int(r["pfn"]), int(r["npages"]),
                   KINDS[int(r["kind"])], int(r["since_ns"]))
            for r in table[mask]
        ]  # fmt: skip

    def statistics(self) -> dict[str, int]:
        return {"holders": int(np.count_nonzero(self._table["in_use"] == 1)), "slots_per_process": HOLDER_SLOTS}


def holders_by_range(ranges: list[dict[str, int]], holders: list[Holder]) -> list[list[int]]:
    """For each referenced range (disjoint, sorted), the indices of the holders overlapping it:
    O(H log R + the answer), not a scan of every holder for every range."""
    starts = [r["pfn"] for r in ranges]
    found: list[list[int]] = [[] for _ in ranges]
    for index, holder in enumerate(holders):
        end = holder.pfn + holder.npages
        i = max(bisect.bisect_right(starts, holder.pfn) - 1, 0)
        while i < len(ranges) and starts[i] < end:
            if holder.pfn < starts[i] + ranges[i]["npages"]:
                found[i].append(index)
            i += 1
    return found
