"""The package layout users install: every subpackage is listed, the wheel carries it, public names are curated."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


def test_the_setuptools_floor_reads_the_license_expression() -> None:
    """`license = "Apache-2.0"` is a PEP 639 SPDX expression, which setuptools reads from 77 on: 69 to 76 stop
    at it ("`project.license` must be valid exactly by one definition"). A build without isolation (the wheel
    test above, tests/test_dockerfile.py) uses the environment's setuptools, so the dev extra has the same floor
    as [build-system]."""
    assert isinstance(PYPROJECT["project"]["license"], str)
    requirements = [*PYPROJECT["build-system"]["requires"], *PYPROJECT["project"]["optional-dependencies"]["dev"]]
    floors = [r.specifier for r in map(Requirement, requirements) if r.name == "setuptools"]
    assert len(floors) == 2
    for specifier in floors:
        assert not specifier.contains("76.1.0") and specifier.contains("77.0.0"), specifier


def _third_party_imports(script: Path) -> set[str]:
    tree = ast.parse(script.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    return {name.split(".")[0] for name in names} - set(sys.stdlib_module_names) - {"tensorgate", "__future__"}


def test_the_dev_extra_installs_what_the_examples_import() -> None:
    """The README sends users of examples/ to `make examples` or `pip install -e '.[cpu,dev]'`: those bring every
    distribution the scripts import."""
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    provided = {
        canonicalize_name(Requirement(r).name) for r in [*project["dependencies"], *extras["cpu"], *extras["dev"]]
    }
    distributions = importlib.metadata.packages_distributions()
    scripts = sorted((ROOT / "examples").glob("*.py"))
    assert scripts
    for script in scripts:
        for module in _third_party_imports(script):
            assert {canonicalize_name(d) for d in distributions[module]} & provided, (script.name, module)


def test_the_readme_says_how_to_install_what_the_examples_need() -> None:
    """onnx, scikit-learn and skl2onnx come with the dev extra only: where the README introduces the examples, and
    next to every command that runs one of their scripts, it says `make examples` or `pip install -e '.[cpu,dev]'`."""
    readme = (ROOT / "README.md").read_text()
    calling = readme.split("## Calling it", 1)[1].split("\n## ", 1)[0]
    assert "make examples" in calling and "pip install -e '.[cpu,dev]'" in calling
    blocks = list(re.finditer(r"```sh\n(.*?)```", readme, re.DOTALL))
    running = [b for b in blocks if re.search(r"python examples/\w+\.py", b[1])]
    assert running
    for block in running:
        paragraph = readme[: block.start()].rstrip().rsplit("\n\n", 1)[-1]
        near = paragraph + block[1]
        assert "make examples" in near and "pip install -e '.[cpu,dev]'" in near, block[1]


FAKE_PYTHON = """#!/bin/sh
# Stands for $(PYTHON): `-m venv DIR` makes a DIR/bin/python whose every run (the pip install) exits $PIP_STATUS.
[ "$1 $2" = "-m venv" ] || exit 2
mkdir -p "$3/bin"
printf '#!/bin/sh\\nexit %s\\n' "$PIP_STATUS" > "$3/bin/python"
chmod +x "$3/bin/python"
"""


@pytest.mark.parametrize("pip_status", [pytest.param(0, id="installed"), pytest.param(1, id="install-failed")])
def test_the_pytriton_stamp_is_written_only_when_its_install_worked(tmp_path: Path, pip_status: int) -> None:
    """PyTriton is optional: where it cannot be installed (offline, no wheel for the platform) `make test` goes on
    and its tests skip. The stamp must then stay unwritten, or no later `make test` would try again."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    done = subprocess.run(
        ["make", "--silent", ".venv-triton/.installed-stamp", f"PYTHON={python}"],
        cwd=tmp_path,
        env={**os.environ, "PIP_STATUS": str(pip_status)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / ".venv-triton" / ".installed-stamp").exists() == (pip_status == 0)
    assert ("the remote Triton tests will skip" in done.stdout) == (pip_status != 0)
