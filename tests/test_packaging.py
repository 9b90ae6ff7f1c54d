"""The package layout users install: every subpackage is listed, the wheel carries it, public names are curated."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def _packages_on_disk() -> set[str]:
    found: set[str] = set()
    for import_name, folder in SETUPTOOLS["package-dir"].items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([import_name, *rel.parts]))
    return found


def test_every_subpackage_is_listed_in_pyproject() -> None:
    assert set(SETUPTOOLS["packages"]) == _packages_on_disk()


@pytest.mark.slow
def test_wheel_contains_every_module_and_data_file(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("tensorgate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for import_name, folder in SETUPTOOLS["package-dir"].items():
        prefix = import_name.replace(".", "/")
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in {".py", ".pyi", ".proto", ".binpb"} or path.name == "py.typed":
                assert f"{prefix}/{path.relative_to(ROOT / folder).as_posix()}" in names


def test_server_public_names() -> None:
    import tensorgate.server as server

    assert sorted(server.__all__) == ["ServerSettings", "TensorgateServer", "__version__", "serve"]
    for name in server.__all__:
        assert getattr(server, name) is not None
