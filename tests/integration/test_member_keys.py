"""Master key rotation of the members service end to end, as the operations
guide describes it: add the new key, make it active, rewrap the existing
data keys, retire the old key. And what happens when a master key still in
use is missing: a clear error, never a member with empty fields."""

from __future__ import annotations

import base64

import grpc
import pytest
import sqlalchemy as sa

from chassis.crypto import KeyRing, development_key
from cornucopia.members.v1 import members_pb2, members_pb2_grpc
from services.members import rekey
from services.members.server import definition as members_definition
from services.members.store.members import member_keys
from tests.integration.conftest import Suite, auth, rpc_details, seed_organisation
from tests.integration.infra import DatabaseFactory

OLD, NEW = development_key("rotation-old"), development_key("rotation-new")


def keys_text(**keys: bytes) -> str:
    return ",".join(f"{key_id}:{base64.b64encode(key).decode()}" for key_id, key in keys.items())


def a_member(mobile: str) -> members_pb2.Member:
    return members_pb2.Member(
        home_store_id="S001",
        given_name="Li",
        family_name="Na",
        mobile=mobile,
        email="li.na@example.com",
        gender=members_pb2.GENDER_FEMALE,
        preferred_language="en",
    )


def stub(suite: Suite) -> members_pb2_grpc.MembersServiceStub:
    return members_pb2_grpc.MembersServiceStub(suite.channels["members"])


async def enroll(suite: Suite, request_id: str, mobile: str) -> str:
    created = await stub(suite).CreateMember(
        members_pb2.CreateMemberRequest(request_id=request_id, member=a_member(mobile)),
        metadata=auth(),
    )
    return created.member_id


async def get(suite: Suite, member_id: str) -> members_pb2.Member:
    return await stub(suite).GetMember(
        members_pb2.GetMemberRequest(member_id=member_id), metadata=auth()
    )


async def master_key_ids(suite: Suite) -> dict[str, str]:
    async with suite.runtimes["members"].db.sessions() as session:
        rows = await session.execute(
            sa.select(member_keys.c.member_id, member_keys.c.master_key_id)
        )
        return {row.member_id: row.master_key_id for row in rows}


async def restart_with(suite: Suite, url: str, monkeypatch: pytest.MonkeyPatch, keys: str) -> None:
    if "members" in suite.runtimes:
        await suite.stop("members")
    monkeypatch.setenv("MEMBERS_MASTER_KEYS", keys)
    monkeypatch.delenv("MEMBERS_ACTIVE_KEY_ID", raising=False)
    await suite.start(members_definition, url)


async def test_a_master_key_rotation_with_rekey_keeps_every_member_readable(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = await database_url("members")
    await restart_with(suite, url, monkeypatch, keys_text(k1=OLD))
    await seed_organisation(suite)
    first = await enroll(suite, "rotation-1", "+8613800138001")

    # The new key, listed last, is active: new members use it at once.
    await restart_with(suite, url, monkeypatch, keys_text(k1=OLD, k2=NEW))
    second = await enroll(suite, "rotation-2", "+8613800138002")
    assert await master_key_ids(suite) == {first: "k1", second: "k2"}

    # cornucopia rekey members, with the service running.
    ring = KeyRing({"k1": OLD, "k2": NEW}, "k2")
    report = await rekey.rewrap_data_keys(suite.runtimes["members"].db, ring)
    assert (report.rewrapped, report.failed) == (1, 0)
    assert await master_key_ids(suite) == {first: "k2", second: "k2"}
    assert (await get(suite, first)).given_name == "Li"

    # The old key is retired; everyone still reads in clear.
    await restart_with(suite, url, monkeypatch, keys_text(k2=NEW))
    for member_id, mobile in ((first, "+8613800138001"), (second, "+8613800138002")):
        member = await get(suite, member_id)
        assert (member.given_name, member.mobile) == ("Li", mobile)


async def test_a_member_under_a_missing_master_key_is_an_error_not_an_empty_file(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = await database_url("members")
    await restart_with(suite, url, monkeypatch, keys_text(k1=OLD))
    await seed_organisation(suite)
    member_id = await enroll(suite, "lost-key-1", "+8613800138003")

    # The mistake: the old key removed before its data keys were rewrapped.
    await restart_with(suite, url, monkeypatch, keys_text(k2=NEW))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get(suite, member_id)
    error = caught.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = rpc_details(error)
    assert details["reason"] == "MASTER_KEY_UNKNOWN"
    assert details["metadata"] == {"master_key_id": "k1"}
    assert "MEMBERS_MASTER_KEYS" in (error.details() or "")
    for personal in ("Li", "Na", "8613800138003", "li.na@example.com"):
        assert personal not in (error.details() or "")

    # Putting the key back heals it.
    await restart_with(suite, url, monkeypatch, keys_text(k1=OLD, k2=NEW))
    assert (await get(suite, member_id)).given_name == "Li"
