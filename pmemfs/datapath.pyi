# The compiled module's interface (datapath.pyx), for type checkers.
from collections.abc import Callable
from typing import Any

class DataPath:
    general_only: bool
    def __init__(
        self,
        transfers: Any,
        region: Any,
        badblocks: Any,
        *,
        general_read: Callable[[int, int, int], memoryview | bytes],
        general_write: Callable[[int, int, Any], int],
        as_fuse_error: Callable[[str, Exception], Exception],
        file_codes: dict[int, int],
        handle_layout: tuple[int, int, int, int],
        track_references: bool,
        plain_media: bool,
    ) -> None: ...
    def read(self, fh: int, off: int, size: int) -> memoryview | bytes: ...
    def write(self, fh: int, off: int, buf: Any) -> int: ...
