"""What the card and the stored-value routes share in calling the cards
service: one call with the caller's token, whose failure is the problem the
caller gets (a wrong PIN's says how many tries are left), and the ids they
take as path parameters."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import grpc
from fastapi import Path

from chassis.grpcclient import RpcProblem, bearer, rich_error
from services.gateway.card_schemas import MAX_ID_LENGTH
from services.gateway.problems import ProblemError, from_rpc

T = TypeVar("T")

# Deadline of each call to the cards service; past it the caller gets a 504.
CALL_TIMEOUT_SECONDS = 5.0


def id_path(description: str) -> Any:
    """A path parameter naming a resource by its id."""
    return Path(min_length=1, max_length=MAX_ID_LENGTH, description=description)


CardId = Annotated[str, id_path("e.g. C7Q2K9X4TD8M")]


def with_tries_left(error: ProblemError, problem: RpcProblem) -> ProblemError:
    """A wrong PIN's problem says how many tries are left (the service's
    ``tries_left``), whichever service passed the refusal on."""
    tries_left = problem.metadata.get("tries_left", "")
    if problem.reason == "PIN_INCORRECT" and tries_left.isdigit():
        error.detail = f"{error.detail}; {tries_left} tries left before the PIN is locked"
    return error


def cards_failed(exc: grpc.aio.AioRpcError, rename: Callable[[str], str]) -> ProblemError:
    """A failed call to the cards service as the caller's problem, its field
    names spelled by ``rename`` as the HTTP request spells them."""
    problem = rich_error(exc)
    return with_tries_left(from_rpc(problem, peer="cards", rename=rename), problem)


async def call_cards(
    method: Callable[..., Awaitable[T]],
    message: Any,
    token: str,
    rename: Callable[[str], str],
) -> T:
    """One call to the cards service with the caller's token; a failure is
    the problem the caller gets."""
    try:
        return await method(message, metadata=bearer(token), timeout=CALL_TIMEOUT_SECONDS)
    except grpc.aio.AioRpcError as exc:
        raise cards_failed(exc, rename) from None
