"""Import jobs and their per-row problems. A job's counters and its resume
point (``records_done``) are written in the same transaction as the batch
of members they count, so a restart resumes exactly after the last
committed batch.

The uploaded file itself is kept in ``import_chunks`` (written in the
transaction that creates the job, deleted when it finishes), so any replica
can run a job. A running job is worked by one runner at a time: the runner
holds a lease (``runner_id`` and ``lease_expires_at``), renewed by every
batch; once a lease lapses (its replica died) another runner may claim the
job and resume it from ``records_done``."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.crypto import NONCE_BYTES, DecryptionError, KeyRing, WrappedKey
from chassis.db import BigIntKey, UTCDateTime
from services.members.domain.transfers import RowProblem
from services.members.store import metadata

RUNNING = "running"
# Marks a session whose transaction queued an import job, so that this
# process's runner starts it when the transaction commits.
IMPORT_QUEUED = "cornucopia.members.import_queued"
SUCCEEDED = "succeeded"
FAILED = "failed"

REFUSED = "refused"
DUPLICATE = "duplicate"

import_jobs = sa.Table(
    "import_jobs",
    metadata,
    sa.Column("import_job_id", sa.String(16), primary_key=True),
    sa.Column("state", sa.String(12), nullable=False),
    sa.Column("file_format", sa.String(8), nullable=False),
    sa.Column("dry_run", sa.Boolean, nullable=False),
    sa.Column("default_home_store_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("enrollment_channel", sa.String(20), nullable=False),
    sa.Column("file_sha256", sa.String(64), nullable=False),
    sa.Column("ignored_columns", sa.JSON, nullable=False),
    # Who asked, kept so that the rows are checked against their scope
    # when the job runs (or resumes after a restart).
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("created_from_store", sa.String(32), nullable=False, server_default=""),
    sa.Column("scope", sa.String(100), nullable=False),
    sa.Column("roles", sa.String(200), nullable=False),
    # File records consumed (blank ones included): where a resume starts.
    sa.Column("records_done", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("rows_read", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("enrolled", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("duplicates", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("refused", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("failure_reason", sa.String(500), nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    # 0005: who runs the job, and until when their claim holds.
    sa.Column("runner_id", sa.String(100), nullable=False, server_default=""),
    sa.Column("lease_expires_at", UTCDateTime, nullable=True),
    # The key the file's chunks are sealed with, wrapped by a master key
    # (whose id is beside it), while the job runs.
    sa.Column("file_key_id", sa.String(64), nullable=True),
    sa.Column("file_key", sa.LargeBinary, nullable=True),
    sa.Index("ix_import_jobs_state", "state"),
)

# The uploaded file of a job, in pieces of at most CHUNK_BYTES, each sealed
# with the job's file key (FileCipher), while the job runs.
import_chunks = sa.Table(
    "import_chunks",
    metadata,
    sa.Column("import_job_id", sa.String(16), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)
CHUNK_BYTES = 1024 * 1024

import_row_problems = sa.Table(
    "import_row_problems",
    metadata,
    sa.Column("seq", BigIntKey, primary_key=True, autoincrement=True),
    sa.Column("import_job_id", sa.String(16), nullable=False),
    sa.Column("row_number", sa.BigInteger, nullable=False),
    sa.Column("field", sa.String(64), nullable=False),
    sa.Column("reason", sa.String(300), nullable=False),
    sa.Column("kind", sa.String(12), nullable=False),
    sa.Index("ix_import_row_problems_job", "import_job_id", "seq"),
)


@dataclass(frozen=True)
class ImportJobRecord:
    import_job_id: str
    state: str
    file_format: str
    dry_run: bool
    default_home_store_id: str
    enrollment_channel: str
    file_sha256: str
    ignored_columns: tuple[str, ...]
    created_by: str
    created_from_store: str
    scope: str
    roles: tuple[str, ...]
    records_done: int
    rows_read: int
    enrolled: int
    duplicates: int
    refused: int
    failure_reason: str
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    runner_id: str = ""
    lease_expires_at: dt.datetime | None = None
    file_key: WrappedKey | None = None


@dataclass(frozen=True)
class ProblemRecord:
    seq: int
    row: int
    field: str
    reason: str
    kind: str


@dataclass(frozen=True)
class Progress:
    """What one batch adds to a job."""

    records: int = 0
    rows_read: int = 0
    enrolled: int = 0
    duplicates: int = 0
    refused: int = 0


def _job(row: sa.Row[tuple[object, ...]]) -> ImportJobRecord:
    m = row._mapping
    return ImportJobRecord(
        import_job_id=m["import_job_id"],
        state=m["state"],
        file_format=m["file_format"],
        dry_run=bool(m["dry_run"]),
        default_home_store_id=m["default_home_store_id"],
        enrollment_channel=m["enrollment_channel"],
        file_sha256=m["file_sha256"],
        ignored_columns=tuple(m["ignored_columns"] or ()),
        created_by=m["created_by"],
        created_from_store=m["created_from_store"],
        scope=m["scope"],
        roles=tuple(r for r in m["roles"].split(",") if r),
        records_done=m["records_done"],
        rows_read=m["rows_read"],
        enrolled=m["enrolled"],
        duplicates=m["duplicates"],
        refused=m["refused"],
        failure_reason=m["failure_reason"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        finished_at=m["finished_at"],
        runner_id=m["runner_id"],
        lease_expires_at=m["lease_expires_at"],
        file_key=WrappedKey(m["file_key_id"], m["file_key"])
        if m["file_key_id"] and m["file_key"]
        else None,
    )


async def insert_job(
    session: AsyncSession,
    *,
    import_job_id: str,
    file_format: str,
    dry_run: bool,
    default_home_store_id: str,
    enrollment_channel: str,
    file_sha256: str,
    ignored_columns: Sequence[str],
    created_by: str,
    created_from_store: str,
    scope: str,
    roles: Sequence[str],
    now: dt.datetime,
    file_key: WrappedKey | None = None,
) -> ImportJobRecord:
    await session.execute(
        sa.insert(import_jobs).values(
            import_job_id=import_job_id,
            state=RUNNING,
            file_format=file_format,
            dry_run=dry_run,
            default_home_store_id=default_home_store_id,
            enrollment_channel=enrollment_channel,
            file_sha256=file_sha256,
            ignored_columns=list(ignored_columns),
            created_by=created_by,
            created_from_store=created_from_store,
            scope=scope,
            roles=",".join(sorted(roles)),
            created_at=now,
            updated_at=now,
            file_key_id=file_key.master_key_id if file_key else None,
            file_key=file_key.ciphertext if file_key else None,
        )
    )
    session.info[IMPORT_QUEUED] = True
    job = await get_job(session, import_job_id)
    assert job is not None  # just inserted in this transaction
    return job


async def get_job(session: AsyncSession, import_job_id: str) -> ImportJobRecord | None:
    row = (
        await session.execute(
            sa.select(import_jobs).where(import_jobs.c.import_job_id == import_job_id)
        )
    ).first()
    return None if row is None else _job(row)


class FileCipher:
    """Seals the pieces of one job's file with the job's own key: the file
    holds personal data, and like every personal value it is stored only
    encrypted. Each piece is bound to its job and place in the file."""

    def __init__(self, key: bytes, import_job_id: str) -> None:
        self._aead = AESGCM(key)
        self.import_job_id = import_job_id

    @classmethod
    def new(cls, ring: KeyRing, import_job_id: str) -> tuple[FileCipher, WrappedKey]:
        key, wrapped = ring.new_data_key(f"import/{import_job_id}")
        return cls(key, import_job_id), wrapped

    @classmethod
    def of(cls, ring: KeyRing, import_job_id: str, wrapped: WrappedKey) -> FileCipher:
        """DecryptionError when the key does not unwrap."""
        return cls(ring.unwrap(wrapped, f"import/{import_job_id}"), import_job_id)

    def seal(self, seq: int, data: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, self._aad(seq))

    def open(self, seq: int, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], self._aad(seq))
        except InvalidTag:
            raise DecryptionError(f"piece {seq} of the file does not open") from None

    def _aad(self, seq: int) -> bytes:
        return f"import/{self.import_job_id}/{seq}".encode()


async def add_chunk(session: AsyncSession, import_job_id: str, seq: int, data: bytes) -> None:
    """One (sealed) piece of a job's file, in the transaction that creates
    the job."""
    await session.execute(
        sa.insert(import_chunks).values(import_job_id=import_job_id, seq=seq, data=data)
    )


async def read_chunk(session: AsyncSession, import_job_id: str, seq: int) -> bytes | None:
    c = import_chunks.c
    result = await session.execute(
        sa.select(c.data).where(c.import_job_id == import_job_id, c.seq == seq)
    )
    data: bytes | None = result.scalar_one_or_none()
    return data


def _claimable(runner_id: str, now: dt.datetime) -> sa.ColumnElement[bool]:
    c = import_jobs.c
    return sa.and_(
        c.state == RUNNING,
        sa.or_(
            c.runner_id == runner_id,
            c.runner_id == "",
            c.lease_expires_at.is_(None),
            c.lease_expires_at < now,
        ),
    )


async def claimable_job_ids(
    session: AsyncSession, runner_id: str, *, now: dt.datetime
) -> list[str]:
    """Running jobs that nobody else holds a live lease on, oldest first."""
    result = await session.execute(
        sa.select(import_jobs.c.import_job_id)
        .where(_claimable(runner_id, now))
        .order_by(import_jobs.c.created_at)
    )
    return list(result.scalars())


async def claim_job(
    session: AsyncSession,
    import_job_id: str,
    *,
    runner_id: str,
    now: dt.datetime,
    lease_until: dt.datetime,
) -> bool:
    """Take (or extend) the lease on a running job: True when this runner
    now holds it. Another runner's lease is taken only once it has lapsed;
    on PostgreSQL the row lock makes a claim wait for a batch in flight and
    then see the lease that batch renewed."""
    result = await session.execute(
        sa.update(import_jobs)
        .where(import_jobs.c.import_job_id == import_job_id, _claimable(runner_id, now))
        .values(runner_id=runner_id, lease_expires_at=lease_until)
    )
    return getattr(result, "rowcount", 0) == 1


async def release_job(session: AsyncSession, import_job_id: str, *, runner_id: str) -> None:
    """Give the lease up (a runner shutting down), so that another runner
    need not wait for it to lapse."""
    c = import_jobs.c
    await session.execute(
        sa.update(import_jobs)
        .where(c.import_job_id == import_job_id, c.runner_id == runner_id)
        .values(runner_id="", lease_expires_at=None)
    )


async def start_batch(
    session: AsyncSession,
    import_job_id: str,
    *,
    runner_id: str,
    records_done: int,
    now: dt.datetime,
    lease_until: dt.datetime,
) -> bool:
    """The batch's first statement: checks that this runner still holds
    the job's lease and the job is where the runner left it (False when
    another runner took the job over, moved it on, or it is no longer
    running), and renews the lease. Being a write, it also takes the job's
    row lock (PostgreSQL) or the write lock (SQLite) for the batch."""
    c = import_jobs.c
    result = await session.execute(
        sa.update(import_jobs)
        .where(
            c.import_job_id == import_job_id,
            c.records_done == records_done,
            c.state == RUNNING,
            c.runner_id == runner_id,
        )
        .values(updated_at=now, lease_expires_at=lease_until)
    )
    return getattr(result, "rowcount", 0) == 1


async def record_batch(
    session: AsyncSession,
    import_job_id: str,
    progress: Progress,
    problems: Sequence[tuple[RowProblem, str]],
    *,
    now: dt.datetime,
) -> None:
    """Add one batch's counts and problems to the job, in the batch's
    transaction."""
    if problems:
        await session.execute(
            sa.insert(import_row_problems),
            [
                {
                    "import_job_id": import_job_id,
                    "row_number": problem.row,
                    "field": problem.field[:64],
                    "reason": problem.reason[:300],
                    "kind": kind,
                }
                for problem, kind in problems
            ],
        )
    c = import_jobs.c
    await session.execute(
        sa.update(import_jobs)
        .where(c.import_job_id == import_job_id)
        .values(
            records_done=c.records_done + progress.records,
            rows_read=c.rows_read + progress.rows_read,
            enrolled=c.enrolled + progress.enrolled,
            duplicates=c.duplicates + progress.duplicates,
            refused=c.refused + progress.refused,
            updated_at=now,
        )
    )


async def finish_job(
    session: AsyncSession,
    import_job_id: str,
    *,
    runner_id: str,
    state: str,
    now: dt.datetime,
    failure_reason: str = "",
) -> bool:
    """End a running job held by this runner and drop its file; False when
    the job was not this runner's to end."""
    c = import_jobs.c
    result = await session.execute(
        sa.update(import_jobs)
        .where(c.import_job_id == import_job_id, c.state == RUNNING, c.runner_id == runner_id)
        .values(
            state=state,
            failure_reason=failure_reason[:500],
            updated_at=now,
            finished_at=now,
            runner_id="",
            lease_expires_at=None,
            file_key_id=None,
            file_key=None,
        )
    )
    if getattr(result, "rowcount", 0) != 1:
        return False
    await session.execute(
        sa.delete(import_chunks).where(import_chunks.c.import_job_id == import_job_id)
    )
    return True


async def list_problems(
    session: AsyncSession, import_job_id: str, *, after_seq: int, limit: int
) -> list[ProblemRecord]:
    p = import_row_problems.c
    result = await session.execute(
        sa.select(p.seq, p.row_number, p.field, p.reason, p.kind)
        .where(p.import_job_id == import_job_id, p.seq > after_seq)
        .order_by(p.seq)
        .limit(limit)
    )
    return [
        ProblemRecord(seq=r.seq, row=r.row_number, field=r.field, reason=r.reason, kind=r.kind)
        for r in result
    ]
