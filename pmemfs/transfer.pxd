# The compiled transfer path's fields and C-level methods (transfer.pyx), for the data path
# (datapath.pyx) to call without Python in between.
from libc.stdint cimport int32_t, int64_t, uint8_t


cdef class Transfers:
    # This process's refcount word of every record in the image, by pfn (a strided view).
    cdef int32_t[:] own_in_image
    # Where each chunk's records live (records.UNBACKED / IN_IMAGE / SPILLED).
    cdef uint8_t[:] backed
    # The shared cells as int64 words, and which of them is the I/O gate.
    cdef int64_t[:] words
    cdef Py_ssize_t gate_word
    # This process's counter row.
    cdef int64_t[:] counters
    cdef object registry
    cdef Py_ssize_t npfns
    cdef int page_shift, chunk_shift, pin_bias, in_image
    cdef Py_ssize_t nr_pin_acquired, nr_pin_released, nr_get_page, nr_put_page
    # The I/O counters: a file's slot is its base plus the file code (counters.file_slot_base).
    cdef Py_ssize_t file_reads, file_writes, file_read_bytes, file_write_bytes
    cdef Py_ssize_t direct_reads, direct_writes, direct_read_bytes, direct_write_bytes
    cdef int64_t max_file
    # The transfer in flight.
    cdef readonly bint in_flight
    cdef bint pin
    cdef int64_t pid, file, pfn, npages, since

    cdef bint _all_in_image(self, int64_t pfn, int64_t npages) noexcept
    cdef bint _own_at_least(self, int64_t pfn, int64_t npages, int delta) noexcept
    cdef int _begin(self, bint pin, int64_t pid, int64_t file, int64_t off, int64_t size) except -1
    cdef int _end(self) except -1
    cdef int _count(self, Py_ssize_t requests, Py_ssize_t nbytes, Py_ssize_t direct_requests,
                    Py_ssize_t direct_bytes, int64_t file, int64_t size, bint direct) except -1
