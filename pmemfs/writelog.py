"""The write log's on-disk format: dm-log-writes', so that the tools that read the kernel's logs read ours.

Linux's dm-log-writes target (drivers/md/dm-log-writes.c; Documentation/admin-guide/device-mapper/
log-writes.rst) and xfstests' ``replay-log`` (src/log-writes/) define it, little-endian throughout:

    block 0        struct log_write_super { __le64 magic; __le64 version; __le64 nr_entries;
                                            __le32 sectorsize; }   (the rest of the block zero)
    block 1 ...    nr_entries times:
                   one block   struct log_write_entry { __le64 sector; __le64 nr_sectors;
                                                        __le64 flags; __le64 data_len; }
                               then zeros; for a MARK, the mark's text right after the struct
                               (data_len bytes, no NUL), and never anything else there: replay-log
                               takes a non-MARK entry whose byte 32 is not zero for garbage
                   nr_sectors blocks of the data written, unless the entry is a DISCARD

A "block" is ``sectorsize`` bytes, and ``sector``/``nr_sectors`` count blocks of that size on the
logged device. ``nr_entries`` in the super is what a reader believes: entries past it are not
read. Flags: FLUSH 1, FUA 2, DISCARD 4, MARK 8, METADATA 16.

What pmemfs decides within that format (pmemfs/logwrites.py writes it):
- ``sectorsize`` is 512, ``pmem0``'s logical block size (the kernel's target takes the logged
  device's logical block size, so a log of /dev/pmem0 has the same units); every O_DIRECT write is
  a whole number of them and is logged as it came.
- pmemfs keeps a record of its own in block 0 after the kernel's 28 bytes (at ``PMEMFS_OFFSET``,
  which readers of the kernel's format never look at: they read the struct and seek to block 1):
  the geometry of the image the log was recorded on, so that replay can refuse an image of another
  geometry, and whether the log stopped because it was full or was closed by a clean unmount.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
from collections.abc import Iterator

from .errors import PmemfsError

MAGIC = 0x6A736677736872  # "rhswfsj": WRITE_LOG_MAGIC
VERSION = 1
FLUSH, FUA, DISCARD, MARK, METADATA = 1, 2, 4, 8, 16
KNOWN_FLAGS = FLUSH | FUA | DISCARD | MARK | METADATA
SECTOR_SIZE = 512
# struct log_write_super: the C struct is 32 bytes with its tail padding, what replay-log reads.
SUPER = struct.Struct("<QQQI")
SUPER_NR_ENTRIES_OFFSET = 16
ENTRY = struct.Struct("<QQQQ")
# The kernel keeps a mark's text to a block less the struct and a NUL (log_mark: kstrndup(maxsize - 1)).
MARK_MAX = SECTOR_SIZE - ENTRY.size - 1
# A mount's log is at most this long unless told otherwise (--log-writes-max, log_writes_max=).
DEFAULT_MAX_BYTES = 1 << 30
_ENTRY_PAD = bytes(SECTOR_SIZE - ENTRY.size)
# The mark the kernel's target writes when it is torn down; pmemfs writes it at a clean unmount.
END_MARK = "dm-log-writes-end"
# The mark pmemfs writes where the log stopped because it was full.
FULL_MARK = "pmemfs-log-full"

# pmemfs's own record in block 0: tag, version, flags, data area size, image size, align,
# mode, map, image uuid, the size limit. Flags: the log stopped full / was closed cleanly.
PMEMFS_OFFSET = 64
PMEMFS_TAG = b"pmemfsWL"
PMEMFS_INFO = struct.Struct("<8sIIQQQ8s8s16sQ")
PMEMFS_FLAGS_OFFSET = PMEMFS_OFFSET + 12
STOPPED_FULL, CLOSED_CLEAN = 1, 2


class LogFormatError(PmemfsError):
    """Raised by :class:`LogReader` for a file that is not a dm-log-writes log, or is one cut short."""

    errno = errno.EINVAL


@dataclasses.dataclass(frozen=True)
class Recorded:
    """The image a pmemfs log was recorded on (pmemfs's record in block 0)."""

    data_size: int
    image_size: int
    align: int
    mode: str
    map: str
    uuid: bytes
    max_bytes: int
    flags: int = 0

    def pack(self) -> bytes:
        return PMEMFS_INFO.pack(
            PMEMFS_TAG, 1, self.flags, self.data_size, self.image_size, self.align,
            self.mode.encode(), self.map.encode(), self.uuid, self.max_bytes,
        )  # fmt: skip

    @classmethod
    def unpack(cls, block: bytes) -> Recorded | None:
        raw = block[PMEMFS_OFFSET : PMEMFS_OFFSET + PMEMFS_INFO.size]
        if len(raw) < PMEMFS_INFO.size:
            return None
        tag, _, flags, data_size, image_size, align, mode, map, uuid, max_bytes = PMEMFS_INFO.unpack(raw)
        if tag != PMEMFS_TAG:
            return None  # a log the kernel wrote: it has no such record
        return cls(
            data_size, image_size, align, mode.rstrip(b"\0").decode(errors="replace"),
            map.rstrip(b"\0").decode(errors="replace"), uuid, max_bytes, flags,
        )  # fmt: skip


def pack_super(nr_entries: int, recorded: Recorded | None = None) -> bytes:
    """Block 0: the kernel's super, zero padded, with pmemfs's record when given."""
    block = bytearray(SECTOR_SIZE)
    SUPER.pack_into(block, 0, MAGIC, VERSION, nr_entries, SECTOR_SIZE)
    if recorded is not None:
        block[PMEMFS_OFFSET : PMEMFS_OFFSET + PMEMFS_INFO.size] = recorded.pack()
    return bytes(block)


def pack_entry(sector: int, nr_sectors: int, flags: int, text: bytes = b"") -> bytes:
    """An entry's block: the struct, a mark's text after it, zeros to the end of the block."""
    if text and not flags & MARK:
        raise ValueError("only a MARK entry carries text in its block")
    if len(text) > MARK_MAX:
        raise ValueError(f"a mark's text is at most {MARK_MAX} bytes")
    # Every logged write packs one: concatenation with a constant pad is a third of a bytearray's cost.
    return ENTRY.pack(sector, nr_sectors, flags, len(text)) + text + _ENTRY_PAD[len(text) :]


def check_mark_name(name: str) -> bytes:
    """A mark's text as the log stores it, or UsageError-like PmemfsError (EINVAL) saying why not."""
    text = name.encode(errors="replace")
    if not name or not name.isprintable() or any(c.isspace() for c in name):
        raise PmemfsError(f"mark name {name!r}: use printable characters without spaces", errno=errno.EINVAL)
    if len(text) > MARK_MAX:
        raise PmemfsError(f"mark name {name[:20]!r}...: at most {MARK_MAX} bytes", errno=errno.EINVAL)
    return text


def describe_flags(flags: int) -> str:
    names = [name for bit, name in ((FLUSH, "FLUSH"), (FUA, "FUA"), (DISCARD, "DISCARD"), (MARK, "MARK"),
                                    (METADATA, "METADATA")) if flags & bit]  # fmt: skip
    return "|".join(names) or "WRITE"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One entry as read: where its data is in the log file (``data_offset``), a mark's name."""

    index: int
    sector: int
    nr_sectors: int
    flags: int
    data_offset: int
    mark: str | None = None

    @property
    def is_write(self) -> bool:
        """A change of the media: data written, or a range discarded (zeroed)."""
        return self.nr_sectors > 0 and not self.flags & MARK

    def describe(self) -> str:
        if self.flags & MARK:
            return f"mark {self.mark}"
        what = describe_flags(self.flags).lower()
        if self.nr_sectors:
            return f"{what} sectors {self.sector}+{self.nr_sectors}"
        return what


class LogReader:
    """A write log opened for reading: its super, pmemfs's record if any, and its entries.

    Every entry the super counts is checked when the log is opened (a sane struct, zero padding,
    the data there, the range inside the device when the device's size is known), so that a replay
    never stops half-way through a log that was bad from the start.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise PmemfsError(f"cannot open write log {path}: {err.strerror}", errno=err.errno) from None
        try:
            self._read()
        except BaseException:
            os.close(self.fd)
            raise

    def _fail(self, what: str) -> LogFormatError:
        return LogFormatError(f"{self.path}: {what}")

    def _read(self) -> None:
        self.file_size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, SECTOR_SIZE, 0)
        if len(head) < SUPER.size:
            raise self._fail(f"not a dm-log-writes log: {len(head)} bytes, too short for its super block")
        magic, version, nr_entries, sectorsize = SUPER.unpack_from(head)
        if magic != MAGIC:
            raise self._fail(f"not a dm-log-writes log: magic {magic:#x}, expected {MAGIC:#x}")
        if version != VERSION:
            raise self._fail(f"dm-log-writes log version {version}, pmemfs reads version {VERSION}")
        if sectorsize < SECTOR_SIZE or sectorsize > 65536 or sectorsize & (sectorsize - 1):
            raise self._fail(f"sectorsize {sectorsize} is not a block size (a power of two, 512 to 64K)")
        self.sectorsize = sectorsize
        self.recorded = Recorded.unpack(os.pread(self.fd, sectorsize, 0))
        device_sectors = self.recorded.data_size // sectorsize if self.recorded else None
        self.entries = list(self._scan(nr_entries, device_sectors))

    def _scan(self, nr_entries: int, device_sectors: int | None) -> Iterator[Entry]:
        position = self.sectorsize
        for index in range(nr_entries):
            block = os.pread(self.fd, self.sectorsize, position)
            if len(block) < self.sectorsize:
                raise self._fail(
                    f"truncated: the super counts {nr_entries} entries but the file ends in entry {index} "
                    f"(block {position // self.sectorsize})"
                )
            sector, nr_sectors, flags, data_len = ENTRY.unpack_from(block)
            where = f"entry {index} (block {position // self.sectorsize})"
            if not flags and not nr_sectors:
                raise self._fail(f"{where} is all zeros: not an entry (a log cut short?)")
            if flags & ~KNOWN_FLAGS:
                raise self._fail(f"{where} has unknown flags {flags:#x}")
            mark = None
            if flags & MARK:
                if data_len > self.sectorsize - ENTRY.size:
                    raise self._fail(f"{where}: a mark of {data_len} bytes does not fit its block")
                mark = block[ENTRY.size : ENTRY.size + data_len].decode(errors="replace")
            elif block[ENTRY.size] != 0:
                raise self._fail(f"{where} is not zero padded")
            data_offset = position + self.sectorsize
            position = data_offset + (0 if flags & (DISCARD | MARK) else nr_sectors * self.sectorsize)
            if position > self.file_size:
                raise self._fail(
                    f"truncated: {where} has {nr_sectors} sectors of data but the file ends at byte {self.file_size}"
                )
            if device_sectors is not None and sector + nr_sectors > device_sectors:
                raise self._fail(
                    f"{where} covers sectors {sector}+{nr_sectors}, past the end of the "
                    f"{device_sectors}-sector device it was recorded on"
                )
            yield Entry(index, sector, nr_sectors, flags, data_offset, mark)

    def read_data(self, entry: Entry) -> bytes:
        length = entry.nr_sectors * self.sectorsize
        data = os.pread(self.fd, length, entry.data_offset)
        if len(data) != length:
            raise self._fail(f"entry {entry.index}: its data could not be read whole")
        return data

    @property
    def stopped_full(self) -> bool:
        return bool(self.recorded and self.recorded.flags & STOPPED_FULL)

    @property
    def closed_clean(self) -> bool | None:
        """Whether a clean unmount closed the log (None: a log pmemfs did not write)."""
        return bool(self.recorded.flags & CLOSED_CLEAN) if self.recorded else None

    def marks(self) -> list[Entry]:
        return [entry for entry in self.entries if entry.flags & MARK]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
