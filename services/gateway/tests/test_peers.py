"""The gateway's stubs: one per service for as long as its channel lives."""

from __future__ import annotations

import grpc

from chassis.config import Settings
from cornucopia.members.v1 import members_pb2_grpc, organisation_pb2_grpc
from services.gateway.deps import Peers


async def test_a_stub_is_made_once_and_forgotten_with_its_channel() -> None:
    settings = Settings(
        service="gateway",
        environment="test",
        peers={"members": "127.0.0.1:1", "cards": "127.0.0.1:2"},
    )
    peers = Peers(settings)
    members = peers.members
    organisation = peers.stub(organisation_pb2_grpc.OrganisationServiceStub, peers.members_channel)

    assert peers.members is members
    assert peers.stub(members_pb2_grpc.MembersServiceStub, peers.members_channel) is members
    assert (
        peers.stub(organisation_pb2_grpc.OrganisationServiceStub, peers.members_channel)
        is organisation
    )
    assert peers.cards is not members
    assert isinstance(peers.members_channel, grpc.aio.Channel)

    # Channels the gateway opened close with it, and their stubs go too.
    await peers.close()
    assert peers.members is not members
    await peers.close()
