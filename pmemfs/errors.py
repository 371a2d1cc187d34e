"""Every error pmemfs reports: its message, the errno a FUSE client sees, the CLI exit code."""

from __future__ import annotations

import errno as _errno


class PmemfsError(Exception):
    """Base of pmemfs's own errors.

    Raised by the core (image, region, registry) and the CLI; the FUSE layer
    turns ``errno`` into a ``FUSEError`` and the CLI prints ``str(err)`` as one
    line and exits with ``exit_code``.
    """

    errno: int = _errno.EIO
    exit_code: int = 1

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class UsageError(PmemfsError):
    """Raised by the CLI for arguments that can never work (a size that is not a valid image size)."""

    errno = _errno.EINVAL
    exit_code = 2


class CorruptImage(PmemfsError):
    """Raised when opening an image whose header, info block or geometry is wrong.

    The image has not been modified when this is raised.
    """

    errno = _errno.EUCLEAN


class ImageBusy(PmemfsError):
    """Raised when another daemon holds the image's exclusive lock."""

    errno = _errno.EBUSY


class NoSpace(PmemfsError):
    """Raised when the backing filesystem cannot allocate blocks for a store, or a write is past the end."""

    errno = _errno.ENOSPC


class InvalidRange(PmemfsError):
    """Raised for an offset or length outside the data area, or misaligned for direct I/O."""

    errno = _errno.EINVAL


class MountError(PmemfsError):
    """Raised by mount/umount when the mountpoint or the daemon is not in the expected state."""


class DeviceGone(PmemfsError):
    """Raised by a new reference after the device reference was killed (teardown under way): ENXIO."""

    errno = _errno.ENXIO


class LongtermNotSupported(PmemfsError):
    """Raised for a long-term pin of an fsdax view: EOPNOTSUPP, as FOLL_LONGTERM on fsdax in Linux."""

    errno = _errno.EOPNOTSUPP


class UnbalancedPut(PmemfsError):
    """Raised when a put or unpin would drive a page's refcount below zero; nothing is changed."""

    errno = _errno.EINVAL


class MediaError(PmemfsError):
    """Raised by a read of a poisoned sector, or a write that covers one only in part: EIO."""

    errno = _errno.EIO


class SessionCommandError(PmemfsError):
    """Raised for a pin-session command that is not one pmemfs knows, or whose arguments are wrong."""

    errno = _errno.EINVAL


class PageBusy(PmemfsError):
    """Raised by an operation that needs idle pages while one of them is referenced: EBUSY."""

    errno = _errno.EBUSY
