"""CouponsService: templates, issuing, wallets, the reservation lifecycle
and statistics. Proto <-> domain and authorisation; the rules are in
domain/coupons.py, the writes in coupon_ledger.py."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import STAFF_ROLES, Role, current_principal
from chassis.db import utcnow
from chassis.errors import FieldViolation, InvalidArgument, NotFound, Violations
from chassis.grpcserver import Context
from chassis.idempotency import check_request_id, request_fingerprint, run_idempotent
from chassis.paging import newest_first_after, newest_first_token, page_size
from chassis.service import ServiceContext
from chassis.spreadsheets import XLSX_CONTENT_TYPE, Column, chunks, write_xlsx
from cornucopia.campaigns.v1 import pricing_pb2 as pb
from cornucopia.campaigns.v1 import pricing_pb2_grpc
from services.campaigns import coupon_ledger
from services.campaigns.domain import coupons as rules
from services.campaigns.domain.coupons import CouponState, JobState, RestorePolicy, Template
from services.campaigns.domain.pricing import CouponKind
from services.campaigns.server.followups import members_client
from services.campaigns.server.pricing import money, required, stamp_proto, timestamp, when
from services.campaigns.server.segments import segment_not_found
from services.campaigns.store import coupons as store
from services.campaigns.store import segments as segment_store
from services.campaigns.store.coupons import CouponRecord, JobRecord, TemplateRecord

READING_ROLES = (*STAFF_ROLES, Role.SERVICE)
ISSUING_ROLES = (Role.HQ_ADMIN, Role.SERVICE)
CHECKOUT_ROLES = (Role.HQ_ADMIN, Role.SERVICE)
STATISTICS_ROLES = (Role.HQ_ADMIN, Role.REGION_MANAGER, Role.STORE_MANAGER)

KINDS = {
    pb.COUPON_KIND_AMOUNT_OFF: CouponKind.AMOUNT_OFF,
    pb.COUPON_KIND_PERCENT_OFF: CouponKind.PERCENT_OFF,
    pb.COUPON_KIND_GIFT_ITEM: CouponKind.GIFT_ITEM,
    pb.COUPON_KIND_FREE_SERVICE: CouponKind.FREE_SERVICE,
}
KINDS_PROTO = {v: k for k, v in KINDS.items()}
POLICIES = {
    pb.RESTORE_POLICY_UNSPECIFIED: RestorePolicy.NEVER,
    pb.RESTORE_POLICY_NEVER: RestorePolicy.NEVER,
    pb.RESTORE_POLICY_ON_WHOLE_REFUND: RestorePolicy.ON_WHOLE_REFUND,
    pb.RESTORE_POLICY_ON_ANY_REFUND: RestorePolicy.ON_ANY_REFUND,
}
POLICIES_PROTO = {
    RestorePolicy.NEVER: pb.RESTORE_POLICY_NEVER,
    RestorePolicy.ON_WHOLE_REFUND: pb.RESTORE_POLICY_ON_WHOLE_REFUND,
    RestorePolicy.ON_ANY_REFUND: pb.RESTORE_POLICY_ON_ANY_REFUND,
}
STATES = {
    pb.COUPON_STATE_ISSUED: CouponState.ISSUED,
    pb.COUPON_STATE_RESERVED: CouponState.RESERVED,
    pb.COUPON_STATE_REDEEMED: CouponState.REDEEMED,
    pb.COUPON_STATE_EXPIRED: CouponState.EXPIRED,
}
STATES_PROTO = {v: k for k, v in STATES.items()}
MAX_PERIOD = dt.timedelta(days=3660)


def template_from_proto(m: pb.CouponTemplate, template_id: str) -> Template:
    if m.kind not in KINDS:
        raise InvalidArgument([FieldViolation("template.kind", "one of the coupon kinds")])
    if m.restore_policy not in POLICIES:
        raise InvalidArgument([FieldViolation("template.restore_policy", "a restore policy")])
    return rules.check_template(
        Template(
            template_id=template_id,
            name=m.display_name.strip(),
            kind=KINDS[m.kind],
            currency=m.currency_code.strip().upper(),
            amount_off=m.amount_off.minor_units,
            percent_bps=m.percent_bps,
            max_discount=m.max_discount.minor_units if m.HasField("max_discount") else None,
            gift_sku=m.gift_sku.strip(),
            face_value=m.face_value.minor_units,
            valid_from=when(m.valid_from, m.HasField("valid_from")),
            valid_until=when(m.valid_until, m.HasField("valid_until")),
            valid_days=m.valid_days,
            min_spend=m.min_spend.minor_units,
            store_ids=frozenset(s.strip() for s in m.store_ids if s.strip()),
            categories=frozenset(s.strip() for s in m.categories if s.strip()),
            skus=frozenset(s.strip() for s in m.skus if s.strip()),
            per_member_limit=m.per_member_limit,
            total_quantity=m.total_quantity,
            budget=m.budget.minor_units if m.HasField("budget") else None,
            restore_policy=POLICIES[m.restore_policy],
            description=m.description.strip(),
        )
    )


def template_to_proto(record: TemplateRecord) -> pb.CouponTemplate:
    t = record.template
    c = t.currency
    m = pb.CouponTemplate(
        template_id=t.template_id,
        display_name=t.name,
        kind=KINDS_PROTO[t.kind],
        currency_code=c,
        percent_bps=t.percent_bps,
        gift_sku=t.gift_sku,
        valid_days=t.valid_days,
        min_spend=money(c, t.min_spend),
        store_ids=sorted(t.store_ids),
        categories=sorted(t.categories),
        skus=sorted(t.skus),
        per_member_limit=t.per_member_limit,
        total_quantity=t.total_quantity,
        restore_policy=POLICIES_PROTO[t.restore_policy],
        issued_count=record.issued_count,
        budget_used=money(c, record.budget_used),
        created=stamp_proto(record.created_by, record.created_store_id, record.created_at),
        description=t.description,
    )
    if t.kind == CouponKind.AMOUNT_OFF:
        m.amount_off.CopyFrom(money(c, t.amount_off))
    if t.max_discount is not None:
        m.max_discount.CopyFrom(money(c, t.max_discount))
    if t.face_value:
        m.face_value.CopyFrom(money(c, t.face_value))
    if t.valid_from:
        m.valid_from.CopyFrom(timestamp(t.valid_from))
    if t.valid_until:
        m.valid_until.CopyFrom(timestamp(t.valid_until))
    if t.budget is not None:
        m.budget.CopyFrom(money(c, t.budget))
    return m


def coupon_to_proto(c: CouponRecord, template: Template | None) -> pb.Coupon:
    m = pb.Coupon(
        coupon_id=c.coupon_id,
        code=c.code,
        template_id=c.template_id,
        display_name=template.name if template else "",
        kind=KINDS_PROTO[template.kind] if template else pb.COUPON_KIND_UNSPECIFIED,
        member_id=c.member_id,
        state=STATES_PROTO[c.state],
        issue_time=timestamp(c.issued_at),
        valid_from=timestamp(c.valid_from),
        expire_time=timestamp(c.expires_at),
        issue_job_id=c.job_id,
        reservation_id=c.reservation_id,
        sale_id=c.sale_id,
        store_id=c.reserved_store_id,
    )
    if c.reserved_until is not None:
        m.reservation_expire_time.CopyFrom(timestamp(c.reserved_until))
    if c.redeemed_at is not None:
        m.redeem_time.CopyFrom(timestamp(c.redeemed_at))
    if c.state in (CouponState.RESERVED, CouponState.REDEEMED) and template:
        m.discount.CopyFrom(money(template.currency, c.reserved_discount))
    return m


async def coupons_to_proto(session: AsyncSession, found: list[CouponRecord]) -> list[pb.Coupon]:
    templates = await store.templates_by_id(session, {c.template_id for c in found})
    return [
        coupon_to_proto(
            c, templates[c.template_id].template if c.template_id in templates else None
        )
        for c in found
    ]


async def job_to_proto(session: AsyncSession, job: JobRecord) -> pb.IssueJob:
    with_coupons = job.total <= rules.INLINE_ISSUE_LIMIT
    issued, skipped = await store.job_results(
        session, job, rules.INLINE_ISSUE_LIMIT, with_coupons=with_coupons
    )
    m = pb.IssueJob(
        job_id=job.job_id,
        template_id=job.template_id,
        state=pb.ISSUE_JOB_STATE_DONE if job.state == JobState.DONE else pb.ISSUE_JOB_STATE_RUNNING,
        total=job.total,
        processed=job.processed,
        issued=job.issued,
        skipped=job.skipped,
        coupons=await coupons_to_proto(session, issued) if with_coupons else [],
        skipped_members=[pb.SkippedMember(member_id=m, reason=r) for m, r in skipped],
        created=stamp_proto(job.created_by, job.created_store_id, job.created_at),
        segment_id=job.segment_id,
        segment_version=job.segment_version,
    )
    if job.finished_at is not None:
        m.finish_time.CopyFrom(timestamp(job.finished_at))
    return m


def _issue_targets(request: pb.IssueCouponsRequest) -> tuple[str, list[str]]:
    """The segment or the members (a member listed twice is issued once)."""
    segment_id = request.segment_id.strip()
    members = [m.strip() for m in request.member_ids]
    v = Violations()
    if segment_id and members:
        v.add("segment_id", "one of member_ids and segment_id, not both")
    elif not members and not segment_id:
        v.add("member_ids", "at least one member, or a segment_id")
    if len(members) > rules.MAX_ISSUE_MEMBERS:
        v.add("member_ids", f"at most {rules.MAX_ISSUE_MEMBERS}")
    if any(not m or len(m) > 64 for m in members):
        v.add("member_ids", "each a member id of at most 64 characters")
    v.raise_if_any()
    return segment_id, list(dict.fromkeys(members))


def _template_not_found(template_id: str) -> NotFound:
    return NotFound(
        "no coupon template with this id",
        reason="COUPON_TEMPLATE_NOT_FOUND",
        metadata={"template_id": template_id},
    )


def _period(
    request: pb.GetCouponStatisticsRequest | pb.ExportCouponStatisticsRequest,
) -> tuple[dt.datetime, dt.datetime]:
    v = Violations()
    if not request.HasField("start_time"):
        v.add("start_time", "required")
    if not request.HasField("end_time"):
        v.add("end_time", "required")
    v.raise_if_any()
    start = request.start_time.ToDatetime(dt.UTC)
    end = request.end_time.ToDatetime(dt.UTC)
    if not start < end <= start + MAX_PERIOD:
        raise InvalidArgument([FieldViolation("end_time", "after start_time, within ten years")])
    return start, end


STATISTICS_COLUMNS = (
    Column("Template ID", 18),
    Column("Template", 30),
    Column("Store", 10),
    Column("Issued", 10),
    Column("Redeemed", 10),
    Column("Expired", 10),
    Column("Redemption rate %", 18),
    Column("Discount given", 16, "amount"),
    Column("Sales attributed", 16, "amount"),
)


class CouponsServicer(pricing_pb2_grpc.CouponsServiceServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.db = ctx.db
        self.members = members_client(ctx)

    # --- templates ------------------------------------------------------------------

    async def CreateCouponTemplate(
        self, request: pb.CreateCouponTemplateRequest, context: Context
    ) -> pb.CouponTemplate:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        check_request_id(request.request_id)
        template = template_from_proto(request.template, rules.new_template_id())
        now = utcnow()

        async def create(session: AsyncSession) -> pb.CouponTemplate:
            await store.insert_template(
                session, template, principal=principal.subject, store_id=principal.store_id, now=now
            )
            record = await store.get_template(session, template.template_id)
            assert record is not None
            return template_to_proto(record)

        return await run_idempotent(
            self.db,
            method="campaigns.CreateCouponTemplate",
            request_id=request.request_id,
            request=request,
            response_type=pb.CouponTemplate,
            work=create,
        )

    async def GetCouponTemplate(
        self, request: pb.GetCouponTemplateRequest, context: Context
    ) -> pb.CouponTemplate:
        current_principal().require_role(*READING_ROLES)
        template_id = required(request.template_id, "template_id")
        async with self.db.sessions() as session:
            record = await store.get_template(session, template_id)
        if record is None:
            raise _template_not_found(template_id)
        return template_to_proto(record)

    async def ListCouponTemplates(
        self, request: pb.ListCouponTemplatesRequest, context: Context
    ) -> pb.ListCouponTemplatesResponse:
        current_principal().require_role(*READING_ROLES)
        size = page_size(request.page_size)
        after = newest_first_after(request.page_token)
        async with self.db.sessions() as session:
            found = await store.list_templates(session, after=after, limit=size + 1)
        response = pb.ListCouponTemplatesResponse(
            templates=[template_to_proto(r) for r in found[:size]]
        )
        if len(found) > size:
            last = found[size - 1]
            response.next_page_token = newest_first_token(
                last.created_at, last.template.template_id
            )
        return response

    # --- issuing ------------------------------------------------------------------------

    async def IssueCoupons(self, request: pb.IssueCouponsRequest, context: Context) -> pb.IssueJob:
        principal = current_principal()
        principal.require_role(*ISSUING_ROLES)
        check_request_id(request.request_id)
        template_id = required(request.template_id, "template_id")
        segment_id, unique = _issue_targets(request)
        fingerprint = request_fingerprint(request)
        async with self.db.sessions() as session:
            job = await store.get_job(session, request_id=request.request_id)
            template = await store.get_template(session, template_id)
            segment = await segment_store.get_segment(session, segment_id) if segment_id else None
        inline = len(unique) <= rules.INLINE_ISSUE_LIMIT
        if job is None:
            if template is None:
                raise _template_not_found(template_id)
            if segment_id and segment is None:
                raise segment_not_found(segment_id)
            if segment is not None:
                # Small segments are issued within the call, like short lists.
                count = await self.members.count_members(
                    coupon_ledger.criteria_of(segment.criteria)
                )
                inline = count <= rules.INLINE_ISSUE_LIMIT
            job = store.JobRecord(
                job_id=rules.new_job_id(),
                request_id=request.request_id,
                request_hash=fingerprint,
                template_id=template_id,
                state=JobState.RUNNING,
                total=len(unique),
                processed=0,
                issued=0,
                skipped=0,
                created_by=principal.subject,
                created_store_id=principal.store_id,
                created_at=utcnow(),
                finished_at=None,
                segment_id=segment.segment_id if segment else "",
                segment_version=segment.version if segment else 0,
                criteria=segment.criteria if segment else None,
                selecting=segment is not None,
            )
            try:
                async with self.db.transaction() as session:
                    await store.insert_job(session, job, unique)
            except Exception:
                # A concurrent duplicate inserted it first.
                async with self.db.sessions() as session:
                    found = await store.get_job(session, request_id=request.request_id)
                if found is None:
                    raise
                job = found
        else:
            inline = job.total <= rules.INLINE_ISSUE_LIMIT and not job.selecting
        if job.request_hash != fingerprint:
            raise InvalidArgument(
                [FieldViolation("request_id", "already used for a different request")],
                message="this request_id was already used with a different payload",
                reason="IDEMPOTENCY_KEY_REUSED",
            )
        if inline and job.state == JobState.RUNNING:
            await coupon_ledger.run_job(self.db, job.job_id, self.members)
        async with self.db.sessions() as session:
            done = await store.get_job(session, job_id=job.job_id)
            assert done is not None
            return await job_to_proto(session, done)

    async def GetIssueJob(self, request: pb.GetIssueJobRequest, context: Context) -> pb.IssueJob:
        current_principal().require_role(*READING_ROLES)
        job_id = required(request.job_id, "job_id")
        async with self.db.sessions() as session:
            job = await store.get_job(session, job_id=job_id)
            if job is None:
                raise NotFound(
                    "no issue job with this id",
                    reason="ISSUE_JOB_NOT_FOUND",
                    metadata={"job_id": job_id},
                )
            return await job_to_proto(session, job)

    # --- wallets ------------------------------------------------------------------------

    async def ListMemberCoupons(
        self, request: pb.ListMemberCouponsRequest, context: Context
    ) -> pb.ListMemberCouponsResponse:
        current_principal().require_role(*READING_ROLES)
        member_id = required(request.member_id, "member_id")
        if any(s not in STATES for s in request.states):
            raise InvalidArgument([FieldViolation("states", "coupon states")])
        size = page_size(request.page_size)
        after = newest_first_after(request.page_token)
        async with self.db.sessions() as session:
            found = await store.member_coupons(
                session,
                member_id,
                [STATES[s] for s in request.states],
                after=after,
                limit=size + 1,
            )
            response = pb.ListMemberCouponsResponse(
                coupons=await coupons_to_proto(session, found[:size])
            )
        if len(found) > size:
            last = found[size - 1]
            response.next_page_token = newest_first_token(last.issued_at, last.coupon_id)
        return response

    async def GetCoupon(self, request: pb.GetCouponRequest, context: Context) -> pb.Coupon:
        current_principal().require_role(*READING_ROLES)
        coupon_id, code = request.coupon_id.strip(), rules.normalise_code(request.code)
        if bool(coupon_id) == bool(code):
            raise InvalidArgument([FieldViolation("coupon_id", "give a coupon_id or a code")])
        async with self.db.sessions() as session:
            found = await store.get_coupon(session, coupon_id=coupon_id, code=code)
            if found is None:
                raise NotFound("no such coupon", reason="COUPON_NOT_FOUND")
            return (await coupons_to_proto(session, [found]))[0]

    # --- the reservation lifecycle -------------------------------------------------------

    def _stamp(self) -> coupon_ledger.Stamp:
        principal = current_principal()
        principal.require_role(*CHECKOUT_ROLES)
        return coupon_ledger.Stamp(principal.subject, principal.store_id, utcnow())

    async def CommitCoupons(
        self, request: pb.CommitCouponsRequest, context: Context
    ) -> pb.CommitCouponsResponse:
        stamp = self._stamp()
        reservation_id = required(request.reservation_id, "reservation_id")
        sale_id = required(request.sale_id, "sale_id")
        sale_total = request.sale_total.minor_units if request.HasField("sale_total") else None
        if sale_total is not None and sale_total < 0:
            raise InvalidArgument([FieldViolation("sale_total.minor_units", "not negative")])
        async with self.db.transaction() as session:
            done = await coupon_ledger.commit(session, reservation_id, sale_id, sale_total, stamp)
            protos = await coupons_to_proto(session, [c for c, _ in done])
        return pb.CommitCouponsResponse(
            coupons=[
                pb.CommittedCoupon(coupon=p, committed=ok)
                for p, (_, ok) in zip(protos, done, strict=True)
            ]
        )

    async def ReleaseCoupons(
        self, request: pb.ReleaseCouponsRequest, context: Context
    ) -> pb.ReleaseCouponsResponse:
        stamp = self._stamp()
        reservation_id = required(request.reservation_id, "reservation_id")
        if len(request.reason) > 200:
            raise InvalidArgument([FieldViolation("reason", "at most 200 characters")])
        async with self.db.transaction() as session:
            released = await coupon_ledger.release(session, reservation_id, stamp)
            return pb.ReleaseCouponsResponse(coupons=await coupons_to_proto(session, released))

    async def RestoreCoupons(
        self, request: pb.RestoreCouponsRequest, context: Context
    ) -> pb.RestoreCouponsResponse:
        stamp = self._stamp()
        sale_id = required(request.sale_id, "sale_id")
        refund_id = required(request.refund_id, "refund_id")

        async def restore(session: AsyncSession) -> pb.RestoreCouponsResponse:
            restored, kept = await coupon_ledger.restore(
                session, sale_id, refund_id, request.whole_sale, stamp
            )
            return pb.RestoreCouponsResponse(
                restored=await coupons_to_proto(session, restored),
                kept=await coupons_to_proto(session, kept),
            )

        return await run_idempotent(
            self.db,
            method="campaigns.RestoreCoupons",
            request_id=refund_id,
            request=request,
            response_type=pb.RestoreCouponsResponse,
            work=restore,
        )

    # --- statistics ------------------------------------------------------------------------

    async def _statistics(
        self, request: pb.GetCouponStatisticsRequest | pb.ExportCouponStatisticsRequest
    ) -> tuple[list[pb.CouponStatisticsRow], dt.datetime, dt.datetime]:
        principal = current_principal()
        principal.require_role(*STATISTICS_ROLES)
        start, end = _period(request)
        store_id = request.store_id.strip()
        if not principal.has_any((Role.HQ_ADMIN, Role.REGION_MANAGER)):
            # A store manager sees their own store.
            if store_id and store_id != principal.store_id:
                principal.require_store(store_id)
            store_id = principal.store_id
        async with self.db.sessions() as session:
            found = await store.statistics(
                session,
                template_id=request.template_id.strip(),
                store_id=store_id,
                start=start,
                end=end,
            )
            templates = await store.templates_by_id(session, {r.template_id for r in found})
        rows = []
        for r in found:
            template = templates.get(r.template_id)
            currency = template.template.currency if template else ""
            rows.append(
                pb.CouponStatisticsRow(
                    template_id=r.template_id,
                    display_name=template.template.name if template else "",
                    store_id=r.store_id,
                    issued=r.issued,
                    redeemed=r.redeemed,
                    expired=r.expired,
                    redemption_rate_bps=rules.redemption_rate_bps(r.issued, r.redeemed),
                    discount_given=money(currency, r.discount),
                    sales_attributed=money(currency, r.sales),
                )
            )
        return rows, start, end

    async def GetCouponStatistics(
        self, request: pb.GetCouponStatisticsRequest, context: Context
    ) -> pb.CouponStatistics:
        rows, start, end = await self._statistics(request)
        return pb.CouponStatistics(rows=rows, start_time=timestamp(start), end_time=timestamp(end))

    async def ExportCouponStatistics(
        self, request: pb.ExportCouponStatisticsRequest, context: Context
    ) -> AsyncIterator[pb.ExportCouponStatisticsChunk]:
        rows, start, end = await self._statistics(request)
        currency = next((r.discount_given.currency_code for r in rows), "")
        cells = [
            (
                r.template_id,
                r.display_name,
                r.store_id or "HQ",
                r.issued,
                r.redeemed,
                r.expired,
                r.redemption_rate_bps / 100,
                r.discount_given.minor_units,
                r.sales_attributed.minor_units,
            )
            for r in rows
        ]
        data = await asyncio.to_thread(
            write_xlsx,
            "Coupon statistics",
            STATISTICS_COLUMNS,
            cells,
            currency=currency,
            footer=f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC",
        )
        name = f"coupon-statistics-{start:%Y%m%d}-{end:%Y%m%d}.xlsx"
        for index, piece in enumerate(chunks(data)):
            chunk = pb.ExportCouponStatisticsChunk(data=piece)
            if index == 0:
                chunk.file_name = name
                chunk.content_type = XLSX_CONTENT_TYPE
            yield chunk
