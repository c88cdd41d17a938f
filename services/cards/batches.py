"""Enterprise batch recharges: a company pays the chain once (its payment
is ``payment_reference``) and hands in a file of the cards to recharge and
how much each gets.

Starting a batch reads the whole file (CSV or XLSX: ``card_number``,
``amount`` in currency units, optional ``note``) and checks every row at
once against the cards as they are: the number, the card (it exists, its
program carries stored value, it can take money now), the amount (more
than zero, no more decimals than the currency has, within what the
enterprise-batch channel takes). The rows' amounts must add up to the
control total the company paid (``expected_total``), or nothing is kept
(BATCH_TOTAL_MISMATCH). Every row is stored with its outcome.

All or nothing by file: a dry run, or a file with a single bad row, is
CHECKED and recharges nothing; the report (ListBatchRechargeRows) says
which rows to fix, and the corrected file is started again. So a company's
payment is never half applied because of a typo.

A good file is RUNNING, and the worker (any replica, one at a time by a
lease) recharges each VALID row in a transaction of its own through
``ledger.recharge`` (channel ENTERPRISE_BATCH, the starter as the
operator, the payment reference as the movement's reference), marking the
row RECHARGED with its movement in the same transaction. A row the ledger
refuses when its turn comes (the card was frozen meanwhile, the account
would pass the maximum balance...) is marked FAILED with the reason, and
the batch goes on. The request id of a row's movement is
``batch:<batch id>:<row number>``, bound to it for good: a crash or a
takeover anywhere resumes at the first VALID row and never recharges a row
twice.

Decisions:

- A card may appear once per file: a later row of the same card is
  INVALID (DUPLICATE_ROW, "the card repeats row N"), so that a pasted row
  twice is caught; two amounts for one card are one row of their sum.
- The control total is compared when every amount could be read; a file
  with an unreadable amount is CHECKED with AMOUNT_INVALID rows (the
  total of a file being fixed means little), and checked again when the
  corrected file is started.
- Blank rows are skipped; row numbers are those of the file (row 1 is the
  first row after the header), so a report points at the right line.
- Card holds, the maximum balance and daily recharge limits are the
  ledger's business at recharge time: they depend on the moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from chassis import spreadsheets
from chassis.auth import STAFF_ROLES, Principal, Role, current_principal
from chassis.db import Database, utcnow
from chassis.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
    Violations,
)
from chassis.idempotency import check_request_id, run_idempotent
from chassis.logs import get_logger
from chassis.paging import decode_token, encode_token, page_size
from cornucopia.cards.v1 import stored_value_pb2 as pb
from services.cards import ledger
from services.cards.convert import audit_stamp, timestamp
from services.cards.convert_stored_value import money
from services.cards.domain import cards as card_rules
from services.cards.domain import stored_value as rules
from services.cards.domain.programs import normalise_card_number
from services.cards.domain.stored_value import Channel, Policy
from services.cards.store import batches as store
from services.cards.store import cards as card_store
from services.cards.store import programs as program_store
from services.cards.store import stored_value_rules as rule_store
from services.cards.store.batches import BatchRecord, CardBrief, RowRecord
from services.cards.store.cards import Stamp

log = get_logger(__name__)

STARTING_ROLES = (Role.HQ_ADMIN, Role.STORE_MANAGER)
READING_ROLES = (*STAFF_ROLES, Role.SERVICE)
CHANNEL = Channel.ENTERPRISE_BATCH
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_ROWS = 20_000
MAX_FILE_NAME_LENGTH = 200
# Rows read from the database per query while a batch is worked.
ROWS_PER_READ = 100
# How long a worker's claim on a batch holds without a row renewing it:
# how long a batch whose replica died waits before another takes it over.
LEASE = dt.timedelta(seconds=30)
DEFAULT_INTERVAL_SECONDS = 2.0

# Why a row is INVALID (at the start) or FAILED (at its turn: the ledger's
# own reasons, e.g. CARD_FROZEN, MAX_BALANCE_EXCEEDED).
CARD_NUMBER_INVALID = "CARD_NUMBER_INVALID"
CARD_NOT_FOUND = "CARD_NOT_FOUND"
STORED_VALUE_NOT_OFFERED = "STORED_VALUE_NOT_OFFERED"
AMOUNT_INVALID = "AMOUNT_INVALID"
NOTE_TOO_LONG = "NOTE_TOO_LONG"
DUPLICATE_ROW = "DUPLICATE_ROW"

# The columns of a file, and the header names (English and Chinese,
# compared without case, spaces or punctuation) that mean them.
HEADER_ALIASES: Mapping[str, tuple[str, ...]] = {
    "card_number": ("card_number", "card number", "card no", "card", "卡号", "会员卡号"),
    "amount": ("amount", "recharge amount", "金额", "充值金额"),
    "note": ("note", "notes", "remark", "memo", "备注"),
}
REQUIRED_COLUMNS = ("card_number", "amount")
_BY_HEADER = {
    spreadsheets.normalise_header(alias): name
    for name, aliases in HEADER_ALIASES.items()
    for alias in aliases
}

STATES_PROTO = {
    store.RUNNING: pb.BATCH_RECHARGE_STATE_RUNNING,
    store.DONE: pb.BATCH_RECHARGE_STATE_DONE,
    store.CHECKED: pb.BATCH_RECHARGE_STATE_CHECKED,
}
OUTCOMES_PROTO = {
    store.PENDING: pb.BATCH_ROW_OUTCOME_PENDING,
    store.VALID: pb.BATCH_ROW_OUTCOME_VALID,
    store.INVALID: pb.BATCH_ROW_OUTCOME_INVALID,
    store.RECHARGED: pb.BATCH_ROW_OUTCOME_RECHARGED,
    store.FAILED: pb.BATCH_ROW_OUTCOME_FAILED,
}


# --- reading the file (pure) --------------------------------------------------------


@dataclass(frozen=True)
class FileRow:
    """A row of the file as written: row 1 is the first after the header."""

    row_number: int
    card_number: str
    amount: object
    note: str


def bad_file(description: str, field: str = "content") -> InvalidArgument:
    return InvalidArgument(
        [FieldViolation(field, description)],
        message="the file cannot be read",
        reason="BAD_BATCH_FILE",
    )


def map_header(header: Sequence[object]) -> dict[str, int]:
    """Column name -> index. Columns the batch does not know are ignored;
    a missing card_number or amount column, or one named twice, is
    refused."""
    columns: dict[str, int] = {}
    problems: list[FieldViolation] = []
    for index, cell in enumerate(header):
        text = spreadsheets.cell_text(cell)
        name = _BY_HEADER.get(spreadsheets.normalise_header(text)) if text else None
        if name is None:
            continue
        if name in columns:
            problems.append(FieldViolation("content", f"two columns mean {name}: remove one"))
        else:
            columns[name] = index
    for name in REQUIRED_COLUMNS:
        if name not in columns:
            problems.append(
                FieldViolation("content", f"no {name} column in the header row (e.g. '{name}')")
            )
    if problems:
        raise InvalidArgument(
            problems, message="the file's header row cannot be read", reason="BAD_BATCH_FILE"
        )
    return columns


def read_rows(file_name: str, content: bytes) -> list[FileRow]:
    """The rows of a batch file, blank ones skipped. InvalidArgument
    (BAD_BATCH_FILE) when it cannot be read, has no header, no rows or
    more than MAX_ROWS."""
    try:
        file_format = spreadsheets.sniff_format(file_name, content[:8])
        with spreadsheets.open_sheet(content, file_format) as sheet:
            columns = map_header(sheet.header)
            rows: list[FileRow] = []
            for record in sheet.records:
                if spreadsheets.is_blank(record.cells):
                    continue
                if len(rows) >= MAX_ROWS:
                    raise bad_file(f"at most {MAX_ROWS:,} rows")

                def cell(name: str, cells: Sequence[object] = record.cells) -> object:
                    index = columns.get(name)
                    return cells[index] if index is not None and index < len(cells) else None

                rows.append(
                    FileRow(
                        row_number=record.row - 1,
                        card_number=spreadsheets.cell_text(cell("card_number")),
                        amount=cell("amount"),
                        note=spreadsheets.cell_text(cell("note")),
                    )
                )
    except spreadsheets.BadFile as exc:
        raise bad_file(str(exc)) from None
    except (UnicodeDecodeError, csv.Error):
        raise bad_file("not UTF-8 CSV text") from None
    if not rows:
        raise bad_file("no rows after the header row")
    return rows


def parse_amount(value: object, currency: str) -> int:
    """A row's amount in minor units; ValueError (its message for the
    report) when it is not a positive amount of the currency."""
    minor = spreadsheets.parse_amount(value, currency)
    if minor <= 0:
        raise spreadsheets.BadAmount("more than zero")
    if minor > rules.MAX_AMOUNT:
        raise spreadsheets.BadAmount(
            f"at most {spreadsheets.amount_value(rules.MAX_AMOUNT, currency)}"
        )
    return minor


# --- checking the rows ----------------------------------------------------------------


@dataclass(frozen=True)
class Checked:
    """The rows as stored, their total (of the amounts that could be read)
    and whether every amount could be."""

    rows: list[RowRecord]
    total: int
    amounts_read: bool

    @property
    def invalid(self) -> int:
        return sum(1 for r in self.rows if r.outcome == store.INVALID)


def check_rows(
    rows: Sequence[FileRow],
    *,
    policy: Policy,
    cards: Mapping[str, CardBrief],
    offers_stored_value: Mapping[str, bool],
    store_id: str,
    operator_id: str,
    now: dt.datetime,
) -> Checked:
    """Every row's outcome, VALID or INVALID with one reason (the first of:
    number, amount, note, repeat, card, program, card state, channel
    bounds). ``cards`` by normalised number; ``offers_stored_value`` by
    program id. Pure."""
    currency = policy.currency
    first_row: dict[str, int] = {}
    out: list[RowRecord] = []
    total = 0
    amounts_read = True
    for row in rows:
        number = normalise_card_number(row.card_number)
        problem: tuple[str, str] | None = None
        amount = 0
        try:
            amount = parse_amount(row.amount, currency)
            total += amount
        except ValueError as exc:
            amounts_read = False
            problem = (AMOUNT_INVALID, f"amount: {exc}")
        if number is None:
            problem = (CARD_NUMBER_INVALID, "not a card number")
        elif number in first_row:
            problem = problem or (DUPLICATE_ROW, f"the card repeats row {first_row[number]}")
        else:
            first_row[number] = row.row_number
        if problem is None and len(row.note) > rules.MAX_NOTE_LENGTH:
            problem = (NOTE_TOO_LONG, f"note: at most {rules.MAX_NOTE_LENGTH} characters")
        if problem is None and number is not None:
            problem = _card_problem(cards.get(number), offers_stored_value, now)
        if problem is None:
            try:
                rules.check_recharge_allowed(
                    policy, CHANNEL, amount, store_id=store_id, operator_id=operator_id
                )
            except ServiceError as exc:
                problem = (exc.reason, _bounds(policy, exc))
        reason, message = problem or ("", "")
        out.append(
            RowRecord(
                row_number=row.row_number,
                card_number=number or row.card_number[:32],
                amount=amount,
                note=row.note[: rules.MAX_NOTE_LENGTH],
                outcome=store.INVALID if problem else store.VALID,
                reason=reason,
                message=message,
            )
        )
    return Checked(out, total, amounts_read)


def _card_problem(
    card: CardBrief | None, offers_stored_value: Mapping[str, bool], now: dt.datetime
) -> tuple[str, str] | None:
    if card is None:
        return CARD_NOT_FOUND, "no card with this number"
    if not offers_stored_value.get(card.program_id, False):
        return STORED_VALUE_NOT_OFFERED, "this card's program carries no stored value"
    refusal = card_rules.payment_refusal(card.state, card.expires_at, now)
    if refusal:
        return refusal, f"this card cannot take money now ({card.state.value})"
    return None


def _bounds(policy: Policy, exc: ServiceError) -> str:
    rule = policy.rule(CHANNEL)
    c = policy.currency
    low = spreadsheets.amount_value(rule.min_amount, c) if rule.min_amount else None
    high = spreadsheets.amount_value(rule.max_amount, c) if rule.max_amount else None
    if low is not None and high is not None:
        return f"an enterprise batch recharge is {low} to {high} {c}"
    if low is not None:
        return f"an enterprise batch recharge is at least {low} {c}"
    if high is not None:
        return f"an enterprise batch recharge is at most {high} {c}"
    return exc.message


def check_channel(policy: Policy, principal: Principal) -> None:
    """Whether the policy lets this login run enterprise batches at all
    (RECHARGE_CHANNEL_NOT_ALLOWED otherwise): asked with an amount the
    channel takes, so that only the channel itself can refuse."""
    rules.check_recharge_allowed(
        policy,
        CHANNEL,
        policy.rule(CHANNEL).min_amount or 1,
        store_id=principal.store_id,
        operator_id=principal.subject,
    )


# --- protobuf ----------------------------------------------------------------------------


def batch_to_proto(b: BatchRecord) -> pb.BatchRecharge:
    message = pb.BatchRecharge(
        batch_id=b.batch_id,
        state=STATES_PROTO[b.state],
        file_name=b.file_name,
        dry_run=b.dry_run,
        payment_reference=b.payment_reference,
        total=money(b.currency, b.total),
        rows=b.rows,
        rows_invalid=b.rows_invalid,
        rows_recharged=b.rows_recharged,
        rows_failed=b.rows_failed,
        started_by=audit_stamp(Stamp(b.started_by, b.store_id, b.started_at)),
    )
    if b.finished_at is not None:
        message.finish_time.CopyFrom(timestamp(b.finished_at))
    return message


def row_to_proto(r: RowRecord, currency: str) -> pb.BatchRechargeRow:
    return pb.BatchRechargeRow(
        row_number=r.row_number,
        card_number=r.card_number,
        amount=money(currency, r.amount),
        outcome=OUTCOMES_PROTO[r.outcome],
        reason=r.reason,
        message=r.message,
        movement_id=r.movement_id,
    )


def batch_not_found(batch_id: str) -> NotFound:
    return NotFound(
        "no batch recharge with this id",
        reason="BATCH_NOT_FOUND",
        metadata={"batch_id": batch_id},
    )


def default_owner() -> str:
    """This process among the replicas: the host (the pod's name on a
    cluster), the process and a random part; at most 64 characters."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(4)}"


class _Superseded(Exception):
    """Another worker holds the batch now (this one's lease lapsed), or it
    is no longer RUNNING; this one stops."""


# --- the service side --------------------------------------------------------------------


class BatchRecharges:
    """Starting and reading batches (the gRPC edge calls these), and the
    worker that recharges RUNNING ones."""

    def __init__(
        self,
        db: Database,
        *,
        owner: str | None = None,
        lease: dt.timedelta = LEASE,
        interval_seconds: float | None = None,
    ) -> None:
        self.db = db
        self.owner = owner or default_owner()
        self.lease = lease
        self.interval = interval_seconds or float(
            os.environ.get("CARDS_BATCH_INTERVAL_SECONDS", DEFAULT_INTERVAL_SECONDS)
        )

    # --- starting ------------------------------------------------------------------

    async def start(self, request: pb.StartBatchRechargeRequest) -> pb.BatchRecharge:
        principal = current_principal()
        principal.require_role(*STARTING_ROLES)
        check_request_id(request.request_id)
        file_name, reference = _check_shape(request)
        rows = await asyncio.to_thread(read_rows, file_name, request.content)
        batch_id = rules.new_batch_id()
        now = utcnow()

        async def create(session: AsyncSession) -> pb.BatchRecharge:
            policy = (await rule_store.get_policy(session)).policy
            expected = request.expected_total
            if expected.currency_code.strip().upper() != policy.currency:
                raise InvalidArgument(
                    [
                        FieldViolation(
                            "expected_total.currency_code",
                            f"the chain's stored value is kept in {policy.currency}",
                        )
                    ]
                )
            check_channel(policy, principal)
            checked = await self._check(session, rows, policy, principal, now)
            if checked.amounts_read and checked.total != expected.minor_units:
                raise FailedPrecondition(
                    "the rows' amounts do not add up to the expected total",
                    reason="BATCH_TOTAL_MISMATCH",
                    metadata={
                        "currency_code": policy.currency,
                        "expected_total_minor_units": str(expected.minor_units),
                        "file_total_minor_units": str(checked.total),
                        "rows": str(len(checked.rows)),
                    },
                )
            runs = not request.dry_run and checked.invalid == 0
            batch = BatchRecord(
                batch_id=batch_id,
                file_name=file_name,
                dry_run=request.dry_run,
                state=store.RUNNING if runs else store.CHECKED,
                payment_reference=reference,
                currency=policy.currency,
                total=checked.total,
                rows=len(checked.rows),
                rows_invalid=checked.invalid,
                rows_recharged=0,
                rows_failed=0,
                started_by=principal.subject,
                store_id=principal.store_id,
                started_at=now,
                finished_at=None if runs else now,
            )
            await store.insert_batch(session, batch, checked.rows)
            return batch_to_proto(batch)

        result = await run_idempotent(
            self.db,
            method="cards.StartBatchRecharge",
            request_id=request.request_id,
            request=request,
            response_type=pb.BatchRecharge,
            work=create,
        )
        if result.batch_id == batch_id:
            log.info(
                "batch recharge started",
                batch_id=batch_id,
                running=result.state == pb.BATCH_RECHARGE_STATE_RUNNING,
                rows=result.rows,
                rows_invalid=result.rows_invalid,
                dry_run=request.dry_run,
            )
            return result
        # A repeat of an earlier request: that batch as it is now.
        async with self.db.sessions() as session:
            current = await store.get_batch(session, result.batch_id)
        return batch_to_proto(current) if current is not None else result

    async def _check(
        self,
        session: AsyncSession,
        rows: Sequence[FileRow],
        policy: Policy,
        principal: Principal,
        now: dt.datetime,
    ) -> Checked:
        numbers = [n for n in (normalise_card_number(r.card_number) for r in rows) if n]
        cards = await store.cards_by_number(session, numbers)
        offers: dict[str, bool] = {}
        for program_id in sorted({c.program_id for c in cards.values()}):
            program = await program_store.get_program(session, program_id)
            offers[program_id] = bool(program and program.program.stored_value)
        return check_rows(
            rows,
            policy=policy,
            cards=cards,
            offers_stored_value=offers,
            store_id=principal.store_id,
            operator_id=principal.subject,
            now=now,
        )

    # --- reading ----------------------------------------------------------------------

    async def _batch(self, batch_id: str) -> BatchRecord:
        if not batch_id.strip():
            raise InvalidArgument([FieldViolation("batch_id", "required")])
        async with self.db.sessions() as session:
            batch = await store.get_batch(session, batch_id.strip())
        if batch is None:
            raise batch_not_found(batch_id.strip())
        return batch

    async def get(self, request: pb.GetBatchRechargeRequest) -> pb.BatchRecharge:
        current_principal().require_role(*READING_ROLES)
        return batch_to_proto(await self._batch(request.batch_id))

    async def list_rows(
        self, request: pb.ListBatchRechargeRowsRequest
    ) -> pb.ListBatchRechargeRowsResponse:
        current_principal().require_role(*READING_ROLES)
        size = page_size(request.page_size, default=100, maximum=1000)
        batch = await self._batch(request.batch_id)
        key = decode_token(request.page_token) or {}
        after = key.get("row", 0)
        if (
            not isinstance(after, int)
            or key.get("batch", batch.batch_id) != batch.batch_id
            or key.get("problems", request.problems_only) != request.problems_only
        ):
            raise InvalidArgument(
                [FieldViolation("page_token", "not a token for this batch and filter")]
            )
        async with self.db.sessions() as session:
            found = await store.list_rows(
                session,
                batch.batch_id,
                after_row=after,
                limit=size + 1,
                problems_only=request.problems_only,
            )
        page = found[:size]
        response = pb.ListBatchRechargeRowsResponse(
            rows=[row_to_proto(r, batch.currency) for r in page]
        )
        if len(found) > size:
            response.next_page_token = encode_token(
                {
                    "batch": batch.batch_id,
                    "row": page[-1].row_number,
                    "problems": request.problems_only,
                }
            )
        return response

    # --- the worker ---------------------------------------------------------------------

    async def run(self) -> None:
        """The service's worker: works what is claimable, then waits a
        moment, for ever."""
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Unavailable:
                log.warning("batch recharges: database unavailable; retrying")
            except Exception:
                log.exception("batch recharges failed; will retry")
            await asyncio.sleep(self.interval)

    async def run_once(self, *, limit: int | None = None) -> int:
        """Work every RUNNING batch nobody else holds, oldest first, and
        return how many rows were settled (recharged or failed). With
        ``limit``, stop after that many rows and give the lease up."""
        async with self.db.sessions() as session:
            batch_ids = await store.claimable_batch_ids(session, self.owner, utcnow())
        settled = 0
        for batch_id in batch_ids:
            left = None if limit is None else limit - settled
            if left is not None and left <= 0:
                break
            settled += await self.process(batch_id, limit=left)
        return settled

    async def process(self, batch_id: str, *, limit: int | None = None) -> int:
        """Work one batch if this worker can claim it; the rows settled."""
        batch = await self._claim(batch_id)
        if batch is None:
            return 0
        settled = 0
        try:
            while True:
                async with self.db.sessions() as session:
                    rows = await store.valid_rows(session, batch_id, ROWS_PER_READ)
                for row in rows:
                    if limit is not None and settled >= limit:
                        await self._release(batch_id)
                        return settled
                    if await self._settle(batch, row):
                        settled += 1
                if not rows:
                    break
            await self._finish(batch)
        except _Superseded:
            log.warning("batch recharge taken over elsewhere", batch_id=batch_id)
        except asyncio.CancelledError:
            # Shutting down: another replica may take the batch over at once.
            # If that fails too, the lease lapses soon enough.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._release(batch_id), timeout=5)
            raise
        return settled

    async def _claim(self, batch_id: str) -> BatchRecord | None:
        now = utcnow()
        async with self.db.transaction() as session:
            if not await store.claim(
                session, batch_id, owner=self.owner, now=now, until=now + self.lease
            ):
                return None
            return await store.get_batch(session, batch_id)

    async def _release(self, batch_id: str) -> None:
        async with self.db.transaction() as session:
            await store.release(session, batch_id, owner=self.owner)

    async def _settle(self, batch: BatchRecord, row: RowRecord) -> bool:
        """One row in one transaction: the lease renewed, the recharge (or
        its refusal) and the row's mark together. False when the row was
        settled already."""
        now = utcnow()
        async with self.db.transaction() as session:
            if not await store.renew(
                session, batch.batch_id, owner=self.owner, until=now + self.lease
            ):
                raise _Superseded
            current = await store.get_row(session, batch.batch_id, row.row_number)
            if current is None or current.outcome != store.VALID:
                return False
            try:
                movement_id = await self._recharge(session, batch, current, now)
            except ServiceError as exc:
                return await store.mark_row(
                    session,
                    batch.batch_id,
                    current.row_number,
                    store.FAILED,
                    reason=exc.reason,
                    message=exc.message,
                )
            return await store.mark_row(
                session,
                batch.batch_id,
                current.row_number,
                store.RECHARGED,
                movement_id=movement_id,
            )

    async def _recharge(
        self, session: AsyncSession, batch: BatchRecord, row: RowRecord, now: dt.datetime
    ) -> str:
        """The row's recharge, under a savepoint: a refusal leaves nothing
        of it behind. Raises the ledger's ServiceError when refused."""
        async with session.begin_nested():
            card = await card_store.card_by_number(session, row.card_number)
            if card is None:
                raise NotFound("no card with this number", reason=CARD_NOT_FOUND)
            program = await program_store.get_program(session, card.program_id)
            if program is None:
                raise FailedPrecondition(
                    "this card's program carries no stored value", reason=STORED_VALUE_NOT_OFFERED
                )
            policy = (await rule_store.get_policy(session)).policy
            if policy.currency != batch.currency:
                raise FailedPrecondition(
                    f"the chain's stored value is kept in {policy.currency} now",
                    reason="CURRENCY_CHANGED",
                )
            movement = await ledger.recharge(
                session,
                card,
                program,
                policy,
                ledger.Request(
                    request_id=f"batch:{batch.batch_id}:{row.row_number}",
                    request_hash=f"{batch.batch_id}:{row.row_number}",
                    stamp=Stamp(batch.started_by, batch.store_id, now),
                ),
                amount=row.amount,
                channel=CHANNEL,
                operator_id=batch.started_by,
                reference=batch.payment_reference,
                note=row.note,
            )
        return movement.movement_id

    async def _finish(self, batch: BatchRecord) -> None:
        now = utcnow()
        async with self.db.transaction() as session:
            if not await store.renew(
                session, batch.batch_id, owner=self.owner, until=now + self.lease
            ):
                raise _Superseded
            done = await store.finish(session, batch.batch_id, owner=self.owner, now=now)
            finished = await store.get_batch(session, batch.batch_id) if done else None
        if finished is not None:
            log.info(
                "batch recharge done",
                batch_id=batch.batch_id,
                rows_recharged=finished.rows_recharged,
                rows_failed=finished.rows_failed,
            )


def _check_shape(request: pb.StartBatchRechargeRequest) -> tuple[str, str]:
    """The request's fields, all problems at once: (file name, payment
    reference)."""
    v = Violations()
    file_name = request.file_name.strip()
    if not file_name:
        v.add("file_name", "required, e.g. recharge.csv")
    elif len(file_name) > MAX_FILE_NAME_LENGTH:
        v.add("file_name", f"at most {MAX_FILE_NAME_LENGTH} characters")
    if not request.content:
        v.add("content", "required: the CSV or XLSX file")
    elif len(request.content) > MAX_FILE_BYTES:
        v.add("content", f"at most {MAX_FILE_BYTES // 2**20} MiB")
    reference = request.payment_reference.strip()
    if not reference:
        v.add("payment_reference", "required: the company's payment")
    elif len(reference) > rules.MAX_REFERENCE_LENGTH:
        v.add("payment_reference", f"at most {rules.MAX_REFERENCE_LENGTH} characters")
    if not request.HasField("expected_total"):
        v.add("expected_total", "required: the total the company paid")
    else:
        if not rules.check_currency(request.expected_total.currency_code.strip().upper()):
            v.add("expected_total.currency_code", "an ISO 4217 code such as CNY")
        if request.expected_total.minor_units <= 0:
            v.add("expected_total.minor_units", "more than zero")
    v.raise_if_any()
    return file_name, reference
