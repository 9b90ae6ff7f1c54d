"""Transport security and authorization: TLS/mTLS credentials that follow their files, the caller's identity
from its client certificate, and the policy that says which identity may call what.

    auth = Authorizer(Path("policy.yaml"), mtls=True)
    creds = ReloadingCredentials(TlsFiles(cert, key, client_ca)).server_credentials()
"""

from __future__ import annotations

from tensorgate.server.auth.identity import ANONYMOUS, CURRENT_IDENTITY, identity_of_auth_context
from tensorgate.server.auth.policy import API_GROUPS, RPC_GROUPS, Authorizer, Policy, PolicyError, load_policy
from tensorgate.server.auth.tls import CertificateError, ReloadingCredentials, TlsFiles

__all__ = [
    "ANONYMOUS",
    "API_GROUPS",
    "CURRENT_IDENTITY",
    "RPC_GROUPS",
    "Authorizer",
    "CertificateError",
    "Policy",
    "PolicyError",
    "ReloadingCredentials",
    "TlsFiles",
    "identity_of_auth_context",
    "load_policy",
]
