"""The trace: a ring of events per serving process, merged by time when read; and the switch that
makes every I/O transfer an event.

Protocol: process ``c`` writes ring ``c`` only: the record, then its sequence number in
``trace_heads[c]``; a reader copies all rings at once and sorts by time, so a record being
overwritten at that moment may show half old, half new (a trace, not a ledger). Every I/O
transfer is traced only while a session asks for it (``pmemfs trace --io``): a record costs a
third of the registry's work per request. The switch is the session's id in ``trace_io`` and a
byte of the I/O gate, changed together under ``Lock.FLAGS``; a session that closes turns off
what it turned on.
"""

from __future__ import annotations

import itertools
import struct
import time
from typing import NamedTuple

import numpy as np

from .gates import IoGate
from .shared import FILES, TRACE_DTYPE, TRACE_EVENTS, TRACE_NOTE, Lock, SharedState, cell_word

WHATS = (
    "",
    "get",
    "put",
    "pin",
    "unpin",
    "refused",
    "teardown",
    "revive",
    "reset",
    "session",
    "zero",
    "inject",
    "uninject",
)
WHAT_GET, WHAT_PUT, WHAT_PIN, WHAT_UNPIN = (WHATS.index(w) for w in ("get", "put", "pin", "unpin"))
_RECORD = struct.Struct(f"<QQiBBxxQQ{TRACE_NOTE}s")
assert _RECORD.size == TRACE_DTYPE.itemsize


class Event(NamedTuple):
    column: int
    seq: int
    time_ns: int
    what: str
    pid: int
    file: str
    pfn: int
    npages: int
    note: str = ""

    def line(self) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.time_ns / 1e9)) + f".{self.time_ns % 10**9 // 1000:06d}"
        where = f" {self.file} pfn {self.pfn}+{self.npages}" if self.npages else ""
        return (
            f"{self.column}:{self.seq} {stamp} {self.what} pid {self.pid}{where}{' ' + self.note if self.note else ''}"
        )


class TraceRing:
    def __init__(self, shared: SharedState, column: int = 0) -> None:
        self._rings = shared.array("trace")
        self._heads = shared.array("trace_heads")
        # Byte view for the hot path: struct.pack_into a memoryview costs a fraction of numpy's item set.
        self._bytes = self._rings.reshape(-1).view(np.uint8).data
        self.set_column(column)

    def set_column(self, column: int) -> None:
        self.column = column
        self._base = column * TRACE_EVENTS
        self._seq = itertools.count(int(self._heads[column]) + 1)

    def trace(self, what: str, pid: int, file: str, pfn: int, npages: int, note: str = "") -> None:
        self.record(time.time_ns(), WHATS.index(what), pid, FILES.index(file), pfn, npages, note.encode()[:TRACE_NOTE])

    def record(self, now_ns: int, what: int, pid: int, file: int, pfn: int, npages: int, note: bytes = b"") -> None:
        seq = next(self._seq)
        _RECORD.pack_into(
            self._bytes, (self._base + seq % TRACE_EVENTS) * _RECORD.size,
            now_ns, seq, pid, what, file, pfn, npages, note,
        )  # fmt: skip
        self._heads[self.column] = seq

    def events(self) -> list[Event]:
        # One copy of the rings: other processes go on writing them while we read.
        ring = self._rings.copy()
        written = ring["seq"] > 0
        rows, columns = ring[written], np.nonzero(written)[0]
        events = [
            Event(int(c), int(r["seq"]), int(r["time_ns"]), WHATS[r["what"]], int(r["pid"]), FILES[r["file"]],
                  int(r["pfn"]), int(r["npages"]), r["note"].decode(errors="replace"))
            for c, r in zip(columns, rows, strict=True)
        ]  # fmt: skip
        return sorted(events, key=lambda e: (e.time_ns, e.column, e.seq))

    def statistics(self) -> dict[str, int]:
        return {"events_written": int(self._heads.sum()), "events_per_process": TRACE_EVENTS}


class IoTraceSwitch:
    def __init__(self, shared: SharedState, io_gate: IoGate) -> None:
        self.words = shared.words
        self.word = cell_word("trace_io")
        self._gate = io_gate.condition("gate_tracing_io")
        self._lock = shared.lock(Lock.FLAGS)

    def set(self, session: int, on: bool) -> None:
        """Trace every transfer for ``session`` (on), or stop if ``session`` turned it on (off)."""
        with self._lock:
            if on:
                self.words[self.word] = session
                self._gate.set(True)
            elif self.words[self.word] == session:
                self.words[self.word] = 0
                self._gate.set(False)

    @property
    def on(self) -> bool:
        return bool(self.words[self.word])

    def statistics(self) -> dict[str, int]:
        return {"session": self.words[self.word]}
