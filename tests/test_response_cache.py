"""Triton's response cache: a repeated request is answered without running the model, and counted as Triton counts
it. Real servers, real ONNX models, unmodified tritonclient; whether the model ran is read from ModelStatistics
(execution_count), and a version reloaded with another model file shows whether an old answer leaks through."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tensorgate.server.pipeline.cache import ARRAY_BYTES, ENTRY_BYTES, HEAVY_COST, ResponseCache, heavy
from tensorgate.server.repository.manager import ModelRepository
from tests.onnx_models import (
    ADD_SUB_CONFIG,
    add_sub_model,
    broadcast_add_model,
    identity_model,
    scale_model,
    write_config,
)
from tests.scraping import scrape
from tests.serving import ServerThread
from tests.test_ensemble import ensemble_repository
from tests.test_infer import triton_inputs

CACHED = 'name: "cached"\n' + ADD_SUB_CONFIG + "response_cache { enable: true }\n"


def _inputs(a: np.ndarray, b: np.ndarray) -> list[tc.InferInput]:
    return triton_inputs({"INPUT0": a, "INPUT1": b})


def _stats(client: tc.InferenceServerClient, model: str) -> dict[str, int]:
    s = client.get_inference_statistics(model).model_stats[0]
    st = s.inference_stats
    assert st.queue.count == st.success.count  # as Triton's (perf_analyzer relies on it)
    return {
        "success": st.success.count,
        "hit": st.cache_hit.count,
        "miss": st.cache_miss.count,
        "inferences": s.inference_count,
        "executions": s.execution_count,
    }


def _repository(root: Path) -> Path:
    add_sub_model(root / "cached" / "1" / "model.onnx")
    write_config(root, "cached", CACHED)
    add_sub_model(root / "plain" / "1" / "model.onnx")
    write_config(root, "plain", 'name: "plain"\n' + ADD_SUB_CONFIG)
    return root


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(_repository(tmp_path / "models"), response_cache_bytes=1 << 20) as s:
        yield s


def test_a_repeated_request_is_answered_without_running_the_model(served: ServerThread) -> None:
    c = tc.InferenceServerClient(served.address)
    try:
        a, b = np.arange(32, dtype=np.float32).reshape(2, 16), np.ones((2, 16), np.float32)
        first = c.infer("cached", _inputs(a, b))
        again = c.infer("cached", _inputs(a, b))
        for result in (first, again):
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        assert _stats(c, "cached") == {"success": 2, "hit": 1, "miss": 1, "inferences": 2, "executions": 1}

        # Other bytes, another shape with the same bytes, other outputs asked for: each its own entry.
        c.infer("cached", _inputs(a, b + 1))
        c.infer("cached", _inputs(a.reshape(1, 32)[:, :16], b[:1]))
        only = c.infer("cached", _inputs(a, b), outputs=[tc.InferRequestedOutput("OUTPUT1")])
        np.testing.assert_array_equal(only.as_numpy("OUTPUT1"), a - b)
        assert only.as_numpy("OUTPUT0") is None
        assert _stats(c, "cached")["miss"] == 4 and _stats(c, "cached")["hit"] == 1
        # Classification of a cached answer (the classes are made from the cached tensor, not kept in the cache).
        c.infer("cached", _inputs(a, b), outputs=[tc.InferRequestedOutput("OUTPUT0")])
        top = c.infer("cached", _inputs(a, b), outputs=[tc.InferRequestedOutput("OUTPUT0", class_count=1)])
        assert top.as_numpy("OUTPUT0").tolist() == [[b"16.000000:15"], [b"32.000000:15"]]
        assert (_stats(c, "cached")["hit"], _stats(c, "cached")["miss"]) == (2, 5)

        # A model whose config does not enable the cache runs every time.
        for _ in range(2):
            c.infer("plain", _inputs(a, b))
        assert _stats(c, "plain")["executions"] == 2 and _stats(c, "plain")["hit"] == 0
    finally:
        c.close()
    samples = scrape(f"http://127.0.0.1:{served.app.metrics_port}/metrics")
    key = {("model", "cached"), ("version", "1")}
    assert samples[("tensorgate_response_cache_lookups_total", frozenset(key | {("result", "hit")}))] == 2
    assert samples[("tensorgate_response_cache_lookups_total", frozenset(key | {("result", "miss")}))] == 5
    # Five answers kept, nothing evicted: both [2, 16] FP32 outputs twice (2 x 256 bytes), both [1, 16] outputs
    # (128), and one [2, 16] output twice (2 x 128); and the overhead of the 5 entries and their 8 arrays.
    expected = 896 + 5 * ENTRY_BYTES + 8 * ARRAY_BYTES
    assert samples[("tensorgate_response_cache_bytes", frozenset())] == expected
    assert samples[("tensorgate_response_cache_evictions_total", frozenset())] == 0


def test_a_miss_counts_whether_or_not_the_model_then_answers(tmp_path: Path) -> None:
    """Every lookup is a hit or a miss, as Triton counts them (it reports a miss even when nothing could be
    inserted): a request that missed and then failed in the model is a miss too. Only the misses the model
    answered were counted, so hits and misses fell short of the lookups."""
    root = tmp_path / "models"
    broadcast_add_model(root / "broadcast" / "1" / "model.onnx")  # fails in onnxruntime for lengths 3 and 5
    write_config(root, "broadcast", "max_batch_size: 0\nresponse_cache { enable: true }\n")
    with ServerThread(root, response_cache_bytes=1 << 20) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            three = np.arange(3, dtype=np.float32)
            for _ in range(2):  # not cached (nothing to keep), so the second is a miss again
                with pytest.raises(InferenceServerException) as info:
                    c.infer("broadcast", triton_inputs({"INPUT0": three, "INPUT1": np.ones(5, np.float32)}))
                assert info.value.status() == "StatusCode.INTERNAL"
            for _ in range(2):
                good = c.infer("broadcast", triton_inputs({"INPUT0": three, "INPUT1": np.ones(3, np.float32)}))
                np.testing.assert_array_equal(good.as_numpy("OUTPUT0"), three + 1)
            stats = _stats(c, "broadcast")
            failures = c.get_inference_statistics("broadcast").model_stats[0].inference_stats.fail.count
        finally:
            c.close()
        samples = scrape(f"http://127.0.0.1:{s.app.metrics_port}/metrics")
    assert (stats["success"], failures, stats["executions"]) == (2, 2, 1)
    assert (stats["hit"], stats["miss"]) == (1, 3)  # four lookups
    key = {("model", "broadcast"), ("version", "1")}
    assert samples[("tensorgate_response_cache_lookups_total", frozenset(key | {("result", "hit")}))] == 1
    assert samples[("tensorgate_response_cache_lookups_total", frozenset(key | {("result", "miss")}))] == 3


def test_without_a_server_cache_the_setting_does_nothing(tmp_path: Path) -> None:
    with ServerThread(_repository(tmp_path / "models")) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            a = np.ones((1, 16), np.float32)
            for _ in range(2):
                c.infer("cached", _inputs(a, a))
            assert _stats(c, "cached")["executions"] == 2 and _stats(c, "cached")["miss"] == 0
        finally:
            c.close()


@pytest.mark.parametrize("cache", [pytest.param(False, id="no-server-cache"), pytest.param(True, id="server-cache")])
async def test_enabling_the_cache_on_a_server_without_one_warns_at_each_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cache: bool
) -> None:
    """`response_cache { enable: true }` without --response-cache-bytes does nothing: the load says so, naming the
    model and the flag, once per load; a model that does not ask, or a server with a cache, says nothing."""
    caplog.set_level(logging.WARNING, logger="tensorgate.server.repository.manager")
    repository = ModelRepository(_repository(tmp_path / "models"), response_cache=cache)
    try:
        await repository.load_many(["cached", "plain"])
        await repository.load("cached")  # a reload is a load
    finally:
        await repository.close()
    said = [r.getMessage() for r in caplog.records if "response_cache" in r.getMessage()]
    expected = "model 'cached' enables response_cache, but the server has no response cache"
    assert [expected in m and "--response-cache-bytes" in m for m in said] == ([] if cache else [True, True]), said


def test_a_version_reloaded_with_new_files_never_answers_with_old_outputs(tmp_path: Path) -> None:
    root = tmp_path / "models"
    scale_model(root / "scale" / "1" / "model.onnx", 2.0)
    write_config(root, "scale", "max_batch_size: 8\nresponse_cache { enable: true }\n")
    with ServerThread(root, model_control_mode="poll", repository_poll_secs=0.2, response_cache_bytes=1 << 20) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            x = np.ones((1, 4), np.float32)
            inp = tc.InferInput("INPUT0", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            assert c.infer("scale", [inp]).as_numpy("OUTPUT0").tolist() == [[2.0] * 4]
            staged = tmp_path / "staged"
            scale_model(staged / "model.onnx", 3.0)
            shutil.move(str(staged / "model.onnx"), str(root / "scale" / "1" / "model.onnx"))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if c.infer("scale", [inp]).as_numpy("OUTPUT0").tolist() == [[3.0] * 4]:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the reloaded version kept answering from the old version's cache entry")
        finally:
            c.close()


def test_answers_without_elements_still_take_room() -> None:
    """An entry costs memory beyond its tensors (key, node, arrays): that is counted, so answers with no elements
    (a detector that found nothing, [0, 4]) are evicted like any other. They counted 0 bytes and piled up."""
    cache = ResponseCache(capacity_bytes=10 * (ENTRY_BYTES + ARRAY_BYTES))
    nothing = {"BOXES": np.zeros((0, 4), np.float32)}
    for i in range(100):
        key = ResponseCache.key(("m", 1, "s"), {"x": np.full(1, i, np.float32)}, {"x": "FP32"}, ["BOXES"])
        assert cache.put(key, cache.entry(nothing))
    assert (len(cache), cache.evictions, cache.used) == (10, 90, cache.capacity)


def test_the_least_recently_used_entries_make_room() -> None:
    entry = ENTRY_BYTES + ARRAY_BYTES + 64
    cache = ResponseCache(capacity_bytes=3 * entry)
    row = {"OUT": np.zeros(16, np.float32)}  # 64 bytes
    keys = [
        ResponseCache.key(("m", 1, "s"), {"x": np.full(1, i, np.float32)}, {"x": "FP32"}, ["OUT"]) for i in range(4)
    ]
    for k in keys[:3]:
        assert cache.put(k, cache.entry(row))
    assert cache.get(keys[0]) is not None  # now the most recently used
    assert cache.put(keys[3], cache.entry(row))
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and cache.get(keys[3]) is not None
    assert (cache.used, cache.evictions, len(cache)) == (3 * entry, 1, 3)
    assert cache.entry({"OUT": np.zeros(1024, np.float32)}) is None  # larger than the whole cache
    kept = cache.get(keys[0])
    assert kept is not None and not kept["OUT"].flags.writeable
    text = {"OUT": np.array([b"ab", b""], dtype=object)}
    assert ResponseCache.key(("m", 1, "s"), text, {"OUT": "BYTES"}, []) != ResponseCache.key(
        ("m", 1, "s"), {"OUT": np.array([b"a", b"b"], dtype=object)}, {"OUT": "BYTES"}, []
    )


def test_large_tensors_are_hashed_and_copied_off_the_event_loop() -> None:
    """The rule, in process: BYTES count ~100 bytes an element (the work per element), fixed-size tensors their
    bytes; past HEAVY_COST the key and the entry's copies go to a worker thread."""
    elements = HEAVY_COST // 100
    assert not heavy([np.empty(elements, object)]) and heavy([np.empty(elements + 1, object)])
    assert not heavy([np.zeros(HEAVY_COST // 4, np.float32)]) and heavy([np.zeros(HEAVY_COST // 4 + 1, np.float32)])
    assert heavy([np.zeros(HEAVY_COST // 8, np.float32), np.zeros(HEAVY_COST // 8 + 1, np.float32)])
    # The key frames BYTES exactly whichever way it hashes them: str elements key as their UTF-8 bytes.
    words = np.array([b"ab", b"", b"c"], dtype=object)
    key = ResponseCache.key(("m", 1, "s"), {"T": words}, {"T": "BYTES"}, [])
    assert key == ResponseCache.key(("m", 1, "s"), {"T": np.array(["ab", "", "c"], dtype=object)}, {"T": "BYTES"}, [])
    assert key != ResponseCache.key(
        ("m", 1, "s"), {"T": np.array([b"a", b"bc", b""], dtype=object)}, {"T": "BYTES"}, []
    )


def test_a_large_text_request_is_cached_exactly(tmp_path: Path) -> None:
    """Over HEAVY_COST, the key and the kept copy are made on a worker thread: the answers stay exact, a repeat
    is a hit, and a request differing in one element is not."""
    root = tmp_path / "models"
    identity_model(root / "text" / "1" / "model.onnx", "BYTES", shape=("batch", "n"))
    write_config(root, "text", 'name: "text"\nmax_batch_size: 2\nresponse_cache { enable: true }\n')
    count = HEAVY_COST // 100 + 7
    words = np.array([[str(i).encode() * (i % 3) for i in range(count)]], dtype=object)
    other = words.copy()
    other[0, -1] = b"changed"
    with ServerThread(root, response_cache_bytes=64 << 20) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            for sent in (words, words, other, other):
                got = c.infer("text", triton_inputs({"INPUT0": sent}), client_timeout=60).as_numpy("OUTPUT0")
                assert got.tolist() == sent.tolist()
            stats = _stats(c, "text")
            assert (stats["hit"], stats["miss"], stats["executions"]) == (2, 2, 2)
        finally:
            c.close()


def test_an_ensemble_answers_from_the_cache_without_running_its_steps(tmp_path: Path) -> None:
    root = ensemble_repository(tmp_path / "models")
    config = root / "pipeline" / "config.pbtxt"
    config.write_text(config.read_text() + "response_cache { enable: true }\n")
    with ServerThread(root, response_cache_bytes=1 << 20) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            a = np.arange(16, dtype=np.float32).reshape(1, 16)
            inputs = triton_inputs({"A": a, "B": a})
            for _ in range(3):
                np.testing.assert_array_equal(c.infer("pipeline", inputs).as_numpy("OUT_SCALED"), 4 * a)
            assert _stats(c, "pipeline")["hit"] == 2
            assert _stats(c, "add_sub")["executions"] == _stats(c, "scale2")["executions"] == 1
        finally:
            c.close()


def test_an_ensemble_step_answers_from_its_model_s_cache(tmp_path: Path) -> None:
    """The ensemble uncached, its first step's model cached: as Triton's composing models, the step is answered
    from that model's cache (counted there as a hit) and the steps after it still run."""
    root = ensemble_repository(tmp_path / "models", add_sub_extra="response_cache { enable: true }\n")
    with ServerThread(root, response_cache_bytes=1 << 20) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            a = np.arange(16, dtype=np.float32).reshape(1, 16)
            for _ in range(3):
                result = c.infer("pipeline", triton_inputs({"A": a, "B": a}))
                np.testing.assert_array_equal(result.as_numpy("OUT_SCALED"), 4 * a)
            c.infer("pipeline", triton_inputs({"A": a, "B": a + 1}))  # other inputs: a miss
            add_sub, scale2, pipeline = (_stats(c, m) for m in ("add_sub", "scale2", "pipeline"))
            assert (add_sub["hit"], add_sub["miss"], add_sub["executions"], add_sub["success"]) == (2, 2, 2, 4)
            assert (scale2["hit"], scale2["executions"], scale2["success"]) == (0, 4, 4)
            assert (pipeline["hit"], pipeline["miss"], pipeline["success"]) == (0, 0, 4)
        finally:
            c.close()


def test_a_model_inside_a_nested_ensemble_reloaded_is_not_answered_for_by_the_cache(tmp_path: Path) -> None:
    root = ensemble_repository(tmp_path / "models")
    (root / "outer" / "1").mkdir(parents=True)
    write_config(
        root,
        "outer",
        """name: "outer"
platform: "ensemble"
max_batch_size: 8
input [ { name: "A" data_type: TYPE_FP32 dims: [ 16 ] }, { name: "B" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 16 ] } ]
ensemble_scheduling { step [ { model_name: "pipeline" model_version: -1
  input_map { key: "A" value: "A" } input_map { key: "B" value: "B" }
  output_map { key: "OUT_SCALED" value: "OUT" } } ] }
response_cache { enable: true }
""",
    )
    with ServerThread(root, model_control_mode="explicit", load_model=["outer"], response_cache_bytes=1 << 20) as s:
        c = tc.InferenceServerClient(s.address)
        try:
            a = np.ones((1, 16), np.float32)
            ins = triton_inputs({"A": a, "B": a})
            assert c.infer("outer", ins).as_numpy("OUT").tolist() == [[4.0] * 16]
            scale_model(tmp_path / "x10" / "model.onnx", 10.0, width=16)
            shutil.move(str(tmp_path / "x10" / "model.onnx"), str(root / "scale2" / "1" / "model.onnx"))
            c.load_model("scale2")  # inside `pipeline`, itself a step of `outer`
            assert c.infer("outer", ins).as_numpy("OUT").tolist() == [[20.0] * 16]
        finally:
            c.close()
