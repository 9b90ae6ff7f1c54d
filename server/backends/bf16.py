"""bfloat16 tensors across onnxruntime's Python API, which has no numpy type for them.

tensorgate holds BF16 as `ml_dtypes.bfloat16` arrays (as tritonclient does). onnxruntime's `run` refuses those
and returns no array for a bfloat16 output, so a model with BF16 tensors runs through an IOBinding instead: each
input as an OrtValue over the same bytes, declared bfloat16, and each output bound to CPU memory and copied out
from its buffer. Models without BF16 tensors keep `InferenceSession.run`, which costs less per call.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from tensorgate.protos.tensors import BY_NAME

ONNX_TYPE = "tensor(bfloat16)"
"""How onnxruntime's NodeArg.type names it."""
_ELEMENT_TYPE = 16
"""TensorProto.BFLOAT16 (onnx is not a runtime dependency of the server)."""
DTYPE = BY_NAME["BF16"].np_dtype


def run(
    session: ort.InferenceSession,
    outputs: Sequence[str],
    feed: Mapping[str, np.ndarray],
    options: ort.RunOptions | None = None,
) -> list[np.ndarray]:
    """`session.run(outputs, feed, options)` for a model with BF16 tensors; the outputs are arrays that own their
    data."""
    binding = session.io_binding()
    # Held until the run returns: an OrtValue over an array's bytes does not keep the array alive, and before
    # onnxruntime 1.32 neither did the binding (a contiguous copy made here would be freed under the run).
    values = {name: _ort_value(array) for name, array in feed.items()}
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for name in outputs:
        binding.bind_output(name, "cpu")  # wherever the model ran: the copy out below reads host memory
    session.run_with_iobinding(binding, options)
    return [_array(value) for value in binding.get_outputs()]


def _ort_value(array: np.ndarray) -> ort.OrtValue:
    """An OrtValue over the array's bytes (no copy for a C-contiguous one; the wrapper holds the array)."""
    if not array.flags.c_contiguous:
        array = array.copy(order="C")  # not np.ascontiguousarray, which makes a scalar (0-d) one-dimensional
    if array.dtype == DTYPE:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), _ELEMENT_TYPE)
    return ort.OrtValue.ortvalue_from_numpy(array)


def _array(value: ort.OrtValue) -> np.ndarray:
    if value.data_type() != ONNX_TYPE:
        array: np.ndarray = value.numpy()
        return array
    out = np.empty(tuple(value.shape()), DTYPE)
    if out.size:  # one copy out of the binding's host buffer, which goes with the binding
        ctypes.memmove(out.ctypes.data, value.data_ptr(), out.nbytes)
    return out
