"""The Dockerfile's HEALTHCHECK, run as written, against real servers: there is no Docker daemon in the test
environment, so the test reads each image stage's HEALTHCHECK command and ENV from the Dockerfile and runs that
command line unchanged with that environment, plus what a deployment adds with `docker run -e`: the probe's
TLS files (TENSORGATE_HEALTH_TLS_*) and TENSORGATE_SERVER, because the test server listens on a free port, not
on 8001.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.onnx_models import slow_model, write_config
from tests.pki import Pki
from tests.process import ServeProcess
from tests.serving import ServerThread

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"
STAGES = ("cpu", "gpu")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def stage(name: str) -> list[tuple[str, str]]:
    """The instructions of one `FROM ... AS name` stage."""
    found: list[tuple[str, str]] | None = None
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            if found is not None:
                break
            if re.search(rf"\bAS\s+{name}$", rest, re.IGNORECASE):
                found = []
        elif found is not None:
            found.append((keyword, rest))
    assert found is not None, f"no stage {name!r} in {DOCKERFILE}"
    return found


def healthcheck_command(name: str) -> list[str]:
    """The exec-form CMD of the stage's HEALTHCHECK (exec form: no shell, no variable expansion)."""
    (rest,) = [rest for keyword, rest in stage(name) if keyword == "HEALTHCHECK"]
    _, _, command = rest.partition(" CMD ")
    argv = json.loads(command)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), rest
    return argv


def image_env(name: str, base: dict[str, str]) -> dict[str, str]:
    """The stage's ENV applied over `base`, expanding $VAR as Docker does. /opt/venv/bin stays on PATH but holds
    nothing here; the test's own environment's `tensorgate` is found behind it."""
    env = dict(base)
    for keyword, rest in stage(name):
        if keyword != "ENV":
            continue
        before = dict(env)  # one ENV instruction expands its values with the variables set before it

        def expand(m: re.Match[str], before: dict[str, str] = before) -> str:
            return before.get(m.group(1), "")

        for pair in shlex.split(rest):
            key, sep, value = pair.partition("=")
            assert sep, f"ENV {pair!r}: use the KEY=VALUE form"
            env[key] = re.sub(r"\$\{?(\w+)\}?", expand, value)
    return env


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    assert shutil.which(argv[0], path=env["PATH"]) is not None, f"{argv[0]} not on PATH {env['PATH']}"
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def _base_env() -> dict[str, str]:
    # The venv's bin (where `tensorgate` lives here) stands in for the image's /opt/venv/bin.
    return {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": "/nonexistent"}


def test_the_image_probes_the_default_grpc_port() -> None:
    for name in STAGES:
        env = image_env(name, {"PATH": "/usr/bin"})
        assert env["TENSORGATE_SERVER"] == "127.0.0.1:8001"
        assert env["PATH"].split(os.pathsep)[0] == "/opt/venv/bin"
        assert healthcheck_command(name) == ["tensorgate", "health", "--live"]


def test_healthcheck_passes_while_models_load(tmp_path: Path) -> None:
    """The container's check is liveness: a server still loading its models answers NOT_SERVING, which must not
    count as unhealthy (a load longer than the start period would have the container replaced). Readiness, the
    plain `tensorgate health`, still says not ready meanwhile."""
    repo = tmp_path / "models"
    slow_model(repo / "slow" / "1" / "model.onnx")
    write_config(  # a warm-up of minutes: the model is loading for the whole test
        repo,
        "slow",
        'max_batch_size: 64\nmodel_warmup [ { name: "long" batch_size: 64 count: 100000\n'
        '  inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 512 ] random_data: true } } } ]\n',
    )
    with ServeProcess(["--model-repository", str(repo), "--grpc-port", "0"]) as server:
        address = server.address
        for name in STAGES:
            env = image_env(name, _base_env()) | {"TENSORGATE_SERVER": address}
            live = _run(healthcheck_command(name), env)
            assert live.returncode == 0, live.stdout + live.stderr
            assert live.stdout.strip() == f"{address}: NOT_SERVING (live)"
        ready = _run(["tensorgate", "health"], env)
        assert ready.returncode == 1 and ready.stdout.strip() == f"{address}: NOT_SERVING"
        assert "ready:" not in server.output  # all of it happened during the load
        assert server.terminate() == 0


@pytest.mark.parametrize("name", STAGES)
def test_healthcheck_passes_against_an_mtls_server(name: str, repo: Path, pki: Pki) -> None:
    probe_cert, probe_key = pki.client("probe")
    deployment = {
        "TENSORGATE_HEALTH_TLS_CA": str(pki.ca_path),
        "TENSORGATE_HEALTH_TLS_CERT": str(probe_cert),
        "TENSORGATE_HEALTH_TLS_KEY": str(probe_key),
    }
    argv = healthcheck_command(name)
    with ServerThread(repo, **pki.server_settings()) as server:
        env = image_env(name, _base_env()) | {"TENSORGATE_SERVER": server.address}
        healthy = _run(argv, env | deployment)
        assert healthy.returncode == 0, healthy.stderr
        assert healthy.stdout.strip() == f"{server.address}: SERVING"
        # Without the probe's TLS files the same check fails: the variables above are what made it pass.
        plaintext = _run(argv, env)
        assert plaintext.returncode == 1
        assert "UNAVAILABLE" in plaintext.stderr


def test_healthcheck_passes_against_a_plaintext_server(repo: Path) -> None:
    with ServerThread(repo) as server:
        env = image_env("cpu", _base_env()) | {"TENSORGATE_SERVER": server.address}
        healthy = _run(healthcheck_command("cpu"), env)
        assert healthy.returncode == 0, healthy.stderr


def test_healthcheck_under_policy_probes_needs_an_identity_with_health(repo: Path, pki: Pki, tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    probe = "spiffe://tensorgate.local/probe"
    policy.write_text(json.dumps({"rules": [{"identities": [probe], "apis": ["health"]}]}))
    settings = {**pki.server_settings(), "auth_policy": policy, "auth_probes": "policy"}
    with ServerThread(repo, **settings) as server:
        env = image_env("cpu", _base_env()) | {"TENSORGATE_SERVER": server.address}
        env["TENSORGATE_HEALTH_TLS_CA"] = str(pki.ca_path)
        for who, code in (("probe", 0), ("scorer", 1)):
            cert, key = pki.client(who)
            result = _run(
                healthcheck_command("cpu"),
                env | {"TENSORGATE_HEALTH_TLS_CERT": str(cert), "TENSORGATE_HEALTH_TLS_KEY": str(key)},
            )
            assert result.returncode == code, result.stderr
        assert "PERMISSION_DENIED" in result.stderr


def test_the_builder_stage_copies_everything_the_wheel_needs(tmp_path: Path) -> None:
    """The builder builds the wheel from what its COPY lines bring: build one from exactly those paths (without
    docker). A package the pyproject maps from a folder the stage does not copy fails here, as it would in
    `docker build`."""
    if importlib.util.find_spec("setuptools") is None or importlib.util.find_spec("wheel") is None:
        pytest.skip("building without isolation needs setuptools and wheel in this environment")
    builder = DOCKERFILE.read_text().split(" AS builder", 1)[1].split("\nFROM ", 1)[0]
    root = DOCKERFILE.parent
    context = tmp_path / "context"
    for line in builder.splitlines():
        if line.startswith("COPY "):
            *sources, _ = shlex.split(line)[1:]
            for source in sources:
                src = root / source.rstrip("/")
                dst = context / source.rstrip("/")
                if src.is_dir():
                    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(src, dst)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w",
         str(tmp_path / "wheels"), "."],
        cwd=context, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((tmp_path / "wheels").glob("tensorgate-*.whl"))
