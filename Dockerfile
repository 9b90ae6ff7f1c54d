# tensorgate container images.
#
#   docker build --target cpu -t tensorgate:cpu .
#   docker build --target gpu -t tensorgate:gpu .
#   docker run -p 8001:8001 -p 8002:8002 -v "$PWD/examples/models:/models:ro" tensorgate:cpu
#
# Both targets install the same pure-Python wheel, built once in the `builder` stage, into a virtual
# environment (Ubuntu 24.04's system Python refuses pip installs, PEP 668). The GPU image runs Python 3.12
# from Ubuntu; the CPU image the 3.11 the project is developed on.
#
# Base images and onnxruntime-gpu are pinned together: onnxruntime-gpu 1.31 wheels are built for CUDA 13 and
# cuDNN 9, which the cuda 13.0 "cudnn-runtime" image provides. Bump them together.
#
# The HEALTHCHECK is a liveness check: `tensorgate health --live` against TENSORGATE_SERVER (127.0.0.1:8001;
# change it with the gRPC port) passes while the server answers, NOT_SERVING included, so that a model load longer
# than the start period does not mark the container unhealthy (and have it replaced). Readiness, whether to send
# it traffic, is the orchestrator's readiness probe: `tensorgate health --service inference.GRPCInferenceService`
# or a gRPC probe on that service. When the server speaks TLS, give the probe its files through the environment, for example:
#   docker run -v "$PWD/certs:/certs:ro" \
#     -e TENSORGATE_TLS_CERT=/certs/server.pem -e TENSORGATE_TLS_KEY=/certs/server-key.pem \
#     -e TENSORGATE_TLS_CLIENT_CA=/certs/ca.pem \
#     -e TENSORGATE_HEALTH_TLS_CA=/certs/ca.pem \
#     -e TENSORGATE_HEALTH_TLS_CERT=/certs/probe.pem -e TENSORGATE_HEALTH_TLS_KEY=/certs/probe-key.pem ...
# (_CERT/_KEY only with mutual TLS; TENSORGATE_HEALTH_TLS_SERVER_NAME when the server certificate does not name
# 127.0.0.1). With --auth-probes policy the probe's identity needs the `health` API group.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server/ server/
COPY client/ client/
COPY protos/ protos/
COPY benchmarks/loadtest/ benchmarks/loadtest/
# The requirements file names the wheel with its extra, so later stages need not know the version.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && for extra in cpu gpu; do printf '%s[%s]\n' /wheels/tensorgate-*.whl "$extra" > "/wheels/requirements-$extra.txt"; done

FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    TENSORGATE_SERVER=127.0.0.1:8001
COPY --from=builder /wheels /wheels
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --requirement /wheels/requirements-cpu.txt \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 tensorgate \
    && useradd --system --uid 10001 --gid tensorgate --no-create-home --shell /usr/sbin/nologin tensorgate \
    && mkdir /models
USER 10001:10001
EXPOSE 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["tensorgate", "health", "--live"]
ENTRYPOINT ["tensorgate", "serve"]
CMD ["--model-repository", "/models", "--host", "0.0.0.0"]

FROM ${CUDA_IMAGE} AS gpu
ARG ORT_GPU_VERSION=1.31.1
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    TENSORGATE_SERVER=127.0.0.1:8001
COPY --from=builder /wheels /wheels
# The `gpu` extra brings onnxruntime-gpu alone (ONNX Runtime is an extra, never a base dependency, because
# the CPU and GPU wheels write the same `onnxruntime` package); the check fails the build if CUDA is missing.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.12.* python3-venv=3.12.* \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir --requirement /wheels/requirements-gpu.txt "onnxruntime-gpu==${ORT_GPU_VERSION}" \
    && python -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()" \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 tensorgate \
    && useradd --system --uid 10001 --gid tensorgate --no-create-home --shell /usr/sbin/nologin tensorgate \
    && mkdir /models
USER 10001:10001
EXPOSE 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["tensorgate", "health", "--live"]
ENTRYPOINT ["tensorgate", "serve"]
CMD ["--model-repository", "/models", "--host", "0.0.0.0"]
