"""Authorization: which identity may call which API group on which models.

A policy file (YAML or JSON) lists rules; a call is allowed when one rule matches its identity, its API group and
its model. Identities and model names are exact strings or fnmatch globs (`spiffe://tensorgate.local/team-a/*`,
`fraud-*`); a model entry may pin versions.

An identity pattern matches certificate identities of one kind only (`IdentityPattern`), so that a name of one kind
cannot pass for another (a subject CN spelled `spiffe://tensorgate.local/admin`; a URI SAN that ends like a DNS
glob, since fnmatch's `*` also matches `/`): a pattern with a `:` matches URI SANs, one without matches DNS SANs,
`cn:GLOB` matches subject CNs, and `uri:`/`dns:` say the kind explicitly. `*` alone matches every caller. The
identities of bearer tokens (which this file defines) and `anonymous` have no kind: patterns match them as written.

    rules:
      - identities: ["spiffe://tensorgate.local/admin"]
        apis: [inference, metadata, statistics, repository, health]
        models: ["*"]
      - identities: ["spiffe://tensorgate.local/scorer", "scorer-*.svc.cluster.local"]
        apis: [inference, metadata, health]
        models: ["add_sub", {name: "fraud-*", versions: [2, 3]}]

API groups and their RPCs (`RPC_GROUPS`): inference (ModelInfer, ModelStreamInfer, SystemSharedMemory*, and
tensorgate.v1.Monitoring's SubmitFeedback/-Batch/-Stream), metadata (ServerMetadata, ModelMetadata, ModelConfig),
statistics (ModelStatistics, GetModelQuality, GetModelDrift, ListAlerts, tensorgate.v1.Rollout's GetRollout),
repository (RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload), settings (LogSettings, TraceSetting),
health (ServerLive, ServerReady, ModelReady). The standard grpc.health.v1 and reflection services answer probes
without a check by default; with `--auth-probes policy` they are checked too (server/rpc/probes.py), as
`Health.Check`/`Health.Watch` in the health group and `ServerReflectionInfo` in the metadata group.

Calls that name no model: health and metadata ones (ServerLive, ServerMetadata, ...) need the group only;
RepositoryIndex and ModelStatistics for all models list every model, and settings apply to the whole server, so
they need a rule whose models include `*` without versions. A rule with `versions` matches only requests that name
one of those versions.

With mTLS and no policy file, `DEFAULT_MTLS_POLICY` applies: any verified client may infer and read metadata,
statistics and health; the repository and settings groups are denied. Without mTLS and without a policy nothing
is checked. Without mTLS but with a policy, every caller is `anonymous`.

Bearer tokens, for deployments that terminate TLS elsewhere: the policy may map SHA-256 hashes of tokens to
identities. Then a caller without a verified client certificate must send `authorization: Bearer TOKEN`
metadata; a missing or unknown token answers UNAUTHENTICATED. Only hashes are stored and tokens are never logged.
A verified client certificate (mTLS) takes precedence: tokens are not consulted.

    tokens:
      - sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"   # printf %s TOKEN | sha256sum
        identity: "batch-job"

The file is re-read when its stamp (server/file_stamp.py: size, times, inode) changes, checked at most once a
second from the request path. On the server's event loop the check only starts the stat, read and parse on a
worker thread: calls keep the previous policy until the new one is parsed, and every call after that sees the
new one. A file that no longer parses (or is not UTF-8) is logged once and the previous policy stays in force.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Protocol

import yaml

from tensorgate.server.auth.identity import (
    ANONYMOUS,
    CN,
    CURRENT_IDENTITY,
    CURRENT_TOKEN,
    DNS,
    URI,
    expired_on_resumption,
    identity_key,
    identity_of_auth_context,
)
from tensorgate.server.errors import PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError, model_ref
from tensorgate.server.file_stamp import FileStamp, file_stamp
from tensorgate.server.log_limit import Sparse

log = logging.getLogger(__name__)

_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's loader when PyYAML has it: several times faster than the pure-Python one on a large policy."""

API_GROUPS = ("inference", "metadata", "statistics", "repository", "settings", "health")
RPC_GROUPS: dict[str, str] = {
    "ModelInfer": "inference",
    "ModelStreamInfer": "inference",
    # Regions serve inference calls: whoever may infer may register the memory its requests name.
    "SystemSharedMemoryStatus": "inference",
    "SystemSharedMemoryRegister": "inference",
    "SystemSharedMemoryUnregister": "inference",
    "CudaSharedMemoryStatus": "inference",
    "CudaSharedMemoryUnregister": "inference",
    "ServerMetadata": "metadata",
    "ModelMetadata": "metadata",
    "ModelConfig": "metadata",
    "ModelStatistics": "statistics",
    "RepositoryIndex": "repository",
    "RepositoryModelLoad": "repository",
    "RepositoryModelUnload": "repository",
    # Server-wide switches an operator flips while it runs: changing them is an administrator's call.
    "LogSettings": "settings",
    "TraceSetting": "settings",
    "ServerLive": "health",
    "ServerReady": "health",
    "ModelReady": "health",
    # tensorgate.v1.Monitoring: labelling a model's traffic is a write like inference; quality reads are statistics.
    "SubmitFeedback": "inference",
    "SubmitFeedbackBatch": "inference",
    "SubmitFeedbackStream": "inference",
    "GetModelQuality": "statistics",
    "GetModelDrift": "statistics",
    "ListAlerts": "statistics",
    # tensorgate.v1.Rollout: where a model's split stands is a read, like its statistics.
    "GetRollout": "statistics",
    # The standard probe services, checked only with --auth-probes policy (server/rpc/probes.py).
    "Health.Check": "health",
    "Health.Watch": "health",
    "ServerReflectionInfo": "metadata",
}
_MODEL_LESS_OK = frozenset({"health", "metadata"})
SEQUENCE_OWNER = "sequence owner"
"""The denial of a request into a sequence that another identity started (server/scheduling/sequencer.py): the
sequencer refuses it, and the metrics count it here with the authorizer's own denials."""
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and the rule."""


_KIND_PREFIXES = {"uri:": URI, "dns:": DNS, "cn:": CN}
_KIND_NAMES = {URI: "a URI SAN", DNS: "a DNS SAN", CN: "a subject CN"}


@dataclass(frozen=True, slots=True)
class IdentityPattern:
    """An identity glob and the kind of certificate name it matches (None: `*`, any caller); see the module doc."""

    text: str
    """As written in the policy: what a token's identity, which has no kind, is matched against."""
    kind: str | None
    glob: str

    @classmethod
    def parse(cls, text: str, where: str = "<built-in>") -> IdentityPattern:
        if text == "*":
            return cls(text, None, text)
        for prefix, kind in _KIND_PREFIXES.items():
            if text.startswith(prefix):
                if len(text) == len(prefix):
                    raise PolicyError(f"{where}: '{text}' names no identity after its kind")
                return cls(text, kind, text[len(prefix) :])
        # DNS names never hold a ':', URIs always do (after their scheme).
        return cls(text, URI if ":" in text else DNS, text)

    def matches(self, identity: str) -> bool:
        kind = getattr(identity, "kind", None)
        if kind is None:  # a token's identity or `anonymous`: named by the policy itself, matched as written
            return fnmatchcase(identity, self.text)
        return (self.kind is None or self.kind == kind) and fnmatchcase(identity, self.glob)


@dataclass(frozen=True, slots=True)
class ModelPattern:
    name: str
    versions: frozenset[str] | None = None

    def matches(self, model: str, version: str) -> bool:
        return fnmatchcase(model, self.name) and (self.versions is None or version in self.versions)

    @property
    def covers_all(self) -> bool:
        return self.name == "*" and self.versions is None


@dataclass(frozen=True, slots=True)
class Rule:
    identities: tuple[IdentityPattern, ...]
    apis: frozenset[str]
    models: tuple[ModelPattern, ...] = (ModelPattern("*"),)

    def allows(self, identity: str, group: str, model: str | None, version: str) -> bool:
        if group not in self.apis or not any(p.matches(identity) for p in self.identities):
            return False
        if model is None:
            return group in _MODEL_LESS_OK or any(m.covers_all for m in self.models)
        return any(m.matches(model, version) for m in self.models)


class Policy:
    """An immutable list of rules; `allows` answers from a small cache after the first call of each kind."""

    def __init__(
        self, rules: Iterable[Rule], source: str = "<built-in>", tokens: Mapping[str, str] | None = None
    ) -> None:
        self.rules = tuple(rules)
        self.source = source
        self.tokens: Mapping[str, str] = dict(tokens or {})
        """SHA-256 hex digest of a bearer token -> the identity it stands for."""
        self._cache: dict[tuple[str | None, str, str, str | None, str], bool] = {}

    def kind_hint(self, identity: str) -> str:
        """For a denial's log line: a pattern that names this identity but as a name of another kind (a policy
        written before patterns had kinds: `client-a` for a certificate whose only name is its CN). Empty if
        none does; never sent to the caller."""
        kind = getattr(identity, "kind", None)
        for rule in self.rules:
            for pattern in rule.identities:
                if kind is not None and pattern.kind not in (None, kind) and fnmatchcase(identity, pattern.glob):
                    return (
                        f"; pattern '{pattern.text}' names {_KIND_NAMES[pattern.kind]}, and this identity is "
                        f"{_KIND_NAMES[kind]}: write '{kind}:{pattern.glob}' to name it"
                    )
        return ""

    def version_hint(self, identity: str, group: str, model: str | None, version: str) -> str:
        """For a denial of a call that names no version: the versions this identity may call the model at, when
        its rules name some (`versions: [1]`), since a call without one is allowed only by a rule for every
        version. Empty otherwise. The caller may be told: they are its own rights."""
        if model is None or version:
            return ""
        versions = {
            v
            for rule in self.rules
            if group in rule.apis and any(p.matches(identity) for p in rule.identities)
            for m in rule.models
            if m.versions is not None and fnmatchcase(model, m.name)
            for v in m.versions
        }
        if not versions:
            return ""
        named = ", ".join(sorted(versions, key=lambda v: (len(v), v)))
        return f" without a version: the policy allows version {named} only, so name the version"

    def scope_hint(self, identity: str, group: str, model: str | None) -> str:
        """For a denial of a call that names no model (RepositoryIndex, ModelStatistics of every model, the
        shared-memory, monitoring-wide and settings RPCs) to an identity that has the group on some models: such a
        call needs a rule with `*` among its models, which an operator who granted the group could not tell from
        the bare denial. Empty otherwise. The caller may be told: they are its own rights."""
        if model is not None or group in _MODEL_LESS_OK:
            return ""
        if not any(group in r.apis and any(p.matches(identity) for p in r.identities) for r in self.rules):
            return ""
        return (
            f": it names no model, and the policy allows this identity '{group}' on some models only; a call that "
            "names none needs a rule with '*' (and no versions) among its models"
        )

    def allows(self, identity: str, group: str, model: str | None = None, version: str = "") -> bool:
        key = (*identity_key(identity), group, model, version)  # a CN 'x' is not the DNS SAN 'x'
        hit = self._cache.get(key)
        if hit is None:
            hit = any(rule.allows(identity, group, model, version) for rule in self.rules)
            if len(self._cache) >= 4096:  # callers choose model names: keep the cache bounded
                self._cache.clear()
            self._cache[key] = hit
        return hit


DEFAULT_MTLS_POLICY = Policy(
    [Rule(identities=(IdentityPattern.parse("*"),), apis=frozenset({"inference", "metadata", "statistics", "health"}))],
    source="default mTLS policy (no --auth-policy)",
)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str | int) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str | int) for v in items):
        raise PolicyError(f"{where}: expected a string or a non-empty list of strings, got {value!r}")
    return tuple(str(v) for v in items)


def _model(entry: Any, where: str) -> ModelPattern:
    if isinstance(entry, str):
        return ModelPattern(entry)
    if isinstance(entry, dict) and "name" in entry and set(entry) <= {"name", "versions"}:
        name = _strings(entry["name"], f"{where}.name")
        if len(name) != 1:
            raise PolicyError(f"{where}.name: one name or glob per entry")
        versions = frozenset(_strings(entry["versions"], f"{where}.versions")) if "versions" in entry else None
        return ModelPattern(name[0], versions)
    raise PolicyError(f"{where}: expected a model name/glob or {{name: ..., versions: [...]}}, got {entry!r}")


def parse_policy(data: Any, source: str) -> Policy:
    """Build a Policy from decoded YAML/JSON, refusing anything it does not understand."""
    if not isinstance(data, dict) or not {"rules"} <= set(data) <= {"rules", "tokens"}:
        raise PolicyError(f"{source}: expected a mapping with 'rules' (a list) and optionally 'tokens'")
    if not isinstance(data["rules"], list):
        raise PolicyError(f"{source}: 'rules' must be a list")
    rules = []
    for i, raw in enumerate(data["rules"]):
        where = f"{source}: rules[{i}]"
        if not isinstance(raw, dict):
            raise PolicyError(f"{where}: expected a mapping")
        unknown = set(raw) - {"identities", "apis", "models"}
        if unknown or not {"identities", "apis"} <= set(raw):
            raise PolicyError(f"{where}: needs 'identities' and 'apis', may have 'models'; unknown {sorted(unknown)}")
        apis = _strings(raw["apis"], f"{where}.apis")
        apis = API_GROUPS if apis == ("*",) else apis
        bad = [a for a in apis if a not in API_GROUPS]
        if bad:
            raise PolicyError(f"{where}.apis: unknown group(s) {bad}; groups are {list(API_GROUPS)} or '*'")
        models = raw.get("models", ["*"])
        if not isinstance(models, list) or not models:
            raise PolicyError(f"{where}.models: expected a non-empty list")
        rules.append(
            Rule(
                identities=tuple(
                    IdentityPattern.parse(p, f"{where}.identities")
                    for p in _strings(raw["identities"], f"{where}.identities")
                ),
                apis=frozenset(apis),
                models=tuple(_model(m, f"{where}.models[{j}]") for j, m in enumerate(models)),
            )
        )
    if not rules:
        # Valid, and sometimes meant (a server closed to all while it is set up), but more often a file cut short.
        log.warning("%s has no rules: every call the policy checks is denied", source)
    return Policy(rules, source, _tokens(data.get("tokens", []), source))


def _tokens(raw: Any, source: str) -> dict[str, str]:
    if not isinstance(raw, list):
        raise PolicyError(f"{source}: 'tokens' must be a list of {{sha256: ..., identity: ...}}")
    out: dict[str, str] = {}
    for i, entry in enumerate(raw):
        where = f"{source}: tokens[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"sha256", "identity"}:
            raise PolicyError(f"{where}: expected exactly 'sha256' and 'identity'")
        digest, identity = entry["sha256"], entry["identity"]
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest.lower()):
            raise PolicyError(f"{where}.sha256: expected 64 hex digits (the SHA-256 of the token, not the token)")
        if not isinstance(identity, str) or not identity:
            raise PolicyError(f"{where}.identity: expected a non-empty string")
        if digest.lower() in out:
            raise PolicyError(f"{where}: the same token hash appears twice")
        out[digest.lower()] = identity
    return out


def load_policy(path: Path) -> Policy:
    """Read a policy file: JSON when it ends in .json, YAML otherwise; UTF-8 either way."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(
            f"{path}: not UTF-8 text (byte {raw[exc.start : exc.start + 1]!r} at offset {exc.start})"
        ) from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_YAML_LOADER)
    except (ValueError, yaml.YAMLError) as exc:
        raise PolicyError(f"{path}: {exc}") from exc
    return parse_policy(data, str(path))


class PolicyFile:
    """A policy that follows its file: `current()` re-stats it at most every `interval` seconds.

    Called on an event loop, `current()` hands the stat and the reload to the loop's default executor and answers
    with the policy in force meanwhile: a large policy parses for seconds, and every RPC would wait for it. Called
    without a running loop (tests, tools), it reloads in place."""

    def __init__(self, path: Path, *, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._interval, self._clock = interval, clock
        self._stamp = self._stat()
        self._policy = load_policy(path)  # a bad file at start stops the server
        self._next = clock() + interval
        self._lock = threading.Lock()
        self.reloads = 0

    def _stat(self) -> FileStamp:
        return file_stamp(os.stat(self.path))

    def current(self) -> Policy:
        now = self._clock()
        if now < self._next or not self._lock.acquire(blocking=False):  # the lock: one check at a time
            return self._policy
        self._next = now + self._interval
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._refresh()
        else:
            try:
                loop.run_in_executor(None, self._refresh)
            except RuntimeError:  # the loop's executor has shut down: the server is stopping
                self._lock.release()
        return self._policy

    def _refresh(self) -> None:
        """Reload the file if it changed; releases the lock `current` took, on whichever thread runs this."""
        try:
            stamp = self._stat()
            if stamp != self._stamp:
                self._stamp = stamp  # a broken file is logged once, not at every check until it changes
                policy = load_policy(self.path)
                self._policy = policy
                self.reloads += 1
                log.info("authorization policy reloaded from %s (%d rule(s))", self.path, len(policy.rules))
        except (OSError, PolicyError) as exc:
            log.error("authorization policy %s not reloaded, the previous one stays in force: %s", self.path, exc)
        except Exception:  # noqa: BLE001 - on an executor thread nobody else would hear of it
            log.exception("authorization policy %s not reloaded, the previous one stays in force", self.path)
        finally:
            self._lock.release()


class CallContext(Protocol):
    """What the authorizer reads from a call: grpc's ServicerContext has both."""

    def auth_context(self) -> Mapping[str, Iterable[bytes]]: ...

    def invocation_metadata(self) -> Iterable[tuple[str, str | bytes]] | None: ...


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of `authorization: Bearer TOKEN`; '' for an authorization value of another form; None if absent."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


class Authorizer:
    """The check every RPC makes: who is calling (from the TLS session) and whether the policy allows the call.

    `enabled` is False without mTLS, policy file and in-flight limit; then the RPC boundary skips it entirely.
    `max_in_flight` (0: no limit) caps the calls one identity has running at once; a stream counts as one call
    for as long as it is open. Without mTLS or tokens every caller is `anonymous`, so the cap is server-wide.
    """

    def __init__(
        self,
        policy_path: Path | None = None,
        *,
        mtls: bool = False,
        interval: float = 1.0,
        max_in_flight: int = 0,
    ) -> None:
        if max_in_flight < 0:
            raise ValueError("max_in_flight must be >= 0 (0: no limit)")
        self.mtls = mtls
        self._file = PolicyFile(policy_path, interval=interval) if policy_path is not None else None
        self.max_in_flight = max_in_flight
        self._in_flight: dict[str, int] = {}
        self.enabled = mtls or self._file is not None or max_in_flight > 0
        self.denials: Counter[tuple[str, str]] = Counter()
        """Denied calls per (identity, RPC the policy refused, or another reason: "missing token", SEQUENCE_OWNER,
        ...), for metrics."""
        self._missing_token_log, self._invalid_token_log = Sparse(), Sparse()

    def policy(self) -> Policy | None:
        if self._file is not None:
            return self._file.current()
        return DEFAULT_MTLS_POLICY if self.mtls else None

    def identify(self, context: CallContext) -> str:
        """The caller's identity: its verified certificate's under mTLS, else its bearer token's when the policy
        has tokens, else ANONYMOUS. Raises UnauthenticatedError for a missing or unknown token, and for a certificate
        that expired since the TLS session it resumed began (identity.expired_on_resumption)."""
        if self.mtls:
            auth = context.auth_context()
            caller = identity_of_auth_context(auth)
            expired = expired_on_resumption(auth)
            if expired is not None:
                self.denials[(caller, "expired certificate")] += 1
                log.warning(
                    "refused a call from identity '%s': a resumed TLS session, and its certificate expired on %s UTC",
                    caller,
                    f"{expired:%Y-%m-%d %H:%M:%S}",
                )
                raise UnauthenticatedError(
                    f"the client certificate expired on {expired:%Y-%m-%d %H:%M:%S} UTC; a resumed TLS session does "
                    "not extend it: connect with a valid certificate"
                )
            return caller
        policy = self.policy()
        if policy is None or not policy.tokens:
            return ANONYMOUS
        token = bearer_token(context.invocation_metadata())
        if token is None:
            self.denials[(ANONYMOUS, "missing token")] += 1
            held = self._missing_token_log.due()  # anyone can repeat it: one line a minute
            if held is not None:
                log.warning("refused a call without a bearer token (%s)%s", policy.source, Sparse.since(held))
            raise UnauthenticatedError("this server needs 'authorization: Bearer <token>' metadata")
        digest = hashlib.sha256(token.encode()).hexdigest() if token else ""
        identity = policy.tokens.get(digest) if token else None
        if identity is None:
            self.denials[(ANONYMOUS, "invalid token")] += 1
            held = self._invalid_token_log.due()
            if held is not None:  # never the token
                log.warning("refused a call with an invalid bearer token (%s)%s", policy.source, Sparse.since(held))
            raise UnauthenticatedError("invalid bearer token")
        CURRENT_TOKEN.set(digest)  # in this call's own context, as CURRENT_IDENTITY is
        return identity

    def refuses_token(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        """Whether `identify` would refuse a call with this metadata for its bearer token (missing or unknown), told
        without counting, logging or setting anything: server/rpc/token_gate.py asks before a message is read."""
        if self.mtls:
            return False
        policy = self.policy()
        if policy is None or not policy.tokens:
            return False
        token = bearer_token(metadata)
        return not token or hashlib.sha256(token.encode()).hexdigest() not in policy.tokens

    def admit(self, identity: str) -> bool:
        """Count a call against the identity's in-flight cap; True when the caller must `release` it later."""
        if not self.max_in_flight:
            return False
        running = self._in_flight.get(identity, 0)
        if running >= self.max_in_flight:
            self.denials[(identity, "in-flight limit")] += 1
            raise ResourceExhaustedError(
                f"identity '{identity}' already has {running} call(s) in flight, the most allowed per identity"
            )
        self._in_flight[identity] = running + 1
        return True

    def release(self, identity: str) -> None:
        left = self._in_flight[identity] - 1
        if left:
            self._in_flight[identity] = left
        else:
            del self._in_flight[identity]  # keep the map as small as the set of active callers

    def check(self, rpc: str, model: str | None = None, version: str = "") -> None:
        """Raise PermissionDeniedError unless the policy lets the current identity make this call."""
        policy = self.policy()
        if policy is None:
            return
        identity = CURRENT_IDENTITY.get()
        digest = CURRENT_TOKEN.get()
        if digest is not None and policy.tokens.get(digest) != identity:
            # A stream opened with a token that a reloaded policy revoked (or gave to someone else) stops here.
            self.denials[(identity, "revoked token")] += 1
            log.warning("refused %s on a stream whose bearer token was revoked (%s)", rpc, policy.source)
            raise UnauthenticatedError("the bearer token is no longer valid (the authorization policy changed)")
        if policy.allows(identity, RPC_GROUPS[rpc], model or None, version):
            return
        self.denials[(identity, rpc)] += 1
        log.warning(
            "denied %s%s to identity '%s' (%s%s)",
            rpc,
            f" on {model_ref(model, version)}" if model else "",
            identity,
            policy.source,
            policy.kind_hint(identity),
        )
        group = RPC_GROUPS[rpc]
        hint = policy.version_hint(identity, group, model or None, version) or policy.scope_hint(
            identity, group, model or None
        )
        raise PermissionDeniedError(identity, rpc, model or None, version or None, hint)


__all__ = [
    "API_GROUPS",
    "DEFAULT_MTLS_POLICY",
    "RPC_GROUPS",
    "SEQUENCE_OWNER",
    "Authorizer",
    "CallContext",
    "IdentityPattern",
    "ModelPattern",
    "Policy",
    "PolicyError",
    "PolicyFile",
    "Rule",
    "bearer_token",
    "load_policy",
    "parse_policy",
]
