"""/metrics as Prometheus scrapes it: real HTTP(S) from a real server after known traffic, exact counts."""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos.tensors import encode_infer_request
from tensorgate.server import ServerSettings
from tensorgate.server.auth import certs
from tensorgate.server.telemetry.gpu import (
    GPU_FAMILIES,
    TRITON_GPU_FAMILIES,
    GpuCollector,
    GpuReading,
    GpuUnavailable,
    NvmlReader,
    visible_devices,
)
from tensorgate.server.telemetry.metrics import (
    MODEL_STATES,
    MetricsServer,
    RequestCounts,
    reference,
    reference_markdown,
)
from tests.onnx_models import accumulator_config, accumulator_model, identity_model, paced_model, write_config
from tests.pki import Pki, add_sub_request, identity_request, secure_channel
from tests.process import ServeProcess
from tests.scraping import families_of, metrics_url, samples_of, scrape, scrape_text, value
from tests.serving import ServerThread
from tests.test_tracing import _paced_request

MAX_ELEMENTS = 1000  # add_sub rows have 16 elements: 63 rows pass, 100 rows are RESOURCE_EXHAUSTED
SUCCESSES = 5


@pytest.fixture
def served(repo: Path) -> Iterator[ServerThread]:
    identity_model(repo / "broken" / "1" / "model.onnx", "FP32")
    write_config(
        repo, "broken", 'name: "broken"\nmax_batch_size: 4\ninput [ { name: "INPUT0" data_type: TYPE_BOOL } ]\n'
    )
    with ServerThread(repo, max_tensor_elements=MAX_ELEMENTS) as server:
        yield server


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_scrape_after_known_traffic_counts_exactly(served: ServerThread) -> None:
    with grpc.insecure_channel(served.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        for rows in (1, 2, 3, 1, 4)[:SUCCESSES]:
            stub.ModelInfer(add_sub_request(rows=rows), timeout=10)
        assert _code(lambda: stub.ModelInfer(add_sub_request("no_such_model"), timeout=10)) == (
            grpc.StatusCode.NOT_FOUND
        )
        assert _code(lambda: stub.ModelInfer(add_sub_request(rows=100), timeout=10)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        wrong_version = add_sub_request()
        wrong_version.model_version = "7"
        assert _code(lambda: stub.ModelInfer(wrong_version, timeout=10)) == grpc.StatusCode.NOT_FOUND
        # A stream: each message is one request, counted with its own status.
        ok, missing = add_sub_request(), add_sub_request("also_missing")
        ok.id, missing.id = "ok", "missing"
        replies = {r.infer_response.id: r for r in stub.ModelStreamInfer(iter([ok, missing]), timeout=10)}
        assert replies["ok"].error_message == "" and replies["missing"].error_message
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="add_sub", version="1"), timeout=10)
    (model_stats,) = stats.model_stats

    samples = scrape(metrics_url(served))

    requests = {labels: v for (name, labels), v in samples.items() if name == "tensorgate_inference_requests_total"}
    add_sub = {"model": "add_sub", "version": "1"}
    assert requests == {
        frozenset({**add_sub, "code": "OK"}.items()): SUCCESSES + 1,
        frozenset({**add_sub, "code": "RESOURCE_EXHAUSTED"}.items()): 1,
        # Names the server does not know never become label values (unbounded series otherwise).
        frozenset({"model": "", "version": "", "code": "NOT_FOUND"}.items()): 2,
        frozenset({"model": "add_sub", "version": "", "code": "NOT_FOUND"}.items()): 1,
    }
    for kind in ("request", "queue", "compute"):
        name = f"tensorgate_{kind}_duration_seconds"
        assert value(samples, f"{name}_count", **add_sub) == SUCCESSES + 1
        assert value(samples, f"{name}_bucket", **add_sub, le="+Inf") == SUCCESSES + 1
        assert value(samples, f"{name}_bucket", **add_sub, le="0.0001") <= value(
            samples, f"{name}_bucket", **add_sub, le="10.0"
        )
        assert value(samples, f"{name}_sum", **add_sub) > 0 or kind == "queue"
    assert value(samples, "tensorgate_request_duration_seconds_count", model="identity_fp32", version="1") == 0

    assert value(samples, "tensorgate_batch_size_count", **add_sub) == model_stats.execution_count
    assert (
        value(samples, "tensorgate_batch_size_sum", **add_sub) == model_stats.inference_count == 1 + 2 + 3 + 1 + 4 + 1
    )
    assert value(samples, "tensorgate_batch_size_bucket", **add_sub, le="+Inf") == model_stats.execution_count

    assert value(samples, "tensorgate_queue_depth", **add_sub) == 0
    assert value(samples, "tensorgate_inflight_requests") == 0
    assert value(samples, "tensorgate_model_load_duration_seconds", **add_sub) > 0
    assert value(samples, "process_resident_memory_bytes") > 0
    assert value(samples, "process_cpu_seconds_total") > 0


def test_model_state_gauge_shows_ready_and_failed_versions(served: ServerThread) -> None:
    samples = scrape(metrics_url(served))
    states = {
        (dict(labels)["model"], dict(labels)["version"], dict(labels)["state"]): v
        for (name, labels), v in samples.items()
        if name == "tensorgate_model_state"
    }
    expected = {("add_sub", "1"): "ready", ("identity_fp32", "1"): "ready", ("broken", "1"): "failed"}
    assert states == {(m, v, state): float(state == expected[(m, v)]) for (m, v) in expected for state in MODEL_STATES}

    served.run(served.app.repository.unload("add_sub"))
    samples = scrape(metrics_url(served))
    assert value(samples, "tensorgate_model_state", model="add_sub", version="", state="unloaded") == 1
    assert ("tensorgate_queue_depth", frozenset({"model": "add_sub", "version": "1"}.items())) not in samples


def test_an_unloaded_version_takes_its_request_series_with_it(repo: Path) -> None:
    """RepositoryModelUnload: every per-version series of the model goes, its request counters as its histograms
    and gauges did (they stayed, counting a version no longer served, until the server restarted); the state gauge
    says it is unloaded, and the count under the model's name alone (requests for versions it never had) stays.
    Loaded again, the version counts from zero, as its ModelStatistics do."""
    add_sub = frozenset({"model": "add_sub", "version": "1"}.items())

    def series(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> dict[str, float]:
        """Samples of add_sub version 1, by name (with its code or le label when it has one)."""
        out = {}
        for (name, labels), v in samples.items():
            if labels >= add_sub:
                extra = dict(labels - add_sub)
                out[name + "".join(f"{{{k}={extra[k]}}}" for k in sorted(extra))] = v
        return out

    with ServerThread(repo, model_control_mode="explicit", load_model=["*"]) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = GRPCInferenceServiceStub(channel)
            for _ in range(2):
                stub.ModelInfer(add_sub_request(), timeout=10)
            wrong_version = add_sub_request()
            wrong_version.model_version = "7"
            assert _code(lambda: stub.ModelInfer(wrong_version, timeout=10)) == grpc.StatusCode.NOT_FOUND
            before = scrape(metrics_url(server))
            assert series(before)["tensorgate_inference_requests_total{code=OK}"] == 2
            assert series(before)["tensorgate_request_duration_seconds_count"] == 2

            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="add_sub"), timeout=30)
            unloaded = scrape(metrics_url(server))
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="add_sub"), timeout=30)
            stub.ModelInfer(add_sub_request(), timeout=10)
            reloaded = scrape(metrics_url(server))
    assert series(unloaded) == {}
    assert value(unloaded, "tensorgate_model_state", model="add_sub", version="", state="unloaded") == 1
    assert value(unloaded, "tensorgate_inference_requests_total", model="add_sub", version="", code="NOT_FOUND") == 1
    assert series(reloaded)["tensorgate_inference_requests_total{code=OK}"] == 1
    assert series(reloaded)["tensorgate_request_duration_seconds_count"] == 1


def test_in_flight_and_queue_depth_read_live_state(repo: Path) -> None:
    """A stream held open counts as one RPC in flight while the scrape runs."""
    with ServerThread(repo) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = GRPCInferenceServiceStub(channel)
            release = threading.Event()

            def requests() -> Iterator[pb.ModelInferRequest]:
                yield add_sub_request()
                release.wait(10)

            stream = stub.ModelStreamInfer(requests(), timeout=20)
            next(stream)  # the stream is open and its first reply is out
            try:
                assert value(scrape(metrics_url(server)), "tensorgate_inflight_requests") == 1
            finally:
                release.set()
            list(stream)
        assert value(scrape(metrics_url(server)), "tensorgate_inflight_requests") == 0


QUEUED_CONFIG = """
name: "queued"
max_batch_size: 4
dynamic_batching {
  max_queue_delay_microseconds: 60000000
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy { max_queue_size: 3 }
}
"""


def test_queue_depth_full_queue_and_batch_size(repo: Path) -> None:
    """Three 1-row requests wait for a 4-row batch (the delay is a minute): the queue holds 3, a fourth is
    RESOURCE_EXHAUSTED, and a priority-1 request completes the batch, which runs once with 4 rows."""
    identity_model(repo / "queued" / "1" / "model.onnx", "FP32")
    write_config(repo, "queued", QUEUED_CONFIG)
    queued = {"model": "queued", "version": "1"}
    with ServerThread(repo) as server, grpc.insecure_channel(server.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        waiting = [stub.ModelInfer.future(identity_request("queued"), timeout=30) for _ in range(3)]
        deadline = time.monotonic() + 10
        while value(samples := scrape(metrics_url(server)), "tensorgate_queue_depth", **queued) < 3:
            assert time.monotonic() < deadline, "the three requests never queued"
            time.sleep(0.02)
        assert value(samples, "tensorgate_inflight_requests") == 3
        assert value(samples, "tensorgate_batch_size_count", **queued) == 0
        full = _code(lambda: stub.ModelInfer(identity_request("queued"), timeout=10))
        assert full == grpc.StatusCode.RESOURCE_EXHAUSTED
        urgent = identity_request("queued")
        urgent.parameters["priority"].uint64_param = 1
        stub.ModelInfer(urgent, timeout=10)
        for future in waiting:
            future.result()
        samples = scrape(metrics_url(server))
    assert value(samples, "tensorgate_queue_depth", **queued) == 0
    assert value(samples, "tensorgate_inference_requests_total", **queued, code="OK") == 4
    assert value(samples, "tensorgate_inference_requests_total", **queued, code="RESOURCE_EXHAUSTED") == 1
    assert value(samples, "tensorgate_batch_size_count", **queued) == 1
    assert value(samples, "tensorgate_batch_size_sum", **queued) == 4
    assert value(samples, "tensorgate_batch_size_bucket", **queued, le="2.0") == 0
    assert value(samples, "tensorgate_batch_size_bucket", **queued, le="4.0") == 1
    assert value(samples, "tensorgate_queue_duration_seconds_count", **queued) == 4


def _https(pki: Pki, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca_path)
    if client is not None:
        context.load_cert_chain(client[0], client[1])
    return context


def test_metrics_over_tls_use_the_grpc_certificate(repo: Path, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    with ServerThread(repo, **pki.server_settings(mutual=False)) as server:
        samples = scrape(metrics_url(server, "https"), _https(pki))
        assert value(samples, "tensorgate_model_state", model="add_sub", version="1", state="ready") == 1
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            scrape(metrics_url(server, "http"))  # plaintext to a TLS port


def test_metrics_tls_follows_certificate_rotation(repo: Path, tmp_path: Path) -> None:
    old = Pki(tmp_path / "old")
    with ServerThread(repo, **old.server_settings(mutual=False)) as server:
        scrape(metrics_url(server, "https"), _https(old))
        new = Pki(tmp_path / "new", ca_name="new CA")
        shutil.copyfile(new.server_key, old.server_key)
        shutil.copyfile(new.server_cert, old.server_cert)
        scrape(metrics_url(server, "https"), _https(new))  # the next connection uses the new certificate
        with pytest.raises(urllib.error.URLError):
            scrape(metrics_url(server, "https"), _https(old))


def test_metrics_over_mtls_need_a_client_certificate_and_count_denials(repo: Path, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    with ServerThread(repo, **pki.server_settings()) as server:
        with secure_channel(server.address, pki.ca_path, pki.client("anyone")) as channel:
            stub = GRPCInferenceServiceStub(channel)
            stub.ModelInfer(add_sub_request(), timeout=10)
            for _ in range(2):  # the default mTLS policy keeps repository management from every identity
                assert _code(lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)) == (
                    grpc.StatusCode.PERMISSION_DENIED
                )
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            scrape(metrics_url(server, "https"), _https(pki))  # no client certificate
        samples = scrape(metrics_url(server, "https"), _https(pki, pki.client("prometheus")))
    identity = certs.spiffe_id("anyone")
    assert (
        value(samples, "tensorgate_auth_denials_total", identity=identity, reason="policy", rpc="RepositoryIndex") == 2
    )
    assert value(samples, "tensorgate_inference_requests_total", model="add_sub", version="1", code="OK") == 1


def test_a_request_into_another_identitys_sequence_counts_as_an_auth_denial(tmp_path: Path) -> None:
    """A sequence refusal is an authorization refusal like the policy's: counted in tensorgate_auth_denials_total
    (reason sequence_owner, on ModelInfer and on a ModelStreamInfer message alike) as well as in the requests'
    PERMISSION_DENIED, so that one family shows every identity refused something."""
    root = tmp_path / "models"
    accumulator_model(root / "acc" / "1" / "model.onnx")
    write_config(root, "acc", accumulator_config("acc"))
    pki = Pki(tmp_path / "pki")

    def request(start: bool) -> pb.ModelInferRequest:
        x = np.ones((1, 1), np.float32)
        return encode_infer_request("acc", [("INPUT", x)], parameters={"sequence_id": 7, "sequence_start": start})

    with ServerThread(root, **pki.server_settings()) as server:
        alice, bob = pki.client("alice"), pki.client("bob")
        with secure_channel(server.address, pki.ca_path, alice) as channel:
            GRPCInferenceServiceStub(channel).ModelInfer(request(True), timeout=10)
        with secure_channel(server.address, pki.ca_path, bob) as channel:
            stub = GRPCInferenceServiceStub(channel)
            assert _code(lambda: stub.ModelInfer(request(False), timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
            (reply,) = stub.ModelStreamInfer(iter([request(True)]), timeout=10)
            assert "was started by another identity" in reply.error_message
        samples = scrape(metrics_url(server, "https"), _https(pki, pki.client("prometheus")))
    bob_id = certs.spiffe_id("bob")
    assert value(samples, "tensorgate_auth_denials_total", identity=bob_id, reason="sequence_owner", rpc="") == 2
    assert (
        value(samples, "tensorgate_inference_requests_total", model="acc", version="1", code="PERMISSION_DENIED") == 2
    )
    denied = {labels for name, labels in samples if name == "tensorgate_auth_denials_total"}
    assert denied == {frozenset({"identity": bob_id, "reason": "sequence_owner", "rpc": ""}.items())}


def test_metrics_off_binds_no_port_and_registers_nothing(repo: Path) -> None:
    with ServerThread(repo, metrics_port=-1) as server:
        assert server.app.metrics is None and server.app.metrics_port == 0
        assert list(server.app.registry.collect()) == []
        assert not [t for t in threading.enumerate() if t.name == "tensorgate-metrics"]
        with grpc.insecure_channel(server.address) as channel:
            GRPCInferenceServiceStub(channel).ModelInfer(add_sub_request(), timeout=10)
        assert all(m.stats.latency is None for m in server.app.repository.loaded())


def test_settings_refuse_a_bad_metrics_port(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metrics_port"):
        ServerSettings(model_repository=tmp_path, metrics_port=-2)


@pytest.mark.slow
def test_serve_logs_the_metrics_port_and_serves_it(repo: Path) -> None:
    with ServeProcess(["--model-repository", str(repo), "--grpc-port", "0", "--metrics-port", "0"]) as server:
        line = server.wait_for_line(r"metrics listening on 127\.0\.0\.1:\d+ \(http\)")
        port = int(line.rsplit(":", 1)[1].split()[0])
        server.wait_for_line("ready:")
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
        assert value(samples, "tensorgate_model_state", model="add_sub", version="1", state="ready") == 1
        assert server.terminate() == 0
    with ServeProcess(
        ["--model-repository", str(repo), "--grpc-port", "0"], env={"TENSORGATE_METRICS_PORT": "-1"}
    ) as s:
        s.wait_for_line("ready:")
        assert "metrics listening" not in s.output
        assert s.terminate() == 0


@pytest.mark.parametrize(
    ("model", "version", "labels"),
    [
        pytest.param("add_sub", "", ("add_sub", "1"), id="latest"),
        pytest.param("add_sub", "1", ("add_sub", "1"), id="served"),
        pytest.param("add_sub", "01", ("add_sub", ""), id="not-canonical"),
        pytest.param("add_sub", "9" * 5000, ("add_sub", ""), id="huge"),
        pytest.param("broken", "1", ("broken", "1"), id="failed-version"),
        pytest.param("nope", "1", ("", ""), id="unknown-model"),
    ],
)
def test_failure_labels_are_bounded_by_the_repository(
    served: ServerThread, model: str, version: str, labels: tuple[str, str]
) -> None:
    assert served.app.repository.metric_labels(model, version) == labels


def test_a_request_cancelled_by_its_deadline_counts_as_deadline_exceeded(served: ServerThread) -> None:
    """gRPC cancels a request whose deadline passed as it cancels one whose caller went away. Given the call's
    deadline, the first counts as what its caller saw, DEADLINE_EXCEEDED (the server-error alert watches it); the
    second, and one without a deadline, as CANCELLED."""
    counts = RequestCounts(served.app.repository)
    now = time.monotonic()
    counts.failed("identity_fp32", "1", asyncio.CancelledError(), deadline=now - 0.01)
    counts.failed("identity_fp32", "1", asyncio.CancelledError(), deadline=now + 60)
    counts.failed("identity_fp32", "1", asyncio.CancelledError())
    assert counts.counts == {("identity_fp32", "1", "DEADLINE_EXCEEDED"): 1, ("identity_fp32", "1", "CANCELLED"): 2}


def test_a_deadline_passed_while_the_model_runs_is_scraped_as_deadline_exceeded(repo: Path) -> None:
    """End to end: the caller saw DEADLINE_EXCEEDED, /metrics counts it so (it counted CANCELLED)."""
    paced_model(repo / "paced" / "1" / "model.onnx")
    with ServerThread(repo) as server:
        channel = grpc.insecure_channel(server.address)
        call = functools.partial(
            GRPCInferenceServiceStub(channel).ModelInfer, _paced_request("paced", 200), timeout=0.5
        )
        assert _code(call) == grpc.StatusCode.DEADLINE_EXCEEDED
        channel.close()
        labels = {"model": "paced", "version": "1"}
        keys = {
            code: ("tensorgate_inference_requests_total", frozenset({**labels, "code": code}.items()))
            for code in ("CANCELLED", "DEADLINE_EXCEEDED")
        }
        deadline = time.monotonic() + 10
        while True:  # counted as the handler is cancelled, just after the caller's error
            samples = scrape(metrics_url(server))
            if any(k in samples for k in keys.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert samples.get(keys["DEADLINE_EXCEEDED"]) == 1


# ----- GPU metrics: NVML where there is one, readings -> families everywhere ------------------------------------

H100 = GpuReading(0, "GPU-6c9d1d4e", "NVIDIA H100 80GB HBM3", 2 * 2**30, 80 * 2**30, 0.75, 0.5, 312.5)
MIG_SLICE = GpuReading(3, "GPU-00aa", "NVIDIA A100-SXM4-40GB", 1024, 4096, None, None)


def test_gpu_readings_become_gauges_with_exact_values() -> None:
    registry = CollectorRegistry()
    registry.register(GpuCollector(lambda: [H100, MIG_SLICE]))
    samples = samples_of(generate_latest(registry).decode())
    h100 = {"gpu": "0", "uuid": "GPU-6c9d1d4e", "name": "NVIDIA H100 80GB HBM3"}
    mig = {"gpu": "3", "uuid": "GPU-00aa", "name": "NVIDIA A100-SXM4-40GB"}
    assert samples == {
        ("tensorgate_gpu_memory_used_bytes", frozenset(h100.items())): 2 * 2**30,
        ("tensorgate_gpu_memory_total_bytes", frozenset(h100.items())): 80 * 2**30,
        ("tensorgate_gpu_utilization_ratio", frozenset(h100.items())): 0.75,
        ("tensorgate_gpu_memory_utilization_ratio", frozenset(h100.items())): 0.5,
        ("tensorgate_gpu_power_watts", frozenset(h100.items())): 312.5,
        # Utilisation NVML does not support on a device is left out, not reported as 0.
        ("tensorgate_gpu_memory_used_bytes", frozenset(mig.items())): 1024,
        ("tensorgate_gpu_memory_total_bytes", frozenset(mig.items())): 4096,
        # Triton's names and label, which perf_analyzer's --collect-metrics reads (its "Server Prometheus Metrics");
        # not its memory families, which it reads as integers (see TRITON_GPU_FAMILIES).
        ("nv_gpu_utilization", frozenset({("gpu_uuid", "GPU-6c9d1d4e")})): 0.75,
        ("nv_gpu_power_usage", frozenset({("gpu_uuid", "GPU-6c9d1d4e")})): 312.5,
    }


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param(None, [0, 1, 2], id="unset-all"),
        pytest.param("", [], id="empty-none"),
        pytest.param("-1", [], id="minus-one-none"),
        pytest.param("2,0", [2, 0], id="indices-in-order"),
        pytest.param("1, 7, 0", [1], id="stops-at-unknown-index"),
        pytest.param("GPU-bbb", [1], id="uuid-prefix"),
        pytest.param("GPU-a", [], id="ambiguous-prefix-stops"),
        pytest.param("0,0", [0], id="repeat-stops"),
        pytest.param("MIG-1234,0", [], id="mig-stops"),
    ],
)
def test_cuda_visible_devices_picks_devices_as_cuda_does(spec: str | None, expected: list[int]) -> None:
    devices = [(0, "GPU-aaa1"), (1, "GPU-bbb2"), (2, "GPU-aaa3")]
    assert visible_devices(devices, spec) == expected


def test_nvml_reads_the_gpus_or_says_why_not() -> None:
    """Here (no driver) the reason names the missing driver; on a GPU machine the real readings are sane."""
    try:
        reader = NvmlReader()
    except GpuUnavailable as exc:
        assert "no NVIDIA driver" in str(exc) or "no GPU" in str(exc), exc
        return
    try:
        readings = reader.read()
        assert readings and all(r.uuid.startswith("GPU-") for r in readings)
        for r in readings:
            assert r.memory_total_bytes is None or 0 <= (r.memory_used_bytes or 0) <= r.memory_total_bytes
            assert r.utilization is None or 0 <= r.utilization <= 1
            assert r.power_watts is None or 0 < r.power_watts < 5_000
    finally:
        reader.close()
    assert reader.read() == []


def test_without_pynvml_the_reason_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # what `import pynvml` meets where it is not installed
    with pytest.raises(GpuUnavailable, match=r"nvidia-ml-py is not installed \(pip install 'tensorgate\[gpu\]'\)"):
        NvmlReader()


def test_a_server_without_a_gpu_exports_no_gpu_families_and_logs_why_once(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if (reader := _gpu_here()) is not None:
        reader.close()
        pytest.skip("this machine has a GPU: test_nvml_reads_the_gpus_or_says_why_not reads it")
    with caplog.at_level(logging.INFO, logger="tensorgate.server.telemetry.gpu"), ServerThread(repo) as server:
        families = families_of(scrape_text(metrics_url(server)))
        families_of(scrape_text(metrics_url(server)))
    assert not [name for name in families if name.startswith("tensorgate_gpu_")]
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= families.keys()
    said = [r.getMessage() for r in caplog.records if r.name == "tensorgate.server.telemetry.gpu"]
    assert len(said) == 1 and said[0].startswith("GPU metrics off: "), said


def _gpu_here() -> NvmlReader | None:
    try:
        return NvmlReader()
    except GpuUnavailable:
        return None


# ----- README: the metrics table is generated from the code and matches a real scrape -----------------------------

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _readme_table() -> str:
    section = README.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = lines.index("| Name | Type | Labels | Meaning |")
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def test_readme_metrics_table_is_the_generated_one() -> None:
    assert _readme_table() == reference_markdown(), (
        "regenerate README's metrics table: python -c "
        "'from tensorgate.server.telemetry.metrics import reference_markdown as r; print(r())'"
    )


def test_readme_lists_exactly_the_families_a_real_scrape_shows(served: ServerThread) -> None:
    with grpc.insecure_channel(served.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        stub.ModelInfer(add_sub_request(rows=2), timeout=10)
        assert _code(lambda: stub.ModelInfer(add_sub_request("no_such_model"), timeout=10)) == (
            grpc.StatusCode.NOT_FOUND
        )
    scraped = families_of(scrape_text(metrics_url(served)))
    listed = {line.split("`")[1] for line in _readme_table().splitlines()[2:]}
    # Present only where NVML reads a GPU; their format is tested with readings above.
    gpu = set(GPU_FAMILIES) | set(TRITON_GPU_FAMILIES)
    # Only with tracing on (tests/test_tracing.py scrapes it), the response cache (tests/test_response_cache.py) or
    # a byte budget (tests/test_byte_budget.py).
    optional = {
        "tensorgate_trace_spans_dropped_total",
        "tensorgate_inflight_request_bytes",
        "tensorgate_response_cache_bytes",
        "tensorgate_response_cache_evictions_total",
    }
    assert listed == scraped.keys() | gpu | optional
    specs = {s.name: s for s in reference()}
    for name, (kind, samples) in scraped.items():
        assert kind == specs[name].type, name
        for sample in samples:
            assert set(sample.labels) - {"le"} == set(specs[name].labels), (name, sample)


def test_the_metrics_port_serves_a_bounded_number_of_connections_at_once(caplog: pytest.LogCaptureFixture) -> None:
    """Each connection had a thread of its own, without bound: idle connections (each held for the handler's
    10 s timeout) could make the server start thousands of threads. Past the bound a connection is closed at
    once, said in one WARNING; once idle ones go, scrapes are served again."""
    caplog.set_level(logging.WARNING, logger="tensorgate.server.telemetry.metrics")
    server = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, max_connections=3)
    port = server.start()
    idle: list[socket.socket] = []
    try:
        for _ in range(3):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        deadline = time.monotonic() + 10
        refused = socket.create_connection(("127.0.0.1", port), timeout=5)
        refused.settimeout(5)
        with refused:
            while True:  # the accept loop may take a moment to reach it; a closed connection reads b""
                try:
                    assert refused.recv(1) == b""
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline, "the connection past the bound was not closed"
        assert [r.getMessage() for r in caplog.records] == [
            "metrics: 3 connections are open, the most the port serves at once: closed one from 127.0.0.1 (said "
            "at most once a minute)"
        ]
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # the idle connections' threads end as they read their end of file
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                assert reply.status == 200
            break
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    server.stop()


def test_a_metrics_connection_that_drips_bytes_is_closed_after_the_longest_a_connection_may_stay() -> None:
    """The 10 s read timeout restarts with every byte: a client sending one every few seconds held its thread
    and slot for good (64 such held the port). A connection open past the bound is closed, whatever it sends."""
    server = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, max_connection_s=0.5)
    port = server.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            opened, closed_after = time.monotonic(), None
            for byte in b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 200:  # about 20 s at one byte per 0.1 s
                try:
                    sock.sendall(bytes([byte]))
                except OSError:  # reset: the server closed it
                    closed_after = time.monotonic() - opened
                    break
                sock.settimeout(0.1)
                try:
                    if sock.recv(1) == b"":
                        closed_after = time.monotonic() - opened
                        break
                except TimeoutError:
                    pass
            assert closed_after is not None and closed_after < 5, closed_after
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert reply.status == 200  # a scrape is served as before
    finally:
        server.stop()
