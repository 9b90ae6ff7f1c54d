"""The three spellings of a tensor element type and the conversions between them.

The table lives in ``tensorgate.protos.tensors``, shared with the client; the server imports it from here.
"""

from __future__ import annotations

from tensorgate.protos.tensors import BY_CONFIG_TYPE, BY_NAME, DataType, config_type_name, from_numpy

__all__ = ["BY_CONFIG_TYPE", "BY_NAME", "DataType", "config_type_name", "from_numpy"]
