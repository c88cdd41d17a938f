"""Demo data for development: a small chain to click through.

Two regions (EAST, WEST), three stores (S001 and S002 in EAST, S003 in
WEST) and five staff logins with a development password. Loaded by
``cornucopia up`` in development only, through the public gRPC API with
fixed request ids, so loading it again changes nothing (and a record that
outlived its idempotency key is found rather than created twice).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from chassis.grpcclient import bearer
from cornucopia.common.v1 import org_pb2
from cornucopia.members.v1 import organisation_pb2 as pb
from cornucopia.members.v1 import organisation_pb2_grpc

# Development only: printed next to the development token by `cornucopia up`.
DEMO_PASSWORD = "cornucopia-demo"  # noqa: S105
CALL_TIMEOUT_SECONDS = 10.0

REGIONS = (("EAST", "华东区"), ("WEST", "西部区"))


def _store(store_id: str, region_id: str, name: str, *, where: tuple[str, ...]) -> pb.Store:
    province, city, district, street, postcode = where
    return pb.Store(
        store_id=store_id,
        region_id=region_id,
        display_name=name,
        address=pb.StoreAddress(
            province=province,
            city=city,
            district=district,
            street=street,
            postcode=postcode,
        ),
        time_zone="Asia/Shanghai",
        currency_code="CNY",
    )


STORES = (
    _store(
        "S001",
        "EAST",
        "南京东路店",
        where=("上海市", "上海市", "黄浦区", "南京东路 299 号", "200001"),
    ),
    _store(
        "S002", "EAST", "西湖店", where=("浙江省", "杭州市", "上城区", "湖滨路 18 号", "310006")
    ),
    _store(
        "S003", "WEST", "春熙路店", where=("四川省", "成都市", "锦江区", "春熙路 8 号", "610016")
    ),
)


def _ref(level: org_pb2.OrgLevel.ValueType, ident: str = "") -> org_pb2.OrgUnitRef:
    return org_pb2.OrgUnitRef(level=level, id=ident)


STAFF = (
    pb.StaffMember(
        login_id="hq.admin",
        display_name="周敏",
        assignment=_ref(org_pb2.ORG_LEVEL_HQ),
        roles=[pb.STAFF_ROLE_HQ_ADMIN],
    ),
    pb.StaffMember(
        login_id="east.manager",
        display_name="陈立",
        assignment=_ref(org_pb2.ORG_LEVEL_REGION, "EAST"),
        roles=[pb.STAFF_ROLE_REGION_MANAGER],
    ),
    pb.StaffMember(
        login_id="s001.manager",
        display_name="王芳",
        assignment=_ref(org_pb2.ORG_LEVEL_STORE, "S001"),
        roles=[pb.STAFF_ROLE_STORE_MANAGER],
    ),
    pb.StaffMember(
        login_id="s001.operator",
        display_name="李娜",
        assignment=_ref(org_pb2.ORG_LEVEL_STORE, "S001"),
        roles=[pb.STAFF_ROLE_STORE_OPERATOR],
    ),
    pb.StaffMember(
        login_id="callcenter.agent",
        display_name="张伟",
        assignment=_ref(org_pb2.ORG_LEVEL_HQ),
        roles=[pb.STAFF_ROLE_CALL_CENTER],
    ),
)


@dataclass(frozen=True)
class DemoLogin:
    login_id: str
    password: str
    role: str
    where: str


def _already_exists(exc: grpc.aio.AioRpcError) -> bool:
    return exc.code() == grpc.StatusCode.ALREADY_EXISTS


async def _staff_by_login(
    stub: organisation_pb2_grpc.OrganisationServiceAsyncStub,
    metadata: tuple[tuple[str, str]],
    login_id: str,
) -> pb.StaffMember:
    token = ""
    while True:
        page = await stub.ListStaff(
            pb.ListStaffRequest(page_size=100, page_token=token),
            metadata=metadata,
            timeout=CALL_TIMEOUT_SECONDS,
        )
        for member in page.staff:
            if member.login_id == login_id:
                return member
        token = page.next_page_token
        if not token:
            raise LookupError(f"demo login {login_id} exists but cannot be listed")


async def load_demo_data(channel: grpc.aio.Channel, token: str) -> list[DemoLogin]:
    """Create the demo chain through ``channel`` (the members service) with
    ``token`` (an HQ admin's); returns the logins to print."""
    stub = organisation_pb2_grpc.OrganisationServiceStub(channel)
    md = bearer(token)
    for region_id, name in REGIONS:
        try:
            await stub.CreateRegion(
                pb.CreateRegionRequest(
                    request_id=f"demo-region-{region_id}",
                    region=pb.Region(region_id=region_id, display_name=name),
                ),
                metadata=md,
                timeout=CALL_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as exc:
            if not _already_exists(exc):
                raise
    for store in STORES:
        try:
            await stub.CreateStore(
                pb.CreateStoreRequest(request_id=f"demo-store-{store.store_id}", store=store),
                metadata=md,
                timeout=CALL_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as exc:
            if not _already_exists(exc):
                raise
    logins: list[DemoLogin] = []
    for wanted in STAFF:
        try:
            member = await stub.CreateStaffMember(
                pb.CreateStaffMemberRequest(
                    request_id=f"demo-staff-{wanted.login_id}", staff_member=wanted
                ),
                metadata=md,
                timeout=CALL_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as exc:
            if not _already_exists(exc):
                raise
            member = await _staff_by_login(stub, md, wanted.login_id)
        # Always (re)set: the printed password must work, whatever was
        # tried against the demo account last time.
        await stub.SetStaffPassword(
            pb.SetStaffPasswordRequest(staff_id=member.staff_id, password=DEMO_PASSWORD),
            metadata=md,
            timeout=CALL_TIMEOUT_SECONDS,
        )
        ref = wanted.assignment
        where = "HQ" if ref.level == org_pb2.ORG_LEVEL_HQ else ref.id
        role = pb.StaffRole.Name(wanted.roles[0]).removeprefix("STAFF_ROLE_").lower()
        logins.append(DemoLogin(wanted.login_id, DEMO_PASSWORD, role, where))
    return logins


def demo_banner(logins: list[DemoLogin], gateway_url: str) -> str:
    """What `cornucopia up` prints under the development token."""
    lines = [
        "Demo chain: regions EAST and WEST; stores S001, S002 (EAST) and S003 (WEST).",
        f"Staff logins (development password {DEMO_PASSWORD!r}):",
        "",
    ]
    width = max(len(login.login_id) for login in logins) if logins else 0
    lines += [f"  {x.login_id:<{width}}  {x.role:<16}  {x.where}" for x in logins]
    body = f'{{"login_id": "s001.operator", "password": "{DEMO_PASSWORD}"}}'
    lines += [
        "",
        "Log in as staff and get a token of their own:",
        "",
        f"  curl -s -X POST {gateway_url}/v1/auth/token \\",
        "    -H 'content-type: application/json' \\",
        f"    -d '{body}'",
        "",
    ]
    return "\n".join(lines)
