"""tensorgate's Python client (sync and grpc.aio) over the generated stubs in `tensorgate.protos`.

Until the client lands, `tensorgate.protos.GRPCInferenceServiceStub` and unmodified `tritonclient.grpc` are the
ways to call the server; both are shown in the README.
"""

__all__: list[str] = []
