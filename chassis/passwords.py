"""Secrets people type (staff passwords, card PINs), stored as salted
scrypt hashes that carry their own parameters."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import secrets

# scrypt cost: about 50 ms and 16 MiB a check on a laptop core, which makes
# offline guessing of a stolen hash expensive while a login stays quick.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_MAXMEM = 64 * 1024 * 1024
# scrypt's cost grows with the input too; a cap keeps a check from being a
# way to burn CPU.
MAX_SECRET_LENGTH = 128
_SALT_BYTES = 16
_HASH_BYTES = 32

# Checked when there is nothing to check against (an unknown login id), so
# that the answer takes as long as for a wrong secret and timing does not
# tell which ids exist.
DUMMY_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def slow_hash(
    secret: str, salt: bytes, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P
) -> bytes:
    """scrypt of ``secret`` under ``salt``: for a caller that needs a
    deterministic stand-in as slow to guess from as the stored hash."""
    return hashlib.scrypt(
        secret[:MAX_SECRET_LENGTH].encode(),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=SCRYPT_MAXMEM,
        dklen=_HASH_BYTES,
    )


def hash_secret(secret: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$n$r$p$salt$hash``: the parameters travel with the hash, so
    they can be raised later without invalidating older hashes."""
    salt = secrets.token_bytes(_SALT_BYTES)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(slow_hash(secret, salt, n=n, r=r, p=p))}"


def secret_matches(secret: str, stored: str) -> bool:
    """Whether ``secret`` is the one ``stored`` was made from; False for a
    malformed or foreign hash, never an exception."""
    try:
        scheme, n, r, p, salt, expected = stored.split("$")
        if scheme != "scrypt":
            return False
        actual = slow_hash(secret, _unb64(salt), n=int(n), r=int(r), p=int(p))
        return hmac.compare_digest(actual, _unb64(expected))
    except ValueError:
        return False


def is_locked(locked_until: dt.datetime | None, now: dt.datetime) -> bool:
    return locked_until is not None and now < locked_until


def after_wrong_try(
    wrong_tries: int,
    locked_until: dt.datetime | None,
    now: dt.datetime,
    *,
    max_tries: int,
    lock: dt.timedelta,
) -> tuple[int, dt.datetime | None]:
    """The count and lock after one more wrong secret: the ``max_tries``-th
    in a row locks for ``lock``; a lock that has run out starts the count
    afresh."""
    if locked_until is not None and now >= locked_until:
        wrong_tries, locked_until = 0, None
    wrong_tries += 1
    if wrong_tries >= max_tries:
        return 0, now + lock
    return wrong_tries, locked_until
