"""deploy/kubernetes/tensorgate.yaml: there is no cluster here, so the test checks what ties the manifest to the
server (its serve arguments parse, its ports are the server's, its grace outlasts the drain, its user is the
image's) and runs its serve arguments and its probes, as written, against real servers on loopback."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorgate.server.cli import build_parser
from tests.onnx_models import scale_model, slow_model, write_config
from tests.process import ServeProcess
from tests.test_dockerfile import _base_env, _run, stage

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "kubernetes" / "tensorgate.yaml"


def _documents() -> dict[str, list[Any]]:
    by_kind: dict[str, list[Any]] = {}
    for doc in yaml.safe_load_all(MANIFEST.read_text()):
        by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def _pod() -> Any:
    (deployment,) = _documents()["Deployment"]
    return deployment["spec"]["template"]


def _container() -> Any:
    (container,) = _pod()["spec"]["containers"]
    return container


def _serve_args(**replace: str) -> list[str]:
    """The container's arguments, with some flags' values replaced (the test's repository, loopback)."""
    args = list(_container()["args"])
    for flag, value in replace.items():
        args[args.index(flag) + 1] = value
    return args


def test_every_object_selects_the_deployments_pods_and_names_ports_the_container_has() -> None:
    docs = _documents()
    assert sorted(docs) == ["Deployment", "NetworkPolicy", "PodDisruptionBudget", "Service"]
    labels = _pod()["metadata"]["labels"]
    (deployment,) = docs["Deployment"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    for service in docs["Service"]:
        assert service["spec"]["selector"] == labels
        assert all(p["targetPort"] in ports for p in service["spec"]["ports"])
    (metrics,) = [s for s in docs["Service"] if s["metadata"].get("annotations")]
    assert int(metrics["metadata"]["annotations"]["prometheus.io/port"]) == ports["metrics"]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        (doc,) = docs[kind]
        selector = doc["spec"].get("selector") or doc["spec"]["podSelector"]
        assert selector["matchLabels"] == labels
    (policy,) = docs["NetworkPolicy"]
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == set(ports)


def test_the_serve_arguments_parse_and_the_ports_are_the_servers() -> None:
    args = build_parser().parse_args(["serve", *_container()["args"]])
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    assert (args.grpc_port, args.metrics_port) == (ports["grpc"], ports["metrics"])
    assert _container()["readinessProbe"]["grpc"]["port"] == ports["grpc"]
    # The probe's default server is the image's TENSORGATE_SERVER, the gRPC port on loopback.
    env = " ".join(rest for keyword, rest in stage("cpu") if keyword == "ENV")
    assert f"TENSORGATE_SERVER=127.0.0.1:{ports['grpc']}" in env


def test_the_kubelet_waits_for_the_drain_and_the_pod_runs_as_the_images_user() -> None:
    pod = _pod()["spec"]
    args = build_parser().parse_args(["serve", *_container()["args"]])
    pre_stop = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # SIGTERM comes after preStop; the drain takes up to the grace; the exporter and capture store flush after.
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + args.shutdown_grace_s + 5
    (user,) = [rest for keyword, rest in stage("cpu") if keyword == "USER"]
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == user


def _readiness(address: str) -> str:
    probe = _container()["readinessProbe"]
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=probe["grpc"]["service"]), timeout=probe["timeoutSeconds"]
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _liveness(address: str) -> subprocess.CompletedProcess[str]:
    command = _container()["livenessProbe"]["exec"]["command"]
    return _run(command, _base_env() | {"TENSORGATE_SERVER": address})


def test_the_probes_as_written_pass_and_fail_when_they_should(tmp_path: Path) -> None:
    """While the models load: live (no restart of a long load), not ready. Once loaded: both."""
    loading = tmp_path / "loading"
    slow_model(loading / "slow" / "1" / "model.onnx")
    write_config(  # a warm-up of minutes: the model is loading for the whole first half
        loading,
        "slow",
        'max_batch_size: 64\nmodel_warmup [ { name: "long" batch_size: 64 count: 100000\n'
        '  inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 512 ] random_data: true } } } ]\n',
    )
    served = tmp_path / "served"
    scale_model(served / "scale" / "1" / "model.onnx", 2.0)
    for repo, ready in ((loading, "NOT_SERVING"), (served, "SERVING")):
        args = _serve_args(**{"--model-repository": str(repo), "--host": "127.0.0.1"})
        with ServeProcess([*args, "--grpc-port", "0"]) as server:
            if ready == "SERVING":
                server.wait_for_line(r"ready: \d+ model")
            live = _liveness(server.address)
            assert live.returncode == 0, live.stdout + live.stderr
            assert _readiness(server.address) == ready
            assert server.terminate() == 0
        assert re.search(r'^\{"', server.output, re.MULTILINE), "--log-format json"
