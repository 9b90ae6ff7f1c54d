"""Triton's classification extension: an output asked for with `classification: k` comes back as its top k classes.

Each class is the BYTES element "value:index" or "value:index:label", best first, per batch row (shape [rows, k])
or for the whole tensor when the model does not batch (shape [k]); k is capped at the number of classes. Values are
written as Triton writes them (C's `%f` for floats, decimal integers), so clients that parse Triton's strings parse
these. Equal values keep index order; NaN ranks last.
"""

from __future__ import annotations

import numpy as np

CLASSIFIABLE = frozenset({"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64"})
"""The datatypes Triton classifies; others (BOOL, FP16, BF16, BYTES) are refused before the model runs."""


def top_k(array: np.ndarray, k: int, labels: tuple[str, ...], batched: bool) -> np.ndarray:
    """The top `k` classes of each row of `array` (one row when not `batched`), as an object array of bytes."""
    rows = array.reshape(array.shape[0] if batched else 1, -1)
    classes = rows.shape[1]
    k = min(k, classes)
    if rows.dtype.kind == "f":
        order = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    else:
        # Negating would wrap unsigned values: sort the reversed row ascending, read it backwards, map indices back.
        order = classes - 1 - np.argsort(rows[:, ::-1], axis=1, kind="stable")[:, ::-1][:, :k]
    values = np.take_along_axis(rows, order, axis=1).tolist()
    floats = rows.dtype.kind == "f"
    out = np.empty((rows.shape[0], k), dtype=object)
    for r, (row_values, row_order) in enumerate(zip(values, order.tolist(), strict=True)):
        for j, (value, index) in enumerate(zip(row_values, row_order, strict=True)):
            text = f"{value:f}:{index}" if floats else f"{value}:{index}"
            label = labels[index] if index < len(labels) else ""
            out[r, j] = (f"{text}:{label}" if label else text).encode()
    return out if batched else out.reshape(k)
