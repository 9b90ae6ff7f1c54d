"""Input and score drift: a reference profile per model, and per-window PSI, KS and chi-square against it.

A profile holds, per feature, quantile bin edges with the reference counts in each bin (for PSI) and a bounded
random sample of the reference values (for the two-sample Kolmogorov-Smirnov test); categorical features keep
their category counts (for PSI and chi-square). Features are named after the tensors they come from:

    "input"          an input with one element per row ([N] or [N, 1])
    "input[12]"      element 12 of a vector input, row-major after the batch axis ([N, 64] -> 64 features)
    "input.mean"     inputs wider than MAX_VECTOR_FEATURES elements per row are summarised by their per-row
    "input.std"      mean and standard deviation rather than tested element by element

Inputs are "numeric" (float, int) or "categorical" (BYTES/str, or named in ``categorical``); outputs are
"score" features (float outputs, e.g. class probabilities) or "categorical" (integer outputs, e.g. a class
label). The window summary (``psi_max``, ``psi_mean``, ``drifted_share``) is over input features;
``score_drift`` is the largest PSI over output features; ``drifted`` is true when any feature, input or output,
rejects "same distribution" at ``alpha`` after a Bonferroni correction over every feature tested.

NaN and infinities are a distribution of their own: a feature that starts arriving as NaN (a broken upstream join,
a division by zero) is drift. Each numeric feature's profile counts its non-finite reference values; PSI gets a
bin for them, and a window whose share of them differs from the reference's (a 2x2 chi-square test, beside KS on
the finite values, the two Bonferroni-corrected within the feature) drifts.

Constant features (the always-zero border pixels of the digits) are safe: their bins collapse to one edge, PSI
uses floored proportions, and KS on two identical constants gives statistic 0 and p-value 1, so they neither
produce NaN nor raise false alarms; a window where such a feature moves is real drift and is reported.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "KS_METHOD",
    "MAX_VECTOR_FEATURES",
    "DriftReport",
    "FeatureDrift",
    "FeatureProfile",
    "ProfileError",
    "ProfileFileError",
    "ReferenceProfile",
    "build_profile",
    "category_keys",
    "compare",
    "load_profile",
    "population_stability_index",
    "profile_candidates",
    "profile_path",
    "save_profile",
]

PROFILE_FORMAT = 1
MAX_VECTOR_FEATURES = 4096
"""Per-row elements above which an input is summarised (mean, std) instead of tested element by element."""
SAMPLE_SIZE = 1000
"""Reference values kept per feature for KS: enough for the test's power, small enough for a JSON file."""
KS_METHOD = "asymp"
"""scipy's two-sample KS p-value method. Not its default "auto": that tries the exact method (O(n1 * n2)) up to
10,000 values a side, and when its arithmetic fails (tied values such as the digits' pixels, even 5 against 5
values) falls back to "asymp" with a RuntimeWarning from whichever thread runs the monitor. "asymp" is what
windows of hundreds of rows get anyway, in a fraction of the time, and never warns."""
PSI_FLOOR = 1e-4
"""Proportion an empty bin counts as in PSI, so that ln(a/e) stays finite (the usual convention)."""
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class ProfileError(ValueError):
    """A reference profile that cannot be built, read or used (the message names the model and the problem)."""


class ProfileFileError(ProfileError):
    """A profile file that exists but cannot be used. ``where`` names it relative to the data or model directory,
    so that the message can go to a remote caller without the server's own paths."""

    def __init__(self, model: str, where: str, problem: str) -> None:
        super().__init__(f"model '{model}': {where}: {problem}")
        self.model, self.where, self.problem = model, where, problem


def _numbers(feature: str, key: str, values: Any, *, counts: bool = False) -> list[Any]:
    """A profile's list of finite numbers (non-negative integers for counts); the message names the bad one."""
    if not isinstance(values, list):
        raise ProfileError(f"feature {feature!r}: {key} must be a list, got {type(values).__name__}")
    out: list[Any] = []
    for v in values:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        if counts and ok and (v < 0 or v != int(v)):
            ok = False
        if not ok:
            what = "non-negative integers" if counts else "finite numbers"
            raise ProfileError(f"feature {feature!r}: {key} must hold {what}, got {v!r}")
        out.append(int(v) if counts else float(v))
    return out


@dataclass(slots=True)
class FeatureDrift:
    """One feature's drift in a window. ``statistic``/``p_value`` are KS (numeric/score) or chi-square."""

    name: str
    kind: str  # "numeric" | "categorical" | "score"
    psi: float
    statistic: float
    p_value: float
    drifted: bool


@dataclass(slots=True)
class DriftReport:
    """A window compared with the reference; see the module docstring for how the summary is computed."""

    model: str
    samples: int
    features: list[FeatureDrift]
    psi_max: float
    psi_mean: float
    drifted_share: float
    drifted: bool
    score_drift: float
    skipped: dict[str, str] = field(default_factory=dict)
    """Tensors of the window left out, each with why (its rows do not have the reference's shape): not watched."""


@dataclass(slots=True)
class FeatureProfile:
    """The reference of one feature. ``edges`` are the interior bin edges (bins are [e_i, e_i+1), open at
    both ends), ``counts`` the reference rows per bin; categorical features keep ``categories`` instead."""

    name: str
    source: str  # the tensor's name
    role: str  # "input" | "output"
    kind: str  # "numeric" | "categorical" | "score"
    selector: int | str  # flattened element index, -1 for a one-element row, "mean"/"std" for a summary
    edges: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    sample: list[float] = field(default_factory=list)
    categories: dict[str, int] = field(default_factory=dict)
    nonfinite: int = 0
    """Reference values that were NaN or infinite (not in ``counts``); profiles written before it read as 0."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "source": self.source,
            "role": self.role,
            "kind": self.kind,
            "selector": self.selector,
        }
        if self.kind == "categorical":
            out["categories"] = self.categories
        else:
            out.update(edges=self.edges, counts=self.counts, sample=self.sample)
            if self.nonfinite:
                out["nonfinite"] = self.nonfinite
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureProfile:
        if not isinstance(data, Mapping):
            raise ProfileError(f"a feature is a JSON object, got {data!r}")
        kind = str(data["kind"])
        if kind not in ("numeric", "categorical", "score"):
            raise ProfileError(f"feature {data.get('name')!r}: unknown kind {kind!r}")
        role = str(data["role"])
        if role not in ("input", "output"):
            raise ProfileError(f"feature {data.get('name')!r}: unknown role {role!r}")
        selector = data["selector"]
        name = str(data["name"])
        if isinstance(selector, bool) or not (
            (isinstance(selector, int) and selector >= -1) or selector in ("mean", "std")
        ):
            raise ProfileError(f"feature {name!r}: bad selector {selector!r}")
        categories = data.get("categories", {})
        if not isinstance(categories, Mapping):
            raise ProfileError(f"feature {name!r}: categories must be an object of counts")
        feature = cls(
            name=name,
            source=str(data["source"]),
            role=role,
            kind=kind,
            selector=selector,
            edges=_numbers(name, "edges", data.get("edges", [])),
            counts=_numbers(name, "counts", data.get("counts", []), counts=True),
            sample=_numbers(name, "sample", data.get("sample", [])),
            categories=dict(
                zip(
                    map(str, categories),
                    _numbers(name, "categories", list(categories.values()), counts=True),
                    strict=True,
                )
            ),
            nonfinite=_numbers(name, "nonfinite", [data.get("nonfinite", 0)], counts=True)[0],
        )
        if kind != "categorical" and len(feature.counts) != len(feature.edges) + 1:
            raise ProfileError(f"feature {feature.name!r}: {len(feature.counts)} counts for {len(feature.edges)} edges")
        # Bins are found by binary search (_bin_counts): edges out of order put values in the wrong bins, and PSI
        # would be wrong without any error.
        if any(b <= a for a, b in zip(feature.edges, feature.edges[1:], strict=False)):
            raise ProfileError(f"feature {feature.name!r}: edges must be strictly increasing")
        return feature


class ReferenceProfile:
    """What "normal" looks like for one model: one FeatureProfile per input feature and output score.

    Usage::

        profile = build_profile("digits", {"input": x_train}, {"probabilities": p_train})
        save_profile(profile, data_dir)                      # <data_dir>/profiles/digits.json
        report = compare(load_profile(data_dir, model_dir, "digits"), {"input": x_window}, {"probabilities": p})
    """

    __slots__ = ("bins", "features", "model", "samples")

    def __init__(self, model: str, samples: int, bins: int, features: list[FeatureProfile]) -> None:
        self.model = model
        self.samples = samples
        self.bins = bins
        self.features = features

    def feature(self, name: str) -> FeatureProfile:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": PROFILE_FORMAT,
                "model": self.model,
                "samples": self.samples,
                "bins": self.bins,
                "features": [f.to_dict() for f in self.features],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> ReferenceProfile:
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ProfileError("a reference profile is a JSON object")
            if data.get("format") != PROFILE_FORMAT:
                raise ProfileError(f"unsupported profile format {data.get('format')!r} (expected {PROFILE_FORMAT})")
            if not isinstance(data["features"], list):
                raise ProfileError("features must be a list")
            return cls(
                model=str(data["model"]),
                samples=int(data["samples"]),
                bins=int(data["bins"]),
                features=[FeatureProfile.from_dict(f) for f in data["features"]],
            )
        except ProfileError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise ProfileError(f"not a tensorgate reference profile: {exc!r}") from None


# ----- feature extraction ------------------------------------------------------------------------------------


def _rows(array: np.ndarray) -> np.ndarray:
    """[N, ...] -> [N, width] (a 0-d or 1-d array is N rows of one element)."""
    a = np.asarray(array)
    if a.ndim == 0:
        a = a.reshape(1)
    width = int(np.prod(a.shape[1:], dtype=np.int64))
    return a.reshape(a.shape[0], width)


def _is_text(a: np.ndarray) -> bool:
    return a.dtype.kind in "OSU"


def category_keys(values: np.ndarray) -> list[str]:
    """Category names as JSON keys: integral numbers without ".0", bytes decoded, everything else str(). Quality
    keys classes the same way, so that a label sent as "3" names the class a model predicts as 3."""
    keys: list[str] = []
    for v in values.tolist():
        if isinstance(v, bytes):
            keys.append(v.decode("utf-8", errors="replace"))
        elif isinstance(v, float) and v.is_integer():
            keys.append(str(int(v)))
        else:
            keys.append(str(v))
    return keys


def _specs(name: str, array: np.ndarray, role: str, categorical: Collection[str]) -> list[FeatureProfile]:
    rows = _rows(array)
    width = rows.shape[1]
    if role == "input":
        kind = "categorical" if (name in categorical or _is_text(rows)) else "numeric"
    else:
        kind = "score" if rows.dtype.kind == "f" else "categorical"
    if width == 1:
        return [FeatureProfile(name, name, role, kind, -1)]
    if width > MAX_VECTOR_FEATURES and kind != "categorical":
        return [FeatureProfile(f"{name}.{s}", name, role, kind, s) for s in ("mean", "std")]
    if width > MAX_VECTOR_FEATURES:
        raise ProfileError(
            f"{role} '{name}' has {width} categorical elements per row (more than {MAX_VECTOR_FEATURES})"
        )
    return [FeatureProfile(f"{name}[{i}]", name, role, kind, i) for i in range(width)]


def _values(feature: FeatureProfile, array: np.ndarray) -> np.ndarray | None:
    """The feature's column in ``array`` (floats for numbers, NaN included); None when the shape no longer has it."""
    rows = _rows(array)
    column: np.ndarray
    if isinstance(feature.selector, str):
        if _is_text(rows):
            return None
        data = rows.astype(np.float64)
        column = data.mean(axis=1) if feature.selector == "mean" else data.std(axis=1)
    elif feature.selector == -1:
        if rows.shape[1] != 1:
            return None
        column = rows[:, 0]
    else:
        if feature.selector >= rows.shape[1]:
            return None
        column = rows[:, feature.selector]
    if feature.kind == "categorical":
        return column
    if _is_text(column):
        return None
    numbers: np.ndarray = column.astype(np.float64)
    return numbers


def _shape_problem(features: Sequence[FeatureProfile], rows: np.ndarray) -> str | None:
    """Why a window's tensor cannot be compared with the reference features of that tensor; None when it can.

    A profile keeps no shapes, but one built by ``build_profile`` has a feature per element 0..width-1: rows of
    another width would compare elements that do not line up (or leave some out), so the tensor is skipped whole.
    """
    width = rows.shape[1]
    if _is_text(rows) and any(f.kind != "categorical" for f in features):
        return "it holds text where the reference profile has numbers"
    selectors = {f.selector for f in features}
    if selectors <= {"mean", "std"}:
        return None  # a per-row summary: any width compares
    indices = {s for s in selectors if isinstance(s, int)}
    expected = 1 if indices == {-1} else max(indices) + 1
    complete = indices == {-1} or indices == set(range(expected))
    if width < expected or (complete and width != expected):
        return f"its rows have {width} element(s), the reference profile's {expected}"
    return None


def _finite(numbers: np.ndarray) -> tuple[np.ndarray, int]:
    """(the finite values, how many were NaN or infinite)."""
    keep = np.isfinite(numbers)
    finite: np.ndarray = numbers[keep]
    return finite, int(numbers.size - finite.size)


def _bin_counts(edges: list[float], values: np.ndarray) -> np.ndarray:
    # side="right": bin i holds edges[i-1] <= x < edges[i], np.histogram's convention.
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right")
    return np.bincount(index, minlength=len(edges) + 1)


def population_stability_index(expected: np.ndarray, actual: np.ndarray) -> float:
    """PSI = sum((a - e) * ln(a / e)) over bins of two count vectors, proportions floored at PSI_FLOOR.

    0 for identical distributions; rule of thumb: < 0.1 stable, 0.1-0.25 moderate, > 0.25 a significant shift.
    """
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.sum() <= 0 or a.sum() <= 0:
        return 0.0
    pe = np.maximum(e / e.sum(), PSI_FLOOR)
    pa = np.maximum(a / a.sum(), PSI_FLOOR)
    return float(np.sum((pa - pe) * np.log(pa / pe)))


def _edges(values: np.ndarray, bins: int) -> list[float]:
    """Interior quantile edges; a value holding a whole bin's mass or more (a point mass: the zero pixels, a
    constant feature) gets a bin of its own, [v, nextafter(v)), so that mass moving off it shows in PSI."""
    quantiles = np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    unique, repeats = np.unique(quantiles, return_counts=True)
    points = unique[(repeats > 1) | (unique.size == 1)]
    return [float(v) for v in np.unique(np.concatenate([unique, np.nextafter(points, np.inf)]))]


def _fill(feature: FeatureProfile, values: np.ndarray, bins: int, rng: np.random.Generator, sample_size: int) -> None:
    if feature.kind == "categorical":
        keys, counts = np.unique(np.asarray(category_keys(values), dtype=object), return_counts=True)
        feature.categories = {str(k): int(c) for k, c in zip(keys.tolist(), counts.tolist(), strict=True)}
        return
    values, feature.nonfinite = _finite(values)
    if values.size == 0:
        feature.edges, feature.counts, feature.sample = [], [0], []
        return
    feature.edges = _edges(values, bins)
    feature.counts = [int(c) for c in _bin_counts(feature.edges, values)]
    keep = values if values.size <= sample_size else rng.choice(values, size=sample_size, replace=False)
    feature.sample = [float(v) for v in keep]


def build_profile(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray] | None = None,
    *,
    bins: int = 10,
    categorical: Collection[str] = (),
    sample_size: int = SAMPLE_SIZE,
    seed: int = 0,
) -> ReferenceProfile:
    """Profile reference rows (the first axis of every array is the batch); outputs add score features.

    ``bins`` quantile bins per numeric feature (fewer when values repeat, e.g. one for a constant feature);
    ``sample_size`` reference values are kept per feature for KS (a seeded random subset when there are more).
    """
    if bins < 2:
        raise ProfileError(f"model '{model}': bins must be at least 2, got {bins}")
    if sample_size < 1:
        raise ProfileError(f"model '{model}': sample_size must be at least 1, got {sample_size}")
    if not inputs and not outputs:
        raise ProfileError(f"model '{model}': no inputs or outputs to profile")
    rng = np.random.default_rng(seed)
    features: list[FeatureProfile] = []
    samples = 0
    for role, tensors in (("input", inputs), ("output", outputs or {})):
        for name, array in tensors.items():
            rows = _rows(array)
            if rows.shape[0] == 0:
                raise ProfileError(f"model '{model}': {role} '{name}' has no rows")
            samples = max(samples, rows.shape[0])
            for feature in _specs(name, rows, role, categorical):
                values = _values(feature, rows)
                assert values is not None  # the spec came from this very array
                _fill(feature, values, bins, rng, sample_size)
                features.append(feature)
    return ReferenceProfile(model=model, samples=samples, bins=bins, features=features)


# ----- comparison --------------------------------------------------------------------------------------------


def _test(feature: FeatureProfile, values: np.ndarray) -> tuple[float, float, float] | None:
    """(psi, statistic, p_value) of a window's values against the reference, None when nothing is comparable."""
    if feature.kind == "categorical":
        current = dict(
            zip(*np.unique(np.asarray(category_keys(values), dtype=object), return_counts=True), strict=True)
        )
        if not current or not feature.categories:
            return None
        keys = sorted(set(feature.categories) | {str(k) for k in current})
        ref = np.array([feature.categories.get(k, 0) for k in keys], dtype=np.float64)
        cur = np.array([int(current.get(k, 0)) for k in keys], dtype=np.float64)
        psi = population_stability_index(ref, cur)
        if len(keys) < 2:
            return psi, 0.0, 1.0
        chi2, p_value, _, _ = stats.chi2_contingency(np.vstack([ref, cur]))
        return psi, float(chi2), float(p_value)
    finite, nonfinite = _finite(values)
    reference = sum(feature.counts)
    if (finite.size == 0 and nonfinite == 0) or (reference == 0 and feature.nonfinite == 0):
        return None
    psi = population_stability_index(
        np.asarray([*feature.counts, feature.nonfinite]), np.append(_bin_counts(feature.edges, finite), nonfinite)
    )
    tests: list[tuple[float, float]] = []  # (statistic, p_value)
    if finite.size and feature.sample:
        result = stats.ks_2samp(np.asarray(feature.sample), finite, method=KS_METHOD)
        tests.append((float(result.statistic), float(result.pvalue)))
    if nonfinite or feature.nonfinite:
        tests.append(_nonfinite_share_test(reference, feature.nonfinite, finite.size, nonfinite))
    tests = [(s, p) for s, p in tests if math.isfinite(s) and math.isfinite(p)]
    if not tests:
        return psi, 0.0, 1.0
    statistic, p_value = min(tests, key=lambda t: t[1])
    return psi, statistic, min(1.0, p_value * len(tests))  # Bonferroni over the feature's own tests


def _nonfinite_share_test(ref_finite: int, ref_nonfinite: int, finite: int, nonfinite: int) -> tuple[float, float]:
    """Chi-square on [finite, non-finite] counts, reference against window: does the NaN/inf share differ?"""
    if ref_finite + finite == 0 or ref_nonfinite + nonfinite == 0:
        return 0.0, 1.0  # every value on both sides finite, or none: the same share
    chi2, p_value, _, _ = stats.chi2_contingency(np.array([[ref_finite, ref_nonfinite], [finite, nonfinite]]))
    return float(chi2), float(p_value)


def compare(
    profile: ReferenceProfile,
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray] | None = None,
    *,
    alpha: float = 0.05,
) -> DriftReport:
    """Compare one window (rows concatenated) with the reference profile.

    Features whose tensor is missing from the window (e.g. input capture is off) are left out, not failed. A
    tensor whose rows no longer have the reference's shape is left out too, and named in ``skipped``.
    """
    if not 0.0 < alpha < 1.0:
        raise ProfileError(f"model '{profile.model}': alpha must be in (0, 1), got {alpha}")
    tensors = {"input": dict(inputs), "output": dict(outputs or {})}
    samples = max((_rows(a).shape[0] for group in tensors.values() for a in group.values()), default=0)
    sources: dict[tuple[str, str], list[FeatureProfile]] = {}
    for feature in profile.features:
        sources.setdefault((feature.role, feature.source), []).append(feature)
    problems: dict[tuple[str, str], str | None] = {}
    tested: list[tuple[FeatureProfile, tuple[float, float, float]]] = []
    for feature in profile.features:
        key = (feature.role, feature.source)
        array = tensors[feature.role].get(feature.source)
        if array is None or samples == 0:
            continue
        if key not in problems:
            problems[key] = _shape_problem(sources[key], _rows(array))
        if problems[key] is not None:
            continue
        values = _values(feature, array)
        result = None if values is None else _test(feature, values)
        if result is not None:
            tested.append((feature, result))
    threshold = alpha / max(len(tested), 1)  # Bonferroni over every feature tested
    drifts = [
        FeatureDrift(f.name, f.kind, psi, statistic, p_value, p_value < threshold)
        for f, (psi, statistic, p_value) in tested
    ]
    input_drifts = [d for (f, _), d in zip(tested, drifts, strict=True) if f.role == "input"]
    output_psi = [d.psi for (f, _), d in zip(tested, drifts, strict=True) if f.role == "output"]
    input_psi = [d.psi for d in input_drifts]
    return DriftReport(
        model=profile.model,
        samples=samples,
        features=drifts,
        psi_max=max(input_psi, default=0.0),
        psi_mean=float(np.mean(input_psi)) if input_psi else 0.0,
        drifted_share=(sum(d.drifted for d in input_drifts) / len(input_drifts)) if input_drifts else 0.0,
        drifted=any(d.drifted for d in drifts),
        score_drift=max(output_psi, default=0.0),
        skipped={source: problem for (_, source), problem in problems.items() if problem is not None},
    )


# ----- storage -----------------------------------------------------------------------------------------------


def _check_name(model: str) -> str:
    # A model name becomes a file name here: never let it climb out of the profiles directory.
    if not _MODEL_NAME.match(model) or model in (".", ".."):
        raise ProfileError(f"model name {model!r} cannot name a profile file (letters, digits, '_', '.', '-' only)")
    return model


def profile_path(data_dir: Path, model: str) -> Path:
    """Where ``tensorgate profile`` writes, and load_profile looks first: <data_dir>/profiles/<model>.json."""
    return Path(data_dir) / "profiles" / f"{_check_name(model)}.json"


def save_profile(profile: ReferenceProfile, path: Path) -> Path:
    """Write the profile atomically (a monitor reading it never sees half a file); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(profile.to_json())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: no hidden half-written file left in the profiles directory
        raise
    return path


def profile_candidates(data_dir: Path | None, model_dir: Path, model: str) -> list[tuple[Path, str]]:
    """The files load_profile reads, first one first, each with how messages name it."""
    candidates = []
    if data_dir is not None:
        candidates.append((profile_path(data_dir, model), f"profiles/{model}.json in the data directory"))
    candidates.append((Path(model_dir) / "reference_profile.json", "reference_profile.json in the model directory"))
    return candidates


def load_profile(data_dir: Path | None, model_dir: Path, model: str) -> ReferenceProfile | None:
    """<data_dir>/profiles/<model>.json first, else <model_dir>/reference_profile.json; None when neither exists.

    A file that cannot be used raises ProfileFileError, naming it relative to its directory (see its docstring)."""
    for path, where in profile_candidates(data_dir, model_dir, model):
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileFileError(model, where, f"cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            return ReferenceProfile.from_json(text)
        except ProfileError as exc:
            raise ProfileFileError(model, where, str(exc)) from None
    return None
