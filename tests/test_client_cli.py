"""`tensorgate infer` as a user runs it: a child process against a real server."""

from __future__ import annotations

import argparse
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tensorgate.client import Unavailable
from tensorgate.client._cli import unreachable_hint
from tests.certificates import SERVER_NAME, make_pki
from tests.onnx_models import (
    ADD_SUB_CONFIG,
    accumulator_config,
    accumulator_model,
    add_sub_model,
    identity_model,
    write_config,
)
from tests.process import TENSORGATE, free_port
from tests.scripted_upstream import ScriptedUpstream
from tests.serving import ServerThread


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("cli") / "models"
    add_sub_model(root / "add_sub" / "1" / "model.onnx")
    write_config(root, "add_sub", 'name: "add_sub"\n' + ADD_SUB_CONFIG)
    identity_model(root / "identity_bytes" / "1" / "model.onnx", "BYTES")
    for datatype in ("INT32", "BOOL", "FP16"):
        identity_model(root / f"identity_{datatype.lower()}" / "1" / "model.onnx", datatype)
    accumulator_model(root / "acc" / "1" / "model.onnx")
    # Each call starts a process: the sequence must outlive the default second of idleness between them.
    write_config(root, "acc", accumulator_config("acc", extra="max_sequence_idle_microseconds: 60000000"))
    accumulator_model(root / "acc_text" / "1" / "model.onnx", corrid="BYTES")
    write_config(root, "acc_text", accumulator_config("acc_text", corrid="TYPE_STRING"))
    with ServerThread(root) as s:
        yield s


def infer(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TENSORGATE, "infer", *map(str, args)], capture_output=True, text=True, timeout=60)


ROW = list(range(16))


def test_json_and_npy_inputs_print_json(server: ServerThread, tmp_path: Path) -> None:
    np.save(tmp_path / "b.npy", np.ones((1, 16), np.float32))
    done = infer(
        "add_sub", "--input", f"INPUT0={json.dumps([ROW])}", "--input", f"INPUT1={tmp_path / 'b.npy'}",
        "--server", server.address, "--request-id", "cli-1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert (body["model"], body["version"], body["id"]) == ("add_sub", "1", "cli-1")
    out0 = body["outputs"]["OUTPUT0"]
    assert out0["datatype"] == "FP32" and out0["shape"] == [1, 16]
    assert out0["data"] == [[v + 1.0 for v in ROW]]
    assert body["outputs"]["OUTPUT1"]["data"] == [[v - 1.0 for v in ROW]]


def test_json_file_selected_output_and_npy_out(server: ServerThread, tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps([ROW, ROW]))
    out_dir = tmp_path / "out"
    done = infer(
        "add_sub", "--input", f"INPUT0={tmp_path / 'x.json'}", "--input", f"INPUT1={json.dumps([ROW, ROW])}",
        "--output", "OUTPUT1", "--server", server.address, "--npy-out", out_dir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(out_dir / "OUTPUT1.npy")]
    out = np.load(out_dir / "OUTPUT1.npy")
    assert out.dtype == np.float32 and out.shape == (2, 16) and not out.any()


def test_bytes_tensors(server: ServerThread) -> None:
    done = infer("identity_bytes", "--input", 'INPUT0=[["a", "b", "", "é"]]', "--server", server.address)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)["outputs"]["OUTPUT0"]
    assert out == {"datatype": "BYTES", "shape": [1, 4], "data": [["a", "b", "", "é"]]}


def test_unknown_model_is_one_clear_line(server: ServerThread) -> None:
    done = infer("no_such_model", "--input", "INPUT0=[[1]]", "--server", server.address)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("tensorgate infer: NOT_FOUND: ") and "'no_such_model'" in done.stderr


def test_server_down_is_one_clear_line() -> None:
    address = f"127.0.0.1:{free_port()}"
    done = infer("add_sub", "--input", "INPUT0=[[1]]", "--server", address, "--timeout", "5")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"tensorgate infer: cannot reach {address}: UNAVAILABLE: ")


def test_a_server_that_answers_unavailable_is_not_called_unreachable(tmp_path: Path) -> None:
    root = tmp_path / "models"
    add_sub_model(root / "add_sub" / "1" / "model.onnx")
    with ServerThread(root, model_control_mode="explicit", load_model=[]) as s:
        done = infer("add_sub", "--input", "INPUT0=[[1]]", "--server", s.address)
    assert done.returncode == 1
    assert done.stderr.startswith("tensorgate infer: UNAVAILABLE: ") and "not loaded" in done.stderr


def test_a_fronted_model_whose_upstream_is_down_is_not_called_unreachable(tmp_path: Path) -> None:
    """The server answered: its UNAVAILABLE names the model and the upstream it could not reach ("Failed to
    connect"), and the command must not blame the server it did reach."""
    root = tmp_path / "models"
    with ScriptedUpstream() as up:
        (root / "front").mkdir(parents=True)
        (root / "front" / "config.pbtxt").write_text(
            'backend: "tensorgate_triton"\n'
            f'parameters {{ key: "tensorgate.triton.url" value {{ string_value: "{up.url}" }} }}\n'
            'parameters { key: "tensorgate.triton.model_name" value { string_value: "m" } }\n'
        )
        with ServerThread(root) as s:
            up.stop()
            done = infer("front", "--input", "X=[[1, 2]]", "--server", s.address, "--timeout", "10")
    assert done.returncode == 1
    assert done.stderr.startswith("tensorgate infer: UNAVAILABLE: model 'front'"), done.stderr
    assert "cannot reach" not in done.stderr


def test_health_says_a_tls_port_may_be_why_its_socket_closed(tmp_path: Path) -> None:
    """Plain text against a TLS port: gRPC says only "Socket closed"; the probe says what to try."""
    pki = make_pki(tmp_path / "pki")
    root = tmp_path / "models"
    identity_model(root / "identity_fp32" / "1" / "model.onnx", "FP32")
    with ServerThread(root, tls_cert=pki["server"], tls_key=pki["server-key"]) as s:
        done = subprocess.run(
            [TENSORGATE, "health", "--server", s.address, "--timeout", "5"], capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    expected = f"tensorgate health: cannot reach {s.address} (a TLS port? give --tls-ca"
    assert done.stderr.startswith(expected), done.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["health"],
        ["infer", "m", "--input", "x=[1]"],
        ["rollout", "m"],
        ["feedback", "m", "--id", "r1", "--label", "1"],
        ["monitor", "m"],
    ],
    ids=lambda command: command[0],
)
def test_every_command_says_when_it_cannot_reach_the_server(command: list[str]) -> None:
    """Nothing listens on the port (a wrong --server, a server down): every command says so in one line, as
    `tensorgate health` does, not gRPC's words alone under the address as if the server had answered."""
    address = f"127.0.0.1:{free_port()}"
    done = subprocess.run(
        [TENSORGATE, *command, "--server", address, "--timeout", "5"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"tensorgate {command[0]}: cannot reach {address}: UNAVAILABLE: "), done.stderr


@pytest.mark.parametrize("details", ["Socket closed", "recvmsg:Connection reset by peer"])
def test_a_closed_plaintext_connection_hints_at_a_tls_port(details: str) -> None:
    """A TLS port closes a plaintext client's connection; gRPC reports it either way (review 128 saw the reset)."""
    args = argparse.Namespace(server="127.0.0.1:8001", tls_ca=None, tls_cert=None, tls_key=None)
    hint = unreachable_hint(args, Unavailable(details))
    assert hint == "cannot reach 127.0.0.1:8001 (a TLS port? give --tls-ca, and --tls-cert/--tls-key for mutual TLS): "


def test_health_with_an_unreadable_tls_file_is_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "ca.pem"
    done = subprocess.run(
        [TENSORGATE, "health", "--server", f"127.0.0.1:{free_port()}", "--tls-ca", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("tensorgate health: ")
    assert "Traceback" not in done.stderr


def test_top_classes_of_an_output(server: ServerThread) -> None:
    row = [0.0] * 16
    row[5], row[9] = 3.0, 2.0
    done = infer(
        "add_sub", "--input", f"INPUT0={json.dumps([row])}", "--input", f"INPUT1={json.dumps([[0.0] * 16])}",
        "--class-count", "OUTPUT0=2", "--server", server.address,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    outputs = json.loads(done.stdout)["outputs"]
    assert list(outputs) == ["OUTPUT0"]  # naming an output returns only the named ones, as --output does
    assert outputs["OUTPUT0"] == {"datatype": "BYTES", "shape": [1, 2], "data": [["3.000000:5", "2.000000:9"]]}


def test_a_sequence_across_calls(server: ServerThread) -> None:
    """The state of a sequence model lives in the server, so one sequence can span separate CLI calls."""
    sums = []
    for value, flags in ((2.0, ["--sequence-start"]), (3.0, []), (4.0, ["--sequence-end"])):
        done = infer("acc", "--input", f"INPUT=[[{value}]]", "--sequence-id", "12", *flags, "--server", server.address)
        assert done.returncode == 0, done.stderr
        sums.append(json.loads(done.stdout)["outputs"]["OUTPUT"]["data"])
    assert sums == [[[2.0]], [[5.0]], [[9.0]]]
    done = infer("acc", "--input", "INPUT=[[1.0]]", "--sequence-id", "12", "--server", server.address)
    assert done.returncode == 1 and "sequence 12 is not active" in done.stderr


def test_a_digit_only_id_for_a_model_that_takes_string_ids(server: ServerThread) -> None:
    """Digits are an integer ID, except for a model whose CORRID is a string: there "007" stays "007"."""
    args = ["--input", "INPUT=[[1.0]]", "--sequence-id", "007", "--sequence-start", "--sequence-end"]
    done = infer("acc_text", *args, "--server", server.address)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outputs"]["CORRID_OUT"]["data"] == [["007"]]
    done = infer("acc", *args, "--server", server.address)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outputs"]["CORRID_OUT"]["data"] == [[7]]


def test_bad_request_is_invalid_argument(server: ServerThread) -> None:
    done = infer("add_sub", "--input", f"INPUT0={json.dumps([ROW])}", "--server", server.address)
    assert done.returncode == 1
    assert done.stderr.startswith("tensorgate infer: INVALID_ARGUMENT: ") and "INPUT1" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--input", "INPUT0"], "expected NAME=FILE.npy", id="no-equals"),
        pytest.param(["--input", "INPUT0=[1,"], "not valid JSON", id="bad-json"),
        pytest.param(["--input", "INPUT0=missing.npy"], "missing.npy", id="missing-file"),
        pytest.param([], "at least one --input", id="no-inputs"),
        pytest.param(["--input", "A=[1]", "--class-count", "OUT=0"], "K a positive integer", id="class-count"),
        pytest.param(["--input", "A=[1]", "--sequence-start"], "need a non-zero --sequence-id", id="no-sequence-id"),
        pytest.param(["--input", "A=[1]", "--sequence-id", "-5"], "cannot be negative", id="negative-id"),
        pytest.param(["--input", "A=[1]", "--sequence-id", str(2**64)], "must be below 2**64", id="huge-id"),
        pytest.param(["--input", "A=[1]", "--class-count", "OUT=\u00b2"], "K a positive integer", id="superscript"),
        pytest.param(["--input", "A=[1]", "--tls-cert", "c.pem"], "--tls-cert and --tls-key", id="cert-without-key"),
    ],
)
def test_usage_errors(args: list[str], message: str) -> None:
    done = infer("add_sub", *args, "--server", "127.0.0.1:1")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("tensorgate infer: ") and message in done.stderr


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        pytest.param("identity_int32", "[[1.7, 2, 3, 4]]", "1.7 at [0, 0] does not fit INT32", id="fraction"),
        pytest.param("identity_bool", "[[0, 1, 0.5, 1]]", "0.5 at [0, 2] does not fit BOOL", id="bool"),
        pytest.param("identity_fp16", "[[1.5, 70000, 0, 0]]", "70000.0 at [0, 1] does not fit FP16", id="fp16-inf"),
    ],
)
def test_json_numbers_a_datatype_cannot_hold_are_refused(
    server: ServerThread, model: str, data: str, message: str
) -> None:
    """They were changed instead: 1.7 sent as 1, 0.5 as true, 70000 as FP16 infinity."""
    done = infer(model, "--input", f"INPUT0={data}", "--server", server.address)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr == f"tensorgate infer: --input INPUT0: {message}\n"


def test_json_numbers_a_datatype_holds_are_sent(server: ServerThread) -> None:
    """Whole numbers written as floats are integers, 0 and 1 are booleans, and FP16 rounds as floats do."""
    for model, data, expected in (
        ("identity_int32", "[[1.0, -2, 3, 4]]", [[1, -2, 3, 4]]),
        ("identity_bool", "[[0, 1, true, false]]", [[False, True, True, False]]),
        ("identity_fp16", "[[0.1, 65504, -1, Infinity]]", [[0.0999755859375, 65504.0, -1.0, float("inf")]]),
    ):
        done = infer(model, "--input", f"INPUT0={data}", "--server", server.address)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["outputs"]["OUTPUT0"]["data"] == expected


def test_files_that_cannot_be_read_or_written_are_one_clear_line(server: ServerThread, tmp_path: Path) -> None:
    """Usage errors, exit 2 with one line and no traceback, for every command (feedback and bench gave tracebacks,
    and bench found its --out unwritable only after the whole sweep)."""
    rows = ["--input", f"INPUT0={json.dumps([ROW])}", "--input", f"INPUT1={json.dumps([ROW])}"]
    cases: list[tuple[list[str | Path], str]] = [
        (["infer", "add_sub", *rows, "--npy-out", "/proc/no"], "--npy-out"),
        (["feedback", "add_sub", "--id", "r1", "--label", "1", "--tls-ca", tmp_path / "missing.pem"], "missing.pem"),
        (["bench", "add_sub", "--out", "/proc/no", "--duration", "1", "--concurrency", "1"], "--out /proc/no"),
    ]
    for args, message in cases:
        done = subprocess.run(
            [TENSORGATE, *map(str, args), "--server", server.address], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_mutual_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    root = tmp_path / "models"
    identity_model(root / "identity_fp32" / "1" / "model.onnx", "FP32")
    with ServerThread(root, tls_cert=pki["server"], tls_key=pki["server-key"], tls_client_ca=pki["ca"]) as s:
        common: list[str | Path] = ["identity_fp32", "--input", "INPUT0=[[1, 2, 3, 4]]", "--server", s.address]
        tls: list[str | Path] = ["--tls-ca", pki["ca"], "--tls-server-name", SERVER_NAME]
        done = infer(*common, *tls, "--tls-cert", pki["client"], "--tls-key", pki["client-key"])
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["outputs"]["OUTPUT0"]["data"] == [[1.0, 2.0, 3.0, 4.0]]
        refused = infer(*common, *tls, "--timeout", "5")  # no client certificate
        assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr
