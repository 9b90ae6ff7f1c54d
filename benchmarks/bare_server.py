"""The protocol limit: a bare grpc.aio V2 server for the example MLP's signature that does no work (`noop`), or
runs the MLP inline per request (`naive`, the straightforward server to beat). Same protocol, same stubs, no
tensorgate pipeline, so the gap to tensorgate is tensorgate's own cost.

    python benchmarks/bare_server.py --mode noop --port 0 [--model examples/models/mlp/1/model.onnx]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from grpc import aio

from tensorgate.protos import GRPCInferenceServiceServicer, add_GRPCInferenceServiceServicer_to_server
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import model_config_pb2 as mc

log = logging.getLogger("bare")


class BareServicer(GRPCInferenceServiceServicer):
    def __init__(self, name: str, session: Any | None) -> None:
        self._name = name
        self._session = session

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="bare", version="0")

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        msg = pb.ModelMetadataResponse(name=self._name, versions=["1"], platform="onnxruntime_onnx")
        msg.inputs.add(name="INPUT0", datatype="FP32", shape=[-1, 256])
        msg.outputs.add(name="OUTPUT0", datatype="FP32", shape=[-1, 10])
        return msg

    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        config = mc.ModelConfig(name=self._name, platform="onnxruntime_onnx", max_batch_size=128)
        config.input.add(name="INPUT0", data_type=mc.TYPE_FP32, dims=[256])
        config.output.add(name="OUTPUT0", data_type=mc.TYPE_FP32, dims=[10])
        return pb.ModelConfigResponse(config=config)

    def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        rows = request.inputs[0].shape[0]
        if self._session is None:
            out = np.zeros((rows, 10), np.float32)
        else:
            x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(rows, 256)
            out = self._session.run(None, {"INPUT0": x})[0]
        reply = pb.ModelInferResponse(model_name=self._name, model_version="1", id=request.id)
        reply.outputs.add(name="OUTPUT0", datatype="FP32", shape=[rows, 10])
        reply.raw_output_contents.append(out.tobytes())
        return reply

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return self._infer(request)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            yield pb.ModelStreamInferResponse(infer_response=self._infer(request))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("noop", "naive"), default="noop")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="mlp")
    parser.add_argument("--model", default="examples/models/mlp/1/model.onnx")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = its default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    session = None
    if args.mode == "naive":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        session = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    server = aio.server(options=[("grpc.max_receive_message_length", 256 << 20)])
    add_GRPCInferenceServiceServicer_to_server(BareServicer(args.name, session), server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    log.info("listening on 127.0.0.1:%d (gRPC), mode %s", port, args.mode)
    log.info("ready")
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
