"""Tokens (mint/verify) and the two authorisation questions every service
asks: is this role allowed, is this store inside the caller's scope."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chassis.auth import (
    ALGORITHM,
    AUDIENCE,
    ISSUER,
    Principal,
    Role,
    Scope,
    ScopeLevel,
    current_principal,
    mint_token,
    reset_current_principal,
    service_token,
    set_current_principal,
    verify_token,
)
from chassis.errors import Code, PermissionDenied, Unauthenticated

SECRET = "test-secret-of-a-reasonable-length-0123456789"
OTHER_SECRET = "another-secret-of-a-reasonable-length-9876543210"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "staff-1",
        "iat": now,
        "exp": now + 600,
        "roles": ["store_operator"],
        "scope": "store:S001",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def signed(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def unauthenticated_reason(token: str, secret: str = SECRET) -> str:
    with pytest.raises(Unauthenticated) as caught:
        verify_token(secret, token)
    assert caught.value.code is Code.UNAUTHENTICATED
    return caught.value.reason


# -- mint / verify ------------------------------------------------------------


def test_a_store_token_round_trips_subject_roles_scope_and_store() -> None:
    token = mint_token(
        SECRET,
        "staff-42",
        [Role.STORE_OPERATOR, "store_manager"],
        Scope(ScopeLevel.STORE, "S001"),
    )
    principal = verify_token(SECRET, token)
    assert principal.subject == "staff-42"
    assert principal.roles == frozenset({Role.STORE_OPERATOR, Role.STORE_MANAGER})
    assert principal.scope == Scope(ScopeLevel.STORE, "S001")
    # A store-scoped token records the store it acts from.
    assert principal.store_id == "S001"
    assert principal.claims["iss"] == ISSUER


def test_an_hq_token_has_no_store_unless_one_is_given() -> None:
    hq = verify_token(SECRET, mint_token(SECRET, "admin", [Role.HQ_ADMIN], Scope(ScopeLevel.HQ)))
    assert hq.scope == Scope(ScopeLevel.HQ)
    assert hq.store_id == ""
    assert "store" not in hq.claims
    region = verify_token(
        SECRET,
        mint_token(
            SECRET,
            "rm",
            [Role.REGION_MANAGER],
            Scope(ScopeLevel.REGION, "EAST"),
            store_id="S007",
        ),
    )
    assert region.scope == Scope(ScopeLevel.REGION, "EAST")
    assert region.store_id == "S007"


def test_the_token_lives_for_its_ttl() -> None:
    now = 1_900_000_000
    token = mint_token(SECRET, "s", [Role.HQ_ADMIN], Scope(ScopeLevel.HQ), ttl_seconds=60, now=now)
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["iat"] == now
    assert payload["exp"] == now + 60
    assert payload["roles"] == ["hq_admin"]


scopes = st.one_of(
    st.sampled_from([Scope(ScopeLevel.HQ), Scope(ScopeLevel.CALL_CENTER)]),
    st.builds(
        Scope,
        st.sampled_from([ScopeLevel.REGION, ScopeLevel.STORE, ScopeLevel.PARTNER]),
        st.from_regex(r"[A-Z0-9_\-]{1,12}", fullmatch=True),
    ),
)


@given(
    subject=st.text(min_size=1, max_size=40),
    roles=st.sets(st.sampled_from(list(Role)), min_size=1),
    scope=scopes,
)
def test_any_token_round_trips(subject: str, roles: set[Role], scope: Scope) -> None:
    principal = verify_token(SECRET, mint_token(SECRET, subject, roles, scope))
    assert principal.subject == subject
    assert principal.roles == frozenset(roles)
    assert principal.scope == scope
    if scope.level == ScopeLevel.STORE:
        assert principal.store_id == scope.id


def test_a_token_needs_a_known_role() -> None:
    with pytest.raises(ValueError):
        mint_token(SECRET, "s", [], Scope(ScopeLevel.HQ))
    with pytest.raises(ValueError):
        mint_token(SECRET, "s", ["emperor"], Scope(ScopeLevel.HQ))


def test_an_expired_token_is_refused_as_expired() -> None:
    token = mint_token(
        SECRET,
        "s",
        [Role.HQ_ADMIN],
        Scope(ScopeLevel.HQ),
        ttl_seconds=60,
        now=time.time() - 3600,
    )
    assert unauthenticated_reason(token) == "TOKEN_EXPIRED"


def test_a_token_signed_with_another_secret_is_invalid() -> None:
    token = mint_token(OTHER_SECRET, "s", [Role.HQ_ADMIN], Scope(ScopeLevel.HQ))
    assert unauthenticated_reason(token) == "TOKEN_INVALID"


def test_a_tampered_token_is_invalid() -> None:
    token = mint_token(SECRET, "s", [Role.STORE_OPERATOR], Scope(ScopeLevel.STORE, "S001"))
    header, _payload, signature = token.split(".")
    # Keep the signature, swap in claims that promote the caller to HQ.
    forged_payload = signed(claims(roles=["hq_admin"], scope="hq"), OTHER_SECRET).split(".")[1]
    assert unauthenticated_reason(f"{header}.{forged_payload}.{signature}") == "TOKEN_INVALID"
    # A flipped character in the signature.
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    assert unauthenticated_reason(f"{header}.{_payload}.{flipped}") == "TOKEN_INVALID"


@pytest.mark.parametrize("garbage", ["", "not-a-token", "a.b.c", "Bearer x.y.z"])
def test_garbage_is_invalid(garbage: str) -> None:
    assert unauthenticated_reason(garbage) == "TOKEN_INVALID"


def test_an_unsigned_token_is_invalid() -> None:
    token = jwt.encode(claims(), key=None, algorithm="none")
    assert unauthenticated_reason(token) == "TOKEN_INVALID"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(claims(roles=["emperor"]), id="unknown role"),
        pytest.param(claims(roles=["store_operator", "emperor"]), id="one unknown role"),
        pytest.param(claims(roles=[]), id="no role"),
        pytest.param(claims(roles=None), id="roles missing"),
        pytest.param(claims(scope="galaxy:1"), id="unknown scope level"),
        pytest.param(claims(scope="store"), id="store scope without id"),
        pytest.param(claims(aud="someone-else"), id="wrong audience"),
        pytest.param(claims(iss="someone-else"), id="wrong issuer"),
        pytest.param(claims(exp=None), id="no expiry"),
        pytest.param(claims(sub=None), id="no subject"),
    ],
)
def test_a_token_with_unknown_or_missing_claims_is_invalid(payload: dict[str, Any]) -> None:
    assert unauthenticated_reason(signed(payload)) == "TOKEN_INVALID"


# -- scopes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hq", Scope(ScopeLevel.HQ)),
        ("call_center", Scope(ScopeLevel.CALL_CENTER)),
        ("store:S001", Scope(ScopeLevel.STORE, "S001")),
        ("region:EAST", Scope(ScopeLevel.REGION, "EAST")),
        ("partner:P1", Scope(ScopeLevel.PARTNER, "P1")),
    ],
)
def test_scope_parses(text: str, expected: Scope) -> None:
    assert Scope.parse(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "unknown scope level"),
        ("galaxy", "unknown scope level"),
        ("galaxy:1", "unknown scope level"),
        ("HQ", "unknown scope level"),
        ("store", "needs an id"),
        ("store:", "needs an id"),
        ("region", "needs an id"),
        ("partner", "needs an id"),
    ],
)
def test_scope_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Scope.parse(text)


@given(scopes)
def test_scope_text_round_trips(scope: Scope) -> None:
    assert Scope.parse(str(scope)) == scope


# -- authorisation ----------------------------------------------------------------


def principal(scope: str, *roles: Role) -> Principal:
    return Principal(subject="p", roles=frozenset(roles), scope=Scope.parse(scope))


def test_require_role_accepts_any_of_the_roles() -> None:
    manager = principal("store:S001", Role.STORE_MANAGER)
    manager.require_role(Role.STORE_MANAGER)
    manager.require_role(Role.HQ_ADMIN, Role.STORE_MANAGER)


def test_require_role_refuses_other_roles_and_says_which_were_needed() -> None:
    operator = principal("store:S001", Role.STORE_OPERATOR)
    with pytest.raises(PermissionDenied) as caught:
        operator.require_role(Role.STORE_MANAGER, Role.HQ_ADMIN)
    assert caught.value.code is Code.PERMISSION_DENIED
    assert caught.value.reason == "ROLE_NOT_ALLOWED"
    assert caught.value.metadata == {"required_any_of": "hq_admin,store_manager"}


@pytest.mark.parametrize(
    ("who", "store_id", "region_of_store"),
    [
        pytest.param(principal("store:S001", Role.STORE_OPERATOR), "S001", None, id="own store"),
        pytest.param(
            principal("region:EAST", Role.REGION_MANAGER), "S001", "EAST", id="store of region"
        ),
        pytest.param(principal("hq", Role.HQ_ADMIN), "S999", None, id="hq"),
        pytest.param(principal("call_center", Role.CALL_CENTER), "S999", None, id="call center"),
        pytest.param(principal("partner:P1", Role.SERVICE), "S999", None, id="service"),
    ],
)
def test_require_store_allows(who: Principal, store_id: str, region_of_store: str | None) -> None:
    who.require_store(store_id, region_of_store)


@pytest.mark.parametrize(
    ("who", "store_id", "region_of_store"),
    [
        pytest.param(principal("store:S001", Role.STORE_MANAGER), "S002", None, id="another store"),
        pytest.param(
            principal("store:S001", Role.STORE_MANAGER), "S002", "S001", id="region is not store"
        ),
        pytest.param(
            principal("region:EAST", Role.REGION_MANAGER), "S001", None, id="region unknown"
        ),
        pytest.param(
            principal("region:EAST", Role.REGION_MANAGER), "S001", "WEST", id="other region"
        ),
        pytest.param(principal("partner:P1", Role.PARTNER), "S001", None, id="partner"),
    ],
)
def test_require_store_denies_outside_scope(
    who: Principal, store_id: str, region_of_store: str | None
) -> None:
    with pytest.raises(PermissionDenied) as caught:
        who.require_store(store_id, region_of_store)
    assert caught.value.reason == "OUT_OF_SCOPE"
    assert caught.value.metadata == {"scope": str(who.scope), "store_id": store_id}


def test_the_current_principal_is_per_call() -> None:
    with pytest.raises(Unauthenticated) as caught:
        current_principal()
    assert caught.value.reason == "MISSING_CREDENTIALS"
    who = principal("hq", Role.HQ_ADMIN)
    token = set_current_principal(who)
    try:
        assert current_principal() is who
    finally:
        reset_current_principal(token)
    with pytest.raises(Unauthenticated):
        current_principal()


def test_a_service_token_is_short_lived_chain_wide_and_names_its_service() -> None:
    principal = verify_token(SECRET, service_token(SECRET, "cards"))
    assert principal.subject == "cards"
    assert principal.has_any((Role.SERVICE,))
    assert not principal.has_any((Role.HQ_ADMIN,))
    assert principal.scope.level == ScopeLevel.HQ
    stale = service_token(SECRET, "cards", now=time.time() - 120)
    with pytest.raises(Unauthenticated):
        verify_token(SECRET, stale)


def test_a_verified_token_is_still_refused_once_it_expires() -> None:
    """Kept verified tokens are checked for expiry on every use."""
    token = mint_token(SECRET, "s", [Role.HQ_ADMIN], Scope(ScopeLevel.HQ), ttl_seconds=1)
    first = verify_token(SECRET, token)
    assert verify_token(SECRET, token) is first
    time.sleep(max(0.0, first.claims["exp"] - time.time()) + 0.05)
    assert unauthenticated_reason(token) == "TOKEN_EXPIRED"


def test_a_verified_token_is_kept_per_secret() -> None:
    token = mint_token(SECRET, "s", [Role.HQ_ADMIN], Scope(ScopeLevel.HQ))
    verify_token(SECRET, token)
    with pytest.raises(Unauthenticated):
        verify_token(OTHER_SECRET, token)


def test_a_service_token_is_reused_for_half_its_life(monkeypatch: pytest.MonkeyPatch) -> None:
    import chassis.auth as auth

    start = time.time()
    monkeypatch.setattr(auth.time, "time", lambda: start)
    token = service_token(SECRET, "reuse-test")
    monkeypatch.setattr(auth.time, "time", lambda: start + auth.SERVICE_TOKEN_REUSE_SECONDS - 1)
    assert service_token(SECRET, "reuse-test") == token
    assert service_token(OTHER_SECRET, "reuse-test") != token
    monkeypatch.setattr(auth.time, "time", lambda: start + auth.SERVICE_TOKEN_REUSE_SECONDS + 1)
    renewed = service_token(SECRET, "reuse-test")
    assert renewed != token
    claims = jwt.decode(renewed, options={"verify_signature": False})
    assert claims["iat"] == int(start + auth.SERVICE_TOKEN_REUSE_SECONDS + 1)
