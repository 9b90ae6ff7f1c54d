"""Errors passed up with context keep what they were: class, gRPC status and fields."""

from __future__ import annotations

import grpc

from tensorgate.server.errors import InvalidRequestError, ModelUnavailableError, with_prefix


def test_a_prefixed_error_is_a_copy_and_the_original_is_untouched() -> None:
    """A failed batch hands one exception to every request in it: an ensemble naming itself in its request's
    error must not change what the batch's other callers read."""
    shared = InvalidRequestError("add_sub", "1", "shape [1, 8] does not match", tensor="INPUT0")
    named = with_prefix(shared, "in ensemble 'loose', ")
    assert type(named) is InvalidRequestError and named.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        named.message == "in ensemble 'loose', model 'add_sub' version 1, tensor 'INPUT0': shape [1, 8] does not match"
    )
    assert str(named) == named.message and (named.model, named.tensor) == ("add_sub", "INPUT0")
    assert shared.message == "model 'add_sub' version 1, tensor 'INPUT0': shape [1, 8] does not match"
    assert str(shared) == shared.message
    nested = with_prefix(
        with_prefix(ModelUnavailableError("scale", None, "unloaded"), "in ensemble 'b', "), "in ensemble 'a', "
    )
    assert nested.message == "in ensemble 'a', in ensemble 'b', model 'scale' is not ready: unloaded"
    assert nested.code == grpc.StatusCode.UNAVAILABLE
