"""Rollout configuration that used to fail open or go unsaid: a misspelt ``tensorgate.*`` parameter (no split, all
traffic to the untested highest version) is refused at load; ``tensorgate.rollout.shadow_max_in_flight`` bounds
the shadow runs; a label sent before the shadow's capture is stored labels it too; a canary whose
rollback_on_alert cannot act (no --data-dir) is warned about. Real servers, real ONNX models, real feedback."""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tensorgate.client import InferenceClient
from tensorgate.client.errors import Unavailable
from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.repository.parameters import KNOWN, check_parameter_keys
from tensorgate.server.repository.rollout import _KEYS as ROLLOUT_KEYS
from tensorgate.server.repository.rollout import PREFIX as ROLLOUT_PREFIX
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


def test_a_label_sent_while_the_shadow_still_runs_labels_the_shadows_prediction_too(tmp_path: Path) -> None:
    """Stable version 1 answers at once, shadow version 2 (the same classes, after a few hundred milliseconds of
    work) later; each label is sent as soon as its answer comes. The shadow's captures used to be stored after
    their labels and stay unlabelled: the review saw 2 to 11 of 31 shadow predictions labelled, 30 of 30 stable."""
    repo = tmp_path / "models"
    identity_model(repo / "c" / "1" / "model.onnx", "FP32", shape=("batch", 10))
    busy_model(repo / "c" / "2" / "model.onnx", iterations=100_000, width=10)
    write_config(
        repo,
        "c",
        'name: "c" max_batch_size: 8 version_policy { all {} }\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 10 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 10 ] } ]\n' + _params(shadow_version="2"),
    )
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
