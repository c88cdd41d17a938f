"""structlog JSON logs with the trace id on every line and personal data
redacted before anything is written.

Redaction works two ways: by key (a field called ``mobile``, ``email``,
``given_name``... is replaced whatever it holds) and by shape (anything in a
string that looks like an e-mail address or a phone number is masked), so a
careless ``log.info("sent", to=member.mobile)`` or an exception text that
quotes a request still writes nothing personal.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog
from opentelemetry import trace

PERSONAL_KEYS = frozenset(
    {
        "name",
        "given_name",
        "family_name",
        "full_name",
        "display_name",
        "mobile",
        "phone",
        "phone_number",
        "landline",
        "email",
        "e_mail",
        "address",
        "street",
        "postcode",
        "birthday",
        "password",
        "pin",
        "token",
        "authorization",
    }
)
REDACTED = "[redacted]"
# Fields the pipeline itself writes, and our own identifiers: never personal,
# and their digits must not be mistaken for phone numbers.
STRUCTURAL_KEYS = frozenset(
    {"timestamp", "level", "logger", "trace_id", "span_id", "service", "rpc", "code"}
)


def _structural(key: str) -> bool:
    return key in STRUCTURAL_KEYS or key.endswith(("_id", "_ms", "port", "_seq"))


# An e-mail address as members.domain accepts it: any local part (josé@,
# 张伟@, o'brien@) and a dotted domain. Over-masking the text around an address
# is the safe failure.
_EMAIL = re.compile(r"""[^\s@<>()\[\]{},;:"]+@[\w\-]+(?:\.[\w\-]+)*\.[^\W\d_]{2,}""")
# Seven or more digits, optionally with a leading + and separators: phone
# numbers in any of the formats stores type them. Member and card ids are
# letters and digits mixed, so they are left alone. The boundaries are ASCII
# on purpose: in Chinese text a number sits right next to the characters.
# ISO dates and times and IPv4 addresses are tried first and kept as they are.
_PHONE_OR_KEPT = re.compile(
    r"(?P<kept>(?<!\d)\d{4}-\d{2}-\d{2}"
    r"(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+\-]\d{2}:?\d{2})?)?(?![\d\-])"
    r"|(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.]))"
    r"|(?<![A-Za-z0-9_])\+?\d(?:[\d\s\-().]{5,}\d)(?![A-Za-z0-9_])"
)


def _mask_phone(match: re.Match[str]) -> str:
    return match.group(0) if match.group("kept") else "[phone]"


def redact_text(text: str) -> str:
    text = _EMAIL.sub("[email]", text)
    return _PHONE_OR_KEPT.sub(_mask_phone, text)


def _redact_value(key: str, value: Any) -> Any:
    if key.lower() in PERSONAL_KEYS and value not in (None, ""):
        return REDACTED
    if _structural(key):
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(key, v) for v in value]
    return value


def redact_personal_data(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        event_dict[key] = _redact_value(key, event_dict[key])
    return event_dict


def add_trace_context(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict["trace_id"] = format(ctx.trace_id, "032x")
        event_dict["span_id"] = format(ctx.span_id, "016x")
    return event_dict


_configured = False


def configure_logging(service: str, level: str = "INFO", json: bool = True) -> None:
    """Route structlog and the standard library (grpc, uvicorn, alembic)
    through one pipeline. Safe to call more than once."""
    global _configured  # noqa: PLW0603 - logging is process-wide by nature
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_context,
        structlog.processors.format_exc_info,
        redact_personal_data,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("nats", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    structlog.contextvars.bind_contextvars(service=service)
    _configured = True


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
