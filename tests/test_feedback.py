"""Feedback: labels join captured predictions by request id, durably, per item in a batch or a stream; the CLI
sends files."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.client import AsyncInferenceClient, InferenceClient
from tensorgate.client._monitoring import FeedbackStatus, Label, MonitoringStub, stream_method
from tensorgate.client.errors import InvalidArgument, NotFound
from tensorgate.protos import monitoring_pb2 as mpb
from tensorgate.protos.service import methods
from tensorgate.server.auth.policy import RPC_GROUPS
from tensorgate.server.monitoring.store import DB_NAME, PredictionStore
from tests.monitoring import digits_repository
from tests.serving import ServerThread

TENSORGATE = str(Path(sys.executable).parent / "tensorgate")
CODES = {c.value[0]: c for c in grpc.StatusCode}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    return digits_repository(tmp_path_factory.mktemp("feedback"))


@pytest.fixture
def served(digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(digits[0], data_dir=tmp_path / "data") as s:
        yield s


def test_unknown_id_is_not_found_for_its_item_only(
    served: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    _, x, y = digits
    with InferenceClient(served.address) as client:
        a = client.infer("digits", {"input": x[:1]}, request_id="a")
        b = client.infer("digits", {"input": x[1:3]})
        statuses = client.submit_feedback_batch("digits", [(a.id, int(y[0])), ("missing", 1), (b.id, y[1:3])])
        quality = client.model_quality("digits")
    assert [s.request_id for s in statuses] == ["a", "missing", b.id]
    assert [s.code for s in statuses] == [grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OK]
    assert "model 'digits'" in statuses[1].message and "'missing'" in statuses[1].message
    assert quality.labelled == 2 and quality.rows == 3


def test_acknowledged_feedback_is_committed(served: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray]) -> None:
    """Once SubmitFeedback answers OK, another connection to the database sees the label (no buffering)."""
    _, x, y = digits
    with InferenceClient(served.address) as client:
        result = client.infer("digits", {"input": x[:4]})
        client.submit_feedback("digits", result.id, y[:4])
        data_dir = served.settings.data_dir
        assert data_dir is not None
        reader = PredictionStore(data_dir / DB_NAME)
        try:
            (stored,) = reader.predictions("digits", labelled_only=True)
        finally:
            reader.close()
    assert stored.id == result.id
    assert stored.label is not None
    np.testing.assert_array_equal(stored.label, y[:4])
    np.testing.assert_array_equal(stored.outputs["label"], result["label"])


def test_text_labels_match_integer_predictions(
    served: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    """A label sent as text ("3") names the same class as the model's INT64 output 3, as drift's categories do; it
    used to be a class of its own, and accuracy 0 without an error."""
    _, x, y = digits
    with InferenceClient(served.address) as client:
        results = [client.infer("digits", {"input": x[i : i + 2]}) for i in range(0, 20, 2)]
        as_text = [(r.id, [str(int(v)) for v in y[i : i + 2]]) for r, i in zip(results, range(0, 20, 2), strict=True)]
        client.submit_feedback_batch("digits", as_text)
        text = client.model_quality("digits")
        client.submit_feedback_batch(
            "digits", [(r.id, y[i : i + 2]) for r, i in zip(results, range(0, 20, 2), strict=True)]
        )
        numbers = client.model_quality("digits")
    predicted = np.concatenate([r["label"].reshape(-1) for r in results])
    assert text.metrics["accuracy"] == numbers.metrics["accuracy"] == pytest.approx(float(np.mean(predicted == y[:20])))
    assert text.metrics["accuracy"] > 0.5
    assert text.class_labels == numbers.class_labels == tuple(str(c) for c in sorted({*predicted, *y[:20]}))


async def test_async_client_feedback_and_late_labels(
    served: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    """Labels may come long after the prediction and be corrected: the last one counts."""
    _, x, y = digits
    async with AsyncInferenceClient(served.address) as client:
        results = [await client.infer("digits", {"input": x[i : i + 1]}) for i in range(10)]
        wrong = (y[:10] + 1) % 10
        for r, label in zip(results, wrong, strict=True):
            await client.submit_feedback("digits", r.id, int(label))
        first = await client.model_quality("digits")
        await client.submit_feedback_batch("digits", [(r.id, int(v)) for r, v in zip(results, y[:10], strict=True)])
        second = await client.model_quality("digits")
        assert await client.alerts("digits") == []
    predicted = np.array([int(r["label"][0, 0]) for r in results])
    assert first.metrics["accuracy"] == pytest.approx(float(np.mean(predicted == wrong)))
    assert second.metrics["accuracy"] == pytest.approx(float(np.mean(predicted == y[:10])))


@pytest.mark.parametrize(
    ("feedback", "needle"),
    [
        pytest.param(mpb.Feedback(values=[1.0]), "needs the request_id", id="no-id"),
        pytest.param(mpb.Feedback(request_id="r"), "needs either values or labels", id="no-label"),
        pytest.param(mpb.Feedback(request_id="r", values=[1.0], labels=["a"]), "exactly one", id="both"),
        pytest.param(mpb.Feedback(request_id="r", values=[float("nan")]), "NaN", id="nan"),
        pytest.param(mpb.Feedback(request_id="r", values=[1.0, 2.0]), "had 1 row(s) but the feedback has 2", id="rows"),
    ],
)
def test_bad_feedback_is_invalid_argument_naming_model_and_problem(
    served: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray], feedback: mpb.Feedback, needle: str
) -> None:
    _, x, _ = digits
    with InferenceClient(served.address) as client:
        client.infer("digits", {"input": x[:1]}, request_id="r")
        with pytest.raises(InvalidArgument) as caught:
            client._call("SubmitFeedback", mpb.SubmitFeedbackRequest(model="digits", feedback=feedback), None)
        # In a batch the same problem fails only its own item.
        (status,) = client._call(
            "SubmitFeedbackBatch", mpb.SubmitFeedbackBatchRequest(model="digits", items=[feedback]), None
        ).statuses
        # In a stream too, and the stream goes on: the good label after it is accepted.
        good = mpb.Feedback(request_id="r", values=[1.0])
        streamed = list(
            stream_method(client._monitoring)(
                iter([mpb.SubmitFeedbackRequest(model="digits", feedback=f) for f in (feedback, good)]), timeout=10
            )
        )
    assert "model 'digits'" in str(caught.value) and needle in str(caught.value)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and needle in status.message
    assert [s.code for s in streamed] == [grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.OK.value[0]]
    assert "model 'digits'" in streamed[0].message and needle in streamed[0].message


def test_unknown_id_alone_is_not_found(served: ServerThread) -> None:
    with InferenceClient(served.address) as client, pytest.raises(NotFound, match="request id 'nope'"):
        client.submit_feedback("digits", "nope", 3)


# ----- SubmitFeedbackStream: one status per item, in order, each once committed ------------------------------------


def test_stream_answers_each_item_in_order_once_committed(
    served: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    """An unknown id and a bad label in the middle fail only their own items; every OK is already in the database
    when it arrives (checked through a second SQLite connection at each acknowledgement)."""
    _, x, y = digits
    data_dir = served.settings.data_dir
    assert data_dir is not None
    with InferenceClient(served.address) as client:
        ids = [client.infer("digits", {"input": x[2 * i : 2 * i + 2]}).id for i in range(20)]
        items: list[tuple[str, Label]] = [(rid, y[2 * i : 2 * i + 2]) for i, rid in enumerate(ids)]
        items[7] = ("missing", 1)
        items[12] = (ids[12], [1.0, 2.0, 3.0])  # three labels for a two-row request
        items.insert(15, (ids[0], float("nan")))
        reader = PredictionStore(data_dir / DB_NAME)
        statuses: list[FeedbackStatus] = []
        try:
            for status in client.submit_feedback_stream("digits", iter(items)):
                statuses.append(status)
                if status.ok:
                    labelled = {p.id: p.label for p in reader.predictions("digits", labelled_only=True)}
                    assert status.request_id in labelled, f"{status.request_id} acknowledged but not committed"
            stored = {p.id: p.label for p in reader.predictions("digits", labelled_only=True)}
        finally:
            reader.close()
        quality = client.model_quality("digits")
    assert [s.request_id for s in statuses] == [rid for rid, _ in items]
    refused = {i: s.code for i, s in enumerate(statuses) if not s.ok}
    assert refused == {
        7: grpc.StatusCode.NOT_FOUND,
        12: grpc.StatusCode.INVALID_ARGUMENT,
        15: grpc.StatusCode.INVALID_ARGUMENT,
    }
    assert "'missing'" in statuses[7].message
    assert "had 2 row(s) but the feedback has 3" in statuses[12].message and "NaN" in statuses[15].message
    accepted = {i: rid for i, rid in enumerate(ids) if i not in (7, 12)}
    assert set(stored) == set(accepted.values())
    for i, rid in accepted.items():
        label = stored[rid]
        assert label is not None
        np.testing.assert_array_equal(label, y[2 * i : 2 * i + 2])
    assert quality.labelled == 18 and quality.rows == 36


async def test_async_stream_acknowledges_each_item_before_the_next_is_sent(
    served: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    """Lock-step over one stream: the next label is only sent once the previous one is acknowledged, which works only
    if acknowledgements come per item, not at the end of the stream."""
    _, x, y = digits
    async with AsyncInferenceClient(served.address) as client:
        ids = [(await client.infer("digits", {"input": x[i : i + 1]})).id for i in range(5)]
        acked: asyncio.Queue[FeedbackStatus] = asyncio.Queue()

        async def items() -> AsyncIterator[tuple[str, Label]]:
            for i, rid in enumerate([*ids[:2], "missing", *ids[2:]]):
                if i:
                    await asyncio.wait_for(acked.get(), 10)
                yield rid, int(y[ids.index(rid)]) if rid in ids else 0

        statuses = []
        async for status in client.submit_feedback_stream("digits", items(), timeout=30):
            statuses.append(status)
            acked.put_nowait(status)
        quality = await client.model_quality("digits")
    assert [s.request_id for s in statuses] == [*ids[:2], "missing", *ids[2:]]
    assert [s.ok for s in statuses] == [True, True, False, True, True, True]
    assert statuses[2].code == grpc.StatusCode.NOT_FOUND
    assert quality.labelled == 5


def test_stream_item_that_cannot_be_encoded_ends_it_after_the_items_before(
    served: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    _, x, y = digits
    with InferenceClient(served.address) as client:
        rid = client.infer("digits", {"input": x[:1]}).id
        statuses: list[FeedbackStatus] = []
        with pytest.raises(TypeError, match="labels must be numbers or text"):
            for status in client.submit_feedback_stream("digits", [(rid, int(y[0])), ("x", {"a": 1})]):  # type: ignore[list-item]
                statuses.append(status)
        assert [s.code for s in statuses] == [grpc.StatusCode.OK]
        # A stream that names no model answers INVALID_ARGUMENT per item.
        (status,) = client.submit_feedback_stream("", [(rid, 1)])
        assert status.code == grpc.StatusCode.INVALID_ARGUMENT and "model name" in status.message
        assert client.model_quality("digits").labelled == 1


def test_cli_sends_one_label_and_files(
    served: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    _, x, y = digits
    with InferenceClient(served.address) as client:
        ids = [client.infer("digits", {"input": x[i : i + 1]}).id for i in range(6)]
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text("".join(json.dumps({"id": rid, "label": int(y[i])}) + "\n" for i, rid in enumerate(ids[:3])))
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("id,label\n" + "".join(f"{rid},{int(y[3 + i])}\n" for i, rid in enumerate(ids[3:5])))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [TENSORGATE, "feedback", "digits", "--server", served.address, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    single = cli("--id", ids[5], "--label", str(int(y[5])))
    assert single.returncode == 0, single.stderr
    assert "accepted 1 of 1" in single.stdout
    from_jsonl = cli("--file", str(jsonl))
    assert from_jsonl.returncode == 0 and "accepted 3 of 3" in from_jsonl.stdout, from_jsonl.stderr
    from_csv = cli("--file", str(csv_file))
    assert from_csv.returncode == 0 and "accepted 2 of 2" in from_csv.stdout, from_csv.stderr
    unknown = cli("--id", "nope", "--label", "1")
    assert unknown.returncode == 1 and "nope: NOT_FOUND" in unknown.stderr
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"id": rid, "label": 1}) + "\n" for rid in (ids[0], "gone", ids[1])))
    refused = cli("--file", str(mixed))
    assert refused.returncode == 1 and "accepted 2 of 3" in refused.stdout and "gone: NOT_FOUND" in refused.stderr
    usage = cli("--label", "1")
    assert usage.returncode == 2 and "give --id and --label, or --file" in usage.stderr
    ragged = cli("--id", ids[0], "--label", "[[1, 2], [3]]")
    assert ragged.returncode == 2 and "one value, or a flat list of one value per row" in ragged.stderr, ragged.stderr
    misspelt = subprocess.run(
        [TENSORGATE, "feedback", "digitz", "--server", served.address, "--id", ids[0], "--label", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert misspelt.returncode == 1 and "model 'digitz' is not served here and has no captured" in misspelt.stderr
    with InferenceClient(served.address) as client:
        assert client.model_quality("digits").labelled == 6


# ----- authorization: feedback is in the inference group, quality reads in the statistics group -------------------


def _token(name: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {name}-token")


def test_every_monitoring_rpc_has_a_policy_group() -> None:
    groups = {spec.name: RPC_GROUPS.get(spec.name) for spec in methods("tensorgate.v1.Monitoring")}
    assert groups == {
        "SubmitFeedback": "inference",
        "SubmitFeedbackBatch": "inference",
        "SubmitFeedbackStream": "inference",
        "GetModelQuality": "statistics",
        "GetModelDrift": "statistics",
        "ListAlerts": "statistics",
    }


def test_feedback_and_quality_rpcs_follow_the_policy_groups(
    digits: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    policy = {
        "rules": [
            {"identities": "labeller", "apis": ["inference"], "models": ["digits"]},
            {"identities": "reader", "apis": ["statistics"], "models": ["digits"]},
        ],
        "tokens": [
            {"sha256": hashlib.sha256(f"{who}-token".encode()).hexdigest(), "identity": who}
            for who in ("labeller", "reader")
        ],
    }
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    feedback = mpb.SubmitFeedbackRequest(model="digits", feedback=mpb.Feedback(request_id="nope", values=[1.0]))
    quality = mpb.GetModelQualityRequest(model="digits")
    with (
        ServerThread(digits[0], data_dir=tmp_path / "data", auth_policy=path) as s,
        grpc.insecure_channel(s.address) as channel,
    ):
        stub = MonitoringStub(channel)

        def code(method: str, request: object, who: str) -> grpc.StatusCode:
            try:
                getattr(stub, method)(request, metadata=(_token(who),), timeout=10)
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        # NOT_FOUND: past the policy, refused by the store (the id was never captured).
        assert code("SubmitFeedback", feedback, "labeller") == grpc.StatusCode.NOT_FOUND
        assert code("GetModelQuality", quality, "labeller") == grpc.StatusCode.PERMISSION_DENIED
        assert code("SubmitFeedback", feedback, "reader") == grpc.StatusCode.PERMISSION_DENIED
        assert code("GetModelQuality", quality, "reader") == grpc.StatusCode.OK

        def streamed(who: str | None, *models: str) -> list[grpc.StatusCode]:
            """Each message's model is checked: a refusal is that item's status, the stream goes on."""
            messages = [
                mpb.SubmitFeedbackRequest(model=m, feedback=mpb.Feedback(request_id="nope", values=[1.0]))
                for m in models
            ]
            metadata = () if who is None else (_token(who),)
            replies = stream_method(stub)(iter(messages), metadata=metadata, timeout=10)
            return [CODES[r.code] for r in replies]

        not_found, denied = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED
        assert streamed("labeller", "digits", "other", "digits") == [not_found, denied, not_found]
        assert streamed("reader", "digits") == [denied]
        with pytest.raises(grpc.RpcError) as caught:
            streamed(None, "digits")
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
