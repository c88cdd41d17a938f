"""What the checkout, points, gift and tier routes share in calling the
loyalty service: one call with the caller's token, whose failure is the
problem the caller gets, and the ids they take as path parameters.

The checkout passes on the refusals of the cards service (a frozen card, a
wrong PIN) as they are, so a wrong PIN's problem says how many tries are
left here as it does on the card routes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import grpc

from chassis.grpcclient import bearer, rich_error
from services.gateway.cards_client import id_path, with_tries_left
from services.gateway.problems import ProblemError, from_rpc

T = TypeVar("T")

# Deadline of each call to the loyalty service; past it the caller gets a
# 504. A checkout, a refund or a void makes calls to cards and members of
# its own, each with a deadline of 5 seconds; on a 504 the terminal sends
# the same request (the same Idempotency-Key) again for the answer.
CALL_TIMEOUT_SECONDS = 5.0
SAGA_TIMEOUT_SECONDS = 20.0

MemberId = Annotated[str, id_path("e.g. M7Q2K9X4TD")]
StoreId = Annotated[str, id_path("e.g. S001")]
SaleId = Annotated[str, id_path("e.g. S7Q2K9X4TD8M3RW1")]
GiftId = Annotated[str, id_path("e.g. TOTE-BAG")]


def loyalty_failed(exc: grpc.aio.AioRpcError, rename: Callable[[str], str]) -> ProblemError:
    """A failed call to the loyalty service as the caller's problem, its
    field names spelled by ``rename`` as the HTTP request spells them."""
    problem = rich_error(exc)
    return with_tries_left(from_rpc(problem, peer="loyalty", rename=rename), problem)


async def call_loyalty(
    method: Callable[..., Awaitable[T]],
    message: Any,
    token: str,
    rename: Callable[[str], str],
    timeout: float = CALL_TIMEOUT_SECONDS,
) -> T:
    """One call to the loyalty service with the caller's token; a failure
    is the problem the caller gets."""
    try:
        return await method(message, metadata=bearer(token), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise loyalty_failed(exc, rename) from None
