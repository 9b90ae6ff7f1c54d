"""The README's examples run as written against a real server on the example repository."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.serving import ServerThread

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# The Security section's example needs an mTLS server; tests/test_tls.py runs it against one.
_PLAINTEXT_PART = re.sub(r"\n## Security\n.*?(?=\n## )", "\n", README, flags=re.DOTALL)
SNIPPETS = re.findall(r"```python\n(.*?)```", _PLAINTEXT_PART, re.DOTALL)


@pytest.fixture(scope="module")
def example_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        build_models = __import__("build_models")
    finally:
        sys.path.remove(str(ROOT / "examples"))
    repo = tmp_path_factory.mktemp("readme") / "models"
    build_models.write_repository(repo)
    with ServerThread(repo) as server:
        yield server


def test_readme_has_exactly_two_setup_commands() -> None:
    setup = README.split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)```", setup, re.DOTALL)
    assert len(commands) == 1
    lines = [line.split("#")[0].strip() for line in commands[0].splitlines() if line.strip()]
    assert lines == ["make serve", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_python_snippets_run(example_server: ServerThread, index: int, tmp_path: Path) -> None:
    repo = example_server.settings.model_repository
    code = SNIPPETS[index].replace("127.0.0.1:8001", example_server.address).replace("examples/models", str(repo))
    script = tmp_path / "snippet.py"
    script.write_text(code)
    out = io.StringIO()
    level = logging.getLogger().level  # the LogSettings snippet changes the process's level
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(script), run_name="__main__")
    finally:
        logging.getLogger().setLevel(level)
    printed = out.getvalue().strip()
    assert printed, "the snippet printed nothing"
    if "digits" in code:
        expected = np.load(repo / "digits" / "test_data.npz")["y_test"][:4]
        assert printed == str(expected), "the README's digits example should print the true labels"


def test_readme_ensemble_example_loads_and_answers(tmp_path: Path) -> None:
    """The Ensembles section's config, with its composing models laid out as the section shows them (their
    config.pbtxt giving only max_batch_size), loads and chains add_sub into scale."""
    import tritonclient.grpc as tc

    from tests.onnx_models import add_sub_model, scale_model, write_config

    section = README.split("### Ensembles", 1)[1].split("\n## ", 1)[0]
    config, layout = re.findall(r"```\n(.*?)```", section, re.DOTALL)[:2]
    root = tmp_path / "models"
    add_sub_model(root / "add_sub" / "1" / "model.onnx")
    scale_model(root / "scale" / "1" / "model.onnx", 2.0, width=16)
    for model in ("add_sub", "scale"):
        (given,) = re.findall(rf"^\s*{model}/config\.pbtxt\s+# (.*)$", layout, re.MULTILINE)
        write_config(root, model, given)
    (root / "pipeline" / "1").mkdir(parents=True)
    write_config(root, "pipeline", config)
    a, b = np.arange(48, dtype=np.float32).reshape(3, 16), np.ones((3, 16), np.float32)
    with ServerThread(root) as server:
        client = tc.InferenceServerClient(server.address)
        try:
            inputs = [tc.InferInput("A", [3, 16], "FP32"), tc.InferInput("B", [3, 16], "FP32")]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            np.testing.assert_array_equal(client.infer("pipeline", inputs).as_numpy("SCALED"), 2 * (a + b))
        finally:
            client.close()
