# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The common case of a data file's read and write, compiled; every other case is the handler's Python.

Why: with the lane (lane.pyx) serving requests, the handler's Python was most of what a 4k
request still ran in the interpreter: ~1.5 µs of checks, a dict lookup, calls into the region,
the badblocks table and the registry (docs/performance.md).

The common case is a request whose answer needs nothing but the mapping: a data file's handle,
aligned if direct, inside the data area, no bad sector anywhere on the media, no I/O gate closed
(no zero, teardown or I/O trace under way), every page's blocks known to exist and every record
in the image, and for a write no write log. It is served here: the page references and counters
as the registry's transfer path does them, the bytes straight from or into the mapping. Anything
else, from a misaligned offset to a control file, goes to the general handler (fs.py's
``serve_read``/``serve_write``), which implements every case, this one included: the pyfuse3
path (trio, the parent before it forks) uses this class too, so both serve the same way.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memcpy

from .transfer cimport Transfers

cdef enum:
    SECTOR_MASK = 511
    PAGE_SHIFT = 12
    INODES = 256


cdef class DataPath:
    """A data file's read and write: the common case here, the rest in ``general_read``/``general_write``."""

    cdef Transfers transfers
    cdef object general_read, general_write, as_fuse_error
    # The data area of the mapping, and a memoryview of it to slice replies from.
    cdef uint8_t[:] data
    cdef object data_view
    # Per image page: whether its blocks exist (region's shared "known" array).
    cdef uint8_t[:] known
    cdef int64_t data_size, dataoff
    # The badblocks generation word: the table was empty when it read ``clean_generation``.
    cdef int64_t[:] generation
    cdef Py_ssize_t generation_index
    cdef int64_t clean_generation
    cdef object badblocks
    # A file code per inode (0: not a data file), and the handle's fields (handles.py).
    cdef int file_codes[INODES]
    cdef uint64_t inode_mask, direct_shift, pid_shift, pid_mask
    cdef bint track_references, plain_media
    # Everything to the general handler: with faults injected into the Python collaborators
    # (faults.py), which the common case does not call.
    cdef public bint general_only

    def __init__(self, Transfers transfers, region, badblocks, *, general_read, general_write, as_fuse_error,
                 file_codes, handle_layout, bint track_references, bint plain_media):
        """``as_fuse_error(handler, exception)``: what the request answers when the registry fails it
        (a gate that closed meanwhile: a zero, a teardown); ``file_codes``: {inode: file code};
        ``handle_layout``: (inode mask, direct shift, pid shift, pid mask); ``plain_media``: writes
        go to the region itself (no write log)."""
        self.transfers = transfers
        self.general_read, self.general_write = general_read, general_write
        self.as_fuse_error = as_fuse_error
        data, known, self.dataoff = region.direct_access()
        self.data = data
        self.data_view = memoryview(data)
        self.data_size = len(self.data_view)
        self.known = known
        self.badblocks = badblocks
        self.generation, self.generation_index = badblocks.generation_cell
        self.clean_generation = -1
        for inode in range(INODES):
            self.file_codes[inode] = file_codes.get(inode, 0)
        self.inode_mask, self.direct_shift, self.pid_shift, self.pid_mask = handle_layout
        self.track_references, self.plain_media = track_references, plain_media
        self.general_only = False

    def read(self, uint64_t fh, int64_t off, int64_t size):
        """The bytes of a read: a view of the mapping in the common case."""
        cdef int file = self.file_codes[fh & self.inode_mask]
        cdef bint direct = (fh >> self.direct_shift) & 1
        if self._common(file, direct, off, size):
            if off + size > self.data_size:
                size = self.data_size - off
            if self._backed(off, size) and self._referenced(direct, fh, file, off, size, "read"):
                # The reference is ended by the serving loop once the reply is out (pages.py).
                t = self.transfers
                t._count(t.file_reads, t.file_read_bytes, t.direct_reads, t.direct_read_bytes, file, size, direct)
                return self.data_view[off : off + size]
        return self.general_read(fh, off, size)

    def write(self, uint64_t fh, int64_t off, buf):
        """Store a write's bytes; the count written."""
        cdef int file = self.file_codes[fh & self.inode_mask]
        cdef bint direct = (fh >> self.direct_shift) & 1
        cdef Py_buffer source
        cdef int64_t size
        if self.plain_media:
            PyObject_GetBuffer(buf, &source, PyBUF_SIMPLE)
            try:
                size = source.len
                if (self._common(file, direct, off, size) and off + size <= self.data_size
                        and self._backed(off, size) and self._referenced(direct, fh, file, off, size, "write")):
                    t = self.transfers
                    memcpy(&self.data[off], source.buf, size)
                    if self.track_references:
                        try:
                            t._end()  # the store is done: nothing of the request points into the mapping
                        except Exception as err:
                            raise self.as_fuse_error("write", err) from None
                    t._count(t.file_writes, t.file_write_bytes, t.direct_writes, t.direct_write_bytes, file, size,
                             direct)
                    return size
            finally:
                PyBuffer_Release(&source)
        return self.general_write(fh, off, buf)

    cdef inline bint _common(self, int file, bint direct, int64_t off, int64_t size):
        """A data file, aligned if direct, starting inside the data area, no gate closed, no bad sector."""
        if self.general_only or not file or size <= 0 or off < 0 or off >= self.data_size:
            return False
        if direct and (off | size) & SECTOR_MASK:
            return False
        if self.transfers.words[self.transfers.gate_word]:
            return False
        return self.generation[self.generation_index] == self.clean_generation or self._learn_clean()

    cdef bint _referenced(self, bint direct, uint64_t fh, int file, int64_t off, int64_t size, str handler) except -1:
        """Take the transfer's reference; then whether the pages still have their blocks. A zero may
        have punched them between the look at ``known`` and the reference (it found none then): the
        transfer ends and the general handler serves it, with pwrite for a hole (region.py)."""
        if not self.track_references:
            return True
        try:
            self.transfers._begin(direct, (fh >> self.pid_shift) & self.pid_mask, file, off, size)
            if self._known(off, size):
                return True
            self.transfers._end()
        except Exception as err:
            raise self.as_fuse_error(handler, err) from None
        return False

    cdef bint _learn_clean(self):
        """Whether the badblocks table is empty, as of the generation read first (then remembered).
        One that cannot be read is the general handler's to report."""
        cdef int64_t generation = self.generation[self.generation_index]
        try:
            if self.badblocks.changed_or_bad():
                return False
        except Exception:
            return False
        self.clean_generation = generation
        return True

    cdef inline bint _known(self, int64_t off, int64_t size):
        """Every page of [off, +size) is known to have its blocks."""
        cdef int64_t first = (self.dataoff + off) >> PAGE_SHIFT, last = (self.dataoff + off + size - 1) >> PAGE_SHIFT
        cdef int64_t page
        for page in range(first, last + 1):
            if not self.known[page]:
                return False
        return True

    cdef inline bint _backed(self, int64_t off, int64_t size):
        """Every page of [off, +size) has its blocks, and every record is in the image."""
        if not self._known(off, size):
            return False
        if not self.track_references:
            return True
        cdef int64_t pfn = off >> self.transfers.page_shift
        return self.transfers._all_in_image(pfn, ((off + size - 1) >> self.transfers.page_shift) - pfn + 1)
