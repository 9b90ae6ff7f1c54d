"""Which upstreams a remote model's url names, and whether `--allowed-upstreams` lets a config override reach
them.

A url is read here the way gRPC reads it (a URI, resolved by gRPC itself), so that a pattern the operator wrote
cannot be passed by a spelling gRPC takes for another host. Patterns are checked when the server starts
(`pattern_problem`, from the settings) and matched when an override arrives (`upstream_allowed`, from the remote
backend): both read a pattern with `_rule`, so that one never accepts what the other reads otherwise.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

_RESOLVER_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p"})
"""Target schemes that gRPC resolves itself: it reads `unix:8001` as a socket named 8001, not as host 'unix'."""
_TARGET = re.compile(r"[a-z0-9.:\[\],-]+", re.ASCII | re.IGNORECASE)
"""The characters an address list may hold. gRPC reads a url as a URI: it decodes `%xx`, drops a `?query` and a
`#fragment`, and asks the DNS server a `dns://server/` authority names, so that `127.0.0.1%3A9000?:8001` reaches
port 9000; none of the characters that spell those is left."""
_LABEL = re.compile(r"[a-z0-9-]{1,63}", re.ASCII | re.IGNORECASE)
"""A DNS label. ASCII only, and matched before any lowering: `re.IGNORECASE` alone, or str.lower(), would take
the Kelvin sign for a `k`."""
_NUMBER = re.compile(r"[0-9]+|0x[0-9a-f]*", re.ASCII | re.IGNORECASE)
"""A last label that makes a name an IPv4 address to the C library (inet_aton): `2130706433`, `0177.0.0.1`,
`127.1` and `0x7f.1` all reach 127.0.0.1."""
_PORT = re.compile(r"[1-9][0-9]{0,4}", re.ASCII)

PARAMETER_PREFIX = "tensorgate.triton."
PARAMETER_KEYS = (
    "url",
    "model_name",
    "model_version",
    "tls",
    "ca_file",
    "cert_file",
    "key_file",
    "server_name",
    "timeout_s",
    "deadline_margin_ms",
    "connections",
    "health_interval_s",
    "max_streams",
    "load_balancing",
    "max_connection_age_s",
)
"""The remote backend's parameters after PARAMETER_PREFIX, besides HEADER_PREFIX + a header's name: here, not in
backends/triton.py, so that the load-time key check (repository/parameters.py) refuses a misspelt one for any model
without importing tritonclient."""
HEADER_PREFIX = "header."


@dataclass(frozen=True, slots=True)
class Address:
    """An upstream a url names, as --allowed-upstreams matches it (`upstream_addresses`)."""

    kind: str
    """One of "dns", "ipv4" and "ipv6"."""
    host: str
    """A DNS name in lower case, or an IP address in its canonical form (IPv6 compressed, without brackets)."""
    port: int


def _address(host: str, port: str) -> Address | None:
    """The address `host` and `port` spell, when they spell one plainly: an IP literal (IPv6 in brackets; an
    IPv4-mapped one is the IPv4 address it reaches) or a DNS name whose last label is not a number, and a port in
    1..65535 with no leading zero; None for anything else."""
    if not _PORT.fullmatch(port) or int(port) > 65535:
        return None
    if host.startswith("[") and host.endswith("]"):
        try:
            v6 = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None
        if v6.ipv4_mapped is not None:
            return Address("ipv4", str(v6.ipv4_mapped), int(port))
        return Address("ipv6", v6.compressed, int(port))
    try:
        return Address("ipv4", str(ipaddress.IPv4Address(host)), int(port))
    except ValueError:
        pass
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels) or _NUMBER.fullmatch(labels[-1]):
        return None
    if host.lower() in _RESOLVER_SCHEMES:
        return None
    return Address("dns", host.lower(), int(port))


def upstream_addresses(url: str) -> list[Address] | None:
    """The addresses a url names, when it is one of `host:port`, `[v6]:port`, `dns:host:port`, `ipv4:a:p,b:p` or
    `ipv6:[a]:p,...` with plain hosts and ports (`_address`); None for any other target (a unix socket, xds, a
    `dns://server/` authority) or spelling (`%`, `?`, `#`, `/`, `@`, spaces), which gRPC may read otherwise."""
    if not _TARGET.fullmatch(url):
        return None
    scheme, _, rest = url.partition(":")
    items = rest.split(",") if scheme in ("ipv4", "ipv6") else [rest] if scheme == "dns" else [url]
    found = []
    for item in items:
        host, _, port = item.rpartition(":")
        address = _address(host, port)
        if address is None:
            return None
        literal = address.kind != "dns" and host.startswith("[") == (scheme == "ipv6")
        if scheme in ("ipv4", "ipv6") and not literal:
            return None  # gRPC's ipv4: and ipv6: take IP literals of their own kind only
        found.append(address)
    return found


def _rule(pattern: str) -> tuple[str, str, str]:
    """An --allowed-upstreams pattern as (kind, host, port), to match Address: a host in brackets is an IPv6 one,
    one of digits, dots and `*` (not a lone `*`) an IPv4 one, any other a DNS name's."""
    host, _, port = pattern.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        if "*" not in host:
            literal = _address(host, "1")
            if literal is not None:  # in the form addresses take: compressed, an IPv4-mapped one as IPv4
                return literal.kind, literal.host, port
        return "ipv6", host[1:-1].lower(), port
    if host != "*" and re.fullmatch(r"[0-9.*]+", host):
        return "ipv4", host, port
    return "dns", host.lower(), port


def _matches(address: Address, rule: tuple[str, str, str]) -> bool:
    """Each `*` stands within one label (an IPv4 byte, an IPv6 group), never across a `.` or `:`; an IP pattern
    matches IP addresses only, a DNS one names only."""
    kind, host, port = rule
    if kind != address.kind or not fnmatchcase(str(address.port), port):
        return False
    separator = ":" if kind == "ipv6" else "."
    labels, wanted = address.host.split(separator), host.split(separator)
    return len(labels) == len(wanted) and all(fnmatchcase(a, b) for a, b in zip(labels, wanted, strict=True))


def upstream_allowed(url: str, patterns: Sequence[str]) -> bool:
    """Whether every address `url` names (`upstream_addresses`) matches one of `patterns` (--allowed-upstreams):
    `host:port` each, with `*` on either side standing within one label (`triton-*.internal:8001`,
    `10.0.0.*:*`, `[fd00::*]:8001`); a url that is not a plain list of addresses matches none."""
    addresses = upstream_addresses(url)
    if not addresses or not patterns:
        return False
    rules = [_rule(pattern) for pattern in patterns]
    return all(any(_matches(address, rule) for rule in rules) for address in addresses)


def pattern_problem(pattern: str) -> str | None:
    """Why an --allowed-upstreams pattern would match nothing, or less than it seems to say (silently, at the
    first override), or None when it is one `_rule` reads as written."""
    host, colon, port = pattern.strip().rpartition(":")
    if not colon or not host or not port:
        return f"allowed_upstreams takes host:port patterns, got {pattern!r}"
    kind, host, port = _rule(pattern)
    if kind == "dns" and host.strip("*.") == "" and "." not in host:
        return (
            f"allowed_upstreams {pattern!r} names no host (a lone * stands for one DNS label): list the hosts an "
            "override may reach, e.g. triton-*.internal:8001"
        )
    if kind == "ipv4" and host.count(".") != 3:
        return (
            f"allowed_upstreams {pattern!r} is an IPv4 pattern: write its four parts (10.*.*.*:8001), as * stands "
            "within one of them"
        )
    return None


__all__ = [
    "HEADER_PREFIX",
    "PARAMETER_KEYS",
    "PARAMETER_PREFIX",
    "Address",
    "pattern_problem",
    "upstream_addresses",
    "upstream_allowed",
]
