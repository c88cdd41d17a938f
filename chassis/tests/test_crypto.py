from __future__ import annotations

import base64
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chassis.config import ConfigError
from chassis.crypto import (
    BlindIndex,
    DecryptionError,
    FieldCipher,
    KeyRing,
    UnknownMasterKey,
    WrappedKey,
    development_key,
    keys_from_env,
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


KEY = base64.b64encode(development_key("test-master")).decode()
INDEX = base64.b64encode(development_key("test-index")).decode()


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({}, ["MEMBERS_MASTER_KEYS", "MEMBERS_BLIND_INDEX_KEY"]),
        ({"MEMBERS_BLIND_INDEX_KEY": INDEX}, ["MEMBERS_MASTER_KEYS"]),
        (
            {"MEMBERS_MASTER_KEYS": f"k1:{KEY}", "MEMBERS_BLIND_INDEX_KEY": " "},
            ["MEMBERS_BLIND_INDEX_KEY"],
        ),
    ],
)
def test_missing_keys_in_production_are_a_configuration_error(
    environ: dict[str, str], named: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        keys_from_env("MEMBERS", environ, production=True)
    message = str(caught.value)
    for name in named:
        assert name in message
    for name in {"MEMBERS_MASTER_KEYS", "MEMBERS_BLIND_INDEX_KEY"} - set(named):
        assert name not in message
    # Outside production the development keys stand in.
    ring, _ = keys_from_env("MEMBERS", environ, production=False)
    assert ring.active_id in ("dev", "k1")


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"MEMBERS_MASTER_KEYS": "k1"}, "MEMBERS_MASTER_KEYS"),
        ({"MEMBERS_MASTER_KEYS": "k1:not base64!"}, "MEMBERS_MASTER_KEYS"),
        (
            {"MEMBERS_MASTER_KEYS": "k1:" + base64.b64encode(b"short").decode()},
            "MEMBERS_MASTER_KEYS",
        ),
        (
            {"MEMBERS_MASTER_KEYS": f"k1:{KEY}", "MEMBERS_ACTIVE_KEY_ID": "k9"},
            "MEMBERS_ACTIVE_KEY_ID",
        ),
        ({"MEMBERS_BLIND_INDEX_KEY": "%%%"}, "MEMBERS_BLIND_INDEX_KEY"),
        (
            {"MEMBERS_BLIND_INDEX_KEY": base64.b64encode(b"short").decode()},
            "MEMBERS_BLIND_INDEX_KEY",
        ),
    ],
)
def test_malformed_keys_are_a_configuration_error_that_shows_no_key(
    environ: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named) as caught:
        keys_from_env("MEMBERS", environ, production=False)
    assert KEY not in str(caught.value)


def test_an_unknown_master_key_is_told_apart_from_a_wrong_one() -> None:
    data_key, wrapped = ring("k1").new_data_key("M1")
    retired = KeyRing({"k2": development_key("k2")}, "k2")
    with pytest.raises(UnknownMasterKey) as caught:
        retired.unwrap(wrapped, "M1")
    assert caught.value.master_key_id == "k1"
    replaced = KeyRing({"k1": development_key("another k1")}, "k1")
    with pytest.raises(DecryptionError) as wrong:
        replaced.unwrap(wrapped, "M1")
    assert not isinstance(wrong.value, UnknownMasterKey)
    assert ring("k2").key_ids == {"k1", "k2"}
    assert ring("k2").unwrap(ring("k2").rewrap(wrapped, "M1"), "M1") == data_key
