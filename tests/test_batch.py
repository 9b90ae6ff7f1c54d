"""The pure half of dynamic batching: which requests form a batch, how inputs stack and outputs split back.

Plain synchronous tests of server/scheduling/batch.py and policy.py; the timing half is in test_scheduler.py.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from google.protobuf import text_format
from hypothesis import given
from hypothesis import strategies as st

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.errors import InvalidConfigError
from tensorgate.server.scheduling.batch import (
    JOIN_MAX_BYTES,
    concat_rows,
    plan_batch,
    split_outputs,
    stack_inputs,
)
from tensorgate.server.scheduling.policy import SchedulingPolicy

# ----- plan_batch ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "max_batch_size", "preferred", "expired", "expected"),
    [
        pytest.param([], 8, (), True, 0, id="empty-queue"),
        pytest.param([], 8, (4,), False, 0, id="empty-queue-preferred"),
        pytest.param([1, 1, 1, 1], 4, (), False, 4, id="full-batch-sends-at-once"),
        pytest.param([1, 1, 1, 1, 1, 1], 4, (), False, 4, id="full-batch-leaves-the-rest"),
        pytest.param([2, 3], 4, (), False, 1, id="next-request-does-not-fit"),
        pytest.param([3, 3, 1], 4, (), False, 1, id="no-skipping-ahead-to-a-fitting-request"),
        pytest.param([5], 4, (), True, 0, id="request-larger-than-max"),
        pytest.param([1, 1], 8, (), False, 0, id="partial-waits-for-delay"),
        pytest.param([1, 1], 8, (), True, 2, id="partial-leaves-after-delay"),
        pytest.param([4], 4, (), False, 1, id="one-request-fills-the-batch"),
        pytest.param([1, 1, 1], 8, (3,), False, 3, id="preferred-reached"),
        pytest.param([1, 1], 8, (3,), False, 0, id="preferred-not-yet-reached"),
        pytest.param([1, 1, 1, 1, 1], 8, (3,), False, 3, id="preferred-cut-from-a-longer-queue"),
        pytest.param([1, 1, 1, 1, 1, 1], 8, (2, 4), False, 4, id="largest-preferred-wins"),
        pytest.param([1, 1], 8, (2, 4), False, 2, id="largest-preferred-the-queue-allows-leaves-at-once"),
        pytest.param([1, 1], 8, (2, 4), True, 2, id="smaller-preferred-after-delay"),
        pytest.param([1, 1, 1], 8, (2, 4), True, 3, id="no-preferred-fits-after-delay"),
        pytest.param([3, 3], 8, (4,), False, 1, id="multi-row-cut-before-overshooting-preferred"),
        pytest.param([3, 3], 8, (4,), True, 2, id="multi-row-after-delay-sends-what-fits"),
        pytest.param([2, 3, 2], 8, (4,), False, 1, id="multi-row-past-preferred-no-exact-cuts-before"),
        pytest.param([3, 3, 3], 16, (4, 8), False, 2, id="cut-before-passing-the-largest-preferred"),
        pytest.param([2, 2, 3], 8, (4, 6), False, 2, id="multi-row-exact-preferred-prefix"),
        pytest.param([3, 1, 3], 4, (2,), False, 1, id="full-batch-no-preferred-prefix-cuts-before"),
        pytest.param([6, 1], 8, (4,), False, 1, id="first-request-past-the-largest-preferred-leaves-alone"),
        pytest.param([3, 1, 1], 8, (2, 8), False, 0, id="multi-row-below-largest-waits"),
    ],
)
def test_plan_batch(rows: list[int], max_batch_size: int, preferred: tuple[int, ...], expired: bool, expected: int):
    assert plan_batch(rows, max_batch_size, preferred, expired) == expected


@pytest.mark.parametrize(
    ("rows", "max_batch_size", "preferred", "expected"),
    [
        pytest.param([1] * 6, 16, (4, 8), 4, id="preferred-cut-even-without-delay"),
        pytest.param([1, 1], 8, (4,), 2, id="no-preferred-size-sends-what-is-there"),
        pytest.param([1, 1], 8, (), 2, id="no-preferred-sizes"),
        pytest.param([3, 3], 8, (4,), 1, id="cut-before-overshooting"),
    ],
)
def test_plan_batch_without_a_delay(rows: list[int], max_batch_size: int, preferred: tuple[int, ...], expected: int):
    """max_queue_delay 0: nothing waits, but a preferred size still cuts the batch (as in Triton)."""
    for expired in (False, True):  # an expiry means nothing without a delay
        assert plan_batch(rows, max_batch_size, preferred, expired, has_delay=False) == expected


def test_a_request_of_another_shape_next_closes_the_batch() -> None:
    assert plan_batch([1, 1], 8, (), False) == 0
    assert plan_batch([1, 1], 8, (), False, closed=True) == 2
    assert plan_batch([1, 1, 1, 1, 1], 8, (4,), False, closed=True) == 4, "a preferred cut still comes first"


@given(
    rows=st.lists(st.integers(1, 16), max_size=24),
    max_batch_size=st.integers(1, 32),
    preferred=st.lists(st.integers(1, 32), max_size=4).map(lambda p: tuple(sorted(set(p)))),
    expired=st.booleans(),
    has_delay=st.booleans(),
)
def test_plan_batch_properties(
    rows: list[int], max_batch_size: int, preferred: tuple[int, ...], expired: bool, has_delay: bool
):
    preferred = tuple(p for p in preferred if p <= max_batch_size)
    count = plan_batch(rows, max_batch_size, preferred, expired, has_delay=has_delay)
    assert 0 <= count <= len(rows)
    assert sum(rows[:count]) <= max_batch_size
    if rows and rows[0] <= max_batch_size and (expired or not has_delay):
        assert count > 0, "an expired delay, or none at all, always sends something"
    if count and (expired and has_delay):
        fits = 0
        while fits < len(rows) and sum(rows[: fits + 1]) <= max_batch_size:
            fits += 1
        assert count == fits, "once the delay is over, everything that fits leaves"
    if count and not (expired and has_delay) and sum(rows[:count]) not in (preferred or (max_batch_size,)):
        # Not a preferred size: a cut before passing the largest one, or all that fits.
        assert count == len(rows) or sum(rows[: count + 1]) > max(preferred or (max_batch_size,))
    if count == 0 or not rows:
        return
    # The stacked batch splits back into each request's exact rows.
    batch_rows = rows[:count]
    width = 3
    inputs = [
        {"x": np.arange(start * width, (start + n) * width).reshape(n, width)}
        for start, n in zip(np.cumsum([0, *batch_rows[:-1]]), batch_rows, strict=True)
    ]
    stacked = stack_inputs(inputs)
    assert stacked["x"].shape == (sum(batch_rows), width)
    parts = split_outputs({"y": stacked["x"]}, batch_rows, [["y"]] * count)
    assert len(parts) == count
    for part, request in zip(parts, inputs, strict=True):
        np.testing.assert_array_equal(part["y"], request["x"])


# ----- stack_inputs ----------------------------------------------------------------------------------------------


def test_stack_single_request_is_not_copied():
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.arange(2, dtype=np.int64).reshape(2, 1)
    out = stack_inputs([{"A": a, "B": b}])
    assert out["A"] is a and out["B"] is b


def test_stack_copies_each_input_once_into_a_new_writable_array():
    r1 = {"A": np.zeros((1, 4), np.float32), "B": np.ones((1, 2), np.int32)}
    r2 = {"A": np.full((2, 4), 2, np.float32), "B": np.full((2, 2), 3, np.int32)}
    r3 = {"A": np.full((3, 4), 4, np.float32), "B": np.full((3, 2), 5, np.int32)}
    out = stack_inputs([r1, r2, r3])
    assert out["A"].shape == (6, 4) and out["B"].shape == (6, 2)
    assert out["A"].dtype == np.float32 and out["B"].dtype == np.int32
    np.testing.assert_array_equal(out["A"][:, 0], [0, 2, 2, 4, 4, 4])
    np.testing.assert_array_equal(out["B"][:, 0], [1, 3, 3, 5, 5, 5])
    assert not any(np.shares_memory(out["A"], r["A"]) for r in (r1, r2, r3))
    assert out["A"].flags.writeable and out["A"].flags.c_contiguous


@pytest.mark.parametrize(
    "dtype", [np.float32, np.float64, np.int8, np.int64, np.uint16, np.bool_, np.float16, ml_dtypes.bfloat16]
)
def test_concat_rows_is_np_concatenate_for_every_tensor_type(dtype: type) -> None:
    rng = np.random.default_rng(3)
    pieces: list[np.ndarray] = [(rng.standard_normal((n, 2, 3)) * 4).astype(dtype) for n in (1, 0, 3, 2)]
    joined, expected = concat_rows(pieces), np.concatenate(pieces)
    assert joined.dtype == expected.dtype and joined.shape == expected.shape == (6, 2, 3)
    np.testing.assert_array_equal(joined.astype(np.float64), expected.astype(np.float64))


@pytest.mark.parametrize("dtype", [np.float32, np.int64, ml_dtypes.bfloat16, object])
def test_concat_rows_pads_with_copies_of_the_last_row(dtype: type) -> None:
    a: np.ndarray = np.arange(6).reshape(3, 2).astype(dtype)
    padded = concat_rows([a[:1], a[1:2]], rows=5)
    assert padded.dtype == a.dtype and padded.shape == (5, 2)
    assert padded.tolist() == [a[0].tolist()] + [a[1].tolist()] * 4
    assert concat_rows([a], rows=2).shape == (3, 2)  # never cut
    assert concat_rows([np.zeros((0, 2, 0), np.float32)] * 2, rows=4).shape == (0, 2, 0)  # nothing to repeat


def test_concat_rows_lets_go_of_the_gil_for_a_large_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above JOIN_MAX_BYTES, numpy's copy (which lets other threads run) is worth its hand-off: joined as bytes, the
    event loop would wait out the whole copy."""
    calls: list[int] = []
    real = np.concatenate

    def counting(arrays, *args, **kwargs):
        calls.append(len(arrays))
        return real(arrays, *args, **kwargs)

    monkeypatch.setattr(np, "concatenate", counting)
    row = JOIN_MAX_BYTES // 4 // 8
    small, large = np.ones((2, row), np.float32), np.ones((5, row), np.float32)
    assert concat_rows([small, small]).shape == (4, row) and calls == []
    assert concat_rows([small], rows=8).shape == (8, row) and calls == []  # exactly JOIN_MAX_BYTES
    assert concat_rows([large, large]).shape == (10, row) and calls == [2]
    assert concat_rows([small], rows=9).shape == (9, row) and len(calls) == 3  # padding counts too


def test_concat_rows_leaves_what_it_cannot_join_to_np_concatenate():
    text = [np.array([[b"a"]], dtype=object), np.array([[b"bc"], [b""]], dtype=object)]
    assert concat_rows(text).tolist() == [[b"a"], [b"bc"], [b""]]
    strided = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]  # not contiguous
    np.testing.assert_array_equal(concat_rows([strided, strided[:1]]), np.concatenate([strided, strided[:1]]))
    with pytest.raises(ValueError):  # numpy's own message for pieces that do not stack
        concat_rows([np.zeros((1, 4), np.float32), np.zeros((1, 3), np.float32)])


# ----- split_outputs ---------------------------------------------------------------------------------------------


def test_split_gives_views_with_exact_rows():
    out = np.arange(24).reshape(6, 4)
    parts = split_outputs({"Y": out}, [1, 2, 3], [["Y"], ["Y"], ["Y"]])
    assert [p["Y"].shape for p in parts] == [(1, 4), (2, 4), (3, 4)]
    for p in parts:
        assert np.shares_memory(p["Y"], out), "a view, not a copy"
    np.testing.assert_array_equal(parts[0]["Y"], out[0:1])
    np.testing.assert_array_equal(parts[1]["Y"], out[1:3])
    np.testing.assert_array_equal(parts[2]["Y"], out[3:6])


def test_split_only_requested_outputs():
    outputs = {"A": np.arange(3), "B": np.arange(3) * 10}
    parts = split_outputs(outputs, [1, 2], [["B"], ["A", "B"]])
    assert list(parts[0]) == ["B"]
    assert list(parts[1]) == ["A", "B"]
    np.testing.assert_array_equal(parts[0]["B"], [0])
    np.testing.assert_array_equal(parts[1]["A"], [1, 2])
    np.testing.assert_array_equal(parts[1]["B"], [10, 20])


def test_split_single_request_passes_through():
    y = np.arange(4).reshape(2, 2)
    [part] = split_outputs({"Y": y, "Z": np.zeros(2)}, [2], [["Y"]])
    assert list(part) == ["Y"] and part["Y"] is y


@pytest.mark.parametrize(
    "outputs",
    [
        pytest.param({"Y": np.zeros((4, 2))}, id="too-few-rows"),
        pytest.param({"Y": np.zeros((6, 2))}, id="too-many-rows"),
        pytest.param({"Y": np.zeros(())}, id="scalar"),
        pytest.param({"Y": np.zeros((5, 2)), "Z": np.zeros((1,))}, id="one-output-malformed"),
    ],
)
def test_split_malformed_rows(outputs: dict[str, np.ndarray]):
    with pytest.raises(ValueError, match="expected 5 rows"):
        split_outputs(outputs, [2, 3], [["Y"], ["Y"]])


# ----- SchedulingPolicy.from_config ------------------------------------------------------------------------------


def _config(text: str) -> mc.ModelConfig:
    return text_format.Parse('name: "m"\n' + text, mc.ModelConfig())


def test_policy_without_dynamic_batching():
    policy = SchedulingPolicy.from_config(_config("max_batch_size: 8"))
    assert policy.batching is False
    assert policy.max_queue_delay_ns == 0 and policy.preferred_batch_sizes == ()
    assert policy.priority_levels == 1 and policy.default_priority == 1


def test_policy_dynamic_batching_without_batch_dimension():
    policy = SchedulingPolicy.from_config(_config("max_batch_size: 0\ndynamic_batching {}"))
    assert policy.batching is False


def test_policy_reads_dynamic_batching():
    policy = SchedulingPolicy.from_config(
        _config(
            """
max_batch_size: 16
dynamic_batching {
  preferred_batch_size: [ 8, 4, 8 ]
  max_queue_delay_microseconds: 1500
  priority_levels: 3
  default_priority_level: 2
  default_queue_policy { max_queue_size: 5 default_timeout_microseconds: 100 timeout_action: DELAY }
  priority_queue_policy { key: 1 value { max_queue_size: 7 allow_timeout_override: true } }
}
"""
        )
    )
    assert policy.batching is True
    assert policy.max_batch_size == 16
    assert policy.preferred_batch_sizes == (4, 8)
    assert policy.max_queue_delay_ns == 1_500_000
    assert (policy.priority_levels, policy.default_priority) == (3, 2)
    level1, level2, level3 = (policy.queue_policy(level) for level in (1, 2, 3))
    assert (level1.max_queue_size, level1.timeout_ns, level1.allow_timeout_override) == (7, 0, True)
    assert level2 == level3
    assert (level2.max_queue_size, level2.timeout_ns, level2.delay_on_timeout) == (5, 100_000, True)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param("dynamic_batching { preferred_batch_size: [ 9 ] }", "preferred_batch_size 9", id="pref-over-max"),
        pytest.param("dynamic_batching { preferred_batch_size: [ 0 ] }", "preferred_batch_size 0", id="pref-zero"),
        pytest.param("dynamic_batching { preferred_batch_size: [ -2 ] }", "preferred_batch_size -2", id="pref-neg"),
        pytest.param(
            "dynamic_batching { priority_levels: 2 default_priority_level: 3 }",
            "default_priority_level 3",
            id="default-level-over",
        ),
        pytest.param("dynamic_batching { priority_levels: 2 }", "default_priority_level 0", id="default-level-missing"),
        pytest.param(
            "dynamic_batching { priority_levels: 2 default_priority_level: 1"
            " priority_queue_policy { key: 3 value { max_queue_size: 1 } } }",
            "priority_queue_policy level 3",
            id="queue-policy-level-over",
        ),
    ],
)
def test_policy_invalid(text: str, match: str):
    with pytest.raises(InvalidConfigError, match=match) as info:
        SchedulingPolicy.from_config(_config("max_batch_size: 8\n" + text))
    assert info.value.model == "m"
