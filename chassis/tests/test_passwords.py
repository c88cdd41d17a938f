"""Stored secrets: salted, slow, self-describing, and never an exception."""

from __future__ import annotations

import datetime as dt

import pytest

from chassis import passwords

# Cheap parameters: the rules, not the cost, are under test.
FAST = {"n": 2**4, "r": 8, "p": 1}


def test_password_hash_is_salted_and_checks() -> None:
    first = passwords.hash_secret("correct horse battery", **FAST)
    second = passwords.hash_secret("correct horse battery", **FAST)
    assert first != second
    assert first.startswith("scrypt$16$8$1$")
    assert "correct" not in first
    assert passwords.secret_matches("correct horse battery", first)
    assert not passwords.secret_matches("correct horse batterY", first)


def test_default_cost_is_slow_scrypt() -> None:
    stored = passwords.hash_secret("correct horse battery")
    assert stored.startswith(f"scrypt${passwords.SCRYPT_N}$")
    assert passwords.SCRYPT_N >= 2**14
    assert passwords.secret_matches("correct horse battery", stored)


@pytest.mark.parametrize("stored", ["", "md5$abc", "scrypt$x$8$1$a$b", "scrypt$16$8$1"])
def test_malformed_hashes_never_match(stored: str) -> None:
    assert not passwords.secret_matches("anything at all", stored)


def test_the_dummy_hash_matches_nothing() -> None:
    assert not passwords.secret_matches("", passwords.DUMMY_HASH)
    assert not passwords.secret_matches("password123", passwords.DUMMY_HASH)


def test_the_stand_in_is_deterministic_per_salt() -> None:
    one = passwords.slow_hash("482915", b"salt-one", **FAST)
    assert one == passwords.slow_hash("482915", b"salt-one", **FAST)
    assert one != passwords.slow_hash("482915", b"salt-two", **FAST)
    assert one != passwords.slow_hash("482916", b"salt-one", **FAST)


def test_the_last_allowed_wrong_try_locks_and_a_spent_lock_starts_afresh() -> None:
    now = dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.UTC)
    lock = dt.timedelta(minutes=10)
    assert passwords.after_wrong_try(0, None, now, max_tries=3, lock=lock) == (1, None)
    assert passwords.after_wrong_try(2, None, now, max_tries=3, lock=lock) == (0, now + lock)
    assert passwords.is_locked(now + lock, now)
    assert not passwords.is_locked(now + lock, now + lock)
    later = now + lock
    assert passwords.after_wrong_try(0, now + lock, later, max_tries=3, lock=lock) == (1, None)
