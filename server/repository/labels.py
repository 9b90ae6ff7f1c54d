"""Class labels of outputs that name a `label_filename`, for Triton's classification extension.

Triton reads the file from the model's directory, one label per line, and refuses a path that leads outside it;
so does tensorgate. A missing or unreadable file fails the load (as in Triton), rather than serve classifications
that silently lack their labels.
"""

from __future__ import annotations

from pathlib import Path

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.errors import InvalidConfigError
from tensorgate.server.repository.paths import inside


def read_labels(config: mc.ModelConfig, model_dir: Path) -> dict[str, tuple[str, ...]]:
    """Labels by output name. Line i labels class index i; a line's trailing CR is dropped, so that a file written
    on Windows gives the same labels (Triton would keep the CR in every answer)."""
    labels: dict[str, tuple[str, ...]] = {}
    for output in config.output:
        filename = output.label_filename
        if not filename:
            continue
        path = inside(model_dir, filename)
        if path is None:
            raise InvalidConfigError(
                config.name, f"label_filename '{filename}' of output '{output.name}' is outside the model directory"
            )
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as exc:
            raise InvalidConfigError(
                config.name, f"label_filename '{filename}' of output '{output.name}' cannot be read: {exc.strerror}"
            ) from exc
        except UnicodeDecodeError as exc:
            raise InvalidConfigError(
                config.name, f"label_filename '{filename}' of output '{output.name}' is not UTF-8 text"
            ) from exc
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()  # the newline that ends the last line starts no label
        labels[output.name] = tuple(line.removesuffix("\r") for line in lines)
    return labels
