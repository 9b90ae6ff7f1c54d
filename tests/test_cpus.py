"""The CPUs the server sizes ONNX Runtime's thread pools by: the affinity, bounded by a container's CPU limit, read
from cgroup files laid out as the kernel lays them out (v2 and v1, at the root as a container sees them and under
the process's own cgroup as a host process sees them)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import onnxruntime as ort
import pytest

from tensorgate.server import cpus
from tensorgate.server.backends import onnx as onnx_backend
from tensorgate.server.backends.onnx import session_options
from tests.onnx_models import identity_model
from tests.test_onnx_backend import _config_with

AFFINITY = len(os.sched_getaffinity(0))


def _tree(tmp_path: Path, files: dict[str, str], proc: str = "") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    root.mkdir(exist_ok=True)
    proc_cgroup = tmp_path / "proc-self-cgroup"
    proc_cgroup.write_text(proc)
    return root, proc_cgroup


@pytest.mark.parametrize(
    ("files", "proc", "limit"),
    [
        pytest.param({"cpu.max": "400000 100000"}, "0::/\n", 4.0, id="v2-container"),
        pytest.param({"cpu.max": "250000 100000"}, "0::/\n", 2.5, id="v2-fraction"),
        pytest.param({"cpu.max": "max 100000"}, "0::/\n", None, id="v2-unlimited"),
        pytest.param(
            {"kubepods/pod1/cpu.max": "100000 100000", "cpu.max": "max 100000"},
            "0::/kubepods/pod1\n",
            1.0,
            id="v2-own-cgroup-before-the-root",
        ),
        pytest.param(
            {"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"},
            "4:cpu,cpuacct:/\n",
            3.0,
            id="v1-container",
        ),
        pytest.param(
            {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"},
            "4:cpu,cpuacct:/docker/abc\n",
            0.5,
            id="v1-own-cgroup",
        ),
        pytest.param(
            {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, "4:cpu:/\n", None, id="v1-unlimited"
        ),
        pytest.param(
            {"init.scope/cpu.max": "max 100000", "cpu.max": "200000 100000"},
            "0::/init.scope\n",
            2.0,
            id="v2-unlimited-own-cgroup-under-a-limited-root",
        ),
        pytest.param(
            {"pod/cpu.max": "150000 100000", "pod/ctr/cpu.max": "300000 100000"},
            "0::/pod/ctr\n",
            1.5,
            id="v2-a-parent-sets-the-lower-limit",
        ),
        pytest.param(
            {
                "cpu/docker/abc/cpu.cfs_quota_us": "-1",
                "cpu/docker/abc/cpu.cfs_period_us": "100000",
                "cpu/cpu.cfs_quota_us": "200000",
                "cpu/cpu.cfs_period_us": "100000",
            },
            "0::/\n4:cpu:/docker/abc\n1:name=systemd:/docker/abc\n",
            2.0,
            id="hybrid-v1-unlimited-own-under-a-limited-root",
        ),
        pytest.param({}, "", None, id="no-cgroup-files"),
        pytest.param({"cpu.max": "garbage"}, "0::/\n", None, id="unreadable"),
    ],
)
def test_the_cgroup_cpu_limit_is_read_as_the_kernel_writes_it(
    tmp_path: Path, files: dict[str, str], proc: str, limit: float | None
) -> None:
    root, proc_cgroup = _tree(tmp_path, files, proc)
    assert cpus.cgroup_cpu_limit(root, proc_cgroup) == limit
    expected = AFFINITY if limit is None else min(AFFINITY, max(1, math.ceil(limit)))
    assert cpus.usable_cpus(root, proc_cgroup) == expected


def test_onnx_runtime_threads_follow_the_usable_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sized from the host's cores, each model's intra-op pool put as many threads as the host has cores on a
    container allowed a few CPUs' time: the default comes from usable_cpus (a 6-CPU limit here, on any host), less
    one for the event loop. A config that names its count still gets it."""
    monkeypatch.setattr(onnx_backend, "usable_cpus", lambda: 6)
    assert session_options(_config_with()).intra_op_num_threads == 5
    assert session_options(_config_with({"intra_op_thread_count": "3"})).intra_op_num_threads == 3
    model = str(identity_model(tmp_path / "m.onnx", "FP32"))
    session = ort.InferenceSession(model, session_options(_config_with()), providers=["CPUExecutionProvider"])
    assert session.get_session_options().intra_op_num_threads == 5
