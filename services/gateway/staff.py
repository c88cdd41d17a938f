"""Staff login: a login id and password in, a signed Cornucopia token out.

The gateway does not keep credentials. It asks the members service
(``VerifyStaffCredentials``, which only a service may call) with a token of
its own lasting a minute, then mints the staff member's token: their staff
id as subject, their roles, the organisation scope of their assignment and,
for store staff, their store. A wrong login id, a wrong password, a locked
account and a staff member who left all get the same 401.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import grpc
from fastapi import APIRouter, Body, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from chassis import auth
from chassis.auth import Scope, mint_token
from chassis.config import Settings
from chassis.grpcclient import bearer, rich_error
from chassis.logs import get_logger
from cornucopia.members.v1 import organisation_pb2, organisation_pb2_grpc
from services.gateway.problems import Problem, ProblemError, from_rpc, internal_error

if TYPE_CHECKING:
    from services.gateway.deps import Peers

log = get_logger(__name__)

ORGANISATION_SERVICE = organisation_pb2.DESCRIPTOR.services_by_name["OrganisationService"]
# A shift: long enough for a working day at the till, short enough that a
# token left on a shared terminal runs out overnight.
STAFF_TOKEN_TTL_SECONDS = 8 * 3600
# The gateway's own token, minted per login: it only has to reach members.
SERVICE_SUBJECT = "gateway"
CALL_TIMEOUT_SECONDS = 5.0
INVALID_CREDENTIALS = "INVALID_CREDENTIALS"

router = APIRouter()


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    login_id: str = Field(min_length=1, max_length=64, examples=["s001.operator"])
    password: str = Field(min_length=1, max_length=128, examples=["cornucopia-demo"])


class TokenResponse(BaseModel):
    access_token: str = Field(description="Send it as `Authorization: Bearer <token>`.")
    token_type: Literal["Bearer"] = "Bearer"  # noqa: S105 - the OAuth token type
    expires_in: int = Field(description="Seconds until the token expires.", examples=[28800])
    roles: list[str] = Field(examples=[["store_operator"]])
    scope: str = Field(
        description="`hq`, `region:<id>`, `store:<id>` or `call_center`.",
        examples=["store:S001"],
    )
    staff_id: str = Field(examples=["STQ2K9X4TD7M"])


def _organisation(request: Request) -> organisation_pb2_grpc.OrganisationServiceAsyncStub:
    peers: Peers = request.app.state.peers
    return peers.stub(organisation_pb2_grpc.OrganisationServiceStub, peers.members_channel)


def service_token(settings: Settings) -> str:
    return auth.service_token(settings.token_secret, SERVICE_SUBJECT)


def _refused() -> ProblemError:
    return ProblemError(
        401,
        INVALID_CREDENTIALS,
        "the login id or the password is wrong",
        headers={"WWW-Authenticate": 'Bearer realm="cornucopia"'},
    )


def _responses() -> dict[int | str, dict[str, Any]]:
    return {
        400: {"model": Problem, "description": "The body is malformed."},
        401: {"model": Problem, "description": "Wrong login id or password (same answer)."},
        500: {"model": Problem, "description": "An unexpected error; quote the trace_id."},
        503: {"model": Problem, "description": "The members service is unavailable."},
        504: {"model": Problem, "description": "The members service did not answer in time."},
    }


@router.post(
    "/v1/auth/token",
    tags=["auth"],
    summary="Staff login",
    description="Exchanges a staff member's login id and password for a signed token "
    "carrying their roles and organisation scope. Repeated wrong passwords lock the "
    "account for a few minutes.",
    responses=_responses(),
    operation_id="staffLogin",
)
async def staff_login(
    body: Annotated[LoginRequest, Body()], request: Request, response: Response
) -> TokenResponse:
    settings: Settings = request.app.state.settings
    try:
        verified = await _organisation(request).VerifyStaffCredentials(
            organisation_pb2.VerifyStaffCredentialsRequest(
                login_id=body.login_id, password=body.password
            ),
            metadata=bearer(service_token(settings)),
            timeout=CALL_TIMEOUT_SECONDS,
        )
    except grpc.aio.AioRpcError as exc:
        problem = rich_error(exc)
        if problem.reason == INVALID_CREDENTIALS:
            raise _refused() from None
        if problem.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            # Members refused the gateway itself: a configuration fault
            # (token secrets differ), not the caller's.
            log.error("members refused the gateway's service token", reason=problem.reason)
            raise internal_error() from None
        raise from_rpc(problem, peer="members") from None
    staff = verified.staff_member
    roles = [
        organisation_pb2.StaffRole.Name(r).removeprefix("STAFF_ROLE_").lower() for r in staff.roles
    ]
    token = mint_token(
        settings.token_secret,
        staff.staff_id,
        roles,
        Scope.parse(verified.scope),
        ttl_seconds=STAFF_TOKEN_TTL_SECONDS,
        store_id=verified.store_id,
    )
    # RFC 6749 §5.1: token responses are never cached.
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return TokenResponse(
        access_token=token,
        expires_in=STAFF_TOKEN_TTL_SECONDS,
        roles=sorted(roles),
        scope=verified.scope,
        staff_id=staff.staff_id,
    )
