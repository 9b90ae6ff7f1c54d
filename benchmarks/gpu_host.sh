#!/usr/bin/env bash
# Run the GPU benchmark (and, for scale, the CPU batching and tracing benchmarks) on a GPU host that has Python,
# PyTorch's CUDA libraries and no package index, from a checkout (not an installed tensorgate).
#
# What it expects beside the checkout, carried there (see ../shared/gpu/README.md):
#   .gpu-1 .. .gpu-N   onnxruntime-gpu in parts plus the other wheels tensorgate needs (../shared/gpu/prepare.sh)
#                      e.g. ../shared/gpu/prepare.sh $(cat benchmarks/gpu_wheels.txt), the pins of tensorgate's
#                      dependencies that a host with PyTorch's usual packages lacks (checked on an H200 host)
#   .pa/               optional: perf_analyzer.gz, libcudart.so.12 and libb64.so.0d; without it the benchmarks
#                      drive the load with tensorgate's own generator and say so. From a machine where
#                      benchmarks/perf_analyzer.sh has run: gzip -9c benchmarks/.venv-pa/bin/perf_analyzer >
#                      .pa/perf_analyzer.gz, and copy the two libraries that `ldd` shows it loading.
#   examples/models    optional: the built example MLP, for the CPU benchmarks
# Results land in $OUT (default benchmarks/results/gpu-host). Each step is bounded; a failed step does not stop
# the ones after it, and the exit status says whether any failed.
#
#   bash benchmarks/gpu_host.sh          (each GPU step took about 100 s on an H200, each CPU step about a minute)
#   GPU_ONLY=1 GPU_STEPS="default sizes" bash benchmarks/gpu_host.sh      (two GPU steps, no CPU ones)
set -uo pipefail
out="${OUT:-benchmarks/results/gpu-host}"
mkdir -p "$out"
failed=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name" | tee -a "$out/steps.log"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc" | tee -a "$out/steps.log"
    tail -n 40 "$out/$name.log"
    [ "$rc" -eq 0 ] || failed=1
}

bash .gpu-*/install.sh || exit 1
# tensorgate.* maps server/, client/, protos/ and benchmarks/loadtest/ at install time; a folder of links does it
# for a checkout on PYTHONPATH.
ns=/tmp/tensorgate-ns/tensorgate
mkdir -p "$ns"
for pair in server:server client:client protos:protos loadtest:benchmarks/loadtest; do
    ln -sfn "$PWD/${pair#*:}" "$ns/${pair%%:*}"
done
# Lay the CUDA libraries out as `pip install onnxruntime-gpu[cuda,cudnn]` would (beside onnxruntime), so that the
# server's own preload finds them, with nothing on LD_LIBRARY_PATH.
nvidia=$(python3 -c 'import nvidia, os; print(os.path.realpath(list(nvidia.__path__)[0]))' 2>/dev/null) \
    && ln -sfn "$nvidia" /tmp/site/nvidia
export PYTHONPATH="/tmp/site:${ns%/tensorgate}:$PWD"
if [ -f .pa/perf_analyzer.gz ]; then
    mkdir -p /tmp/pa/lib
    gunzip -c .pa/perf_analyzer.gz > /tmp/pa/perf_analyzer && chmod +x /tmp/pa/perf_analyzer
    cp .pa/*.so.* /tmp/pa/lib/
    # Only perf_analyzer reads this variable's libraries: the CUDA 12 runtime it links is not the one ORT uses.
    export TENSORGATE_PERF_ANALYZER=/tmp/pa/run
    printf '#!/bin/sh\nLD_LIBRARY_PATH=/tmp/pa/lib exec /tmp/pa/perf_analyzer "$@"\n' > /tmp/pa/run
    chmod +x /tmp/pa/run
fi
{ nproc; nvidia-smi -L 2>&1; python3 --version; } > "$out/host.txt"

# GPU_BENCH_ARGS: more flags for gpu_batching.py, e.g. "--provider cpu --width 16" to try this on a CPU machine.
# GPU_STEPS: which GPU runs, in order (default: all four below).
has_step() { [[ " ${GPU_STEPS:-default padded sizes exhaustive} " == *" $1 "* ]]; }
# shellcheck disable=SC2086
has_step default && step gpu_batching 200 python3 benchmarks/gpu_batching.py --repeats 2 ${GPU_BENCH_ARGS:-}
# Every run padded to max_batch_size (tensorgate.pad_batches): one input shape for cuDNN.
# shellcheck disable=SC2086
has_step padded && step gpu_batching_padded 200 python3 benchmarks/gpu_batching.py --repeats 2 --pad \
    ${GPU_BENCH_ARGS:-}
# Each run padded to the next power of two, each size on its own session (its own cuDNN plans).
# shellcheck disable=SC2086
has_step sizes && step gpu_batching_padded_sizes 200 python3 benchmarks/gpu_batching.py --repeats 2 \
    --pad 1,2,4,8,16,32,64,128 ${GPU_BENCH_ARGS:-}
# ONNX Runtime's own default search, side by side: it builds cuDNN plans again at every new batch size.
# shellcheck disable=SC2086
has_step exhaustive && step gpu_batching_exhaustive 200 python3 benchmarks/gpu_batching.py --repeats 2 \
    --conv-algo-search EXHAUSTIVE ${GPU_BENCH_ARGS:-}
# The JSON only: each step's log holds its Markdown table (a device tool may bring back few files).
cp benchmarks/results/gpu_batching_*.json "$out/" 2>/dev/null
if [ -d examples/models/mlp ] && [ -z "${GPU_ONLY:-}" ]; then  # GPU_ONLY=1 skips the CPU steps
    step batching 120 python3 benchmarks/batching.py --repeats 1 --concurrency 32
    cp benchmarks/results/batching.md "$out/" 2>/dev/null
    step tracing 120 python3 benchmarks/tracing.py --repeats 1 --concurrency 32 --sample-rates 1.0
    cp benchmarks/results/tracing.md "$out/" 2>/dev/null
fi
exit "$failed"
