"""Opt-outs: what a member's reply or click means, and the signed links
that let a member unsubscribe without logging in. Pure: no I/O.

An unsubscribe link names the member and the channel, signed with a key of
notify's own (HMAC-SHA256): anyone holding the link may unsubscribe that
member from that channel, nothing else; a forged or altered link is refused.
Links do not expire: a message read months later must still let its reader
out."""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from services.notify.domain.messages import Channel

TOKEN_VERSION = 1
_MAC_BYTES = 16
_MEMBER_ID = re.compile(r"^[A-Z0-9]{4,16}$")
# Punctuation and spaces a reply may carry around its keyword ("STOP.",
# "【退订】", " td ").
_AROUND = re.compile(r"^[\s\W_]+|[\s\W_]+$")


class Scope(enum.StrEnum):
    # No more marketing on the channel; transactional messages still go.
    MARKETING = "marketing"
    # Nothing at all on the channel (a member who asked the staff for it).
    ALL = "all"


class Source(enum.StrEnum):
    REPLY_KEYWORD = "reply_keyword"
    UNSUBSCRIBE_LINK = "unsubscribe_link"
    STAFF = "staff"


def normalise_reply(text: str) -> str:
    """A reply as compared with the keywords: full-width letters made plain
    (NFKC), surrounding spaces and punctuation dropped, upper case."""
    plain = unicodedata.normalize("NFKC", text)
    return _AROUND.sub("", plain).upper()


def is_optout_reply(text: str, keywords: Iterable[str]) -> bool:
    """True when the whole reply is one of the keywords (a reply that merely
    contains "stop" in a sentence is not an opt-out)."""
    reply = normalise_reply(text)
    return bool(reply) and reply in {normalise_reply(k) for k in keywords}


@dataclass(frozen=True)
class LinkClaim:
    member_id: str
    channel: Channel


class BadLink(ValueError):
    """A token this service did not sign, or one altered since."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: str) -> bytes:
    return hmac.new(key, f"unsubscribe\x00{payload}".encode(), hashlib.sha256).digest()[:_MAC_BYTES]


def sign_link(key: bytes, member_id: str, channel: Channel) -> str:
    payload = _b64(
        json.dumps(
            {"v": TOKEN_VERSION, "m": member_id, "c": channel.value}, separators=(",", ":")
        ).encode()
    )
    return f"{payload}.{_b64(_mac(key, payload))}"


def verify_link(key: bytes, token: str) -> LinkClaim:
    payload, dot, mac = token.strip().partition(".")
    if not dot or not payload or not mac or len(token) > 300:
        raise BadLink("not an unsubscribe link")
    try:
        given = _unb64(mac)
        expected = _mac(key, payload)
        if not hmac.compare_digest(given, expected):
            raise BadLink("not an unsubscribe link")
        claim = json.loads(_unb64(payload))
        member_id, channel = str(claim["m"]), Channel(claim["c"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise BadLink("not an unsubscribe link") from None
    if claim.get("v") != TOKEN_VERSION or not _MEMBER_ID.match(member_id):
        raise BadLink("not an unsubscribe link")
    return LinkClaim(member_id, channel)


def unsubscribe_url(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/v1/unsubscribe/{token}"
