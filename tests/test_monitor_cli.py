"""`tensorgate profile`, `export` and `monitor`, and examples/monitoring_walkthrough.py (the README's monitoring
section), against a real server with monitoring on, serving the example digits classifier."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import json
import re
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tensorgate.client import InferenceClient
from tensorgate.server.cli import main
from tensorgate.server.monitoring import DB_NAME, Prediction, PredictionStore
from tensorgate.server.monitoring.alerts import METRICS, load_rules_file
from tensorgate.server.monitoring.drift import ReferenceProfile, load_profile
from tests.serving import ServerThread

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "examples" / "monitoring-alerts.yaml"


def _load(name: str, path: Path) -> ModuleType:
    # examples/ is not a package and pytest does not put the repository root on sys.path: load it by file.
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve the module through sys.modules
        spec.loader.exec_module(module)
    return module


build_models = _load("tensorgate_examples_build_models", ROOT / "examples" / "build_models.py")
walkthrough = _load("tensorgate_examples_monitoring_walkthrough", ROOT / "examples" / "monitoring_walkthrough.py")


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("monitor") / "models"
    build_models.write_repository(root)
    return root


@pytest.fixture(scope="module")
def held_out(repo: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(repo / "digits" / "test_data.npz")
    return data["X_test"], data["y_test"]


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    data_dir = tmp_path_factory.mktemp("data")
    with ServerThread(repo, data_dir=data_dir, monitor_interval_s=0.5) as s:
        yield s


def _data_dir(server: ServerThread) -> Path:
    assert server.settings.data_dir is not None
    return server.settings.data_dir


def _wait_stored(server: ServerThread, n: int) -> None:
    """Capture is asynchronous: wait (bounded) until the store holds at least n digits predictions."""
    store = PredictionStore(_data_dir(server) / DB_NAME)
    try:
        for _ in range(200):
            if store.count("digits") >= n:
                return
            time.sleep(0.05)
    finally:
        store.close()
    raise AssertionError(f"the store never held {n} predictions")


# ----- the walk-through ---------------------------------------------------------------------------------------


def test_walkthrough_script_fires_the_alerts_on_inverted_digits(repo: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with ServerThread(repo, data_dir=data_dir, monitor_interval_s=0.5, alert_rules=RULES) as s:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = walkthrough.main(
                ["--server", s.address, "--data-dir", str(data_dir), "--models", str(repo), "--wait-s", "60"]
            )
    text = out.getvalue()
    assert code == 0, text
    held_out, inverted = text.split("== the same digits inverted", 1)
    inverted, waited = inverted.split("== waiting up to", 1)
    assert re.search(r"drift of model 'digits' over 450 rows: no drift", held_out), held_out
    assert "alerts: none firing" in held_out
    accuracy = float(re.search(r"^accuracy\s+([\d.]+)", held_out, re.M)[1])  # type: ignore[index]
    assert accuracy > 0.9
    assert re.search(r"drift of model 'digits' over 450 rows: DRIFTED", inverted), inverted
    assert float(re.search(r"^accuracy\s+([\d.]+)", inverted, re.M)[1]) < 0.5  # type: ignore[index]
    for rule in ("digits_input_drift", "digits_input_psi", "digits_f1_low"):
        assert re.search(rf"^{rule}\s+digits\s+1\s", waited, re.M), waited
    profile = load_profile(data_dir, repo / "digits", "digits")
    assert profile is not None and profile.samples == 1347


def test_readme_section_names_the_script_and_the_rules() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Watching a model: quality, drift, alerts", 1)[1].split("\n## ", 1)[0]
    for needed in (
        "--data-dir",
        "--alert-rules examples/monitoring-alerts.yaml",
        "python examples/monitoring_walkthrough.py",
        "tensorgate monitor digits",
        "tensorgate export digits",
        "tensorgate profile digits",
    ):
        assert needed in section, needed


def _watching_section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("## Watching a model: quality, drift, alerts", 1)[1].split("\n## ", 1)[0]


def test_readme_by_hand_steps_run_as_written(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command of the README's by-hand walk-through, in order, against a fresh capturing server: the files
    they read (reference.npy, labels.jsonl) are made by commands of the block itself."""
    block = _watching_section().split("The script does, step by step, what you would do by hand", 1)[1]
    commands = [c for c in re.findall(r"```sh\n(.*?)```", block, re.DOTALL)[0].splitlines() if not c.startswith("#")]
    data_dir, plots = tmp_path / "data", tmp_path / "plots"
    monkeypatch.chdir(tmp_path)
    printed = []
    with ServerThread(repo, data_dir=data_dir, monitor_interval_s=0.5, alert_rules=RULES) as s:
        for command in commands:
            line = (
                command.replace("127.0.0.1:8001", s.address)
                .replace("/tmp/tensorgate-data", str(data_dir))
                .replace("/tmp/tensorgate-monitor", str(plots))
            )
            argv = shlex.split(line)
            if argv[:2] == ["python", "examples/monitoring_walkthrough.py"]:
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    code, err = walkthrough.main([*argv[2:], "--models", str(repo)]), ""
                printed.append(out.getvalue())
            else:
                assert argv[0] == "tensorgate", command
                code, out_text, err = run_cli(*argv[1:])
                printed.append(out_text)
            assert code == 0, (command, err)
    assert "accepted 45 of 45 label(s) for model 'digits'" in printed[3]
    assert "quality of model 'digits' version 1: 45 predictions, 45 labelled" in printed[4], printed[4]
    assert (plots / "history.jsonl").is_file()
    exported = [json.loads(line) for line in (tmp_path / "digits.jsonl").read_text().splitlines()]
    assert sum(r["label"] is not None for r in exported) == 450


def _parameters_monitoring_reads() -> set[str]:
    """Every config.pbtxt parameter key the monitoring code reads: the second argument of each `parameter(...)`
    call in server/monitoring/, a literal or a module constant, and the alert rules' prefix."""
    found = {"tensorgate.alert.<name>"}
    for path in sorted((ROOT / "server" / "monitoring").glob("*.py")):
        tree = ast.parse(path.read_text())
        constants = {
            target.id: str(node.value.value)
            for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for target in node.targets
            if isinstance(target, ast.Name) and isinstance(node.value.value, str)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "parameter":
                key = node.args[1]
                assert isinstance(key, ast.Constant | ast.Name), ast.dump(key)
                found.add(str(key.value) if isinstance(key, ast.Constant) else constants[key.id])
    return found


def test_readme_lists_every_parameter_monitoring_reads() -> None:
    """The table of "Your own model" is written by hand: no parameter read is missing from it, none it lists is
    not read."""
    read = _parameters_monitoring_reads()
    assert {"tensorgate.task", "tensorgate.capture.sample_rate", "tensorgate.drift.reference_requests"} <= read
    table = _watching_section().split("| Parameter | Meaning | Default |", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"^\| `([^`]+)` \|", table, re.M))
    assert listed == read


def test_readme_rules_file_example_loads_and_names_every_metric(tmp_path: Path) -> None:
    section = _watching_section()
    (example,) = [b for b in re.findall(r"```yaml\n(.*?)```", section, re.DOTALL) if b.startswith("rules:")]
    path = tmp_path / "rules.yaml"
    path.write_text(example)
    (rule,) = load_rules_file(path)
    assert (rule.metric, rule.min_samples, rule.for_windows) == ("drift.drifted_share", 200, 2)
    for metric in METRICS:
        assert re.search(rf"\b{re.escape(metric)}\b", example), metric


# ----- profile ---------------------------------------------------------------------------------------------------


def test_profile_through_the_server_has_the_models_real_outputs(
    server: ServerThread, held_out: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, _ = held_out
    np.save(tmp_path / "ref.npy", x)
    out = tmp_path / "profile.json"
    code, printed, err = run_cli(
        "profile", "digits", "--data", str(tmp_path / "ref.npy"), "--server", server.address, "--out", str(out)
    )
    assert code == 0, err
    assert "450 rows, 64 input features, 11 output features" in printed
    profile = ReferenceProfile.from_json(out.read_text())
    with InferenceClient(server.address) as client:
        labels = np.concatenate([client.infer("digits", {"input": x[i : i + 64]})["label"] for i in range(0, 450, 64)])
    keys, counts = np.unique(labels, return_counts=True)
    assert profile.feature("label").categories == {str(k): int(c) for k, c in zip(keys, counts, strict=True)}
    assert profile.feature("probabilities[0]").kind == "score"


def test_profile_without_a_server_covers_inputs_only(tmp_path: Path, held_out: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = held_out
    np.savez(tmp_path / "ref.npz", input=x)
    code, printed, err = run_cli("profile", "digits", "--data", str(tmp_path / "ref.npz"), "--data-dir", str(tmp_path))
    assert code == 0, err
    profile = load_profile(tmp_path, tmp_path, "digits")
    assert profile is not None and len(profile.features) == 64 and profile.samples == 450


@pytest.mark.parametrize(
    "argv, problem",
    [
        pytest.param(["--data", "{npy}", "--out", "{tmp}/p.json"], "without --server, name the .npy", id="no-input"),
        pytest.param(["--data", "{tmp}/missing.npy", "--out", "{tmp}/p.json"], "cannot read it", id="missing"),
        pytest.param(["--data", "{npy}", "--input", "x", "--bins", "1", "--out", "{tmp}/p.json"], "--bins", id="bins"),
    ],
)
def test_profile_usage_errors(tmp_path: Path, argv: list[str], problem: str) -> None:
    np.save(tmp_path / "ref.npy", np.zeros((4, 2), np.float32))
    args = [a.format(npy=tmp_path / "ref.npy", tmp=tmp_path) for a in argv]
    code, _, err = run_cli("profile", "digits", *args)
    assert code == 2 and problem in err and err.startswith("tensorgate profile: ")


def test_profile_names_a_wrong_input(server: ServerThread, tmp_path: Path) -> None:
    np.savez(tmp_path / "ref.npz", pixels=np.zeros((4, 64), np.float32))
    code, _, err = run_cli("profile", "digits", "--data", str(tmp_path / "ref.npz"), "--server", server.address,
                           "--out", str(tmp_path / "p.json"))  # fmt: skip
    assert code == 2 and "model 'digits' has no input pixels (it has input)" in err


def test_profile_of_an_unknown_model_is_a_server_error(server: ServerThread, tmp_path: Path) -> None:
    np.save(tmp_path / "ref.npy", np.zeros((4, 64), np.float32))
    code, _, err = run_cli("profile", "nope", "--data", str(tmp_path / "ref.npy"), "--server", server.address,
                           "--out", str(tmp_path / "p.json"))  # fmt: skip
    assert code == 1 and "NOT_FOUND" in err


def test_profile_warns_that_a_capturing_server_keeps_the_reference_rows(
    server: ServerThread, held_out: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """A server with --data-dir captures the profile's own requests like any traffic: the reference rows land in
    the window its monitor judges and hide drift there. `profile` says so, and what to do instead."""
    x, _ = held_out
    np.save(tmp_path / "ref.npy", x)
    capture = server.app.capture
    assert capture is not None
    capture.flush()
    before = capture.captured
    code, printed, err = run_cli("profile", "digits", "--data", str(tmp_path / "ref.npy"), "--server", server.address,
                                 "--out", str(tmp_path / "p.json"))  # fmt: skip
    assert code == 0, err
    assert err.startswith(f"tensorgate profile: warning: {server.address} captures model 'digits' predictions"), err
    assert "the 450 reference rows" in err and "without --data-dir" in err, err
    capture.flush()
    assert capture.captured > before  # what the warning is about


def test_profile_against_a_server_without_capture_does_not_warn(
    repo: Path, held_out: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """The remedy the warning names: the same models served without --data-dir, the profile written into the
    capturing server's data directory."""
    x, _ = held_out
    np.save(tmp_path / "ref.npy", x)
    with ServerThread(repo) as plain:
        code, printed, err = run_cli("profile", "digits", "--data", str(tmp_path / "ref.npy"), "--server",
                                     plain.address, "--data-dir", str(tmp_path / "data"))  # fmt: skip
    assert code == 0 and err == "", err
    profile = load_profile(tmp_path / "data", repo / "digits", "digits")
    assert profile is not None and profile.samples == 450


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["monitor", "digits"], id="monitor"),
        pytest.param(["feedback", "digits", "--id", "r1", "--label", "3"], id="feedback"),
    ],
)
def test_monitoring_commands_against_a_server_without_data_dir_say_so(repo: Path, argv: list[str]) -> None:
    """Such a server has no Monitoring service: gRPC's own "Method not found!" alone leaves the user guessing."""
    with ServerThread(repo) as plain:
        code, _, err = run_cli(*argv, "--server", plain.address)
    assert code == 1
    assert "UNIMPLEMENTED" in err and "monitoring is off" in err and "--data-dir" in err, err


def test_monitoring_calls_to_a_server_without_data_dir_say_what_it_needs(repo: Path) -> None:
    """The Python client (and any other) hears why, on unary and streaming methods alike, and the server keeps
    serving inference."""
    from tensorgate.client import InferenceClient
    from tensorgate.client.errors import Unimplemented

    with ServerThread(repo) as plain, InferenceClient(plain.address, timeout=10) as client:
        with pytest.raises(Unimplemented, match="monitoring is off on this server.*--data-dir DIR"):
            client.model_quality("digits")
        with pytest.raises(Unimplemented, match="monitoring is off on this server.*--data-dir DIR"):
            list(client.submit_feedback_stream("digits", [("r1", 3)]))
        assert client.ready("digits")


# ----- export ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported_traffic(server: ServerThread, held_out: tuple[np.ndarray, np.ndarray]) -> dict[str, tuple]:
    """Three requests with known ids: two labelled (one label per row), one not."""
    x, y = held_out
    sent: dict[str, tuple] = {}
    with InferenceClient(server.address) as client:
        before = client.model_quality("digits").predictions
        for i, rid in enumerate(("export-a", "export-b", "export-c")):
            rows = slice(3 * i, 3 * i + 3)
            result = client.infer("digits", {"input": x[rows]}, request_id=rid)
            assert result.id == rid
            sent[rid] = (x[rows], result["label"].copy(), result["probabilities"].copy(), y[rows] if i < 2 else None)
        client.submit_feedback_batch("digits", [(rid, sent[rid][3]) for rid in ("export-a", "export-b")])
    _wait_stored(server, before + 3)
    return sent


def _check_records(records: list[dict], sent: dict[str, tuple]) -> None:
    got = [r for r in records if r["request_id"] in sent]
    assert [(r["request_id"], r["row"]) for r in got] == [(rid, i) for rid in sent for i in range(3)]
    for r in got:
        x, label, probabilities, truth = sent[r["request_id"]]
        i = r["row"]
        assert r["model"] == "digits" and r["version"] == "1"
        assert np.array_equal(np.asarray(r["inputs"]["input"], np.float32), x[i])
        assert r["outputs"]["label"] == int(label[i, 0])
        assert np.allclose(r["outputs"]["probabilities"], probabilities[i])
        if truth is None:
            assert r["label"] is None and r["label_timestamp"] is None
        else:
            assert r["label"] == pytest.approx(float(truth[i])) and r["label_timestamp"] >= r["timestamp"]


def test_export_jsonl_round_trip(server: ServerThread, exported_traffic: dict, tmp_path: Path) -> None:
    out = tmp_path / "digits.jsonl"
    code, printed, err = run_cli(
        "export",
        "digits",
        "--data-dir",
        str(_data_dir(server)),
        "--since",
        "-1h",
        "--format",
        "jsonl",
        "--out",
        str(out),
    )
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert f"{len(records)} rows of model 'digits' (jsonl)" in printed
    _check_records(records, exported_traffic)

    labelled = tmp_path / "labelled.jsonl"
    assert run_cli("export", "digits", "--data-dir", str(_data_dir(server)), "--labelled-only", "--out",
                   str(labelled))[0] == 0  # fmt: skip
    ids = {json.loads(line)["request_id"] for line in labelled.read_text().splitlines()}
    assert {"export-a", "export-b"} <= ids and "export-c" not in ids


def test_export_only_reads_the_store_of_a_running_server(
    server: ServerThread, exported_traffic: dict, held_out: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """Export opens the store read-only: it used to checkpoint the WAL on close, taking the write lock that the
    server's capture writer needs (captures in that moment were lost)."""
    with InferenceClient(server.address) as client:
        client.infer("digits", {"input": held_out[0][:2]})
    assert server.app.capture.flush()
    wal = _data_dir(server) / f"{DB_NAME}-wal"
    before = wal.stat().st_size
    assert before > 0
    code, _, err = run_cli("export", "digits", "--data-dir", str(_data_dir(server)), "--out", str(tmp_path / "x.jsonl"))
    assert code == 0, err
    assert wal.stat().st_size == before  # not checkpointed (TRUNCATE leaves it empty)


def _strict_json(line: str) -> dict:
    """json.loads refusing NaN/Infinity, as jq and other languages' parsers do."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    record: dict = json.loads(line, parse_constant=refuse)
    return record


def test_export_jsonl_writes_nonfinite_values_as_null(tmp_path: Path) -> None:
    """NaN and infinities used to be written as NaN/Infinity, which strict JSON parsers refuse."""
    store = PredictionStore(tmp_path / DB_NAME)
    inputs = {"x": np.array([[1.0, np.nan], [np.inf, -np.inf]], np.float32)}
    outputs = {"score": np.array([np.nan, 0.5], np.float64), "label": np.array([1, 2], np.int64)}
    store.insert([Prediction("nan-1", "m", "1", time.time(), inputs, outputs)])
    store.set_labels("m", [("nan-1", np.array([1.5, np.nan]))], time.time())
    store.close()
    out = tmp_path / "m.jsonl"
    code, _, err = run_cli("export", "m", "--data-dir", str(tmp_path), "--out", str(out))
    assert code == 0, err
    records = [_strict_json(line) for line in out.read_text().splitlines()]
    assert [r["inputs"]["x"] for r in records] == [[1.0, None], [None, None]]
    assert [r["outputs"] for r in records] == [{"score": None, "label": 1}, {"score": 0.5, "label": 2}]
    assert [r["label"] for r in records] == [1.5, None]


def test_export_parquet_round_trip(server: ServerThread, exported_traffic: dict, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "digits.parquet"
    code, _, err = run_cli("export", "digits", "--data-dir", str(_data_dir(server)), "--since=-1h", "--format",
                           "parquet", "--out", str(out))  # fmt: skip
    assert code == 0, err
    table = pq.read_table(out).to_pylist()
    records = [
        {
            **r,
            "inputs": {"input": r["input.input"]},
            "outputs": {"label": r["output.label"], "probabilities": r["output.probabilities"]},
        }  # fmt: skip
        for r in table
    ]
    _check_records(records, exported_traffic)


def test_export_parquet_without_pyarrow_says_how_to_get_it(
    server: ServerThread, exported_traffic: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if the extra were not installed
    code, _, err = run_cli("export", "digits", "--data-dir", str(_data_dir(server)), "--format", "parquet", "--out",
                           str(tmp_path / "x.parquet"))  # fmt: skip
    assert code == 2 and "pip install 'tensorgate[export]'" in err


def test_export_time_window(server: ServerThread, exported_traffic: dict, tmp_path: Path) -> None:
    out = tmp_path / "none.jsonl"
    code, printed, _ = run_cli("export", "digits", "--data-dir", str(_data_dir(server)), "--since",
                               "2999-01-01T00:00:00Z", "--out", str(out))  # fmt: skip
    assert code == 0 and out.read_text() == "" and "0 rows" in printed


@pytest.mark.parametrize(
    "argv, problem",
    [
        pytest.param(["--since", "yesterday"], "expected ISO 8601", id="since"),
        pytest.param(["--data-dir", "{tmp}/empty"], "no prediction store", id="no-store"),
    ],
)
def test_export_usage_errors(server: ServerThread, tmp_path: Path, argv: list[str], problem: str) -> None:
    args = [a.format(tmp=tmp_path) for a in argv]
    if "--data-dir" not in args:
        args += ["--data-dir", str(_data_dir(server))]
    code, _, err = run_cli("export", "digits", *args, "--out", str(tmp_path / "x.jsonl"))
    assert code == 2 and problem in err and err.startswith("tensorgate export: ")


# ----- monitor -----------------------------------------------------------------------------------------------


def test_monitor_prints_the_table_and_writes_plots(
    server: ServerThread, held_out: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = held_out
    np.save(tmp_path / "ref.npy", x)
    profile_dir = _data_dir(server)
    assert run_cli("profile", "digits", "--data", str(tmp_path / "ref.npy"), "--server", server.address,
                   "--data-dir", str(profile_dir))[0] == 0  # fmt: skip
    with InferenceClient(server.address) as client:
        ids = [client.infer("digits", {"input": x[i : i + 10]}).id for i in range(0, 200, 10)]
        client.submit_feedback_batch("digits", [(rid, y[i * 10 : i * 10 + 10]) for i, rid in enumerate(ids)])
    out = tmp_path / "plots"
    code, printed, err = run_cli("monitor", "digits", "--server", server.address, "--window-count", "20",
                                 "--out", str(out), "--watch", "2", "--interval", "0")  # fmt: skip
    assert code == 0, err
    assert "quality of model 'digits' version 1: 20 predictions, 20 labelled" in printed
    assert re.search(r"^accuracy\s+0\.9\d+", printed, re.M)
    assert "drift of model 'digits' over 200 rows: no drift" in printed
    for name in ("quality.png", "drift.png", "features.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2 and history[0]["quality"]["accuracy"] > 0.9 and "psi_max" in history[0]["drift"]


def test_monitor_without_matplotlib_says_how_to_get_it(
    server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, printed, err = run_cli("monitor", "digits", "--server", server.address, "--out", str(tmp_path))
    assert code == 1 and "pip install 'tensorgate[bench]'" in err
    assert "quality of model 'digits'" in printed  # the table still printed


def test_monitor_of_an_unknown_model(server: ServerThread) -> None:
    code, _, err = run_cli("monitor", "nope", "--server", server.address)
    assert code == 1 and err.startswith(f"tensorgate monitor: {server.address}: NOT_FOUND"), err
