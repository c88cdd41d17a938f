"""AIP-158 paging: page_size clamping and opaque page tokens."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import create_async_engine

from chassis.errors import FieldViolation, InvalidArgument
from chassis.paging import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    decode_token,
    encode_token,
    newest_first,
    page_size,
)


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (0, DEFAULT_PAGE_SIZE),
        (1, 1),
        (DEFAULT_PAGE_SIZE + 1, DEFAULT_PAGE_SIZE + 1),
        (MAX_PAGE_SIZE, MAX_PAGE_SIZE),
        (MAX_PAGE_SIZE + 1, MAX_PAGE_SIZE),
        (10_000_000, MAX_PAGE_SIZE),
    ],
)
def test_page_size_defaults_and_clamps(requested: int, expected: int) -> None:
    assert page_size(requested) == expected


def test_page_size_with_service_limits() -> None:
    assert page_size(0, default=5, maximum=50) == 5
    assert page_size(80, default=5, maximum=50) == 50
    assert page_size(7, default=5, maximum=50) == 7


@given(st.integers(min_value=0, max_value=2**31 - 1))
def test_page_size_is_always_within_bounds(requested: int) -> None:
    size = page_size(requested)
    assert 1 <= size <= MAX_PAGE_SIZE
    if 0 < requested <= MAX_PAGE_SIZE:
        assert size == requested


@pytest.mark.parametrize("requested", [-1, -100])
def test_a_negative_page_size_is_invalid(requested: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        page_size(requested)
    assert caught.value.violations == (FieldViolation("page_size", "must not be negative"),)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.text(max_size=30),
)
keys = st.dictionaries(
    st.text(max_size=12),
    st.one_of(json_scalars, st.lists(json_scalars, max_size=3)),
    max_size=5,
)


@given(keys)
def test_a_token_round_trips_its_key(key: dict[str, Any]) -> None:
    token = encode_token(key)
    # Opaque and safe in a URL or a query string as it is.
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    decoded = decode_token(token)
    if key:
        assert decoded == key
    else:
        # An empty key still round-trips; only an empty *token* means "first page".
        assert decoded == {}


def test_a_typical_keyset_token() -> None:
    key = {"created_at": "2026-11-22T14:10:19Z", "member_id": "M7Q2K9X4TD"}
    token = encode_token(key)
    assert "M7Q2K9X4TD" not in token  # opaque, not readable at a glance
    assert decode_token(token) == key
    # Key order does not change the token.
    assert encode_token(dict(reversed(list(key.items())))) == token


def test_no_token_is_the_first_page() -> None:
    assert decode_token("") is None


def expect_bad_token(token: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        decode_token(token)
    assert [v.field for v in caught.value.violations] == ["page_token"]


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("!!!", id="not base64"),
        pytest.param("a", id="impossible length"),
        pytest.param("not a token at all", id="words"),
        pytest.param(b64(b"[1, 2]"), id="a list"),
        pytest.param(b64(b'"text"'), id="a string"),
        pytest.param(b64(b"42"), id="a number"),
        pytest.param(b64(b"null"), id="null"),
        pytest.param(b64(b"{broken"), id="broken json"),
        pytest.param(b64(b"\xff\xfe\x00{"), id="not utf-8"),
        pytest.param(b64(b"[" * 5_000), id="deeply nested (a 7 KB token)"),
    ],
)
def test_a_garbage_token_is_invalid_argument_on_page_token(token: str) -> None:
    expect_bad_token(token)


@given(st.text(min_size=1, max_size=60))
def test_any_text_is_a_key_or_invalid_argument(token: str) -> None:
    try:
        decoded = decode_token(token)
    except InvalidArgument as err:
        assert [v.field for v in err.violations] == ["page_token"]
    else:
        assert isinstance(decoded, dict)


async def test_newest_first_pages_through_ties_without_gaps_or_repeats() -> None:
    rows = sa.Table(
        "rows",
        sa.MetaData(),
        sa.Column("row_id", sa.String(8), primary_key=True),
        sa.Column("at", sa.DateTime, nullable=False),
    )
    noon = dt.datetime(2026, 11, 30, 12, 0)
    # Three rows share a time: only the id breaks the tie.
    data = [("A", noon), ("B", noon), ("C", noon), ("D", noon + dt.timedelta(minutes=1))]
    engine = create_async_engine("sqlite+aiosqlite://")
    async with engine.begin() as conn:
        await conn.run_sync(rows.metadata.create_all)
        await conn.execute(sa.insert(rows), [{"row_id": i, "at": at} for i, at in data])
        seen: list[str] = []
        after = None
        while True:
            query = newest_first(sa.select(rows), rows.c.at, rows.c.row_id, after, 2)
            page = (await conn.execute(query)).all()
            seen.extend(r.row_id for r in page)
            if len(page) < 2:
                break
            after = (page[-1].at, page[-1].row_id)
    await engine.dispose()
    assert seen == ["D", "C", "B", "A"]
