"""Scheduling settings read once from a model's config (Triton's `dynamic_batching` block) and checked eagerly."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tensorgate.protos import model_config_pb2 as mc
from tensorgate.server.errors import InvalidConfigError
from tensorgate.server.repository.config import TRITON_BACKEND


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    max_queue_size: int = 0
    """0 = unbounded."""
    timeout_ns: int = 0
    """Default time a request may wait in the queue; 0 = no limit."""
    delay_on_timeout: bool = False
    """timeout_action DELAY: a timed-out request moves behind everything else instead of being rejected."""
    allow_timeout_override: bool = False

    @classmethod
    def from_proto(cls, p: mc.ModelQueuePolicy) -> QueuePolicy:
        return cls(
            max_queue_size=max(p.max_queue_size, 0),
            timeout_ns=p.default_timeout_microseconds * 1000,
            delay_on_timeout=p.timeout_action == mc.ModelQueuePolicy.DELAY,
            allow_timeout_override=p.allow_timeout_override,
        )


@dataclass(frozen=True, slots=True)
class SchedulingPolicy:
    batching: bool
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_ns: int
    priority_levels: int
    default_priority: int
    queue_policies: Mapping[int, QueuePolicy]
    """The levels `priority_queue_policy` names (1 = the highest), each with its own policy; every other level
    has `default_queue_policy`. Sparse, never one per level: priority_levels is a uint64, and Triton serves a
    config with 2^64-1 of them (its own max_priority_level test config), for which a policy per level would
    never finish being built."""
    default_queue_policy: QueuePolicy = QueuePolicy()
    batch_dimension: bool = True
    """The model's tensors start with a batch dimension (max_batch_size > 0): outputs have one row per input row."""

    def queue_policy(self, level: int) -> QueuePolicy:
        return self.queue_policies.get(level, self.default_queue_policy)

    @classmethod
    def from_config(cls, config: mc.ModelConfig) -> SchedulingPolicy:
        """Without `dynamic_batching` (or with max_batch_size 0) each request executes on its own. A sequence
        model batches its sequences' requests with its strategy's delay and preferred sizes (Direct has no
        preferred sizes); its sequencer sends one request per sequence at a time. A sequence model on an upstream
        Triton never batches here: each request goes upstream on its own, with its sequence's parameters, and the
        upstream's sequence batcher batches them."""
        if config.HasField("sequence_batching"):
            sb = config.sequence_batching
            oldest = sb.WhichOneof("strategy_choice") == "oldest"
            batching = config.max_batch_size > 0 and config.backend != TRITON_BACKEND
            preferred = tuple(sorted(set(sb.oldest.preferred_batch_size))) if oldest else ()
            if config.backend != TRITON_BACKEND:  # a remote model's are its upstream's, whose batcher uses them
                _check_preferred(config, preferred)
            # Direct waits for a batch only with a minimum_slot_utilization to wait for, as in Triton.
            delay_us = (
                sb.oldest.max_queue_delay_microseconds
                if oldest
                else sb.direct.max_queue_delay_microseconds
                if sb.direct.minimum_slot_utilization > 0
                else 0
            )
            return cls(
                batching=batching,
                max_batch_size=max(config.max_batch_size, 1),
                preferred_batch_sizes=preferred if batching else (),
                max_queue_delay_ns=delay_us * 1000 if batching else 0,
                priority_levels=1,
                default_priority=1,
                queue_policies={},
                batch_dimension=config.max_batch_size > 0,
            )
        db = config.dynamic_batching
        batching = config.HasField("dynamic_batching") and config.max_batch_size > 0
        levels = max(db.priority_levels, 1)
        default = db.default_priority_level if db.priority_levels > 0 else 1
        if db.priority_levels > 0 and not 1 <= default <= levels:
            raise InvalidConfigError(
                config.name, f"default_priority_level {default} is outside 1..{levels} (priority_levels)"
            )
        preferred = tuple(sorted(set(db.preferred_batch_size)))
        _check_preferred(config, preferred)
        for level in db.priority_queue_policy:
            if not 1 <= level <= levels:
                raise InvalidConfigError(config.name, f"priority_queue_policy level {level} is outside 1..{levels}")
        policies = {level: QueuePolicy.from_proto(p) for level, p in db.priority_queue_policy.items()}
        return cls(
            batching=batching,
            max_batch_size=max(config.max_batch_size, 1),
            preferred_batch_sizes=preferred if batching else (),
            max_queue_delay_ns=db.max_queue_delay_microseconds * 1000 if batching else 0,
            priority_levels=levels,
            default_priority=default,
            queue_policies=policies,
            default_queue_policy=QueuePolicy.from_proto(db.default_queue_policy),
            batch_dimension=config.max_batch_size > 0,
        )


def _check_preferred(config: mc.ModelConfig, preferred: tuple[int, ...]) -> None:
    for size in preferred:
        if size < 1 or size > config.max_batch_size:
            raise InvalidConfigError(
                config.name, f"preferred_batch_size {size} is outside 1..{config.max_batch_size} (max_batch_size)"
            )
