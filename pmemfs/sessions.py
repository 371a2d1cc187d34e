"""Pin sessions: long-term (and short-term) pins that a client holds through an open ``.pmemfs/pin``.

A session is one open file description. The client writes one command per write():

    pin FILE OFFSET LENGTH [longterm]   pin the pages under the byte range of pmem0 or dax0
    unpin ID                            drop one of this session's pins
    zero OFFSET LENGTH                  bulk-zero a byte range; EBUSY while a page of it is referenced
    mark NAME                           add a named mark to the write log (mount --log-writes)
    inject SECTOR COUNT                 poison 512-byte sectors (ndctl inject-error)
    uninject SECTOR COUNT               forget poisoned sectors without touching the data
    clear-errors                        zero every poisoned sector, clearing the poison
    trace-io on|off                     trace every I/O transfer's get/put/pin/unpin while this session is open
    hold-opens                          hold new opens of pmem0/dax0 back (EBUSY if one is open): unmount
    release-opens                       let them go on
    kill                                kill the device reference (teardown: new pins get ENXIO)
    revive                              revive it, if this session killed it (else EBUSY)

and reads back its pins as ``ID FILE OFFSET LENGTH KIND`` lines. Closing the file, which the
kernel does for a client that dies, drops every pin of the session, and revives a device
reference that this session killed.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os

from .badblocks import BadBlocks
from .errors import InvalidRange, LongtermNotSupported, PageBusy, PmemfsError, SessionCommandError
from .infoblock import PAGE_SIZE, SECTOR_SIZE
from .logwrites import WriteLog
from .pages import Holder, Kind, PageRegistry
from .region import Region

log = logging.getLogger("pmemfs")

# Which views allow FOLL_LONGTERM: devdax does, fsdax does not (Linux refuses it on fsdax).
LONGTERM_ALLOWED = {"pmem0": False, "dax0": True}


@dataclasses.dataclass(frozen=True)
class Session:
    """One open of ``.pmemfs/pin``. Its pins are the registry's holders tagged with its id, so any
    serving process can act for it."""

    id: int
    pid: int


class PinSessions:
    def __init__(
        self, registry: PageRegistry, region: Region, badblocks: BadBlocks, write_log: WriteLog | None = None
    ) -> None:
        self.registry = registry
        self.region = region
        self.badblocks = badblocks
        self.data_size = region.data_size
        self.write_log = write_log
        # A zero (and so clearing poison) reaches the media as a write does: logged when a log is asked.
        # Where a zero's stores and its flush go, as for the tree's writes (fs.py): logged when a log is kept.
        self.media: Region | WriteLog = write_log or region

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length <= 0 or offset + length > self.data_size:
            raise InvalidRange(f"range {offset}+{length} is outside the data area (0-{self.data_size})")

    def open(self, session: Session) -> None:
        self.registry.trace("session", session.pid, "", 0, 0, "opened")

    def command(self, session: Session, text: str) -> None:
        words = text.split()
        if not words:
            raise SessionCommandError("empty command")
        verb, args = words[0], words[1:]
        if verb == "pin" and len(args) in (3, 4):
            if args[3:] not in ([], ["longterm"]):
                raise SessionCommandError(f"unknown pin flag {args[3]!r}")
            self.pin(session, args[0], _number(args[1]), _number(args[2]), longterm=len(args) == 4)
        elif verb == "unpin" and len(args) == 1:
            pin_id = _number(args[0])
            holder = next((h for h in self.registry.holders(session=session.id) if h.id == pin_id), None)
            if holder is None:
                raise SessionCommandError(f"this session holds no pin {args[0]}")
            self.registry.drop(holder)
            self.registry.trace(
                "unpin", session.pid, holder.file, holder.pfn, holder.npages, f"session pin {holder.id}"
            )
        elif verb == "zero" and len(args) == 2:
            self.zero(session, _number(args[0]), _number(args[1]))
        elif verb in ("inject", "uninject") and len(args) == 2:
            sector, count = _number(args[0]), _number(args[1])
            (self.badblocks.add if verb == "inject" else self.badblocks.clear)(sector, count)
            self.registry.trace(verb, session.pid, "pmem0", 0, 0, f"sectors {sector}+{count}")
        elif verb == "mark" and len(args) == 1:
            if self.write_log is None:
                raise PmemfsError("this mount has no write log (mount with --log-writes LOGFILE)", errno=errno.ENODEV)
            self.write_log.mark(args[0])
            self.registry.trace("session", session.pid, "", 0, 0, f"write log mark {args[0]}")
        elif verb == "clear-errors" and not args:
            self.clear_errors(session)
        elif verb == "trace-io" and args in (["on"], ["off"]):
            self.registry.trace_io(session.id, args == ["on"])
        elif verb == "hold-opens" and not args:
            self.registry.hold_opens(session.id)
        elif verb == "release-opens" and not args:
            self.registry.release_opens(session.id)
        elif verb == "kill" and not args:
            self.registry.kill(session.id)
        elif verb == "revive" and not args:
            # Only the killer revives: another session reviving in the middle of an unmount's
            # drain would let new pins in under the teardown.
            if not self.registry.revive(killer=session.id):
                raise PageBusy("the device reference was killed by another session (an unmount draining?)")
        else:
            raise SessionCommandError(f"unknown command {text.strip()!r}")

    def pin(self, session: Session, file: str, offset: int, length: int, *, longterm: bool) -> Holder:
        if file not in LONGTERM_ALLOWED:
            raise SessionCommandError(f"no file {file!r}: pin pmem0 or dax0")
        self._check_range(offset, length)
        kind = Kind.LONGTERM if longterm else Kind.PIN
        pfn, npages = _pages(offset, length)
        if longterm and not LONGTERM_ALLOWED[file]:
            self.registry.count_refused()
            self.registry.trace("refused", session.pid, file, pfn, npages, "FOLL_LONGTERM on fsdax")
            raise LongtermNotSupported(f"{file} is fsdax: long-term pins are not supported (pin dax0)")
        try:
            holder = self.registry.take(kind, session.pid, file, pfn, npages, session=session.id)
        except PmemfsError:
            self.registry.trace("refused", session.pid, file, pfn, npages, "device reference is dead")
            raise
        self.registry.trace("pin", session.pid, file, pfn, npages, f"session pin {holder.id} ({kind.value})")
        return holder

    def zero(self, session: Session, offset: int, length: int) -> None:
        """Bulk-zero a byte range of the data area, refusing with EBUSY while any of its pages is referenced.

        The client waits and retries (``dax_layout_busy_page``): this handler never waits for a
        reference to go. Transfers that start in the range meanwhile wait for it instead, so the
        exclusive window holds only the punch and the stores: the flushes (the data's, and the
        header's when poison is cleared) come after it, however much of the image is dirty.
        """
        self._check_range(offset, length)
        pfn, npages = _pages(offset, length)
        with self.registry.excluding_transfers(pfn, npages):
            busy = self.registry.first_busy_page(pfn, npages)
            if busy is not None:
                holders = self.registry.holders_of(busy)
                who = f" held by pid {holders[0].pid} ({holders[0].kind.value} on {holders[0].file})" if holders else ""
                raise PageBusy(f"page {busy} (offset {busy * PAGE_SIZE}) is busy{who}")
            self.media.zero(offset, length, flush=False)
        self.media.flush()
        self.badblocks.clear_whole_sectors(offset, length)
        self.registry.trace("zero", session.pid, "pmem0", pfn, npages, f"bytes {offset}+{length}")

    def clear_errors(self, session: Session) -> None:
        """Like ndctl clear-errors: write zeros over every bad sector, which clears its poison."""
        self.badblocks.changed_or_bad()  # pick up what other serving processes injected
        for sector, count in list(self.badblocks.extents):
            offset, length = sector * SECTOR_SIZE, count * SECTOR_SIZE
            self.zero(session, offset, length)
        self.badblocks.clear_all()

    def listing(self, session: Session) -> bytes:
        return "".join(
            f"{h.id} {h.file} {h.pfn * PAGE_SIZE} {h.npages * PAGE_SIZE} {h.kind.value}\n"
            for h in self.registry.holders(session=session.id)
        ).encode()

    def close(self, session: Session) -> None:
        """Drop the session's pins and undo its teardown. Each step whatever the others did: a
        session is closed once, and what it leaves behind stays for good."""
        gone = not _process_running(session.pid)
        failed = 0
        for holder in self.registry.holders(session=session.id):
            try:
                self.registry.drop(holder)
                self.registry.trace(
                    "unpin", session.pid, holder.file, holder.pfn, holder.npages,
                    f"session pin {holder.id} dropped: " + ("client died" if gone else "session closed"),
                )  # fmt: skip
            except Exception:
                failed += 1
                log.exception("dropping pin %d of a closed session failed", holder.id)
        for undo in (
            lambda: self.registry.release_opens(session.id),
            lambda: self.registry.revive(killer=session.id),
            lambda: self.registry.trace_io(session.id, False),
        ):
            try:
                undo()
            except Exception:
                failed += 1
                log.exception("undoing what a closed session did failed")
        self.registry.trace("session", session.pid, "", 0, 0, "closed" + (" (client died)" if gone else ""))
        if failed:
            raise PmemfsError(f"closing the session left {failed} thing(s) undone (see the log)")


def _pages(offset: int, length: int) -> tuple[int, int]:
    """The first page and the page count under a byte range."""
    return offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE) - offset // PAGE_SIZE


def _number(text: str) -> int:
    if len(text) > 24:  # no offset or count has more digits; int() of thousands of digits raises
        raise SessionCommandError(f"not a number: {text[:24]!r}...")
    try:
        return int(text, 0)
    except ValueError:
        raise SessionCommandError(f"not a number: {text!r}") from None


def _process_running(pid: int) -> bool:
    """False for a process that is gone or on its way out (exiting processes close their files)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    state, flags = fields[0], int(fields[6])
    PF_EXITING = 0x4
    return state not in ("Z", "X") and not flags & PF_EXITING and os.path.exists(f"/proc/{pid}")
