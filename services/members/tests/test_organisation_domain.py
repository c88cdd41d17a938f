"""The organisation rules: codes, time zones, currencies, addresses, which
roles fit which assignment, who may manage whom, when a store may close,
reopen or take members, who may look after members, passwords and
lockout."""

from __future__ import annotations

import datetime as dt

import pytest

from chassis.auth import Principal, Role, Scope, ScopeLevel
from chassis.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Violations
from services.members.domain import organisation as org

NOW = dt.datetime(2026, 11, 23, 9, 0, tzinfo=dt.UTC)
SHANGHAI = org.Address(province="上海市", city="上海市", district="黄浦区", street="南京东路 1 号")


def violations(exc: pytest.ExceptionInfo[InvalidArgument]) -> dict[str, str]:
    return {v.field: v.description for v in exc.value.violations}


def store(**changes: object) -> org.StoreFields:
    base: dict[str, object] = {
        "store_id": "S001",
        "region_id": "EAST",
        "display_name": " 南京东路店 ",
        "address": SHANGHAI,
        "time_zone": "Asia/Shanghai",
        "currency": "cny",
    }
    base.update(changes)
    return org.StoreFields(**base)  # type: ignore[arg-type]


def principal(role: Role, scope: Scope) -> Principal:
    return Principal(subject="ST1", roles=frozenset({role}), scope=scope)


@pytest.mark.parametrize("code", ["EAST", "S001", "NORTH-2", "A_B", "X"])
def test_codes_accepted(code: str) -> None:
    assert org.is_code(code)


@pytest.mark.parametrize("code", ["", "east", "S 001", "-S1", "S" * 33, "S00é"])
def test_codes_refused(code: str) -> None:
    assert not org.is_code(code)


def test_a_valid_store_is_normalised() -> None:
    fields = org.validate_store(store())
    assert fields.display_name == "南京东路店"
    assert fields.currency == "CNY"
    assert fields.address.street == "南京东路 1 号"


@pytest.mark.parametrize("zone", ["Asia/Shanghai", "Europe/Madrid", "UTC"])
def test_iana_time_zones_accepted(zone: str) -> None:
    assert org.is_time_zone(zone)


@pytest.mark.parametrize("zone", ["", "Asia/Beijing", "CST+8", "../etc/passwd", "/etc/localtime"])
def test_unknown_time_zones_refused(zone: str) -> None:
    assert not org.is_time_zone(zone)


def test_every_store_problem_is_reported_at_once() -> None:
    with pytest.raises(InvalidArgument) as exc:
        org.validate_store(
            store(
                store_id="s1",
                time_zone="Mars/Olympus",
                currency="CYN",
                address=org.Address(postcode="!!"),
                display_name="",
            )
        )
    found = violations(exc)
    assert set(found) >= {
        "store.store_id",
        "store.time_zone",
        "store.currency_code",
        "store.display_name",
        "store.address.province",
        "store.address.city",
        "store.address.street",
        "store.address.postcode",
    }


@pytest.mark.parametrize("currency", ["CNY", "EUR", "usd"])
def test_currencies_accepted(currency: str) -> None:
    assert org.validate_store(store(currency=currency)).currency == currency.upper()


def test_region_needs_a_code_and_a_name() -> None:
    assert org.validate_region("EAST", " 华东 ").display_name == "华东"
    with pytest.raises(InvalidArgument) as exc:
        org.validate_region("east", "")
    assert set(violations(exc)) == {"region.region_id", "region.display_name"}


def test_update_mask_must_name_updatable_fields() -> None:
    assert org.check_update_mask(["display_name"], org.REGION_UPDATABLE) == {"display_name"}
    with pytest.raises(InvalidArgument):
        org.check_update_mask([], org.REGION_UPDATABLE)
    with pytest.raises(InvalidArgument) as exc:
        org.check_update_mask(["region_id"], org.REGION_UPDATABLE)
    assert "update_mask" in violations(exc)


def test_login_ids() -> None:
    assert org.normalise_login_id("  Li.Na ") == "li.na"
    v = Violations()
    org.check_login_id("li.na", "login_id", v)
    assert not v
    for bad in ("", "ab", "li na", "Li.Na", "x" * 65):
        v = Violations()
        org.check_login_id(bad, "login_id", v)
        assert v, bad


# -- roles and assignments ------------------------------------------------------------


@pytest.mark.parametrize(
    ("roles", "assignment"),
    [
        ({Role.HQ_ADMIN}, org.HQ),
        ({Role.CALL_CENTER}, org.HQ),
        ({Role.REGION_MANAGER}, org.Assignment(org.AssignmentLevel.REGION, "EAST")),
        (
            {Role.STORE_MANAGER, Role.STORE_OPERATOR},
            org.Assignment(org.AssignmentLevel.STORE, "S001"),
        ),
    ],
)
def test_roles_that_fit_their_assignment(roles: set[Role], assignment: org.Assignment) -> None:
    fields = org.validate_staff("Wang Fang", assignment, roles)
    assert fields.roles == frozenset(roles)


@pytest.mark.parametrize(
    ("roles", "assignment"),
    [
        ({Role.STORE_OPERATOR}, org.HQ),
        ({Role.HQ_ADMIN}, org.Assignment(org.AssignmentLevel.STORE, "S001")),
        (
            {Role.REGION_MANAGER, Role.STORE_MANAGER},
            org.Assignment(org.AssignmentLevel.REGION, "E"),
        ),
        ({Role.PARTNER}, org.HQ),
        ({Role.SERVICE}, org.HQ),
        (set(), org.HQ),
    ],
)
def test_roles_that_do_not_fit_are_refused(roles: set[Role], assignment: org.Assignment) -> None:
    with pytest.raises(InvalidArgument) as exc:
        org.validate_staff("Wang Fang", assignment, roles)
    assert "staff_member.roles" in violations(exc)


def test_assignment_ids() -> None:
    with pytest.raises(InvalidArgument) as exc:
        org.validate_staff("A", org.Assignment(org.AssignmentLevel.HQ, "X"), {Role.HQ_ADMIN})
    assert "staff_member.assignment.id" in violations(exc)
    with pytest.raises(InvalidArgument):
        org.validate_staff("A", org.Assignment(org.AssignmentLevel.STORE, ""), {Role.STORE_MANAGER})


def test_token_scopes() -> None:
    store_a = org.Assignment(org.AssignmentLevel.STORE, "S001")
    assert str(org.token_scope(store_a, frozenset({Role.STORE_OPERATOR}))) == "store:S001"
    region = org.Assignment(org.AssignmentLevel.REGION, "EAST")
    assert str(org.token_scope(region, frozenset({Role.REGION_MANAGER}))) == "region:EAST"
    assert str(org.token_scope(org.HQ, frozenset({Role.HQ_ADMIN}))) == "hq"
    assert str(org.token_scope(org.HQ, frozenset({Role.CALL_CENTER}))) == "call_center"


EAST = Scope(ScopeLevel.REGION, "EAST")
S001 = org.Assignment(org.AssignmentLevel.STORE, "S001")
OPERATOR = frozenset({Role.STORE_OPERATOR})


def test_hq_admin_manages_everyone() -> None:
    admin = principal(Role.HQ_ADMIN, Scope(ScopeLevel.HQ))
    org.require_may_manage(admin, org.HQ, frozenset({Role.HQ_ADMIN}), None)
    org.require_may_manage(admin, S001, OPERATOR, "WEST")


def test_region_manager_manages_store_staff_of_its_region_only() -> None:
    manager = principal(Role.REGION_MANAGER, EAST)
    org.require_may_manage(manager, S001, frozenset({Role.STORE_MANAGER}), "EAST")
    with pytest.raises(PermissionDenied) as exc:
        org.require_may_manage(manager, S001, OPERATOR, "WEST")
    assert exc.value.reason == "OUT_OF_SCOPE"
    with pytest.raises(PermissionDenied) as exc:
        org.require_may_manage(
            manager,
            org.Assignment(org.AssignmentLevel.REGION, "EAST"),
            frozenset({Role.REGION_MANAGER}),
            None,
        )
    assert exc.value.reason == "ROLE_NOT_GRANTABLE"


def test_store_manager_manages_operators_of_its_store_only() -> None:
    manager = principal(Role.STORE_MANAGER, Scope(ScopeLevel.STORE, "S001"))
    org.require_may_manage(manager, S001, OPERATOR, "EAST")
    s002 = org.Assignment(org.AssignmentLevel.STORE, "S002")
    with pytest.raises(PermissionDenied):
        org.require_may_manage(manager, s002, OPERATOR, "EAST")
    with pytest.raises(PermissionDenied):
        org.require_may_manage(manager, S001, frozenset({Role.STORE_MANAGER}), "EAST")


def test_operators_manage_no_one() -> None:
    operator = principal(Role.STORE_OPERATOR, Scope(ScopeLevel.STORE, "S001"))
    with pytest.raises(PermissionDenied) as exc:
        org.require_may_manage(operator, S001, OPERATOR, "EAST")
    assert exc.value.reason == "ROLE_NOT_ALLOWED"


# -- passwords ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("password", "ok"),
    [("short", False), ("long enough", True), ("x" * 129, False), (" padded pass ", False)],
)
def test_password_strength(password: str, ok: bool) -> None:
    v = Violations()
    org.check_password(password, v)
    assert (not v) is ok


def test_five_wrong_passwords_lock_for_a_few_minutes() -> None:
    state = org.LoginState()
    for attempt in range(1, org.MAX_FAILED_ATTEMPTS):
        state = org.after_failure(state, NOW)
        assert state.failed_attempts == attempt
        assert not org.is_locked(state, NOW)
    state = org.after_failure(state, NOW)
    assert org.is_locked(state, NOW)
    assert org.is_locked(state, NOW + dt.timedelta(minutes=4))
    assert not org.is_locked(state, NOW + org.LOCKOUT)
    assert dt.timedelta(minutes=1) <= org.LOCKOUT <= dt.timedelta(minutes=15)


def test_after_the_lock_the_count_starts_again() -> None:
    locked = org.LoginState(0, NOW)
    later = NOW + dt.timedelta(minutes=1)
    state = org.after_failure(locked, later)
    assert state == org.LoginState(1, None)


def test_success_clears_the_count() -> None:
    assert org.LoginState(0, None) == org.AFTER_SUCCESS


def test_staff_ids_are_readable() -> None:
    staff_id = org.new_staff_id()
    assert staff_id.startswith("ST")
    assert len(staff_id) == 12
    assert not set(staff_id[2:]) & set("ILOU")


def test_a_store_closes_only_without_active_staff() -> None:
    org.check_store_may_close("S001", active_staff=0)
    with pytest.raises(FailedPrecondition) as refused:
        org.check_store_may_close("S001", active_staff=2)
    assert refused.value.reason == "STORE_HAS_ACTIVE_STAFF"
    assert refused.value.metadata == {"store_id": "S001", "active_staff": "2"}


def test_a_store_reopens_only_in_an_open_region() -> None:
    org.check_store_may_reopen("S001", "EAST", region_closed=False)
    with pytest.raises(FailedPrecondition) as refused:
        org.check_store_may_reopen("S001", "EAST", region_closed=True)
    assert refused.value.reason == "REGION_CLOSED"
    assert refused.value.metadata == {"store_id": "S001", "region_id": "EAST"}


def test_a_closed_store_takes_no_members() -> None:
    org.require_open_store("S001", closed=False)
    with pytest.raises(FailedPrecondition) as refused:
        org.require_open_store("S001", closed=True)
    assert refused.value.reason == "STORE_CLOSED"


def test_only_active_staff_look_after_members() -> None:
    assert org.consultant_problem(org.StaffState.ACTIVE) is None
    assert org.consultant_problem(org.StaffState.LEFT) == "this staff member has left"
    assert org.consultant_problem(None) == "no such staff member"
