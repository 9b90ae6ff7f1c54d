"""Regenerate the checked-in artefacts of ``tensorgate.protos`` from its ``.proto`` files.

Run ``python -m tensorgate.protos.generate`` after editing any ``.proto`` under ``protos/``, and
``python -m tensorgate.protos.generate --check`` in CI/tests to fail when the checked-in files drifted.

What it writes, and why no ordinary ``_pb2.py`` modules:

- ``inference.binpb``: one serialized ``FileDescriptorSet`` holding every ``protos/**/*.proto`` (and what
  they import), without source info. ``tensorgate.protos._pool`` loads it into a *private* descriptor pool,
  because ``tritonclient.grpc`` already registers the same ``inference.*`` names in protobuf's default pool
  and protoc's ``_pb2.py`` modules would collide with it ("duplicate symbol").
- ``<name>_pb2.pyi``: protoc's type stubs for the hand-written ``<name>_pb2.py`` modules that build their
  classes from that pool, with two automated fixes: protoc writes imports of sibling files as top-level
  modules (``import model_config_pb2 as ...``), rewritten to ``from tensorgate.protos import ...`` so mypy
  resolves them inside this package; and protoc's stubs are not ``--strict`` clean (bare ``Mapping``,
  ``**kwargs`` for fields named after Python keywords such as ``global``), so a ``# mypy:`` header turns
  off exactly those two error codes in the stubs alone.

Everything protoc produces is deterministic, so ``--check`` is a byte comparison.

This module imports nothing from ``tensorgate.protos``: if a bad edit leaves the package unimportable,
``python protos/generate.py`` still regenerates it.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

PACKAGE = "tensorgate.protos"
PROTO_ROOT = Path(__file__).resolve().parent
DESCRIPTOR_SET = "inference.binpb"

# `import a.b.c_pb2 as x` and `from a.b import c_pb2 as x`, as protoc's pyi generator writes them.
_IMPORT_RE = re.compile(r"^import (?P<module>[\w.]+) as (?P<alias>\w+)$", re.MULTILINE)
_FROM_IMPORT_RE = re.compile(r"^from (?P<parent>[\w.]+) import (?P<name>\w+) as (?P<alias>\w+)$", re.MULTILINE)
# protoc's stubs use bare `Mapping` in constructor unions and `**kwargs` for keyword-named fields.
STUB_HEADER = '# mypy: disable-error-code="type-arg, no-untyped-def"\n'


@dataclass(frozen=True)
class Artefact:
    """One generated file: its path relative to ``PROTO_ROOT`` and its exact bytes."""

    path: str
    content: bytes


def find_protos(root: Path = PROTO_ROOT) -> list[str]:
    """Every ``.proto`` under ``root`` (recursively), as sorted POSIX paths relative to it.

    Nothing is skipped: a ``.proto`` that sits in the package is part of the contract, and the sorted
    order keeps the descriptor set byte-stable.
    """
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.proto"))


def pb2_module(proto: str) -> str:
    """The dotted module name protoc gives a proto file: ``a/b/c.proto`` -> ``a.b.c_pb2``."""
    return proto.removesuffix(".proto").replace("/", ".") + "_pb2"


def _well_known_include() -> str:
    """Where grpc_tools keeps ``google/protobuf/*.proto``, so our files may import well-known types."""
    return str(resources.files("grpc_tools") / "_proto")


def rewrite_pyi_imports(text: str, own_modules: set[str], package: str = PACKAGE) -> str:
    """Turn protoc's top-level imports of our own ``_pb2`` modules into imports from ``package``.

    Only modules generated from our own protos are rewritten: ``google.protobuf`` and the like stay as
    they are.
    """

    def absolute(module: str, alias: str) -> str:
        parent, _, name = module.rpartition(".")
        prefix = f"{package}.{parent}" if parent else package
        return f"from {prefix} import {name} as {alias}"

    def on_import(m: re.Match[str]) -> str:
        if m["module"] in own_modules:
            return absolute(m["module"], m["alias"])
        return m[0]

    def on_from_import(m: re.Match[str]) -> str:
        module = f"{m['parent']}.{m['name']}"
        if module in own_modules:
            return absolute(module, m["alias"])
        return m[0]

    text = _IMPORT_RE.sub(on_import, text)
    return _FROM_IMPORT_RE.sub(on_from_import, text)


def generate(root: Path = PROTO_ROOT) -> list[Artefact]:
    """Run protoc over every proto under ``root`` and return what should be checked in, in memory."""
    from grpc_tools import protoc  # dev-only dependency: import it only when generating

    protos = find_protos(root)
    if not protos:
        raise SystemExit(f"no .proto files under {root}")
    own_modules = {pb2_module(p) for p in protos}
    with tempfile.TemporaryDirectory(prefix="tensorgate-protoc-") as tmp:
        out = Path(tmp)
        args = [
            "grpc_tools.protoc",
            f"--proto_path={root}",
            f"--proto_path={_well_known_include()}",
            f"--descriptor_set_out={out / DESCRIPTOR_SET}",
            "--include_imports",
            f"--pyi_out={out}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed (see its messages above)")
        artefacts = [Artefact(DESCRIPTOR_SET, (out / DESCRIPTOR_SET).read_bytes())]
        for proto in protos:
            pyi = proto.removesuffix(".proto") + "_pb2.pyi"
            text = (out / pyi).read_text(encoding="utf-8")
            text = STUB_HEADER + rewrite_pyi_imports(text, own_modules)
            artefacts.append(Artefact(pyi, text.encode("utf-8")))
    return artefacts


def stale_stubs(artefacts: Sequence[Artefact], root: Path = PROTO_ROOT) -> list[str]:
    """Checked-in ``_pb2.pyi`` stubs whose ``.proto`` is gone."""
    wanted = {a.path for a in artefacts}
    present = (p.relative_to(root).as_posix() for p in root.rglob("*_pb2.pyi"))
    return sorted(p for p in present if p not in wanted)


def drift(artefacts: Sequence[Artefact], root: Path = PROTO_ROOT) -> list[str]:
    """Paths (relative to ``root``) whose checked-in content differs from ``artefacts``, or should go."""
    changed = [a.path for a in artefacts if not (root / a.path).is_file() or (root / a.path).read_bytes() != a.content]
    return changed + stale_stubs(artefacts, root)


def write(artefacts: Sequence[Artefact], root: Path = PROTO_ROOT) -> list[str]:
    """Write the artefacts that changed and delete stale stubs; return the paths touched."""
    touched = drift(artefacts, root)
    for path in stale_stubs(artefacts, root):
        (root / path).unlink()
    by_path = {a.path: a for a in artefacts}
    for path in touched:
        if path in by_path:
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(by_path[path].content)
    return touched


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {PACKAGE}.generate",
        description="Regenerate inference.binpb and the _pb2.pyi stubs from protos/**/*.proto.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if regenerating would change any checked-in file",
    )
    args = parser.parse_args(argv)
    artefacts = generate()
    if args.check:
        changed = drift(artefacts)
        for path in changed:
            print(f"out of date: protos/{path}", file=sys.stderr)
        if changed:
            print(f"run: python -m {PACKAGE}.generate", file=sys.stderr)
            return 1
        return 0
    for path in write(artefacts):
        print(f"wrote protos/{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
