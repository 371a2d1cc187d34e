# The compiled module's interface (lane.pyx), for type checkers.
from collections.abc import Callable
from typing import Any

class Spinner:
    READY_IN_A_ROW: int
    PROBE_EVERY: int
    spin_ns: int
    loaded: bool
    def __init__(self, fd: int, spin_ns: int) -> None: ...
    def wait(self, stop: Callable[[], bool] | None) -> None: ...

class DeviceClosed(Exception): ...

class Lane:
    served: int
    relayed: int
    forwarded: int
    lost_replies: int
    failed_replies: int
    def __init__(
        self,
        device_fd: int,
        relay_fd: int,
        read: Callable[[int, int, int], Any],
        write: Callable[[int, int, memoryview], int],
        after_reply: Callable[[], None],
        errno_of: Callable[[BaseException], int],
        spinner: Spinner,
    ) -> None: ...
    def counts(self) -> dict[str, int]: ...
    def forward_replies(self) -> None: ...
    def serve(self) -> bool: ...
