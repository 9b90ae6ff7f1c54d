"""Model monitoring inside the server: prediction capture, ground-truth feedback, quality, drift and alerts.

Capture, store, quality and the monitor loop (with drift and alerts, so scipy too) are imported here; the CLIs are
their own modules. The server imports this package only when monitoring is on (``--data-dir``), so that it
starts without loading scipy otherwise.
"""

from __future__ import annotations

from tensorgate.server.monitoring.capture import Capture, CaptureConfig
from tensorgate.server.monitoring.errors import NoReferenceError, PredictionNotFoundError
from tensorgate.server.monitoring.monitor import Monitor, MonitoringCollector, Window
from tensorgate.server.monitoring.quality import QualityReport, TaskSpec, compute_quality
from tensorgate.server.monitoring.store import DB_NAME, Prediction, PredictionStore

__all__ = [
    "DB_NAME",
    "Capture",
    "CaptureConfig",
    "Monitor",
    "MonitoringCollector",
    "NoReferenceError",
    "Prediction",
    "PredictionNotFoundError",
    "PredictionStore",
    "QualityReport",
    "TaskSpec",
    "Window",
    "compute_quality",
]
