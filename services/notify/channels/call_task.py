"""Staff call tasks: the message becomes a call on the campaigns service's
task lists (``FollowUpService.CreateFollowUpTask``), due at the start of
the first call window of the member's home store at or after the
message's earliest send time, assigned to the member's consultant or their
store. The message id is the request id: a resend after a crash, or a
replayed message, finds the same task. The task id is the provider's id.

A member who refused phone contact gets no call: campaigns records the
task as skipped, and the message fails with that reason."""

from __future__ import annotations

import grpc

from chassis.config import Settings
from chassis.grpcclient import Peer, rich_error
from cornucopia.campaigns.v1 import followups_pb2, followups_pb2_grpc
from services.notify.channels import ChannelError, Needs, PermanentChannelError, Sent
from services.notify.store import MessageRecord
from services.notify.store.messages import timestamp

PROVIDER = "campaigns"
SUBJECT = "notify"
CALL_TIMEOUT_SECONDS = 10.0
# Refusals that a retry will not change.
_FOR_GOOD = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


def reason_of(message: MessageRecord) -> str:
    text = (message.subject or message.template).strip()
    return f"notify: {text}"[:100]


class CallTaskChannel:
    needs = Needs.NOTHING

    def __init__(self, settings: Settings) -> None:
        self.peer = Peer(
            settings.peer("campaigns"),
            [followups_pb2.DESCRIPTOR.services_by_name["FollowUpService"]],
            token_secret=settings.token_secret,
            subject=SUBJECT,
        )

    async def send(self, message: MessageRecord, address: str = "") -> Sent:
        if message.member_id is None:
            raise PermanentChannelError("a call task is a call to a member")
        request = followups_pb2.CreateFollowUpTaskRequest(
            request_id=message.message_id,
            member_id=message.member_id,
            reason=reason_of(message),
        )
        if message.not_before is not None:
            request.not_before_time.CopyFrom(timestamp(message.not_before))
        stub = self.peer.stub(followups_pb2_grpc.FollowUpServiceStub)
        try:
            task = await stub.CreateFollowUpTask(
                request, metadata=self.peer.metadata(), timeout=CALL_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as exc:
            problem = rich_error(exc)
            if problem.from_service and problem.code in _FOR_GOOD:
                raise PermanentChannelError(
                    f"campaigns refused the call task: {problem.reason}"
                ) from None
            raise ChannelError(
                f"campaigns did not take the call task ({problem.code.name})"
            ) from None
        if task.state == followups_pb2.FOLLOW_UP_TASK_STATE_SKIPPED:
            raise PermanentChannelError(f"call skipped: {task.skip_reason or 'by campaigns'}")
        return Sent(PROVIDER, task.task_id)

    async def close(self) -> None:
        await self.peer.close()
