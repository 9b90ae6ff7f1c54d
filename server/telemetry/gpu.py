"""GPU memory and utilisation on /metrics, read through NVML (nvidia-ml-py, in the `gpu` extra) at scrape time.

    reader = open_gpu_metrics(registry)   # None, with the reason logged once, when there is nothing to read
    ...
    if reader is not None:
        reader.close()

Two halves, so the formatting is tested with values on machines without a GPU: `NvmlReader.read()` turns NVML
into plain `GpuReading`s, and `gpu_families()` turns readings into metric families. No pynvml, no driver, no
device, or `CUDA_VISIBLE_DEVICES` hiding every device: the GPU families are simply absent and the log says why.
Only the devices this process can use are read: NVML numbers every GPU on the machine, so
`CUDA_VISIBLE_DEVICES` (indices or `GPU-` UUID prefixes, as CUDA reads it) picks them.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from tensorgate.server.decimal_text import parse_decimal

log = logging.getLogger(__name__)

GPU_LABELS = ("gpu", "uuid", "name")
# Exposed name -> help text; the families are gauges with GPU_LABELS (`gpu` is NVML's device index).
GPU_FAMILIES: dict[str, str] = {
    "tensorgate_gpu_memory_used_bytes": "GPU memory in use on the device, by every process (NVML)",
    "tensorgate_gpu_memory_total_bytes": "GPU memory on the device (NVML)",
    "tensorgate_gpu_utilization_ratio": "Fraction of NVML's last sample period (1/6 s to 1 s) in which a kernel "
    "ran on the device",
    "tensorgate_gpu_memory_utilization_ratio": "Fraction of NVML's last sample period in which device memory was "
    "read or written",
    "tensorgate_gpu_power_watts": "Power the device draws (NVML)",
}
TRITON_GPU_LABELS = ("gpu_uuid",)
# Triton's names for two of the readings, with its one label: perf_analyzer's --collect-metrics reads them, as do
# dashboards made for Triton. Not its nv_gpu_memory_*_bytes: perf_analyzer reads those as integers, and
# prometheus_client writes any value of a million or more in exponent form (2.147483648e+09), which it would take
# for 2 bytes. No value is better than a wrong one.
TRITON_GPU_FAMILIES: dict[str, str] = {
    "nv_gpu_utilization": "GPU utilization rate [0.0 - 1.0)",
    "nv_gpu_power_usage": "GPU power usage in watts",
}


class GpuUnavailable(Exception):
    """Why this process exports no GPU metrics; logged once when metrics start."""


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One device at one scrape; a value NVML does not support on that device (MIG, some boards) is None."""

    index: int
    uuid: str
    name: str
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    utilization: float | None
    memory_utilization: float | None
    power_watts: float | None = None


def gpu_families(readings: Iterable[GpuReading]) -> list[Metric]:
    """The tensorgate_gpu_* families for these readings, and Triton's nv_gpu_* for two of them; a None value
    leaves that series out."""
    families = {name: GaugeMetricFamily(name, text, labels=list(GPU_LABELS)) for name, text in GPU_FAMILIES.items()}
    triton = {
        name: GaugeMetricFamily(name, text, labels=list(TRITON_GPU_LABELS))
        for name, text in TRITON_GPU_FAMILIES.items()
    }
    for r in readings:
        labels = [str(r.index), r.uuid, r.name]
        for name, alias, v in (
            ("tensorgate_gpu_memory_used_bytes", None, r.memory_used_bytes),
            ("tensorgate_gpu_memory_total_bytes", None, r.memory_total_bytes),
            ("tensorgate_gpu_utilization_ratio", "nv_gpu_utilization", r.utilization),
            ("tensorgate_gpu_memory_utilization_ratio", None, r.memory_utilization),
            ("tensorgate_gpu_power_watts", "nv_gpu_power_usage", r.power_watts),
        ):
            if v is not None:
                families[name].add_metric(labels, v)
                if alias is not None:
                    triton[alias].add_metric([r.uuid], v)
    return [*families.values(), *triton.values()]


def visible_devices(devices: Sequence[tuple[int, str]], spec: str | None) -> list[int]:
    """NVML indices of the (index, uuid) `devices` that CUDA shows this process under `CUDA_VISIBLE_DEVICES=spec`.

    As CUDA reads it: unset means all; entries are indices or unique `GPU-` UUID prefixes; the list ends at the
    first entry that names no device (so "" or "-1" hides every GPU). MIG entries end it too: NVML's device-level
    readings would describe the whole GPU, not the slice this process has.
    """
    if spec is None:
        return [index for index, _ in devices]
    chosen: list[int] = []
    for raw in spec.split(","):
        entry = raw.strip()
        number = parse_decimal(entry)
        if number is not None:
            match = [index for index, _ in devices if index == number]
        elif entry.startswith("GPU-"):
            match = [index for index, uuid in devices if uuid.startswith(entry)]
        else:
            match = []
        if len(match) != 1 or match[0] in chosen:
            break
        chosen.append(match[0])
    return chosen


class NvmlReader:
    """NVML opened on the devices this process can use; `read()` is safe from any thread (NVML is thread-safe).

    Raises GpuUnavailable, with the reason, when pynvml is not installed, the driver is missing or broken, or no
    device is visible.
    """

    def __init__(self, cuda_visible_devices: str | None = None) -> None:
        try:
            import pynvml
        except ImportError:
            raise GpuUnavailable("nvidia-ml-py is not installed (pip install 'tensorgate[gpu]')") from None
        self._nvml: Any = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound:
            raise GpuUnavailable("no NVIDIA driver: the NVML library (libnvidia-ml.so.1) was not found") from None
        except pynvml.NVMLError as exc:
            raise GpuUnavailable(f"NVML did not start: {exc}") from None
        try:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            devices = [(i, str(pynvml.nvmlDeviceGetUUID(h))) for i, h in enumerate(handles)]
            names = [str(pynvml.nvmlDeviceGetName(h)) for h in handles]
        except pynvml.NVMLError as exc:
            pynvml.nvmlShutdown()
            raise GpuUnavailable(f"NVML could not list the GPUs: {exc}") from None
        chosen = visible_devices(devices, cuda_visible_devices)
        if not chosen:
            pynvml.nvmlShutdown()
            if not devices:
                raise GpuUnavailable("NVML sees no GPU")
            raise GpuUnavailable(
                f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} shows none of the {len(devices)} GPU(s)"
            )
        self.devices = [(i, devices[i][1], names[i], handles[i]) for i in chosen]
        self._failures: set[str] = set()
        self._lock = threading.Lock()
        self._open = True

    def read(self) -> list[GpuReading]:
        """One reading per device; a value that fails is None, and each distinct failure is logged once."""
        with self._lock:  # against close() during a scrape, and for _failures
            if not self._open:
                return []
            readings = []
            for index, uuid, name, handle in self.devices:
                used, total = self._value(index, "memory", _memory, handle)
                busy, memory_busy = self._value(index, "utilization", _utilization, handle)
                watts, _ = self._value(index, "power", _power, handle)
                readings.append(GpuReading(index, uuid, name, used, total, busy, memory_busy, watts))
            return readings

    def _value(self, index: int, what: str, get: Callable[[Any, Any], tuple[Any, Any]], handle: Any) -> tuple[Any, Any]:
        try:
            return get(self._nvml, handle)
        except self._nvml.NVMLError as exc:
            message = f"GPU {index} {what}: {exc}"
            if message not in self._failures:
                self._failures.add(message)
                log.warning("GPU metrics: reading %s failed; left out while it fails", message)
            return None, None

    def close(self) -> None:
        with self._lock:
            if self._open:
                self._open = False
                self._nvml.nvmlShutdown()


def _memory(nvml: Any, handle: Any) -> tuple[int, int]:
    info = nvml.nvmlDeviceGetMemoryInfo(handle)
    return int(info.used), int(info.total)


def _utilization(nvml: Any, handle: Any) -> tuple[float, float]:
    rates = nvml.nvmlDeviceGetUtilizationRates(handle)
    return rates.gpu / 100, rates.memory / 100


def _power(nvml: Any, handle: Any) -> tuple[float, None]:
    return nvml.nvmlDeviceGetPowerUsage(handle) / 1000, None  # NVML answers in milliwatts


class GpuCollector(Collector):
    """Reads the GPUs when Prometheus scrapes (on the HTTP thread, never on the event loop)."""

    def __init__(self, read: Callable[[], Iterable[GpuReading]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        return gpu_families(self._read())


def open_gpu_metrics(registry: CollectorRegistry) -> NvmlReader | None:
    """Register the GPU families on `registry` when NVML can read a GPU this process can use; else log why, once."""
    try:
        reader = NvmlReader(os.environ.get("CUDA_VISIBLE_DEVICES"))
    except GpuUnavailable as exc:
        log.info("GPU metrics off: %s", exc)
        return None
    registry.register(GpuCollector(reader.read))
    log.info("GPU metrics on: %s", ", ".join(f"GPU {i} {name} ({uuid})" for i, uuid, name, _ in reader.devices))
    return reader


__all__ = [
    "GPU_FAMILIES",
    "GPU_LABELS",
    "GpuCollector",
    "GpuReading",
    "GpuUnavailable",
    "NvmlReader",
    "TRITON_GPU_FAMILIES",
    "TRITON_GPU_LABELS",
    "gpu_families",
    "open_gpu_metrics",
    "visible_devices",
]
