"""Signed tokens carrying a principal, its roles and its organisation scope.

Tokens are JWTs (HS256 with the chain's secret). The scope is the unit of the
organisation the principal acts for: HQ, a region, a store, the call center or
a partner. Services decide what a role may do; this module only says who is
calling and checks the two questions every service asks: is this role allowed,
and is this store inside the caller's scope.
"""

from __future__ import annotations

import contextvars
import enum
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import jwt

from chassis.errors import PermissionDenied, Unauthenticated

ISSUER = "cornucopia"
AUDIENCE = "cornucopia"
ALGORITHM = "HS256"


class Role(enum.StrEnum):
    HQ_ADMIN = "hq_admin"
    REGION_MANAGER = "region_manager"
    STORE_MANAGER = "store_manager"
    STORE_OPERATOR = "store_operator"
    CALL_CENTER = "call_center"
    PARTNER = "partner"
    # Another Cornucopia service acting on its own behalf (e.g. a consumer
    # asking members for contact details).
    SERVICE = "service"


class ScopeLevel(enum.StrEnum):
    HQ = "hq"
    REGION = "region"
    STORE = "store"
    CALL_CENTER = "call_center"
    PARTNER = "partner"


STAFF_ROLES = frozenset(
    {
        Role.HQ_ADMIN,
        Role.REGION_MANAGER,
        Role.STORE_MANAGER,
        Role.STORE_OPERATOR,
        Role.CALL_CENTER,
    }
)


@dataclass(frozen=True)
class Scope:
    level: ScopeLevel
    id: str = ""

    def __str__(self) -> str:
        return self.level.value if not self.id else f"{self.level.value}:{self.id}"

    @classmethod
    def parse(cls, text: str) -> Scope:
        level, _, ident = text.partition(":")
        try:
            scope_level = ScopeLevel(level)
        except ValueError:
            raise ValueError(f"unknown scope level {level!r}") from None
        if scope_level in (ScopeLevel.REGION, ScopeLevel.STORE, ScopeLevel.PARTNER) and not ident:
            raise ValueError(f"scope {level} needs an id, e.g. {level}:S001")
        return cls(scope_level, ident)


@dataclass(frozen=True)
class Principal:
    subject: str
    roles: frozenset[Role]
    scope: Scope
    # The store a store-scoped principal acts from; recorded in audit stamps.
    store_id: str = ""
    claims: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def has_any(self, roles: Iterable[Role]) -> bool:
        return bool(self.roles & frozenset(roles))

    def require_role(self, *roles: Role) -> None:
        if not self.has_any(roles):
            raise PermissionDenied(
                "your role may not do this",
                reason="ROLE_NOT_ALLOWED",
                metadata={"required_any_of": ",".join(sorted(r.value for r in roles))},
            )

    def require_store(self, store_id: str, region_of_store: str | None = None) -> None:
        """A store-scoped principal acts only for its own store; a region
        manager for the stores of its region (when the region is known);
        HQ, call center and services for every store."""
        if (
            self.scope.level in (ScopeLevel.HQ, ScopeLevel.CALL_CENTER)
            or Role.SERVICE in self.roles
        ):
            return
        if self.scope.level == ScopeLevel.STORE and self.scope.id == store_id:
            return
        if (
            self.scope.level == ScopeLevel.REGION
            and region_of_store is not None
            and self.scope.id == region_of_store
        ):
            return
        raise PermissionDenied(
            "this store is outside your organisation scope",
            reason="OUT_OF_SCOPE",
            metadata={"scope": str(self.scope), "store_id": store_id},
        )


def mint_token(
    secret: str,
    subject: str,
    roles: Iterable[Role | str],
    scope: Scope,
    *,
    ttl_seconds: int = 8 * 3600,
    store_id: str = "",
    now: float | None = None,
) -> str:
    issued = int(now if now is not None else time.time())
    role_values = sorted({Role(r).value for r in roles})
    if not role_values:
        raise ValueError("a token needs at least one role")
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": subject,
        "iat": issued,
        "exp": issued + ttl_seconds,
        "roles": role_values,
        "scope": str(scope),
    }
    if store_id or scope.level == ScopeLevel.STORE:
        claims["store"] = store_id or scope.id
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


SERVICE_TOKEN_TTL_SECONDS = 60
# A service token is sent again for this long after it was minted (every
# call to a peer used to sign a new one); the peer still has half its life.
SERVICE_TOKEN_REUSE_SECONDS = SERVICE_TOKEN_TTL_SECONDS / 2
_service_tokens: dict[tuple[str, str], tuple[float, str]] = {}


def service_token(secret: str, service: str, *, now: float | None = None) -> str:
    """A short-lived token a service sends when it calls a peer on its own
    behalf (not a staff member's): chain-wide, role ``service``, named
    after the calling service so the peer's logs say who asked. The same
    token is handed out for SERVICE_TOKEN_REUSE_SECONDS (not when ``now`` is
    given: a caller with its own clock gets a token minted at that time)."""
    if now is not None:
        return _mint_service_token(secret, service, now)
    moment = time.time()
    kept = _service_tokens.get((secret, service))
    if kept is not None and 0 <= moment - kept[0] < SERVICE_TOKEN_REUSE_SECONDS:
        return kept[1]
    token = _mint_service_token(secret, service, moment)
    _service_tokens[(secret, service)] = (moment, token)
    return token


def _mint_service_token(secret: str, service: str, now: float) -> str:
    return mint_token(
        secret,
        service,
        [Role.SERVICE],
        Scope(ScopeLevel.HQ),
        ttl_seconds=SERVICE_TOKEN_TTL_SECONDS,
        now=now,
    )


# Tokens already verified, with what they say: the same staff or service
# token arrives with call after call, and checking its signature and claims
# each time was a measurable share of every call. Expiry is checked on every
# use; the signature needs checking only once, since a token cannot change.
VERIFIED_TOKENS_KEPT = 4096
_verified: OrderedDict[tuple[str, str], tuple[float, Principal]] = OrderedDict()


def verify_token(secret: str, token: str) -> Principal:
    """Who the token says is calling; Unauthenticated when it is not valid
    (not signed with ``secret``, expired, missing claims)."""
    key = (secret, token)
    kept = _verified.get(key)
    if kept is not None:
        expires, principal = kept
        # PyJWT's rule: a token is expired once ``exp`` is not after now.
        if expires > time.time():
            _verified.move_to_end(key)
            return principal
        del _verified[key]
    principal = _decode_token(secret, token)
    _verified[key] = (float(principal.claims["exp"]), principal)
    if len(_verified) > VERIFIED_TOKENS_KEPT:
        _verified.popitem(last=False)
    return principal


def _decode_token(secret: str, token: str) -> Principal:
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": ["exp", "iat", "sub", "iss", "aud"]},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("the token has expired", reason="TOKEN_EXPIRED") from None
    except jwt.PyJWTError:
        raise Unauthenticated("the token is not valid", reason="TOKEN_INVALID") from None
    try:
        roles = frozenset(Role(r) for r in claims.get("roles", []))
        scope = Scope.parse(str(claims.get("scope", "")))
    except ValueError:
        raise Unauthenticated("the token has unknown claims", reason="TOKEN_INVALID") from None
    if not roles:
        raise Unauthenticated("the token carries no role", reason="TOKEN_INVALID")
    return Principal(
        subject=str(claims["sub"]),
        roles=roles,
        scope=scope,
        store_id=str(claims.get("store", "")),
        claims=claims,
    )


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "cornucopia_principal", default=None
)


def current_principal() -> Principal:
    principal = _current.get()
    if principal is None:
        raise Unauthenticated("no credentials were sent", reason="MISSING_CREDENTIALS")
    return principal


def set_current_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    return _current.set(principal)


def reset_current_principal(token: contextvars.Token[Principal | None]) -> None:
    _current.reset(token)
