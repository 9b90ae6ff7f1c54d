"""Ground truth checked against the prediction it labels, before it is stored: a label that can never match
(text for a regression model, 3.5 or "cat" for a model of whole-number classes, 2 or -1 for a prediction read with
a threshold, which is class 0 or 1) is refused with why, instead of being stored as a class of its own and dragging
accuracy down unseen; a class name from the model's labels file stands for its index. The Monitoring service's
feedback RPCs (server/rpc/monitoring.py) build one LabelRule per loaded model version."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tensorgate.server.errors import InvalidRequestError
from tensorgate.server.monitoring.drift import category_keys
from tensorgate.server.monitoring.quality import TaskSpec, TaskSpecError, label_domain, prediction_reading

if TYPE_CHECKING:
    from tensorgate.server.repository.manager import LoadedModel

__all__ = ["LabelRule"]


@dataclass(frozen=True, slots=True)
class LabelRule:
    """How ground truth for one loaded model version is checked: its task spec and its class names.

    A label that can never match the version's predictions (text for a regression model, 3.5 or "cat" for a model
    that predicts whole-number classes, N or more for an argmax over N columns) is refused rather than stored as a
    class of its own; a class name from the model's labels file stands for its index, as Triton's classification
    answers ``0.99:3:three``.
    """

    spec: TaskSpec
    names: Mapping[str, int]
    """Class index by name (stripped), from the ``label_filename`` of the prediction output, else of the model's
    one output that has one; empty when neither."""
    names_of: str | None
    """The output whose labels file gave ``names``."""

    @classmethod
    def of(cls, model: LoadedModel) -> LabelRule | None:
        """None for a malformed task parameter: GetModelQuality says what is wrong, and feedback is kept as sent."""
        try:
            spec = TaskSpec.from_config(model.config)
        except TaskSpecError:
            return None
        outputs = model.schema.outputs
        source = outputs.get(spec.output) if spec.output is not None else None
        if source is None or not source.labels:
            labelled = [o for o in outputs.values() if o.labels]
            source = labelled[0] if len(labelled) == 1 else None
        names: dict[str, int] = {}
        for i, name in enumerate(source.labels if source is not None else ()):
            if name.strip():
                names.setdefault(name.strip(), i)
        return cls(spec, names, source.name if source is not None and names else None)

    def check(self, version: str, request_id: str, label: np.ndarray, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """The label as stored, checked against the prediction the version captured: text that names a number is
        stored as quality compares it (" 3", "3.0" and "three" as "3"); INVALID_ARGUMENT when it cannot match."""
        try:
            return self._check(version, request_id, label, outputs)
        except InvalidRequestError as exc:
            if label.dtype.kind not in "biuf" or not self._maybe_regressor(outputs):
                raise
            # A regressor served without tensorgate.task is judged as a classifier (the default): its one float
            # column reads as a score, and every true value of a regression is refused with nothing to say why.
            # Only a number can be a regression's true value; a sigmoid classifier's wrong label reads the same.
            hint = "; if the model is a regressor, set the config.pbtxt parameter tensorgate.task: regression"
            raise InvalidRequestError(exc.model, exc.version, exc.problem + hint, tensor=exc.tensor) from None

    def _maybe_regressor(self, outputs: dict[str, np.ndarray]) -> bool:
        """The task left at its default, classification, and the prediction one float column, as a regressor's."""
        if self.spec.task != "classification" or self.spec.kind is not None:
            return False
        try:
            return prediction_reading(self.spec, outputs)[0] == "score_or_class"
        except TaskSpecError:
            return False

    def _check(self, version: str, request_id: str, label: np.ndarray, outputs: dict[str, np.ndarray]) -> np.ndarray:
        try:
            domain = label_domain(self.spec, outputs)
        except TaskSpecError:
            return label  # captured without the prediction output: quality cannot judge it either
        if domain is None:
            return label  # text predictions: labels are free text
        classes = self._classes(outputs) if domain == "class" else None
        if label.dtype.kind == "f":  # numbers, finite (decode_label)
            fractional = label[label != np.floor(label)]
            if domain == "class" and fractional.size:
                raise self._refused(version, request_id, f"label {fractional[0]:g} is not a whole number", domain)
            if classes is not None:
                for value in label.tolist():
                    self._check_class(version, request_id, f"{value:g}", value, classes)
            return label
        values: list[float | int] = []
        for text in label.tolist():
            value = _number(text)
            if value is None and domain == "class" and text.strip() in self.names:
                value = self.names[text.strip()]
            if value is None:
                problem = "is neither a whole number nor a class name" if domain == "class" else "is not a number"
                raise self._refused(version, request_id, f"label {text!r} {problem}", domain)
            if isinstance(value, float):
                if not math.isfinite(value):
                    raise self._refused(version, request_id, f"label {text!r} is a NaN or infinity", domain)
                if domain == "class":
                    if not value.is_integer():
                        raise self._refused(version, request_id, f"label {text!r} is not a whole number", domain)
                    value = int(value)
            if classes is not None:
                self._check_class(version, request_id, repr(text), value, classes)
            values.append(value)
        return np.asarray(category_keys(np.asarray(values, dtype=object)), dtype=np.str_)

    def _classes(self, outputs: dict[str, np.ndarray]) -> tuple[int, str] | None:
        """How many classes (0 to N-1) the captured prediction can be, with how it is read, when its reading bounds
        them: a threshold gives 0 or 1, an argmax one of its columns. An integer output or a whole number in a
        classifier's one float column is the class itself, which may be any number (None)."""
        kind, rows = prediction_reading(self.spec, outputs)
        output = f"output '{self.spec.output if self.spec.output is not None else next(iter(outputs))}'"
        threshold = f"threshold {self.spec.threshold:g} on {output}"
        if kind == "threshold":
            return 2, f"the prediction is read with {threshold} (prediction kind threshold)"
        if kind == "argmax":
            return rows.shape[1], f"the prediction is the argmax of {output} ({rows.shape[1]} columns)"
        if kind == "score_or_class":
            column = rows[:, 0].astype(np.float64)
            if np.any(np.isfinite(column) & (column != np.floor(column))):
                return 2, f"the prediction is a score read with {threshold} (a classifier's one float column)"
        return None

    def _check_class(self, version: str, request_id: str, shown: str, value: float, classes: tuple[int, str]) -> None:
        """INVALID_ARGUMENT for a class outside the prediction's 0 to N-1: it could never be predicted."""
        n, reading = classes
        if 0 <= value < n:
            return
        span = "0 and 1" if n == 2 else f"0 to {n - 1}"
        problem = f"label {shown} can never match"
        raise InvalidRequestError(
            self.spec.model, version, f"feedback for request '{request_id}': {problem}: {reading}, classes {span}"
        )

    def _refused(self, version: str, request_id: str, problem: str, domain: str) -> InvalidRequestError:
        spec = self.spec
        output = f"output '{spec.output}'" if spec.output is not None else "its first output"
        if spec.task == "regression":
            why = "the model's task is regression: a label is a number"
        elif domain == "number":
            why = f"the model's predictions are numbers ({output} read as {spec.kind or 'label'})"
        else:
            why = f"the model's predictions are whole-number classes (task classification, {output})"
            if self.names:
                first = ", ".join(repr(n) for n in list(self.names)[:3])
                why += f"; class names are those of output '{self.names_of}' ({first}, ...)"
            else:
                why += ", and it has no class names (no label_filename)"
        return InvalidRequestError(spec.model, version, f"feedback for request '{request_id}': {problem}; {why}")


def _number(text: str) -> int | float | None:
    """The number a text label writes (surrounding whitespace allowed), else None."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None
