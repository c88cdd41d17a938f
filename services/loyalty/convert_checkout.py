"""Checkout plans, receipts and sales to protobuf."""

from __future__ import annotations

import datetime as dt
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from cornucopia.common.v1 import date_pb2, money_pb2, org_pb2
from cornucopia.loyalty.v1 import checkout_pb2 as pb
from services.loyalty.domain.checkout import TenderKind
from services.loyalty.points_ledger import Stamp
from services.loyalty.store.sales import RefundLog, SaleRecord, SaleState
from services.loyalty.tiers import TierProgress

TENDER_KINDS_PROTO = {
    TenderKind.STORED_VALUE: pb.TENDER_KIND_STORED_VALUE,
    TenderKind.POINTS: pb.TENDER_KIND_POINTS,
    TenderKind.CASH: pb.TENDER_KIND_CASH,
    TenderKind.BANK_CARD: pb.TENDER_KIND_BANK_CARD,
}
SALE_STATES_PROTO = {
    SaleState.COMPLETED: pb.SALE_STATE_COMPLETED,
    SaleState.PARTLY_REFUNDED: pb.SALE_STATE_PARTLY_REFUNDED,
    SaleState.REFUNDED: pb.SALE_STATE_REFUNDED,
    SaleState.VOIDED: pb.SALE_STATE_VOIDED,
}


def money(currency: str, minor_units: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code=currency, minor_units=minor_units)


def timestamp(value: dt.datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def stamp_proto(stamp: Stamp) -> org_pb2.AuditStamp:
    return org_pb2.AuditStamp(
        principal=stamp.principal, store_id=stamp.store_id, time=timestamp(stamp.at)
    )


def business_day_proto(iso_day: str) -> date_pb2.Date:
    day = dt.date.fromisoformat(iso_day)
    return date_pb2.Date(year=day.year, month=day.month, day=day.day)


def receipt_lines(plan: dict[str, Any]) -> list[pb.ReceiptLine]:
    c = plan["currency"]
    return [
        pb.ReceiptLine(
            line_no=line["line_no"],
            sku=line["sku"],
            category=line["category"],
            description=line["description"],
            quantity=line["quantity"],
            unit_price=money(c, line["unit_price"]),
            gross=money(c, line["quantity"] * line["unit_price"]),
            discounts=[
                pb.Discount(
                    source=d["source"], description=d["description"], amount=money(c, d["amount"])
                )
                for d in line["discounts"]
            ],
            net=money(c, line["net"]),
        )
        for line in plan["lines"]
    ]


def receipt_to_proto(
    plan: dict[str, Any],
    *,
    sale_id: str,
    checkout_id: str,
    sv_movement_id: str,
    points_spent: int,
    points_balance: int,
    stored_value_left: int | None,
    progress: TierProgress | None,
    stamp: Stamp,
) -> pb.Receipt:
    c = plan["currency"]
    tenders = plan["tenders"]
    receipt = pb.Receipt(
        sale_id=sale_id,
        checkout_id=checkout_id,
        store_id=plan["store_id"],
        terminal_id=plan["terminal_id"],
        member_id=plan["member_id"],
        card_id=plan["card_id"],
        lines=receipt_lines(plan),
        gross=money(c, plan["gross"]),
        discount=money(c, plan["discount"]),
        total=money(c, plan["total"]),
        points=pb.PointsSummary(
            earned=plan["earn"]["points"],
            spent=points_spent,
            explanations=plan["earn"]["explanations"],
            balance=points_balance,
        ),
        sold_by=stamp_proto(stamp),
    )
    if tenders.get("stored_value"):
        receipt.tenders.add(
            kind=pb.TENDER_KIND_STORED_VALUE,
            amount=money(c, tenders["stored_value"]),
            card_id=plan["card_id"],
            movement_id=sv_movement_id,
        )
    if tenders.get("points"):
        receipt.tenders.add(
            kind=pb.TENDER_KIND_POINTS,
            amount=money(c, tenders["points_value"]),
            points=tenders["points"],
        )
    if tenders.get("cash"):
        receipt.tenders.add(kind=pb.TENDER_KIND_CASH, amount=money(c, tenders["cash"]))
    if tenders.get("bank_card"):
        receipt.tenders.add(
            kind=pb.TENDER_KIND_BANK_CARD,
            amount=money(c, tenders["bank_card"]),
            reference=tenders.get("bank_reference", ""),
        )
    if stored_value_left is not None:
        receipt.stored_value_balance.CopyFrom(money(c, stored_value_left))
    if progress is not None:
        receipt.tier.CopyFrom(
            pb.TierSummary(
                tier_id=progress.tier.tier_id,
                tier_name=progress.tier.name,
                upgraded_from=progress.changed_from,
                next_tier_id=progress.next_tier_id,
                next_tier_name=progress.next_tier_name,
                spend_to_next=money(c, progress.spend_to_next_minor_units),
                visits_to_next=progress.visits_to_next,
            )
        )
    return receipt


def refund_receipt_to_proto(
    found: RefundLog,
    *,
    sv_movement_id: str,
    points_returned: int,
    points_reversed: int,
    points_not_reversed: int,
    stamp: Stamp,
) -> pb.RefundReceipt:
    plan = found.plan
    c = plan["currency"]
    receipt = pb.RefundReceipt(
        refund_id=found.refund_id,
        sale_id=found.sale_id,
        lines=[pb.RefundLine(line_no=n, quantity=q) for n, q in plan["lines"]],
        amount=money(c, plan["amount"]),
        points_returned=points_returned,
        points_reversed=points_reversed,
        points_not_reversed=points_not_reversed,
        void=found.is_void,
        reason=found.reason,
        refunded_by=stamp_proto(stamp),
    )
    for kind, amount in plan["by_tender"].items():
        tender = TenderKind(kind)
        receipt.tenders.add(
            kind=TENDER_KINDS_PROTO[tender],
            amount=money(c, amount),
            points=points_returned if tender == TenderKind.POINTS else 0,
            movement_id=sv_movement_id if tender == TenderKind.STORED_VALUE else "",
        )
    return receipt


def sale_to_proto(
    sale: SaleRecord, refunds: list[RefundLog], quantities: dict[int, int]
) -> pb.Sale:
    receipt = pb.Receipt.FromString(sale.receipt)
    for line in receipt.lines:
        line.quantity_refunded = quantities.get(line.line_no, 0)
    return pb.Sale(
        receipt=receipt,
        state=SALE_STATES_PROTO.get(sale.state, pb.SALE_STATE_UNSPECIFIED),
        refunded=money(sale.currency, sale.refunded),
        refunds=[pb.RefundReceipt.FromString(r.receipt) for r in refunds if r.receipt],
        sale_time=timestamp(sale.sold_at),
    )
