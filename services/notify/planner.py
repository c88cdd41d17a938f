"""The planner turns notifications (what a trigger wants said, to whom)
into messages: queued, or suppressed with the reason.

For each pending notification it asks the members service, with notify's
own service token, for what it needs of the recipient: the member file's
language, home store, consents and preferred channel (and, for staff, the
staff member or the store's managers), the store's name and time zone.
Nothing personal is kept: the file says which channels the member has an
address for; the addresses themselves are fetched again by the dispatcher
at send time. Then, with the notification marked planned: the opt-outs,
the channel (``domain.choice``), the weekly cap, the template in use, quiet
hours, and the message. A pass writes all its notifications' messages in
one transaction; when one of them fails, each is written in its own.

A notification whose recipient cannot be looked up (members unreachable)
stays pending and is retried with a growing delay: an outage delays
messages, it loses none. Archived and erased members get nothing; a merged
member's messages go to the file they were merged into.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import random
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import grpc
from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncSession

from chassis import outbox
from chassis.db import Database, utcnow
from chassis.errors import ServiceError
from chassis.logs import get_logger, redact_text
from chassis.telemetry import extract_trace_context
from chassis.wakeup import COMMIT_LINGER_SECONDS, Wakeup
from cornucopia.members.v1 import members_pb2
from services.notify import store
from services.notify.domain import choice, templates, triggers
from services.notify.domain.messages import Category, Channel
from services.notify.domain.policy import NotifyPolicy, quiet_hours_release, same_local_day
from services.notify.links import Links
from services.notify.peers import CONTACT_CHANNELS, StaffFacts, StoreFacts
from services.notify.store import intents, optouts, planning
from services.notify.store import policy as policy_store
from services.notify.store import templates as template_store

log = get_logger(__name__)
_tracer = trace.get_tracer(__name__)

# Following merged files further than this is a loop in the data.
MAX_MERGE_HOPS = 3
WEEK = dt.timedelta(days=7)
# Retries of a notification whose recipient could not be looked up.
RETRY_FIRST_SECONDS = 5.0
RETRY_MAX_SECONDS = 600.0

# --- what notify asks members ---------------------------------------------------


class MembersDirectory(Protocol):
    """What planning asks members: ``peers.MembersPeer``, or a stand-in."""

    async def member(self, member_id: str) -> members_pb2.Member | None: ...

    async def store(self, store_id: str) -> StoreFacts | None: ...

    async def staff(self, staff_id: str) -> StaffFacts | None: ...

    async def store_managers(self, store_id: str) -> list[StaffFacts]: ...

    async def lookup_mobile(self, mobile: str) -> members_pb2.Member | None: ...

    async def withdraw_consent(self, member_id: str, channel: Channel, source: str) -> None: ...


def reach_of(member: members_pb2.Member) -> choice.Reach:
    """Which channels the file has an address for, its consents and its
    preferred channel; the addresses themselves are not kept."""
    consents: dict[Channel, choice.Consent] = {}
    for given in member.consents:
        channel = CONTACT_CHANNELS.get(given.channel)
        if channel is not None:
            at = given.update_time.ToDatetime(dt.UTC) if given.HasField("update_time") else None
            consents[channel] = choice.Consent(given.granted, at)
    addresses = set()
    if member.mobile:
        addresses |= {Channel.SMS, Channel.CALL_TASK}
    if member.landline:
        addresses.add(Channel.CALL_TASK)
    if member.email:
        addresses.add(Channel.EMAIL)
    if member.address.street or member.address.city:
        addresses.add(Channel.POST)
    # The member file keeps no device: a member who has the app said so by
    # granting it consent, and the app's backend knows them by member id.
    app = consents.get(Channel.PUSH)
    if app is not None and app.granted:
        addresses.add(Channel.PUSH)
    return choice.Reach(
        addresses=frozenset(addresses),
        consents=consents,
        preferred=CONTACT_CHANNELS.get(member.preferred_contact_channel),
    )


# --- one planning pass ------------------------------------------------------------


@dataclass(frozen=True)
class Addressee:
    """One recipient of a notification, as far as planning needs them."""

    member_id: str | None = None
    staff_id: str | None = None
    language: str = ""
    store_id: str = ""
    time_zone: str = ""
    # The member or staff variables (given_name, store_name, ...).
    values: dict[str, str] = dataclasses.field(default_factory=dict)
    reach: choice.Reach | None = None
    # Set when the member gets nothing whatever the channel.
    suppressed: str = ""
    # One of several recipients of one event.
    fanned_out: bool = False


@dataclass(frozen=True)
class _LookedUp:
    """A notification of a pass with whom it is for, and its span, ended
    once the pass is written."""

    notification: intents.Notification
    addressees: list[Addressee]
    span: trace.Span


class PassCache:
    """The lookups of one pass: a batch often names the same member or
    store many times (a segment's coupons, a store's tasks)."""

    def __init__(self, directory: MembersDirectory) -> None:
        self.directory = directory
        self._members: dict[str, members_pb2.Member | None] = {}
        self._stores: dict[str, StoreFacts | None] = {}
        self._staff: dict[str, StaffFacts | None] = {}
        self._managers: dict[str, list[StaffFacts]] = {}

    async def member(self, member_id: str) -> members_pb2.Member | None:
        if member_id not in self._members:
            self._members[member_id] = await self.directory.member(member_id)
        return self._members[member_id]

    async def store(self, store_id: str) -> StoreFacts | None:
        if not store_id:
            return None
        if store_id not in self._stores:
            self._stores[store_id] = await self.directory.store(store_id)
        return self._stores[store_id]

    async def staff(self, staff_id: str) -> StaffFacts | None:
        if staff_id not in self._staff:
            self._staff[staff_id] = await self.directory.staff(staff_id)
        return self._staff[staff_id]

    async def managers(self, store_id: str) -> list[StaffFacts]:
        if not store_id:
            return []
        if store_id not in self._managers:
            self._managers[store_id] = await self.directory.store_managers(store_id)
        return self._managers[store_id]


async def member_addressee(cache: PassCache, member_id: str) -> Addressee:
    """The member as planning needs them: the survivor of a merge, or a
    reason to send nothing."""
    member = await cache.member(member_id)
    hops = 0
    while (
        member is not None
        and member.state == members_pb2.MEMBER_STATE_MERGED
        and member.merged_into
        and hops < MAX_MERGE_HOPS
    ):
        member = await cache.member(member.merged_into)
        hops += 1
    if member is None:
        return Addressee(member_id=member_id, suppressed=choice.MEMBER_NOT_FOUND)
    if member.state not in (
        members_pb2.MEMBER_STATE_ACTIVE,
        members_pb2.MEMBER_STATE_UNSPECIFIED,
    ):
        return Addressee(member_id=member_id, suppressed=choice.MEMBER_INACTIVE)
    found = await cache.store(member.home_store_id)
    return Addressee(
        member_id=member.member_id,
        language=member.preferred_language,
        store_id=member.home_store_id,
        time_zone=found.time_zone if found else "",
        values={
            "member_id": member.member_id,
            "given_name": member.given_name,
            "store_name": (found.display_name if found else "") or member.home_store_id,
        },
        reach=reach_of(member),
    )


def retry_delay(attempts: int) -> dt.timedelta:
    """Exponential, capped, with jitter so that a backlog does not come
    back all at once when members does."""
    base = min(RETRY_FIRST_SECONDS * 2**attempts, RETRY_MAX_SECONDS)
    return dt.timedelta(seconds=base * (1 + random.uniform(0, 0.2)))  # noqa: S311 - jitter


class Planner:
    def __init__(
        self,
        db: Database,
        directory: MembersDirectory,
        links: Links,
        *,
        batch_size: int = 50,
        poll_interval: float = 1.0,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.db = db
        self.directory = directory
        self.links = links
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        # Tests set it to plan at a local time of their choosing.
        self.clock = clock
        self._wakeup = Wakeup(db, intents.NOTIFICATIONS_ADDED, linger=COMMIT_LINGER_SECONDS)

    async def run(self) -> None:
        while True:
            try:
                handled = await self.plan_pending()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("planning pass failed")
                handled = 0
            if handled < self.batch_size:
                await self._wakeup.wait(self.poll_interval)

    async def plan_pending(self, now: dt.datetime | None = None) -> int:
        """One pass over the notifications due; returns how many it took up
        (planned, or put off after a failed lookup)."""
        at = now or self.clock()
        async with self.db.sessions() as session:
            batch = await intents.pending(session, now=at, limit=self.batch_size)
            if not batch:
                return 0
            policy = await policy_store.load_policy(session)
        cache = PassCache(self.directory)
        looked_up: list[_LookedUp] = []
        try:
            for notification in batch:
                found = await self._look_up(notification, cache, at)
                if found is not None:
                    looked_up.append(found)
            await self._write_pass(looked_up, policy, at)
        finally:
            for one in looked_up:
                one.span.end()
        return len(batch)

    async def _look_up(
        self, notification: intents.Notification, cache: PassCache, now: dt.datetime
    ) -> _LookedUp | None:
        """Whom the notification is for; None when they could not be looked
        up (it is put off, to be planned later)."""
        span = _tracer.start_span(
            f"notify plan {notification.trigger}",
            context=extract_trace_context(notification.trace_headers),
            attributes={
                "cornucopia.service": "notify",
                "cornucopia.notification_id": notification.notification_id,
            },
        )
        with trace.use_span(span):
            try:
                addressees = await self._addressees(notification, cache)
            except (ServiceError, grpc.aio.AioRpcError) as exc:
                span.set_status(trace.StatusCode.ERROR)
                span.end()
                await self._put_off(notification, exc, now)
                log.warning(
                    "recipient lookup failed; planning later",
                    notification_id=notification.notification_id,
                    trigger=notification.trigger,
                    attempts=notification.attempts + 1,
                )
                return None
            except BaseException:
                span.end()
                raise
        return _LookedUp(notification, addressees, span)

    async def _put_off(
        self, notification: intents.Notification, exc: BaseException, now: dt.datetime
    ) -> None:
        """Leaves the notification pending until a growing delay has passed."""
        async with self.db.transaction() as session:
            await intents.mark_planning_failed(
                session,
                notification.notification_id,
                redact_text(f"{type(exc).__name__}: {getattr(exc, 'message', '') or exc}")[:500],
                now + retry_delay(notification.attempts),
            )

    async def _write_pass(
        self, looked_up: list[_LookedUp], policy: NotifyPolicy, now: dt.datetime
    ) -> None:
        """The pass's messages in one transaction. If any of them fails,
        nothing of it is kept and each notification is planned in a
        transaction of its own: the one that fails again is put off like
        one whose recipient could not be looked up, and holds back no
        other."""
        if len(looked_up) > 1:
            try:
                async with self.db.transaction() as session:
                    await self._write_together(session, looked_up, policy, now)
                return
            except Exception as exc:
                log.info(
                    "a planning pass failed; planning its notifications one by one",
                    notifications=len(looked_up),
                    error=type(exc).__name__,
                )
        for one in looked_up:
            with trace.use_span(one.span):
                try:
                    async with self.db.transaction() as session:
                        await self._take_and_write(session, one, policy, now)
                except Exception as exc:
                    one.span.record_exception(exc)
                    one.span.set_status(trace.StatusCode.ERROR)
                    log.exception(
                        "planning a notification failed; planning it later",
                        notification_id=one.notification.notification_id,
                        trigger=one.notification.trigger,
                        attempts=one.notification.attempts + 1,
                    )
                    await self._put_off(one.notification, exc, now)

    async def _write_together(
        self,
        session: AsyncSession,
        looked_up: list[_LookedUp],
        policy: NotifyPolicy,
        now: dt.datetime,
    ) -> None:
        """The pass's notifications taken, their members' opt-outs read and
        their messages' events written each in one statement."""
        taken = await planning.take_all(
            session, [one.notification.notification_id for one in looked_up], now
        )
        mine = [one for one in looked_up if one.notification.notification_id in taken]
        opted_out = await optouts.of_members(
            session,
            {a.member_id for one in mine for a in one.addressees if a.member_id is not None},
        )
        async with outbox.together(session):
            for one in mine:
                with trace.use_span(one.span):
                    await self._write_all(session, one, policy, now, opted_out)

    async def _take_and_write(
        self, session: AsyncSession, one: _LookedUp, policy: NotifyPolicy, now: dt.datetime
    ) -> None:
        if await planning.take(session, one.notification.notification_id, now):
            await self._write_all(session, one, policy, now)

    async def _write_all(
        self,
        session: AsyncSession,
        one: _LookedUp,
        policy: NotifyPolicy,
        now: dt.datetime,
        opted_out: Mapping[str, list[optouts.OptOutRecord]] | None = None,
    ) -> None:
        """The messages of a notification this transaction has taken;
        ``opted_out``: its members' opt-outs, when read already."""
        notification = one.notification
        for addressee in one.addressees:
            await self._write(session, notification, addressee, policy, now, opted_out=opted_out)
        if not one.addressees:
            log.warning(
                "nobody to tell",
                notification_id=notification.notification_id,
                trigger=notification.trigger,
            )

    # -- whom -------------------------------------------------------------------------

    async def _addressees(
        self, notification: intents.Notification, cache: PassCache
    ) -> list[Addressee]:
        if notification.member_id is not None:
            return [await member_addressee(cache, notification.member_id)]
        return await self._staff(notification, cache)

    async def _staff(self, notification: intents.Notification, cache: PassCache) -> list[Addressee]:
        store_id = notification.variables.get("store_id", "")
        people: list[StaffFacts] = []
        if notification.staff_id and notification.staff_id != triggers.STORE_MANAGERS:
            person = await cache.staff(notification.staff_id)
            if person is not None and person.active:
                people = [person]
            else:
                # The one it was meant for has left: their store's managers
                # take it over.
                store_id = store_id or (person.store_id if person else "")
        if not people:
            people = await cache.managers(store_id)
        found = []
        for person in people:
            at = await cache.store(person.store_id or store_id)
            found.append(
                Addressee(
                    staff_id=person.staff_id,
                    store_id=person.store_id or store_id,
                    time_zone=at.time_zone if at else "",
                    values={
                        "staff_id": person.staff_id,
                        "staff_name": person.display_name,
                        "store_name": (at.display_name if at else "") or store_id,
                    },
                    fanned_out=notification.staff_id != person.staff_id,
                )
            )
        return found

    # -- what, where, when ------------------------------------------------------------

    async def _write(
        self,
        session: AsyncSession,
        notification: intents.Notification,
        addressee: Addressee,
        policy: NotifyPolicy,
        now: dt.datetime,
        *,
        opted_out: Mapping[str, list[optouts.OptOutRecord]] | None = None,
    ) -> None:
        trigger = triggers.CATALOGUE.get(notification.trigger)
        category = notification.category
        order = trigger.channels if trigger else (Channel.SMS,)
        locale = templates.choose_locale(
            addressee.language, policy.store_locale(addressee.store_id), policy.default_locale
        )
        event_id = notification.trigger_event_id
        if event_id and addressee.fanned_out and addressee.staff_id:
            event_id = f"{event_id}/{addressee.staff_id}"[:64]

        async def suppress(reason: str, channel: Channel | None = None) -> None:
            await planning.record_suppressed(
                session,
                message_id=str(uuid.uuid4()),
                template=notification.template or notification.trigger,
                channel=channel or notification.channel or order[0],
                locale=locale,
                category=category,
                reason=reason,
                created_at=now,
                trace_headers=notification.trace_headers,
                member_id=addressee.member_id,
                staff_id=addressee.staff_id,
                time_zone=addressee.time_zone,
                trigger_event_id=event_id,
            )
            log.info(
                "message suppressed",
                notification_id=notification.notification_id,
                trigger=notification.trigger,
                reason=reason,
            )

        if addressee.suppressed:
            await suppress(addressee.suppressed)
            return
        if trigger is None:
            await suppress(choice.TEMPLATE_ERROR)
            return
        values = {**notification.variables, **addressee.values}
        if addressee.member_id is not None and addressee.reach is not None:
            theirs = (
                await optouts.of_member(session, addressee.member_id)
                if opted_out is None
                else opted_out.get(addressee.member_id, [])
            )
            reach = dataclasses.replace(
                addressee.reach,
                optouts=[choice.OptOut(o.channel, o.scope, o.created_at) for o in theirs],
            )
            chosen = choice.choose_channel(category, order, reach, notification.channel)
            if chosen.channel is None:
                await suppress(chosen.reason)
                return
            channel = chosen.channel
            if category is Category.MARKETING:
                sent = await planning.marketing_since(session, addressee.member_id, now - WEEK)
                if choice.over_weekly_cap(sent, policy.marketing_weekly_cap):
                    await suppress(choice.WEEKLY_CAP, channel)
                    return
                values[triggers.UNSUBSCRIBE_URL] = self.links.unsubscribe_url(
                    addressee.member_id, channel
                )
            if not values.get("given_name"):
                values["given_name"] = templates.NAMELESS[locale]
        else:
            channel = notification.channel or order[0]
        found = await _render(
            session,
            notification,
            trigger,
            channel=channel,
            values=values,
            locale=locale,
            time_zone=addressee.time_zone,
            policy=policy,
        )
        if found is None:
            await suppress(choice.TEMPLATE_ERROR, channel)
            return
        template_name, rendered = found
        not_before = notification.not_before
        release = quiet_hours_release(
            policy.quiet_hours,
            category,
            channel,
            max(now, not_before) if not_before else now,
            addressee.time_zone,
        )
        if release is not None:
            not_before = release
        if (
            trigger.on_its_day_only
            and notification.not_before is not None
            and not same_local_day(
                max(now, not_before or now), notification.not_before, addressee.time_zone
            )
        ):
            await suppress(choice.TOO_LATE, channel)
            return
        await store.queue_message(
            session,
            message_id=str(uuid.uuid4()),
            template=template_name,
            channel=channel,
            locale=rendered.locale,
            body=rendered.body,
            subject=rendered.subject or None,
            created_at=now,
            trace_headers=notification.trace_headers,
            member_id=addressee.member_id,
            staff_id=addressee.staff_id,
            category=category,
            time_zone=addressee.time_zone,
            not_before=not_before,
            trigger_event_id=event_id,
        )


async def _render(
    session: AsyncSession,
    notification: intents.Notification,
    trigger: triggers.Trigger,
    *,
    channel: Channel,
    values: dict[str, str],
    locale: str,
    time_zone: str,
    policy: NotifyPolicy,
) -> tuple[str, templates.Rendered] | None:
    """The template in use (saved, else built in) by name and the message
    in it, or None when there is none or it cannot be filled."""
    found = await template_store.in_use(
        session, notification.template or notification.trigger, channel
    )
    template = found.template if found else templates.DEFAULTS.get(notification.trigger)
    if template is None:
        return None
    try:
        return template.name, template.render(
            locale,
            templates.formatted(trigger.allowed_variables(), values, locale, time_zone),
            fallback=policy.default_locale,
        )
    except KeyError:
        return None
