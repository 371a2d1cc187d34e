# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""What every request does to shared state: its transfer's page references, and its I/O counters.

Compiled because CPython was its cost (docs/performance.md): reading a memoryview item and adding
to it is ~55 ns in the interpreter (~100 on a slow day), and a request did ten of them plus their
glue, ~1.2 µs of a 4k request's ~7 µs of daemon CPU. Here it is a few loads and stores; what is
left is the cache miss on the page's record, which no compiler removes.

The contract is pages.py's (stated there, once): the reference is stored, then the I/O gate is
read; a transfer lasts until the serving loop ends it; a second one in flight is a bug. This
class does the common case itself (records in the image, the gate open, a put of what this process
took) and calls back into the registry for everything else: backing records, records in the
spill, the gate's slow path (refusal, a zero under way, the trace), a put that the sums decide.
"""

from libc.stdint cimport int64_t

cdef extern from *:
    """
    /* The compiler may not move the reference's store below the gate's load (a zero, or a
       teardown, relies on seeing one or the other); the closer's membarrier orders the CPUs. */
    static inline void pmemfs_compiler_fence(void) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
    """
    void compiler_fence "pmemfs_compiler_fence" () nogil


cdef class Transfers:
    """The transfer in flight of one serving process, over the registry that owns its state.
    (Its fields are declared in transfer.pxd, for the data path to use them.)"""

    def __init__(self, registry, *, backed, words, int gate_word, int page_shift, int chunk_shift,
                 int pin_bias, int in_image, counter_slots, io_slots, int max_file):
        """``counter_slots``: the indexes of nr_foll_pin_acquired, nr_foll_pin_released,
        nr_get_page and nr_put_page in a counter row; ``io_slots``: of the reads, writes,
        read_bytes and write_bytes of file code 0, then of direct_reads, direct_writes,
        direct_read_bytes and direct_write_bytes. File codes go from 1 to ``max_file``."""
        self.registry = registry
        self.backed = backed
        self.words = words
        self.gate_word = gate_word
        self.page_shift, self.chunk_shift = page_shift, chunk_shift
        self.pin_bias, self.in_image = pin_bias, in_image
        self.nr_pin_acquired, self.nr_pin_released, self.nr_get_page, self.nr_put_page = counter_slots
        (self.file_reads, self.file_writes, self.file_read_bytes, self.file_write_bytes,
         self.direct_reads, self.direct_writes, self.direct_read_bytes, self.direct_write_bytes) = io_slots
        self.max_file = max_file
        self.in_flight = False

    cdef bint _all_in_image(self, int64_t pfn, int64_t npages) noexcept:
        cdef int64_t chunk
        for chunk in range(pfn >> self.chunk_shift, ((pfn + npages - 1) >> self.chunk_shift) + 1):
            if self.backed[chunk] != self.in_image:
                return False
        return True

    cdef bint _own_at_least(self, int64_t pfn, int64_t npages, int delta) noexcept:
        """Whether this process's own words can drop ``delta`` over the range (it took the reference)."""
        cdef int64_t page
        for page in range(pfn, pfn + npages):
            if self.own_in_image[page] < delta:
                return False
        return True

    def bind(self, own_in_image, counters):
        """Write these words and counters from now on (the process became another column)."""
        self.own_in_image = own_in_image
        self.npfns = len(own_in_image)
        self.counters = counters

    @property
    def transfer(self):
        """(pin, pid, file code, pfn, npages, since_ns) of the transfer in flight, or None."""
        if not self.in_flight:
            return None
        return (self.pin, self.pid, self.file, self.pfn, self.npages, self.since)

    def begin(self, bint pin, int64_t pid, int64_t file, int64_t off, int64_t size):
        """Reference the pages of bytes [off, off + size): a pin for direct I/O, get_page else."""
        self._begin(pin, pid, file, off, size)

    def begin_read(self, bint pin, int64_t pid, int64_t file, int64_t off, int64_t size):
        """``begin``, then ``count_read``: a read handler's one call when references are tracked."""
        self._begin(pin, pid, file, off, size)
        self._count(self.file_reads, self.file_read_bytes, self.direct_reads, self.direct_read_bytes, file, size, pin)

    cdef int _begin(self, bint pin, int64_t pid, int64_t file, int64_t off, int64_t size) except -1:
        if self.in_flight:
            raise AssertionError(f"a serving process began a second transfer with {self.transfer} in flight")
        cdef int64_t pfn = off >> self.page_shift
        cdef int64_t npages = ((off + size - 1) >> self.page_shift) - pfn + 1
        if off < 0 or size <= 0 or pfn + npages > self.npfns:
            raise ValueError(f"transfer of [{off}, +{size}) outside the data area")
        cdef int delta = self.pin_bias if pin else 1
        cdef int64_t page
        if self._all_in_image(pfn, npages):
            for page in range(pfn, pfn + npages):
                self.own_in_image[page] += delta
        else:
            self.registry.store.add(pfn, npages, delta)
        compiler_fence()
        cdef int64_t since = 0
        if self.words[self.gate_word]:
            since = self.registry._behind_closed_gate(pin, pid, file, pfn, npages, delta)
        self.counters[self.nr_pin_acquired if pin else self.nr_get_page] += npages
        self.pin, self.pid, self.file, self.pfn, self.npages, self.since = pin, pid, file, pfn, npages, since
        self.in_flight = True
        return 0

    def end(self):
        """Drop the reference of the transfer in flight, if any: its reply is out."""
        self._end()

    cdef int _end(self) except -1:
        if not self.in_flight:
            return 0
        self.in_flight = False  # first: a transfer that cannot be ended is not ended twice
        cdef int64_t pfn = self.pfn, npages = self.npages, page
        cdef int delta
        if self.pin:
            delta = self.pin_bias
            self.counters[self.nr_pin_released] += npages
        else:
            delta = 1
            self.counters[self.nr_put_page] += npages
        if self._all_in_image(pfn, npages) and self._own_at_least(pfn, npages, delta):
            for page in range(pfn, pfn + npages):
                self.own_in_image[page] -= delta
        else:
            # Another process took (some of) the reference, or records are elsewhere: the sums decide.
            self.registry._drop_reference(pfn, npages, delta)
        if self.words[self.gate_word]:
            self.registry._trace_end(self.pin, self.pid, self.file, pfn, npages)
        return 0

    # A request's I/O counters: four read-modify-writes of memoryview items cost ~0.2-0.4 µs in
    # CPython, a tenth of that here.
    def count_read(self, int64_t file, int64_t size, bint direct):
        self._count(self.file_reads, self.file_read_bytes, self.direct_reads, self.direct_read_bytes, file, size, direct)

    def count_write(self, int64_t file, int64_t size, bint direct):
        self._count(self.file_writes, self.file_write_bytes, self.direct_writes, self.direct_write_bytes, file, size,
                    direct)

    cdef int _count(self, Py_ssize_t requests, Py_ssize_t nbytes, Py_ssize_t direct_requests,
                           Py_ssize_t direct_bytes, int64_t file, int64_t size, bint direct) except -1:
        if not 0 < file <= self.max_file:
            raise ValueError(f"no data file has code {file}")
        self.counters[requests + file] += 1
        self.counters[nbytes + file] += size
        if direct:
            self.counters[direct_requests] += 1
            self.counters[direct_bytes] += size
        return 0
