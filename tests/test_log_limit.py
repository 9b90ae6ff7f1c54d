"""A log line anyone can repeat goes out once an interval, and the next one says how many it stands for."""

from __future__ import annotations

import time

from tensorgate.server.log_limit import Sparse


def test_a_sparse_line_counts_those_held_back() -> None:
    sparse = Sparse(interval_s=1.0)
    assert sparse.due() == 0  # the first goes out at once
    assert [sparse.due() for _ in range(3)] == [None, None, None]
    time.sleep(1.05)
    assert sparse.due() == 3
    assert sparse.due() is None
    assert Sparse.since(3) == " (3 more like it since the last such line)"
    assert Sparse.since(0) == ""
