"""Triton's LogSettings RPC: an operator reads and changes the log level of a running server, with unmodified
tritonclient, and only when the authorization policy lets it (the `settings` group)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tensorgate.server.telemetry.log_settings import LogSettingsError, level_of
from tensorgate.server.telemetry.logs import configure_logging
from tests.serving import ServerThread
from tests.test_infer import triton_inputs


@pytest.fixture(autouse=True)
def root_level() -> Iterator[None]:
    """The RPC changes the process's root level: put it back for the tests that follow."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.INFO)
    yield
    root.setLevel(before)


@pytest.fixture
def root_handlers() -> Iterator[io.StringIO]:
    """`tensorgate serve`'s text logging into a buffer, the root logger's handlers put back afterwards."""
    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:]
    configure_logging("INFO", "text", stream=out)
    yield out
    root.handlers[:] = saved


@pytest.fixture
def client(server: ServerThread) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(server.address)
    yield c
    c.close()


def _settings(response: object) -> dict[str, object]:
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.settings.items()}  # type: ignore[attr-defined]


def _infer(c: tc.InferenceServerClient) -> None:
    row = np.ones((1, 16), np.float32)
    c.infer("add_sub", triton_inputs({"INPUT0": row, "INPUT1": row}), request_id="seen")


def test_read_then_turn_the_access_lines_on_and_off(
    client: tc.InferenceServerClient, caplog: pytest.LogCaptureFixture
) -> None:
    assert _settings(client.get_log_settings()) == {
        "log_file": "",
        "log_info": True,
        "log_warning": True,
        "log_error": True,
        "log_verbose_level": 0,
        "log_format": "text",
    }
    caplog.handler.setLevel(logging.NOTSET)  # the handler takes everything; the root level alone decides
    _infer(client)
    assert "id=seen" not in caplog.text  # access lines are DEBUG: off at INFO

    now = _settings(client.update_log_settings({"log_verbose_level": 1}))
    assert now["log_verbose_level"] == 1 and logging.getLogger().level == logging.DEBUG
    assert "log settings changed by 'anonymous': {'log_verbose_level': 1}" in caplog.text
    _infer(client)
    assert "id=seen" in caplog.text

    now = _settings(client.update_log_settings({"log_verbose_level": 0, "log_info": False}))
    assert (now["log_verbose_level"], now["log_info"], now["log_warning"]) == (0, False, True)
    # From WARNING, verbose alone turns every kind on (log_info was off).
    assert _settings(client.update_log_settings({"log_verbose_level": 1}))["log_info"] is True
    now = _settings(client.update_log_settings({"log_verbose_level": 0, "log_info": False}))
    assert (now["log_verbose_level"], now["log_info"], now["log_warning"]) == (0, False, True)
    assert logging.getLogger().level == logging.WARNING

    # The change that hides warnings still leaves its own line; turning a kind on turns the more severe ones on.
    caplog.clear()
    client.update_log_settings({"log_warning": False})
    assert logging.getLogger().level == logging.ERROR
    assert "log settings changed by 'anonymous': {'log_warning': False}" in caplog.text
    now = _settings(client.update_log_settings({"log_verbose_level": 3, "log_info": True}))
    assert (now["log_verbose_level"], now["log_warning"], now["log_error"]) == (3, True, True)


def test_an_access_line_names_the_version_a_refused_request_reached(
    client: tc.InferenceServerClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A request that named no version and was refused as invalid once the server had picked one: its error names
    that version, and so does its access line (it said `version=-`). The id is the one sent; a request sent
    without one and refused gets `-`, since the id the server would have given it reached no caller."""
    caplog.set_level(logging.DEBUG, logger="tensorgate.access")
    narrow = np.ones((1, 8), np.float32)  # add_sub takes 16 values a row
    for request_id in ("refused-7", ""):
        with pytest.raises(InferenceServerException) as info:
            client.infer("add_sub", triton_inputs({"INPUT0": narrow, "INPUT1": narrow}), request_id=request_id)
        assert "model 'add_sub' version 1" in str(info.value)

    def refused() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if r.name == "tensorgate.access"]
        return [line for line in lines if "status=INVALID_ARGUMENT" in line]

    # The line is written once the call has ended, after the caller has its status: wait for it (bounded).
    for _ in range(100):
        if len(refused()) == 2:
            break
        time.sleep(0.05)
    assert [line.split(" status=")[0] for line in refused()] == [
        "ModelInfer model=add_sub version=1 id=refused-7",
        "ModelInfer model=add_sub version=1 id=-",
    ], refused()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        pytest.param({"log_colour": True}, "unknown log setting 'log_colour'", id="unknown"),
        pytest.param({"log_file": "/tmp/x.log"}, "log_file cannot be set: tensorgate logs to stderr", id="file"),
        pytest.param({"log_format": "ISO8601"}, "log_format is fixed at start (--log-format)", id="format"),
        pytest.param({"log_warning": False}, "log_warning cannot be off while log_info is on", id="threshold"),
        pytest.param({"log_info": False, "log_verbose_level": 2}, "log_verbose_level needs log_info on", id="verbose"),
    ],
)
def test_changes_that_cannot_be_made_are_refused_whole(
    client: tc.InferenceServerClient, settings: dict[str, object], message: str
) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.update_log_settings(settings)
    assert info.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
    assert message in str(info.value.message())
    assert logging.getLogger().level == logging.INFO  # nothing half applied


def test_triton_s_default_format_name_is_ours(client: tc.InferenceServerClient) -> None:
    assert _settings(client.update_log_settings({"log_format": "default"}))["log_format"] == "text"


def test_levels_are_thresholds() -> None:
    base = {"log_info": True, "log_warning": True, "log_error": True, "log_verbose_level": 0}
    assert level_of(base) == logging.INFO
    assert level_of({**base, "log_verbose_level": 3}) == logging.DEBUG
    assert level_of({**base, "log_info": False}) == logging.WARNING
    assert level_of({**base, "log_info": False, "log_warning": False}) == logging.ERROR
    assert level_of({**base, "log_info": False, "log_warning": False, "log_error": False}) == logging.CRITICAL
    with pytest.raises(LogSettingsError):
        level_of({**base, "log_error": False})


def test_only_the_settings_group_may_change_them(repo: Path, tmp_path: Path) -> None:
    """Under a policy, a caller allowed everything but `settings` is refused; an administrator with `*` may.
    Settings name no model, so the rule needs models `*` (the default)."""
    tokens = {"scorer": "s3cret-scorer", "admin": "s3cret-admin"}
    policy = {
        "rules": [
            {"identities": ["scorer"], "apis": ["inference", "metadata", "statistics", "repository", "health"]},
            {"identities": ["admin"], "apis": ["*"]},
        ],
        "tokens": [{"sha256": hashlib.sha256(t.encode()).hexdigest(), "identity": who} for who, t in tokens.items()],
    }
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    with ServerThread(repo, auth_policy=path) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            with pytest.raises(InferenceServerException) as info:
                c.update_log_settings({"log_verbose_level": 1}, headers={"authorization": "Bearer s3cret-scorer"})
            assert info.value.status() == str(grpc.StatusCode.PERMISSION_DENIED)
            assert "identity 'scorer' may not call LogSettings" in str(info.value.message())
            assert logging.getLogger().level == logging.INFO
            c.update_log_settings({"log_verbose_level": 1}, headers={"authorization": "Bearer s3cret-admin"})
            assert logging.getLogger().level == logging.DEBUG
        finally:
            c.close()


FORGED = "2026-01-01 00:00:00,000 WARNING tensorgate: forged by the caller"


def test_a_caller_s_newline_cannot_start_a_log_line_of_its_own(
    client: tc.InferenceServerClient, root_handlers: io.StringIO
) -> None:
    """The access line quotes the model name and request id as the caller sent them: in the text format a newline
    in one started a line that read as the server's own WARNING (JSON escapes it already). Escaped, the whole
    request stays on its access line, and the line still says what came in."""
    client.update_log_settings({"log_verbose_level": 1})
    row = np.ones((1, 16), np.float32)
    with pytest.raises(InferenceServerException):
        client.infer(f"add_sub\n{FORGED}", triton_inputs({"INPUT0": row, "INPUT1": row}), request_id=f"x\r\n{FORGED}")
    for _ in range(100):  # the access line is written once the call has ended: wait for it (bounded)
        if "status=NOT_FOUND" in root_handlers.getvalue():
            break
        time.sleep(0.05)
    lines = root_handlers.getvalue().splitlines()
    assert not [line for line in lines if line.startswith(FORGED)], lines
    (access,) = [line for line in lines if "tensorgate.access" in line and "status=NOT_FOUND" in line]
    assert f"model=add_sub\\n{FORGED} version=- id=x\\r\\n{FORGED} status=NOT_FOUND" in access, access


def test_a_json_record_stays_one_line_whatever_the_caller_sent() -> None:
    """json.dumps escapes C0 controls only: a request id with NEL, a line or paragraph separator, a C1 CSI or a
    bidirectional override went out raw, and a reader that splits lines as str.splitlines does saw several
    (review 125). They are JSON escapes now, and the record reads back as it was."""
    from tensorgate.server.telemetry.logs import JsonFormatter

    sent = "x\x85y\u2028z\u2029w\x9b31m\u202egnp.exe\n" + FORGED
    record = logging.LogRecord("tensorgate.access", logging.DEBUG, __file__, 1, "id=%s", (sent,), None)
    line = JsonFormatter().format(record)
    assert line.splitlines() == [line] and line.isprintable(), line
    assert json.loads(line)["message"] == f"id={sent}"


def test_the_span_exporter_process_logs_in_the_server_s_format(repo: Path) -> None:
    """With a collector that is down, the exporter process's retries are the lines the dropped-spans alert sends
    operators to; with `--log-format json` they must be JSON like every other line on the stream."""
    from tests.process import ServeProcess, free_port

    args = ["--model-repository", str(repo), "--grpc-port", "0", "--log-format", "json"]
    args += ["--otlp-endpoint", f"127.0.0.1:{free_port()}", "--otlp-insecure", "--trace-sample-rate", "1.0"]
    with ServeProcess(args) as server:
        server.wait_for_line("ready:")
        c = tc.InferenceServerClient(server.address)
        try:
            _infer(c)
        finally:
            c.close()
        line = server.wait_for_line("opentelemetry", timeout=60)
        assert server.terminate() == 0
    record = json.loads(line)
    assert record["logger"].startswith("opentelemetry") and record["level"] == "WARNING"
    assert not [x for x in server.lines if x.strip() and not x.startswith("{")], "every line is a JSON record"
