# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""A serving process's request loop for reads and writes: /dev/fuse to the handler and back, compiled.

Why: under pyfuse3 every request went through libfuse's splice into a pipe and a read out of it,
pyfuse3's request object and coroutine, its session loop's coroutine and ours, and a hook to end
the transfer: ~3 µs of CPython and a syscall per 4k request around a handler of ~1.5 µs
(docs/performance.md). At QD1 all of it lies on the client's round trip.

How: the serving process reads each request from its clone of /dev/fuse itself. A FUSE_READ or
FUSE_WRITE is decoded here and given to the handler's synchronous core (``read(fh, off, size)``
returns any contiguous buffer, ``write(fh, off, view)`` the count); its reply goes straight back
to the device. Anything else (lookup, open, fsync, release, ...) is relayed to libfuse through a
socket pair that stands where libfuse expects the device (the session's fd number): pyfuse3 reads
it from there as it would from the device, answers it with the same handlers as always, and its
reply comes back through the pair, to be forwarded to the device before the next read. Requests
are still served one at a time, to the end, which the registry's transfer contract relies on.

This module knows nothing of pmem: the handlers, what runs after a reply and the errno of an
exception are given to it.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport EAGAIN, EINTR, EIO, EMSGSIZE, ENODEV, ENOENT, errno
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memset, strerror

import logging

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t count)
    long sysconf(int name)
    int _SC_PAGESIZE

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int MSG_DONTWAIT

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLIN

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    int CLOCK_MONOTONIC

# The kernel's FUSE ABI (stable since 7.9), as the system's headers state it.
cdef extern from "<linux/fuse.h>" nogil:
    struct fuse_in_header:
        uint32_t len
        uint32_t opcode
        uint64_t unique
        uint64_t nodeid
    struct fuse_out_header:
        uint32_t len
        int32_t error
        uint64_t unique
    struct fuse_read_in:
        uint64_t fh
        uint64_t offset
        uint32_t size
    struct fuse_write_in:
        uint64_t fh
        uint64_t offset
        uint32_t size
    struct fuse_write_out:
        uint32_t size
    enum:
        FUSE_READ
        FUSE_WRITE

# libfuse's read buffer: 256 pages of payload and 4 KiB of headers. The kernel refuses a read of
# /dev/fuse into less than a request of max_write bytes can need, and libfuse negotiated max_write
# from the same size.
cdef enum:
    MAX_PAGES = 256
    HEADER_SPACE = 4096

log = logging.getLogger("pmemfs")


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1000000000 + ts.tv_nsec


cdef class Spinner:
    """Polls a device fd for a while after each reply, when requests come one at a time.

    With one request in flight, a serving process that blocks in read() must be woken for the next
    one: under KVM that is an IPI to a halted vCPU, ~15 µs here, and the main cost of a 4k request
    at QD1. Polling for ``spin_ns`` after a reply keeps the process on its CPU for the client's
    turnaround. Under load the next request is already queued, and a poll() per request would cost
    ~2 µs of ~8 (measured), so once requests are there at once several times in a row it stops
    polling and only probes every ``PROBE_EVERY``-th read for the queue running dry. An idle daemon
    spins ``spin_ns`` after its last request, then sleeps.
    """

    READY_IN_A_ROW = 4
    PROBE_EVERY = 16

    cdef pollfd device
    cdef readonly int64_t spin_ns
    cdef readonly bint loaded
    cdef int64_t reads
    cdef int ready_in_a_row

    def __init__(self, int fd, int64_t spin_ns):
        self.device.fd = fd
        self.device.events = POLLIN
        self.spin_ns = spin_ns
        self.loaded = False
        self.reads = 0
        self.ready_in_a_row = 0

    cdef inline bint _ready(self) noexcept:
        return poll(&self.device, 1, 0) > 0

    def wait(self, stop):
        """Return once the device has a request, the spin is over, or ``stop()`` (checked as the
        spin goes, after any signal handler has run) says so."""
        self._wait(stop)

    cdef int _wait(self, object stop) except -1:
        if self.spin_ns <= 0:
            return 0
        if self.loaded:
            self.reads += 1
            if self.reads % self.PROBE_EVERY or self._ready():
                return 0
            self.loaded = False
        if self._ready():
            self.ready_in_a_row += 1
            if self.ready_in_a_row >= self.READY_IN_A_ROW:
                self.loaded, self.ready_in_a_row = True, 0
            return 0
        self.ready_in_a_row = 0
        cdef int64_t deadline = _now_ns() + self.spin_ns
        # A signal handled meanwhile may end the session: stop spinning then, so it is seen.
        while not self._ready() and _now_ns() < deadline:
            PyErr_CheckSignals()
            if stop is not None and stop():
                break
        return 0


class DeviceClosed(Exception):
    """The FUSE connection is gone (unmounted or aborted): nothing more to serve."""


cdef class Lane:
    """Serves reads and writes from ``device_fd`` and relays every other request to ``relay_fd``."""

    cdef int device_fd, relay_fd
    cdef bytearray buffer
    cdef char *buf
    cdef size_t bufsize
    cdef object view
    cdef object read_handler, write_handler, after_reply, errno_of
    cdef Spinner spinner
    # What went where, for the tests and the curious.
    cdef readonly uint64_t served, relayed, forwarded, lost_replies, failed_replies

    def __init__(self, int device_fd, int relay_fd, read, write, after_reply, errno_of, Spinner spinner):
        """``read(fh, off, size)`` returns the reply's bytes (any contiguous buffer), ``write(fh, off,
        view)`` the count written; ``view`` is only valid during the call. ``after_reply()`` runs
        once each reply is out; ``errno_of(exception)`` is the error a failed request answers."""
        self.device_fd, self.relay_fd = device_fd, relay_fd
        self.bufsize = MAX_PAGES * sysconf(_SC_PAGESIZE) + HEADER_SPACE
        self.buffer = bytearray(self.bufsize)
        self.buf = PyByteArray_AS_STRING(self.buffer)
        self.view = memoryview(self.buffer)
        self.read_handler, self.write_handler = read, write
        self.after_reply, self.errno_of = after_reply, errno_of
        self.spinner = spinner

    def forward_replies(self):
        """Pass what libfuse answered to relayed requests on to the device (a FORGET has no answer)."""
        cdef ssize_t n
        while True:
            n = recv(self.relay_fd, self.buf, self.bufsize, MSG_DONTWAIT)
            if n <= 0:
                if n < 0 and errno == EINTR:
                    continue
                return
            self._send(self.buf, n)
            self.forwarded += 1

    def counts(self):
        """What this lane served itself, relayed to libfuse and forwarded back, and the replies the
        kernel did not take (requests it took back; refused)."""
        return {"served": self.served, "relayed": self.relayed, "forwarded": self.forwarded,
                "lost_replies": self.lost_replies, "failed_replies": self.failed_replies}

    def serve(self):
        """Serve reads and writes until a request must go to libfuse: relay it and return True.
        Raise DeviceClosed when the connection is gone."""
        cdef ssize_t n
        cdef fuse_in_header *request = <fuse_in_header *> self.buf
        while True:
            self.spinner._wait(None)
            with nogil:
                n = read(self.device_fd, self.buf, self.bufsize)
            if n < 0:
                if errno == ENODEV:
                    raise DeviceClosed()
                if errno == EINTR or errno == ENOENT or errno == EAGAIN:
                    # Interrupted, or a request the kernel took back meanwhile: read again.
                    PyErr_CheckSignals()
                    continue
                raise OSError(errno, "cannot read the FUSE device")
            if n < <ssize_t> sizeof(fuse_in_header) or request.len != <uint32_t> n:
                raise OSError(EIO, f"a short or torn read of the FUSE device ({n} bytes)")
            if request.opcode == FUSE_READ:
                self._serve_read(request)
            elif request.opcode == FUSE_WRITE:
                self._serve_write(request)
            elif self._relay(n):
                return True
            else:
                continue  # answered with an error: nothing for pyfuse3 to read
            self.served += 1
            self.after_reply()

    cdef int _relay(self, ssize_t n) except -1:
        """1 once the request is in the pair for pyfuse3 to read; 0 if it could not be (answered)."""
        cdef fuse_in_header *request = <fuse_in_header *> self.buf
        cdef int error
        while send(self.relay_fd, self.buf, n, 0) < 0:
            error = errno
            if error != EINTR:
                # Too large for the pair (nothing pmemfs serves takes one), or no memory: the client
                # gets the error, and pyfuse3 must not be sent to read a request that is not there.
                log.error("cannot pass request %d (opcode %d, %d bytes) to pyfuse3: %s",
                          request.unique, request.opcode, n, strerror(error).decode())
                self._reply_error(request.unique, EIO if error == EMSGSIZE else error)
                return 0
        self.relayed += 1
        return 1

    cdef int _serve_read(self, fuse_in_header *request) except -1:
        cdef fuse_read_in *arguments = <fuse_read_in *> (self.buf + sizeof(fuse_in_header))
        cdef uint64_t unique = request.unique
        cdef Py_buffer data
        cdef fuse_out_header out
        cdef iovec iov[2]
        try:
            reply = self.read_handler(arguments.fh, arguments.offset, arguments.size)
            PyObject_GetBuffer(reply, &data, PyBUF_SIMPLE)
        except Exception as err:
            return self._reply_error(unique, self.errno_of(err))
        try:
            out.len = sizeof(fuse_out_header) + data.len
            out.error = 0
            out.unique = unique
            iov[0].iov_base, iov[0].iov_len = &out, sizeof(fuse_out_header)
            iov[1].iov_base, iov[1].iov_len = data.buf, data.len
            self._sendv(iov, 2)
        finally:
            PyBuffer_Release(&data)
        return 0

    cdef int _serve_write(self, fuse_in_header *request) except -1:
        cdef fuse_write_in *arguments = <fuse_write_in *> (self.buf + sizeof(fuse_in_header))
        cdef uint64_t unique = request.unique
        cdef Py_ssize_t start = sizeof(fuse_in_header) + sizeof(fuse_write_in)
        cdef fuse_out_header out
        cdef fuse_write_out written
        cdef iovec iov[2]
        if start + arguments.size > request.len:
            return self._reply_error(unique, EIO)
        memset(&written, 0, sizeof(written))
        try:
            written.size = self.write_handler(arguments.fh, arguments.offset, self.view[start : start + arguments.size])
        except Exception as err:
            return self._reply_error(unique, self.errno_of(err))
        out.len = sizeof(fuse_out_header) + sizeof(fuse_write_out)
        out.error = 0
        out.unique = unique
        iov[0].iov_base, iov[0].iov_len = &out, sizeof(fuse_out_header)
        iov[1].iov_base, iov[1].iov_len = &written, sizeof(fuse_write_out)
        return self._sendv(iov, 2)

    cdef int _reply_error(self, uint64_t unique, int error) except -1:
        cdef fuse_out_header out
        out.len = sizeof(fuse_out_header)
        out.error = -error
        out.unique = unique
        return self._send(<char *> &out, sizeof(out))

    cdef int _send(self, char *data, size_t n) except -1:
        cdef iovec iov[1]
        iov[0].iov_base, iov[0].iov_len = data, n
        return self._sendv(iov, 1)

    cdef int _sendv(self, iovec *iov, int count) except -1:
        cdef int error
        while writev(self.device_fd, iov, count) < 0:
            error = errno
            if error == EINTR:
                continue
            if error == ENODEV:
                raise DeviceClosed()
            if error == ENOENT:
                # The kernel took the request back (interrupted, aborted): nobody waits for it.
                self.lost_replies += 1
            else:
                self.failed_replies += 1
                log.error("the kernel refused a reply (%d bytes): %s",
                          (<fuse_out_header *> iov[0].iov_base).len, strerror(error).decode())
            return 0
        return 0
