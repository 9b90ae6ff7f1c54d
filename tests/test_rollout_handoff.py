"""A request routed by a split that a rebuild replaced ends on the split that serves (Rollout.retire): only for a
version that split judges. Rollouts built as the repository builds them, with the versions' builds as its
LoadedModels would be."""

from __future__ import annotations

from tensorgate.server.repository.rollout import CANARY_PERCENT, ERROR_MIN_REQUESTS, Rollout, RolloutSpec


def _spec(stable: int) -> RolloutSpec:
    """Canary 2 at 10% over `stable`, error gate at 5 points, as parse_rollout would make it."""
    return RolloutSpec(2, 10.0, stable, None, 100.0, True, ((CANARY_PERCENT, "10"),), max_error_percent=5.0)


def test_late_failures_of_a_stable_version_the_new_split_replaced_do_not_shield_its_canary() -> None:
    one, canary, three = object(), object(), object()
    old = Rollout("m", _spec(stable=1), {1: one, 2: canary, 3: three})
    # The config makes version 3 the stable one; the canary's build is kept, so the new split judges on from here.
    new = Rollout("m", _spec(stable=3), {1: one, 2: canary, 3: three}, previous=old)
    for _ in range(ERROR_MIN_REQUESTS + 5):  # requests routed to version 1 before the reload, failing after it
        old.outcome(1, True)
    assert len(new.stable_outcomes.window) == 0, "version 1's failures counted as stable version 3's"
    for i in range(ERROR_MIN_REQUESTS + 10):  # the canary fails a third of its requests
        new.outcome(2, i % 3 == 0)
    assert new.tripped and new.share == 0.0


def test_late_requests_of_the_kept_versions_still_count_on_the_new_split() -> None:
    stable, canary = object(), object()
    old = Rollout("m", _spec(stable=1), {1: stable, 2: canary})
    new = Rollout("m", _spec(stable=1), {1: stable, 2: canary}, previous=old)
    old.outcome(1, False)
    old.outcome(2, True)
    assert (len(new.stable_outcomes.window), len(new.outcomes.window)) == (1, 1)
