"""Domain values to protobuf and back, shared by the gRPC edge and the
events."""

from __future__ import annotations

import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp

from cornucopia.cards.v1 import cards_pb2, programs_pb2
from cornucopia.common.v1 import money_pb2, org_pb2
from services.cards.domain.cards import Action, CardState, Role
from services.cards.domain.programs import CancelSettlement, Form, Holding, NumberFormat, Program
from services.cards.store.cards import CardRecord, HistoryEntry, Stamp
from services.cards.store.programs import ProgramRecord

FORMS = {
    programs_pb2.CARD_FORM_PHYSICAL: Form.PHYSICAL,
    programs_pb2.CARD_FORM_VIRTUAL: Form.VIRTUAL,
}
FORMS_PROTO = {v: k for k, v in FORMS.items()}
HOLDINGS = {
    programs_pb2.CARD_HOLDING_PERSONAL: Holding.PERSONAL,
    programs_pb2.CARD_HOLDING_GROUP: Holding.GROUP,
}
HOLDINGS_PROTO = {v: k for k, v in HOLDINGS.items()}
SETTLEMENTS = {
    programs_pb2.CANCEL_SETTLEMENT_PAY_OUT: CancelSettlement.PAY_OUT,
    programs_pb2.CANCEL_SETTLEMENT_FORFEIT: CancelSettlement.FORFEIT,
}
SETTLEMENTS_PROTO = {v: k for k, v in SETTLEMENTS.items()}
STATES_PROTO = {
    CardState.ACTIVE: cards_pb2.CARD_STATE_ACTIVE,
    CardState.LOST: cards_pb2.CARD_STATE_LOST,
    CardState.FROZEN: cards_pb2.CARD_STATE_FROZEN,
    CardState.REPLACED: cards_pb2.CARD_STATE_REPLACED,
    CardState.CANCELLED: cards_pb2.CARD_STATE_CANCELLED,
    CardState.EXPIRED: cards_pb2.CARD_STATE_EXPIRED,
}
ROLES_PROTO = {
    Role.PRINCIPAL: cards_pb2.CARD_ROLE_PRINCIPAL,
    Role.SUPPLEMENTARY: cards_pb2.CARD_ROLE_SUPPLEMENTARY,
    Role.GROUP_HOLDER: cards_pb2.CARD_ROLE_GROUP_HOLDER,
}
ACTIONS_PROTO = {
    Action.ISSUE: cards_pb2.CARD_ACTION_ISSUE,
    Action.REPORT_LOST: cards_pb2.CARD_ACTION_REPORT_LOST,
    Action.CANCEL_LOSS: cards_pb2.CARD_ACTION_CANCEL_LOSS,
    Action.FREEZE: cards_pb2.CARD_ACTION_FREEZE,
    Action.UNFREEZE: cards_pb2.CARD_ACTION_UNFREEZE,
    Action.REPLACE: cards_pb2.CARD_ACTION_REPLACE,
    Action.CANCEL: cards_pb2.CARD_ACTION_CANCEL,
    Action.EXPIRE: cards_pb2.CARD_ACTION_EXPIRE,
    Action.LINK: cards_pb2.CARD_ACTION_LINK,
    Action.UNLINK: cards_pb2.CARD_ACTION_UNLINK,
    Action.SET_PIN: cards_pb2.CARD_ACTION_SET_PIN,
    Action.CHANGE_HOLDER: cards_pb2.CARD_ACTION_CHANGE_HOLDER,
}


def timestamp(value: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def audit_stamp(stamp: Stamp) -> org_pb2.AuditStamp:
    return org_pb2.AuditStamp(
        principal=stamp.principal, store_id=stamp.store_id, time=timestamp(stamp.at)
    )


def program_from_proto(message: programs_pb2.CardProgram) -> Program:
    """Unknown enum values become the first allowed value; the caller checks
    them (see ``enum_problems``)."""
    fmt = message.number_format
    return Program(
        program_id=message.program_id,
        display_name=message.display_name,
        form=FORMS.get(message.form, Form.PHYSICAL),
        number_format=NumberFormat(fmt.prefix, fmt.length, fmt.luhn_check_digit),
        validity_months=message.validity_months,
        stored_value=message.stored_value,
        member_discount_bps=message.member_discount_bps,
        holding=HOLDINGS.get(message.holding, Holding.PERSONAL),
        max_group_holders=message.max_group_holders,
        allows_supplementary=message.allows_supplementary,
        max_supplementary_cards=message.max_supplementary_cards,
        allows_linking=message.allows_linking,
        partner_id=message.partner_id,
        cancel_settlement=SETTLEMENTS.get(message.cancel_settlement, CancelSettlement.PAY_OUT),
    )


def program_to_proto(record: ProgramRecord) -> programs_pb2.CardProgram:
    p = record.program
    fmt = p.number_format
    return programs_pb2.CardProgram(
        program_id=p.program_id,
        display_name=p.display_name,
        form=FORMS_PROTO[p.form],
        number_format=programs_pb2.NumberFormat(
            prefix=fmt.prefix, length=fmt.length, luhn_check_digit=fmt.luhn
        ),
        validity_months=p.validity_months,
        stored_value=p.stored_value,
        member_discount_bps=p.member_discount_bps,
        holding=HOLDINGS_PROTO[p.holding],
        max_group_holders=p.max_group_holders,
        allows_supplementary=p.allows_supplementary,
        max_supplementary_cards=p.max_supplementary_cards,
        allows_linking=p.allows_linking,
        partner_id=p.partner_id,
        cancel_settlement=SETTLEMENTS_PROTO[p.cancel_settlement],
        number_capacity=fmt.capacity,
        numbers_issued=record.numbers_issued,
        created_by=audit_stamp(
            Stamp(record.created_by, record.created_store_id, record.created_at)
        ),
    )


def card_to_proto(card: CardRecord, program: Program | None) -> cards_pb2.Card:
    message = cards_pb2.Card(
        card_id=card.card_id,
        card_number=card.card_number,
        program_id=card.program_id,
        member_id=card.member_id,
        account_id=card.account_id,
        state=STATES_PROTO[card.state],
        role=ROLES_PROTO[card.role],
        principal_card_id=card.principal_card_id,
        linked_card_id=card.linked_card_id,
        replaces_card_id=card.replaces_card_id,
        replaced_by_card_id=card.replaced_by_card_id,
        issue_time=timestamp(card.issued_at),
        issued_by=audit_stamp(Stamp(card.issued_by, card.issued_store_id, card.issued_at)),
        state_changed_by=audit_stamp(
            Stamp(card.state_changed_by, card.state_store_id, card.state_changed_at)
        ),
        state_reason=card.state_reason,
        pin_set=card.pin_hash is not None,
    )
    if program is not None:
        message.form = FORMS_PROTO[program.form]
        message.partner_id = program.partner_id
    if card.expires_at is not None:
        message.expire_time.CopyFrom(timestamp(card.expires_at))
    if card.spending_limit is not None:
        message.spending_limit.CopyFrom(
            money_pb2.Money(
                currency_code=card.spending_limit.currency_code,
                minor_units=card.spending_limit.minor_units,
            )
        )
    return message


def history_to_proto(entry: HistoryEntry) -> cards_pb2.CardHistoryEntry:
    message = cards_pb2.CardHistoryEntry(
        card_id=entry.card_id,
        action=ACTIONS_PROTO[entry.action],
        reason=entry.reason,
        related_card_id=entry.related_card_id,
        stamp=audit_stamp(entry.stamp),
    )
    if entry.from_state is not None:
        message.from_state = STATES_PROTO[entry.from_state]
    if entry.to_state is not None:
        message.to_state = STATES_PROTO[entry.to_state]
    return message
