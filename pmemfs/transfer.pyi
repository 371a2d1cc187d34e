# The compiled module's interface (transfer.pyx), for type checkers.
from typing import Any

class Transfers:
    in_flight: bool
    def __init__(
        self,
        registry: Any,
        *,
        backed: Any,
        words: Any,
        gate_word: int,
        page_shift: int,
        chunk_shift: int,
        pin_bias: int,
        in_image: int,
        counter_slots: tuple[int, int, int, int],
        io_slots: tuple[int, ...],
        max_file: int,
    ) -> None: ...
    def bind(self, own_in_image: memoryview, counters: memoryview) -> None: ...
    @property
    def transfer(self) -> tuple[bool, int, int, int, int, int] | None: ...
    def begin(self, pin: bool, pid: int, file: int, off: int, size: int) -> None: ...
    def begin_read(self, pin: bool, pid: int, file: int, off: int, size: int) -> None: ...
    def end(self) -> None: ...
    def count_read(self, file: int, size: int, direct: bool) -> None: ...
    def count_write(self, file: int, size: int, direct: bool) -> None: ...
