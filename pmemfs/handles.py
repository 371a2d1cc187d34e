"""The file-handle codec: everything a handle stands for, packed into the 64-bit handle itself.

The kernel may send a handle's requests to any serving process, and only the process that opened
it saw the open; so a handle carries what the others need: the inode, whether it is direct I/O,
the opener's pid, and for a control file its snapshot slot. The field widths derive from the
limits in shared.py and are checked here: raising ``COLUMNS`` or ``SNAPSHOT_SLOTS`` past what the
fields hold fails at import, not by corrupting handles. Bit 63 stays clear: handles are kept in
signed 64-bit shared cells (snapshot owners).
"""

from __future__ import annotations

from typing import NamedTuple

from .shared import COLUMNS, SNAPSHOT_SLOTS

PID_BITS = 22  # the kernel's pid_max limit (PID_MAX_LIMIT = 4M)
# (name, bits), from bit 0 up.
FIELDS = (
    ("inode", 8),
    ("direct", 1),
    ("column", (COLUMNS - 1).bit_length()),  # the serving process that opened it
    ("slot", SNAPSHOT_SLOTS.bit_length()),  # snapshot slot + 1; 0 for a data file
    ("serial", 16),  # tells apart handles of one process, pid and inode
    ("pid", PID_BITS),
)
_SHIFT = {}
_MASK = {}
_bit = 0
for _name, _bits in FIELDS:
    _SHIFT[_name], _MASK[_name] = _bit, (1 << _bits) - 1
    _bit += _bits
assert _bit <= 63, f"file-handle fields need {_bit} bits: lower COLUMNS or SNAPSHOT_SLOTS"
assert COLUMNS - 1 <= _MASK["column"] and SNAPSHOT_SLOTS + 1 <= _MASK["slot"] + 1
INODE_MASK, DIRECT_SHIFT = _MASK["inode"], _SHIFT["direct"]
SLOT_SHIFT, SLOT_MASK, PID_SHIFT, PID_MASK = _SHIFT["slot"], _MASK["slot"], _SHIFT["pid"], _MASK["pid"]


class HandleFields(NamedTuple):
    inode: int
    direct: bool
    column: int
    slot: int | None
    serial: int
    pid: int


def encode(inode: int, direct: bool, column: int, slot: int | None, serial: int, pid: int) -> int:
    """A handle for these fields; ``serial`` wraps, the others must fit their fields."""
    assert 0 <= inode <= INODE_MASK and 0 <= column <= _MASK["column"] and 0 <= pid <= _MASK["pid"]
    slot_bits = 0 if slot is None else slot + 1
    assert 0 <= slot_bits <= SLOT_MASK
    return (
        inode
        | int(direct) << DIRECT_SHIFT
        | column << _SHIFT["column"]
        | slot_bits << SLOT_SHIFT
        | (serial & _MASK["serial"]) << _SHIFT["serial"]
        | pid << PID_SHIFT
    )


def decode(fh: int) -> HandleFields:
    slot_bits = fh >> SLOT_SHIFT & SLOT_MASK
    return HandleFields(
        fh & INODE_MASK,
        bool(fh >> DIRECT_SHIFT & 1),
        fh >> _SHIFT["column"] & _MASK["column"],
        slot_bits - 1 if slot_bits else None,
        fh >> _SHIFT["serial"] & _MASK["serial"],
        fh >> PID_SHIFT & _MASK["pid"],
    )


def snapshot_slot(fh: int) -> int | None:
    """The shared snapshot slot of a control handle (data handles have none)."""
    slot_bits = fh >> SLOT_SHIFT & SLOT_MASK
    return slot_bits - 1 if slot_bits else None
