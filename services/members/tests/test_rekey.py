"""Rewrapping members' data keys after a master key rotation, and the
``cornucopia rekey members`` command, on real databases (SQLite and
PostgreSQL): only keys not under the active master key change, the data
keys themselves stay the same, and a run can be interrupted and repeated."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
import sqlalchemy as sa

from chassis import cli
from chassis.crypto import KeyRing, WrappedKey, development_key
from chassis.db import Database
from services.members import rekey
from services.members.store.members import member_keys
from tests.integration.infra import DatabaseFactory, migrated

pytestmark = pytest.mark.integration

MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"
OLD, NEW, LOST = development_key("rekey-old"), development_key("rekey-new"), b"\x07" * 32


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


@pytest.fixture
async def members_url(database_url: DatabaseFactory) -> str:
    return await migrated(database_url, MIGRATIONS, "members")


async def seed(url: str, ring: KeyRing, count: int, prefix: str = "M") -> dict[str, bytes]:
    """Key rows as members' enrollment writes them; returns the data keys."""
    data_keys: dict[str, bytes] = {}
    db = Database(url)
    try:
        async with db.transaction() as session:
            for i in range(count):
                member_id = f"{prefix}{i:09d}"
                data_key, wrapped = ring.new_data_key(member_id)
                data_keys[member_id] = data_key
                await session.execute(
                    sa.insert(member_keys).values(
                        member_id=member_id,
                        master_key_id=wrapped.master_key_id,
                        wrapped_key=wrapped.ciphertext,
                    )
                )
    finally:
        await db.dispose()
    return data_keys


async def key_rows(url: str) -> dict[str, WrappedKey]:
    db = Database(url)
    try:
        async with db.sessions() as session:
            rows = await session.execute(sa.select(member_keys))
            return {r.member_id: WrappedKey(r.master_key_id, r.wrapped_key) for r in rows}
    finally:
        await db.dispose()


async def test_every_data_key_ends_under_the_active_key_unchanged(members_url: str) -> None:
    before = await seed(members_url, KeyRing({"k1": OLD}, "k1"), 7)
    already = await seed(members_url, KeyRing({"k2": NEW}, "k2"), 2, prefix="N")
    rotated = KeyRing({"k1": OLD, "k2": NEW}, "k2")
    untouched = {m: w for m, w in (await key_rows(members_url)).items() if m in already}

    db = Database(members_url)
    try:
        report = await rekey.rewrap_data_keys(db, rotated, batch_size=3)
        assert (report.rewrapped, report.batches, report.failed) == (7, 3, 0)
        assert await rekey.data_keys_by_master_key(db) == {"k2": 9}
        # Idempotent: nothing left to do.
        again = await rekey.rewrap_data_keys(db, rotated, batch_size=3)
        assert (again.rewrapped, again.batches) == (0, 0)
    finally:
        await db.dispose()

    rows = await key_rows(members_url)
    retired = KeyRing({"k2": NEW}, "k2")  # the old key can go now
    for member_id, data_key in {**before, **already}.items():
        assert retired.unwrap(rows[member_id], member_id) == data_key
    for member_id, wrapped in untouched.items():
        assert rows[member_id] == wrapped


async def test_an_interrupted_run_keeps_its_batches_and_the_next_one_finishes(
    members_url: str,
) -> None:
    before = await seed(members_url, KeyRing({"k1": OLD}, "k1"), 5)
    rotated = KeyRing({"k1": OLD, "k2": NEW}, "k2")

    class Interrupted(Exception):
        pass

    def stop_after_first(report: rekey.RekeyReport) -> None:
        raise Interrupted

    db = Database(members_url)
    try:
        with pytest.raises(Interrupted):
            await rekey.rewrap_data_keys(db, rotated, batch_size=2, progress=stop_after_first)
        assert await rekey.data_keys_by_master_key(db) == {"k1": 3, "k2": 2}
        report = await rekey.rewrap_data_keys(db, rotated, batch_size=2)
        assert report.rewrapped == 3
        assert await rekey.data_keys_by_master_key(db) == {"k2": 5}
    finally:
        await db.dispose()
    rows = await key_rows(members_url)
    for member_id, data_key in before.items():
        assert rotated.unwrap(rows[member_id], member_id) == data_key


async def test_keys_under_an_unknown_master_key_are_reported_and_skipped(
    members_url: str,
) -> None:
    await seed(members_url, KeyRing({"k0": LOST}, "k0"), 2, prefix="L")
    await seed(members_url, KeyRing({"k1": OLD}, "k1"), 3)
    db = Database(members_url)
    try:
        report = await rekey.rewrap_data_keys(db, KeyRing({"k1": OLD, "k2": NEW}, "k2"))
        assert report.rewrapped == 3
        assert dict(report.unknown_key) == {"k0": 2}
        assert await rekey.data_keys_by_master_key(db) == {"k0": 2, "k2": 3}
    finally:
        await db.dispose()


def test_the_command_rewraps_and_says_when_an_old_key_may_go(
    members_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = asyncio.run(seed(members_url, KeyRing({"k1": OLD}, "k1"), 5))
    monkeypatch.setenv("CORNUCOPIA_ENV", "test")
    monkeypatch.setenv("MEMBERS_DATABASE_URL", members_url)
    monkeypatch.setenv("MEMBERS_MASTER_KEYS", f"k1:{b64(OLD)},k2:{b64(NEW)}")
    monkeypatch.setenv("MEMBERS_BLIND_INDEX_KEY", b64(development_key("rekey-index")))
    monkeypatch.delenv("MEMBERS_ACTIVE_KEY_ID", raising=False)
    monkeypatch.setenv("LOG_LEVEL", "WARNING")

    assert cli.main(["rekey", "members", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "active master key 'k2'" in out
    assert "data keys by master key: k1 5" in out
    assert "5 data keys to rewrap" in out

    assert cli.main(["rekey", "members", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert "rewrapped 5 data keys to 'k2'" in captured.out
    assert "data keys by master key now: k2 5" in captured.out
    assert "'k1' any more: it may be removed from MEMBERS_MASTER_KEYS" in captured.out
    assert "batch 3" in captured.err
    rows = asyncio.run(key_rows(members_url))
    retired = KeyRing({"k2": NEW}, "k2")
    assert {m: retired.unwrap(rows[m], m) for m in before} == before

    # A key row under a master key nobody has: status 1, and what to do.
    asyncio.run(seed(members_url, KeyRing({"k0": LOST}, "k0"), 1, prefix="L"))
    assert cli.main(["rekey", "members"]) == 1
    err = capsys.readouterr().err
    assert "1 data keys are wrapped by master key 'k0'" in err
    assert "MEMBERS_MASTER_KEYS" in err


def test_the_command_knows_which_services_keep_data_keys(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["rekey", "cards"])
    assert exited.value.code == cli.EXIT_USAGE
    assert "expected one of: members" in capsys.readouterr().err
