"""Watched files replaced at the same size with the old mtime kept (`cp -p`, `rsync -a`, `tar -x`, image layers):
the policy file and the TLS files are re-read. (The model repository's poll: tests/test_poll.py.)"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from tensorgate.server.auth.policy import PolicyFile
from tensorgate.server.auth.tls import LoadedFiles, TlsFiles, TlsReloader
from tests.pki import Pki


def _keep_size_and_mtime(path: Path, size: int, mtime_ns: int) -> None:
    """Pad `path` with newlines (PEM and YAML ignore them) to `size` bytes, and give it `mtime_ns`."""
    data = path.read_bytes()
    assert len(data) <= size
    path.write_bytes(data + b"\n" * (size - len(data)))
    os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.mark.parametrize("in_place", [True, False], ids=["written-in-place", "renamed-over"])
def test_a_policy_replaced_at_the_same_size_and_mtime_is_reread(tmp_path: Path, in_place: bool) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"rules": [{"identities": "alice", "apis": "inference"}]}))
    now = [0.0]
    source = PolicyFile(path, interval=1.0, clock=lambda: now[0])
    assert source.current().allows("alice", "inference", "m")
    before = path.stat()
    staged = tmp_path / "staged.yaml"
    staged.write_text(yaml.safe_dump({"rules": [{"identities": "bobby", "apis": "inference"}]}))
    _keep_size_and_mtime(staged, before.st_size, before.st_mtime_ns)
    if in_place:
        shutil.copyfile(staged, path)
        os.utime(path, ns=(before.st_mtime_ns, before.st_mtime_ns))
    else:
        os.replace(staged, path)
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    now[0] = 2.0
    policy = source.current()
    assert policy.allows("bobby", "inference", "m") and not policy.allows("alice", "inference", "m")


def test_tls_files_replaced_at_the_same_size_and_mtime_are_served(tmp_path: Path) -> None:
    old, new = Pki(tmp_path / "old", ca_name="old CA"), Pki(tmp_path / "new", ca_name="new CA")
    live = tmp_path / "live"
    live.mkdir()
    files = TlsFiles(live / "server.pem", live / "server-key.pem")
    sizes = {}
    for src, dst in ((old.server_cert, files.cert), (old.server_key, files.key)):
        shutil.copyfile(src, dst)
    for (src, dst), other in zip(
        ((new.server_cert, files.cert), (new.server_key, files.key)), (old.server_cert, old.server_key), strict=True
    ):
        sizes[dst] = max(src.stat().st_size, other.stat().st_size)
        _keep_size_and_mtime(dst, sizes[dst], dst.stat().st_mtime_ns)  # the old files, padded alike
    reloader: TlsReloader[LoadedFiles] = TlsReloader(files, lambda loaded: loaded, "gRPC port")
    assert reloader.value.cert.strip() == old.server_cert.read_bytes().strip()
    for src, dst in ((new.server_cert, files.cert), (new.server_key, files.key)):
        before = dst.stat()
        staged = live / (dst.name + ".tmp")
        shutil.copyfile(src, staged)
        _keep_size_and_mtime(staged, sizes[dst], before.st_mtime_ns)
        os.replace(staged, dst)
        assert (dst.stat().st_size, dst.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    served = reloader.poll()
    assert served is not None and served.cert.strip() == new.server_cert.read_bytes().strip()
