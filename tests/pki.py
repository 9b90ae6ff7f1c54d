"""Certificates made per test with tensorgate's own certs code, and clients that present them."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tensorgate.protos import GRPCInferenceServiceStub
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.server.auth import certs

# Every test channel gets its own connection: grpc would otherwise share one between channels with equal
# credentials, and a test about handshakes must make its own.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


class Pki:
    """A CA with a server certificate in `directory`; `client(name)` writes NAME.pem + NAME-key.pem."""

    def __init__(self, directory: Path, ca_name: str = "test CA") -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = certs.make_ca(ca_name)
        self.ca_path = directory / "ca.pem"
        self.ca_path.write_bytes(self.ca.cert)
        self.server = certs.make_server_cert(self.ca)
        self.server_cert, self.server_key = directory / "server.pem", directory / "server-key.pem"
        self.server.write(self.server_cert, self.server_key)

    def client(self, name: str, *, expired: bool = False) -> tuple[Path, Path]:
        start = dt.datetime.now(dt.UTC) - dt.timedelta(days=10) if expired else None
        issued = certs.make_client_cert(self.ca, name, days=1 if expired else 30, not_before=start)
        cert, key = self.dir / f"{name}.pem", self.dir / f"{name}-key.pem"
        issued.write(cert, key)
        return cert, key

    def leaf(self, file_name: str, **names: Any) -> tuple[Path, Path]:
        """A client certificate with exactly the names given (`certs.make_leaf`: common_name, dns, uris)."""
        issued = certs.make_leaf(self.ca, days=30, **{"common_name": None, **names})
        cert, key = self.dir / f"{file_name}.pem", self.dir / f"{file_name}-key.pem"
        issued.write(cert, key)
        return cert, key

    def server_settings(self, *, mutual: bool = True) -> dict[str, Path]:
        out = {"tls_cert": self.server_cert, "tls_key": self.server_key}
        if mutual:
            out["tls_client_ca"] = self.ca_path
        return out


def secure_channel(address: str, root: Path, client: tuple[Path, Path] | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=root.read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None,
    )
    return grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)


def add_sub_request(model: str = "add_sub", rows: int = 1) -> pb.ModelInferRequest:
    x = np.arange(rows * 16, dtype=np.float32).reshape(rows, 16)
    req = pb.ModelInferRequest(model_name=model)
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="FP32", shape=x.shape)
        req.raw_input_contents.append(x.tobytes())
    return req


def identity_request(model: str = "identity_fp32") -> pb.ModelInferRequest:
    x = np.ones((1, 4), dtype=np.float32)
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="INPUT0", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(x.tobytes())
    return req


def infer_add_sub(channel: grpc.Channel, timeout: float = 10.0) -> np.ndarray:
    reply = GRPCInferenceServiceStub(channel).ModelInfer(add_sub_request(), timeout=timeout)
    return np.frombuffer(reply.raw_output_contents[0], np.float32)
