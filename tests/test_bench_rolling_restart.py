"""`tensorgate bench` on a sequence model through a restart of its server: SIGTERM (the drain lets the sequences
under way end and refuses new STARTs with UNAVAILABLE), exit, and a new server on the same port. A START that
failed began no sequence, so the slot starts one again rather than continue it: the restarted server would refuse
those continuations as INVALID_ARGUMENT ("is not active"), a failure the bench made up."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorgate.client import InferenceClient
from tensorgate.loadtest import run_sweep, sweep_dict
from tensorgate.loadtest.runner import BenchConfig
from tests.onnx_models import accumulator_config, accumulator_model, write_config
from tests.process import ServeProcess


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_sequences_through_a_restart_fail_only_while_the_server_is_away(tmp_path: Path, streaming: bool) -> None:
    root = tmp_path / "models"
    accumulator_model(root / "acc" / "1" / "model.onnx")
    write_config(root, "acc", accumulator_config("acc", extra="max_sequence_idle_microseconds: 5000000"))
    serve = ["--model-repository", str(root), "--shutdown-grace-s", "10"]
    first = ServeProcess([*serve, "--grpc-port", "0"])
    second: ServeProcess | None = None
    address = first.address
    first.wait_for_line("ready:")

    def progress(line: str) -> None:
        nonlocal second
        if second is None and " sent " in line:  # the first progress line: sequences are under way
            assert first.terminate() == 0
            second = ServeProcess([*serve, "--grpc-port", address.rsplit(":", 1)[1]])
            second.wait_for_line("ready:")

    # Sequences of 50: a slot whose START failed, had it gone on, would still be inside that sequence, sending
    # continuations, when the new server is up (its retries back off to 1 s).
    config = BenchConfig(
        model="acc",
        server=address,
        concurrency=(2,),
        duration_s=8.0,
        warmup_s=0.0,
        deadline_s=5.0,
        streaming=streaming,
        sequence_length=50,
    )
    try:
        result = run_sweep(config, progress)
        assert second is not None, "the level ended before the server was restarted"
        with InferenceClient(second.address) as client:
            stats = client.statistics("acc").model_stats[0].inference_stats
    finally:
        for s in (first, second):
            if s is not None:
                s.__exit__(None, None, None)
    assert "sequence(s) not ended" not in first.output  # the drain let the sequences under way end
    (level,) = sweep_dict(result)["levels"]
    assert "INVALID_ARGUMENT" not in level["failed"], level["failed_messages"]
    # Over a stream a refusal has no code: the new server's own count says whether it refused any request.
    assert (stats.success.count > 0, stats.fail.count) == (True, 0), level
