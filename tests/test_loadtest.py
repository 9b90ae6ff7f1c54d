"""`tensorgate bench` (tensorgate.loadtest) against a real tensorgate on loopback: closed and open loop with two
load processes, reports and plots, queueing seen by the open loop, the exact merge of samples, the request budget
split across load processes, inputs with variable dimensions, compare, Ctrl-C, a load process that dies, no
matplotlib, and an open-loop stream that outlives a server restart."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import re
import signal
import struct
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorgate.client import InferenceClient
from tensorgate.loadtest import PERCENTILES, Samples, merge, percentile, run_sweep, sweep_dict, write_plots
from tensorgate.loadtest.inputs import InputError, ModelShape, make_inputs
from tensorgate.loadtest.runner import BenchConfig, worker_levels
from tensorgate.loadtest.samples import latency_summary_ms
from tensorgate.loadtest.worker import COUNTERS, Level, Target, _LevelRun
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import tensors
from tensorgate.server.cli import main
from tests.onnx_models import accumulator_config, accumulator_model, busy_model, identity_model, write_config
from tests.pki import Pki
from tests.process import ServeProcess
from tests.serving import ServerThread

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHORT = ["--duration", "1", "--warmup", "0.2", "--workers", "2"]


def bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "out"
    assert main(["bench", *args, "--out", str(out)]) == 0
    doc: dict[str, Any] = json.loads((out / "results.json").read_text())
    return doc


def assert_consistent(doc: dict[str, Any]) -> None:
    for level in doc["levels"]:
        assert level["sent"] > 0
        assert level["sent"] == level["succeeded"] + sum(level["failed"].values()) + level["dropped"]
        assert level["failed_total"] == sum(level["failed"].values())
        lat = level["latency_ms"]
        chain = [lat["p50"], lat["p90"], lat["p95"], lat["p99"], lat["p99_9"], lat["max"]]
        assert chain == sorted(chain), chain
        assert 0 < lat["p50"]
        assert level["throughput_rps"] > 0
        assert level["rows_per_s"] == pytest.approx(level["throughput_rps"] * doc["config"]["batch"], rel=1e-3)
        assert sum(p["requests"] for p in level["timeline"]) == level["succeeded"]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (640, 400)
    assert len(data) > 10_000  # axes, lines and labels, not an empty canvas


def assert_outputs(out: Path, levels: int) -> None:
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("mode,concurrency,rate,sent,succeeded")
    assert len(rows) == 1 + levels
    assert (out / "report.md").read_text().count("\n| ") == 1 + levels
    for name in ("latency_vs_throughput.png", "latency_over_time.png"):
        assert_png(out / name)


# ----- both modes, two load processes ----------------------------------------------------------------------------


def test_closed_loop_sweep_with_two_workers(server: ServerThread, tmp_path: Path, capsys: Any) -> None:
    args = ("--concurrency", "1,4", "--batch", "2", "--nice", "1")
    doc = bench(tmp_path, "add_sub", "--server", server.address, *args, *SHORT)
    assert [lv["concurrency"] for lv in doc["levels"]] == [1, 4]
    assert doc["config"]["nice"] == 1
    assert_consistent(doc)
    for level in doc["levels"]:
        assert level["failed"] == {} and level["dropped"] == 0
        # tensorgate answers ModelStatistics: the split of the window as the server saw it.
        st = level["server"]
        assert st is not None and st["requests"] > 0 and st["compute_us"] > 0 and st["queue_us"] >= 0
        assert st["inferences"] >= 2 * st["requests"] * 0.9  # 2 rows a request (a few may fall outside the window)
    assert_outputs(tmp_path / "out", 2)
    captured = capsys.readouterr()
    assert "| c=1 |" in captured.out and "| c=4 |" in captured.out
    assert "sent" in captured.err  # the progress line


def test_closed_loop_streaming_stops_at_max_requests(server: ServerThread, tmp_path: Path) -> None:
    doc = bench(
        tmp_path, "add_sub", "--server", server.address, "--concurrency", "3", "--streaming", "--max-requests", "40",
        "--priority", "1", "--timeout-param", "5000000", "--inputs", "zeros", *SHORT,
    )  # fmt: skip
    (level,) = doc["levels"]
    assert level["sent"] == level["succeeded"] == 40
    assert_consistent(doc)


@pytest.mark.parametrize(
    "load",
    [
        pytest.param(("--concurrency", "1,2,4"), id="closed-loop-fewer-in-flight-than-workers"),
        pytest.param(("--rate", "400", "--arrival", "constant"), id="open-loop"),
    ],
)
def test_max_requests_is_the_total_across_workers(server: ServerThread, tmp_path: Path, load: tuple[str, ...]) -> None:
    """Three load processes and c=1 or c=2: the processes without a call in flight must not hold part of the
    budget (c=1 used to send a third of it)."""
    doc = bench(
        tmp_path, "add_sub", "--server", server.address, *load, "--max-requests", "31", "--workers", "3",
        "--duration", "30", "--warmup", "0.2", "--no-plots",
    )  # fmt: skip
    assert len(doc["levels"]) == (3 if load[0] == "--concurrency" else 1)
    for level in doc["levels"]:
        assert level["sent"] == level["succeeded"] == 31, level
        # The window ends when the budget ran out, not at --duration: a process with no call in flight kept its
        # window open to the level's end, and c=1 read as 31 requests over 30 s.
        assert level["window_s"] < 10, level
    assert_consistent(doc)


@pytest.mark.parametrize(
    ("mode", "workers", "value", "budget"),
    [
        pytest.param("closed", 4, 1, 10, id="c1-4-workers"),
        pytest.param("closed", 4, 3, 10, id="c3-4-workers"),
        pytest.param("closed", 3, 7, 100, id="c7-3-workers"),
        pytest.param("closed", 2, 2, 1, id="budget-below-workers"),
        pytest.param("open", 3, 50, 2, id="open-budget-below-workers"),
        pytest.param("open", 4, 100, 10, id="open-4-workers"),
    ],
)
def test_request_budget_goes_to_the_workers_with_load(mode: str, workers: int, value: int, budget: int) -> None:
    config = BenchConfig(model="m", mode=mode, workers=workers, max_requests=budget)  # type: ignore[arg-type]
    levels = worker_levels(config, float(value), start=0.0)
    budgets = [lv.max_requests or 0 for lv in levels]
    assert sum(budgets) == budget
    if mode == "closed":
        assert sum(lv.concurrency for lv in levels) == value
        assert all(b == 0 for lv, b in zip(levels, budgets, strict=True) if lv.concurrency == 0)
        # In proportion to the calls in flight, so that the processes run out at about the same time.
        for lv, b in zip(levels, budgets, strict=True):
            assert abs(b - budget * lv.concurrency / value) < 1
    else:
        assert sum(lv.rate for lv in levels) == pytest.approx(value)
        assert max(budgets) - min(budgets) <= 1


def test_open_loop_throughput_never_exceeds_the_rate_offered(server: ServerThread, tmp_path: Path) -> None:
    """Four requests at 20/s span 0.2 s of schedule; measured to the last answer alone, the window was 0.15 s plus
    one latency, and a server answering in 1 ms read as 26 req/s against the 20/s it was offered."""
    doc = bench(
        tmp_path, "add_sub", "--server", server.address, "--rate", "20", "--arrival", "constant",
        "--max-requests", "4", "--workers", "2", "--duration", "30", "--warmup", "0.1", "--no-plots",
    )  # fmt: skip
    (level,) = doc["levels"]
    assert level["succeeded"] == 4, level
    assert level["window_s"] >= 0.2 - 1e-9
    assert level["throughput_rps"] <= 20.0


def test_open_loop_sweep_with_two_workers(server: ServerThread, tmp_path: Path) -> None:
    doc = bench(tmp_path, "add_sub", "--server", server.address, "--rate", "100,200", "--arrival", "constant", *SHORT)
    assert [lv["rate"] for lv in doc["levels"]] == [100.0, 200.0]
    assert_consistent(doc)
    for level in doc["levels"]:
        # Constant arrivals from two interleaved workers: the intended count, whatever the responses.
        assert level["sent"] == pytest.approx(level["rate"] * 1.0, abs=3)
    assert_outputs(tmp_path / "out", 2)


def test_open_loop_streaming_poisson(server: ServerThread, tmp_path: Path) -> None:
    doc = bench(tmp_path, "add_sub", "--server", server.address, "--rate", "150", "--streaming", *SHORT, "--no-plots")
    assert_consistent(doc)
    assert not (tmp_path / "out" / "latency_over_time.png").exists()


# ----- an open loop above capacity sees the queue ----------------------------------------------------------------

SLOW_CONFIG = """
name: "slow"
backend: "onnxruntime"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


@pytest.fixture
def slow_server(tmp_path: Path) -> Iterator[ServerThread]:
    repo = tmp_path / "slow_models"
    busy_model(repo / "slow" / "1" / "model.onnx", iterations=4000)
    write_config(repo, "slow", SLOW_CONFIG)
    with ServerThread(repo) as s:
        yield s


def test_open_loop_latency_includes_queueing(slow_server: ServerThread, tmp_path: Path) -> None:
    x = np.ones((1, 4), np.float32)
    with InferenceClient(slow_server.address, timeout=30) as client:
        client.infer("slow", {"INPUT0": x})
        times = []
        for _ in range(8):
            t0 = time.perf_counter()
            client.infer("slow", {"INPUT0": x})
            times.append(time.perf_counter() - t0)
    # The fastest of the eight: a busy neighbour on a shared machine can only make a call slower, and an inflated
    # estimate would ask for a rate the server keeps up with.
    service_ms = min(times) * 1000
    # Twice what one instance can serve: requests wait behind each other, and the open loop must show it.
    rate = 2.0 * 1000.0 / service_ms
    doc = bench(tmp_path, "slow", "--server", slow_server.address, "--rate", f"{rate:.0f}", *SHORT, "--no-plots")
    assert_consistent(doc)
    (level,) = doc["levels"]
    assert level["dropped"] == 0 and level["failed"] == {}
    assert level["latency_ms"]["p99"] > 5 * service_ms, (level["latency_ms"], service_ms)
    assert level["throughput_rps"] < 0.8 * rate  # the server cannot keep up, whatever was sent
    assert level["server"]["queue_us"] / 1000 > service_ms  # and its own statistics agree


# ----- pieces ------------------------------------------------------------------------------------------------------


def test_merge_of_worker_samples_is_exact() -> None:
    rng = np.random.default_rng(1)
    latencies = rng.lognormal(7, 1, 5001)
    sends = np.sort(rng.uniform(0, 2, 5001))
    cuts = [0, 17, 17, 2500, 5001]  # uneven parts, one of them empty
    parts = [
        Samples(sends[a:b], latencies[a:b], sent=b - a + 2, failed={"UNAVAILABLE": 1, f"X{i}": 1}, dropped=i,
                window_s=1.5 + i, cpu_s=0.5)
        for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False))
    ]  # fmt: skip
    merged = merge(parts)
    assert merged.succeeded == 5001
    assert sorted(merged.latency_us) == sorted(latencies)
    assert merged.sent == 5001 + 8 and merged.dropped == 0 + 1 + 2 + 3
    assert merged.failed == {"UNAVAILABLE": 4, "X0": 1, "X1": 1, "X2": 1, "X3": 1}
    assert merged.window_s == 4.5 and merged.cpu_s == 2.0
    ordered = np.sort(latencies)
    for p in PERCENTILES:
        # Nearest rank on the union: exactly numpy's inverted-CDF percentile of all samples.
        assert percentile(np.sort(merged.latency_us), p) == np.percentile(ordered, p, method="inverted_cdf")
    summary = latency_summary_ms(merged.latency_us)
    assert summary["max"] == ordered[-1] / 1000
    assert merge([]).succeeded == 0


def test_nearest_rank_percentile() -> None:
    values = np.arange(1.0, 101.0)
    assert [percentile(values, p) for p in (50, 90, 99, 99.9, 100)] == [50, 90, 99, 100, 100]
    assert percentile(np.array([7.0]), 99.9) == 7.0
    assert np.isnan(percentile(np.array([]), 50))
    # Exact ranks where floating point would round up: 99.9% of 1000 is rank 999, not the maximum.
    for n in (1000, 2000, 10000):
        assert percentile(np.arange(1.0, n + 1.0), 99.9) == n * 999 // 1000


@pytest.mark.parametrize(
    "datatype",
    [pytest.param(d, id=d) for d in ("FP32", "FP16", "BF16", "INT8", "UINT64", "BOOL", "BYTES")],
)
def test_random_inputs_follow_the_metadata(datatype: str) -> None:
    shape = ModelShape("m", (("X", datatype, (-1, 3)),), max_batch_size=8)
    (x,) = make_inputs(shape, 5, "random").values()
    assert x.shape == (5, 3)
    if datatype == "BYTES":
        assert x.dtype == object and all(isinstance(v, bytes) and len(v) == 8 for v in x.ravel())
    else:
        assert x.dtype == tensors.BY_NAME[datatype].np_dtype
    if tensors.BY_NAME[datatype].floating:  # normal values, not the small integers other types get
        assert (x.astype(np.float64) % 1 != 0).any()
    assert make_inputs(shape, 5, "zeros")["X"].shape == (5, 3)


def test_a_float_npy_file_feeds_a_bf16_input(tmp_path: Path) -> None:
    """.npy has no bfloat16: a float file for a BF16 input is rounded to it, as for FP16."""
    shape = ModelShape("m", (("X", "BF16", (-1, 2)),), max_batch_size=8)
    np.save(tmp_path / "X.npy", np.array([[1.5, 1 / 3]], np.float32))
    x = make_inputs(shape, 2, str(tmp_path))["X"]
    assert x.dtype == tensors.BY_NAME["BF16"].np_dtype and x.tolist() == [[1.5, 0.333984375]] * 2
    np.save(tmp_path / "X.npy", x[:1])  # bfloat16 as np.save writes it: raw "|V2", read as bfloat16 again
    assert make_inputs(shape, 2, str(tmp_path))["X"].tolist() == [[1.5, 0.333984375]] * 2


def test_inputs_from_npy_files(tmp_path: Path) -> None:
    shape = ModelShape("m", (("A", "FP32", (-1, 3)), ("B", "INT32", (-1, 2))), max_batch_size=8)
    np.save(tmp_path / "A.npy", np.arange(3, dtype=np.float64))  # one row: repeated
    np.save(tmp_path / "B.npy", np.arange(20).reshape(10, 2))  # more rows: the first ones
    arrays = make_inputs(shape, 4, str(tmp_path))
    assert arrays["A"].dtype == np.float32 and arrays["A"].shape == (4, 3)
    assert arrays["B"].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    np.save(tmp_path / "A.npy", np.arange(3).reshape(1, 3))  # one row written with its batch dimension: repeated
    assert make_inputs(shape, 4, str(tmp_path))["A"].tolist() == [[0.0, 1.0, 2.0]] * 4
    with pytest.raises(InputError, match="max_batch_size 8"):
        make_inputs(shape, 9, "zeros")
    with pytest.raises(InputError, match="does not batch"):
        make_inputs(ModelShape("m", (("A", "FP32", (3,)),), max_batch_size=0), 2, "zeros")
    (tmp_path / "A.npy").unlink()
    with pytest.raises(InputError, match="input 'A'"):
        make_inputs(shape, 4, str(tmp_path))


def test_npy_files_give_the_variable_dimensions(tmp_path: Path) -> None:
    """A variable dimension besides the batch takes the file's size; fixed ones and the datatype are checked."""
    shape = ModelShape("m", (("A", "FP32", (-1, -1, 3)), ("B", "INT64", (-1, -1))), max_batch_size=8)
    np.save(tmp_path / "A.npy", np.ones((5, 3), np.float32))  # one row of [5, 3]: repeated to the batch
    np.save(tmp_path / "B.npy", np.arange(60, dtype=np.int32).reshape(6, 10))  # 6 rows of 10: the first 4
    arrays = make_inputs(shape, 4, str(tmp_path))
    assert arrays["A"].shape == (4, 5, 3) and arrays["A"].dtype == np.float32
    assert arrays["B"].shape == (4, 10) and arrays["B"].dtype == np.int64
    assert arrays["B"][3].tolist() == list(range(30, 40))
    # A model that does not batch: the whole file is the request, its leading variable dimension included.
    unbatched = ModelShape("m", (("A", "FP32", (-1, 3)),), max_batch_size=0)
    np.save(tmp_path / "A.npy", np.ones((7, 3)))
    assert make_inputs(unbatched, 1, str(tmp_path))["A"].shape == (7, 3)
    np.save(tmp_path / "A.npy", np.ones(3))  # one row: a request of one
    assert make_inputs(unbatched, 1, str(tmp_path))["A"].shape == (1, 3)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        pytest.param(np.ones((5, 4)), r"input 'A': .*A\.npy has shape \[5, 4\]; the model's dims are \[-1, -1, 3\]",
                     id="fixed-dim"),
        pytest.param(np.ones(3), r"input 'A': .*A\.npy has shape \[3\]; the model's dims are \[-1, -1, 3\]",
                     id="rank"),
        pytest.param(np.ones((2, 5, 3)), r"input 'A': .*A\.npy has 2 rows, fewer than --batch 4", id="rows"),
        pytest.param(np.array([["x", "y", "z"]]), r"input 'A': .*A\.npy holds <U1 values, the model takes FP32",
                     id="strings-for-floats"),
        pytest.param(np.ones((1, 3), np.complex64), r"input 'A': .*holds complex64 values, the model takes FP32",
                     id="complex-for-floats"),
    ],
)  # fmt: skip
def test_npy_file_that_does_not_fit_names_the_input(tmp_path: Path, array: np.ndarray, match: str) -> None:
    shape = ModelShape("m", (("A", "FP32", (-1, -1, 3)),), max_batch_size=8)
    np.save(tmp_path / "A.npy", array)
    with pytest.raises(InputError, match=match):
        make_inputs(shape, 4, str(tmp_path))


@pytest.mark.parametrize(
    ("datatype", "array", "match"),
    [
        pytest.param("INT32", np.full((1, 2), 1.5), r"input 'X': .* holds float64 values, the model takes INT32",
                     id="floats-for-ints"),
        pytest.param("UINT8", np.array([[1, 300]]), r"input 'X': .* holds values from 1 to 300, outside UINT8",
                     id="out-of-range"),
        pytest.param("BOOL", np.array([[0, 1]]), r"input 'X': .* holds int64 values, the model takes BOOL",
                     id="ints-for-bool"),
        pytest.param("BYTES", np.array([[1, 2]]), r"input 'X': .* holds int64 values, the model takes BYTES",
                     id="numbers-for-bytes"),
    ],
)  # fmt: skip
def test_npy_file_datatype_is_checked(tmp_path: Path, datatype: str, array: np.ndarray, match: str) -> None:
    shape = ModelShape("m", (("X", datatype, (-1, 2)),), max_batch_size=8)
    np.save(tmp_path / "X.npy", array)
    with pytest.raises(InputError, match=match):
        make_inputs(shape, 1, str(tmp_path))


def test_random_inputs_with_variable_dimensions_point_to_npy_files() -> None:
    shape = ModelShape("m", (("X", "FP32", (-1, 3)), ("Y", "FP32", (-1, -1, 3))), max_batch_size=8)
    for source in ("random", "zeros"):
        with pytest.raises(InputError, match=r"input 'Y' has variable dims \[-1, -1, 3\].*--inputs DIR.*Y\.npy"):
            make_inputs(shape, 2, source)
    # A model that does not batch: a leading variable dimension is a request of one, as before.
    unbatched = ModelShape("m", (("X", "FP32", (-1, 3)),), max_batch_size=0)
    assert make_inputs(unbatched, 1, "random")["X"].shape == (1, 3)
    with pytest.raises(InputError, match=r"input 'X' has variable dims \[-1, -1\]"):
        make_inputs(ModelShape("m", (("X", "FP32", (-1, -1)),), max_batch_size=0), 1, "zeros")


@pytest.fixture
def variable_server(tmp_path: Path) -> Iterator[ServerThread]:
    """`var`: an identity over FP32 [batch, n], n variable (no config: the server derives [-1, -1])."""
    repo = tmp_path / "var_models"
    identity_model(repo / "var" / "1" / "model.onnx", "FP32", shape=("batch", "n"))
    with ServerThread(repo) as s:
        yield s


def test_bench_a_model_with_a_variable_dimension(variable_server: ServerThread, tmp_path: Path, capsys: Any) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    np.save(folder / "INPUT0.npy", np.arange(15, dtype=np.float32).reshape(3, 5))
    doc = bench(
        tmp_path, "var", "--server", variable_server.address, "--inputs", str(folder), "--batch", "2",
        "--concurrency", "2", "--max-requests", "20", "--duration", "30", "--warmup", "0.1", "--no-plots",
    )  # fmt: skip
    (level,) = doc["levels"]
    assert level["sent"] == level["succeeded"] == 20 and level["failed"] == {}
    assert level["server"]["inferences"] == 2 * level["server"]["requests"]
    out = str(tmp_path / "random")
    assert main(["bench", "var", "--server", variable_server.address, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "input 'INPUT0' has variable dims [-1, -1]" in err and "--inputs DIR" in err
    np.save(folder / "INPUT0.npy", np.ones((3, 5), np.complex64))
    assert main(["bench", "var", "--server", variable_server.address, "--inputs", str(folder), "--out", out]) == 2
    assert "input 'INPUT0'" in capsys.readouterr().err

    # --shape, as perf_analyzer's, sets the variable dimension for random inputs.
    doc = bench(
        tmp_path, "var", "--server", variable_server.address, "--shape", "INPUT0:7", "--batch", "2",
        "--concurrency", "1", "--max-requests", "5", "--duration", "30", "--warmup", "0.1", "--no-plots",
    )  # fmt: skip
    assert doc["config"]["shapes"] == {"INPUT0": [7]}
    (level,) = doc["levels"]
    assert level["sent"] == level["succeeded"] == 5
    assert main(["bench", "var", "--server", variable_server.address, "--shape", "INPUT0", "--out", out]) == 2
    assert "expected NAME:D1,D2,... with positive sizes" in capsys.readouterr().err


def test_shapes_set_the_variable_dimensions_of_random_inputs(tmp_path: Path) -> None:
    shape = ModelShape("m", (("X", "FP32", (-1, 3)), ("Y", "INT32", (-1, -1, 3))), max_batch_size=8)
    for source in ("random", "zeros"):
        arrays = make_inputs(shape, 2, source, shapes={"Y": (5, 3)})
        assert arrays["Y"].shape == (2, 5, 3) and arrays["Y"].dtype == np.int32 and arrays["X"].shape == (2, 3)
    # A model that does not batch: the shape is the whole tensor's, its leading dimension included (perf_analyzer).
    unbatched = ModelShape("m", (("X", "FP32", (-1, -1)), ("L", "INT64", (-1,))), max_batch_size=0)
    arrays = make_inputs(unbatched, 1, "zeros", shapes={"X": (2, 4), "L": (5,)})
    assert arrays["X"].shape == (2, 4) and arrays["L"].shape == (5,)
    for shapes, match in (
        ({"Y": (5, 4)}, r"--shape Y:5,4 does not fit input 'Y', whose dims are \[-1, -1, 3\]"),
        ({"Y": (5,)}, r"--shape Y:5 does not fit"),
        ({"Z": (1,)}, r"--shape names \['Z'\], not inputs of model 'm'"),
    ):
        with pytest.raises(InputError, match=match):
            make_inputs(shape, 2, "random", shapes=shapes)
    np.save(tmp_path / "X.npy", np.ones(3))
    with pytest.raises(InputError, match="a .npy file gives its own shape"):
        make_inputs(shape, 2, str(tmp_path), shapes={"Y": (5, 3)})


def test_compare_shows_ratios_against_the_first(tmp_path: Path, capsys: Any) -> None:
    level = {
        "mode": "closed", "concurrency": 8, "rate": None, "throughput_rps": 1000.0, "rows_per_s": 1000.0,
        "latency_ms": {"p50": 2.0, "p99": 8.0}, "failed_total": 0, "dropped": 0,
    }  # fmt: skip
    faster = {**level, "throughput_rps": 1500.0, "rows_per_s": 1500.0, "latency_ms": {"p50": 1.0, "p99": 4.0}}
    for name, lv in (("before", level), ("after", faster)):
        (tmp_path / name).mkdir()
        doc = {"format": "tensorgate-bench/1", "levels": [lv]}
        (tmp_path / name / "results.json").write_text(json.dumps(doc))
    args = ["bench", "compare", str(tmp_path / "before" / "results.json"), str(tmp_path / "after" / "results.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| load | metric | before | after | after / before |" in out
    assert "| c=8 | req/s | 1,000.00 | 1,500.00 | 1.50x |" in out
    assert "| c=8 | p99 ms | 8.00 | 4.00 | 0.50x |" in out
    assert main(["bench", "compare", str(tmp_path / "before" / "results.json")]) == 2


def test_usage_errors(server: ServerThread, tmp_path: Path, capsys: Any) -> None:
    out = str(tmp_path / "o")
    assert main(["bench", "add_sub", "--server", server.address, "--batch", "9", "--out", out]) == 2
    assert "max_batch_size 8" in capsys.readouterr().err
    assert main(["bench", "nope", "--server", server.address, "--out", out]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["bench", "add_sub", "--server", server.address, "--concurrency", "0", "--out", out]) == 2
    assert main(["bench", "add_sub", "--server", server.address, "--nice", "20", "--out", out]) == 2
    assert "--nice must be between 0 and 19" in capsys.readouterr().err
    assert main(["bench", "add_sub", "--server", server.address, "--seed", "-1", "--out", out]) == 2
    assert "--seed must not be negative" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("streaming", "corrid"),
    [(False, "UINT64"), (True, "UINT64"), (False, "INT32"), (False, "STRING")],
    ids=["unary", "stream", "int32-ids", "string-ids"],
)
def test_a_sequence_model_is_loaded_in_sequences(tmp_path: Path, streaming: bool, corrid: str) -> None:
    """Against a sequence model each request in flight runs its own sequences (as perf_analyzer does), with IDs
    of the kind its CORRID takes: nothing fails, and each level ends its open sequences, so none is left holding
    one of the model's 8 slots."""
    root = tmp_path / "models"
    accumulator_model(root / "acc" / "1" / "model.onnx", corrid="BYTES" if corrid == "STRING" else corrid)
    extra = "max_sequence_idle_microseconds: 60000000"
    write_config(root, "acc", accumulator_config("acc", corrid=f"TYPE_{corrid}", extra=extra))
    with ServerThread(root) as s:
        args = ["acc", "--server", s.address, "--concurrency", "4,8", "--sequence-length", "5", *SHORT]
        doc = bench(tmp_path, *args, *(["--streaming"] if streaming else []))
        assert_consistent(doc)
        assert doc["config"]["sequence_length"] == 5
        assert "sequences of 5, 2 worker(s)" in (tmp_path / "out" / "report.md").read_text()
        for level in doc["levels"]:
            assert level["succeeded"] > 0 and level["failed_total"] == 0, level
        stats = s.run(_sequencer_counts(s))
    assert stats == (0, 0)  # active, backlog


async def _sequencer_counts(server: ServerThread) -> tuple[int, int]:
    sequencer = server.app.repository.get("acc", "").sequencer
    assert sequencer is not None
    return sequencer.active, sequencer.backlog


def test_sequence_load_that_cannot_be_sent(tmp_path: Path, server: ServerThread, capsys: Any) -> None:
    root = tmp_path / "models"
    accumulator_model(root / "acc" / "1" / "model.onnx")
    write_config(root, "acc", accumulator_config("acc"))
    out = str(tmp_path / "o")
    with ServerThread(root) as s:
        assert main(["bench", "acc", "--server", s.address, "--rate", "100", "--out", out, *SHORT]) == 2
    assert "is a sequence (stateful) model" in capsys.readouterr().err
    assert main(["bench", "add_sub", "--server", server.address, "--sequence-length", "4", "--out", out]) == 2
    assert "is not a sequence model: --sequence-length is for those" in capsys.readouterr().err
    assert main(["bench", "add_sub", "--server", server.address, "--sequence-length", "0", "--out", out]) == 2
    assert "--sequence-length must be at least 1" in capsys.readouterr().err


def test_more_load_processes_than_the_machine_can_run_are_refused_before_any_starts(
    server: ServerThread, tmp_path: Path, capsys: Any
) -> None:
    """--workers was unbounded: --workers 1000 forked a thousand Python processes."""
    many = str(4 * (os.cpu_count() or 1) + 1)
    before = len(multiprocessing.active_children())
    assert main(["bench", "add_sub", "--server", server.address, "--workers", many, "--out", str(tmp_path)]) == 2
    assert f"--workers {many} is more than 4 load processes per CPU" in capsys.readouterr().err
    assert len(multiprocessing.active_children()) == before


def test_public_names() -> None:
    import tensorgate.loadtest as loadtest

    public = {name for name in vars(loadtest) if not name.startswith("_")}
    modules = {"cli", "inputs", "plots", "report", "runner", "samples", "worker", "annotations"}
    assert set(loadtest.__all__) == public - modules


def test_bench_help(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--concurrency", "--rate", "--arrival", "--workers", "--max-requests", "--tls-ca", "--streaming"):
        assert flag in out


# ----- Ctrl-C ---------------------------------------------------------------------------------------------------------


def test_ctrl_c_writes_a_partial_report(server: ServerThread, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tensorgate.server.cli", "bench", "add_sub", "--server", server.address,
           "--concurrency", "2,4", "--duration", "60", "--warmup", "0.2", "--workers", "2", "--no-plots",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        for line in proc.stderr:  # the first progress line: measuring has started
            if " sent " in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["interrupted"] is True
    (level,) = doc["levels"]  # the second level never started
    assert level["interrupted"] is True and level["concurrency"] == 2
    assert_consistent(doc)
    assert "partial" in stdout


def bench_process(server: str, out: Path, *args: str, python: list[str] | None = None) -> subprocess.Popen[str]:
    """`tensorgate bench` in a child process (its stdout the table, its stderr the progress lines)."""
    cmd = [*(python or [sys.executable, "-m", "tensorgate.server.cli"]), "bench", *args, "--server", server,
           "--out", str(out)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def load_processes(pid: int) -> list[int]:
    """The load processes of the `tensorgate bench` running as ``pid``: its children started by multiprocessing's
    spawn (not its resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie waiting for a parent that never reaps it does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_load_processes_stop_when_the_sweep_is_killed(server: ServerThread, tmp_path: Path) -> None:
    """The sweep killed (a CI job's timeout, SIGKILL: no chance to tell anyone): its load processes used to go on
    loading the server until the end of the level, here 60 s."""
    proc = bench_process(
        server.address, tmp_path / "out", "add_sub", "--concurrency", "2", "--workers", "2", "--duration", "60",
        "--warmup", "0", "--no-plots",
    )  # fmt: skip
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = load_processes(proc.pid)
        assert len(pids) == 2, "the load processes did not start"
        time.sleep(2)  # into the level
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while any(map(running, pids)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(running, pids)), "load processes outlived the sweep"
    finally:
        for pid in [p for p in pids if running(p)]:
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):  # not read: the load processes hold them open while they run
            assert stream is not None
            stream.close()


def test_a_dead_load_process_stops_the_sweep_and_keeps_the_levels_measured(
    server: ServerThread, tmp_path: Path
) -> None:
    """A load process killed during the second level (as the OOM killer would): the first level is reported and
    written, the error names the process and how it ended, and the exit status is 1."""
    out = tmp_path / "out"
    proc = bench_process(
        server.address, out, "add_sub", "--concurrency", "1,2,4", "--duration", "3", "--warmup", "0.2",
        "--workers", "2", "--no-plots",
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the first progress line of the second level: it is being measured
            if line.startswith("[c=2]") and " sent " in line:
                break
        else:
            raise AssertionError("bench ended before its second level")
        workers = load_processes(proc.pid)
        assert len(workers) == 2, workers
        victim = workers[-1]
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, stderr
    message = rf"load process [01] \(pid {victim}\) was killed by SIGKILL \(exit code -9"
    assert re.search(message + r".*during c=2", stderr), stderr
    assert "1 level measured before it" in stderr
    assert "Traceback" not in stderr
    doc = json.loads((out / "results.json").read_text())
    assert [lv["concurrency"] for lv in doc["levels"]] == [1]
    assert re.search(message, doc["error"])
    assert_consistent(doc)
    assert "| c=1 |" in stdout and "| c=2 |" not in stdout
    assert len((out / "results.csv").read_text().splitlines()) == 2
    assert "STOPPED" in (out / "report.md").read_text()
    for pid in workers:  # the surviving load process ended with the sweep
        cmdline = Path(f"/proc/{pid}/cmdline")
        assert not cmdline.exists() or b"spawn_main" not in cmdline.read_bytes()


# ----- no matplotlib ----------------------------------------------------------------------------------------------

# An interpreter on which `import matplotlib` fails as it does where the package is not installed: a meta-path
# finder ahead of the real ones refuses it, then the CLI runs as `python -m tensorgate.server.cli` would.
WITHOUT_MATPLOTLIB = """
import sys
class NoMatplotlib:
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoMatplotlib())
from tensorgate.server.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_plots_without_matplotlib_say_so_and_keep_the_reports(server: ServerThread, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = bench_process(
        server.address, out, "add_sub", "--concurrency", "2", "--duration", "0.5", "--warmup", "0.1",
        python=[sys.executable, "-c", WITHOUT_MATPLOTLIB],
    )  # fmt: skip
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "matplotlib is not installed, so no plots: pip install 'tensorgate[bench]'" in stderr
    assert "| c=2 |" in stdout
    doc = json.loads((out / "results.json").read_text())
    assert_consistent(doc)
    assert (out / "report.md").read_text().count("\n| ") == 2
    assert len((out / "results.csv").read_text().splitlines()) == 2
    assert not list(out.glob("*.png"))


# ----- open-loop streaming across a server restart ------------------------------------------------------------------

_PROGRESS = re.compile(r" sent (\d+) ok (\d+) failed (\d+)")


def test_open_loop_stream_reopens_after_a_server_restart(repo: Path, tmp_path: Path) -> None:
    """The stream breaks when the server goes; requests pending or due while it is down count as failures by
    code, and a new stream carries the load once the server is back on the same port."""
    serve = ["--model-repository", str(repo), "--shutdown-grace-s", "0.5"]
    first = ServeProcess([*serve, "--grpc-port", "0"])
    second: ServeProcess | None = None
    out = tmp_path / "out"
    proc = None
    try:
        address = first.address
        proc = bench_process(
            address, out, "add_sub", "--rate", "50", "--arrival", "constant", "--streaming", "--duration", "120",
            "--warmup", "0.2", "--no-plots",
        )  # fmt: skip
        assert proc.stderr is not None
        progress: list[tuple[int, int, int]] = []

        def wait_for(done: Any) -> None:
            """Read progress lines until ``done(sent, ok, failed)``; bounded by the lines of a 120 s level."""
            assert proc is not None and proc.stderr is not None
            for line in proc.stderr:
                m = _PROGRESS.search(line)
                if m:
                    progress.append((int(m[1]), int(m[2]), int(m[3])))
                    if done(*progress[-1]):
                        return
            raise AssertionError(f"bench ended early: {progress}")

        wait_for(lambda sent, ok, failed: ok >= 10)
        assert first.terminate() == 0  # SIGTERM: drain for 0.5 s, then the stream is cut and the port closes
        second = ServeProcess([*serve, "--grpc-port", address.rsplit(":", 1)[1]])
        second.wait_for_line("ready:")
        wait_for(lambda sent, ok, failed: failed > 0)
        ok_after_restart = progress[-1][1]
        wait_for(lambda sent, ok, failed: ok >= ok_after_restart + 10)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for s in (first, second):
            if s is not None:
                s.__exit__(None, None, None)
    doc = json.loads((out / "results.json").read_text())
    (level,) = doc["levels"]
    assert_consistent(doc)
    assert level["succeeded"] >= ok_after_restart + 10
    # Only the codes of a server going away (pending requests cut, new streams refused, the port closed).
    # STREAM_ERROR: a message that reached the draining server's stream was refused in the stream (retry elsewhere).
    allowed = {"CANCELLED", "UNAVAILABLE", "UNKNOWN", "STREAM_ERROR"}
    assert level["failed"] and set(level["failed"]) <= allowed, level["failed"]


def test_a_late_failure_does_not_stretch_the_throughput_window() -> None:
    """Throughput is answers over the span in which they came: a request that fails at its deadline long after
    the level ended used to stretch that span (99 answers in 1 s read as 22.5/s)."""
    level = Level("closed", start=0.0, warmup_s=0.0, duration_s=1.0, max_requests=None, concurrency=1)
    calls = types.SimpleNamespace(aio=None, sync=None)
    target = Target(server="127.0.0.1:1", model="m", version="", inputs={})
    run = _LevelRun(0, target, level, None, calls, pb.ModelInferRequest(), [0] * COUNTERS, None)  # type: ignore[arg-type]
    for i in range(99):
        run._record(i / 100, i / 100 + 0.01, None)
    run._record(0.5, 30.5, "DEADLINE_EXCEEDED")
    assert run.last_done == pytest.approx(0.99)
    assert run.failed == {"DEADLINE_EXCEEDED": 1}


# ----- a failing or hanging server, bad settings, results that are not ------------------------------------------


def test_a_server_killed_mid_level_and_restarted(repo: Path) -> None:
    """The server is killed (SIGKILL) during the first level and started again, on the same port, during the
    second. The first level's requests/s divides its answers by the whole level, not by the seconds before the
    kill (702 answers in ~4 s read as 1,733/s); its slots back off on UNAVAILABLE instead of sending refusals as
    fast as they come (28,000/s); and the third level reads the server's statistics again (one failed read used
    to turn them off for the rest of the sweep)."""
    serve = ["--model-repository", str(repo)]
    first = ServeProcess([*serve, "--grpc-port", "0"])
    second: ServeProcess | None = None
    address = first.address
    first.wait_for_line("ready:")

    def progress(line: str) -> None:
        nonlocal second
        if line.startswith("[c=2]") and " sent " in line and first.proc.poll() is None:
            first.proc.kill()
            first.proc.wait(10)
        elif line.startswith("[c=1] warming up"):
            second = ServeProcess([*serve, "--grpc-port", address.rsplit(":", 1)[1]])
            second.wait_for_line("ready:")

    config = BenchConfig(
        model="add_sub", server=address, concurrency=(2, 1, 3), duration_s=1.5, warmup_s=0.3, deadline_s=5.0
    )
    try:
        result = run_sweep(config, progress)
    finally:
        for s in (first, second):
            if s is not None:
                s.__exit__(None, None, None)
    killed, restarted, after = sweep_dict(result)["levels"]
    assert killed["succeeded"] > 0 and set(killed["failed"]) <= {"UNAVAILABLE", "CANCELLED"}, killed
    assert killed["window_s"] >= 1.5
    assert killed["throughput_rps"] <= killed["succeeded"] / 1.5 + 0.001  # rounded to 3 decimals
    # Two slots failing for about a second: a handful of tries each (50 ms doubling to 1 s), not thousands.
    assert killed["failed_total"] < 100, killed["failed"]
    assert after["succeeded"] > 0, after  # (failures are possible while the channels reconnect, up to 1 s)
    assert after["server"] is not None and after["server"]["requests"] > 0, after


def test_open_loop_throughput_follows_the_schedule_that_ran(server: ServerThread, tmp_path: Path) -> None:
    """A Poisson schedule that happens to send more than its rate reads as it ran: the window is the level's
    duration (plus the last answer's latency), not requests sent over the nominal rate, which clamped the
    throughput to the rate and stretched the window past --duration."""
    rate, duration = 40.0, 1.0

    def scheduled(seed: int) -> int:
        """Requests the worker sends in the window at this seed: its own arrivals, drawn as it draws them."""
        config = BenchConfig(model="m", mode="open", rates=(rate,), seed=seed, duration_s=duration, warmup_s=0.0)
        (level,) = worker_levels(config, rate, start=0.0)
        target = Target(server="127.0.0.1:1", model="m", version="", inputs={})
        calls = types.SimpleNamespace(aio=None, sync=None)
        run = _LevelRun(0, target, level, None, calls, pb.ModelInferRequest(), [0] * COUNTERS, None)  # type: ignore[arg-type]
        gap, t, n = run._arrivals(), 0.0, 0
        while t < duration:
            n, t = n + 1, t + gap()
        return n

    seed, sent = next((s, n) for s in range(1000) if (n := scheduled(s)) >= 1.3 * rate * duration)
    doc = bench(
        tmp_path, "add_sub", "--server", server.address, "--rate", f"{rate:g}", "--seed", str(seed),
        "--workers", "1", "--duration", f"{duration:g}", "--warmup", "0", "--no-plots",
    )  # fmt: skip
    (level,) = doc["levels"]
    assert level["sent"] == level["succeeded"] == sent, level
    assert duration <= level["window_s"] < 1.2 * duration
    assert level["throughput_rps"] > 1.1 * rate


def _finished(proc: subprocess.Popen[str], timeout: float = 60) -> int:
    """The exit code of a `tensorgate bench` that should end within `timeout`; if it does not, its load processes
    are killed first (they would outlive it, sleeping), then it, and the test fails with its stderr."""
    try:
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            for pid in load_processes(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    return proc.returncode


def test_a_rate_below_one_arrival_per_level_ends_with_the_level(server: ServerThread, tmp_path: Path) -> None:
    """At 0.001/s the next arrival is 1000 s away: the level ends at its end, not after one more arrival gap
    (--rate 1e-9 never ended)."""
    out = tmp_path / "out"
    proc = bench_process(
        server.address, out, "add_sub", "--rate", "0.001", "--arrival", "constant", "--duration", "1",
        "--warmup", "0", "--workers", "2", "--no-plots",
    )  # fmt: skip
    assert _finished(proc) == 0
    (level,) = json.loads((out / "results.json").read_text())["levels"]
    assert level["sent"] == level["succeeded"] == 1  # the first arrival; the second process's is 1000 s away
    assert level["window_s"] == pytest.approx(1.0, abs=0.5)


def test_open_loop_wakes_up_for_its_arrivals_on_time() -> None:
    """asyncio wakes up to 1 ms late (epoll rounds its timeout up to the millisecond), and counted from the arrival
    that lateness read as the server's latency: p50 1.73 ms at 300/s where perf_analyzer measured 0.94 ms. The
    sleep now ends early, and the request counts from when it was sent, never before its window."""

    start = time.monotonic() + 0.05
    level = Level(mode="open", start=start, warmup_s=0.0, duration_s=60.0, max_requests=None, rate=100.0)

    async def wake_ups() -> list[tuple[float, float, Any]]:
        target = Target(server="127.0.0.1:1", model="m", version="", inputs={})
        calls = types.SimpleNamespace(aio=None, sync=None)
        run = _LevelRun(0, target, level, None, calls, pb.ModelInferRequest(), [0] * COUNTERS, None)  # type: ignore[arg-type]
        out = []
        for i in range(40):
            t = start + 0.01 * i
            sent_at = await run._wait_for(t)
            out.append((t, time.monotonic(), sent_at))
        assert run.sent == 40
        return out

    wakes = asyncio.run(wake_ups())
    on_time = sum(woke <= t for t, woke, _ in wakes)
    assert on_time >= 1, wakes  # one is enough to tell (a loaded machine delays most); before, never on time
    for t, woke, sent_at in wakes:
        assert level.window_start <= sent_at <= min(t, max(woke, level.window_start))


def test_a_rate_the_load_process_cannot_send_ends_with_the_level(server: ServerThread, tmp_path: Path) -> None:
    """--rate 1e9 with 10 in flight: the process walked its schedule one arrival at a time without yielding, so no
    answer was read until the schedule caught up with the clock (minutes here). Behind its schedule, it reads the
    answers as they come, drops what the full cap cannot take, and the level ends on time."""
    out = tmp_path / "out"
    proc = bench_process(
        server.address, out, "add_sub", "--rate", "1e9", "--max-in-flight", "10", "--duration", "1",
        "--warmup", "0.5", "--workers", "1", "--no-plots",
    )  # fmt: skip
    assert _finished(proc) == 0
    doc = json.loads((out / "results.json").read_text())
    (level,) = doc["levels"]
    assert_consistent(doc)
    assert level["succeeded"] > 10, level  # more than the cap: answers were read while behind
    assert level["sent"] == pytest.approx(1e9, rel=0.1) and level["dropped"] > 0.9 * level["sent"], level
    assert level["window_s"] == pytest.approx(1.0, abs=0.5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(("--duration", "nan"), "--duration must be a finite number, got nan", id="duration-nan"),
        pytest.param(("--warmup", "inf"), "--warmup must be a finite number, got inf", id="warmup-inf"),
        pytest.param(("--timeout", "nan"), "--timeout must be a finite number, got nan", id="timeout-nan"),
        pytest.param(("--rate", "100,nan"), "--rate '100,nan': expected positive finite numbers", id="rate-nan"),
        pytest.param(("--rate", "inf"), "--rate 'inf': expected positive finite numbers", id="rate-inf"),
    ],
)
def test_settings_that_are_not_finite_numbers_are_refused(
    tmp_path: Path, capsys: Any, args: tuple[str, ...], message: str
) -> None:
    """nan passes every comparison (nan <= 0 is False): a level of nan seconds never ended."""
    out = tmp_path / "out"
    assert main(["bench", "add_sub", "--server", "127.0.0.1:1", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"tensorgate bench: {message}\n"
    assert not out.exists()


@pytest.mark.parametrize(
    "load",
    [
        pytest.param(("--concurrency", "1,2"), id="closed-unary"),
        pytest.param(("--concurrency", "2", "--streaming"), id="closed-stream"),
        pytest.param(("--rate", "200"), id="open-unary"),
    ],
)
def test_a_run_where_every_request_fails_says_why(
    server: ServerThread, tmp_path: Path, capsys: Any, load: tuple[str, ...]
) -> None:
    """Every request refused (a priority the server does not take): the table and reports are written, plots are
    skipped (no latency to draw; they used to crash on it), the first message of the code says why, and the exit
    status is 1."""
    out = tmp_path / "out"
    args = ["bench", "add_sub", "--server", server.address, "--priority", "-1", *load, "--duration", "0.3"]
    assert main([*args, "--warmup", "0", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("\n| ") == 1 + (2 if load[1] == "1,2" else 1)
    code = "STREAM_ERROR" if "--streaming" in load else "INVALID_ARGUMENT"
    assert re.search(rf"tensorgate bench: {code}: .*'priority'", captured.err), captured.err
    assert "tensorgate bench: no request succeeded" in captured.err
    assert "Traceback" not in captured.err
    doc = json.loads((out / "results.json").read_text())
    for level in doc["levels"]:
        assert level["succeeded"] == 0 and set(level["failed"]) == {code}
        assert "'priority'" in level["failed_messages"][code]
    assert "latency of the requests that succeeded" in (out / "report.md").read_text()
    assert not list(out.glob("*.png"))


def test_plots_leave_out_levels_where_nothing_succeeded(tmp_path: Path) -> None:
    latency = dict.fromkeys(("p50", "p90", "p95", "p99", "p99_9", "max", "mean"), 2.0)
    timeline = [{"t_s": 0.0, "requests": 10, "p50_ms": 2.0, "p99_ms": 3.0}]
    measured = {"mode": "closed", "concurrency": 1, "throughput_rps": 500.0, "latency_ms": latency,
                "timeline": timeline, "window_s": 1.0}  # fmt: skip
    failed = {**measured, "concurrency": 2, "latency_ms": dict.fromkeys(latency), "timeline": []}
    config = {"model": "m", "mode": "closed", "batch": 1, "streaming": False}
    paths = write_plots({"config": config, "levels": [measured, failed]}, tmp_path)
    assert [p.name for p in paths] == ["latency_vs_throughput.png", "latency_over_time.png"]
    for path in paths:
        assert_png(path)
    assert write_plots({"config": config, "levels": [failed]}, tmp_path / "none") == []


def test_a_plot_that_cannot_be_written_costs_one_line(server: ServerThread, tmp_path: Path) -> None:
    """Plots come after the table and the reports: a plot that fails (here its file is a folder) is one line of
    warning, not a traceback that loses the table."""
    out = tmp_path / "out"
    (out / "latency_vs_throughput.png").mkdir(parents=True)
    proc = bench_process(server.address, out, "add_sub", "--concurrency", "1", "--duration", "0.3", "--warmup", "0")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "| c=1 |" in stdout
    (warning,) = [line for line in stderr.splitlines() if "no plots" in line]
    assert warning.startswith("tensorgate bench: no plots: IsADirectoryError:"), stderr
    assert "Traceback" not in stderr
    assert_consistent(json.loads((out / "results.json").read_text()))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param("[1, 2]", "not a tensorgate bench result (format 'list')", id="a-list"),
        pytest.param('{"format": "tensorgate-bench/1"}', "'levels' is None, not a list of levels", id="no-levels"),
        pytest.param('{"format": "tensorgate-bench/1", "levels": ["x"]}', "level 1: 'x' is not an object",
                     id="level-not-an-object"),
        pytest.param('{"format": "tensorgate-bench/1", "levels": [{"mode": "closed", "concurrency": 1}]}',
                     "level 1: throughput_rps None is not a number", id="level-without-throughput"),
        pytest.param("{", "not a tensorgate bench result: Expecting property name", id="not-json"),
    ],
)  # fmt: skip
def test_compare_refuses_a_file_that_is_not_a_result(tmp_path: Path, capsys: Any, content: str, problem: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"format": "tensorgate-bench/1", "levels": []}))
    assert main(["bench", "compare", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tensorgate bench compare: {bad}: {problem}") and err.count("\n") == 1, err


def test_bench_over_mutual_tls_takes_the_tls_flags_as_infer_does(repo: Path, tmp_path: Path, capsys: Any) -> None:
    """bench builds its TLS settings the way infer, health and the other commands do (tls_from_args): a sweep over
    mTLS works, and an unreadable file is the same usage error, naming the flag, from both."""
    pki = Pki(tmp_path / "pki")
    cert, key = pki.client("bench")
    tls = ["--tls-ca", str(pki.ca_path), "--tls-cert", str(cert), "--tls-key", str(key)]
    with ServerThread(repo, **pki.server_settings()) as server:
        load = ["--duration", "1", "--warmup", "0", "--concurrency", "1", "--workers", "1", "--no-plots"]
        doc = bench(tmp_path, "add_sub", "--server", server.address, *tls, *load)
        (level,) = doc["levels"]
        assert doc["config"]["tls"] is True and level["succeeded"] > 0 and level["failed_total"] == 0
        capsys.readouterr()
        missing = tmp_path / "missing.pem"
        bad = ["--tls-ca", str(pki.ca_path), "--tls-cert", str(missing), "--tls-key", str(key)]
        errors = []
        bench_args, infer_args = ["--out", str(tmp_path / "unused")], ["--input", "INPUT0=[[1]]"]
        for command in (["bench", "add_sub", *bench_args], ["infer", "add_sub", *infer_args]):
            assert main([*command, "--server", server.address, *bad]) == 2
            errors.append(capsys.readouterr().err)
    assert errors == [
        f"tensorgate bench: --tls-cert {missing}: No such file or directory\n",
        f"tensorgate infer: --tls-cert {missing}: No such file or directory\n",
    ]
    assert not (tmp_path / "unused").exists()


def test_startup_errors_leave_no_output_folder_and_name_the_flag(
    server: ServerThread, tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "new" / "out"
    assert main(["bench", "nope", "--server", server.address, "--out", str(out)]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    missing = tmp_path / "ca.pem"
    assert main(["bench", "add_sub", "--server", server.address, "--tls-ca", str(missing), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"tensorgate bench: --tls-ca {missing}: No such file or directory\n"
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("")
    assert main(["bench", "add_sub", "--server", server.address, "--out", str(tmp_path / "file" / "out")]) == 2
    assert "--out" in capsys.readouterr().err
