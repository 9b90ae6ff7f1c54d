"""The `tensorgate` command as users and containers run it: serve, environment variables, SIGTERM, health."""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.server.rpc.codec import decode_infer_response, encode_infer_request
from tests.onnx_models import slow_model, write_config
from tests.pki import add_sub_request
from tests.process import TENSORGATE, ServeProcess, free_port
from tests.scraping import scrape


def _wait_ready(address: str, timeout: float = 60.0) -> tc.InferenceServerClient:
    client = tc.InferenceServerClient(address)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if client.is_server_ready():
                return client
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    raise AssertionError(f"{address} not ready within {timeout}s")


def test_serve_with_flags_logs_port_serves_and_exits_zero_on_sigterm(repo: Path) -> None:
    with ServeProcess(["--model-repository", str(repo), "--grpc-port", "0"]) as server:
        client = _wait_ready(server.address)
        x = np.arange(32, dtype=np.float32).reshape(2, 16)
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            t = tc.InferInput(name, [2, 16], "FP32")
            t.set_data_from_numpy(x)
            inputs.append(t)
        np.testing.assert_array_equal(client.infer("add_sub", inputs).as_numpy("OUTPUT0"), x + x)
        client.close()
        assert server.terminate() == 0
        assert "stopped" in server.output


def test_every_option_can_come_from_the_environment(repo: Path) -> None:
    env = {
        "TENSORGATE_MODEL_REPOSITORY": str(repo),
        "TENSORGATE_GRPC_PORT": "0",
        "TENSORGATE_MODEL_CONTROL_MODE": "explicit",
        "TENSORGATE_LOAD_MODEL": "add_sub",
    }
    with ServeProcess([], env=env) as server:
        client = _wait_ready(server.address)
        assert client.is_model_ready("add_sub")
        assert not client.is_model_ready("identity_fp32")  # explicit mode loads only what it was told
        client.close()
        assert server.terminate() == 0


def test_sigterm_while_models_load_stops_without_waiting_for_them(tmp_path: Path) -> None:
    """A signal during start-up ends the start: the server never reports ready, and exits 0."""
    repo = tmp_path / "models"
    slow_model(repo / "slow" / "1" / "model.onnx")
    write_config(
        repo,
        "slow",
        'max_batch_size: 64\nmodel_warmup [ { name: "long" batch_size: 64 count: 3000\n'
        '  inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 512 ] random_data: true } } } ]\n',
    )
    with ServeProcess(["--model-repository", str(repo), "--grpc-port", "0"]) as server:
        server.wait_for_line("listening on")
        time.sleep(0.5)  # the warm-up (several seconds) is under way
        assert server.terminate() == 0
        assert "shutting down on signal while starting" in server.output
        assert "ready:" not in server.output
        assert "stopped" in server.output
        # The load abandoned is no failure: an ERROR here would page whoever alerts on the log.
        assert " ERROR " not in server.output, server.output


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    """A request accepted before SIGTERM is answered; the server then exits 0 and refuses new work."""
    repo = tmp_path / "models"
    slow_model(repo / "slow" / "1" / "model.onnx", repeats=2400)  # 100x the default: seconds per call
    write_config(repo, "slow", "max_batch_size: 256\ninstance_group [{ kind: KIND_CPU count: 1 }]\n")
    slow_model(repo / "fast" / "1" / "model.onnx", size=8, repeats=1)
    with ServeProcess(["--model-repository", str(repo), "--grpc-port", "0", "--shutdown-grace-s", "60"]) as server:
        _wait_ready(server.address).close()

        async def scenario() -> tuple[np.ndarray, grpc.StatusCode | None]:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = GRPCInferenceServiceStub(channel)
                x = np.full((256, 512), 0.01, dtype=np.float32)
                # Created first, so its frames go out on the connection before the fast call's.
                slow_call = stub.ModelInfer(encode_infer_request("slow", [("INPUT0", x)]), timeout=120)
                fast = encode_infer_request("fast", [("INPUT0", np.ones((1, 8), np.float32))])
                await stub.ModelInfer(fast, timeout=30)
                # The slow request's 512 KiB may still be arriving after the small fast call has returned (it then
                # counts as new work, refused once the drain starts): give it a generous moment to be accepted.
                await asyncio.sleep(1.0)
                server.proc.terminate()  # SIGTERM while `slow` is being computed
                server.wait_for_line("refusing new calls")
                refused: grpc.StatusCode | None = None
                try:
                    await stub.ModelInfer(fast, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    refused = exc.code()
                result = decode_infer_response(await slow_call)
                return result["OUTPUT0"], refused

        out, refused = asyncio.run(scenario())
        assert out.shape == (256, 512)
        assert refused == grpc.StatusCode.UNAVAILABLE
        assert server.proc.wait(60) == 0


def test_a_second_signal_ends_the_drain_at_once(tmp_path: Path) -> None:
    """Ctrl-C twice, or an orchestrator that signals again: the drain stops waiting for its long grace. A request
    still queued is told it never ran (safe to send elsewhere), one computing is cut off and its batch ended early,
    and the process stops in order and exits 0 (as when the grace runs out), saying why in its log."""
    repo = tmp_path / "models"
    slow_model(repo / "slow" / "1" / "model.onnx", repeats=12000)  # seconds per call
    write_config(repo, "slow", "max_batch_size: 8192\ninstance_group [{ kind: KIND_CPU count: 1 }]\n")
    slow_model(repo / "queued" / "1" / "model.onnx", size=8, repeats=1)
    # A batch of one waits ten minutes for company: the request stays queued.
    write_config(repo, "queued", "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 600000000 }\n")
    with ServeProcess(["--model-repository", str(repo), "--grpc-port", "0", "--shutdown-grace-s", "300"]) as server:
        _wait_ready(server.address).close()

        async def scenario() -> tuple[grpc.aio.AioRpcError, grpc.aio.AioRpcError]:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = GRPCInferenceServiceStub(channel)
                # Minutes of compute on 2 cores: the process must not wait for it (ONNX Runtime's terminate flag).
                x = np.full((8192, 512), 0.01, dtype=np.float32)
                computing = stub.ModelInfer(encode_infer_request("slow", [("INPUT0", x)]), timeout=45)
                queued = stub.ModelInfer(encode_infer_request("queued", [("INPUT0", np.ones((1, 8), np.float32))]))
                await asyncio.sleep(1.5)  # generous: both requests reach the server on loopback
                server.proc.send_signal(signal.SIGTERM)
                server.wait_for_line("refusing new calls; draining 2 in-flight")
                server.proc.send_signal(signal.SIGINT)
                hurried.append(time.monotonic())
                errors = []
                for call in (computing, queued):
                    with pytest.raises(grpc.aio.AioRpcError) as failed:
                        await asyncio.wait_for(call, 45)  # not the grace: 300 s
                    errors.append(failed.value)
                return errors[0], errors[1]

        hurried: list[float] = []
        cut, never_ran = asyncio.run(scenario())
        assert server.proc.wait(45) == 0
        # The batch was cut short, not waited for: without that, the repository's close waits out its 30 s grace.
        assert time.monotonic() - hurried[0] < 20
        assert never_ran.code() == grpc.StatusCode.UNAVAILABLE
        assert "did not run the request before the server was told to stop at once" in never_ran.details()
        assert "retry on another replica" in never_ran.details()
        assert cut.code() == grpc.StatusCode.UNAVAILABLE
        assert "SIGINT again: stopping at once" in server.output
        assert "stopped" in server.output


def test_stream_open_at_sigterm_is_told_to_go_elsewhere_and_ends(repo: Path) -> None:
    """A client keeps its stream open between requests (tritonclient's start_stream). After SIGTERM such an idle
    stream ends at once with UNAVAILABLE (clients retry on another replica), rather than hold the drain for its
    whole grace period and then be cut off."""
    args = ["--model-repository", str(repo), "--grpc-port", "0", "--shutdown-grace-s", "120"]
    with ServeProcess(args) as server:
        _wait_ready(server.address).close()

        async def scenario() -> tuple[str, grpc.aio.AioRpcError]:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stream = GRPCInferenceServiceStub(channel).ModelStreamInfer(timeout=60)
                request = encode_infer_request("identity_fp32", [("INPUT0", np.ones((1, 4), np.float32))])
                request.id = "before"
                await stream.write(request)
                answered = (await stream.read()).error_message
                server.proc.terminate()
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await stream.read()
                return answered, ended.value

        started = time.monotonic()
        answered, ended = asyncio.run(scenario())
        assert answered == ""
        assert ended.code() == grpc.StatusCode.UNAVAILABLE
        assert ended.details() == "the server is shutting down; retry on another replica"
        assert server.proc.wait(60) == 0
        assert time.monotonic() - started < 60  # the grace is 120 s
        assert "grace period over" not in server.output


def test_health_command(repo: Path) -> None:
    with ServeProcess(["--model-repository", str(repo), "--grpc-port", "0"]) as server:
        _wait_ready(server.address).close()
        ok = subprocess.run([TENSORGATE, "health", "--server", server.address], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr
        assert "SERVING" in ok.stdout
        assert server.terminate() == 0
    for live in ([], ["--live"]):  # liveness takes NOT_SERVING, not a server that does not answer
        down = subprocess.run(
            [TENSORGATE, "health", "--server", server.address, "--timeout", "1", *live], capture_output=True, text=True
        )
        assert down.returncode == 1
        assert "UNAVAILABLE" in down.stderr or "DEADLINE_EXCEEDED" in down.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--grpc-port", "0"], "--model-repository", id="no-repository"),
        pytest.param(
            ["--model-repository", "/nonexistent/models", "--grpc-port", "0"], "not a directory", id="missing-dir"
        ),
        pytest.param(["--model-repository", ".", "--model-control-mode", "sometimes"], "invalid choice", id="bad-mode"),
    ],
)
def test_bad_command_lines_fail_clearly(args: list[str], message: str) -> None:
    result = subprocess.run([TENSORGATE, "serve", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout


def test_server_info_over_raw_stub(repo: Path) -> None:
    with ServeProcess(["--model-repository", str(repo), "--grpc-port", "0"]) as server:
        _wait_ready(server.address).close()
        with grpc.insecure_channel(server.address) as channel:
            meta = GRPCInferenceServiceStub(channel).ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
        assert meta.name == "tensorgate"
        assert server.terminate() == 0


def _served_ok(server: ServeProcess) -> float:
    """add_sub requests this process answered, from its own /metrics."""
    port = re.search(r"metrics listening on \S+:(\d+)", server.wait_for_line("metrics listening on"))
    assert port is not None
    samples = scrape(f"http://127.0.0.1:{port.group(1)}/metrics")
    key = frozenset({"model": "add_sub", "version": "1", "code": "OK"}.items())
    return samples.get(("tensorgate_inference_requests_total", key), 0.0)


def test_reuse_port_spreads_connections_over_processes(repo: Path) -> None:
    """Two servers started with --reuse-port share one port and the kernel gives each some of 24 connections;
    a third without the flag cannot take the port and stops with the reason."""
    port = free_port()
    args = ["--model-repository", str(repo), "--grpc-port", str(port), "--reuse-port"]
    with ServeProcess(args) as first, ServeProcess(args) as second:
        for server in (first, second):
            server.wait_for_line("ready:")
        channels = [
            grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(24)  # one connection each; all 24 on one process: probability 2**-23
        ]
        for channel in channels:
            GRPCInferenceServiceStub(channel).ModelInfer(add_sub_request(), timeout=30)
            channel.close()
        counts = [_served_ok(first), _served_ok(second)]
        assert sum(counts) == 24 and min(counts) > 0, counts
        taken = subprocess.run(
            [TENSORGATE, "serve", "--model-repository", str(repo), "--grpc-port", str(port), "--metrics-port", "-1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert taken.returncode != 0
        assert f"127.0.0.1:{port}" in taken.stderr + taken.stdout
        assert first.terminate() == 0 and second.terminate() == 0


def test_reuse_port_needs_a_fixed_port(repo: Path) -> None:
    result = subprocess.run(
        [TENSORGATE, "serve", "--model-repository", str(repo), "--grpc-port", "0", "--reuse-port"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--reuse-port needs a fixed --grpc-port" in result.stderr


def test_a_stream_open_during_drain_refuses_new_work_and_ends(tmp_path: Path) -> None:
    """Messages that reach an open stream after SIGTERM are refused (retry elsewhere) instead of being started and
    then cut off at the end of the grace period: the stream answers what it started, then ends with UNAVAILABLE,
    so the server exits without waiting out its grace."""
    repo = tmp_path / "models"
    slow_model(repo / "slow" / "1" / "model.onnx")
    write_config(repo, "slow", "max_batch_size: 256\n")
    args = ["--model-repository", str(repo), "--grpc-port", "0", "--shutdown-grace-s", "120"]
    with ServeProcess(args) as server:
        _wait_ready(server.address).close()
        x = np.full((256, 512), 0.01, dtype=np.float32)
        requests: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
        with grpc.insecure_channel(server.address) as channel:
            replies = GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests.get, None), timeout=60)
            requests.put(encode_infer_request("slow", [("INPUT0", x[:1])]))
            assert next(replies).error_message == ""  # the stream is open and counted as a call in flight
            first = encode_infer_request("slow", [("INPUT0", x)])
            first.id = "before"
            requests.put(first)
            time.sleep(1.5)  # generous: the message reaches the server on loopback and starts (or even ends)
            server.proc.terminate()
            server.wait_for_line("refusing new calls")
            late = encode_infer_request("slow", [("INPUT0", x)])
            late.id = "during-drain"
            requests.put(late)
            answers = {}
            with pytest.raises(grpc.RpcError) as ended:
                for reply in replies:  # until the server ends the stream
                    answers[reply.infer_response.id] = reply
            requests.put(None)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down; retry on another replica" in (ended.value.details() or "")
        assert answers["before"].error_message == ""
        assert decode_infer_response(answers["before"].infer_response)["OUTPUT0"].shape == (256, 512)
        assert "during-drain" not in answers  # never started: the stream's status answers for it
        assert server.proc.wait(60) == 0
        assert "grace period over" not in server.output


def test_a_load_model_flag_replaces_the_variable(repo: Path) -> None:
    env = {"TENSORGATE_LOAD_MODEL": "identity_fp32"}
    args = ["--model-repository", str(repo), "--grpc-port", "0", "--model-control-mode", "explicit"]
    with ServeProcess([*args, "--load-model", "add_sub"], env=env) as server:
        client = _wait_ready(server.address)
        assert client.is_model_ready("add_sub") and not client.is_model_ready("identity_fp32")
        client.close()
        assert server.terminate() == 0


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        pytest.param(["--log-level", "verbose"], {}, "--log-level must be", id="log-level"),
        pytest.param(["--keepalive-time-s", "3000000"], {}, "--keepalive-time-s must be in", id="keepalive-overflow"),
        pytest.param(["--shutdown-grace-s", "-5"], {}, "--shutdown-grace-s must be >= 0", id="negative-grace"),
        pytest.param(
            [], {"TENSORGATE_GRPC_PORT": "abc"}, "TENSORGATE_GRPC_PORT='abc': expected a whole number", id="env-name"
        ),
        pytest.param(
            ["--strict-readiness", "maybe"],
            {},
            "argument --strict-readiness: expected true or false, got 'maybe'",
            id="flag-value",
        ),
        pytest.param(
            [],
            {"TENSORGATE_STRICT_READINESS": "maybe"},
            "TENSORGATE_STRICT_READINESS='maybe': expected true or false",
            id="env-flag",
        ),
        pytest.param(
            ["--capture-retention", "5000", "--monitor-interval-s", "2"],
            {},
            "--monitor-interval-s, --capture-retention need --data-dir (monitoring is off without it)",
            id="monitoring-without-data-dir",
        ),
        pytest.param(
            ["--alert-rules", "rules.yaml"], {}, "--alert-rules needs --data-dir", id="alert-rules-without-data-dir"
        ),
        pytest.param(
            ["--shared-memory", "cuda"], {}, "argument --shared-memory: invalid choice: 'cuda'", id="shared-memory"
        ),
        # nan passed every range check (nan < 0 is False): the server started, then never drained or polled.
        pytest.param(["--shutdown-grace-s", "nan"], {}, "--shutdown-grace-s must be a finite number", id="nan-grace"),
        pytest.param(
            ["--model-control-mode", "poll", "--repository-poll-secs", "nan"],
            {},
            "--repository-poll-secs must be a finite number, got nan",
            id="nan-poll",
        ),
        pytest.param(
            ["--data-dir", "data"],
            {"TENSORGATE_MONITOR_INTERVAL_S": "inf"},
            "--monitor-interval-s must be a finite number, got inf",
            id="inf-monitor-interval",
        ),
        # Options of a feature that is off did nothing, and said nothing.
        pytest.param(
            ["--trace-sample-rate", "0.01", "--otlp-protocol", "http/protobuf", "--otlp-headers", "k=v"],
            {},
            "--otlp-protocol, --otlp-headers, --trace-sample-rate need --otlp-endpoint or "
            "OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT",
            id="tracing-without-endpoint",
        ),
        pytest.param(["--otlp-insecure"], {}, "--otlp-insecure needs --otlp-endpoint", id="insecure-without-endpoint"),
        pytest.param(
            ["--metrics-port", "-1", "--metrics-host", "0.0.0.0"],
            {},
            "--metrics-host needs metrics on (--metrics-port -1 turns them off)",
            id="metrics-host-without-metrics",
        ),
    ],
)
def test_bad_serve_settings_stop_with_one_line(repo: Path, args: list[str], env: dict[str, str], words: str) -> None:
    done = subprocess.run(
        [TENSORGATE, "serve", "--model-repository", str(repo), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, **env},
    )
    assert done.returncode == 2  # a usage error, whether the value came from a flag or a variable
    assert words in done.stderr
    assert "Traceback" not in done.stderr
    if "usage:" not in done.stderr:
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        pytest.param(["--tls-cert", "{tmp}/nope.pem", "--tls-key", "{tmp}/nope-key.pem"], "--tls-cert", id="tls"),
        pytest.param(["--auth-policy", "{tmp}/nope.yaml"], "--auth-policy", id="policy"),
        pytest.param(["--data-dir", "{tmp}/file/data"], "--data-dir", id="data-dir"),
    ],
)
def test_a_file_that_cannot_be_read_is_named_by_its_flag(
    repo: Path, tmp_path: Path, args: list[str], flag: str
) -> None:
    """ "[Errno 2] No such file or directory: '...'" left the operator to guess which of the files it was."""
    (tmp_path / "file").write_text("a file where a directory is expected")
    done = subprocess.run(
        [TENSORGATE, "serve", "--model-repository", str(repo), "--grpc-port", "0", "--metrics-port", "-1"]
        + [a.format(tmp=tmp_path) for a in args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"ERROR tensorgate: {flag}: [Errno" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_tracing_options_are_taken_with_an_endpoint_from_opentelemetry_s_variable(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT turns tracing on as --otlp-endpoint does: the options that shape it are then
    used, not refused. A rate of 0 is an option given, not the default."""
    from tensorgate.server import ServerSettings

    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    with pytest.raises(ValueError, match="^otlp_protocol, otlp_insecure, trace_sample_rate need otlp_endpoint"):
        ServerSettings(model_repository=repo, trace_sample_rate=0.0, otlp_protocol="grpc", otlp_insecure=True)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "127.0.0.1:4317")
    settings = ServerSettings(model_repository=repo, trace_sample_rate=0.0, otlp_protocol="grpc", otlp_insecure=True)
    assert settings.trace_sample_rate == 0.0


def test_a_refused_setting_is_named_by_its_flag(repo: Path) -> None:
    """ServerSettings names its fields; `tensorgate serve` names the flags the user typed, paths left as they are."""
    done = subprocess.run(
        [TENSORGATE, "serve", "--model-repository", str(repo), "--tls-cert", str(repo / "tls_key" / "x.pem")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == "tensorgate serve: --tls-cert and --tls-key go together: give both or neither\n"


def test_every_setting_has_the_flag_of_its_name() -> None:
    """What `as_flags` relies on to name a refused setting by its flag."""
    import dataclasses

    from tensorgate.server.cli import build_parser
    from tensorgate.server.settings import ServerSettings

    [serve] = [a.choices["serve"] for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    options = {o for action in serve._actions for o in action.option_strings}
    for field in dataclasses.fields(ServerSettings):
        assert "--" + field.name.replace("_", "-") in options, field.name


@pytest.mark.parametrize(
    ("flag", "words"),
    [("--grpc-port", "(--grpc-port): Address already in use"), ("--metrics-port", "(--metrics-port)")],
)
def test_a_port_in_use_stops_with_one_line(repo: Path, flag: str, words: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--grpc-port": "0", "--metrics-port": "0", flag: str(port)}
        done = subprocess.run(
            [TENSORGATE, "serve", "--model-repository", str(repo), *[a for kv in ports.items() for a in kv]],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert any(f"127.0.0.1:{port}" in line and words in line for line in done.stderr.splitlines()), done.stderr
    assert "Traceback" not in done.stderr


def test_a_webhook_that_is_not_a_url_is_refused_without_its_secret(repo: Path) -> None:
    """Webhook URLs carry their secret in the path: the refusal lands in logs, so it does not echo the value."""
    from tensorgate.server import ServerSettings

    with pytest.raises(ValueError, match="http:// or https:// URL") as refused:
        ServerSettings(model_repository=repo, alert_webhook="hooks.example/T01/SECRET", data_dir=repo)
    assert "SECRET" not in str(refused.value)


def test_an_empty_webhook_is_no_monitoring_option(repo: Path) -> None:
    """`--alert-webhook "$WEBHOOK"` with the variable unset passes "": not given, so no --data-dir is needed."""
    from tensorgate.server import ServerSettings

    ServerSettings(model_repository=repo, alert_webhook="", monitor_interval_s=10.0)
    with pytest.raises(ValueError, match="^alert_webhook needs data_dir"):
        ServerSettings(model_repository=repo, alert_webhook="http://127.0.0.1:9/hook")


def test_help_describes_every_command() -> None:
    """The description was cut off mid-sentence (only the docstring's first line was used)."""
    done = subprocess.run([TENSORGATE, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    description = " ".join(done.stdout.split("\n\n")[1].split())
    assert description.endswith("makes development certificates.")
    for command in ("serve", "health", "infer", "bench", "feedback", "certs"):
        assert f"`{command}`" in description
