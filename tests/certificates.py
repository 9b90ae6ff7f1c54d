"""A throw-away PKI as flat PEM files for the client tests, made with tensorgate's own certs code."""

from __future__ import annotations

from pathlib import Path

from tensorgate.server.auth import certs

SERVER_NAME = "tensorgate.test"
"""The DNS name in the server certificate; clients connect to 127.0.0.1 and override the name to this."""


def make_pki(out: Path, server_name: str = SERVER_NAME) -> dict[str, Path]:
    """PEM files in `out`: "ca", "server" + "server-key" (for `server_name`), "client" + "client-key", and
    "other-ca", a CA that signed none of them."""
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / f"{name}.pem" for name in ("ca", "server", "server-key", "client", "client-key", "other-ca")}
    ca = certs.make_ca("test CA")
    files["ca"].write_bytes(ca.cert)
    certs.make_server_cert(ca, names=(server_name,)).write(files["server"], files["server-key"])
    certs.make_client_cert(ca, "client").write(files["client"], files["client-key"])
    files["other-ca"].write_bytes(certs.make_ca("other CA").cert)
    return files
