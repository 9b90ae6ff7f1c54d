"""The README's command lines and `tensorgate serve` synopsis agree with the CLI's parsers.

Users copy these lines as they are: a renamed or dropped flag, a flag shown under the wrong subcommand, or a default
in the synopsis that the code no longer has would each cost them a failed start or a wrong belief.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from tensorgate.server.cli import build_parser
from tensorgate.server.settings import ServerSettings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
_SUBCOMMANDS = ("serve", "health", "certs", "infer", "bench", "feedback", "profile", "export", "monitor")
_COMMAND = re.compile(rf"(?:^|[\s/])tensorgate ((?:{'|'.join(_SUBCOMMANDS)})\b.*)")


def _fenced_command_lines() -> list[tuple[int, str]]:
    """(line number, command) of every `tensorgate <subcommand>` line in the README's shell fences, continuations
    joined, comments and a trailing `&` or pipe left out. The `serve` synopsis (a fence without a language) is
    checked apart: its brackets are notation, not arguments."""
    found: list[tuple[int, str]] = []
    fence: str | None = None
    pending = ""
    start = 0
    for number, line in enumerate(README.splitlines(), 1):
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence not in ("sh", "bash"):
            continue
        if not pending:
            start = number
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        code = re.split(r"\s#", line, maxsplit=1)[0]
        if match := _COMMAND.search(code):
            command = re.split(r"\s(?:&&|\|\|?|;)\s|\s&$", match.group(1).rstrip())[0]
            found.append((start, command.rstrip(" &")))
    return found


COMMANDS = _fenced_command_lines()


def test_the_readme_shows_command_lines() -> None:
    assert len(COMMANDS) >= 15, COMMANDS  # the scan found the shell fences


@pytest.mark.parametrize(("line", "command"), COMMANDS, ids=[f"line{n}" for n, _ in COMMANDS])
def test_readme_command_line_parses(line: int, command: str) -> None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(shlex.split(command))
    except SystemExit:
        pytest.fail(f"README line {line}: `tensorgate {command}`: {err.getvalue().strip().splitlines()[-1:]}")


def _subparser(name: str) -> argparse.ArgumentParser:
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[name]
    assert isinstance(parser, argparse.ArgumentParser)
    return parser


def _serve_parser() -> argparse.ArgumentParser:
    return _subparser("serve")


def test_flags_named_with_a_subcommand_in_prose_are_its_own() -> None:
    """`tensorgate feedback --file`, `tensorgate infer ... --sequence-id 7`: prose spans may leave values out, so
    only the flags are checked, against the subcommand the span names."""
    spans = [span for span in re.findall(r"`([^`\n]+)`", README) if _COMMAND.search(span)]
    assert len(spans) >= 10, spans
    wrong = []
    for span in spans:
        match = _COMMAND.search(span)
        assert match is not None
        words = match.group(1).split()
        options = {o for a in _subparser(words[0])._actions for o in a.option_strings}
        wrong += [
            f"`{span}`: {flag}" for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", span) if flag not in options
        ]
    assert not wrong, wrong


def _synopsis() -> str:
    section = README.split("\n## Running the server\n", 1)[1]
    text = re.findall(r"```\n(.*?)```", section, re.DOTALL)[0]
    return text.split("\ntensorgate certs", 1)[0]


def test_serve_synopsis_names_every_serve_option_and_no_other() -> None:
    options = {o for a in _serve_parser()._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
    named = set(re.findall(r"--[a-z0-9-]+", _synopsis()))
    assert named - options == set(), "the synopsis names options `tensorgate serve` does not take"
    assert options - named == set(), "the synopsis leaves out options of `tensorgate serve`"


_PLACEHOLDERS = {"DIR", "PEM", "FILE", "HOST", "ADDR", "URL", "NAME"}
"""What the synopsis writes where a flag has no default to show."""


def test_serve_synopsis_defaults_and_choices_are_the_codes() -> None:
    fields = ServerSettings.__dataclass_fields__
    actions = {o: a for a in _serve_parser()._actions for o in a.option_strings}
    wrong = []
    for flag, shown in re.findall(r"(--[a-z0-9-]+) ([^\s\[\]]+)", _synopsis()):
        action = actions[flag]
        if "|" in shown:
            if action.choices is not None and set(shown.split("|")) != set(action.choices):
                wrong.append(f"{flag} {shown}: the choices are {'|'.join(action.choices)}")
            continue
        if shown in _PLACEHOLDERS or shown.endswith(",..."):
            continue
        default = fields[action.dest].default
        if default is None:  # the effective default is described in prose (e.g. --trace-sample-rate)
            continue
        same = float(shown) == float(default) if isinstance(default, int | float) else shown == str(default)
        if not same:
            wrong.append(f"{flag} {shown}: the default is {default!r}")
    assert not wrong, wrong
