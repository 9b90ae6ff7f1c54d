#!/usr/bin/env bash
# perf_analyzer against `tensorgate serve` on the example MLP: a few seconds of sync gRPC and of
# `--async --streaming`, to show an unmodified NVIDIA client runs without error. Not a benchmark of record
# (the batching benchmarks are); output goes to benchmarks/results/perf_smoke-*.txt.
#
# Usage: benchmarks/perf_smoke.sh            (after `make examples`; uses .venv and benchmarks/.venv-pa)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=benchmarks/results
mkdir -p "$out"
log="$out/perf_smoke-server.log"

.venv/bin/tensorgate serve --model-repository examples/models --grpc-port 0 --metrics-port -1 >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
    grep -q "ready:" "$log" && break
    kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.1
done
port=$(sed -n 's/.*listening on [^ ]*:\([0-9]*\) .*/\1/p' "$log" | head -n 1)
[[ -n "$port" ]] || { echo "server did not report its port"; cat "$log"; exit 1; }

common=(-i grpc -u "127.0.0.1:$port" -m mlp --measurement-interval 2000 --stability-percentage 50
        --max-trials 3)
benchmarks/perf_analyzer.sh "${common[@]}" --concurrency-range 1:8:7 | tee "$out/perf_smoke-sync.txt"
benchmarks/perf_analyzer.sh "${common[@]}" --async --streaming --concurrency-range 8:8 \
    | tee "$out/perf_smoke-stream.txt"
