"""Log redaction (by key and by shape), the trace id on every line, and the
whole configure_logging pipeline writing JSON with nothing personal in it."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider

from chassis.logs import (
    REDACTED,
    add_trace_context,
    configure_logging,
    redact_personal_data,
    redact_text,
)
from services.members.domain.members import normalise_email


def redact(**event: Any) -> dict[str, Any]:
    return dict(redact_personal_data(None, "info", dict(event)))


# -- by key ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["mobile", "email", "given_name", "family_name", "birthday", "address", "token"]
)
def test_personal_keys_are_redacted_whatever_they_hold(key: str) -> None:
    out = redact(event="enrolled", **{key: "Wang Wei"})
    assert out[key] == REDACTED
    assert out["event"] == "enrolled"


def test_personal_keys_are_redacted_at_any_depth() -> None:
    out = redact(
        event="request",
        request={
            "member": {
                "given_name": "Wei",
                "Mobile": "138 0013 8000",
                "contacts": [{"email": "wei@example.com", "kind": "home"}],
            },
            "store": "S001",
        },
        batch=[{"family_name": "Wang"}, ({"phone": "13800138000"},)],
    )
    member = out["request"]["member"]
    assert member["given_name"] == REDACTED
    assert member["Mobile"] == REDACTED
    assert member["contacts"] == [{"email": REDACTED, "kind": "home"}]
    assert out["request"]["store"] == "S001"
    assert out["batch"] == [{"family_name": REDACTED}, [{"phone": REDACTED}]]
    assert "Wei" not in json.dumps(out)
    assert "13800138000" not in json.dumps(out)


def test_an_empty_personal_field_stays_empty() -> None:
    # Nothing to hide, and "was it given?" stays answerable.
    assert redact(email="", mobile=None) == {"email": "", "mobile": None}


# -- by shape -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sms sent to 13800138000", "sms sent to [phone]"),
        ("call 138 0013 8000 now", "call [phone] now"),
        ("to +86 138-0013-8000.", "to [phone]."),
        ("landline (010) 6552 9988", "landline ([phone]"),
        ("tel:+8613800138000", "tel:[phone]"),
        ("reply from Wei.Wang@Example.COM ok", "reply from [email] ok"),
        ("a@b.co and c.d+tag@mail.example.org", "[email] and [email]"),
    ],
)
def test_phone_numbers_and_emails_in_text_are_masked(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_free_text_values_are_masked_under_any_key() -> None:
    out = redact(event="sms sent to 13800138000", to="13800138000", note=["x@example.com"])
    assert out == {"event": "sms sent to [phone]", "to": "[phone]", "note": ["[email]"]}


@pytest.mark.parametrize(
    "text",
    [
        "member M7Q2K9X4TD enrolled",
        "card C20260001234 issued",
        "card 2F8K1234567Q blocked",
        "order A1234567890 paid",
        "from 10.20.30.40 on 2026-11-22",
        "took 12.5 ms, 3 rows",
        "",
    ],
)
def test_our_ids_dates_and_addresses_are_left_alone(text: str) -> None:
    assert redact_text(text) == text


def test_ids_timestamps_and_durations_under_structural_keys_are_left_alone() -> None:
    event = {
        "event": "rpc",
        "member_id": "M7Q2K9X4TD",
        "event_id": "2b1f1d5e-4c7a-4c44-9d0e-135792468024",
        "outbox_seq": 1234567890,
        "duration_ms": 1234567.5,
        "timestamp": "2026-11-22T14:10:19.123456Z",
        "port": 50051,
    }
    assert redact(**event) == event


def test_an_iso_timestamp_in_a_value_is_left_alone() -> None:
    # "Redaction leaves timestamps and dates alone": a timestamp logged under
    # any key (enrolled_at=..., an exception text quoting ce-time) must stay
    # readable, not turn into "[phone]-22T14:10:19Z".
    for text in ("2026-11-22T14:10:19Z", "2026-11-22T14:10:19.123456+00:00"):
        assert redact(enrolled_at=text)["enrolled_at"] == text


def test_a_phone_number_in_chinese_text_is_masked() -> None:
    # The default locale is zh-CN: a mobile number written between Chinese
    # characters, with no space, is the common case.
    for text in ("短信已发送至13800138000", "会员手机号13800138000已登记", "电话：13800138000。"):
        masked = redact_text(text)
        assert "13800138000" not in masked, masked
        assert "[phone]" in masked


@pytest.mark.parametrize(
    "address", ["josé@example.com", "müller@example.de", "张伟@163.com", "o'brien@example.ie"]
)
def test_every_email_the_member_file_accepts_is_masked(address: str) -> None:
    # members.domain accepts these as valid e-mail addresses, so they reach
    # logs; the redaction must recognise them as well.
    assert normalise_email(address) == address
    masked = redact_text(f"welcome mail sent to {address}")
    assert address not in masked, masked
    local_part = address.split("@", maxsplit=1)[0]
    assert local_part not in masked, masked


ascii_local = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._%+\-]{0,20}", fullmatch=True)
domains = st.from_regex(r"([a-z0-9][a-z0-9\-]{0,10}\.){1,3}[a-z]{2,6}", fullmatch=True)
filler = st.text(alphabet=st.characters(categories=["L", "Zs"]), max_size=20)


@given(local=ascii_local, domain=domains, before=filler, after=filler)
def test_an_ascii_email_never_gets_through(
    local: str, domain: str, before: str, after: str
) -> None:
    address = f"{local}@{domain}"
    masked = redact_text(f"{before} {address} {after}")
    assert address not in masked
    assert "@" + domain not in masked
    # Structured logging: the same address under a harmless key.
    assert address not in json.dumps(redact(event="mail", to=address, extra={"cc": [address]}))


MOBILE_STYLES = {
    "plain": lambda d: d,
    "e164": lambda d: f"+86{d}",
    "international": lambda d: f"+86 {d}",
    "spaced": lambda d: f"{d[:3]} {d[3:7]} {d[7:]}",
    "dashed": lambda d: f"{d[:3]}-{d[3:7]}-{d[7:]}",
    "parenthesised": lambda d: f"(+86) {d[:3]}.{d[3:7]}.{d[7:]}",
}


@given(
    digits=st.from_regex(r"1[3-9][0-9]{9}", fullmatch=True),
    style=st.sampled_from(sorted(MOBILE_STYLES)),
)
def test_a_mobile_number_never_gets_through_in_any_format(digits: str, style: str) -> None:
    written = MOBILE_STYLES[style](digits)
    masked = redact_text(f"sms to {written} sent")
    assert masked.startswith("sms to ")
    assert masked.endswith("[phone] sent")
    assert re.search(r"\d", masked) is None, masked


# -- trace context ------------------------------------------------------------------


def test_the_trace_id_is_added_inside_a_span_and_nothing_outside() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        inside = dict(add_trace_context(None, "info", {"event": "x"}))
        context = span.get_span_context()
    assert re.fullmatch(r"[0-9a-f]{32}", inside["trace_id"])
    assert re.fullmatch(r"[0-9a-f]{16}", inside["span_id"])
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    outside = dict(add_trace_context(None, "info", {"event": "x"}))
    assert outside == {"event": "x"}


# -- the whole pipeline ---------------------------------------------------------------


def test_configured_logging_writes_json_with_trace_id_and_no_personal_data(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_config = structlog.get_config()
    try:
        configure_logging("members", level="INFO", json=True)
        log = structlog.get_logger("tests.logs")
        tracer = TracerProvider().get_tracer("test")
        with tracer.start_as_current_span("enroll") as span:
            log.info(
                "sms sent to 13800138000",
                to="+86 138 0013 8000",
                member={"mobile": "13800138000", "email": "wei@example.com"},
                member_id="M7Q2K9X4TD",
            )
            trace_id = format(span.get_span_context().trace_id, "032x")
        # The standard library (grpc, alembic, nats) goes the same way.
        logging.getLogger("some.library").warning("retrying for wei@example.com / 13800138000")
        logging.getLogger("some.library").debug("below the level: never written")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        structlog.configure(**saved_config)
        structlog.contextvars.unbind_contextvars("service")
    err = capsys.readouterr().err
    assert "13800138000" not in err
    assert "138 0013 8000" not in err
    assert "wei@example.com" not in err
    assert "below the level" not in err
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert len(lines) == 2
    ours, library = lines
    assert ours["event"] == "sms sent to [phone]"
    assert ours["to"] == "[phone]"
    assert ours["member"] == {"mobile": REDACTED, "email": REDACTED}
    assert ours["member_id"] == "M7Q2K9X4TD"
    assert ours["service"] == "members"
    assert ours["level"] == "info"
    assert ours["logger"] == "tests.logs"
    assert ours["trace_id"] == trace_id
    assert "timestamp" in ours
    assert library["event"] == "retrying for [email] / [phone]"
    assert library["level"] == "warning"
    assert "trace_id" not in library
