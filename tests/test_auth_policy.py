"""Identity from client certificates, the authorization policy, and its enforcement over real mTLS."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import queue
import re
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from tensorgate.protos import SERVICE_NAME, GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.server import ServerSettings
from tensorgate.server.auth import certs
from tensorgate.server.auth.identity import identity_of_auth_context, identity_of_certificate
from tensorgate.server.auth.policy import DEFAULT_MTLS_POLICY, PolicyError, PolicyFile, load_policy, parse_policy
from tests.onnx_models import add_sub_model, slow_model, write_config
from tests.pki import CHANNEL_OPTIONS, Pki, add_sub_request, identity_request, infer_add_sub, secure_channel
from tests.process import TENSORGATE, ServeProcess
from tests.scraping import scrape
from tests.serving import ServerThread
from tests.test_poll import wait_for

SCORER = certs.spiffe_id("scorer")
ADMIN = certs.spiffe_id("admin")
POLICY = {
    "rules": [
        {"identities": [ADMIN], "apis": ["*"]},
        {
            "identities": ["spiffe://tensorgate.local/score*"],
            "apis": ["inference", "metadata", "health"],
            "models": ["add_sub"],
        },
    ]
}

# ----- identity ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> certs.Issued:
    return certs.make_ca()


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        pytest.param(
            {"common_name": "cn-name", "dns": ("svc.example",), "uris": ("spiffe://org/ns/svc",)},
            "spiffe://org/ns/svc",
            id="uri-san-first",
        ),
        pytest.param({"common_name": "cn-name", "dns": ("svc.example", "b.example")}, "svc.example", id="dns-san-next"),
        pytest.param({"common_name": "cn-name", "ips": ("10.0.0.1",)}, "cn-name", id="cn-last"),
        pytest.param({"common_name": None, "ips": ("10.0.0.1",)}, None, id="nothing"),
    ],
)
def test_identity_order_uri_then_dns_then_cn(ca: certs.Issued, kwargs: dict, expected: str | None) -> None:
    leaf = certs.make_leaf(ca, **kwargs)
    assert identity_of_certificate(leaf.certificate) == expected


def test_identity_of_auth_context_reads_the_verified_pem(ca: certs.Issued) -> None:
    leaf = certs.make_client_cert(ca, "scorer")
    assert identity_of_auth_context({"x509_pem_cert": [leaf.cert]}) == SCORER
    assert identity_of_auth_context({"transport_security_type": [b"ssl"]}) == "anonymous"


# ----- policy --------------------------------------------------------------------------------------------


def test_policy_rules_match_identity_group_model_and_version() -> None:
    policy = parse_policy(
        {
            "rules": [
                {
                    "identities": "team-*",
                    "apis": ["inference"],
                    "models": ["fraud-*", {"name": "digits", "versions": [2]}],
                },
                {"identities": ["ops"], "apis": ["statistics", "repository"]},
            ]
        },
        "test",
    )
    assert policy.allows("team-a", "inference", "fraud-eu", "")
    assert policy.allows("team-a", "inference", "digits", "2")
    assert not policy.allows("team-a", "inference", "digits", "1")
    assert not policy.allows("team-a", "inference", "digits", "")  # pinned versions need an explicit version
    assert not policy.allows("team-a", "metadata", "fraud-eu", "")
    assert not policy.allows("other", "inference", "fraud-eu", "")
    assert not policy.allows("team-a", "inference", None)  # model-less inference needs a rule covering '*'
    assert policy.allows("ops", "statistics", None)
    assert policy.allows("ops", "repository", "anything")


def test_a_policy_without_rules_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """Valid (every call the policy checks is denied), but more often a file cut short: the log says so."""
    with caplog.at_level(logging.WARNING, logger="tensorgate.server.auth.policy"):
        policy = parse_policy({"rules": []}, "empty.yaml")
    assert not policy.allows("anyone", "inference", "m")
    assert "empty.yaml has no rules: every call the policy checks is denied" in caplog.text


def test_default_mtls_policy_allows_data_plane_and_denies_repository() -> None:
    for group in ("inference", "metadata", "statistics", "health"):
        assert DEFAULT_MTLS_POLICY.allows("anyone", group, "m", "")
    assert not DEFAULT_MTLS_POLICY.allows("anyone", "repository", "m", "")
    assert not DEFAULT_MTLS_POLICY.allows("anyone", "repository", None)


@pytest.mark.parametrize(
    "data, message",
    [
        pytest.param([], "a mapping with 'rules'", id="not-a-mapping"),
        pytest.param({"rules": [], "extra": 1}, "a mapping with 'rules'", id="unknown-top-level-key"),
        pytest.param({"rules": [], "tokens": [{"sha256": "secret", "identity": "a"}]}, "64 hex digits", id="raw-token"),
        pytest.param({"rules": [], "tokens": [{"sha256": "0" * 64}]}, "exactly 'sha256' and 'identity'", id="no-id"),
        pytest.param({"rules": [{"identities": ["a"]}]}, "needs 'identities' and 'apis'", id="no-apis"),
        pytest.param({"rules": [{"identities": ["a"], "apis": ["admin"]}]}, "unknown group", id="unknown-group"),
        pytest.param({"rules": [{"identities": [], "apis": ["health"]}]}, "non-empty list", id="no-identities"),
        pytest.param({"rules": [{"identities": "a", "apis": "health", "model": ["x"]}]}, "unknown", id="typo-key"),
        pytest.param(
            {"rules": [{"identities": "a", "apis": "health", "models": [{"versions": [1]}]}]}, "name", id="no-name"
        ),
    ],
)
def test_malformed_policies_are_refused(data: object, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(data, "test")


def test_policy_files_in_yaml_and_json_are_the_same(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(POLICY))
    (tmp_path / "p.json").write_text(json.dumps(POLICY))
    a, b = load_policy(tmp_path / "p.yaml"), load_policy(tmp_path / "p.json")
    assert a.rules == b.rules
    (tmp_path / "bad.json").write_text("{rules: ")
    with pytest.raises(PolicyError, match="bad.json"):
        load_policy(tmp_path / "bad.json")


def test_policy_file_is_reread_on_change_at_most_once_per_interval(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"rules": [{"identities": "a", "apis": "inference"}]}))
    now = [0.0]
    source = PolicyFile(path, interval=1.0, clock=lambda: now[0])
    assert source.current().allows("a", "inference", "m")

    path.write_text(yaml.safe_dump({"rules": [{"identities": "b", "apis": "inference"}]}))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    now[0] = 0.5
    assert source.current().allows("a", "inference", "m")  # not checked again within the interval
    now[0] = 1.5
    assert source.current().allows("b", "inference", "m") and not source.current().allows("a", "inference", "m")

    path.write_text("rules: [ {identities: b")  # broken: the last good policy stays
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 2_000_000))
    now[0] = 3.0
    assert source.current().allows("b", "inference", "m")
    assert source.reloads == 1


@pytest.mark.parametrize(
    "names, pattern, allowed",
    [
        pytest.param({"uris": (ADMIN,)}, ADMIN, True, id="uri-san-by-uri-pattern"),
        pytest.param({"common_name": ADMIN}, ADMIN, False, id="cn-spelled-as-uri-is-not-a-uri"),
        pytest.param({"common_name": ADMIN}, f"cn:{ADMIN}", True, id="cn-by-cn-pattern"),
        pytest.param({"dns": ("a.scoring.svc",)}, "*.scoring.svc", True, id="dns-san-by-dns-glob"),
        pytest.param({"common_name": "a.scoring.svc"}, "*.scoring.svc", False, id="cn-is-not-a-dns-san"),
        pytest.param({"uris": ("spiffe://evil/a.scoring.svc",)}, "*.scoring.svc", False, id="uri-is-not-a-dns-san"),
        pytest.param({"dns": ("scorer",)}, "cn:scorer", False, id="dns-san-is-not-a-cn"),
        pytest.param({"common_name": "scorer"}, "cn:score*", True, id="cn-glob"),
        pytest.param({"uris": ("urn:x:scorer",)}, "dns:urn:x:scorer", False, id="explicit-dns-kind"),
        pytest.param({"uris": ("dns:scorer",)}, "uri:dns:scorer", True, id="explicit-uri-kind"),
        pytest.param({"common_name": "anything"}, "*", True, id="star-is-any-caller"),
    ],
)
def test_identity_patterns_match_only_names_of_their_kind(
    ca: certs.Issued, names: dict, pattern: str, allowed: bool
) -> None:
    """A name of one kind cannot pass for another: a CN spelled as a SPIFFE ID, a URI ending like a DNS glob."""
    identity = identity_of_certificate(certs.make_leaf(ca, **{"common_name": None, **names}).certificate)
    assert identity is not None
    policy = parse_policy({"rules": [{"identities": [pattern], "apis": ["inference"]}]}, "test")
    assert policy.allows(identity, "inference", "m") is allowed


def test_token_identities_are_matched_as_written(ca: certs.Issued) -> None:
    """Identities a policy's tokens stand for have no certificate kind: patterns match their text, and the
    cache keeps a certificate CN 'scorer' apart from the token identity 'scorer'."""
    policy = parse_policy({"rules": [{"identities": ["scorer", "cn:admin"], "apis": ["inference"]}]}, "test")
    assert policy.allows("scorer", "inference", "m")
    cn = identity_of_certificate(certs.make_leaf(ca, common_name="scorer").certificate)
    assert cn == "scorer" and not policy.allows(cn, "inference", "m")  # a DNS-kind pattern; the CN is not one
    # A policy written before patterns had kinds: the denial's log line says how to name the CN.
    assert policy.kind_hint(cn) == (
        "; pattern 'scorer' names a DNS SAN, and this identity is a subject CN: write 'cn:scorer' to name it"
    )
    assert policy.kind_hint("scorer") == ""  # a token's identity has no kind
    assert not policy.allows("admin", "inference", "m")  # 'cn:admin' names a certificate CN, not a token identity
    with pytest.raises(PolicyError, match="names no identity after its kind"):
        parse_policy({"rules": [{"identities": ["cn:"], "apis": ["inference"]}]}, "test")


# ----- enforcement over mTLS -----------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(POLICY))
    return path


@pytest.fixture
def guarded(repo: Path, pki: Pki, policy_file: Path):
    settings = {
        **pki.server_settings(),
        "auth_policy": policy_file,
        "model_control_mode": "explicit",
        "load_model": ["*"],
    }
    with ServerThread(repo, **settings) as s:
        yield s


def _denied(call) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    return info.value.details() or ""


def test_identity_allowed_for_one_model_is_denied_another(
    guarded: ServerThread, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with secure_channel(guarded.address, pki.ca_path, pki.client("scorer")) as channel:
        stub = GRPCInferenceServiceStub(channel)
        np.testing.assert_array_equal(infer_add_sub(channel), np.arange(16, dtype=np.float32) * 2)
        assert stub.ModelMetadata(pb.ModelMetadataRequest(name="add_sub"), timeout=5).name == "add_sub"
        with caplog.at_level(logging.WARNING, logger="tensorgate.server.auth.policy"):
            details = _denied(lambda: stub.ModelInfer(identity_request(), timeout=5))
        assert details == f"identity '{SCORER}' may not call ModelInfer on model 'identity_fp32'"
        denial = [r.getMessage() for r in caplog.records if "denied" in r.getMessage()]
        assert denial == [
            f"denied ModelInfer on model 'identity_fp32' to identity '{SCORER}' ({guarded.settings.auth_policy})"
        ]
        stats = _denied(lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(name="add_sub"), timeout=5))
        assert stats == f"identity '{SCORER}' may not call ModelStatistics on model 'add_sub'"  # group not granted
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live  # health group
        assert stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5).name == "tensorgate"


def test_a_call_naming_no_model_says_it_needs_every_model(guarded: ServerThread, pki: Pki) -> None:
    """The scorer may infer on add_sub, so the shared-memory RPCs (inference, naming no model) were refused with
    the bare words of a group it lacked; the denial now says what the policy needs for them."""
    with secure_channel(guarded.address, pki.ca_path, pki.client("scorer")) as channel:
        stub = GRPCInferenceServiceStub(channel)
        details = _denied(lambda: stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=5))
        # A group it lacks altogether: no hint, as before.
        index = _denied(lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5))
    assert details == (
        f"identity '{SCORER}' may not call SystemSharedMemoryStatus: it names no model, and the policy allows this "
        "identity 'inference' on some models only; a call that names none needs a rule with '*' (and no versions) "
        "among its models"
    )
    assert index == f"identity '{SCORER}' may not call RepositoryIndex"


def test_stream_checks_each_message(guarded: ServerThread, pki: Pki) -> None:
    requests = [add_sub_request(), identity_request(), add_sub_request()]
    for i, r in enumerate(requests):
        r.id = f"r{i}"
    with secure_channel(guarded.address, pki.ca_path, pki.client("scorer")) as channel:
        replies = list(GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests), timeout=10))
    by_id = {r.infer_response.id: r for r in replies}
    assert by_id["r0"].error_message == "" and by_id["r2"].error_message == ""
    assert by_id["r1"].error_message == f"identity '{SCORER}' may not call ModelStreamInfer on model 'identity_fp32'"


@pytest.mark.parametrize(
    "rpc, request_",
    [
        pytest.param("RepositoryIndex", pb.RepositoryIndexRequest(), id="index"),
        pytest.param("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="add_sub"), id="unload"),
        pytest.param("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="add_sub"), id="load"),
    ],
)
def test_repository_rpcs_are_for_admins_only(guarded: ServerThread, pki: Pki, rpc: str, request_) -> None:
    with secure_channel(guarded.address, pki.ca_path, pki.client("scorer")) as channel:
        details = _denied(lambda: getattr(GRPCInferenceServiceStub(channel), rpc)(request_, timeout=10))
    assert details.startswith(f"identity '{SCORER}' may not call {rpc}")
    with secure_channel(guarded.address, pki.ca_path, pki.client("admin")) as channel:
        getattr(GRPCInferenceServiceStub(channel), rpc)(request_, timeout=30)


def test_a_cn_spelled_like_an_admin_spiffe_id_is_not_the_admin(guarded: ServerThread, pki: Pki) -> None:
    """Over real mTLS: a certificate from the same CA whose CN (not URI SAN) reads as the admin's SPIFFE ID gets
    none of the admin's rights; the identity in the denial is that CN."""
    impostor = pki.leaf("impostor", common_name=ADMIN)
    with secure_channel(guarded.address, pki.ca_path, impostor) as channel:
        details = _denied(lambda: GRPCInferenceServiceStub(channel).RepositoryIndex(pb.RepositoryIndexRequest()))
    assert details == f"identity '{ADMIN}' may not call RepositoryIndex"
    with secure_channel(guarded.address, pki.ca_path, pki.client("admin")) as channel:
        GRPCInferenceServiceStub(channel).RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)


def test_default_policy_with_mtls_denies_repository_management(repo: Path, pki: Pki) -> None:
    with ServerThread(repo, **pki.server_settings()) as s:
        with secure_channel(s.address, pki.ca_path, pki.client("anyone")) as channel:
            stub = GRPCInferenceServiceStub(channel)
            np.testing.assert_array_equal(infer_add_sub(channel), np.arange(16, dtype=np.float32) * 2)
            stub.ModelInfer(identity_request(), timeout=5)
            assert len(stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=5).model_stats) == 2
            details = _denied(lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5))
    assert details == f"identity '{certs.spiffe_id('anyone')}' may not call RepositoryIndex"


def test_policy_change_on_disk_applies_without_restart(guarded: ServerThread, pki: Pki, policy_file: Path) -> None:
    with secure_channel(guarded.address, pki.ca_path, pki.client("scorer")) as channel:
        stub = GRPCInferenceServiceStub(channel)
        _denied(lambda: stub.ModelInfer(identity_request(), timeout=5))
        widened = {"rules": [*POLICY["rules"], {"identities": SCORER, "apis": "inference", "models": ["identity_*"]}]}
        policy_file.write_text(yaml.safe_dump(widened))
        allowed = False
        for _ in range(100):  # the file is checked at most once a second: allow up to ~10 s
            try:
                stub.ModelInfer(identity_request(), timeout=5)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
                time.sleep(0.1)
            else:
                allowed = True
                break
        assert allowed
        np.testing.assert_array_equal(infer_add_sub(channel), np.arange(16, dtype=np.float32) * 2)


def test_auth_package_public_names() -> None:
    import tensorgate.server.auth as auth

    public = {
        name
        for name, value in vars(auth).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
    }
    assert sorted(auth.__all__) == sorted(public)


# ----- bearer tokens -------------------------------------------------------------------------------------

TOKEN = "s3cr3t-batch-token"
BATCH_RULE = {"identities": "batch-job", "apis": ["inference", "health"], "models": ["add_sub"]}
TOKEN_POLICY = {
    "rules": [BATCH_RULE],
    "tokens": [{"sha256": hashlib.sha256(TOKEN.encode()).hexdigest(), "identity": "batch-job"}],
}


@pytest.fixture
def token_server(repo: Path, tmp_path: Path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(TOKEN_POLICY))
    with ServerThread(repo, auth_policy=path) as s:
        yield s


@pytest.mark.parametrize(
    "metadata, details, reason",
    [
        pytest.param((), "this server needs 'authorization: Bearer <token>' metadata", "missing_token", id="missing"),
        pytest.param((("authorization", "Bearer wrong"),), "invalid bearer token", "invalid_token", id="unknown-token"),
        pytest.param(
            (("authorization", f"Basic {TOKEN}"),), "invalid bearer token", "invalid_token", id="other-scheme"
        ),
    ],
)
def test_missing_or_invalid_token_is_unauthenticated(
    token_server: ServerThread, metadata: tuple, details: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with grpc.insecure_channel(token_server.address) as channel, caplog.at_level(logging.DEBUG):
        stub = GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(add_sub_request(), metadata=metadata, timeout=5)
        assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, details)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ModelStreamInfer(iter([add_sub_request()]), metadata=metadata, timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "wrong" not in caplog.text and TOKEN not in caplog.text
    access = [r.getMessage() for r in caplog.records if r.name == "tensorgate.access"]
    # Refused before its message was read (rpc/token_gate.py): the line names the RPC and nothing from the message.
    assert any(line.startswith("ModelInfer model=- version=- id=- status=UNAUTHENTICATED") for line in access), access
    # Counted like any other denial (a missing token was neither) and logged: the second within the minute is held
    # back, since anyone can repeat it (log_limit.Sparse), and counted in the next line.
    assert len([r for r in caplog.records if r.levelname == "WARNING" and "bearer token" in r.getMessage()]) == 1
    metrics = scrape(f"http://127.0.0.1:{token_server.app.metrics_port}/metrics")
    labels = frozenset({("identity", "anonymous"), ("reason", reason), ("rpc", "")})
    assert metrics[("tensorgate_auth_denials_total", labels)] == 2


def test_a_call_without_a_version_to_a_version_pinned_rule_says_to_name_it(repo: Path, tmp_path: Path) -> None:
    """`versions: [1]` allows calls that name version 1; one that names none was refused with the words of no rule
    at all, and a user could not tell why."""
    pinned = {**TOKEN_POLICY, "rules": [{**BATCH_RULE, "models": [{"name": "add_sub", "versions": [1]}]}]}
    path = tmp_path / "pinned.json"
    path.write_text(json.dumps(pinned))
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with ServerThread(repo, auth_policy=path) as s, grpc.insecure_channel(s.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        details = _denied(lambda: stub.ModelInfer(add_sub_request(), metadata=metadata, timeout=5))
        assert details == (
            "identity 'batch-job' may not call ModelInfer on model 'add_sub' without a version: the policy allows "
            "version 1 only, so name the version"
        )
        named = add_sub_request()
        named.model_version = "1"
        assert stub.ModelInfer(named, metadata=metadata, timeout=5).model_name == "add_sub"
        # Another model, or a version the rule does not name: no hint, as before.
        assert _denied(lambda: stub.ModelInfer(identity_request(), metadata=metadata, timeout=5)).endswith(
            "on model 'identity_fp32'"
        )


def test_valid_token_maps_to_its_identity(token_server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(token_server.address) as channel, caplog.at_level(logging.DEBUG):
        stub = GRPCInferenceServiceStub(channel)
        reply = stub.ModelInfer(add_sub_request(), metadata=metadata, timeout=5)
        assert reply.model_name == "add_sub"
        details = _denied(lambda: stub.ModelInfer(identity_request(), metadata=metadata, timeout=5))
        assert details == "identity 'batch-job' may not call ModelInfer on model 'identity_fp32'"
    assert TOKEN not in caplog.text


def test_unmodified_tritonclient_sends_a_bearer_token(token_server: ServerThread) -> None:
    client = tc.InferenceServerClient(token_server.address)
    try:
        headers = {"authorization": f"Bearer {TOKEN}"}
        x = np.ones((1, 16), np.float32)
        inputs = [tc.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
        for i in inputs:
            i.set_data_from_numpy(x)
        assert client.infer("add_sub", inputs, headers=headers).as_numpy("OUTPUT0").tolist() == (x * 2).tolist()
        with pytest.raises(InferenceServerException, match="invalid bearer token"):
            client.infer("add_sub", inputs, headers={"authorization": "Bearer nope"})
    finally:
        client.close()


def test_verified_certificate_takes_precedence_over_tokens(repo: Path, pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    policy = {**TOKEN_POLICY, "rules": [BATCH_RULE, {"identities": SCORER, "apis": ["inference"]}]}
    path.write_text(json.dumps(policy))
    with ServerThread(repo, **pki.server_settings(), auth_policy=path) as s:
        with secure_channel(s.address, pki.ca_path, pki.client("scorer")) as channel:
            stub = GRPCInferenceServiceStub(channel)
            stub.ModelInfer(identity_request(), timeout=5)  # scorer may; batch-job may not
            stub.ModelInfer(identity_request(), metadata=(("authorization", "Bearer nope"),), timeout=5)


def test_readme_policy_examples_parse() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Security", 1)[1].split("\n## ", 1)[0]
    rules, tokens = (yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", section, re.DOTALL))
    policy = parse_policy({**rules, **tokens}, "README")
    assert policy.allows("spiffe://tensorgate.local/admin", "repository", None)
    assert policy.allows("a.scoring.svc.cluster.local", "inference", "fraud-eu", "2")
    assert not policy.allows("a.scoring.svc.cluster.local", "inference", "fraud-eu", "1")
    assert policy.tokens == {hashlib.sha256(b"test").hexdigest(): "batch-job"}


# ----- in-flight cap per identity ------------------------------------------------------------------------


class _OpenStream:
    """A ModelStreamInfer kept open (one answered message) until `close()`: one call in flight, no timing."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._requests: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
        self._requests.put(add_sub_request())
        self._replies = GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(self._requests.get, None), timeout=30)
        first = next(self._replies)
        assert first.error_message == "", first.error_message

    def close(self) -> None:
        self._requests.put(None)
        assert list(self._replies) == []


def test_in_flight_cap_applies_per_identity(repo: Path, pki: Pki) -> None:
    with ServerThread(repo, **pki.server_settings(), max_in_flight_per_identity=1) as s:
        a, b = pki.client("scorer"), pki.client("other")
        with secure_channel(s.address, pki.ca_path, a) as ch_a, secure_channel(s.address, pki.ca_path, b) as ch_b:
            stream = _OpenStream(ch_a)
            with pytest.raises(grpc.RpcError) as info:
                infer_add_sub(ch_a, timeout=5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert info.value.details() == (
                f"identity '{SCORER}' already has 1 call(s) in flight, the most allowed per identity"
            )
            infer_add_sub(ch_b)  # another identity is not affected
            stream.close()
            infer_add_sub(ch_a)  # the slot came back when the stream ended
            infer_add_sub(ch_a)


def test_in_flight_cap_without_identities_is_server_wide(repo: Path) -> None:
    with ServerThread(repo, max_in_flight_per_identity=1) as s, grpc.insecure_channel(s.address) as channel:
        stream = _OpenStream(channel)
        with pytest.raises(grpc.RpcError) as info:
            infer_add_sub(channel, timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "identity 'anonymous'" in (info.value.details() or "")
        stream.close()
        infer_add_sub(channel)


def _slow_request(request_id: str) -> pb.ModelInferRequest:
    x = np.full((16, 512), 0.01, np.float32)  # 0.1 s or more a call: the burst is read before one is answered
    return pb.ModelInferRequest(
        model_name="slow",
        id=request_id,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[x.tobytes()],
    )


def test_a_streams_messages_in_flight_count_against_the_cap(tmp_path: Path) -> None:
    """A stream counted as one call whatever it ran: under a cap of 1, one stream ran 200 requests at once and
    filled the model's queue ahead of every other identity (review 131). The stream covers one message in flight;
    each more is a call of the cap, and one past it is refused in the stream."""
    repo = tmp_path / "models"
    slow_model(repo / "slow" / "1" / "model.onnx", repeats=480)
    write_config(repo, "slow", "max_batch_size: 16\n")
    with ServerThread(repo, max_in_flight_per_identity=2) as s, grpc.insecure_channel(s.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        replies = list(stub.ModelStreamInfer(iter([_slow_request(f"m{i}") for i in range(6)]), timeout=120))
        errors = [r.error_message for r in replies]
        assert errors[:2] == ["", ""], errors  # the stream's own call, and one more
        assert errors[2:] == ["identity 'anonymous' already has 2 call(s) in flight, the most allowed per identity"] * 4
        assert [r.infer_response.id for r in replies] == [f"m{i}" for i in range(6)]
        assert s.app.auth._in_flight == {}  # all given back with the stream
        metrics = scrape(f"http://127.0.0.1:{s.app.metrics_port}/metrics")
        labels = frozenset({("identity", "anonymous"), ("reason", "in_flight_limit"), ("rpc", "")})
        assert metrics[("tensorgate_auth_denials_total", labels)] == 4
        # One message at a time is the stream's own call alone: never refused, even under a cap of 1.
        s.app.auth.max_in_flight = 1
        sent: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
        stream = stub.ModelStreamInfer(iter(sent.get, None), timeout=120)
        for i in range(3):
            sent.put(_slow_request(f"one-{i}"))
            assert next(stream).error_message == ""
        sent.put(None)
        assert list(stream) == []


def test_negative_in_flight_cap_is_refused(repo: Path) -> None:
    with pytest.raises(ValueError, match="max_in_flight_per_identity"):
        ServerSettings(model_repository=repo, max_in_flight_per_identity=-1)
    with pytest.raises(ValueError, match="max_streams_per_connection"):
        ServerSettings(model_repository=repo, max_streams_per_connection=0)


def test_streams_per_connection_are_capped_and_extra_calls_wait(repo: Path) -> None:
    with ServerThread(repo, max_streams_per_connection=1) as s:
        with grpc.insecure_channel(s.address, options=CHANNEL_OPTIONS) as busy:
            stream = _OpenStream(busy)
            with pytest.raises(grpc.RpcError) as info:
                infer_add_sub(busy, timeout=1.0)  # queued by the client behind the open stream until its deadline
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            with grpc.insecure_channel(s.address, options=CHANNEL_OPTIONS) as other:
                infer_add_sub(other)  # the limit is per connection
            stream.close()
            infer_add_sub(busy)


# ----- health and reflection under --auth-probes ---------------------------------------------------------

OUTSIDER = certs.spiffe_id("outsider")  # a verified client that no rule of POLICY names


def _health(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _services(channel: grpc.Channel) -> list[str]:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]), timeout=5)
    return [s.name for s in reply.list_services_response.service]


def _health_cli(server: ServerThread, pki: Pki, client: str, env: dict[str, str] | None = None):
    cert, key = pki.client(client)
    args = ["--tls-ca", str(pki.ca_path), "--tls-cert", str(cert), "--tls-key", str(key)] if env is None else []
    return subprocess.run(
        [TENSORGATE, "health", "--server", server.address, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


@pytest.fixture(params=["open", "policy"])
def probed(request: pytest.FixtureRequest, repo: Path, pki: Pki, policy_file: Path):
    probes = {} if request.param == "open" else {"auth_probes": request.param}  # open is the default
    with ServerThread(repo, **pki.server_settings(), auth_policy=policy_file, **probes) as s:
        yield s


def test_probes_follow_the_policy_only_when_asked(probed: ServerThread, pki: Pki) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    with secure_channel(probed.address, pki.ca_path, pki.client("outsider")) as channel:
        if probed.settings.auth_probes == "open":
            assert _health(channel) == serving
            assert SERVICE_NAME in _services(channel)
        else:
            assert _denied(lambda: _health(channel)) == f"identity '{OUTSIDER}' may not call Health.Check"
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
            assert _denied(lambda: next(watch)) == f"identity '{OUTSIDER}' may not call Health.Watch"
            assert _denied(lambda: _services(channel)) == f"identity '{OUTSIDER}' may not call ServerReflectionInfo"
        # The inference service's own rules are the same in both modes.
        details = _denied(lambda: GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5))
        assert details == f"identity '{OUTSIDER}' may not call ServerLive"
    with secure_channel(probed.address, pki.ca_path, pki.client("scorer")) as channel:  # health and metadata
        assert _health(channel) == serving
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
        assert next(watch).status == serving
        watch.cancel()
        assert SERVICE_NAME in _services(channel)
    if probed.settings.auth_probes == "policy":
        assert probed.app.auth is not None
        assert probed.app.auth.denials[(OUTSIDER, "Health.Check")] == 1


@pytest.fixture
def probes_under_policy(repo: Path, pki: Pki, policy_file: Path):
    with ServerThread(repo, **pki.server_settings(), auth_policy=policy_file, auth_probes="policy") as s:
        yield s


def _revoke_scorer(policy_file: Path) -> None:
    policy_file.write_text(yaml.safe_dump({"rules": [POLICY["rules"][0]]}))  # the admin's rule only


def test_an_open_health_watch_ends_when_a_reload_revokes_its_caller(
    probes_under_policy: ServerThread, pki: Pki, policy_file: Path
) -> None:
    """No health change comes: the stream still ends PERMISSION_DENIED once the new policy is in force."""
    with secure_channel(probes_under_policy.address, pki.ca_path, pki.client("scorer")) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        _revoke_scorer(policy_file)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            next(watch)
        assert (info.value.code(), info.value.details()) == (
            grpc.StatusCode.PERMISSION_DENIED,
            f"identity '{SCORER}' may not call Health.Watch",
        )
        assert time.monotonic() - started < 30  # the file is noticed within about a second, checked every second


def test_an_open_reflection_stream_is_checked_per_message(
    probes_under_policy: ServerThread, pki: Pki, policy_file: Path
) -> None:
    requests: queue.Queue[reflection_pb2.ServerReflectionRequest | None] = queue.Queue()
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    with secure_channel(probes_under_policy.address, pki.ca_path, pki.client("scorer")) as channel:
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter(requests.get, None), timeout=60
        )
        requests.put(ask)
        assert SERVICE_NAME in [s.name for s in next(replies).list_services_response.service]
        _revoke_scorer(policy_file)
        with pytest.raises(grpc.RpcError) as info:
            for _ in range(200):  # the new policy is in force within a second or two: one request every 0.1 s
                requests.put(ask)
                next(replies)
                time.sleep(0.1)
        requests.put(None)
    assert (info.value.code(), info.value.details()) == (
        grpc.StatusCode.PERMISSION_DENIED,
        f"identity '{SCORER}' may not call ServerReflectionInfo",
    )


def test_health_command_against_open_and_policy_probes(probed: ServerThread, pki: Pki) -> None:
    scorer = _health_cli(probed, pki, "scorer")
    assert (scorer.returncode, scorer.stdout.strip()) == (0, f"{probed.address}: SERVING"), scorer.stderr
    outsider = _health_cli(probed, pki, "outsider")
    if probed.settings.auth_probes == "open":
        assert outsider.returncode == 0, outsider.stderr
    else:
        assert outsider.returncode == 1
        assert f"PERMISSION_DENIED: identity '{OUTSIDER}' may not call Health.Check" in outsider.stderr
    # The same probe with its TLS files from the environment, as a container HEALTHCHECK runs it.
    cert, key = pki.client("scorer")
    env = {"TENSORGATE_HEALTH_TLS_CA": str(pki.ca_path)}
    env |= {"TENSORGATE_HEALTH_TLS_CERT": str(cert), "TENSORGATE_HEALTH_TLS_KEY": str(key)}
    from_env = _health_cli(probed, pki, "scorer", env)
    assert from_env.returncode == 0, from_env.stderr


def test_probes_under_policy_need_a_bearer_token(repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(TOKEN_POLICY))
    with ServerThread(repo, auth_policy=path, auth_probes="policy") as s, grpc.insecure_channel(s.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _health(channel)
        assert (info.value.code(), info.value.details()) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "this server needs 'authorization: Bearer <token>' metadata",
        )
        stub = health_pb2_grpc.HealthStub(channel)
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        reply = stub.Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # batch-job has the health group but not metadata: reflection stays closed to it.
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([request]), metadata=metadata, timeout=5
        )
        assert _denied(lambda: list(replies)) == "identity 'batch-job' may not call ServerReflectionInfo"


def test_auth_probes_setting_is_checked(repo: Path) -> None:
    with pytest.raises(ValueError, match="auth_probes must be one of"):
        ServerSettings(model_repository=repo, auth_probes="closed")


def test_auth_probes_comes_from_the_environment(repo: Path, pki: Pki, policy_file: Path) -> None:
    env = {
        "TENSORGATE_MODEL_REPOSITORY": str(repo),
        "TENSORGATE_GRPC_PORT": "0",
        "TENSORGATE_TLS_CERT": str(pki.server_cert),
        "TENSORGATE_TLS_KEY": str(pki.server_key),
        "TENSORGATE_TLS_CLIENT_CA": str(pki.ca_path),
        "TENSORGATE_AUTH_POLICY": str(policy_file),
        "TENSORGATE_AUTH_PROBES": "policy",
    }
    with ServeProcess([], env=env) as server:
        server.wait_for_line(r"ready: \d+ model version")
        with secure_channel(server.address, pki.ca_path, pki.client("outsider")) as channel:
            assert _denied(lambda: _health(channel)) == f"identity '{OUTSIDER}' may not call Health.Check"
        with secure_channel(server.address, pki.ca_path, pki.client("scorer")) as channel:
            assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        assert server.terminate() == 0


def test_a_revoked_token_stops_working_on_a_stream_opened_with_it(repo: Path, tmp_path: Path) -> None:
    """The identity of a stream is read when it opens; each later message checks that its bearer token still
    names that identity, so revoking the token (a policy reload) shuts it out of open streams too."""
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(TOKEN_POLICY))
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with ServerThread(repo, auth_policy=path) as s, grpc.insecure_channel(s.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        requests: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
        requests.put(add_sub_request())
        replies = stub.ModelStreamInfer(iter(requests.get, None), metadata=metadata, timeout=60)
        assert next(replies).error_message == ""

        rotated = [{"sha256": hashlib.sha256(b"the-next-token").hexdigest(), "identity": "batch-job"}]
        path.write_text(json.dumps({"rules": [BATCH_RULE], "tokens": rotated}))
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # bounded: the policy file is re-read about once a second
            try:
                stub.ModelInfer(add_sub_request(), metadata=metadata, timeout=5)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the policy without the token never took effect")

        requests.put(add_sub_request())
        assert "bearer token is no longer valid" in next(replies).error_message
        requests.put(None)
        assert list(replies) == []
        assert s.app.auth.denials[("batch-job", "revoked token")] == 1
        metrics = scrape(f"http://127.0.0.1:{s.app.metrics_port}/metrics")
        revoked = frozenset({("identity", "batch-job"), ("reason", "revoked_token"), ("rpc", "")})
        assert metrics[("tensorgate_auth_denials_total", revoked)] == 1


# ----- our client and CLIs with a bearer token -----------------------------------------------------------


def test_our_clients_send_their_headers_on_every_call(repo: Path, tmp_path: Path) -> None:
    """Unary, health (probes under the policy), and the asyncio client's stream, all with the token; without it
    the same calls are refused."""
    import asyncio

    from tensorgate.client import AsyncInferenceClient, InferenceClient, Unauthenticated

    path = tmp_path / "policy.json"
    path.write_text(json.dumps(TOKEN_POLICY))
    x = np.ones((1, 16), np.float32)
    inputs = {"INPUT0": x, "INPUT1": x}
    headers = {"Authorization": f"Bearer {TOKEN}"}  # any case: gRPC metadata keys go lowercase
    with ServerThread(repo, auth_policy=path, auth_probes="policy") as s:
        with InferenceClient(s.address, timeout=5, headers=headers) as client:
            assert client.infer("add_sub", inputs)["OUTPUT0"].tolist() == (x * 2).tolist()
            assert client.health() == "SERVING"
        with InferenceClient(s.address, timeout=5) as client, pytest.raises(Unauthenticated):
            client.health()

        async def stream(with_headers: bool) -> list:
            async with AsyncInferenceClient(s.address, timeout=5, headers=headers if with_headers else None) as aio:
                return [item async for item in aio.stream_infer([("add_sub", inputs)] * 3)]

        results = asyncio.run(stream(True))
        assert [r["OUTPUT0"].tolist() for r in results] == [(x * 2).tolist()] * 3
        # The server refuses the stream while the client is still writing; grpc.aio alone would report INTERNAL
        # for about one such stream in five (grpc/grpc#36066), so the refusal is repeated.
        for _ in range(20):
            with pytest.raises(Unauthenticated, match="needs 'authorization: Bearer <token>'"):
                asyncio.run(stream(False))


@pytest.mark.parametrize(
    "headers, message",
    [
        pytest.param({"x bad": "v"}, "header 'x bad': not a gRPC metadata key", id="space-in-key"),
        pytest.param({"grpc-timeout": "1S"}, "header 'grpc-timeout': not a gRPC metadata key", id="reserved"),
        pytest.param({"trace-bin": "v"}, "header 'trace-bin': not a gRPC metadata key", id="binary"),
        pytest.param({"authorization": "Bearer a\nb"}, "header 'authorization': the value must be", id="newline"),
        pytest.param({"authorization": "Bearer é"}, "header 'authorization': the value must be", id="non-ascii"),
    ],
)
def test_bad_client_headers_are_refused_when_the_client_is_made(headers: dict, message: str) -> None:
    from tensorgate.client import InferenceClient

    with pytest.raises(ValueError, match=re.escape(message)) as info:
        InferenceClient("127.0.0.1:1", headers=headers)
    assert "Bearer" not in str(info.value)  # a token is never echoed in the error


@pytest.fixture
def client_token_server(repo: Path, tmp_path: Path):
    """The token's identity may also read metadata and statistics, as `tensorgate infer` and `bench` do."""
    rule = {**BATCH_RULE, "apis": ["inference", "metadata", "statistics", "health"]}
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({**TOKEN_POLICY, "rules": [rule]}))
    with ServerThread(repo, auth_policy=path) as s:
        yield s


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "TENSORGATE_TOKEN"}
    return subprocess.run(
        [TENSORGATE, *args], capture_output=True, text=True, env={**environ, **(env or {})}, timeout=120
    )


def test_cli_commands_take_the_token_from_a_file_or_the_environment(
    client_token_server: ServerThread, tmp_path: Path
) -> None:
    token_server = client_token_server
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")  # as `echo $TOKEN > file` writes it
    infer = ["infer", "add_sub", "--server", token_server.address, "--input", f"INPUT0={[[1.0] * 16]}"]
    infer += ["--input", f"INPUT1={[[2.0] * 16]}"]
    from_file = _cli(*infer, "--token-file", str(token_file))
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(from_file.stdout)["outputs"]["OUTPUT0"]["data"] == [[3.0] * 16]
    from_env = _cli(*infer, env={"TENSORGATE_TOKEN": TOKEN})
    assert from_env.returncode == 0, from_env.stderr
    refused = _cli(*infer)
    assert refused.returncode == 1
    assert "UNAUTHENTICATED: this server needs 'authorization: Bearer <token>' metadata" in refused.stderr
    health = _cli("health", "--server", token_server.address, "--token-file", str(token_file))
    assert health.returncode == 0, health.stderr  # probes are open by default: the token does no harm
    empty = tmp_path / "empty"
    empty.write_text("\n")
    bad = _cli(*infer, "--token-file", str(empty))
    assert (bad.returncode, bad.stderr.strip()) == (2, f"tensorgate infer: --token-file {empty}: the file is empty")
    missing = _cli(*infer, "--token-file", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert f"--token-file {tmp_path / 'nope'}: No such file or directory" in missing.stderr


def test_bench_sends_the_token_and_reports_only_its_name(client_token_server: ServerThread, tmp_path: Path) -> None:
    token_server = client_token_server
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    out = tmp_path / "bench"
    common = ["bench", "add_sub", "--server", token_server.address, "--concurrency", "2", "--duration", "1"]
    common += ["--warmup", "0", "--max-requests", "50", "--out", str(out)]
    run = _cli(*common, "--token-file", str(token_file), "--no-plots")
    assert run.returncode == 0, run.stderr
    report = (out / "results.json").read_text()
    data = json.loads(report)
    assert data["config"]["headers"] == ["authorization"]
    assert TOKEN not in report
    (level,) = data["levels"]
    assert level["failed"] == {} and level["succeeded"] > 0
    assert level["server"]["requests"] == level["sent"]  # the token reached ModelStatistics too


def test_an_ensemble_loaded_by_a_caller_loads_only_step_models_it_may_load(repo: Path, tmp_path: Path) -> None:
    """Loading an ensemble loads its step models (as Triton does); a caller allowed the repository API on some
    models only must not reach other models that way (it could upload an ensemble naming any of them)."""
    policy = {
        "rules": [{"identities": "deployer", "apis": ["repository", "inference", "metadata"], "models": ["dep-*"]}],
        "tokens": [{"sha256": hashlib.sha256(TOKEN.encode()).hexdigest(), "identity": "deployer"}],
    }
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    config = {
        "platform": "ensemble",
        "max_batch_size": 8,
        "input": [{"name": n, "data_type": "TYPE_FP32", "dims": [16]} for n in ("INPUT0", "INPUT1")],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [16]}],
        "ensemble_scheduling": {
            "step": [
                {
                    "model_name": "add_sub",
                    "model_version": -1,
                    "input_map": {"INPUT0": "INPUT0", "INPUT1": "INPUT1"},
                    "output_map": {"OUTPUT0": "OUTPUT0"},
                }
            ]
        },
    }
    with ServerThread(repo, auth_policy=tmp_path / "policy.json", model_control_mode="explicit") as s:
        c = tc.InferenceServerClient(s.address)
        headers = {"authorization": f"Bearer {TOKEN}"}
        try:
            with pytest.raises(InferenceServerException) as info:
                c.load_model("dep-ens", config=json.dumps(config), files={"file:1/.keep": b""}, headers=headers)
            assert info.value.status() == "StatusCode.PERMISSION_DENIED"
            assert info.value.message() == (
                "in ensemble 'dep-ens', identity 'deployer' may not call ModelInfer on model 'add_sub'"
            )
            assert not any(row.name == "add_sub" and row.state == "READY" for row in s.app.repository.states())
            assert s.app.auth.denials[("deployer", "ModelInfer")] == 1

            # Loaded by someone else, add_sub is still out of the deployer's reach through an ensemble it uploads
            # (its steps used to be checked only when the load would load them).
            s.run(s.app.repository.load("add_sub"))
            with pytest.raises(InferenceServerException) as info:
                c.load_model("dep-ens", config=json.dumps(config), files={"file:1/.keep": b""}, headers=headers)
            assert info.value.status() == "StatusCode.PERMISSION_DENIED"
            assert "may not call ModelInfer on model 'add_sub'" in info.value.message()
            assert s.app.auth.denials[("deployer", "ModelInfer")] == 2
            assert [row.state for row in s.app.repository.states() if row.name == "dep-ens"] == ["UNAVAILABLE"]
        finally:
            c.close()


def test_unload_dependents_unloads_only_models_the_caller_may_unload(repo: Path, tmp_path: Path) -> None:
    """The deployer may load dep-* and infer add_sub, not unload it. An ensemble it uploads on add_sub (loaded by
    an ensemble since unloaded) must not take add_sub down with unload_dependents: the call is refused whole,
    before anything is unloaded; without the parameter it unloads the ensemble alone."""
    from google.protobuf import json_format, text_format

    from tensorgate.protos import model_config_pb2 as mc

    rules = [
        {"identities": "deployer", "apis": ["repository", "inference", "metadata"], "models": ["dep-*"]},
        {"identities": "deployer", "apis": ["inference", "metadata"], "models": ["add_sub"]},
    ]
    tokens = [{"sha256": hashlib.sha256(TOKEN.encode()).hexdigest(), "identity": "deployer"}]
    (tmp_path / "policy.json").write_text(json.dumps({"rules": rules, "tokens": tokens}))
    step = {"model_name": "add_sub", "input_map": {"INPUT0": "INPUT0", "INPUT1": "INPUT1"}}
    config = {
        "platform": "ensemble",
        "max_batch_size": 8,
        "input": [{"name": n, "data_type": "TYPE_FP32", "dims": [16]} for n in ("INPUT0", "INPUT1")],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [16]}],
        "ensemble_scheduling": {"step": [{**step, "model_version": -1, "output_map": {"OUTPUT0": "OUTPUT0"}}]},
    }
    headers = {"authorization": f"Bearer {TOKEN}"}

    def ready(s: ServerThread) -> set[str]:
        return {row.name for row in s.app.repository.states() if row.state == "READY"}

    with ServerThread(repo, auth_policy=tmp_path / "policy.json", model_control_mode="explicit") as s:
        c = tc.InferenceServerClient(s.address)
        try:
            text = text_format.MessageToString(json_format.Parse(json.dumps(config), mc.ModelConfig()))
            s.run(s.app.repository.load("ops-ens", text, {"1/.keep": b""}))  # brings add_sub in
            s.run(s.app.repository.unload("ops-ens"))
            c.load_model("dep-ens", config=json.dumps(config), files={"file:1/.keep": b""}, headers=headers)
            assert {"dep-ens", "add_sub"} <= ready(s)
            with pytest.raises(InferenceServerException) as info:
                c.unload_model("dep-ens", unload_dependents=True, headers=headers)
            assert info.value.status() == "StatusCode.PERMISSION_DENIED"
            assert info.value.message() == (
                "unloading ensemble 'dep-ens' with its dependents, identity 'deployer' may not call "
                "RepositoryModelUnload on model 'add_sub'"
            )
            assert {"dep-ens", "add_sub"} <= ready(s)  # nothing unloaded, the ensemble included
            c.unload_model("dep-ens", headers=headers)  # without dependents: its own, as before
            assert "add_sub" in ready(s) and "dep-ens" not in ready(s)
        finally:
            c.close()


def test_an_ensemble_refused_a_step_is_not_loaded_later_behind_the_callers_back(repo: Path, tmp_path: Path) -> None:
    """The deployer may load dep-* only: its load of dep-ens (steps dep-a, then add_sub) is refused. When dep-a
    loads again, the ensemble is tried again on behalf of whoever loaded dep-a: for the deployer it stays refused
    (it used to load, add_sub with it, with no check), for an admin it loads, add_sub included."""
    add_sub_model(repo / "dep-a" / "1" / "model.onnx")
    ensemble = """
        platform: "ensemble"
        max_batch_size: 4
        input [ { name: "X" data_type: TYPE_FP32 dims: [ 16 ] }, { name: "Y" data_type: TYPE_FP32 dims: [ 16 ] } ]
        output [ { name: "Z" data_type: TYPE_FP32 dims: [ 16 ] } ]
        ensemble_scheduling { step [
          { model_name: "dep-a" model_version: -1
            input_map { key: "INPUT0" value: "X" } input_map { key: "INPUT1" value: "Y" }
            output_map { key: "OUTPUT0" value: "sum" } },
          { model_name: "add_sub" model_version: -1
            input_map { key: "INPUT0" value: "sum" } input_map { key: "INPUT1" value: "Y" }
            output_map { key: "OUTPUT0" value: "Z" } } ] }
    """
    write_config(repo, "dep-ens", ensemble)
    (repo / "dep-ens" / "1").mkdir()
    admin_token = "admin-" + TOKEN
    policy = {
        "rules": [
            {"identities": "deployer", "apis": ["repository", "inference", "metadata"], "models": ["dep-*"]},
            {"identities": "admin", "apis": ["repository", "inference", "metadata"], "models": ["*"]},
        ],
        "tokens": [
            {"sha256": hashlib.sha256(TOKEN.encode()).hexdigest(), "identity": "deployer"},
            {"sha256": hashlib.sha256(admin_token.encode()).hexdigest(), "identity": "admin"},
        ],
    }
    (tmp_path / "policy.json").write_text(json.dumps(policy))

    def state(name: str) -> str:
        return next((row.state for row in s.app.repository.states() if row.name == name), "")

    with ServerThread(repo, auth_policy=tmp_path / "policy.json", model_control_mode="explicit") as s:
        c = tc.InferenceServerClient(s.address)
        deployer, admin = {"authorization": f"Bearer {TOKEN}"}, {"authorization": f"Bearer {admin_token}"}
        denials = s.app.auth.denials
        try:
            with pytest.raises(InferenceServerException, match="may not call ModelInfer on model 'add_sub'"):
                c.load_model("dep-ens", headers=deployer)
            assert denials[("deployer", "ModelInfer")] == 1 and state("dep-a") == "READY"
            c.load_model("dep-a", headers=deployer)
            # The ensemble is tried again for the deployer, and refused again: a second denial, nothing loaded.
            wait_for("the ensemble's retry", lambda: denials[("deployer", "ModelInfer")] == 2)
            assert state("add_sub") == "" and state("dep-ens") == "UNAVAILABLE"
            c.load_model("dep-a", headers=admin)
            wait_for("the ensemble to load for the admin", lambda: state("dep-ens") == "READY")
            assert state("add_sub") == "READY" and denials[("deployer", "ModelInfer")] == 2
        finally:
            c.close()


# ----- reloading the policy file off the event loop ------------------------------------------------------


def test_a_policy_file_that_is_not_utf8_is_a_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("rules:\n  - identities: ['caf\xe9']\n    apis: ['*']\n".encode("latin-1"))
    with pytest.raises(PolicyError, match=r"latin1.yaml: not UTF-8 text \(byte b'\\xe9' at offset 28\)"):
        load_policy(path)


def test_serve_exits_1_with_one_line_when_the_policy_is_not_utf8(repo: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_bytes("rules:\n  - identities: ['caf\xe9']\n    apis: ['*']\n".encode("latin-1"))
    args = ["--model-repository", str(repo), "--grpc-port", "0", "--metrics-port", "-1", "--auth-policy", str(policy)]
    with ServeProcess(args) as server:
        assert server.proc.wait(60) == 1
        server.wait_for_line(r"policy.yaml: not UTF-8 text")
        assert "Traceback" not in "\n".join(server.lines)


def test_a_reload_to_a_file_that_is_not_utf8_keeps_the_policy_and_fails_no_call(
    repo: Path, pki: Pki, policy_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        ServerThread(repo, **pki.server_settings(), auth_policy=policy_file) as s,
        secure_channel(s.address, pki.ca_path, pki.client("scorer")) as channel,
        caplog.at_level(logging.ERROR, logger="tensorgate.server.auth.policy"),
    ):
        policy_file.write_bytes(policy_file.read_bytes() + "# caf\xe9\n".encode("latin-1"))
        for _ in range(25):  # across more than one check of the file (once a second)
            infer_add_sub(channel, timeout=5)  # any error (INTERNAL before the fix) raises
            time.sleep(0.1)
        wait_for("the refused reload's log line", lambda: bool(caplog.records), timeout=10)
        infer_add_sub(channel, timeout=5)
        assert s.app.auth._file is not None and s.app.auth._file.reloads == 0
    (line,) = [r.getMessage() for r in caplog.records]
    assert "not reloaded, the previous one stays in force" in line and "not UTF-8 text" in line


def _unblock_readers(fifo: Path, content: bytes) -> None:
    """Answer whoever waits to read the pipe (nobody: ENXIO), so that no thread stays blocked on it."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    try:
        os.write(fd, content)
    finally:
        os.close(fd)


def test_a_policy_reload_holds_up_no_call_and_applies_once_parsed(
    repo: Path, pki: Pki, policy_file: Path, tmp_path: Path
) -> None:
    """The policy file becomes a pipe whose content comes only when the test writes it: a reload stuck reading it
    stands for one that takes long (a large file, a slow disk). Calls meanwhile are answered under the previous
    policy; once the new one is read, new calls get it."""
    narrowed = yaml.safe_dump({"rules": [{"identities": "spiffe://tensorgate.local/score*", "apis": "health"}]})
    pipe, keep = tmp_path / "pipe", tmp_path / "policy-pipe"
    os.mkfifo(pipe)
    os.link(pipe, keep)  # to reach the pipe once the policy path no longer names it
    with (
        ServerThread(repo, **pki.server_settings(), auth_policy=policy_file) as s,
        secure_channel(s.address, pki.ca_path, pki.client("scorer")) as channel,
    ):
        try:
            os.replace(pipe, policy_file)
            for _ in range(25):  # across more than one check of the file: a reload starts and waits on the pipe
                np.testing.assert_array_equal(infer_add_sub(channel, timeout=5), np.arange(16, dtype=np.float32) * 2)
                time.sleep(0.1)
            assert s.app.auth._file is not None and s.app.auth._file.reloads == 0
            regular = tmp_path / "narrowed.yaml"
            regular.write_text(narrowed)
            os.replace(regular, policy_file)  # later checks read a plain file again
            _unblock_readers(keep, narrowed.encode())
            wait_for("the new policy", lambda: s.app.auth._file is not None and s.app.auth._file.reloads >= 1)
            _denied(lambda: infer_add_sub(channel, timeout=5))
        finally:
            for _ in range(3):
                _unblock_readers(keep, narrowed.encode())
                time.sleep(0.1)


# ----- files a config override may name ------------------------------------------------------------------


def _remote_override(upstream: str, **files: str) -> str:
    parameters = {"tensorgate.triton.url": upstream, "tensorgate.triton.model_name": "add_sub"}
    parameters |= {f"tensorgate.triton.{key}": path for key, path in files.items()}
    return json.dumps(
        {"backend": "tensorgate_triton", "parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    )


def test_a_config_override_may_name_upstream_tls_files_inside_the_model_directory_only(
    repo: Path, pki: Pki, tmp_path: Path
) -> None:
    """A caller allowed to load dep-* models is not the repository's owner: its override cannot point the
    upstream's ca/cert/key file at a file elsewhere on the server (an absolute path, or '..' out of the upload),
    which the server would read; the files it uploads with the load are fine."""
    secret = tmp_path / "secret.pem"
    secret.write_text("not for callers\n")
    policy = {
        "rules": [{"identities": "deployer", "apis": ["repository", "inference"], "models": ["dep-*"]}],
        "tokens": [{"sha256": hashlib.sha256(TOKEN.encode()).hexdigest(), "identity": "deployer"}],
    }
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    (tmp_path / "front").mkdir()
    headers = {"authorization": f"Bearer {TOKEN}"}
    with (
        ServerThread(repo, **pki.server_settings(mutual=False)) as upstream,
        ServerThread(
            tmp_path / "front",
            auth_policy=tmp_path / "policy.json",
            model_control_mode="explicit",
            allowed_upstreams=[upstream.address],  # dep-remote is on no disk: the override names its upstream
        ) as s,
    ):
        c = tc.InferenceServerClient(s.address)
        try:
            for key, path in [("ca_file", str(secret)), ("cert_file", "../../secret.pem"), ("key_file", "a/../../b")]:
                override = _remote_override(upstream.address, **{key: path})
                with pytest.raises(InferenceServerException) as info:
                    c.load_model("dep-remote", config=override, files={"file:ca.pem": b""}, headers=headers)
                assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
                assert info.value.message() == (
                    f"model 'dep-remote': parameter 'tensorgate.triton.{key}' of a config override must be a path "
                    f"inside the model directory (relative, without '..'), got '{path}'; name other files in the "
                    "repository's config.pbtxt"
                )
            assert [row.name for row in s.app.repository.states()] == []  # nothing was loaded, nor tried
            override = _remote_override(upstream.address, ca_file="certs/ca.pem")
            c.load_model("dep-remote", config=override, files={"file:certs/ca.pem": pki.ca.cert}, headers=headers)
            with grpc.insecure_channel(s.address) as channel:  # through the upstream, over TLS with the uploaded CA
                reply = GRPCInferenceServiceStub(channel).ModelInfer(
                    add_sub_request("dep-remote"), metadata=tuple(headers.items()), timeout=30
                )
            assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [2.0 * i for i in range(16)]
        finally:
            c.close()
