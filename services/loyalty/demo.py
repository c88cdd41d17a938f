"""Demo conversion terms for development: the demo bank (registered by
services/cards/demo.py) converts its points into the chain's, 10 bank
points for 1 chain point, and back, 1 chain point for 8 bank points.

Loaded by ``cornucopia up`` in development only, after the cards demo,
through the public gRPC API: terms already there (HQ may have changed
them) are left as they are.
"""

from __future__ import annotations

import grpc

from chassis.grpcclient import bearer
from cornucopia.loyalty.v1 import points_pb2, points_pb2_grpc

CALL_TIMEOUT_SECONDS = 10.0
DEMO_PARTNER = "demo-bank"

DEMO_CONVERSION = points_pb2.PartnerConversion(
    partner_id=DEMO_PARTNER,
    enabled=True,
    to_chain=points_pb2.ConversionTerms(
        rate=points_pb2.ConversionRate(partner_points=10, chain_points=1),
        max_points=1_000_000,
        daily_chain_points_per_member=50_000,
    ),
    to_partner=points_pb2.ConversionTerms(
        rate=points_pb2.ConversionRate(partner_points=8, chain_points=1),
        min_points=100,
        daily_chain_points_per_member=50_000,
    ),
)


async def load_demo_conversion(channel: grpc.aio.Channel, token: str) -> None:
    """The demo bank's conversion terms, unless it has some already."""
    md = bearer(token)
    stub = points_pb2_grpc.PartnerConversionServiceStub(channel)
    try:
        await stub.GetPartnerConversion(
            points_pb2.GetPartnerConversionRequest(partner_id=DEMO_PARTNER),
            metadata=md,
            timeout=CALL_TIMEOUT_SECONDS,
        )
        return
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
    await stub.SetPartnerConversion(
        points_pb2.SetPartnerConversionRequest(
            request_id="demo-partner-conversion", partner_conversion=DEMO_CONVERSION
        ),
        metadata=md,
        timeout=CALL_TIMEOUT_SECONDS,
    )
