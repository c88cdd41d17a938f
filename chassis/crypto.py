"""Encryption of personal data at rest, field by field.

Envelope encryption: every data subject (a member) has a data key of its own;
the data key is stored only wrapped by a master key, with the master key's id
so master keys can rotate. Destroying a subject's wrapped data key makes every
copy of their fields unreadable, backups included. Each field is sealed with
AES-256-GCM, bound to its owner and field name (associated data), so a
ciphertext moved to another member or column does not decrypt.

Lookups by phone or e-mail go through a blind index: a keyed HMAC of the
normalised value, so equality can be searched without decrypting anything and
without a rainbow table working on the column.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from chassis.config import ConfigError

NONCE_BYTES = 12
KEY_BYTES = 32


class DecryptionError(Exception):
    """The data cannot be read: wrong key, wrong owner or field, tampered,
    or the owner's data key was destroyed."""


class UnknownMasterKey(DecryptionError):
    """A data key is wrapped by a master key this key ring does not hold:
    the key was removed from the configuration while data keys still used
    it (see the rotation procedure), not a destroyed data key."""

    def __init__(self, master_key_id: str) -> None:
        super().__init__(f"unknown master key {master_key_id!r}")
        self.master_key_id = master_key_id


@dataclass(frozen=True)
class WrappedKey:
    master_key_id: str
    ciphertext: bytes


def _seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def _open(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    if len(sealed) <= NONCE_BYTES:
        raise DecryptionError("ciphertext too short")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except InvalidTag:
        raise DecryptionError("authentication failed") from None


def parse_keys(text: str) -> dict[str, bytes]:
    """``id1:<base64 32 bytes>,id2:<...>`` as operators put it in a secret."""
    keys: dict[str, bytes] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key_id, sep, encoded = part.partition(":")
        if not sep or not key_id:
            raise ValueError("master keys are written id:base64key, separated by commas")
        raw = base64.b64decode(encoded, validate=True)
        if len(raw) != KEY_BYTES:
            raise ValueError(f"master key {key_id} must be {KEY_BYTES} bytes")
        keys[key_id] = raw
    return keys


def development_key(purpose: str) -> bytes:
    """A fixed key for development and tests only; configuration refuses it
    in production."""
    return hashlib.sha256(f"cornucopia-development-{purpose}".encode()).digest()


class KeyRing:
    """Master keys by id; the active one wraps new data keys."""

    def __init__(self, keys: Mapping[str, bytes], active_id: str) -> None:
        if active_id not in keys:
            raise ValueError(f"the active master key {active_id!r} is not among the keys")
        for key_id, key in keys.items():
            if len(key) != KEY_BYTES:
                raise ValueError(f"master key {key_id} must be {KEY_BYTES} bytes")
        self._keys = dict(keys)
        self.active_id = active_id

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def new_data_key(self, owner_id: str) -> tuple[bytes, WrappedKey]:
        data_key = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
        return data_key, self.wrap(data_key, owner_id)

    def wrap(self, data_key: bytes, owner_id: str) -> WrappedKey:
        sealed = _seal(self._keys[self.active_id], data_key, self._aad(self.active_id, owner_id))
        return WrappedKey(self.active_id, sealed)

    def unwrap(self, wrapped: WrappedKey, owner_id: str) -> bytes:
        master = self._keys.get(wrapped.master_key_id)
        if master is None:
            raise UnknownMasterKey(wrapped.master_key_id)
        return _open(master, wrapped.ciphertext, self._aad(wrapped.master_key_id, owner_id))

    def rewrap(self, wrapped: WrappedKey, owner_id: str) -> WrappedKey:
        """Rotation: the same data key under the active master key (field
        ciphertexts stay as they are)."""
        return self.wrap(self.unwrap(wrapped, owner_id), owner_id)

    @staticmethod
    def _aad(key_id: str, owner_id: str) -> bytes:
        return f"data-key/{key_id}/{owner_id}".encode()


class FieldCipher:
    """Seals and opens one owner's fields with their data key."""

    def __init__(self, data_key: bytes, owner_id: str) -> None:
        self._key = data_key
        self.owner_id = owner_id

    def encrypt(self, field: str, value: str) -> bytes:
        return _seal(self._key, value.encode(), self._aad(field))

    def decrypt(self, field: str, sealed: bytes) -> str:
        return _open(self._key, sealed, self._aad(field)).decode()

    def _aad(self, field: str) -> bytes:
        return f"field/{self.owner_id}/{field}".encode()


class BlindIndex:
    """Keyed, deterministic digests of normalised values for equality lookups."""

    def __init__(self, key: bytes) -> None:
        if len(key) < KEY_BYTES:
            raise ValueError(f"the blind index key must be at least {KEY_BYTES} bytes")
        self._key = key

    def digest(self, kind: str, normalised: str) -> str:
        mac = hmac.new(self._key, f"{kind}\x00{normalised}".encode(), hashlib.sha256)
        return mac.hexdigest()


def keys_from_env(
    prefix: str, environ: Mapping[str, str], *, production: bool
) -> tuple[KeyRing, BlindIndex]:
    """The key ring and blind index of a service that keeps personal data.

    ``<PREFIX>_MASTER_KEYS`` (``id:base64,...``), ``<PREFIX>_ACTIVE_KEY_ID``
    (default: the last listed) and ``<PREFIX>_BLIND_INDEX_KEY`` (base64, at
    least 32 bytes). Outside production, fixed development keys stand in; in
    production they are required. A missing or malformed key is a
    ``ConfigError`` naming the variable (never showing its value).
    """
    keys_name, index_name = f"{prefix}_MASTER_KEYS", f"{prefix}_BLIND_INDEX_KEY"
    active_name = f"{prefix}_ACTIVE_KEY_ID"
    keys_text = environ.get(keys_name, "").strip()
    index_text = environ.get(index_name, "").strip()
    if production:
        missing = [
            name for name, text in ((keys_name, keys_text), (index_name, index_text)) if not text
        ]
        if missing:
            raise ConfigError(
                "production mode needs these environment variables: " + ", ".join(missing)
            )
    if keys_text:
        try:
            keys = parse_keys(keys_text)
        except ValueError as exc:
            # binascii.Error is a ValueError too; neither message holds key material.
            raise ConfigError(f"{keys_name}: {exc}") from None
        if not keys:
            raise ConfigError(f"{keys_name} lists no key")
        active = environ.get(active_name, "").strip() or list(keys)[-1]
        if active not in keys:
            raise ConfigError(f"{active_name} {active!r} is not among the keys of {keys_name}")
    else:
        keys, active = {"dev": development_key(f"{prefix}-master")}, "dev"
    try:
        index_key = (
            base64.b64decode(index_text, validate=True)
            if index_text
            else development_key(f"{prefix}-blind-index")
        )
        index = BlindIndex(index_key)
    except ValueError as exc:
        raise ConfigError(f"{index_name}: {exc}") from None
    return KeyRing(keys, active), index
