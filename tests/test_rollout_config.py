"""Rollout configuration that used to fail open or go unsaid: a misspelt ``tensorgate.*`` parameter (no split, all
traffic to the untested highest version) is refused at load; ``tensorgate.rollout.shadow_max_in_flight`` bounds
the shadow runs; a label sent before the shadow's capture is stored labels it too; a canary whose
rollback_on_alert cannot act (no --data-dir) is warned about. Real servers, real ONNX models, real feedback."""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorgate.client import InferenceClient
from tensorgate.client.errors import Unavailable
from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.errors import ModelLoadError
from tensorgate.server.monitoring.store import Prediction
from tensorgate.server.repository.parameters import KNOWN, TRITON_KEYS, check_parameter_keys
from tensorgate.server.repository.rollout import _KEYS as ROLLOUT_KEYS
from tensorgate.server.repository.rollout import PREFIX as ROLLOUT_PREFIX
from tensorgate.server.rpc.monitoring import MonitoringServicer, ServedModel, _Waiting
from tests.onnx_models import busy_model, identity_model, write_config
from tests.serving import ServerThread
from tests.test_rollout import X, _eventually, _params, _repo, _shadow_runs

README = Path(__file__).resolve().parents[1] / "README.md"


def _param(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'


def _load_error(tmp_path: Path, extra: str) -> str:
    """What loading model m (versions 1 and 2) with `extra` in its config fails with."""
    repo = _repo(tmp_path / "models", extra)
    with ServerThread(repo, model_control_mode="explicit", load_model=[]) as server:
        with InferenceClient(server.address) as client:
            with pytest.raises(Unavailable) as info:
                client.load("m")
            assert not client.ready("m")
    return str(info.value)


# ----- misspelt tensorgate parameters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, meant",
    [
        pytest.param("tensorgate.rolout.canary_version", "tensorgate.rollout.canary_version", id="family-typo"),
        pytest.param("tensorgate.Rollout.canary_version", "tensorgate.rollout.canary_version", id="case"),
        pytest.param("tensorgat.rollout.canary_version", "tensorgate.rollout.canary_version", id="prefix-typo"),
        pytest.param("tensorgate_rollout_canary_version", "tensorgate.rollout.canary_version", id="underscores"),
        pytest.param("tensorgate.rolout.canary_pct", "tensorgate.rollout.canary_percent", id="two-typos"),
        pytest.param("tensorgate.pad_batch", "tensorgate.pad_batches", id="onnx-setting"),
        pytest.param("tensorgate.monitor.window", "tensorgate.monitor.window_s", id="monitor-setting"),
        pytest.param("tensorgat.alert.my_rule", "tensorgate.alert.my_rule", id="alert-family"),
    ],
)
def test_a_misspelt_tensorgate_parameter_fails_the_load_with_what_was_meant(
    tmp_path: Path, key: str, meant: str
) -> None:
    """Each used to load as if not written: a misspelt canary key made no split, and every request that names no
    version went to version 2, the untested one."""
    error = _load_error(tmp_path, _param(key, "2"))
    assert f"model 'm': unknown parameter '{key}': did you mean '{meant}'?" in error, error


def test_an_unknown_tensorgate_parameter_with_no_near_name_fails_the_load(tmp_path: Path) -> None:
    error = _load_error(tmp_path, _param("tensorgate.zzz", "1"))
    assert "unknown parameter 'tensorgate.zzz' (tensorgate reads no parameter of that name)" in error, error


def test_every_known_parameter_and_others_own_pass_the_check() -> None:
    config = mc.ModelConfig(name="m")
    keys = [
        *KNOWN,
        *ROLLOUT_KEYS,
        "tensorgate.sha256:2",
        "tensorgate.alert.my_rule",
        "tensorgate.triton.url",
        "tensorgate.triton.header.x-token",
        "enable_mem_arena",
        "intra_op_thread_count",
        "execution_provider",
        "my.own.setting",
    ]
    for key in keys:
        config.parameters[key].string_value = "1"
    check_parameter_keys(config)


def test_the_readme_documents_every_known_parameter() -> None:
    """The README's rollout section names its keys short (`canary_percent`), after the full prefix."""
    text = README.read_text()
    missing = [key for key in KNOWN if key not in text]
    missing += [key for key in ROLLOUT_KEYS if key not in text and f"`{key.removeprefix(ROLLOUT_PREFIX)}`" not in text]
    assert missing == []


# ----- tensorgate.rollout.shadow_max_in_flight ------------------------------------------------------------------


def test_shadow_max_in_flight_bounds_the_shadow_runs_at_once(tmp_path: Path) -> None:
    """A shadow run of about a second, three requests in quick succession: with a bound of 1 the first runs and
    the two others are dropped (the fixed bound of 4 ran all three)."""
    extra = _params(shadow_version="2", shadow_max_in_flight="1")
    repo = _repo(tmp_path / "models", extra, v2=lambda p: busy_model(p, iterations=250_000))
    with ServerThread(repo) as server, InferenceClient(server.address) as client:
        for i in range(3):
            assert client.infer("m", {"INPUT0": X}, request_id=f"id-{i}").version == "1"
        _eventually(lambda: sum(_shadow_runs(server).values()) == 3)
        assert _shadow_runs(server) == Counter(ok=1, dropped=2)


@pytest.mark.parametrize(
    "extra, problem",
    [
        pytest.param(
            _params(shadow_version="2", shadow_max_in_flight="0"),
            "parameter 'tensorgate.rollout.shadow_max_in_flight' must be a whole number of shadow runs >= 1, got '0'",
            id="zero",
        ),
        pytest.param(
            _params(shadow_version="2", shadow_max_in_flight="many"),
            "parameter 'tensorgate.rollout.shadow_max_in_flight' must be a whole number of shadow runs >= 1, got "
            "'many'",
            id="not-a-number",
        ),
        pytest.param(
            _params(shadow_max_in_flight="2"),
            "parameter 'tensorgate.rollout.shadow_max_in_flight' needs 'tensorgate.rollout.shadow_version'",
            id="no-shadow",
        ),
    ],
)
def test_a_shadow_bound_that_cannot_be_used_fails_the_load(tmp_path: Path, extra: str, problem: str) -> None:
    error = _load_error(tmp_path, extra)
    assert re.search(re.escape(f"model 'm': {problem}"), error), error


# ----- labels sent before the shadow's capture -----------------------------------------------------------------


def _slow_shadow(repo: Path) -> Path:
    """Model c: stable version 1 answers at once, shadow version 2 (the same classes) after a few hundred
    milliseconds of work, so that a label sent as soon as the answer comes arrives before the shadow's capture."""
    identity_model(repo / "c" / "1" / "model.onnx", "FP32", shape=("batch", 10))
    busy_model(repo / "c" / "2" / "model.onnx", iterations=100_000, width=10)
    write_config(
        repo,
        "c",
        'name: "c" max_batch_size: 8 version_policy { all {} }\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 10 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 10 ] } ]\n' + _params(shadow_version="2"),
    )
    return repo


def test_a_label_sent_while_the_shadow_still_runs_labels_the_shadows_prediction_too(tmp_path: Path) -> None:
    """Stable version 1 answers at once, shadow version 2 (the same classes, after a few hundred milliseconds of
    work) later; each label is sent as soon as its answer comes. The shadow's captures used to be stored after
    their labels and stay unlabelled: the review saw 2 to 11 of 31 shadow predictions labelled, 30 of 30 stable."""
    repo = _slow_shadow(tmp_path / "models")
    with ServerThread(repo, data_dir=tmp_path / "data") as server, InferenceClient(server.address) as client:
        for k in range(4):
            result = client.infer("c", {"INPUT0": np.eye(1, 10, k, dtype=np.float32)}, request_id=f"r-{k}")
            assert result.version == "1"
            client.submit_feedback("c", result.id, k)
        _eventually(lambda: client.statistics("c", "2").model_stats[0].inference_stats.success.count == 4)
        _eventually(lambda: client.model_quality("c", "2").labelled == 4, timeout=15.0)
        quality = {v: client.model_quality("c", v) for v in ("1", "2")}
    assert [(q.predictions, q.labelled, q.metrics["accuracy"]) for q in quality.values()] == [(4, 4, 1.0)] * 2


# ----- rollback_on_alert without a monitor -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, data_dir, warned",
    [
        pytest.param(_params(canary_version="2", canary_percent="10"), False, True, id="no-data-dir"),
        pytest.param(_params(canary_version="2", canary_percent="10"), True, False, id="monitored"),
        pytest.param(
            _params(canary_version="2", canary_percent="10", rollback_on_alert="false"), False, False, id="rollback-off"
        ),
        pytest.param(_params(shadow_version="2"), False, False, id="shadow-only"),
    ],
)
def test_a_canary_whose_rollback_cannot_act_is_warned_about_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, extra: str, data_dir: bool, warned: bool
) -> None:
    repo = _repo(tmp_path / "models", extra)
    caplog.set_level(logging.WARNING, logger="tensorgate")
    with ServerThread(repo, data_dir=tmp_path / "data" if data_dir else None):
        pass
    found = [r.getMessage() for r in caplog.records if "rollback_on_alert is on" in r.getMessage()]
    expected = [
        "model 'm': tensorgate.rollout.rollback_on_alert is on for canary version 2, but the server has no "
        "--data-dir, so nothing is monitored and no alert can fire to roll it back; start the server with "
        "--data-dir (and alert rules, tensorgate.alert.*), or set rollback_on_alert to false"
    ]
    assert found == (expected if warned else [])


def test_a_canary_loaded_after_start_without_a_monitor_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning was given only for the models loaded at start: one loaded later by RepositoryModelLoad (or a
    poll) kept its rollback_on_alert unsaid."""
    repo = _repo(tmp_path / "models", _params(canary_version="2", canary_percent="10"))
    caplog.set_level(logging.WARNING, logger="tensorgate")
    with ServerThread(repo, model_control_mode="explicit", load_model=[]) as server:
        with InferenceClient(server.address) as client:
            client.load("m")
            assert client.ready("m")
    found = [r for r in caplog.records if "rollback_on_alert is on" in r.getMessage()]
    assert [(r.levelno, r.getMessage().split(":")[0]) for r in found] == [(logging.WARNING, "model 'm'")]


# ----- other tools' keys, and hints from the key's own family (review 104) ----------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "tensorrt.execution_provider",
        "tensorrt.pad_batches",
        "tensorrt.sha256",
        "ort.graph_optimization_level",
        "ort.intra_op_spinning",
        "tensorflow.graph_optimization_level",
        "x.tensorgate.task",
    ],
)
def test_another_tools_key_that_resembles_ours_passes_the_check(key: str) -> None:
    """Whole-key similarity took these for typos of tensorgate's (tensorrt.sha256 for tensorgate.sha256), and a
    config that loaded before failed: only a near miss of the ``tensorgate`` part makes a key ours."""
    config = mc.ModelConfig(name="m")
    config.parameters[key].string_value = "1"
    check_parameter_keys(config)


@pytest.mark.parametrize(
    "key, hint",
    [
        pytest.param("tensorgat.rollout.canary_version", "did you mean 'tensorgate.rollout.canary_version'?"),
        pytest.param("tensorgate.rolout.canary_version", "did you mean 'tensorgate.rollout.canary_version'?"),
        pytest.param("tensorgte.task", "did you mean 'tensorgate.task'?"),
        pytest.param("tensorgat.owner", "(tensorgate reads no parameter of that name)"),
        pytest.param("tensorgate.drift.reference", "did you mean 'tensorgate.drift.reference_requests'?"),
        pytest.param("tensorgate.alerts", "did you mean 'tensorgate.alert.<key>'?"),
    ],
)
def test_a_near_miss_is_refused_with_a_hint_from_its_own_family(key: str, hint: str) -> None:
    """'tensorgate.drift.reference' used to be offered the remote backend's 'tensorgate.triton.reference', and
    'tensorgate.alerts' 'tensorgate.task'."""
    config = mc.ModelConfig(name="m")
    config.parameters[key].string_value = "1"
    with pytest.raises(ModelLoadError) as info:
        check_parameter_keys(config)
    assert (
        info.value.message
        == f"failed to load model 'm': unknown parameter '{key}'{' ' if hint[0] == '(' else ': '}{hint}"
    )


# ----- late labels: batched, and held only for the ids a shadow runs (review 104) ---------------------------------


def _classes_repo(root: Path, rollout: str) -> Path:
    """Model c, versions 1 and 2 alike: 10 classes (argmax of the input), with `rollout`'s parameters."""
    for version in ("1", "2"):
        identity_model(root / "c" / version / "model.onnx", "FP32", shape=("batch", 10))
    write_config(
        root,
        "c",
        'name: "c" max_batch_size: 8 version_policy { all {} }\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 10 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 10 ] } ]\n' + rollout,
    )
    return root


def _feedback_servicer(server: ServerThread) -> MonitoringServicer:
    """The server's monitoring servicer, as the server wired it."""
    servicer = server.app.monitoring_servicer
    assert servicer is not None
    return servicer


def test_labels_for_ids_no_shadow_run_will_capture_are_not_held(tmp_path: Path) -> None:
    """Shadow version 2 runs none of the requests (shadow_percent 0): a label waited LATE_LABEL_S for each, in
    memory, for a capture that never comes."""
    repo = _classes_repo(tmp_path / "models", _params(shadow_version="2", shadow_percent="0"))
    with ServerThread(repo, data_dir=tmp_path / "data") as server, InferenceClient(server.address) as client:
        for k in range(5):
            result = client.infer("c", {"INPUT0": np.eye(1, 10, k, dtype=np.float32)}, request_id=f"r-{k}")
            client.submit_feedback("c", result.id, k)
        assert len(_feedback_servicer(server)._late._waiting) == 0
        assert client.model_quality("c", "1").labelled == 5


def test_late_labels_of_one_capture_batch_are_stored_in_one_transaction(tmp_path: Path) -> None:
    """64 labels waiting for the shadow's captures, which the capture writer stores in one batch: one synced
    set_labels for them all (it was one each, 72 ms against 12 ms for 256 in the review)."""
    repo = _classes_repo(tmp_path / "models", _params(shadow_version="2"))
    with ServerThread(repo, data_dir=tmp_path / "data") as server, InferenceClient(server.address) as client:
        servicer = _feedback_servicer(server)
        store = server.app.monitor.store if server.app.monitor is not None else None
        assert store is not None
        now = time.time()
        outputs = {"OUTPUT0": np.eye(1, 10, 3, dtype=np.float32)}
        for i in range(64):
            servicer._late.hold(("c", f"late-{i}", "2"), _Waiting(np.array([3]), ServedModel(), now))
        calls: list[int] = []
        set_labels = store.set_labels

        def counted(model: str, labels: Any, timestamp: Any) -> list[bool]:
            labels = list(labels)
            calls.append(len(labels))
            return set_labels(model, labels, timestamp)

        store.set_labels = counted  # type: ignore[method-assign]
        store.insert([Prediction(f"late-{i}", "c", "2", now, None, outputs) for i in range(64)])
        assert calls == [64]
        assert client.model_quality("c", "2").labelled == 64


# ----- the remote backend's keys, checked for any model -----------------------------------------------------------


@pytest.mark.parametrize(
    "key, hint",
    [
        pytest.param("tensorgate.triton.ulr", ": did you mean 'tensorgate.triton.url'?", id="typo"),
        pytest.param("tensorgate.triton.max_stream", ": did you mean 'tensorgate.triton.max_streams'?", id="plural"),
        pytest.param("tensorgate.Triton.url", ": did you mean 'tensorgate.triton.url'?", id="case"),
        pytest.param(
            "tensorgat.triton.header.X-Api-Key", ": did you mean 'tensorgate.triton.header.X-Api-Key'?", id="header"
        ),
        pytest.param("tensorgate.triton.zzzzzzzz", " (tensorgate reads no parameter of that name)", id="unknown"),
    ],
)
def test_an_unknown_triton_key_is_refused_for_any_model_with_a_hint(key: str, hint: str) -> None:
    """``tensorgate.triton.*`` passed the check whatever followed: only a remote model's own reader refused an
    unknown one, with no "did you mean", and on any other model a misspelt key passed unseen."""
    config = mc.ModelConfig(name="m")
    config.parameters[key].string_value = "1"
    with pytest.raises(ModelLoadError) as info:
        check_parameter_keys(config)
    assert info.value.message == f"failed to load model 'm': unknown parameter '{key}'{hint}"


def test_every_key_the_remote_backend_reads_passes_the_check() -> None:
    config = mc.ModelConfig(name="m")
    for key in (*TRITON_KEYS, "tensorgate.triton.header.x-api-key"):
        config.parameters[key].string_value = "1"
    check_parameter_keys(config)


def test_a_label_waiting_for_the_shadow_is_the_one_that_passed_not_a_refused_one_for_the_same_id(
    tmp_path: Path,
) -> None:
    """A batch labels one id twice: 3 (a class the prediction can be) passes, 12 is refused. The shadow's capture
    comes after the label (a slow shadow), so the label waits for it: the one that passed, where the last one
    sent for the id was held instead (review 123), and the shadow got none."""
    repo = _slow_shadow(tmp_path / "models")
    with ServerThread(repo, data_dir=tmp_path / "data") as server, InferenceClient(server.address) as client:
        result = client.infer("c", {"INPUT0": np.eye(1, 10, 3, dtype=np.float32)}, request_id="r-3")
        statuses = client.submit_feedback_batch("c", [(result.id, 3), (result.id, 12)])
        assert [s.ok for s in statuses] == [True, False]
        _eventually(lambda: client.statistics("c", "2").model_stats[0].inference_stats.success.count == 1)
        _eventually(lambda: client.model_quality("c", "1").labelled == 1, timeout=15.0)
        _eventually(lambda: client.model_quality("c", "2").labelled == 1, timeout=15.0)
