"""The ``tensorgate.*`` config parameters the server reads, in one list, and the load-time check against it.

    check_parameter_keys(config)   # at load, before any session is built; ModelLoadError names key and fix

Why refuse a key nobody reads: every tensorgate parameter has a default, so a misspelt one loads and serves as if
it were not written. For most that is a wrong setting; for ``tensorgate.rollout.*`` it is the untested version
taking all the traffic (no split is made, and a request naming no version goes to the highest). A key that does
not start with ``tensorgate.`` but whose first part is a near miss of it (``tensorgat.rollout.canary_version``) is
refused too; Triton's own parameters (``enable_mem_arena``, ...) and other tools' (``tensorrt.sha256``,
``ort.graph_optimization_level``) pass. The remote backend's ``tensorgate.triton.*`` keys are checked here too, for
any model and with a "did you mean": its own reader, which also refuses an unknown one, lists them all instead.
"""

from __future__ import annotations

import difflib

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.backends.upstream_targets import HEADER_PREFIX, PARAMETER_KEYS, PARAMETER_PREFIX
from tensorgate.server.errors import ModelLoadError
from tensorgate.server.repository.rollout import _KEYS as ROLLOUT_KEYS
from tensorgate.server.repository.rollout import PREFIX as ROLLOUT_PREFIX

__all__ = ["FAMILIES", "KNOWN", "TRITON_KEYS", "check_parameter_keys"]

KNOWN = (
    "tensorgate.capture.inputs",
    "tensorgate.capture.sample_rate",
    "tensorgate.drift.categorical",
    "tensorgate.drift.reference_requests",
    "tensorgate.execution_provider",  # the server writes it into the effective config; an override may carry it
    "tensorgate.graph_optimization_level",
    "tensorgate.intra_op_spinning",
    "tensorgate.monitor.window_requests",
    "tensorgate.monitor.window_s",
    "tensorgate.pad_batches",
    "tensorgate.prediction.kind",
    "tensorgate.prediction.output",
    "tensorgate.prediction.threshold",
    "tensorgate.sha256",
    "tensorgate.task",
)
"""Every tensorgate parameter read by its exact name (server/monitoring, server/backends/onnx.py,
server/repository/manager.py), but for the rollout's: repository/rollout.py keeps those, and checks them."""

TRITON_KEYS = tuple(PARAMETER_PREFIX + key for key in PARAMETER_KEYS)
"""The remote backend's keys (backends/upstream_targets.py keeps them, beside its headers' prefix)."""

FAMILIES = ("tensorgate.alert.", ROLLOUT_PREFIX, PARAMETER_PREFIX + HEADER_PREFIX)
"""Prefixes whose keys their own reader checks, each with its own message: an alert rule and an upstream header
take any name (monitoring/alerts.py, backends/triton.py), the rollout refuses a key it does not know
(repository/rollout.py)."""

_NAMED = ("tensorgate.alert.", PARAMETER_PREFIX + HEADER_PREFIX)
"""The families whose keys end in the user's own name: a near miss of the prefix keeps that name as written."""

VERSIONED = ("tensorgate.sha256",)
"""Keys that may also be written ``<key>:<version>`` for one version."""

NEAR_MISS = 0.85
"""How close (difflib's ratio) the first dotted part of a key outside ``tensorgate.`` must be to "tensorgate" for
the key to be taken for a typo of one of ours: ``tensorgat`` is 0.95, ``tensorrt`` 0.78 and ``tensorflow`` 0.6 (other
tools' keys, ``tensorrt.execution_provider`` among them, pass whatever follows)."""

HINT = 0.8
"""How close a ``tensorgate.*`` key must be to a known one for a "did you mean": they all share the prefix, so
difflib's default (0.6) would offer 'tensorgate.task' for 'tensorgate.zzz'."""

_OURS = "tensorgate"
_READ = (*KNOWN, *ROLLOUT_KEYS, *TRITON_KEYS)
_FAMILY_NAMES = sorted({k.split(".")[1] for k in _READ if k.count(".") >= 2} | {p.split(".")[1] for p in FAMILIES})
"""The second dotted parts that group keys (capture, drift, ..., alert, rollout, triton): a misspelt key is most
likely one of its own family's."""


def _known(key: str) -> bool:
    if key in KNOWN or key in TRITON_KEYS or key.startswith(FAMILIES):
        return True
    base, _, version = key.partition(":")
    return base in VERSIONED and version.isdigit()


def _closest(key: str) -> str | None:
    """The known key (or family prefix, with the rest of `key` after it) that a ``tensorgate.*`` key most likely
    means: one of its own family's first ('tensorgate.drift.reference' is drift's reference_requests, not the
    remote backend's reference), then any."""
    _, _, rest = key.lower().partition(".")
    name, dot, tail = rest.partition(".")
    family = difflib.get_close_matches(name, _FAMILY_NAMES, n=1, cutoff=HINT)
    if family and not dot:  # 'tensorgate.alerts': a family's name without a key
        return f"{_OURS}.{family[0]}.<key>"
    if family:
        prefix = f"{_OURS}.{family[0]}."
        if (prefix + tail).startswith(_NAMED):  # 'tensorgat.alert.acc_low': the rest is the user's name
            return prefix + key.split(".", 2)[2]
        close = difflib.get_close_matches(prefix + tail, [k for k in _READ if k.startswith(prefix)], 1, HINT)
        if close:
            return close[0]
    close = difflib.get_close_matches(key.lower(), _READ, n=1, cutoff=HINT)
    return close[0] if close else None


def check_parameter_keys(config: mc.ModelConfig) -> None:
    """Refuse a ``tensorgate.*`` parameter (in any case) that tensorgate does not read, or a key that is a near
    miss of one it does, with a "did you mean"; ModelLoadError names the model and the key."""
    for key in config.parameters:
        if _known(key):
            continue
        if key.lower().startswith(f"{_OURS}."):
            guess = _closest(key)
        else:
            head, dot, rest = key.partition(".")
            if difflib.SequenceMatcher(None, head.lower(), _OURS).ratio() >= NEAR_MISS:  # 'tensorgat.', ...
                guess = _closest(f"{_OURS}.{rest}") if dot else None
            elif key.lower().startswith(_OURS):  # 'tensorgate_task': refused as the near miss of a key we read only
                guess = _closest(f"{_OURS}.{key[len(_OURS) + 1 :]}")
                if guess is None:
                    continue
            else:
                continue  # another tool's parameter, or the user's own: not tensorgate's to judge
        hint = f": did you mean '{guess}'?" if guess is not None else " (tensorgate reads no parameter of that name)"
        raise ModelLoadError(config.name, None, f"unknown parameter '{key}'{hint}")
