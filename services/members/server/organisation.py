"""The organisation gRPC edge: regions, stores and the staff directory.

proto <-> domain, who may do what (see the service comment in
organisation.proto), errors. Passwords are hashed off the event loop and
never logged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession

from chassis import passwords
from chassis.auth import STAFF_ROLES, Principal, Role, ScopeLevel, current_principal
from chassis.db import utcnow
from chassis.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Violations,
)
from chassis.grpcserver import Context
from chassis.idempotency import run_idempotent
from chassis.logs import get_logger
from chassis.paging import decode_token, encode_token, page_size
from chassis.service import ServiceContext
from cornucopia.common.v1 import org_pb2
from cornucopia.members.v1 import organisation_pb2 as pb
from cornucopia.members.v1 import organisation_pb2_grpc
from services.members import events
from services.members.domain import organisation as domain
from services.members.store import organisation as store

log = get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R", bound=Message)

READING_ROLES = (*STAFF_ROLES, Role.SERVICE)

ROLES: dict[pb.StaffRole.ValueType, Role] = {
    pb.STAFF_ROLE_HQ_ADMIN: Role.HQ_ADMIN,
    pb.STAFF_ROLE_REGION_MANAGER: Role.REGION_MANAGER,
    pb.STAFF_ROLE_STORE_MANAGER: Role.STORE_MANAGER,
    pb.STAFF_ROLE_STORE_OPERATOR: Role.STORE_OPERATOR,
    pb.STAFF_ROLE_CALL_CENTER: Role.CALL_CENTER,
}
ROLES_PROTO = {v: k for k, v in ROLES.items()}
LEVELS: dict[org_pb2.OrgLevel.ValueType, domain.AssignmentLevel] = {
    org_pb2.ORG_LEVEL_HQ: domain.AssignmentLevel.HQ,
    org_pb2.ORG_LEVEL_REGION: domain.AssignmentLevel.REGION,
    org_pb2.ORG_LEVEL_STORE: domain.AssignmentLevel.STORE,
}
LEVELS_PROTO = {v: k for k, v in LEVELS.items()}
STAFF_STATES: dict[pb.StaffState.ValueType, domain.StaffState] = {
    pb.STAFF_STATE_ACTIVE: domain.StaffState.ACTIVE,
    pb.STAFF_STATE_LEFT: domain.StaffState.LEFT,
}
STAFF_STATES_PROTO = {v: k for k, v in STAFF_STATES.items()}

BAD_CREDENTIALS = "the login id or the password is wrong"


# -- proto <-> domain ---------------------------------------------------------------


def _stamp(principal: str, store_id: str, when: object) -> org_pb2.AuditStamp:
    stamp = org_pb2.AuditStamp(principal=principal, store_id=store_id)
    stamp.time.FromDatetime(when)  # type: ignore[arg-type]
    return stamp


def _fill_audit(msg: pb.Region | pb.Store | pb.StaffMember, audit: store.Audit) -> None:
    msg.create_time.FromDatetime(audit.created_at)
    msg.update_time.FromDatetime(audit.updated_at)
    msg.etag = domain.etag(audit.version)
    msg.created_by.CopyFrom(_stamp(audit.created_by, audit.created_from_store, audit.created_at))
    msg.updated_by.CopyFrom(_stamp(audit.updated_by, audit.updated_from_store, audit.updated_at))


def _state(closed: bool) -> pb.OrgUnitState.ValueType:
    return pb.ORG_UNIT_STATE_CLOSED if closed else pb.ORG_UNIT_STATE_OPEN


def region_proto(record: store.RegionRecord) -> pb.Region:
    msg = pb.Region(
        region_id=record.region_id, display_name=record.display_name, state=_state(record.closed)
    )
    _fill_audit(msg, record.audit)
    return msg


def store_proto(record: store.StoreRecord) -> pb.Store:
    a = record.address
    msg = pb.Store(
        store_id=record.store_id,
        region_id=record.region_id,
        display_name=record.name,
        address=pb.StoreAddress(
            province=a.province,
            city=a.city,
            district=a.district,
            street=a.street,
            postcode=a.postcode,
        ),
        time_zone=record.time_zone,
        currency_code=record.currency,
        state=_state(record.closed),
    )
    if record.audit is not None:
        _fill_audit(msg, record.audit)
    return msg


def staff_proto(record: store.StaffRecord) -> pb.StaffMember:
    msg = pb.StaffMember(
        staff_id=record.staff_id,
        display_name=record.display_name,
        assignment=org_pb2.OrgUnitRef(
            level=LEVELS_PROTO[record.assignment.level], id=record.assignment.id
        ),
        roles=sorted(ROLES_PROTO[r] for r in record.roles),
        login_id=record.login_id,
        state=STAFF_STATES_PROTO[record.state],
        has_password=record.has_password,
    )
    if record.left_at is not None:
        msg.leave_time.FromDatetime(record.left_at)
    _fill_audit(msg, record.audit)
    return msg


def _address(msg: pb.StoreAddress) -> domain.Address:
    return domain.Address(
        province=msg.province,
        city=msg.city,
        district=msg.district,
        street=msg.street,
        postcode=msg.postcode,
    )


def _store_fields(msg: pb.Store) -> domain.StoreFields:
    return domain.StoreFields(
        store_id=msg.store_id.strip(),
        region_id=msg.region_id.strip(),
        display_name=msg.display_name,
        address=_address(msg.address),
        time_zone=msg.time_zone,
        currency=msg.currency_code,
    )


def _record_fields(record: store.StoreRecord) -> domain.StoreFields:
    return domain.StoreFields(
        record.store_id,
        record.region_id,
        record.name,
        record.address,
        record.time_zone,
        record.currency,
    )


def _assignment(ref: org_pb2.OrgUnitRef, field: str) -> domain.Assignment:
    level = LEVELS.get(ref.level)
    if level is None:
        raise InvalidArgument(
            [FieldViolation(f"{field}.assignment.level", "one of HQ, REGION or STORE")]
        )
    return domain.Assignment(level, ref.id.strip())


def _roles(values: Iterable[pb.StaffRole.ValueType], field: str) -> frozenset[Role]:
    roles: set[Role] = set()
    for value in values:
        role = ROLES.get(value)
        if role is None:
            raise InvalidArgument([FieldViolation(f"{field}.roles", "unknown role")])
        roles.add(role)
    return frozenset(roles)


def _expected_version(tag: str) -> int | None:
    """The version a weak etag (``W/"3"``) names; None when none was sent."""
    if not tag:
        return None
    text = tag.removeprefix("W/").strip('"')
    if not text.isdigit():
        raise InvalidArgument([FieldViolation("etag", "not an etag this service issued")])
    return int(text)


def _stale() -> Aborted:
    return Aborted(
        "the record changed since you read it; read it again and retry",
        reason="ETAG_MISMATCH",
    )


def _after(token: str) -> str | None:
    key = decode_token(token)
    if key is None:
        return None
    after = key.get("k")
    if not isinstance(after, str):
        raise InvalidArgument([FieldViolation("page_token", "not a token this service issued")])
    return after


def _page(rows: list[T], limit: int, key: Callable[[T], str]) -> tuple[list[T], str]:
    page = rows[:limit]
    token = encode_token({"k": key(page[-1])}) if len(rows) > limit else ""
    return page, token


def _required(value: str, field: str) -> str:
    if not value.strip():
        raise InvalidArgument([FieldViolation(field, "required")])
    return value.strip()


def _region_missing(region_id: str) -> NotFound:
    return NotFound(
        "no region with this id", reason="REGION_NOT_FOUND", metadata={"region_id": region_id}
    )


def _store_missing(store_id: str) -> NotFound:
    return NotFound(
        "no store with this id", reason="STORE_NOT_FOUND", metadata={"store_id": store_id}
    )


def _staff_missing(staff_id: str) -> NotFound:
    return NotFound(
        "no staff member with this id",
        reason="STAFF_NOT_FOUND",
        metadata={"staff_id": staff_id},
    )


# -- authorisation ------------------------------------------------------------------


def _require_hq_admin(principal: Principal) -> None:
    principal.require_role(Role.HQ_ADMIN)
    if principal.scope.level != ScopeLevel.HQ:
        raise PermissionDenied(
            "only HQ may do this", reason="OUT_OF_SCOPE", metadata={"scope": str(principal.scope)}
        )


def _require_region_store_manager(principal: Principal, region_id: str) -> None:
    """HQ admins manage every store; a region manager the stores of its
    own region."""
    principal.require_role(Role.HQ_ADMIN, Role.REGION_MANAGER)
    scope = principal.scope
    if Role.HQ_ADMIN in principal.roles and scope.level == ScopeLevel.HQ:
        return
    if (
        Role.REGION_MANAGER in principal.roles
        and scope.level == ScopeLevel.REGION
        and scope.id == region_id
    ):
        return
    raise PermissionDenied(
        "this region is outside your organisation scope",
        reason="OUT_OF_SCOPE",
        metadata={"scope": str(scope), "region_id": region_id},
    )


class OrganisationServicer(organisation_pb2_grpc.OrganisationServiceServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.db = ctx.db

    def _stamp(self, principal: Principal) -> store.Stamp:
        return store.Stamp(principal.subject, principal.store_id, utcnow())

    async def _create(
        self,
        method: str,
        request_id: str,
        request: Message,
        response_type: type[R],
        work: Callable[[AsyncSession], Awaitable[R]],
    ) -> R:
        return await run_idempotent(
            self.db,
            method=f"members.{method}",
            request_id=request_id,
            request=request,
            response_type=response_type,
            work=work,
        )

    # -- regions --------------------------------------------------------------------

    async def CreateRegion(self, request: pb.CreateRegionRequest, context: Context) -> pb.Region:
        principal = current_principal()
        _require_hq_admin(principal)
        region = domain.validate_region(
            request.region.region_id.strip(), request.region.display_name
        )
        stamp = self._stamp(principal)

        async def create(session: AsyncSession) -> pb.Region:
            try:
                record = await store.insert_region(
                    session, region.region_id, region.display_name, stamp
                )
            except store.RegionExists:
                raise AlreadyExists(
                    "a region with this id exists",
                    reason="REGION_EXISTS",
                    metadata={"region_id": region.region_id},
                ) from None
            return region_proto(record)

        return await self._create("CreateRegion", request.request_id, request, pb.Region, create)

    async def GetRegion(self, request: pb.GetRegionRequest, context: Context) -> pb.Region:
        current_principal().require_role(*READING_ROLES)
        region_id = _required(request.region_id, "region_id")
        async with self.db.sessions() as session:
            record = await store.get_region(session, region_id)
        if record is None:
            raise _region_missing(region_id)
        return region_proto(record)

    async def ListRegions(
        self, request: pb.ListRegionsRequest, context: Context
    ) -> pb.ListRegionsResponse:
        current_principal().require_role(*READING_ROLES)
        limit = page_size(request.page_size)
        async with self.db.sessions() as session:
            rows = await store.list_regions(
                session,
                closed=_closed_filter(request.state),
                after=_after(request.page_token),
                limit=limit + 1,
            )
        page, token = _page(rows, limit, lambda r: r.region_id)
        return pb.ListRegionsResponse(
            regions=[region_proto(r) for r in page], next_page_token=token
        )

    async def UpdateRegion(self, request: pb.UpdateRegionRequest, context: Context) -> pb.Region:
        principal = current_principal()
        _require_hq_admin(principal)
        domain.check_update_mask(request.update_mask.paths, domain.REGION_UPDATABLE)
        region_id = _required(request.region.region_id, "region.region_id")
        region = domain.validate_region(region_id, request.region.display_name)
        expected = _expected_version(request.region.etag)
        async with self.db.transaction() as session:
            try:
                record = await store.rename_region(
                    session, region_id, region.display_name, self._stamp(principal), expected
                )
            except store.StaleVersion:
                raise _stale() from None
        if record is None:
            raise _region_missing(region_id)
        return region_proto(record)

    async def CloseRegion(self, request: pb.CloseRegionRequest, context: Context) -> pb.Region:
        principal = current_principal()
        _require_hq_admin(principal)
        region_id = _required(request.region_id, "region_id")
        async with self.db.transaction() as session:
            record = await store.get_region(session, region_id, lock="update")
            if record is None:
                raise _region_missing(region_id)
            if not record.closed:
                open_stores = await store.open_store_count(session, region_id)
                if open_stores:
                    raise FailedPrecondition(
                        "close or move the region's stores first",
                        reason="REGION_HAS_OPEN_STORES",
                        metadata={"region_id": region_id, "open_stores": str(open_stores)},
                    )
                await store.close_region(session, region_id, self._stamp(principal))
                record = await store.get_region(session, region_id)
        assert record is not None
        return region_proto(record)

    # -- stores ---------------------------------------------------------------------

    async def _open_region(self, session: AsyncSession, region_id: str) -> None:
        region = await store.get_region(session, region_id, lock="share")
        if region is None:
            raise _region_missing(region_id)
        if region.closed:
            raise FailedPrecondition(
                "this region is closed", reason="REGION_CLOSED", metadata={"region_id": region_id}
            )

    async def CreateStore(self, request: pb.CreateStoreRequest, context: Context) -> pb.Store:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN, Role.REGION_MANAGER)
        fields = domain.validate_store(_store_fields(request.store))
        _require_region_store_manager(principal, fields.region_id)
        stamp = self._stamp(principal)

        async def create(session: AsyncSession) -> pb.Store:
            await self._open_region(session, fields.region_id)
            try:
                record = await store.insert_store(session, fields, stamp)
            except store.StoreExists:
                raise AlreadyExists(
                    "a store with this id exists",
                    reason="STORE_EXISTS",
                    metadata={"store_id": fields.store_id},
                ) from None
            await events.store_opened(
                session,
                store_id=record.store_id,
                region_id=record.region_id,
                time_zone=record.time_zone,
                currency_code=record.currency,
                opened_at=stamp.now,
            )
            return store_proto(record)

        return await self._create("CreateStore", request.request_id, request, pb.Store, create)

    async def GetStore(self, request: pb.GetStoreRequest, context: Context) -> pb.Store:
        current_principal().require_role(*READING_ROLES)
        store_id = _required(request.store_id, "store_id")
        async with self.db.sessions() as session:
            record = await store.get_store(session, store_id)
        if record is None:
            raise _store_missing(store_id)
        return store_proto(record)

    async def ListStores(
        self, request: pb.ListStoresRequest, context: Context
    ) -> pb.ListStoresResponse:
        current_principal().require_role(*READING_ROLES)
        limit = page_size(request.page_size)
        async with self.db.sessions() as session:
            rows = await store.list_stores(
                session,
                region_id=request.region_id.strip() or None,
                closed=_closed_filter(request.state),
                after=_after(request.page_token),
                limit=limit + 1,
            )
        page, token = _page(rows, limit, lambda r: r.store_id)
        return pb.ListStoresResponse(stores=[store_proto(r) for r in page], next_page_token=token)

    async def UpdateStore(self, request: pb.UpdateStoreRequest, context: Context) -> pb.Store:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN, Role.REGION_MANAGER)
        mask = domain.check_update_mask(request.update_mask.paths, domain.STORE_UPDATABLE)
        store_id = _required(request.store.store_id, "store.store_id")
        expected = _expected_version(request.store.etag)
        wanted = _store_fields(request.store)
        async with self.db.transaction() as session:
            current = await store.get_store(session, store_id)
            if current is None:
                raise _store_missing(store_id)
            _require_region_store_manager(principal, current.region_id)
            if current.closed:
                raise FailedPrecondition(
                    "this store is closed", reason="STORE_CLOSED", metadata={"store_id": store_id}
                )
            before = _record_fields(current)
            merged = domain.validate_store(
                domain.StoreFields(
                    store_id=store_id,
                    region_id=wanted.region_id if "region_id" in mask else before.region_id,
                    display_name=wanted.display_name
                    if "display_name" in mask
                    else before.display_name,
                    address=wanted.address if "address" in mask else before.address,
                    time_zone=wanted.time_zone if "time_zone" in mask else before.time_zone,
                    currency=wanted.currency if "currency_code" in mask else before.currency,
                )
            )
            if merged.region_id != before.region_id:
                _require_region_store_manager(principal, merged.region_id)
                await self._open_region(session, merged.region_id)
            try:
                record = await store.update_store(session, merged, self._stamp(principal), expected)
            except store.StaleVersion:
                raise _stale() from None
        assert record is not None
        return store_proto(record)

    async def CloseStore(self, request: pb.CloseStoreRequest, context: Context) -> pb.Store:
        principal = current_principal()
        _require_hq_admin(principal)
        store_id = _required(request.store_id, "store_id")
        async with self.db.transaction() as session:
            record = await store.get_store(session, store_id, lock="update")
            if record is None:
                raise _store_missing(store_id)
            if not record.closed:
                domain.check_store_may_close(
                    store_id, active_staff=await store.active_staff_count(session, store_id)
                )
                stamp = self._stamp(principal)
                await store.close_store(session, store_id, stamp)
                await events.store_closed(
                    session, store_id=store_id, region_id=record.region_id, closed_at=stamp.now
                )
                record = await store.get_store(session, store_id)
        assert record is not None
        return store_proto(record)

    async def ReopenStore(self, request: pb.ReopenStoreRequest, context: Context) -> pb.Store:
        principal = current_principal()
        _require_hq_admin(principal)
        store_id = _required(request.store_id, "store_id")
        async with self.db.transaction() as session:
            record = await store.get_store(session, store_id, lock="update")
            if record is None:
                raise _store_missing(store_id)
            if record.closed:
                region = await store.get_region(session, record.region_id, lock="share")
                domain.check_store_may_reopen(
                    store_id, record.region_id, region_closed=region is None or region.closed
                )
                stamp = self._stamp(principal)
                await store.reopen_store(session, store_id, stamp)
                await events.store_reopened(
                    session,
                    store_id=store_id,
                    region_id=record.region_id,
                    time_zone=record.time_zone,
                    currency_code=record.currency,
                    reopened_at=stamp.now,
                )
                record = await store.get_store(session, store_id)
        assert record is not None
        return store_proto(record)

    # -- staff ----------------------------------------------------------------------

    async def _check_assignment(
        self, session: AsyncSession, assignment: domain.Assignment
    ) -> str | None:
        """The assignment names an open region or store; returns the
        store's region for a store assignment."""
        if assignment.level == domain.AssignmentLevel.REGION:
            await self._open_region(session, assignment.id)
            return None
        if assignment.level == domain.AssignmentLevel.STORE:
            record = await store.get_store(session, assignment.id, lock="share")
            if record is None:
                raise _store_missing(assignment.id)
            if record.closed:
                raise FailedPrecondition(
                    "this store is closed",
                    reason="STORE_CLOSED",
                    metadata={"store_id": assignment.id},
                )
            return record.region_id
        return None

    async def _require_manages(
        self, session: AsyncSession, principal: Principal, record: store.StaffRecord
    ) -> None:
        region = None
        if record.assignment.level == domain.AssignmentLevel.STORE:
            region = await store.region_of_store(session, record.assignment.id)
        domain.require_may_manage(principal, record.assignment, record.roles, region)

    async def CreateStaffMember(
        self, request: pb.CreateStaffMemberRequest, context: Context
    ) -> pb.StaffMember:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN, Role.REGION_MANAGER, Role.STORE_MANAGER)
        msg = request.staff_member
        v = Violations()
        login_id = domain.normalise_login_id(msg.login_id)
        domain.check_login_id(login_id, "staff_member.login_id", v)
        v.raise_if_any()
        fields = domain.validate_staff(
            msg.display_name,
            _assignment(msg.assignment, "staff_member"),
            _roles(msg.roles, "staff_member"),
        )
        stamp = self._stamp(principal)

        async def create(session: AsyncSession) -> pb.StaffMember:
            region = await self._check_assignment(session, fields.assignment)
            domain.require_may_manage(principal, fields.assignment, fields.roles, region)
            try:
                record = await store.insert_staff(
                    session, domain.new_staff_id(), fields, login_id, stamp
                )
            except store.LoginIdTaken:
                raise AlreadyExists("this login id is taken", reason="LOGIN_ID_IN_USE") from None
            return staff_proto(record)

        return await self._create(
            "CreateStaffMember", request.request_id, request, pb.StaffMember, create
        )

    async def GetStaffMember(
        self, request: pb.GetStaffMemberRequest, context: Context
    ) -> pb.StaffMember:
        current_principal().require_role(*READING_ROLES)
        staff_id = _required(request.staff_id, "staff_id")
        async with self.db.sessions() as session:
            record = await store.get_staff(session, staff_id)
        if record is None:
            raise _staff_missing(staff_id)
        return staff_proto(record)

    async def ListStaff(
        self, request: pb.ListStaffRequest, context: Context
    ) -> pb.ListStaffResponse:
        current_principal().require_role(*READING_ROLES)
        limit = page_size(request.page_size)
        state = None
        if request.state != pb.STAFF_STATE_UNSPECIFIED:
            state = STAFF_STATES.get(request.state)
            if state is None:
                raise InvalidArgument([FieldViolation("state", "unknown value")])
        async with self.db.sessions() as session:
            rows = await store.list_staff(
                session,
                store_id=request.store_id.strip() or None,
                region_id=request.region_id.strip() or None,
                state=state,
                after=_after(request.page_token),
                limit=limit + 1,
            )
        page, token = _page(rows, limit, lambda r: r.staff_id)
        return pb.ListStaffResponse(staff=[staff_proto(r) for r in page], next_page_token=token)

    async def UpdateStaffMember(
        self, request: pb.UpdateStaffMemberRequest, context: Context
    ) -> pb.StaffMember:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN, Role.REGION_MANAGER, Role.STORE_MANAGER)
        mask = domain.check_update_mask(request.update_mask.paths, domain.STAFF_UPDATABLE)
        msg = request.staff_member
        staff_id = _required(msg.staff_id, "staff_member.staff_id")
        expected = _expected_version(msg.etag)
        async with self.db.transaction() as session:
            current = await store.get_staff(session, staff_id)
            if current is None:
                raise _staff_missing(staff_id)
            await self._require_manages(session, principal, current)
            if current.state == domain.StaffState.LEFT:
                raise FailedPrecondition(
                    "this staff member has left",
                    reason="STAFF_LEFT",
                    metadata={"staff_id": staff_id},
                )
            fields = domain.validate_staff(
                msg.display_name if "display_name" in mask else current.display_name,
                _assignment(msg.assignment, "staff_member")
                if "assignment" in mask
                else current.assignment,
                _roles(msg.roles, "staff_member") if "roles" in mask else current.roles,
            )
            region = await self._check_assignment(session, fields.assignment)
            domain.require_may_manage(principal, fields.assignment, fields.roles, region)
            try:
                record = await store.update_staff(
                    session, staff_id, fields, self._stamp(principal), expected
                )
            except store.StaleVersion:
                raise _stale() from None
        assert record is not None
        return staff_proto(record)

    async def MarkStaffLeft(
        self, request: pb.MarkStaffLeftRequest, context: Context
    ) -> pb.StaffMember:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN, Role.REGION_MANAGER, Role.STORE_MANAGER)
        staff_id = _required(request.staff_id, "staff_id")
        async with self.db.transaction() as session:
            record = await store.get_staff(session, staff_id)
            if record is None:
                raise _staff_missing(staff_id)
            await self._require_manages(session, principal, record)
            if record.state == domain.StaffState.ACTIVE:
                stamp = self._stamp(principal)
                record = await store.mark_left(session, staff_id, stamp)
                assert record is not None
                await events.staff_left(
                    session,
                    staff_id=staff_id,
                    assignment=str(record.assignment),
                    left_at=stamp.now,
                )
        return staff_proto(record)

    async def SetStaffPassword(
        self, request: pb.SetStaffPasswordRequest, context: Context
    ) -> pb.StaffMember:
        principal = current_principal()
        principal.require_role(*STAFF_ROLES)
        staff_id = _required(request.staff_id, "staff_id")
        v = Violations()
        domain.check_password(request.password, v)
        v.raise_if_any()
        async with self.db.sessions() as session:
            current = await store.get_staff(session, staff_id)
            if current is None:
                raise _staff_missing(staff_id)
            if principal.subject != staff_id:
                await self._require_manages(session, principal, current)
        if current.state == domain.StaffState.LEFT:
            raise FailedPrecondition(
                "this staff member has left", reason="STAFF_LEFT", metadata={"staff_id": staff_id}
            )
        hashed = await asyncio.to_thread(passwords.hash_secret, request.password)
        async with self.db.transaction() as session:
            record = await store.set_password_hash(
                session, staff_id, hashed, self._stamp(principal)
            )
        if record is None:
            raise _staff_missing(staff_id)
        log.info("staff password set", staff_id=staff_id)
        return staff_proto(record)

    async def VerifyStaffCredentials(
        self, request: pb.VerifyStaffCredentialsRequest, context: Context
    ) -> pb.VerifyStaffCredentialsResponse:
        current_principal().require_role(Role.SERVICE)
        login_id = domain.normalise_login_id(request.login_id)
        password = request.password
        refused = Unauthenticated(BAD_CREDENTIALS, reason="INVALID_CREDENTIALS")
        if not login_id or not password or len(password) > domain.MAX_PASSWORD_LENGTH:
            raise refused
        async with self.db.sessions() as session:
            creds = await store.credentials_by_login(session, login_id)
        now = utcnow()
        if (
            creds is None
            or creds.password_hash is None
            or creds.staff.state != domain.StaffState.ACTIVE
            or domain.is_locked(creds.login, now)
        ):
            # The same work as a real check: timing must not tell which
            # login ids exist, have left or are locked.
            await asyncio.to_thread(passwords.secret_matches, password, passwords.DUMMY_HASH)
            if creds is not None:
                log.info("staff login refused", staff_id=creds.staff.staff_id)
            raise refused
        matches = await asyncio.to_thread(passwords.secret_matches, password, creds.password_hash)
        staff_id = creds.staff.staff_id
        accepted = False
        async with self.db.transaction() as session:
            fresh = await store.credentials_by_login(session, login_id, for_update=True)
            if fresh is not None and fresh.staff.staff_id == staff_id:
                if matches and not domain.is_locked(fresh.login, now):
                    accepted = True
                    if fresh.login != domain.AFTER_SUCCESS:
                        await store.record_login(session, staff_id, domain.AFTER_SUCCESS)
                elif not matches:
                    after = domain.after_failure(fresh.login, now)
                    await store.record_login(session, staff_id, after)
                    if domain.is_locked(after, now):
                        log.warning("staff login locked", staff_id=staff_id)
        if not accepted:
            log.info("staff login refused", staff_id=staff_id)
            raise refused
        staff = creds.staff
        scope = domain.token_scope(staff.assignment, staff.roles)
        store_id = staff.assignment.id if scope.level == ScopeLevel.STORE else ""
        return pb.VerifyStaffCredentialsResponse(
            staff_member=staff_proto(staff), scope=str(scope), store_id=store_id
        )


def _closed_filter(state: pb.OrgUnitState.ValueType) -> bool | None:
    if state == pb.ORG_UNIT_STATE_UNSPECIFIED:
        return None
    if state == pb.ORG_UNIT_STATE_OPEN:
        return False
    if state == pb.ORG_UNIT_STATE_CLOSED:
        return True
    raise InvalidArgument([FieldViolation("state", "unknown value")])
