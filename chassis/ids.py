"""Random identifiers: a letter or two saying what the thing is (``M`` a
member, ``H`` a hold), then random characters of Crockford's base 32:
digits and capitals without I, L, O and U, nothing to misread aloud or on a
receipt."""

from __future__ import annotations

import secrets

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def random_id(prefix: str, length: int) -> str:
    """``prefix`` and ``length`` random characters, 5 bits each, from one
    read of the system's randomness (a draw a character was a system call
    a character). 256 is a multiple of 32, so each byte's low five bits are
    uniform."""
    return prefix + "".join(ALPHABET[byte & 31] for byte in secrets.token_bytes(length))
