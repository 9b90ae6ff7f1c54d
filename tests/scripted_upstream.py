"""A small upstream speaking the V2 protocol over a real grpc.aio server on loopback, whose answers a test scripts:
a delay and an error status for ModelInfer. For the remote backend's reactions to what a real Triton can answer
(its queue full, a slow model) without starting one; tests/pytriton_upstream.py runs the real thing.

Model "m": X FP32 [-1, 2] -> Y = X, max_batch_size 8; a sequence model when `sequence` is set (its ModelConfig
has sequence_batching), which records the sequence parameters each call brings and how many calls of one sequence
it had at once. A decoupled model when `decoupled` is set: over ModelStreamInfer, a request whose first X value is
n answers n responses, Y = X * i for i = 1..n (`delay_s` before each), then an empty final one when the request
asks for it; n < 0 answers an error message.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from grpc import aio

from tensorgate.protos import GRPCInferenceServiceServicer, add_GRPCInferenceServiceServicer_to_server
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import model_config_pb2 as mc
from tensorgate.protos.tensors import RAN, STATUS_CODE


class _Servicer(GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.delay_s = 0.0
        self.error: tuple[grpc.StatusCode, str] | None = None
        self.metadata_error: tuple[grpc.StatusCode, str] | None = None
        """What ModelMetadata answers instead of the metadata (e.g. a refused access token)."""
        self.config_error: tuple[grpc.StatusCode, str] | None = None
        """What ModelConfig answers instead of the config (e.g. Triton's restricted-protocol refusal)."""
        self.calls = 0
        self.infer_cancelled = 0
        """ModelInfer calls whose caller (tensorgate) cancelled them before they were answered."""
        self.requests: list[pb.ModelInferRequest] = []
        """Every ModelInfer request, as it arrived (its id and parameters, say)."""
        self.peers: set[str] = set()
        """The connections (client address and port) ModelInfer calls came over."""
        self.stream_peers: set[str] = set()
        """The connections ModelStreamInfer calls came over."""
        self.stream_requests: list[pb.ModelInferRequest] = []
        """Every request that came over ModelStreamInfer, as it arrived (its parameters, say)."""
        self.ready = True
        """What ModelReady answers (False: an upstream model being reloaded, say)."""
        self.ready_delay_s = 0.0
        """How long ModelReady takes to answer (a loaded upstream, say)."""
        self.ready_asked = 0
        """ModelReady calls answered."""
        self.described = 0
        """ModelMetadata calls: one per load of a model in front of this upstream."""
        self.decoupled = False
        self.stream_error_code: str | None = None
        """The status code's name a failed decoupled request's item carries (tensorgate's parameter); None: none."""
        self.stream_error_ran = False
        """Whether that item says the request ran (tensorgate's parameter, as for a response over its size limit)."""
        self.streaming = 0
        """Decoupled requests being answered now."""
        self.cancelled = 0
        """Decoupled requests whose stream was cancelled before they were answered in full."""
        self.produced = 0
        """Decoupled responses handed to gRPC (a yield returns once gRPC has taken the message: flow control)."""
        self.sequence = False
        self.max_batch_size = 8
        """What ModelConfig says; 0: a model that does not batch (X and Y are still [-1, 2], rows or not)."""
        self.seen: list[tuple[object, bool, bool, list[float]]] = []
        """Per call, in arrival order: sequence_id, sequence_start, sequence_end and the values of X."""
        self.in_flight: dict[object, int] = {}
        self.most_in_flight: dict[object, int] = {}
        """Per sequence_id (None: calls without one), the most calls of it this upstream had at once."""
        self.held = False
        """While set, ModelInfer calls wait before answering: what the front queues behind them stays put for a test
        to look at, however slowly a loaded machine lets it look."""

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        if self.ready_delay_s:
            await asyncio.sleep(self.ready_delay_s)
        self.ready_asked += 1
        return pb.ModelReadyResponse(ready=self.ready)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        self.described += 1
        if self.metadata_error is not None:
            await context.abort(*self.metadata_error)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=["1"],
            platform="scripted",
            inputs=[tensor(name="X", datatype="FP32", shape=[-1, 2])],
            outputs=[tensor(name="Y", datatype="FP32", shape=[-1, 2])],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        if self.config_error is not None:
            await context.abort(*self.config_error)
        config = mc.ModelConfig(name=request.name, max_batch_size=self.max_batch_size)
        if self.sequence:
            config.sequence_batching.SetInParent()
        if self.decoupled:
            config.model_transaction_policy.decoupled = True
        return pb.ModelConfigResponse(config=config)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        self.calls += 1
        self.requests.append(request)
        self.peers.add(context.peer())
        params = request.parameters
        key = None
        if "sequence_id" in params:
            key = params["sequence_id"].int64_param or params["sequence_id"].string_param
        start = "sequence_start" in params and params["sequence_start"].bool_param
        end = "sequence_end" in params and params["sequence_end"].bool_param
        self.seen.append((key, start, end, np.frombuffer(request.raw_input_contents[0], np.float32).tolist()))
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        self.most_in_flight[key] = max(self.most_in_flight.get(key, 0), self.in_flight[key])
        try:
            while self.held:
                await asyncio.sleep(0.01)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.infer_cancelled += 1
            raise
        finally:
            self.in_flight[key] -= 1
        if self.error is not None:
            await context.abort(*self.error)
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        response.outputs.add(name="Y", datatype="FP32", shape=list(request.inputs[0].shape))
        response.raw_output_contents.append(request.raw_input_contents[0])
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        self.stream_peers.add(context.peer())
        async for request in request_iterator:
            self.stream_requests.append(request)
            x = np.frombuffer(request.raw_input_contents[0], np.float32)
            n = int(x[0])
            if n < 0:
                failed = pb.ModelStreamInferResponse(error_message=f"scripted failure for request '{request.id}'")
                if self.stream_error_code is not None:  # as a tensorgate upstream says what failed
                    failed.infer_response.parameters[STATUS_CODE].string_param = self.stream_error_code
                if self.stream_error_ran:
                    failed.infer_response.parameters[RAN].bool_param = True
                yield failed
                continue
            self.streaming += 1
            try:
                for i in range(1, n + 1):
                    if self.delay_s:
                        await asyncio.sleep(self.delay_s)
                    response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
                    response.outputs.add(name="Y", datatype="FP32", shape=list(request.inputs[0].shape))
                    response.raw_output_contents.append((x * i).tobytes())
                    response.parameters["triton_final_response"].bool_param = False
                    yield pb.ModelStreamInferResponse(infer_response=response)
                    self.produced += 1
                params = request.parameters
                if (
                    "triton_enable_empty_final_response" in params
                    and params["triton_enable_empty_final_response"].bool_param
                ):
                    final = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
                    final.parameters["triton_final_response"].bool_param = True
                    yield pb.ModelStreamInferResponse(infer_response=final)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            finally:
                self.streaming -= 1


class ScriptedUpstream:
    """`with ScriptedUpstream() as up:` serves on `up.url`; set `up.script.delay_s` / `.error` / `.config_error`."""

    def __init__(self) -> None:
        self.script = _Servicer()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="scripted-upstream", daemon=True)
        self._server: aio.Server | None = None
        self.url = ""

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def __enter__(self) -> ScriptedUpstream:
        self._thread.start()

        async def start() -> int:
            self._server = aio.server()
            add_GRPCInferenceServiceServicer_to_server(self.script, self._server)
            port = self._server.add_insecure_port("127.0.0.1:0")
            await self._server.start()
            return port

        self.url = f"127.0.0.1:{self._run(start())}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving, cutting off the calls in progress (an upstream that goes away); once only."""
        if self._loop.is_closed():
            return
        if self._server is not None:
            self._run(self._server.stop(None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
