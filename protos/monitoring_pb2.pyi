# mypy: disable-error-code="type-arg, no-untyped-def"
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Feedback(_message.Message):
    __slots__ = ("request_id", "values", "labels")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    values: _containers.RepeatedScalarFieldContainer[float]
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class SubmitFeedbackRequest(_message.Message):
    __slots__ = ("model", "feedback")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    model: str
    feedback: Feedback
    def __init__(self, model: _Optional[str] = ..., feedback: _Optional[_Union[Feedback, _Mapping]] = ...) -> None: ...

class SubmitFeedbackResponse(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class SubmitFeedbackBatchRequest(_message.Message):
    __slots__ = ("model", "items")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    model: str
    items: _containers.RepeatedCompositeFieldContainer[Feedback]
    def __init__(self, model: _Optional[str] = ..., items: _Optional[_Iterable[_Union[Feedback, _Mapping]]] = ...) -> None: ...

class FeedbackStatus(_message.Message):
    __slots__ = ("request_id", "code", "message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    code: int
    message: str
    def __init__(self, request_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class SubmitFeedbackBatchResponse(_message.Message):
    __slots__ = ("statuses", "accepted")
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedCompositeFieldContainer[FeedbackStatus]
    accepted: int
    def __init__(self, statuses: _Optional[_Iterable[_Union[FeedbackStatus, _Mapping]]] = ..., accepted: _Optional[int] = ...) -> None: ...

class Window(_message.Message):
    __slots__ = ("count", "seconds")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    count: int
    seconds: float
    def __init__(self, count: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class GetModelQualityRequest(_message.Message):
    __slots__ = ("model", "version", "window")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    window: Window
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., window: _Optional[_Union[Window, _Mapping]] = ...) -> None: ...

class ClassQuality(_message.Message):
    __slots__ = ("label", "precision", "recall", "f1", "support")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    F1_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_FIELD_NUMBER: _ClassVar[int]
    label: str
    precision: float
    recall: float
    f1: float
    support: int
    def __init__(self, label: _Optional[str] = ..., precision: _Optional[float] = ..., recall: _Optional[float] = ..., f1: _Optional[float] = ..., support: _Optional[int] = ...) -> None: ...

class ModelQuality(_message.Message):
    __slots__ = ("model", "version", "task", "predictions", "labelled", "metrics", "classes", "class_labels", "confusion", "rows")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_LABELS_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    task: str
    predictions: int
    labelled: int
    metrics: _containers.ScalarMap[str, float]
    classes: _containers.RepeatedCompositeFieldContainer[ClassQuality]
    class_labels: _containers.RepeatedScalarFieldContainer[str]
    confusion: _containers.RepeatedScalarFieldContainer[int]
    rows: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., task: _Optional[str] = ..., predictions: _Optional[int] = ..., labelled: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., classes: _Optional[_Iterable[_Union[ClassQuality, _Mapping]]] = ..., class_labels: _Optional[_Iterable[str]] = ..., confusion: _Optional[_Iterable[int]] = ..., rows: _Optional[int] = ...) -> None: ...

class GetModelDriftRequest(_message.Message):
    __slots__ = ("model", "version", "window")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    window: Window
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., window: _Optional[_Union[Window, _Mapping]] = ...) -> None: ...

class FeatureDrift(_message.Message):
    __slots__ = ("name", "kind", "psi", "statistic", "p_value", "drifted")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PSI_FIELD_NUMBER: _ClassVar[int]
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    DRIFTED_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    psi: float
    statistic: float
    p_value: float
    drifted: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., psi: _Optional[float] = ..., statistic: _Optional[float] = ..., p_value: _Optional[float] = ..., drifted: _Optional[bool] = ...) -> None: ...

class ModelDrift(_message.Message):
    __slots__ = ("model", "version", "samples", "drifted", "psi_max", "psi_mean", "drifted_share", "score_drift", "features", "skipped")
    class SkippedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DRIFTED_FIELD_NUMBER: _ClassVar[int]
    PSI_MAX_FIELD_NUMBER: _ClassVar[int]
    PSI_MEAN_FIELD_NUMBER: _ClassVar[int]
    DRIFTED_SHARE_FIELD_NUMBER: _ClassVar[int]
    SCORE_DRIFT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    samples: int
    drifted: bool
    psi_max: float
    psi_mean: float
    drifted_share: float
    score_drift: float
    features: _containers.RepeatedCompositeFieldContainer[FeatureDrift]
    skipped: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., samples: _Optional[int] = ..., drifted: _Optional[bool] = ..., psi_max: _Optional[float] = ..., psi_mean: _Optional[float] = ..., drifted_share: _Optional[float] = ..., score_drift: _Optional[float] = ..., features: _Optional[_Iterable[_Union[FeatureDrift, _Mapping]]] = ..., skipped: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListAlertsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("rule", "model", "version", "state", "value", "threshold", "timestamp")
    RULE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    rule: str
    model: str
    version: str
    state: str
    value: float
    threshold: float
    timestamp: float
    def __init__(self, rule: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[str] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., timestamp: _Optional[float] = ...) -> None: ...

class ListAlertsResponse(_message.Message):
    __slots__ = ("alerts",)
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    def __init__(self, alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ...) -> None: ...

class GetRolloutRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class RolloutState(_message.Message):
    __slots__ = ("model", "stable_version", "canary_version", "canary_share", "steps", "step", "rolled_back", "alerts", "step_held_s", "step_requests", "ramp_interval_s", "ramp_min_requests", "canary_failed_percent", "canary_judged", "stable_failed_percent", "stable_judged", "max_error_percent", "error_gate", "waiting_for", "shadow_version", "shadow_percent")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_SHARE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    STEP_HELD_S_FIELD_NUMBER: _ClassVar[int]
    STEP_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RAMP_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    RAMP_MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CANARY_FAILED_PERCENT_FIELD_NUMBER: _ClassVar[int]
    CANARY_JUDGED_FIELD_NUMBER: _ClassVar[int]
    STABLE_FAILED_PERCENT_FIELD_NUMBER: _ClassVar[int]
    STABLE_JUDGED_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_PERCENT_FIELD_NUMBER: _ClassVar[int]
    ERROR_GATE_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_PERCENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    stable_version: str
    canary_version: str
    canary_share: float
    steps: _containers.RepeatedScalarFieldContainer[float]
    step: int
    rolled_back: str
    alerts: _containers.RepeatedScalarFieldContainer[str]
    step_held_s: float
    step_requests: int
    ramp_interval_s: float
    ramp_min_requests: int
    canary_failed_percent: float
    canary_judged: int
    stable_failed_percent: float
    stable_judged: int
    max_error_percent: float
    error_gate: bool
    waiting_for: _containers.RepeatedScalarFieldContainer[str]
    shadow_version: str
    shadow_percent: float
    def __init__(self, model: _Optional[str] = ..., stable_version: _Optional[str] = ..., canary_version: _Optional[str] = ..., canary_share: _Optional[float] = ..., steps: _Optional[_Iterable[float]] = ..., step: _Optional[int] = ..., rolled_back: _Optional[str] = ..., alerts: _Optional[_Iterable[str]] = ..., step_held_s: _Optional[float] = ..., step_requests: _Optional[int] = ..., ramp_interval_s: _Optional[float] = ..., ramp_min_requests: _Optional[int] = ..., canary_failed_percent: _Optional[float] = ..., canary_judged: _Optional[int] = ..., stable_failed_percent: _Optional[float] = ..., stable_judged: _Optional[int] = ..., max_error_percent: _Optional[float] = ..., error_gate: _Optional[bool] = ..., waiting_for: _Optional[_Iterable[str]] = ..., shadow_version: _Optional[str] = ..., shadow_percent: _Optional[float] = ...) -> None: ...
