"""The device reference (dev_pagemap's percpu_ref) and the opens hold: how a device goes away.

**The device reference.** While it is live, new pins are allowed. ``kill`` (an unmount's
teardown, or a session's ``kill``) records the killer, clears ``device_alive`` and then sets its
byte of the I/O gate, under ``Lock.FLAGS``, then runs membarrier: a pin stores its reference
first and reads the gate after, so the teardown sees the pin, or the pin sees the kill and is
refused (``refuse_if_dead``: the reference undone, ENXIO). Only the session that killed it
revives it (another session reviving in the middle of an unmount's drain would let new pins in
under the teardown); closing that session revives it, so a killer that dies leaves nothing dead.

**The opens hold.** An unmount must know that no data file is open before it kills the reference,
so that no transfer ever sees the kill. An open counts itself and then looks at the hold; the
unmount holds opens, runs membarrier, then counts open handles: it sees the open (and backs off:
EBUSY), or the open sees the hold and waits ``OPEN_WAIT_S`` for the unmount to go on (ENXIO, as a
removed disk's opens fail) or back off. No longer: a serving process waiting here serves nothing
else, and with one serving process the unmount's own requests would wait behind it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from . import membarrier
from .errors import DeviceGone, PageBusy
from .gates import IoGate
from .shared import Lock, SharedState, cell_word

OPEN_WAIT_S = 0.02
OPEN_POLL_S = 0.001


class DeviceReference:
    def __init__(self, shared: SharedState, io_gate: IoGate) -> None:
        self._words = shared.words
        self._alive = cell_word("device_alive")
        self._killer = cell_word("device_killer")
        self._dead = io_gate.condition("gate_device_dead")
        self._lock = shared.lock(Lock.FLAGS)

    @property
    def alive(self) -> bool:
        return bool(self._words[self._alive])

    def kill(self, session: int = 0) -> None:
        with self._lock:
            # The killer first: a process that sees the reference dead must find who killed it.
            self._words[self._killer] = session
            self._words[self._alive] = 0
            self._dead.set(True)  # last: a transfer that sees the gate finds the rest set
        membarrier.barrier()  # a transfer's reference, or its sight of the gate: never neither

    def revive(self, killer: int | None = None) -> bool:
        """Make the reference live again; with ``killer``, only if that session killed it. Return
        whether it is alive now."""
        with self._lock:
            if self.alive:
                return True
            if killer is not None and self._words[self._killer] != killer:
                return False
            self._words[self._killer] = 0
            self._words[self._alive] = 1
            self._dead.set(False)
        return True

    def refuse_if_dead(self, undo: Callable[[], None]) -> None:
        """For a pin that has stored its reference: if the device is dead, ``undo`` it and raise."""
        if not self._words[self._alive]:
            undo()
            raise DeviceGone("the device is being torn down: no new pins")

    def statistics(self) -> dict[str, object]:
        return {"alive": self.alive, "killer_session": self._words[self._killer]}


class OpensHold:
    def __init__(self, shared: SharedState, device: DeviceReference, open_handles: Callable[[], int]) -> None:
        self._words = shared.words
        self._held = cell_word("opens_held")
        self._lock = shared.lock(Lock.FLAGS)
        self._device = device
        self._open_handles = open_handles

    def hold(self, session: int) -> None:
        """Hold new opens of pmem0/dax0 back; PageBusy (EBUSY, and opens let go again) if any is open."""
        with self._lock:
            self._words[self._held] = session
        membarrier.barrier()
        still_open = self._open_handles()
        if still_open:
            self.release(session)
            raise PageBusy(f"{still_open} pmem0/dax0 handle(s) open")

    def release(self, session: int | None = None) -> None:
        """Let opens go on again; with ``session``, only if that session held them."""
        with self._lock:
            if session is None or self._words[self._held] == session:
                self._words[self._held] = 0

    def may_open(self) -> bool:
        """For an open of a data file, counted already: whether it may go on (see the module doc)."""
        words, held, device = self._words, self._held, self._device
        deadline = time.monotonic() + OPEN_WAIT_S
        while words[held] or not device.alive:
            if time.monotonic() > deadline:
                return False
            time.sleep(OPEN_POLL_S)
        return True

    def statistics(self) -> dict[str, int]:
        return {"held_by_session": self._words[self._held], "open_handles": self._open_handles()}
