from __future__ import annotations

import base64
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chassis.crypto import (
    BlindIndex,
    DecryptionError,
    FieldCipher,
    KeyRing,
    WrappedKey,
    development_key,
    parse_keys,
)


def ring(active: str = "k1") -> KeyRing:
    return KeyRing({"k1": development_key("k1"), "k2": development_key("k2")}, active)


@given(st.text(max_size=200))
def test_a_field_round_trips(value: str) -> None:
    data_key, _ = ring().new_data_key("M1")
    cipher = FieldCipher(data_key, "M1")
    sealed = cipher.encrypt("mobile", value)
    # A short value may turn up in random bytes by chance; a real one must not.
    assert len(value.encode()) < 8 or value.encode() not in sealed
    assert cipher.decrypt("mobile", sealed) == value


def test_a_ciphertext_is_bound_to_its_owner_and_field() -> None:
    data_key, _ = ring().new_data_key("M1")
    sealed = FieldCipher(data_key, "M1").encrypt("mobile", "+8613800138000")
    with pytest.raises(DecryptionError):
        FieldCipher(data_key, "M2").decrypt("mobile", sealed)
    with pytest.raises(DecryptionError):
        FieldCipher(data_key, "M1").decrypt("email", sealed)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(DecryptionError):
        FieldCipher(data_key, "M1").decrypt("mobile", tampered)


def test_the_same_value_encrypts_differently_each_time() -> None:
    data_key, _ = ring().new_data_key("M1")
    cipher = FieldCipher(data_key, "M1")
    assert cipher.encrypt("mobile", "x") != cipher.encrypt("mobile", "x")


def test_data_keys_unwrap_only_for_their_owner_and_survive_rotation() -> None:
    old = ring("k1")
    data_key, wrapped = old.new_data_key("M1")
    assert wrapped.master_key_id == "k1"
    assert old.unwrap(wrapped, "M1") == data_key
    with pytest.raises(DecryptionError):
        old.unwrap(wrapped, "M2")

    rotated = ring("k2")
    rewrapped = rotated.rewrap(wrapped, "M1")
    assert rewrapped.master_key_id == "k2"
    assert rotated.unwrap(rewrapped, "M1") == data_key

    retired = KeyRing({"k2": development_key("k2")}, "k2")
    with pytest.raises(DecryptionError):
        retired.unwrap(wrapped, "M1")
    assert retired.unwrap(rewrapped, "M1") == data_key


def test_a_lost_data_key_means_unreadable_data() -> None:
    keys = ring()
    data_key, _ = keys.new_data_key("M1")
    sealed = FieldCipher(data_key, "M1").encrypt("given_name", "Li")
    other_key, _ = keys.new_data_key("M1")  # what is left after erasure: nothing that fits
    with pytest.raises(DecryptionError):
        FieldCipher(other_key, "M1").decrypt("given_name", sealed)
    with pytest.raises(DecryptionError):
        keys.unwrap(WrappedKey("k1", b"short"), "M1")


def test_blind_index_is_deterministic_keyed_and_separated_by_kind() -> None:
    index = BlindIndex(development_key("index"))
    assert index.digest("mobile", "+8613800138000") == index.digest("mobile", "+8613800138000")
    assert index.digest("mobile", "+8613800138000") != index.digest("email", "+8613800138000")
    other = BlindIndex(development_key("other"))
    assert index.digest("mobile", "+8613800138000") != other.digest("mobile", "+8613800138000")
    with pytest.raises(ValueError):
        BlindIndex(b"short")


def test_master_keys_parse_from_the_secret_format() -> None:
    a, b = os.urandom(32), os.urandom(32)
    text = f"2026a:{base64.b64encode(a).decode()}, 2026b:{base64.b64encode(b).decode()}"
    assert parse_keys(text) == {"2026a": a, "2026b": b}
    with pytest.raises(ValueError):
        parse_keys("nokey")
    with pytest.raises(ValueError):
        parse_keys("k:" + base64.b64encode(b"too short").decode())
    with pytest.raises(ValueError):
        KeyRing({"k1": a}, "k9")
