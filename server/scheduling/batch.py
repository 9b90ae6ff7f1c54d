"""Pure batch arithmetic, no timing or asyncio: which queued requests form the next batch, how their inputs are
stacked and how the outputs are split back. Plain functions, so they get plain unit tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def plan_batch(
    rows: Sequence[int],
    max_batch_size: int,
    preferred: Sequence[int],
    delay_expired: bool,
) -> int:
    """How many requests (from the front of `rows`, the queue in service order) to send now; 0 = keep waiting.

    Sends at once when the batch is full (max_batch_size reached, or the next request does not fit), when a
    preferred size can be formed, or when the queue delay of the oldest request is over. A request is never
    split, so a full batch can hold fewer than max_batch_size rows.
    """
    total = 0
    count = 0
    for r in rows:
        if total + r > max_batch_size:
            break
        total += r
        count += 1
    if count == 0:
        return 0
    full = total == max_batch_size or count < len(rows)
    if preferred and (full or total >= preferred[-1]):
        return _largest_preferred_prefix(rows[:count], preferred) or count
    if full or delay_expired:
        return count
    return 0


def _largest_preferred_prefix(rows: Sequence[int], preferred: Sequence[int]) -> int:
    wanted = set(preferred)
    best = 0
    total = 0
    for i, r in enumerate(rows, 1):
        total += r
        if total in wanted:
            best = i
    return best


def stack_inputs(requests: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One np.concatenate per input (the only copy of request data); a single request passes through as is."""
    if len(requests) == 1:
        return dict(requests[0])
    return {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}


def split_outputs(
    outputs: Mapping[str, np.ndarray],
    rows: Sequence[int],
    wanted: Sequence[Sequence[str]],
    batch_dimension: bool = True,
) -> list[dict[str, np.ndarray]]:
    """Cut batch outputs back into per-request views (no copies), each with only the outputs it asked for.

    Raises ValueError when an output's first dimension does not add up to the rows sent: the model broke the
    batching contract, and every request of the batch must fail rather than get someone else's rows. A lone
    request is checked too when the model has a batch dimension (`batch_dimension`); without one, its outputs'
    first dimension is the model's own.
    """
    total = sum(rows)
    if len(rows) > 1 or batch_dimension:
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise ValueError(f"output '{name}' has shape {list(array.shape)}, expected {total} rows")
    if len(rows) == 1:  # the arrays as they are: no slicing for the common unbatched case
        return [{name: outputs[name] for name in wanted[0]}]
    result: list[dict[str, np.ndarray]] = []
    start = 0
    for n, names in zip(rows, wanted, strict=True):
        result.append({name: outputs[name][start : start + n] for name in names})
        start += n
    return result
