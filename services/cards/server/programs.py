"""The card programs' gRPC edge."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import STAFF_ROLES, Role, current_principal
from chassis.db import is_unique_violation, utcnow
from chassis.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from chassis.grpcserver import Context
from chassis.idempotency import run_idempotent
from chassis.paging import decode_token, encode_token, page_size
from chassis.service import ServiceContext
from cornucopia.cards.v1 import programs_pb2, programs_pb2_grpc
from services.cards.convert import (
    FORMS,
    HOLDINGS,
    SETTLEMENTS,
    program_from_proto,
    program_to_proto,
)
from services.cards.domain import programs as domain
from services.cards.store import partners as partner_store
from services.cards.store import programs as store

READING_ROLES = (*STAFF_ROLES, Role.SERVICE)


def program_not_found(program_id: str) -> NotFound:
    return NotFound(
        "no card program with this id",
        reason="PROGRAM_NOT_FOUND",
        metadata={"program_id": program_id},
    )


def _exists(program_id: str) -> AlreadyExists:
    return AlreadyExists(
        "a card program with this id exists",
        reason="PROGRAM_EXISTS",
        metadata={"program_id": program_id},
    )


class CardProgramsServicer(programs_pb2_grpc.CardProgramsServiceServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self.db = ctx.db

    async def CreateCardProgram(
        self, request: programs_pb2.CreateCardProgramRequest, context: Context
    ) -> programs_pb2.CardProgram:
        principal = current_principal()
        principal.require_role(Role.HQ_ADMIN)
        message = request.card_program
        violations = []
        if message.form not in FORMS:
            violations.append(FieldViolation("card_program.form", "physical or virtual"))
        if message.holding not in HOLDINGS:
            violations.append(FieldViolation("card_program.holding", "personal or group"))
        if message.cancel_settlement and message.cancel_settlement not in SETTLEMENTS:
            violations.append(
                FieldViolation("card_program.cancel_settlement", "pay out or forfeit")
            )
        if violations:
            raise InvalidArgument(violations)
        program = domain.validate_program(program_from_proto(message))
        now = utcnow()

        async def create(session: AsyncSession) -> programs_pb2.CardProgram:
            if await store.get_program(session, program.program_id) is not None:
                raise _exists(program.program_id)
            if (
                program.partner_id
                and await partner_store.get_partner(session, program.partner_id) is None
            ):
                raise FailedPrecondition(
                    "register the partner before its programs",
                    reason="PARTNER_NOT_FOUND",
                    metadata={"partner_id": program.partner_id},
                )
            for other_id, other in await store.number_formats(session):
                if program.number_format.overlaps(other):
                    raise FailedPrecondition(
                        "the number range overlaps another program's",
                        reason="NUMBER_RANGE_OVERLAP",
                        metadata={"program_id": other_id},
                    )
            await store.insert_program(
                session,
                program,
                domain.new_spread(program.number_format.capacity),
                principal=principal.subject,
                store_id=principal.store_id,
                now=now,
            )
            return programs_pb2.CardProgram(program_id=program.program_id)

        try:
            created = await run_idempotent(
                self.db,
                method="cards.CreateCardProgram",
                request_id=request.request_id,
                request=request,
                response_type=programs_pb2.CardProgram,
                work=create,
            )
        except IntegrityError as exc:
            # Two creations of one program id under different request ids.
            if is_unique_violation(exc):
                raise _exists(program.program_id) from None
            raise
        return await self._read(created.program_id)

    async def _read(self, program_id: str) -> programs_pb2.CardProgram:
        if not program_id.strip():
            raise InvalidArgument([FieldViolation("program_id", "required")])
        async with self.db.sessions() as session:
            record = await store.get_program(session, program_id)
        if record is None:
            raise program_not_found(program_id)
        return program_to_proto(record)

    async def GetCardProgram(
        self, request: programs_pb2.GetCardProgramRequest, context: Context
    ) -> programs_pb2.CardProgram:
        current_principal().require_role(*READING_ROLES)
        return await self._read(request.program_id)

    async def ListCardPrograms(
        self, request: programs_pb2.ListCardProgramsRequest, context: Context
    ) -> programs_pb2.ListCardProgramsResponse:
        current_principal().require_role(*READING_ROLES)
        size = page_size(request.page_size)
        key = decode_token(request.page_token) or {}
        after = str(key.get("id", ""))
        async with self.db.sessions() as session:
            records = await store.list_programs(
                session, after=after, limit=size + 1, partner_id=request.partner_id
            )
        response = programs_pb2.ListCardProgramsResponse(
            card_programs=[program_to_proto(r) for r in records[:size]]
        )
        if len(records) > size:
            response.next_page_token = encode_token({"id": records[size - 1].program.program_id})
        return response
