"""What the coupon, follow-up and member-event routes share in calling the
campaigns service: one call with the caller's token, whose failure is the
problem the caller gets, and the ids they take as path parameters."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import grpc

from chassis.grpcclient import bearer, rich_error
from services.gateway.cards_client import id_path
from services.gateway.problems import ProblemError, from_rpc

T = TypeVar("T")

# Deadline of each call to the campaigns service; past it the caller gets a
# 504. Completing a task records the call on the member's file (a call of
# its own to the members service, with a deadline of 5 seconds).
CALL_TIMEOUT_SECONDS = 5.0
COMPLETE_TIMEOUT_SECONDS = 10.0

CouponCode = Annotated[
    str,
    id_path(
        "The code the member shows, e.g. 7Q2K9X4TD8M3RW1P: any case, spaces and dashes ignored."
    ),
]
TaskId = Annotated[str, id_path("A task_id of listFollowUpTasks.")]
EventId = Annotated[str, id_path("e.g. EV7Q2K9X4TD3")]
TemplateId = Annotated[str, id_path("A template_id of listCouponTemplates, e.g. T7Q2K9X4TD8M3RW1")]
IssueJobId = Annotated[str, id_path("The job_id an issue answered with.")]
InviteJobId = Annotated[str, id_path("The job_id a segment's invitation answered with.")]
PromotionId = Annotated[str, id_path("A promotion_id of listPromotions.")]
PlanId = Annotated[str, id_path("e.g. three-three-three")]
SegmentId = Annotated[str, id_path("e.g. JUNE-S001")]


# The message a create call wraps the body in: its fields are the body's.
_BODY_MESSAGES = ("template.", "promotion.", "plan.", "event.", "segment.")


def campaigns_field(name: str) -> str:
    """The campaigns service's field names as the HTTP request spells them:
    the same, but for the idempotency key, the state filters and the
    resource a create or update call wraps the body in (``template.kind`` is
    the body's ``kind``)."""
    if name == "request_id":
        return "Idempotency-Key"
    if name == "states":
        return "state"
    if name in ("template", "promotion", "plan", "event", "segment", "update_mask"):
        return "body"
    for prefix in _BODY_MESSAGES:
        if name.startswith(prefix):
            return name.removeprefix(prefix)
    return name


def campaigns_failed(exc: grpc.aio.AioRpcError) -> ProblemError:
    """A failed call to the campaigns service as the caller's problem."""
    return from_rpc(rich_error(exc), peer="campaigns", rename=campaigns_field)


async def call_campaigns(
    method: Callable[..., Awaitable[T]],
    message: Any,
    token: str,
    timeout: float = CALL_TIMEOUT_SECONDS,
) -> T:
    """One call to the campaigns service with the caller's token; a failure
    is the problem the caller gets."""
    try:
        return await method(message, metadata=bearer(token), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise campaigns_failed(exc) from None
