"""The three spellings of a tensor element type and the conversions between them.

The wire protocol names types as strings ("FP32"), Triton's ModelConfig as enum values (TYPE_FP32) and numpy as
dtypes. Everything that compares or converts types goes through this table so that the three never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tensorgate.protos import model_config_pb2 as mc


@dataclass(frozen=True, slots=True)
class DataType:
    """One element type in all its spellings; `np_dtype` is little-endian, as the wire format is."""

    name: str
    config_type: int
    np_dtype: np.dtype[np.generic]
    contents_field: str | None

    @property
    def itemsize(self) -> int:
        """Bytes per element in `raw_*_contents`; BYTES has none (length-prefixed, variable)."""
        return 0 if self.name == "BYTES" else self.np_dtype.itemsize


def _dt(name: str, config_type: int, dtype: str, contents_field: str | None) -> DataType:
    return DataType(name, config_type, np.dtype(dtype), contents_field)


_ALL = (
    _dt("BOOL", mc.TYPE_BOOL, "?", "bool_contents"),
    _dt("UINT8", mc.TYPE_UINT8, "u1", "uint_contents"),
    _dt("UINT16", mc.TYPE_UINT16, "<u2", "uint_contents"),
    _dt("UINT32", mc.TYPE_UINT32, "<u4", "uint_contents"),
    _dt("UINT64", mc.TYPE_UINT64, "<u8", "uint64_contents"),
    _dt("INT8", mc.TYPE_INT8, "i1", "int_contents"),
    _dt("INT16", mc.TYPE_INT16, "<i2", "int_contents"),
    _dt("INT32", mc.TYPE_INT32, "<i4", "int_contents"),
    _dt("INT64", mc.TYPE_INT64, "<i8", "int64_contents"),
    # FP16 has no typed `contents` field in the protocol: it travels only as raw bytes.
    _dt("FP16", mc.TYPE_FP16, "<f2", None),
    _dt("FP32", mc.TYPE_FP32, "<f4", "fp32_contents"),
    _dt("FP64", mc.TYPE_FP64, "<f8", "fp64_contents"),
    _dt("BYTES", mc.TYPE_STRING, "O", "bytes_contents"),
)

BY_NAME: dict[str, DataType] = {d.name: d for d in _ALL}
BY_CONFIG_TYPE: dict[int, DataType] = {d.config_type: d for d in _ALL}


def from_numpy(dtype: np.dtype[np.generic]) -> DataType:
    """The wire type for a numpy dtype; str/bytes/object arrays are BYTES.

    Raises KeyError for dtypes the protocol cannot carry (complex, datetime, ...).
    """
    if dtype.kind in "OUS":
        return BY_NAME["BYTES"]
    for d in _ALL:
        if d.name != "BYTES" and d.np_dtype == dtype.newbyteorder("<"):
            return d
    raise KeyError(f"numpy dtype {dtype} has no V2 datatype")


def config_type_name(config_type: int) -> str:
    """The wire name for a ModelConfig data type (TYPE_STRING -> BYTES), or the enum name when unsupported."""
    d = BY_CONFIG_TYPE.get(config_type)
    if d is not None:
        return d.name
    return str(mc.DataType.Name(config_type)).removeprefix("TYPE_")
