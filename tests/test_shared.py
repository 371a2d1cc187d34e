"""The coordination layer's invariants, each checked across forked processes as serving processes
are: the declared layout and what derives from it, the lock, the gate bytes, the device reference,
the opens hold, generations, the holder table, the trace rings, the snapshot slots, the handle
codec and the transfer contract."""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pmemfs import handles
from pmemfs.counters import COUNTER, Counters
from pmemfs.device import DeviceReference, OpensHold
from pmemfs.errors import DeviceGone, PageBusy
from pmemfs.gates import IoGate
from pmemfs.holders import ID_SPAN, HolderTable, Kind
from pmemfs.infoblock import PAGE_SIZE
from pmemfs.limits import COLUMNS, MAX_WORKERS
from pmemfs.options import default_workers
from pmemfs.pages import PageRegistry
from pmemfs.records import RECORD_DTYPE
from pmemfs.shared import CELLS_DTYPE, SNAPSHOT_SLOTS, Lock, SharedState
from pmemfs.snapshots import SnapshotSlots
from pmemfs.trace import TraceRing


def in_children(*works: Callable[[], object], timeout_s: float = 30.0) -> list[int]:
    """Run each ``work`` in its own forked process, all at once; return their exit codes (0: it
    returned, 1: it raised)."""
    pids = []
    for work in works:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                work()
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    deadline = time.monotonic() + timeout_s
    codes = []
    for pid in pids:
        # A pidfd becomes readable when its process exits: wait for that, up to the deadline.
        pidfd = os.pidfd_open(pid)
        try:
            if not select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                os.kill(pid, signal.SIGKILL)
        finally:
            os.close(pidfd)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    return codes


@pytest.fixture
def shared() -> SharedState:
    return SharedState(record_chunks=64, image_pages=64)


# The layout and what derives from it.
def test_the_layout_is_declared_once_and_everything_sized_by_it_agrees(shared: SharedState) -> None:
    assert MAX_WORKERS == COLUMNS - 1 and 1 <= default_workers() <= MAX_WORKERS
    assert RECORD_DTYPE["refs"].shape == (COLUMNS,) and RECORD_DTYPE.itemsize == 64
    assert shared.array("counters").shape[0] == COLUMNS and shared.array("holders").shape[0] == COLUMNS
    assert shared.array("trace").shape[0] == COLUMNS and shared.array("trace_heads").shape == (COLUMNS,)
    # The gate's condition bytes lie inside the gate's word, and nowhere else does a cell overlap.
    fields = CELLS_DTYPE.fields
    assert fields is not None
    gate = fields["io_gate"][1]
    for name in IoGate.CONDITIONS:
        assert gate <= fields[name][1] < gate + 8
    words = [offset for name, (dtype, offset, *_) in fields.items() if dtype.itemsize == 8]
    assert len(words) == len(set(words))


def test_the_handle_fields_hold_every_column_and_slot() -> None:
    fh = handles.encode(255, True, MAX_WORKERS, SNAPSHOT_SLOTS - 1, 0xFFFF, (1 << handles.PID_BITS) - 1)
    assert fh < 1 << 63  # stored in signed 64-bit shared cells
    assert handles.decode(fh) == (255, True, MAX_WORKERS, SNAPSHOT_SLOTS - 1, 0xFFFF, (1 << handles.PID_BITS) - 1)
    assert handles.decode(handles.encode(3, False, 0, None, 1, 1)).slot is None


@given(
    inode=st.integers(0, 255),
    direct=st.booleans(),
    column=st.integers(0, MAX_WORKERS),
    slot=st.one_of(st.none(), st.integers(0, SNAPSHOT_SLOTS - 1)),
    serial=st.integers(0, 1 << 40),
    pid=st.integers(1, (1 << handles.PID_BITS) - 1),
)
def test_handles_round_trip(inode: int, direct: bool, column: int, slot: int | None, serial: int, pid: int) -> None:
    fh = handles.encode(inode, direct, column, slot, serial, pid)
    assert handles.decode(fh) == (inode, direct, column, slot, serial & 0xFFFF, pid)
    assert handles.snapshot_slot(fh) == slot


# The lock.
def test_the_lock_makes_read_modify_writes_exact_across_processes(shared: SharedState) -> None:
    cell = shared.array("counters")[0]
    lock = shared.lock(Lock.FLAGS)

    def add_many() -> None:
        for _ in range(2000):
            with lock:
                value = int(cell[0])
                cell[0] = value + 1

    assert in_children(add_many, add_many, add_many) == [0, 0, 0]
    assert cell[0] == 6000


def test_a_lock_names_its_holder_and_dies_with_it(shared: SharedState) -> None:
    lock = shared.lock(Lock.ZEROING)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            lock.acquire()
            os.write(ready_w, b"x")
            os.read(go_r, 1)
        finally:
            os._exit(0)  # dies holding it
    os.read(ready_r, 1)
    assert lock.holder_pid() == pid and not lock.try_acquire()
    os.write(go_w, b"x")
    os.waitpid(pid, 0)
    assert lock.holder_pid() is None and lock.try_acquire()
    with pytest.raises(AssertionError):
        lock.acquire()  # not reentrant: an inner unlock would drop the outer hold
    lock.release()


def test_a_child_forked_while_its_parent_holds_a_lock_does_not_hold_it(shared: SharedState) -> None:
    lock = shared.lock(Lock.BACKING)
    with lock:
        assert in_children(lambda: None if not lock.try_acquire() else 1 / 0) == [0]


# The I/O gate.
def test_conditions_changed_at_once_by_two_processes_never_undo_each_other(shared: SharedState) -> None:
    gate = IoGate(shared)

    def toggle(name: str) -> Callable[[], None]:
        def run() -> None:
            condition = gate.condition(name)
            for i in range(20001):
                condition.set(i % 2 == 0)

        return run

    assert in_children(toggle("gate_tracing_io"), toggle("gate_zeroing")) == [0, 0]
    assert gate.statistics() == {"device_dead": False, "tracing_io": True, "zeroing": True}
    gate.condition("gate_tracing_io").set(False)
    assert gate.closed
    gate.condition("gate_zeroing").set(False)
    assert not gate.closed


# The device reference and the opens hold.
def test_a_pin_in_another_process_after_the_kill_is_refused_and_leaves_nothing() -> None:
    registry = PageRegistry(np.zeros(4096, dtype=RECORD_DTYPE), epoch=1)
    registry.kill(session=5)

    def pin() -> None:
        registry.set_column(3)
        with pytest.raises(DeviceGone):
            registry.pin_user_pages(10, 4)
        registry.get_page(11)  # get_page is not refused: only pins are (FOLL_PIN)
        registry.put_page(11)

    assert in_children(pin) == [0]
    assert not registry.refcounts(0, 64).any() and registry.statistics()["nr_refused"] == 1
    assert not registry.revive(killer=6) and not registry.alive  # only the killer revives
    assert registry.revive(killer=5) and not registry.io_gate.closed


def test_the_device_reference_statistics_name_the_killer(shared: SharedState) -> None:
    device = DeviceReference(shared, IoGate(shared))
    assert in_children(lambda: device.kill(session=77)) == [0]
    assert device.statistics() == {"alive": False, "killer_session": 77}


def test_an_open_waits_while_opens_are_held_and_goes_on_when_released(shared: SharedState) -> None:
    counters = Counters(shared)
    hold = OpensHold(shared, DeviceReference(shared, IoGate(shared)), counters.open_data_files)
    hold.hold(session=9)
    assert in_children(lambda: None if not hold.may_open() else 1 / 0) == [0]  # ENXIO for it
    hold.release(session=8)  # not the session that held them: nothing changes
    assert hold.statistics()["held_by_session"] == 9
    hold.release(session=9)
    assert in_children(lambda: None if hold.may_open() else 1 / 0) == [0]
    # With a handle open (counted by another process), the hold is refused and let go.
    assert in_children(lambda: counters.row(2).__setitem__(COUNTER["data_opens"], 1)) == [0]
    with pytest.raises(PageBusy):
        hold.hold(session=9)
    assert hold.statistics() == {"held_by_session": 0, "open_handles": 1}


# Generations.
def test_a_change_in_one_process_is_seen_as_a_change_in_another(shared: SharedState) -> None:
    generation = shared.badblocks_generation
    seen = generation.current()
    assert in_children(lambda: generation.bump()) == [0]
    assert generation.changed(seen) and not generation.changed(generation.current())


# The holder table and the trace rings.
def test_a_holder_taken_in_one_process_is_listed_and_dropped_by_another(shared: SharedState) -> None:
    table = HolderTable(shared)
    r, w = os.pipe()

    def take() -> None:
        table.set_column(4)
        holder = table.add(table.free_slot(), Kind.LONGTERM, 123, "dax0", 7, 3, session=55)
        os.write(w, str(holder.id).encode())

    assert in_children(take) == [0]
    holder_id = int(os.read(r, 64))
    assert holder_id // ID_SPAN == 4
    listed = [(h.id, h.pid, h.file, h.kind) for h in table.holders(session=55)]
    assert listed == [(holder_id, 123, "dax0", Kind.LONGTERM)]
    assert in_children(lambda: None if table.remove(holder_id) else 1 / 0) == [0]
    assert table.holders() == [] and not table.remove(holder_id)


def test_trace_rings_of_several_processes_merge_in_time_order(shared: SharedState) -> None:
    ring = TraceRing(shared)

    def write(column: int) -> Callable[[], None]:
        def run() -> None:
            ring.set_column(column)
            for i in range(50):
                ring.trace("pin", column, "pmem0", i, 1)

        return run

    assert in_children(write(1), write(2)) == [0, 0]
    events = ring.events()
    assert len(events) == 100 and {e.column for e in events} == {1, 2}
    assert [e.time_ns for e in events] == sorted(e.time_ns for e in events)


# The snapshot slots.
def test_snapshot_slots_run_out_with_enfile_and_come_back_when_freed_elsewhere(shared: SharedState) -> None:
    slots = SnapshotSlots(shared)
    taken = [slots.claim() for _ in range(SNAPSHOT_SLOTS)]
    assert None not in taken and slots.claim() is None
    slots.store(taken[0], 42, b"hello")  # type: ignore[arg-type]
    assert in_children(lambda: slots.free(taken[0], 42)) == [0]  # type: ignore[arg-type]
    assert slots.claim() == taken[0]


# The transfer contract.
def test_a_process_holds_one_transfer_at_a_time_and_lists_it() -> None:
    registry = PageRegistry(np.zeros(4096, dtype=RECORD_DTYPE), epoch=1)
    registry.begin_transfer(True, 321, 1, 5 * PAGE_SIZE, 2 * PAGE_SIZE)
    assert [(h.pid, h.pfn, h.npages, h.kind) for h in registry.holders()] == [(321, 5, 2, Kind.PIN)]
    with pytest.raises(AssertionError):
        registry.begin_transfer(False, 321, 1, 0, PAGE_SIZE)
    registry.end_transfer()
    registry.end_transfer()  # nothing in flight: nothing to do
    assert not registry.refcounts(0, 16).any() and registry.holders() == []
