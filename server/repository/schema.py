"""A model's tensor schema, precomputed from its effective config so validation does no config lookups."""

from __future__ import annotations

from dataclasses import dataclass

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server import datatypes
from tensorgate.server.errors import InvalidConfigError


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output: `dims` as the caller sees them (per row when batching), -1 for any size."""

    name: str
    datatype: datatypes.DataType
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None
    optional: bool = False
    text: bool = False
    """BYTES that the model takes as text (ONNX string tensors): each element must be UTF-8."""
    labels: tuple[str, ...] = ()
    """An output's class labels (its `label_filename`), for classification results; () when it has none."""

    def shape_text(self, max_batch_size: int) -> str:
        """The full shape as ModelMetadata reports it: -1 first when the model batches."""
        full = ((-1,) if max_batch_size > 0 else ()) + self.dims
        return str(list(full))


@dataclass(frozen=True, slots=True)
class ModelSchema:
    max_batch_size: int
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    @classmethod
    def from_config(
        cls,
        config: mc.ModelConfig,
        bytes_are_text: bool = False,
        labels: dict[str, tuple[str, ...]] | None = None,
    ) -> ModelSchema:
        """`bytes_are_text` for a backend whose BYTES tensors are strings (ONNX Runtime): requests are then checked
        one by one for UTF-8 before they queue, so that one caller's bad bytes fail that caller alone, not every
        request batched with it. `labels` are the outputs' class labels (repository/labels.py)."""

        def spec(t: mc.ModelInput | mc.ModelOutput, optional: bool) -> TensorSpec:
            datatype = datatypes.BY_CONFIG_TYPE.get(t.data_type)
            if datatype is None:
                raise InvalidConfigError(
                    config.name,
                    f"tensor '{t.name}' has a type tensorgate cannot serve ({mc.DataType.Name(t.data_type)})",
                )
            return TensorSpec(
                name=t.name,
                datatype=datatype,
                dims=tuple(t.dims),
                reshape=tuple(t.reshape.shape) if t.HasField("reshape") else None,
                optional=optional,
                text=bytes_are_text and datatype.name == "BYTES",
                labels=(labels or {}).get(t.name, ()) if isinstance(t, mc.ModelOutput) else (),
            )

        return cls(
            max_batch_size=config.max_batch_size,
            inputs={t.name: spec(t, t.optional) for t in config.input},
            outputs={t.name: spec(t, False) for t in config.output},
        )
