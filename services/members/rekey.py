"""Rewrapping members' data keys after a master key rotation
(``cornucopia rekey members``).

Each member's data key is stored wrapped by a master key, with that key's id
beside it. After the active master key changes, existing members keep data
keys wrapped by the old one; this rewraps every data key that is not under
the active master key, so the old key can be retired. Only the wrapping
changes: the data key, and so every sealed field, stays as it is.

Batches of ``batch_size`` rows, each in a unit of work of its own and
committed before the next, so an interrupted run keeps what it did and a
second run carries on (it only ever looks at keys not yet under the active
master key). A row is rewritten only if it is still what was read, so a
member erased or rewrapped meanwhile is left alone. The service may keep
running meanwhile: every pod can unwrap with the old and the new key.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa

from chassis.crypto import DecryptionError, KeyRing, UnknownMasterKey, WrappedKey
from chassis.db import Database
from services.members.store.members import member_keys

DEFAULT_BATCH_SIZE = 500


@dataclass
class RekeyReport:
    active_key_id: str
    rewrapped: int = 0
    batches: int = 0
    # Data keys that could not be rewrapped, by master key id: the master key
    # is not in the key ring, or does not open them.
    unknown_key: collections.Counter[str] = field(default_factory=collections.Counter)
    unreadable: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def failed(self) -> int:
        return sum(self.unknown_key.values()) + sum(self.unreadable.values())


async def data_keys_by_master_key(db: Database) -> dict[str, int]:
    """How many data keys each master key wraps (the query to run before
    removing a master key)."""
    k = member_keys.c
    async with db.sessions() as session:
        rows = await session.execute(
            sa.select(k.master_key_id, sa.func.count()).group_by(k.master_key_id)
        )
        return {str(key_id): int(n) for key_id, n in rows.all()}


async def rewrap_data_keys(
    db: Database,
    ring: KeyRing,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[RekeyReport], None] | None = None,
) -> RekeyReport:
    """Rewrap every data key not under ``ring.active_id``."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    k = member_keys.c
    report = RekeyReport(active_key_id=ring.active_id)
    after = ""
    while True:
        async with db.transaction() as session:
            rows = (
                await session.execute(
                    sa.select(k.member_id, k.master_key_id, k.wrapped_key)
                    .where(k.master_key_id != ring.active_id, k.member_id > after)
                    .order_by(k.member_id)
                    .limit(batch_size)
                )
            ).all()
            if not rows:
                break
            for row in rows:
                old = WrappedKey(row.master_key_id, row.wrapped_key)
                try:
                    new = ring.rewrap(old, row.member_id)
                except UnknownMasterKey:
                    report.unknown_key[row.master_key_id] += 1
                    continue
                except DecryptionError:
                    report.unreadable[row.master_key_id] += 1
                    continue
                result = await session.execute(
                    sa.update(member_keys)
                    .where(
                        k.member_id == row.member_id,
                        k.master_key_id == old.master_key_id,
                        k.wrapped_key == old.ciphertext,
                    )
                    .values(master_key_id=new.master_key_id, wrapped_key=new.ciphertext)
                )
                report.rewrapped += int(getattr(result, "rowcount", 0) or 0)
            # Past this batch even where a key failed: the run ends.
            after = rows[-1].member_id
        report.batches += 1
        if progress is not None:
            progress(report)
    return report
