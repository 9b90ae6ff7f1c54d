"""The ``tensorgate.*`` config parameters the server reads, in one list, and the load-time check against it.

    check_parameter_keys(config)   # at load, before any session is built; ModelLoadError names key and fix

Why refuse a key nobody reads: every tensorgate parameter has a default, so a misspelt one loads and serves as if
it were not written. For most that is a wrong setting; for ``tensorgate.rollout.*`` it is the untested version
taking all the traffic (no split is made, and a request naming no version goes to the highest). A key that does
not start with ``tensorgate.`` but is a near miss of one (``tensorgat.rollout.canary_version``) is refused too;
Triton's own parameters (``enable_mem_arena``, ...) are far from all of them and pass.
"""

from __future__ import annotations

import difflib

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.errors import ModelLoadError
from tensorgate.server.repository.rollout import _KEYS as ROLLOUT_KEYS
from tensorgate.server.repository.rollout import PREFIX as ROLLOUT_PREFIX

__all__ = ["FAMILIES", "KNOWN", "check_parameter_keys"]

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

FAMILIES = ("tensorgate.alert.", "tensorgate.rollout.", "tensorgate.triton.")
"""Prefixes whose keys their own reader checks, each with its own message: an alert rule takes any name
(monitoring/alerts.py), the rollout and the remote backend refuse a key they do not know (repository/rollout.py,
backends/triton.py)."""

VERSIONED = ("tensorgate.sha256",)
"""Keys that may also be written ``<key>:<version>`` for one version."""

NEAR_MISS = 0.85
"""How close (difflib's ratio) a key outside ``tensorgate.`` must be to a known one to be taken for a typo of it:
``tensorgat.rollout.canary_version`` is 0.98, ``execution_provider`` against ``tensorgate.execution_provider``
0.77."""

HINT = 0.8
"""How close a ``tensorgate.*`` key must be to a known one for a "did you mean": they all share the prefix, so
difflib's default (0.6) would offer 'tensorgate.task' for 'tensorgate.zzz'."""


def _known(key: str) -> bool:
    if key in KNOWN or key.startswith(FAMILIES):
        return True
    base, _, version = key.partition(":")
    return base in VERSIONED and version.isdigit()


def _closest(key: str, cutoff: float) -> str | None:
    """The known key (or family prefix, with the rest of `key` after it) that `key` most likely means."""
    head, _, rest = key.partition(".")
    family, _, tail = rest.partition(".")
    # The rollout's keys are all known: 'tensorgate.rolout.canary_pct' means canary_percent, not canary_pct.
    named = [f"{prefix}{tail}" for prefix in FAMILIES if tail and prefix != ROLLOUT_PREFIX]
    candidates = [*KNOWN, *ROLLOUT_KEYS, *named]
    close = difflib.get_close_matches(key.lower(), candidates, n=1, cutoff=cutoff)
    if close:
        return close[0]
    if tail:  # 'tensorgat.alert.acc_low': the family is what is misspelt, and the rest is the user's own name
        prefix = difflib.get_close_matches(f"{head}.{family}.".lower(), FAMILIES, n=1, cutoff=cutoff)
        return prefix[0] + tail if prefix else None
    return None


def check_parameter_keys(config: mc.ModelConfig) -> None:
    """Refuse a ``tensorgate.*`` parameter (in any case) that tensorgate does not read, or a key that is a near
    miss of one it does, with a "did you mean"; ModelLoadError names the model and the key."""
    for key in config.parameters:
        if _known(key):
            continue
        ours = key.lower().startswith("tensorgate.")
        guess = _closest(key, HINT if ours else NEAR_MISS)
        if not ours and guess is None:
            continue  # a Triton backend's parameter, or the user's own: not tensorgate's to judge
        hint = f": did you mean '{guess}'?" if guess is not None else " (tensorgate reads no parameter of that name)"
        raise ModelLoadError(config.name, None, f"unknown parameter '{key}'{hint}")
