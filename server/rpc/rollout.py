"""tensorgate.v1.Rollout: where a model's rollout split stands (repository/rollout.py), for an operator asking
why a canary's share has not moved. Served with or without --data-dir, since a split works without the monitor.

The RPC passes the same boundary as the inference service (server/rpc/errors.py: drain gate, identity, policy,
status mapping); GetRollout is in the statistics group, like ModelStatistics.
"""

from __future__ import annotations

from typing import Any

from grpc import aio

from tensorgate.protos import monitoring_pb2 as mpb
from tensorgate.server.auth.policy import Authorizer
from tensorgate.server.errors import InvalidRequestError
from tensorgate.server.repository.manager import ModelRepository
from tensorgate.server.repository.rollout import RolloutState
from tensorgate.server.rpc import errors, malformed
from tensorgate.server.rpc.drain import DrainGate
from tensorgate.server.telemetry.tracing import Tracing

__all__ = ["SERVICE_NAME", "RolloutServicer", "add_rollout_servicer", "encode_state"]

SERVICE_NAME = "tensorgate.v1.Rollout"

Context = aio.ServicerContext[Any, Any]


def encode_state(state: RolloutState) -> mpb.RolloutState:
    spec = state.spec
    return mpb.RolloutState(
        model=state.model,
        stable_version=str(state.stable),
        canary_version="" if state.canary is None else str(state.canary),
        canary_share=state.share,
        steps=spec.steps,
        step=state.step,
        rolled_back=state.rolled_back,
        alerts=state.alerts,
        step_held_s=state.step_held_s,
        step_requests=state.step_requests,
        ramp_interval_s=spec.ramp_interval_s,
        ramp_min_requests=spec.ramp_min_requests,
        canary_failed_percent=state.canary_failed_percent,
        canary_judged=state.canary_judged,
        stable_failed_percent=state.stable_failed_percent,
        stable_judged=state.stable_judged,
        max_error_percent=spec.max_error_percent or 0.0,
        error_gate=spec.max_error_percent is not None,
        waiting_for=state.waiting_for,
        shadow_version="" if state.shadow is None else str(state.shadow),
        shadow_percent=spec.shadow_percent if state.shadow is not None else 0.0,
    )


class RolloutServicer:
    def __init__(
        self, repository: ModelRepository, *, gate: DrainGate, auth: Authorizer, tracing: Tracing | None = None
    ) -> None:
        self.repository = repository
        self.gate = gate
        self.auth = auth
        self.tracing = tracing

    @errors.unary
    async def GetRollout(self, request: mpb.GetRolloutRequest, context: Context) -> mpb.RolloutState:
        if not request.model:
            raise InvalidRequestError("", None, "GetRollout needs the model name")
        return encode_state(self.repository.rollout(request.model).state())


def add_rollout_servicer(servicer: RolloutServicer, server: aio.Server) -> None:
    malformed.add_servicer_to_server(SERVICE_NAME, servicer, server)
