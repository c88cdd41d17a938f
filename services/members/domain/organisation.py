"""The organisation tree (HQ → regions → stores) and the staff directory.

Pure: no I/O, no clock (``now`` is passed in), no protobuf. Validation of
codes, time zones, currencies and addresses; which roles fit which
assignment; who may manage whom; and the password rules (slow salted hash,
lockout after repeated wrong tries).
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass

from chassis import passwords
from chassis.auth import STAFF_ROLES, Principal, Role, Scope, ScopeLevel
from chassis.errors import FailedPrecondition, PermissionDenied, Violations
from chassis.ids import random_id
from chassis.passwords import MAX_SECRET_LENGTH

# Region and store codes are what the signs and the tills already show:
# upper-case, short, no spaces.
_CODE = re.compile(r"^[A-Z0-9][A-Z0-9_\-]{0,31}$")
_LOGIN_ID = re.compile(r"^[a-z0-9][a-z0-9._\-]{2,63}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_POSTCODE = re.compile(r"^[A-Za-z0-9 \-]{0,12}$")
MAX_NAME_LENGTH = 100
MAX_ADDRESS_PART = 200

# ISO 4217 active codes a chain in our markets may price in. A closed list,
# not just three letters: a typo ("CYN") must not create a store whose sales
# no one can settle.
CURRENCIES = frozenset(
    {
        "AED", "AUD", "BRL", "CAD", "CHF", "CLP", "CNY", "COP", "CZK", "DKK",
        "EUR", "GBP", "HKD", "HUF", "IDR", "ILS", "INR", "JPY", "KRW", "MOP",
        "MXN", "MYR", "NOK", "NZD", "PEN", "PHP", "PLN", "RON", "RUB", "SAR",
        "SEK", "SGD", "THB", "TRY", "TWD", "UAH", "USD", "VND", "ZAR",
    }
)  # fmt: skip

MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = MAX_SECRET_LENGTH
MAX_FAILED_ATTEMPTS = 5
LOCKOUT = dt.timedelta(minutes=5)


class AssignmentLevel(enum.StrEnum):
    HQ = "hq"
    REGION = "region"
    STORE = "store"


class StaffState(enum.StrEnum):
    ACTIVE = "active"
    LEFT = "left"


@dataclass(frozen=True)
class Assignment:
    """Where a staff member works: HQ (no id), a region or a store."""

    level: AssignmentLevel
    id: str = ""

    def __str__(self) -> str:
        return self.level.value if self.level == AssignmentLevel.HQ else f"{self.level}:{self.id}"


HQ = Assignment(AssignmentLevel.HQ)

# The one level each staff role works at.
ROLE_LEVEL: dict[Role, AssignmentLevel] = {
    Role.HQ_ADMIN: AssignmentLevel.HQ,
    Role.CALL_CENTER: AssignmentLevel.HQ,
    Role.REGION_MANAGER: AssignmentLevel.REGION,
    Role.STORE_MANAGER: AssignmentLevel.STORE,
    Role.STORE_OPERATOR: AssignmentLevel.STORE,
}

# The roles a manager may hand out (and so the staff they may manage):
# always below their own, so that no one can raise themselves or a peer.
GRANTABLE: dict[Role, frozenset[Role]] = {
    Role.HQ_ADMIN: frozenset(STAFF_ROLES),
    Role.REGION_MANAGER: frozenset({Role.STORE_MANAGER, Role.STORE_OPERATOR}),
    Role.STORE_MANAGER: frozenset({Role.STORE_OPERATOR}),
}


# -- ids and codes ----------------------------------------------------------------


def new_staff_id() -> str:
    return random_id("ST", 10)


def is_code(text: str) -> bool:
    return bool(_CODE.match(text))


def check_code(text: str, field: str, v: Violations) -> None:
    if not text:
        v.add(field, "required")
    elif not is_code(text):
        v.add(field, "upper-case letters, digits, '-' and '_', at most 32 (e.g. EAST, S001)")


def check_display_name(text: str, field: str, v: Violations) -> str:
    name = text.strip()
    if not name:
        v.add(field, "required")
    elif len(name) > MAX_NAME_LENGTH:
        v.add(field, f"at most {MAX_NAME_LENGTH} characters")
    return name


def is_time_zone(name: str) -> bool:
    if not name or name != name.strip() or name.startswith("/") or ".." in name:
        return False
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def check_time_zone(name: str, field: str, v: Violations) -> None:
    if not name:
        v.add(field, "required: an IANA time zone such as Asia/Shanghai")
    elif not is_time_zone(name):
        v.add(field, "not an IANA time zone (e.g. Asia/Shanghai)")


def check_currency(code: str, field: str, v: Violations) -> None:
    if not code:
        v.add(field, "required: an ISO 4217 code such as CNY")
    elif not _CURRENCY.match(code) or code not in CURRENCIES:
        v.add(field, "not an ISO 4217 currency code this chain can use (e.g. CNY)")


def normalise_login_id(raw: str) -> str:
    return raw.strip().lower()


def check_login_id(login_id: str, field: str, v: Violations) -> None:
    if not login_id:
        v.add(field, "required")
    elif not _LOGIN_ID.match(login_id):
        v.add(field, "3 to 64 lower-case letters, digits, '.', '_' or '-'")


# -- regions and stores -----------------------------------------------------------


@dataclass(frozen=True)
class Address:
    province: str = ""
    city: str = ""
    district: str = ""
    street: str = ""
    postcode: str = ""


def normalise_address(address: Address, field: str, v: Violations) -> Address:
    parts = {
        "province": address.province.strip(),
        "city": address.city.strip(),
        "district": address.district.strip(),
        "street": address.street.strip(),
        "postcode": address.postcode.strip(),
    }
    for name in ("province", "city", "street"):
        if not parts[name]:
            v.add(f"{field}.{name}", "required")
    for name, value in parts.items():
        if len(value) > MAX_ADDRESS_PART:
            v.add(f"{field}.{name}", f"at most {MAX_ADDRESS_PART} characters")
    if not _POSTCODE.match(parts["postcode"]):
        v.add(f"{field}.postcode", "letters, digits, spaces and '-', at most 12")
    return Address(**parts)


@dataclass(frozen=True)
class NewRegion:
    region_id: str
    display_name: str


def validate_region(region_id: str, display_name: str) -> NewRegion:
    v = Violations()
    check_code(region_id, "region.region_id", v)
    name = check_display_name(display_name, "region.display_name", v)
    v.raise_if_any()
    return NewRegion(region_id, name)


@dataclass(frozen=True)
class StoreFields:
    """A store as created, or as it becomes after an update."""

    store_id: str
    region_id: str
    display_name: str
    address: Address
    time_zone: str
    currency: str


def validate_store(store: StoreFields) -> StoreFields:
    v = Violations()
    check_code(store.store_id, "store.store_id", v)
    check_code(store.region_id, "store.region_id", v)
    name = check_display_name(store.display_name, "store.display_name", v)
    address = normalise_address(store.address, "store.address", v)
    time_zone = store.time_zone.strip()
    check_time_zone(time_zone, "store.time_zone", v)
    currency = store.currency.strip().upper()
    check_currency(currency, "store.currency_code", v)
    v.raise_if_any()
    return StoreFields(store.store_id, store.region_id, name, address, time_zone, currency)


# -- a store's life -----------------------------------------------------------------


def check_store_may_close(store_id: str, *, active_staff: int) -> None:
    """A store closes only once no active staff member is assigned to it:
    a login scoped to a closed store would act for a store that no longer
    trades, and its staff belong somewhere. They are moved to another store
    or marked left first. Its members need no such step: they stay its
    members (their history happened there) until someone moves them."""
    if active_staff:
        raise FailedPrecondition(
            "active staff are assigned to this store: move them to another store "
            "or mark them left first",
            reason="STORE_HAS_ACTIVE_STAFF",
            metadata={"store_id": store_id, "active_staff": str(active_staff)},
        )


def check_store_may_reopen(store_id: str, region_id: str, *, region_closed: bool) -> None:
    """A store reopens in its own region, which must be open."""
    if region_closed:
        raise FailedPrecondition(
            "the store's region is closed",
            reason="REGION_CLOSED",
            metadata={"store_id": store_id, "region_id": region_id},
        )


def require_open_store(store_id: str, *, closed: bool) -> None:
    """A closed store takes no one: no new member, no member moving in."""
    if closed:
        raise FailedPrecondition(
            "this store is closed and takes no members",
            reason="STORE_CLOSED",
            metadata={"store_id": store_id},
        )


def consultant_problem(state: StaffState | None) -> str | None:
    """Why a staff member (None: no such staff member) cannot start looking
    after members; None when they can."""
    if state is None:
        return "no such staff member"
    if state != StaffState.ACTIVE:
        return "this staff member has left"
    return None


# -- update masks -------------------------------------------------------------------

REGION_UPDATABLE = frozenset({"display_name"})
STORE_UPDATABLE = frozenset({"display_name", "address", "time_zone", "currency_code", "region_id"})
STAFF_UPDATABLE = frozenset({"display_name", "roles", "assignment"})


def check_update_mask(paths: Iterable[str], allowed: frozenset[str]) -> frozenset[str]:
    """The mask's paths, each one an updatable field; an empty mask is
    refused rather than read as "everything", so that a client that forgot
    the mask cannot blank a record."""
    chosen = frozenset(paths)
    v = Violations()
    if not chosen:
        v.add("update_mask", f"required: one or more of {', '.join(sorted(allowed))}")
    for path in sorted(chosen - allowed):
        v.add("update_mask", f"{path!r} cannot be updated; one of {', '.join(sorted(allowed))}")
    v.raise_if_any()
    return chosen


def etag(version: int) -> str:
    return f'W/"{version}"'


# -- staff --------------------------------------------------------------------------


@dataclass(frozen=True)
class StaffFields:
    display_name: str
    assignment: Assignment
    roles: frozenset[Role]


def check_roles_fit(
    roles: frozenset[Role], assignment: Assignment, field: str, v: Violations
) -> None:
    if not roles:
        v.add(f"{field}.roles", "at least one role")
        return
    for role in sorted(roles):
        if role not in STAFF_ROLES:
            v.add(f"{field}.roles", f"{role.value} is not a staff role")
        elif ROLE_LEVEL[role] != assignment.level:
            v.add(
                f"{field}.roles",
                f"{role.value} works at {ROLE_LEVEL[role].value} level, "
                f"not at the assignment's ({assignment.level.value})",
            )


def validate_staff(
    display_name: str, assignment: Assignment, roles: Iterable[Role], field: str = "staff_member"
) -> StaffFields:
    v = Violations()
    name = check_display_name(display_name, f"{field}.display_name", v)
    if assignment.level == AssignmentLevel.HQ:
        if assignment.id:
            v.add(f"{field}.assignment.id", "must be empty for HQ")
    else:
        check_code(assignment.id, f"{field}.assignment.id", v)
    role_set = frozenset(roles)
    check_roles_fit(role_set, assignment, field, v)
    v.raise_if_any()
    return StaffFields(name, assignment, role_set)


def token_scope(assignment: Assignment, roles: frozenset[Role]) -> Scope:
    """The scope a staff member's tokens carry. Call-center agents at HQ
    get the call-center scope, not HQ: the least that lets them work."""
    if assignment.level == AssignmentLevel.STORE:
        return Scope(ScopeLevel.STORE, assignment.id)
    if assignment.level == AssignmentLevel.REGION:
        return Scope(ScopeLevel.REGION, assignment.id)
    if Role.HQ_ADMIN not in roles:
        return Scope(ScopeLevel.CALL_CENTER)
    return Scope(ScopeLevel.HQ)


def _denied(message: str, reason: str = "OUT_OF_SCOPE") -> PermissionDenied:
    return PermissionDenied(message, reason=reason)


def grantable_by(principal: Principal) -> frozenset[Role]:
    granted: set[Role] = set()
    for role in principal.roles:
        granted |= GRANTABLE.get(role, frozenset())
    return frozenset(granted)


def assignment_in_scope(
    principal: Principal, assignment: Assignment, region_of_store: str | None
) -> bool:
    """Whether ``assignment`` lies inside the principal's organisation
    scope (``region_of_store``: the region of the assignment's store)."""
    scope = principal.scope
    if scope.level == ScopeLevel.HQ:
        return True
    if scope.level == ScopeLevel.REGION:
        if assignment.level == AssignmentLevel.REGION:
            return assignment.id == scope.id
        if assignment.level == AssignmentLevel.STORE:
            return region_of_store is not None and region_of_store == scope.id
        return False
    if scope.level == ScopeLevel.STORE:
        return assignment.level == AssignmentLevel.STORE and assignment.id == scope.id
    return False


def require_may_manage(
    principal: Principal,
    assignment: Assignment,
    roles: frozenset[Role],
    region_of_store: str | None,
) -> None:
    """A manager manages staff inside their scope whose roles are all
    below their own (see GRANTABLE)."""
    allowed = grantable_by(principal)
    if not allowed:
        raise _denied("your role may not manage staff", "ROLE_NOT_ALLOWED")
    if not roles <= allowed:
        raise _denied("you may not grant or manage these roles", "ROLE_NOT_GRANTABLE")
    if not assignment_in_scope(principal, assignment, region_of_store):
        raise _denied("this assignment is outside your organisation scope")


# -- passwords ----------------------------------------------------------------------


def check_password(password: str, v: Violations, field: str = "password") -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        v.add(field, f"at least {MIN_PASSWORD_LENGTH} characters")
    elif len(password) > MAX_PASSWORD_LENGTH:
        v.add(field, f"at most {MAX_PASSWORD_LENGTH} characters")
    elif password.strip() != password or not password.strip():
        v.add(field, "must not begin or end with spaces")


@dataclass(frozen=True)
class LoginState:
    failed_attempts: int = 0
    locked_until: dt.datetime | None = None


def is_locked(state: LoginState, now: dt.datetime) -> bool:
    return passwords.is_locked(state.locked_until, now)


def after_failure(state: LoginState, now: dt.datetime) -> LoginState:
    """One more wrong password. The fifth in a row locks the account for a
    few minutes; the count then starts again."""
    return LoginState(
        *passwords.after_wrong_try(
            state.failed_attempts,
            state.locked_until,
            now,
            max_tries=MAX_FAILED_ATTEMPTS,
            lock=LOCKOUT,
        )
    )


AFTER_SUCCESS = LoginState()
