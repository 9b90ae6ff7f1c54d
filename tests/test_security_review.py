"""Findings of a security review that fit no other file: what a start refusal prints, and what the README tells an
operator who writes a policy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tensorgate.server.auth.policy import RPC_GROUPS
from tensorgate.server.telemetry.tracing import parse_headers
from tests.process import ServeProcess

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.parametrize("given", ["Authorization: Bearer sk-live-4f2a9c", "=sk-live-4f2a9c"])
def test_a_malformed_otlp_header_stops_the_start_without_showing_it(repo: Path, given: str) -> None:
    """OTLP headers carry a collector's API key: a pair written `key: value` was echoed into the log that the
    refusal lands in, and one with no key got past the check and ended the start with a traceback holding it."""
    args = ["--model-repository", str(repo), "--grpc-port", "0", "--otlp-endpoint", "http://127.0.0.1:9"]
    with ServeProcess([*args, "--otlp-headers", f"x-team=ml,{given}"]) as proc:
        assert proc.proc.wait(60) == 2
        proc.wait_for_line(r"--otlp-headers must be key=value pairs separated by commas; pair 2 of 2 is not")
    assert "sk-live-4f2a9c" not in proc.output
    assert "Traceback" not in proc.output


@pytest.mark.parametrize("given", ["a=b,sk-live-4f2a9c", "a=b, =sk-live-4f2a9c"])
def test_otlp_header_parsing_never_shows_a_value(given: str) -> None:
    """The settings check refuses these first; the parser behind it (also reached by an embedding application's
    TracingSettings) must not print them either."""
    with pytest.raises(ValueError) as info:
        parse_headers(given)
    assert "sk-live-4f2a9c" not in str(info.value)
    assert "OTLP header 2 of 2 is not key=value" in str(info.value)


def test_readme_security_table_names_every_rpc_the_policy_checks() -> None:
    """An operator writes the policy from the README's table of API groups: an RPC missing there (the shared-memory
    and monitoring ones were) cannot be granted or withheld knowingly."""
    security = README.read_text().split("\n## Security\n", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+) \|$", security, re.MULTILINE))
    for rpc, group in RPC_GROUPS.items():
        assert re.search(rf"\b{re.escape(rpc.removeprefix('Health.'))}\b", rows.get(group, "")), (rpc, group)
