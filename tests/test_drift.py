"""Drift statistics on the real example digits classifier and scikit-learn's digits data.

The reference is the classifier's training split (inputs, and the outputs the exported ONNX model gives for them);
held-out digits must stay below the alert thresholds the README walk-through uses, inverted or noisy digits must
cross them, and PSI/KS must equal a direct numpy/scipy computation on the same bins and samples.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from scipy import stats
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tensorgate.server.monitoring.drift import (
    KS_METHOD,
    PSI_FLOOR,
    DriftReport,
    ProfileError,
    ProfileFileError,
    ReferenceProfile,
    build_profile,
    compare,
    load_profile,
    population_stability_index,
    profile_path,
    save_profile,
)

ROOT = Path(__file__).resolve().parent.parent
# The thresholds of the README walk-through's alert rules (and deploy/monitoring/prometheus-alerts.yaml).
DRIFTED_SHARE_ALERT = 0.1
PSI_MEAN_ALERT = 0.2


def _build_models() -> Any:
    spec = importlib.util.spec_from_file_location(
        "tensorgate_examples_build_models", ROOT / "examples" / "build_models.py"
    )
    assert spec is not None and spec.loader is not None
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve the module through sys.modules
        spec.loader.exec_module(module)
    return module


class Digits:
    """The example classifier (exported to ONNX, run in ONNX Runtime) and its train/held-out split."""

    def __init__(self) -> None:
        build_models = _build_models()
        trained = build_models.train_digits(seed=0)
        x, y = load_digits(return_X_y=True)
        # The split build_models.train_digits makes; checked against the held-out part it returns.
        self.x_train, x_test, _, _ = train_test_split(
            x.astype(np.float32), y.astype(np.int64), test_size=0.25, random_state=0, stratify=y
        )
        assert np.array_equal(x_test, trained.x_test)
        self.x_test = trained.x_test
        model = build_models.export_digits(trained.pipeline)
        self.session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def outputs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        label, probabilities = self.session.run(["label", "probabilities"], {"input": x})
        return {"label": label, "probabilities": probabilities}

    def compare(self, profile: ReferenceProfile, x: np.ndarray) -> DriftReport:
        return compare(profile, {"input": x}, self.outputs(x))


@pytest.fixture(scope="module")
def digits() -> Digits:
    return Digits()


@pytest.fixture(scope="module")
def profile(digits: Digits) -> ReferenceProfile:
    return build_profile("digits", {"input": digits.x_train}, digits.outputs(digits.x_train))


def _inverted(x: np.ndarray) -> np.ndarray:
    return (16.0 - x).astype(np.float32)


def _noisy(x: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(x + rng.normal(0.0, sigma, x.shape), 0.0, 16.0).astype(np.float32)


def test_profile_has_one_feature_per_pixel_and_output_score(profile: ReferenceProfile) -> None:
    names = [f.name for f in profile.features]
    assert names[:64] == [f"input[{i}]" for i in range(64)]
    assert names[64:] == ["label"] + [f"probabilities[{i}]" for i in range(10)]
    assert {f.kind for f in profile.features[:64]} == {"numeric"}
    assert profile.feature("label").kind == "categorical"
    assert profile.feature("probabilities[3]").kind == "score"
    assert profile.samples == 1347
    assert all(len(f.sample) == 1000 for f in profile.features if f.kind != "categorical")


def test_constant_pixels_get_a_point_bin_and_no_nan(digits: Digits, profile: ReferenceProfile) -> None:
    constant = [i for i in range(64) if np.ptp(digits.x_train[:, i]) == 0]
    assert constant, "the digits data has always-zero border pixels"
    for i in constant:
        f = profile.feature(f"input[{i}]")
        assert f.edges == [0.0, float(np.nextafter(0.0, 1.0))]
        assert f.counts == [0, 1347, 0]
    report = digits.compare(profile, digits.x_test)
    for d in report.features:
        assert math.isfinite(d.psi) and math.isfinite(d.statistic) and math.isfinite(d.p_value), d
    for i in constant:
        assert not next(f for f in report.features if f.name == f"input[{i}]").drifted


@pytest.mark.parametrize("rows", [200, 450], ids=["200-rows", "all-450"])
def test_held_out_digits_stay_below_the_alert_thresholds(digits: Digits, profile: ReferenceProfile, rows: int) -> None:
    for seed in range(5):
        pick = np.random.default_rng(seed).choice(len(digits.x_test), size=rows, replace=False)
        report = digits.compare(profile, digits.x_test[pick])
        assert report.samples == rows
        assert report.drifted_share < DRIFTED_SHARE_ALERT, report
        assert report.psi_mean < PSI_MEAN_ALERT, report
        assert not report.drifted, [f for f in report.features if f.drifted]


@pytest.mark.parametrize(
    "shift",
    [
        pytest.param(_inverted, id="inverted"),
        pytest.param(lambda x: _noisy(x, 4.0), id="noise-sigma-4"),
        pytest.param(lambda x: _noisy(x, 2.0), id="noise-sigma-2"),
    ],
)
def test_shifted_digits_cross_the_alert_thresholds(digits: Digits, profile: ReferenceProfile, shift: Any) -> None:
    report = digits.compare(profile, shift(digits.x_test[:200]))
    assert report.drifted
    assert report.drifted_share > DRIFTED_SHARE_ALERT
    assert report.psi_mean > PSI_MEAN_ALERT
    assert report.score_drift > 0.1


def test_psi_and_ks_equal_a_direct_numpy_scipy_computation(digits: Digits, profile: ReferenceProfile) -> None:
    window = _noisy(digits.x_test, 1.0)
    report = digits.compare(profile, window)
    by_name = {f.name: f for f in report.features}
    for i in (5, 20, 36, 0):
        f = profile.feature(f"input[{i}]")
        edges = np.array([-np.inf, *f.edges, np.inf])
        expected = np.histogram(digits.x_train[:, i], bins=edges)[0] / len(digits.x_train)
        actual = np.histogram(window[:, i], bins=edges)[0] / len(window)
        expected, actual = np.maximum(expected, PSI_FLOOR), np.maximum(actual, PSI_FLOOR)
        psi = float(np.sum((actual - expected) * np.log(actual / expected)))
        assert by_name[f.name].psi == pytest.approx(psi, rel=1e-9, abs=1e-12)
        ks = stats.ks_2samp(np.asarray(f.sample), window[:, i].astype(np.float64), method=KS_METHOD)
        assert by_name[f.name].statistic == pytest.approx(ks.statistic)
        assert by_name[f.name].p_value == pytest.approx(ks.pvalue)
        assert by_name[f.name].drifted == (ks.pvalue < 0.05 / len(report.features))  # Bonferroni
    psis = [by_name[f"input[{i}]"].psi for i in range(64)]
    assert report.psi_max == pytest.approx(max(psis))
    assert report.psi_mean == pytest.approx(np.mean(psis))
    outputs = [f.psi for f in report.features if f.name == "label" or f.name.startswith("probabilities")]
    assert report.score_drift == pytest.approx(max(outputs))


def test_ks_where_scipys_exact_method_gives_up_does_not_warn() -> None:
    """scipy's default KS on these 5 against 5 values warns "Exact calculation unsuccessful"; compare() must not
    (pytest turns warnings into errors, and in the server they would come from the monitor's worker thread)."""
    reference, current = np.arange(5.0), np.arange(5.0) + 1
    with pytest.warns(RuntimeWarning, match="Exact calculation unsuccessful"):
        stats.ks_2samp(reference, current)
    profile = build_profile("m", {"x": reference})
    (feature,) = compare(profile, {"x": current}).features
    ks = stats.ks_2samp(reference, current, method="asymp")
    assert feature.statistic == pytest.approx(ks.statistic)
    assert feature.p_value == pytest.approx(ks.pvalue)


def test_psi_textbook_values() -> None:
    assert population_stability_index(np.array([10, 10]), np.array([10, 10])) == 0.0
    assert population_stability_index(np.array([50, 50]), np.array([90, 10])) == pytest.approx(
        (0.9 - 0.5) * math.log(0.9 / 0.5) + (0.1 - 0.5) * math.log(0.1 / 0.5)
    )
    assert population_stability_index(np.array([0, 0]), np.array([1, 2])) == 0.0


def test_categorical_input_uses_chi_square() -> None:
    rng = np.random.default_rng(0)
    colours = np.array(["red", "green", "blue"], dtype=object)
    reference = {"colour": rng.choice(colours, size=(600, 1), p=[0.5, 0.3, 0.2]), "x": rng.normal(size=(600, 1))}
    profile = build_profile("m", reference)
    assert profile.feature("colour").kind == "categorical"
    same = compare(profile, {"colour": rng.choice(colours, size=(300, 1), p=[0.5, 0.3, 0.2])})
    shifted = compare(profile, {"colour": rng.choice(colours, size=(300, 1), p=[0.1, 0.2, 0.7])})
    assert not same.drifted and shifted.drifted
    window = rng.choice(colours, size=300, p=[0.1, 0.2, 0.7])
    ref_counts = [profile.feature("colour").categories[k] for k in ("blue", "green", "red")]
    cur_counts = [int((window == k).sum()) for k in ("blue", "green", "red")]
    chi2 = stats.chi2_contingency(np.array([ref_counts, cur_counts]))
    got = compare(profile, {"colour": window}).features[0]
    assert got.statistic == pytest.approx(chi2.statistic) and got.p_value == pytest.approx(chi2.pvalue)


def test_integer_input_named_categorical() -> None:
    codes = np.tile(np.arange(4, dtype=np.int64), 50).reshape(-1, 1)
    profile = build_profile("m", {"code": codes}, categorical=["code"])
    assert profile.feature("code").categories == {"0": 50, "1": 50, "2": 50, "3": 50}
    report = compare(profile, {"code": np.full((100, 1), 7, dtype=np.int64)})
    assert report.drifted and report.features[0].psi > 1


def test_wide_inputs_are_summarised(digits: Digits) -> None:
    wide = np.random.default_rng(0).normal(size=(50, 5000)).astype(np.float32)
    profile = build_profile("m", {"image": wide})
    assert [f.name for f in profile.features] == ["image.mean", "image.std"]
    assert not compare(profile, {"image": wide[:20]}).drifted
    assert compare(profile, {"image": wide[:20] * 3 + 1}).drifted


def test_missing_inputs_are_left_out(profile: ReferenceProfile, digits: Digits) -> None:
    report = compare(profile, {}, digits.outputs(_inverted(digits.x_test[:200])))
    assert {f.name for f in report.features} == {"label"} | {f"probabilities[{i}]" for i in range(10)}
    assert report.psi_max == 0.0 and report.drifted_share == 0.0
    assert report.drifted and report.score_drift > 0.25
    empty = compare(profile, {})
    assert empty.samples == 0 and empty.features == [] and not empty.drifted


@pytest.mark.parametrize(
    ("width", "problem"),
    [
        pytest.param(5, "its rows have 5 element(s), the reference profile's 3", id="wider"),
        pytest.param(2, "its rows have 2 element(s), the reference profile's 3", id="narrower"),
    ],
)
def test_a_tensor_of_another_width_is_skipped_and_named(width: int, problem: str) -> None:
    """Rows of another width used to compare the elements that happened to line up and drop the rest, unnamed."""
    rng = np.random.default_rng(0)
    profile = build_profile("m", {"seq": rng.normal(size=(200, 3)), "x": rng.normal(size=(200, 1))})
    report = compare(profile, {"seq": rng.normal(size=(50, width)) + 5, "x": rng.normal(size=(50, 1))})
    assert report.skipped == {"seq": problem}
    assert [f.name for f in report.features] == ["x"] and not report.drifted
    text = compare(profile, {"seq": np.full((50, 3), "a", dtype=object), "x": rng.normal(size=(50, 1))})
    assert text.skipped == {"seq": "it holds text where the reference profile has numbers"}
    wide = build_profile("m", {"image": rng.normal(size=(50, 5000))})
    assert compare(wide, {"image": rng.normal(size=(20, 6000))}).skipped == {}  # mean/std: any width


def test_profile_json_round_trip_and_lookup_order(tmp_path: Path, profile: ReferenceProfile, digits: Digits) -> None:
    again = ReferenceProfile.from_json(profile.to_json())
    assert again.to_json() == profile.to_json()
    window = digits.x_test[:100]
    assert digits.compare(again, window) == digits.compare(profile, window)

    model_dir = tmp_path / "repo" / "digits"
    model_dir.mkdir(parents=True)
    assert load_profile(tmp_path / "data", model_dir, "digits") is None
    (model_dir / "reference_profile.json").write_text(build_profile("from-model-dir", {"x": np.ones(3)}).to_json())
    found = load_profile(tmp_path / "data", model_dir, "digits")
    assert found is not None and found.model == "from-model-dir"
    save_profile(profile, profile_path(tmp_path / "data", "digits"))
    assert (tmp_path / "data" / "profiles" / "digits.json").is_file()
    found = load_profile(tmp_path / "data", model_dir, "digits")
    assert found is not None and found.model == "digits"
    assert load_profile(None, model_dir, "digits").model == "from-model-dir"


@pytest.mark.parametrize(
    "text, problem",
    [
        pytest.param("[]", "JSON object", id="not-an-object"),
        pytest.param('{"format": 99}', "unsupported profile format", id="format"),
        pytest.param('{"format": 1, "model": "m"}', "not a tensorgate reference profile", id="missing-keys"),
        pytest.param("{nope", "not a tensorgate reference profile", id="not-json"),
    ],
)
def test_bad_profile_files_say_what_is_wrong(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "reference_profile.json").write_text(text)
    with pytest.raises(ProfileError, match=problem) as info:
        load_profile(None, tmp_path, "digits")
    assert "model 'digits'" in str(info.value)


def test_a_bad_profile_file_is_named_without_the_servers_paths(tmp_path: Path, profile: ReferenceProfile) -> None:
    """The message reaches remote callers (GetModelDrift): the file is named relative to its directory."""
    data = json.loads(profile.to_json())
    data["features"][5]["edges"] = data["features"][5]["edges"][::-1]
    path = profile_path(tmp_path, "digits")
    save_profile(profile, path)
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileFileError, match="edges must be strictly increasing") as info:
        load_profile(tmp_path, tmp_path, "digits")
    assert info.value.where == "profiles/digits.json in the data directory" and str(tmp_path) not in str(info.value)
    path.unlink()
    (tmp_path / "reference_profile.json").mkdir()
    with pytest.raises(ProfileFileError, match="reference_profile.json in the model directory: cannot be read"):
        load_profile(tmp_path, tmp_path, "digits")


def test_bad_feature_kind_is_refused(profile: ReferenceProfile) -> None:
    data = json.loads(profile.to_json())
    data["features"][0]["kind"] = "fuzzy"
    with pytest.raises(ProfileError, match="unknown kind 'fuzzy'"):
        ReferenceProfile.from_json(json.dumps(data))


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".."])
def test_model_names_never_climb_out_of_the_profiles_directory(tmp_path: Path, name: str) -> None:
    with pytest.raises(ProfileError, match="cannot name a profile file"):
        profile_path(tmp_path, name)


def test_build_profile_refuses_bad_arguments() -> None:
    with pytest.raises(ProfileError, match="bins must be at least 2"):
        build_profile("m", {"x": np.ones(3)}, bins=1)
    with pytest.raises(ProfileError, match="input 'x' has no rows"):
        build_profile("m", {"x": np.ones((0, 2))})
    with pytest.raises(ProfileError, match="no inputs or outputs"):
        build_profile("m", {})


def test_degenerate_columns_give_finite_numbers_and_no_false_alarm() -> None:
    rng = np.random.default_rng(0)
    reference = np.column_stack(
        [np.zeros(300), np.full(300, np.nan), rng.integers(0, 2, 300), rng.normal(size=300)]
    ).astype(np.float32)
    reference[::7, 3] = np.inf
    profile = build_profile("m", {"x": reference})
    assert profile.feature("x[1]").counts == [0] and profile.feature("x[1]").sample == []
    window = np.column_stack([np.zeros(100), np.full(100, np.nan), rng.integers(0, 2, 100), rng.normal(size=100)])
    window[::7, 3] = np.inf  # the reference's share of infinities
    report = compare(profile, {"x": window.astype(np.float32)})
    assert [f.name for f in report.features] == ["x[0]", "x[1]", "x[2]", "x[3]"]
    assert (report.features[1].psi, report.features[1].p_value) == (0.0, 1.0)  # all NaN, as in the reference
    for f in report.features:
        assert math.isfinite(f.psi) and math.isfinite(f.statistic) and math.isfinite(f.p_value), f
    assert not report.drifted and math.isfinite(report.psi_mean)


def test_report_formats_the_server_side_dataclasses(digits: Digits, profile: ReferenceProfile) -> None:
    from tensorgate.server.monitoring.report import format_drift

    text = format_drift(digits.compare(profile, _inverted(digits.x_test[:200])), top=3)
    lines = text.splitlines()
    assert lines[0].startswith("drift of model 'digits' over 200 rows: DRIFTED; psi_max ")
    assert lines[1].split() == ["feature", "kind", "psi", "statistic", "p_value", "drifted"]
    assert len(lines) == 7 and lines[-1] == "... 72 more features"
    assert all(line.split()[-1] == "yes" for line in lines[3:6])


def test_values_turning_nan_or_infinite_are_drift() -> None:
    """A feature that starts arriving as NaN (a broken join upstream) must not vanish from the drift test: the
    share of non-finite values is compared with the reference's, and PSI gives them a bin."""
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(1000, 3))
    reference[::10, 2] = np.nan  # a feature that is sometimes missing, 10%
    profile = build_profile("m", {"x": reference})
    assert [f.nonfinite for f in profile.features] == [0, 0, 100]
    assert ReferenceProfile.from_json(profile.to_json()).feature("x[2]").nonfinite == 100

    window = rng.normal(size=(300, 3))
    window[::10, 2] = np.nan
    steady = compare(profile, {"x": window})
    assert not steady.drifted, [(f.name, f.p_value) for f in steady.features]

    broken = window.copy()
    broken[: len(broken) // 3, 0] = np.nan  # a third of x[0] lost
    broken[:, 1] = np.inf  # x[1] entirely infinite: no finite value left to compare
    report = compare(profile, {"x": broken})
    drifted = {f.name: f for f in report.features}
    assert drifted["x[0]"].drifted and drifted["x[0]"].psi > 0.25
    assert drifted["x[1]"].drifted and drifted["x[1]"].psi > 1.0
    assert not drifted["x[2]"].drifted
    assert report.drifted and report.drifted_share == pytest.approx(2 / 3)


def test_profiles_written_before_nonfinite_counts_still_load(profile: ReferenceProfile) -> None:
    data = json.loads(profile.to_json())
    for feature in data["features"]:
        feature.pop("nonfinite", None)
    again = ReferenceProfile.from_json(json.dumps(data))
    assert all(f.nonfinite == 0 for f in again.features)
