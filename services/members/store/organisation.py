"""Tables and queries of the organisation tree (regions, stores) and of the
staff directory. Functions run inside the caller's unit of work so that state
and outbox rows commit together.

``get_store`` and ``region_of_store`` are what the rest of the members
service uses to check a store and a region manager's scope, ``get_staff``
to check a consultant.

On PostgreSQL a check that a later write depends on locks the row it read
(``lock``): "share" while enrolling into a store or naming a consultant,
"update" while closing the store, so that a store cannot close under a
staff member being assigned to it, nor a consultant leave under a member
being handed to them. SQLite units of work are serialised anyway.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import Role
from chassis.db import UTCDateTime, is_unique_violation
from services.members.domain.organisation import (
    Address,
    Assignment,
    AssignmentLevel,
    LoginState,
    StaffFields,
    StaffState,
    StoreFields,
)
from services.members.store import metadata

regions = sa.Table(
    "regions",
    metadata,
    sa.Column("region_id", sa.String(32), primary_key=True),
    sa.Column("display_name", sa.String(100), nullable=False),
    sa.Column("closed", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_from_store", sa.String(32), nullable=False, server_default=""),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("updated_by", sa.String(100), nullable=False),
    sa.Column("updated_from_store", sa.String(32), nullable=False, server_default=""),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
)

stores = sa.Table(
    "stores",
    metadata,
    sa.Column("store_id", sa.String(32), primary_key=True),
    sa.Column(
        "region_id", sa.String(32), sa.ForeignKey("regions.region_id"), nullable=False, index=True
    ),
    sa.Column("display_name", sa.String(100), nullable=False),
    sa.Column("province", sa.String(200), nullable=False),
    sa.Column("city", sa.String(200), nullable=False),
    sa.Column("district", sa.String(200), nullable=False, server_default=""),
    sa.Column("street", sa.String(200), nullable=False),
    sa.Column("postcode", sa.String(12), nullable=False, server_default=""),
    sa.Column("time_zone", sa.String(64), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("closed", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_from_store", sa.String(32), nullable=False, server_default=""),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("updated_by", sa.String(100), nullable=False),
    sa.Column("updated_from_store", sa.String(32), nullable=False, server_default=""),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
)

staff = sa.Table(
    "staff",
    metadata,
    sa.Column("staff_id", sa.String(16), primary_key=True),
    sa.Column("display_name", sa.String(100), nullable=False),
    sa.Column("assignment_level", sa.String(10), nullable=False),
    sa.Column("assignment_id", sa.String(32), nullable=False, server_default=""),
    # Sorted role values, comma-separated.
    sa.Column("roles", sa.String(200), nullable=False),
    sa.Column("login_id", sa.String(64), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(200), nullable=True),
    sa.Column("failed_attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("locked_until", UTCDateTime, nullable=True),
    sa.Column("state", sa.String(10), nullable=False, server_default="active"),
    sa.Column("left_at", UTCDateTime, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_from_store", sa.String(32), nullable=False, server_default=""),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("updated_by", sa.String(100), nullable=False),
    sa.Column("updated_from_store", sa.String(32), nullable=False, server_default=""),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    sa.Index("ix_staff_assignment", "assignment_level", "assignment_id"),
)


@dataclass(frozen=True)
class Stamp:
    """Who changes something and from which store (from the token)."""

    principal: str
    store_id: str
    now: dt.datetime


@dataclass(frozen=True)
class Audit:
    created_at: dt.datetime
    created_by: str
    created_from_store: str
    updated_at: dt.datetime
    updated_by: str
    updated_from_store: str
    version: int


@dataclass(frozen=True)
class RegionRecord:
    region_id: str
    display_name: str
    closed: bool
    audit: Audit


@dataclass(frozen=True)
class StoreRecord:
    store_id: str
    region_id: str
    name: str
    time_zone: str
    currency: str
    closed: bool
    address: Address = field(default_factory=Address)
    audit: Audit | None = None


@dataclass(frozen=True)
class StaffRecord:
    staff_id: str
    display_name: str
    assignment: Assignment
    roles: frozenset[Role]
    login_id: str
    state: StaffState
    has_password: bool
    left_at: dt.datetime | None
    audit: Audit


@dataclass(frozen=True)
class Credentials:
    """What a login check needs; never leaves the store and server layers."""

    staff: StaffRecord
    password_hash: str | None
    login: LoginState


Lock = Literal["share", "update"] | None


def _locked(query: sa.Select[Any], lock: Lock) -> sa.Select[Any]:
    return query if lock is None else query.with_for_update(read=lock == "share")


class RegionExists(Exception):
    pass


class StoreExists(Exception):
    pass


class LoginIdTaken(Exception):
    pass


class StaleVersion(Exception):
    """The row changed since the caller read it (etag)."""


def _created(stamp: Stamp) -> dict[str, Any]:
    return {
        "created_at": stamp.now,
        "created_by": stamp.principal,
        "created_from_store": stamp.store_id,
        **_updated(stamp),
        "version": 1,
    }


def _updated(stamp: Stamp) -> dict[str, Any]:
    return {
        "updated_at": stamp.now,
        "updated_by": stamp.principal,
        "updated_from_store": stamp.store_id,
    }


def _audit(m: Any) -> Audit:
    return Audit(
        created_at=m["created_at"],
        created_by=m["created_by"],
        created_from_store=m["created_from_store"],
        updated_at=m["updated_at"],
        updated_by=m["updated_by"],
        updated_from_store=m["updated_from_store"],
        version=m["version"],
    )


async def _versioned_update(
    session: AsyncSession,
    table: sa.Table,
    key: sa.ColumnElement[bool],
    values: dict[str, Any],
    expected_version: int | None,
) -> bool:
    """Update one row and bump its version; False when the row is missing.
    ``StaleVersion`` when ``expected_version`` is given and no longer
    current (a concurrent writer won)."""
    condition = key
    if expected_version is not None:
        condition = sa.and_(key, table.c.version == expected_version)
    result = await session.execute(
        sa.update(table).where(condition).values(**values, version=table.c.version + 1)
    )
    if int(getattr(result, "rowcount", 0) or 0) == 1:
        return True
    if expected_version is None:
        return False
    exists = (await session.execute(sa.select(sa.literal(1)).where(key))).first()
    if exists is None:
        return False
    raise StaleVersion


# -- regions ------------------------------------------------------------------------


def _region(row: sa.Row[Any]) -> RegionRecord:
    m = row._mapping
    return RegionRecord(m["region_id"], m["display_name"], bool(m["closed"]), _audit(m))


async def insert_region(
    session: AsyncSession, region_id: str, display_name: str, stamp: Stamp
) -> RegionRecord:
    try:
        async with session.begin_nested():
            await session.execute(
                sa.insert(regions).values(
                    region_id=region_id, display_name=display_name, closed=False, **_created(stamp)
                )
            )
    except IntegrityError as exc:
        if is_unique_violation(exc):
            raise RegionExists from exc
        raise
    record = await get_region(session, region_id)
    assert record is not None
    return record


async def get_region(
    session: AsyncSession, region_id: str, *, lock: Lock = None
) -> RegionRecord | None:
    query = _locked(sa.select(regions).where(regions.c.region_id == region_id), lock)
    row = (await session.execute(query)).first()
    return None if row is None else _region(row)


async def list_regions(
    session: AsyncSession, *, closed: bool | None, after: str | None, limit: int
) -> list[RegionRecord]:
    query = sa.select(regions).order_by(regions.c.region_id).limit(limit)
    if closed is not None:
        query = query.where(regions.c.closed == closed)
    if after is not None:
        query = query.where(regions.c.region_id > after)
    return [_region(row) for row in (await session.execute(query)).all()]


async def rename_region(
    session: AsyncSession,
    region_id: str,
    display_name: str,
    stamp: Stamp,
    expected_version: int | None,
) -> RegionRecord | None:
    done = await _versioned_update(
        session,
        regions,
        regions.c.region_id == region_id,
        {"display_name": display_name, **_updated(stamp)},
        expected_version,
    )
    return await get_region(session, region_id) if done else None


async def open_store_count(session: AsyncSession, region_id: str) -> int:
    result = await session.execute(
        sa.select(sa.func.count())
        .select_from(stores)
        .where(stores.c.region_id == region_id, stores.c.closed == sa.false())
    )
    return int(result.scalar_one())


async def close_region(session: AsyncSession, region_id: str, stamp: Stamp) -> None:
    await _versioned_update(
        session,
        regions,
        regions.c.region_id == region_id,
        {"closed": True, **_updated(stamp)},
        None,
    )


# -- stores -------------------------------------------------------------------------


def _store(row: sa.Row[Any]) -> StoreRecord:
    m = row._mapping
    return StoreRecord(
        store_id=m["store_id"],
        region_id=m["region_id"],
        name=m["display_name"],
        time_zone=m["time_zone"],
        currency=m["currency"],
        closed=bool(m["closed"]),
        address=Address(
            province=m["province"],
            city=m["city"],
            district=m["district"],
            street=m["street"],
            postcode=m["postcode"],
        ),
        audit=_audit(m),
    )


def _store_values(store: StoreFields) -> dict[str, Any]:
    a = store.address
    return {
        "region_id": store.region_id,
        "display_name": store.display_name,
        "province": a.province,
        "city": a.city,
        "district": a.district,
        "street": a.street,
        "postcode": a.postcode,
        "time_zone": store.time_zone,
        "currency": store.currency,
    }


async def insert_store(session: AsyncSession, store: StoreFields, stamp: Stamp) -> StoreRecord:
    try:
        async with session.begin_nested():
            await session.execute(
                sa.insert(stores).values(
                    store_id=store.store_id, closed=False, **_store_values(store), **_created(stamp)
                )
            )
    except IntegrityError as exc:
        if is_unique_violation(exc):
            raise StoreExists from exc
        raise
    record = await get_store(session, store.store_id)
    assert record is not None
    return record


async def get_store(
    session: AsyncSession, store_id: str, *, lock: Lock = None
) -> StoreRecord | None:
    """The store with this code, open or closed; None when there is none."""
    query = _locked(sa.select(stores).where(stores.c.store_id == store_id), lock)
    row = (await session.execute(query)).first()
    return None if row is None else _store(row)


async def stores_by_id(
    session: AsyncSession, store_ids: Iterable[str], *, lock: Lock = None
) -> dict[str, StoreRecord]:
    """The stores with these codes, open or closed, in one query (an
    import checks a batch's home stores at once); absent ones are left out."""
    wanted = sorted(set(store_ids))
    if not wanted:
        return {}
    query = _locked(sa.select(stores).where(stores.c.store_id.in_(wanted)), lock)
    return {row.store_id: _store(row) for row in (await session.execute(query)).all()}


async def region_of_store(session: AsyncSession, store_id: str) -> str | None:
    """The region a store belongs to (for a region manager's scope check);
    None when the store does not exist."""
    result = await session.execute(
        sa.select(stores.c.region_id).where(stores.c.store_id == store_id)
    )
    region: str | None = result.scalar_one_or_none()
    return region


async def list_stores(
    session: AsyncSession,
    *,
    region_id: str | None,
    closed: bool | None,
    after: str | None,
    limit: int,
) -> list[StoreRecord]:
    query = sa.select(stores).order_by(stores.c.store_id).limit(limit)
    if region_id:
        query = query.where(stores.c.region_id == region_id)
    if closed is not None:
        query = query.where(stores.c.closed == closed)
    if after is not None:
        query = query.where(stores.c.store_id > after)
    return [_store(row) for row in (await session.execute(query)).all()]


async def update_store(
    session: AsyncSession, store: StoreFields, stamp: Stamp, expected_version: int | None
) -> StoreRecord | None:
    done = await _versioned_update(
        session,
        stores,
        stores.c.store_id == store.store_id,
        {**_store_values(store), **_updated(stamp)},
        expected_version,
    )
    return await get_store(session, store.store_id) if done else None


async def close_store(session: AsyncSession, store_id: str, stamp: Stamp) -> None:
    await _versioned_update(
        session, stores, stores.c.store_id == store_id, {"closed": True, **_updated(stamp)}, None
    )


async def reopen_store(session: AsyncSession, store_id: str, stamp: Stamp) -> None:
    await _versioned_update(
        session, stores, stores.c.store_id == store_id, {"closed": False, **_updated(stamp)}, None
    )


async def active_staff_count(session: AsyncSession, store_id: str) -> int:
    """How many active staff members are assigned to the store."""
    result = await session.execute(
        sa.select(sa.func.count())
        .select_from(staff)
        .where(
            staff.c.assignment_level == AssignmentLevel.STORE.value,
            staff.c.assignment_id == store_id,
            staff.c.state == StaffState.ACTIVE.value,
        )
    )
    return int(result.scalar_one())


# -- staff --------------------------------------------------------------------------


def _roles_text(roles: frozenset[Role]) -> str:
    return ",".join(sorted(r.value for r in roles))


def _staff(row: sa.Row[Any]) -> StaffRecord:
    m = row._mapping
    return StaffRecord(
        staff_id=m["staff_id"],
        display_name=m["display_name"],
        assignment=Assignment(AssignmentLevel(m["assignment_level"]), m["assignment_id"]),
        roles=frozenset(Role(r) for r in m["roles"].split(",") if r),
        login_id=m["login_id"],
        state=StaffState(m["state"]),
        has_password=m["password_hash"] is not None,
        left_at=m["left_at"],
        audit=_audit(m),
    )


async def insert_staff(
    session: AsyncSession, staff_id: str, fields: StaffFields, login_id: str, stamp: Stamp
) -> StaffRecord:
    try:
        async with session.begin_nested():
            await session.execute(
                sa.insert(staff).values(
                    staff_id=staff_id,
                    display_name=fields.display_name,
                    assignment_level=fields.assignment.level.value,
                    assignment_id=fields.assignment.id,
                    roles=_roles_text(fields.roles),
                    login_id=login_id,
                    state=StaffState.ACTIVE.value,
                    failed_attempts=0,
                    **_created(stamp),
                )
            )
    except IntegrityError as exc:
        if is_unique_violation(exc) and "login" in str(exc.orig).lower():
            raise LoginIdTaken from exc
        raise
    record = await get_staff(session, staff_id)
    assert record is not None
    return record


async def get_staff(
    session: AsyncSession, staff_id: str, *, lock: Lock = None
) -> StaffRecord | None:
    query = _locked(sa.select(staff).where(staff.c.staff_id == staff_id), lock)
    row = (await session.execute(query)).first()
    return None if row is None else _staff(row)


async def list_staff(
    session: AsyncSession,
    *,
    store_id: str | None,
    region_id: str | None,
    state: StaffState | None,
    after: str | None,
    limit: int,
) -> list[StaffRecord]:
    query = sa.select(staff).order_by(staff.c.staff_id).limit(limit)
    if store_id:
        query = query.where(
            staff.c.assignment_level == AssignmentLevel.STORE.value,
            staff.c.assignment_id == store_id,
        )
    if region_id:
        region_stores = sa.select(stores.c.store_id).where(stores.c.region_id == region_id)
        query = query.where(
            sa.or_(
                sa.and_(
                    staff.c.assignment_level == AssignmentLevel.REGION.value,
                    staff.c.assignment_id == region_id,
                ),
                sa.and_(
                    staff.c.assignment_level == AssignmentLevel.STORE.value,
                    staff.c.assignment_id.in_(region_stores),
                ),
            )
        )
    if state is not None:
        query = query.where(staff.c.state == state.value)
    if after is not None:
        query = query.where(staff.c.staff_id > after)
    return [_staff(row) for row in (await session.execute(query)).all()]


async def update_staff(
    session: AsyncSession,
    staff_id: str,
    fields: StaffFields,
    stamp: Stamp,
    expected_version: int | None,
) -> StaffRecord | None:
    done = await _versioned_update(
        session,
        staff,
        staff.c.staff_id == staff_id,
        {
            "display_name": fields.display_name,
            "assignment_level": fields.assignment.level.value,
            "assignment_id": fields.assignment.id,
            "roles": _roles_text(fields.roles),
            **_updated(stamp),
        },
        expected_version,
    )
    return await get_staff(session, staff_id) if done else None


async def mark_left(session: AsyncSession, staff_id: str, stamp: Stamp) -> StaffRecord | None:
    # The password goes with them: nothing left to guess or to leak.
    done = await _versioned_update(
        session,
        staff,
        staff.c.staff_id == staff_id,
        {
            "state": StaffState.LEFT.value,
            "left_at": stamp.now,
            "password_hash": None,
            "failed_attempts": 0,
            "locked_until": None,
            **_updated(stamp),
        },
        None,
    )
    return await get_staff(session, staff_id) if done else None


async def set_password_hash(
    session: AsyncSession, staff_id: str, password_hash: str, stamp: Stamp
) -> StaffRecord | None:
    done = await _versioned_update(
        session,
        staff,
        staff.c.staff_id == staff_id,
        {
            "password_hash": password_hash,
            "failed_attempts": 0,
            "locked_until": None,
            **_updated(stamp),
        },
        None,
    )
    return await get_staff(session, staff_id) if done else None


async def credentials_by_login(
    session: AsyncSession, login_id: str, *, for_update: bool = False
) -> Credentials | None:
    """``for_update`` locks the row (PostgreSQL) so that concurrent wrong
    guesses each count."""
    query = sa.select(staff).where(staff.c.login_id == login_id)
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).first()
    if row is None:
        return None
    m = row._mapping
    return Credentials(
        staff=_staff(row),
        password_hash=m["password_hash"],
        login=LoginState(int(m["failed_attempts"]), m["locked_until"]),
    )


async def record_login(session: AsyncSession, staff_id: str, state: LoginState) -> None:
    """Store the failed-attempt count and lock after a login attempt. Not a
    change of the staff member's file: no version bump, no audit stamp."""
    await session.execute(
        sa.update(staff)
        .where(staff.c.staff_id == staff_id)
        .values(failed_attempts=state.failed_attempts, locked_until=state.locked_until)
    )
