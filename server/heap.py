"""Keep long-lived objects out of Python's full garbage collections.

A full (generation 2) collection walks every tracked object in the process, and it runs on whichever thread
allocates at the time, usually the event loop: with models, ONNX Runtime, gRPC and protobuf descriptors loaded,
each one stopped the server for about 30 ms, every few seconds under load, showing as 60 ms spikes at p99.9
(measured with `tensorgate bench mlp --concurrency 16,32 --duration 10`). What exists once the models are
loaded lives as long as they do, so it is frozen (`gc.freeze`): full collections then walk only what requests
allocated since. Whenever the served models change, the heap is unfrozen, collected once (unloaded models' cycles
go) and frozen again.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def settle() -> None:
    """Collect everything, then freeze what survives; call when the long-lived set has changed."""
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    log.debug(
        "heap settled: %d objects frozen in %.1f ms", gc.get_freeze_count(), (time.perf_counter() - started) * 1e3
    )


__all__ = ["settle"]
