#!/usr/bin/env bash
# Run NVIDIA perf_analyzer, the reference load generator for KServe V2 / Triton servers.
#
# Why this wrapper exists: the PyPI package "perf-analyzer" is an empty placeholder; the real binary ships
# inside the tritonclient==2.41.0 wheel (newer wheels dropped it). That tritonclient clashes with the project's
# own pins, so it lives in its own venv (benchmarks/.venv-pa, git-ignored). The binary is linked against
# libcudart.so.12 (needed at load time even for CPU-only gRPC runs; taken from the nvidia-cuda-runtime-cu12
# wheel, which the loader cannot find on its own) and libb64.so.0d (Debian package libb64-0d); it also needs
# libssl.so.3/libcrypto.so.3 from the system. See shared/BENCHMARKING.md.
#
# Usage: benchmarks/perf_analyzer.sh [perf_analyzer args...]   (-i grpc unless a protocol is given)
#   e.g. benchmarks/perf_analyzer.sh -u 127.0.0.1:8001 -m mlp \
#          --concurrency-range 1:8:x2 --measurement-interval 2000
# Environment: PA_VENV (venv path), PA_PYTHON (interpreter that creates it; default python3.11 or python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${PA_VENV:-$here/.venv-pa}"
# Pinned so that every run measures with the same load generator.
tritonclient_req="tritonclient[grpc]==2.41.0"
cudart_req="nvidia-cuda-runtime-cu12==12.9.79"

log() { printf 'perf_analyzer.sh: %s\n' "$*" >&2; }

ensure_venv() {
    if [[ -x "$venv/bin/perf_analyzer" ]]; then
        return
    fi
    local py="${PA_PYTHON:-}"
    if [[ -z "$py" ]]; then
        py="$(command -v python3.11 || command -v python3)"
    fi
    log "creating $venv with $py (one-off)"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
        "$tritonclient_req" "$cudart_req"
    if [[ ! -x "$venv/bin/perf_analyzer" ]]; then
        log "tritonclient installed but $venv/bin/perf_analyzer is missing"
        exit 1
    fi
}

ensure_libb64() {
    # dpkg-query is the authority on Debian/Ubuntu; elsewhere fall back to the loader cache.
    if command -v dpkg-query >/dev/null 2>&1; then
        if dpkg-query -W -f='${Status}' libb64-0d 2>/dev/null | grep -q 'install ok installed'; then
            return
        fi
    elif ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
        return
    fi
    if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        log "libb64-0d is missing: run 'sudo apt-get update && sudo apt-get install -y libb64-0d'"
        exit 1
    fi
    log "installing libb64-0d (one-off)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libb64-0d >&2
}

ensure_venv
ensure_libb64

# nvidia-cuda-runtime-cu12 is a namespace-package wheel: ask the venv where it put libcudart.so.12 rather
# than hard-coding lib/python3.X/site-packages.
cudart_lib="$("$venv/bin/python" -c \
    'import nvidia.cuda_runtime as m, os; print(os.path.join(list(m.__path__)[0], "lib"))')"
export LD_LIBRARY_PATH="$cudart_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# tensorgate speaks gRPC only, and perf_analyzer's default is HTTP ("Unsupported protocol"): gRPC unless the
# arguments name a protocol.
protocol=(-i grpc)
for arg in "$@"; do
    case "$arg" in -i | -i?* | --protocol | --protocol=*) protocol=() ;; esac
done
exec "$venv/bin/perf_analyzer" "${protocol[@]}" "$@"
