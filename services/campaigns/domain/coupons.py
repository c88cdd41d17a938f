"""Coupons: templates, their validity, codes, the states of an issued
coupon, and what each refusal means. Pure.

A coupon is ISSUED into a member's wallet, RESERVED by a checkout's
pricing, REDEEMED by its sale (or released back to ISSUED), and EXPIRED
when its validity ends unused. A refund may give a redeemed coupon back
(ISSUED again) by its template's restore policy.

The budget counts each issued coupon's face value when it is issued: the
amount of an amount-off coupon, the cap of a percent-off coupon (a budget
without a cap is refused: a percentage has no face value), the declared
face value of a gift item or free service (required when there is a
budget). So a budget is never exceeded even if every coupon is used.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

from chassis.errors import Violations
from chassis.ids import random_id
from services.campaigns.domain.pricing import (
    MAX_AMOUNT,
    CouponKind,
    CouponTerms,
    Scope,
    check_currency,
)

# 16 characters of a 32-letter alphabet: 80 bits from the system's CSPRNG.
CODE_LENGTH = 16
MAX_ISSUE_MEMBERS = 100_000
INLINE_ISSUE_LIMIT = 100
MAX_VALID_DAYS = 3660
DEFAULT_RESERVATION_TTL = dt.timedelta(minutes=15)
MAX_RESERVATION_TTL = dt.timedelta(hours=24)


def _new_id(letter: str) -> str:
    return random_id(letter, 15)


def new_template_id() -> str:
    return _new_id("T")


def new_coupon_id() -> str:
    return _new_id("C")


def new_job_id() -> str:
    return _new_id("J")


def new_code() -> str:
    """A coupon code: not guessable (80 random bits), unambiguous to read
    aloud (no I, L, O, U). Uniqueness is the database's UNIQUE index."""
    return random_id("", CODE_LENGTH)


def normalise_code(code: str) -> str:
    """As typed at a till: spaces and dashes ignored, any case, O read as 0
    and I/L as 1 (Crockford)."""
    text = "".join(ch for ch in code.upper() if ch not in " -")
    return text.translate(str.maketrans("OIL", "011"))


class CouponState(enum.StrEnum):
    ISSUED = "issued"
    RESERVED = "reserved"
    REDEEMED = "redeemed"
    EXPIRED = "expired"


class RestorePolicy(enum.StrEnum):
    NEVER = "never"
    ON_WHOLE_REFUND = "on_whole_refund"
    ON_ANY_REFUND = "on_any_refund"


class JobState(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"


@dataclass(frozen=True)
class Template:
    template_id: str
    name: str
    kind: CouponKind
    currency: str
    amount_off: int = 0
    percent_bps: int = 0
    max_discount: int | None = None
    gift_sku: str = ""
    face_value: int = 0
    valid_from: dt.datetime | None = None
    valid_until: dt.datetime | None = None
    valid_days: int = 0
    min_spend: int = 0
    store_ids: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()
    skus: frozenset[str] = frozenset()
    per_member_limit: int = 0
    total_quantity: int = 0
    budget: int | None = None
    restore_policy: RestorePolicy = RestorePolicy.NEVER
    description: str = ""

    @property
    def terms(self) -> CouponTerms:
        return CouponTerms(
            template_id=self.template_id,
            name=self.name,
            kind=self.kind,
            currency=self.currency,
            amount_off=self.amount_off,
            percent_bps=self.percent_bps,
            max_discount=self.max_discount,
            gift_sku=self.gift_sku,
            min_spend=self.min_spend,
            store_ids=self.store_ids,
            scope=Scope(self.skus, self.categories),
        )

    @property
    def cost(self) -> int:
        """What one issued coupon counts against the budget."""
        if self.kind == CouponKind.AMOUNT_OFF:
            return self.amount_off
        if self.kind == CouponKind.PERCENT_OFF:
            return self.max_discount or 0
        return self.face_value

    def validity(self, issued_at: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
        """When a coupon issued at ``issued_at`` may be used: [from, until)."""
        start = max(issued_at, self.valid_from) if self.valid_from else issued_at
        ends = [e for e in (self.valid_until,) if e is not None]
        if self.valid_days:
            ends.append(issued_at + dt.timedelta(days=self.valid_days))
        return start, min(ends)

    def issuable(self, at: dt.datetime) -> bool:
        """Whether a coupon issued now could still be used."""
        start, until = self.validity(at)
        return start < until


def check_template(t: Template, prefix: str = "template") -> Template:  # noqa: PLR0912 - a check a field
    v = Violations()

    def amount(name: str, value: int | None, *, zero: bool = False) -> None:
        low = 0 if zero else 1
        if value is not None and not low <= value <= MAX_AMOUNT:
            v.add(f"{prefix}.{name}", f"{low} to {MAX_AMOUNT}")

    if not t.name.strip() or len(t.name) > 100:
        v.add(f"{prefix}.display_name", "required, at most 100 characters")
    if len(t.description) > 500:
        v.add(f"{prefix}.description", "at most 500 characters")
    if not check_currency(t.currency):
        v.add(f"{prefix}.currency_code", "an ISO 4217 code such as CNY")
    if t.kind == CouponKind.AMOUNT_OFF:
        amount("amount_off", t.amount_off)
    if t.kind == CouponKind.PERCENT_OFF:
        if not 0 < t.percent_bps <= 10_000:
            v.add(f"{prefix}.percent_bps", "1 to 10000")
        amount("max_discount", t.max_discount)
        if t.budget is not None and t.max_discount is None:
            v.add(f"{prefix}.max_discount", "a percent-off coupon with a budget needs a cap")
    if t.kind in (CouponKind.GIFT_ITEM, CouponKind.FREE_SERVICE):
        if not t.gift_sku.strip() or len(t.gift_sku) > 64:
            v.add(f"{prefix}.gift_sku", "required, at most 64 characters")
        amount("face_value", t.face_value, zero=True)
        if t.budget is not None and not t.face_value:
            v.add(f"{prefix}.face_value", "a gift with a budget needs its face value")
    if t.valid_until is None and not t.valid_days:
        v.add(f"{prefix}.valid_until", "valid_until or valid_days")
    if not 0 <= t.valid_days <= MAX_VALID_DAYS:
        v.add(f"{prefix}.valid_days", f"0 to {MAX_VALID_DAYS}")
    if t.valid_from and t.valid_until and t.valid_until <= t.valid_from:
        v.add(f"{prefix}.valid_until", "after valid_from")
    amount("min_spend", t.min_spend, zero=True)
    if t.per_member_limit < 0:
        v.add(f"{prefix}.per_member_limit", "0 (no limit) or more")
    if t.total_quantity < 0:
        v.add(f"{prefix}.total_quantity", "0 (no limit) or more")
    amount("budget", t.budget)
    v.raise_if_any("the coupon template has invalid fields")
    return t


@dataclass(frozen=True)
class CouponFacts:
    """What the pricing needs of a stored coupon."""

    coupon_id: str
    member_id: str
    state: CouponState
    valid_from: dt.datetime
    expires_at: dt.datetime
    reservation_id: str


def refusal(  # noqa: PLR0911 - one answer a reason
    coupon: CouponFacts, member_id: str, reservation_id: str, at: dt.datetime
) -> tuple[str, str]:
    """Why this coupon cannot be used by this member in this checkout now
    ("", "" when it can). A coupon this very checkout reserved is usable
    again (the checkout priced twice)."""
    if not member_id:
        return "COUPON_MEMBER_REQUIRED", "coupons are for members"
    if coupon.member_id != member_id:
        return "COUPON_NOT_YOURS", "issued to another member"
    if coupon.state == CouponState.REDEEMED:
        return "COUPON_USED", "already used"
    if coupon.state == CouponState.EXPIRED or at >= coupon.expires_at:
        return "COUPON_EXPIRED", "expired"
    if at < coupon.valid_from:
        return "COUPON_NOT_YET_VALID", "not valid yet"
    if coupon.state == CouponState.RESERVED and (
        not reservation_id or coupon.reservation_id != reservation_id
    ):
        return "COUPON_RESERVED", "held by another checkout"
    return "", ""


def restores(policy: RestorePolicy, whole_sale: bool) -> bool:
    if policy == RestorePolicy.ON_ANY_REFUND:
        return True
    return policy == RestorePolicy.ON_WHOLE_REFUND and whole_sale


def redemption_rate_bps(issued: int, redeemed: int) -> int:
    return redeemed * 10_000 // issued if issued else 0
