"""Log lines that a caller can repeat at will, let out at most once an interval with a count of those held back.

A client without a token that retries in a loop, or a scraper past the metrics port's connection limit, would
otherwise write a WARNING per attempt: the log fills, and whatever else it should show scrolls away. The first
line of each kind still goes out at once; the counters in /metrics keep the full count.
"""

from __future__ import annotations

import math
import time


class Sparse:
    """`due()` says whether a line may go out now, and how many it stands for; not thread-safe on its own (each
    user calls it from one thread: the event loop, or the metrics port's accept loop)."""

    __slots__ = ("interval_s", "_next", "_held")

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._next = -math.inf
        self._held = 0

    def due(self) -> int | None:
        """None while the interval since the last line runs (this one is held back and counted); else the number
        of lines held back since the last one (0 for the first), and the interval starts again."""
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return None
        held, self._held, self._next = self._held, 0, now + self.interval_s
        return held

    @staticmethod
    def since(held: int) -> str:
        """The suffix that says how many lines a line stands for."""
        return f" ({held} more like it since the last such line)" if held else ""
