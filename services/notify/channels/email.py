"""E-mail over SMTP (aiosmtplib): STARTTLS, or implicit TLS, and
authentication when configured; UTF-8 text bodies with the message's
subject, and our message id in the Message-ID so that a resend after a
crash can be recognised.

The server's answers: a 5xx reply to the recipient or the data refuses
the message for good (no such mailbox); 4xx replies, authentication
failures (a configuration an operator fixes) and connection errors are
retried."""

from __future__ import annotations

import re
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import aiosmtplib

from chassis.logs import redact_text
from services.notify.channels import ChannelError, Needs, PermanentChannelError, Sent
from services.notify.channels.config import SmtpSettings
from services.notify.store import MessageRecord

PROVIDER = "email"
ENHANCED_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}\s*")
DEFAULT_SUBJECTS = {
    "zh-CN": "会员通知",
    "en": "A message from your club",
    "es": "Un aviso de su club",
}


def tls_context(settings: SmtpSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def compose(message: MessageRecord, sender: str, to: str) -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = to
    mail["Subject"] = message.subject or DEFAULT_SUBJECTS.get(
        message.locale, DEFAULT_SUBJECTS["en"]
    )
    mail["Date"] = formatdate(localtime=False)
    domain = sender.rpartition("@")[2].strip("> ") or "cornucopia.invalid"
    mail["Message-ID"] = make_msgid(idstring=message.message_id, domain=domain)
    mail["X-Cornucopia-Message-Id"] = message.message_id
    mail.set_content(message.body, charset="utf-8")
    return mail


def server_says(code: int, text: str) -> str:
    """``SMTP 550: mailbox unavailable``: the reply without its enhanced
    status code (5.1.1, which reads like a number to the log redaction)
    and without any address it quotes."""
    return f"SMTP {code}: {redact_text(ENHANCED_STATUS.sub('', text.strip()))}"[:300]


class EmailChannel:
    needs = Needs.EMAIL

    def __init__(self, settings: SmtpSettings) -> None:
        self.settings = settings
        self._tls = tls_context(settings)

    async def send(self, message: MessageRecord, address: str) -> Sent:
        s = self.settings
        mail = compose(message, s.sender, address)
        try:
            await aiosmtplib.send(
                mail,
                hostname=s.host,
                port=s.port,
                username=s.username or None,
                password=s.password or None,
                start_tls=s.starttls and not s.use_tls,
                use_tls=s.use_tls,
                tls_context=self._tls,
                timeout=s.timeout_seconds,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            if codes and all(500 <= c < 600 for c in codes):
                raise PermanentChannelError(
                    "the mail server refused the recipient: "
                    + "; ".join(server_says(r.code, r.message) for r in exc.recipients)[:300]
                ) from None
            raise ChannelError(f"the mail server deferred the recipient ({codes})") from None
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise ChannelError(f"the mail server refused our login ({exc.code})") from None
        except aiosmtplib.SMTPResponseException as exc:
            if 500 <= exc.code < 600 and not isinstance(exc, aiosmtplib.SMTPHeloError):
                raise PermanentChannelError(
                    "the mail server refused the message: " + server_says(exc.code, exc.message)
                ) from None
            raise ChannelError(f"the mail server failed ({exc.code})") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise ChannelError(
                f"the mail server cannot be reached ({type(exc).__name__})"
            ) from None
        return Sent(PROVIDER, str(mail["Message-ID"]).strip("<>"))
