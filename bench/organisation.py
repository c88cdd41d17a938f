"""The stores the member benchmarks enroll into.

Members can only be enrolled into open stores of the organisation tree, so
each benchmark opens its stores first: through the members service's public
API when one is running (``open_stores``), or through the store layer when
the members are seeded behind the service's back (``insert_stores``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable

import grpc

from chassis.db import Database, utcnow
from cornucopia.members.v1 import organisation_pb2 as pb
from cornucopia.members.v1 import organisation_pb2_grpc
from services.members.domain import organisation as rules
from services.members.store import organisation as org_store

REGION_ID = "BENCH"
TIME_ZONE = "Asia/Shanghai"
CURRENCY = "CNY"
ADDRESS = rules.Address(province="上海市", city="上海市", district="黄浦区", street="南京东路 1 号")


def store_id(n: int) -> str:
    """The n-th benchmark store: S000, S001, ..."""
    return f"S{n:03d}"


def _store(code: str) -> pb.Store:
    a = ADDRESS
    return pb.Store(
        store_id=code,
        region_id=REGION_ID,
        display_name=f"Bench {code}",
        address=pb.StoreAddress(
            province=a.province, city=a.city, district=a.district, street=a.street
        ),
        time_zone=TIME_ZONE,
        currency_code=CURRENCY,
    )


async def open_stores(
    address: str, metadata: tuple[tuple[str, str], ...], store_ids: Iterable[str]
) -> None:
    """Open the region and the stores through the members service at
    ``address`` (``metadata``: an HQ admin's token). Fixed request ids, and
    what exists already is left as it is."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = organisation_pb2_grpc.OrganisationServiceStub(channel)
        await _unless_exists(
            stub.CreateRegion(
                pb.CreateRegionRequest(
                    request_id=f"bench-region-{REGION_ID}",
                    region=pb.Region(region_id=REGION_ID, display_name="Benchmarks"),
                ),
                metadata=metadata,
            )
        )
        for code in store_ids:
            await _unless_exists(
                stub.CreateStore(
                    pb.CreateStoreRequest(request_id=f"bench-store-{code}", store=_store(code)),
                    metadata=metadata,
                )
            )


async def _unless_exists(call: Awaitable[object]) -> None:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise


async def insert_stores(db: Database, store_ids: Iterable[str]) -> None:
    """Write the region and the stores straight into a migrated members
    database (no events), for a benchmark that seeds members the same way."""
    stamp = org_store.Stamp("bench", "", utcnow())
    async with db.transaction() as session:
        await org_store.insert_region(session, REGION_ID, "Benchmarks", stamp)
        for code in store_ids:
            fields = rules.validate_store(
                rules.StoreFields(code, REGION_ID, f"Bench {code}", ADDRESS, TIME_ZONE, CURRENCY)
            )
            await org_store.insert_store(session, fields, stamp)
