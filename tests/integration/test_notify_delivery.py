"""Delivery end to end, on real parts: the members service (addresses at
send time), the campaigns service (call tasks), the notify service with
its dispatcher configured by environment, the gateway serving the SMS
provider's receipt callback, the local SMS provider
(``services.notify.sms_provider``), a real SMTP server (aiosmtpd, with
STARTTLS and AUTH) and a webhook receiver that checks the push signature.

Messages are queued as the planner queues them (``store.queue_message``
in the notify database); the running service's dispatcher takes it from
there."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import email
import email.policy
import io
import json
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import openpyxl
import pytest
import sqlalchemy as sa
import uvicorn
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chassis.auth import Role
from chassis.config import Settings
from chassis.db import Database, outbox_table, utcnow
from chassis.mtls import create_ca, issue_server_certificate
from chassis.service import ServiceRuntime
from chassis.telemetry import current_traceparent
from cornucopia.campaigns.v1 import followups_pb2, followups_pb2_grpc
from cornucopia.common.v1 import date_pb2
from cornucopia.members.v1 import members_pb2 as M
from cornucopia.members.v1 import members_pb2_grpc
from services.campaigns.domain import followups as campaigns_domain
from services.gateway.server import create_app
from services.members.server import definition as members_definition
from services.notify import store
from services.notify.channels import push
from services.notify.domain import Category, Channel, MessageStatus
from services.notify.peers import shared_peers
from services.notify.server import definition as notify_definition
from services.notify.sms_provider import ProviderState
from services.notify.sms_provider import create_app as provider_app
from tests.integration.conftest import Suite, auth, eventually, seed_organisation, token
from tests.integration.infra import DatabaseFactory
from tests.integration.test_campaigns_followups import start_campaigns

RECEIPT_SECRET = "receipt-secret-for-tests"
PUSH_SECRET = "push-secret-for-tests"
SMTP_USER, SMTP_PASSWORD = "notify", "smtp-password-for-tests"
HQ_HEADERS = {"authorization": "Bearer " + token()}
FINAL = {MessageStatus.SENT, MessageStatus.DELIVERED, MessageStatus.FAILED}


# -- servers of the outside world ---------------------------------------------------


@asynccontextmanager
async def served(app: FastAPI) -> AsyncIterator[int]:
    """``app`` served over HTTP on a free port of this machine."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and not task.done(), "server did not start"
        await asyncio.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)


@dataclass
class PushReceiver:
    """A messaging webhook that checks the signature and the timestamp, and
    answers 503 to the first ``fail_first`` deliveries."""

    fail_first: int = 0
    calls: int = 0
    taken: list[dict[str, Any]] = field(default_factory=list)
    refused: int = 0

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/hooks/notify")
        async def hook(request: Request) -> JSONResponse:
            self.calls += 1
            body = await request.body()
            stamp = request.headers.get(push.TIMESTAMP_HEADER, "")
            signed = request.headers.get(push.SIGNATURE_HEADER, "")
            if not push.verify(PUSH_SECRET, stamp, body, signed, now=time.time()):
                self.refused += 1
                return JSONResponse({"error": "bad signature"}, status_code=401)
            if self.calls <= self.fail_first:
                return JSONResponse({"error": "busy"}, status_code=503)
            self.taken.append(json.loads(body))
            return JSONResponse({"id": f"PUSH-{len(self.taken)}"}, status_code=202)

        return app


class Mailbox:
    """aiosmtpd's handler: keeps what it is given; a recipient whose local
    part is ``nobody`` does not exist (550)."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []
        self.over_tls: list[bool] = []
        self.logins: list[bytes] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        self.over_tls.append(session.ssl is not None)
        return "250 Message accepted"


def smtp_server(tmp_path: Path, mailbox: Mailbox) -> tuple[Controller, Path]:
    """A real SMTP server on a free port requiring STARTTLS and AUTH, with
    a certificate of a CA made for the test; returns it and the CA file."""
    ca = create_ca(tmp_path / "smtp-ca", "Test mail CA")
    server_cert = issue_server_certificate(ca, tmp_path / "smtp-ca", hosts=("127.0.0.1",))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_cert.cert, server_cert.key)

    def authenticator(
        server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == SMTP_USER.encode()
            and auth_data.password == SMTP_PASSWORD.encode()
        )
        if ok:
            mailbox.logins.append(auth_data.login)
        return AuthResult(success=ok)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,
        auth_required=True,
        auth_require_tls=True,
        authenticator=authenticator,
    )
    controller.start()
    return controller, ca.cert


# -- the suite ------------------------------------------------------------------------


@dataclass
class Rig:
    suite: Suite
    db: Database
    provider: ProviderState
    gateway: httpx.AsyncClient
    members: members_pb2_grpc.MembersServiceStub

    async def enroll(self, mobile: str, *, phone: bool = True, **extra: Any) -> str:
        member = M.Member(
            home_store_id="S001",
            given_name="娜",
            family_name="李",
            mobile=mobile,
            preferred_language="zh-CN",
            birthday=date_pb2.Date(year=1990, month=7, day=15),
            consents=[M.Consent(channel=M.CONTACT_CHANNEL_PHONE, granted=phone)],
            **extra,
        )
        created = await self.members.CreateMember(
            M.CreateMemberRequest(request_id=str(uuid.uuid4()), member=member), metadata=auth()
        )
        return created.member_id

    async def queue(
        self,
        channel: Channel,
        *,
        member_id: str | None = None,
        staff_id: str | None = None,
        template: str = "consumption_alert",
        body: str = "您的储值卡消费 88.00 元，余额 412.00 元。",
        subject: str | None = None,
        category: Category = Category.TRANSACTIONAL,
    ) -> str:
        message_id = str(uuid.uuid4())
        async with self.db.transaction() as session:
            await store.queue_message(
                session,
                message_id=message_id,
                member_id=member_id,
                staff_id=staff_id,
                template=template,
                channel=channel,
                locale="zh-CN",
                body=body,
                subject=subject,
                category=category,
                time_zone="Asia/Shanghai",
                trigger_event_id=str(uuid.uuid4()),
                trace_headers=current_traceparent(),
                created_at=utcnow(),
            )
        return message_id

    async def message(self, message_id: str) -> store.MessageRecord:
        async with self.db.sessions() as session:
            found = await store.get_message(session, message_id)
        assert found is not None
        return found

    async def settled(
        self,
        ids: list[str],
        done: Callable[[store.MessageRecord], bool] = lambda m: m.status in FINAL,
        timeout: float = 30.0,
    ) -> dict[str, store.MessageRecord]:
        """Wait until every message of ``ids`` satisfies ``done``."""
        deadline = time.monotonic() + timeout
        while True:
            found = {i: await self.message(i) for i in ids}
            if all(done(m) for m in found.values()):
                return found
            if time.monotonic() > deadline:
                states = {i: (m.status.value, m.attempts, m.last_error) for i, m in found.items()}
                raise AssertionError(f"messages not settled in {timeout}s: {states}")
            await asyncio.sleep(0.1)


async def start_notify(suite: Suite, url: str) -> ServiceRuntime:
    settings = Settings(
        service="notify",
        environment="test",
        var_dir=suite.var_dir,
        database_url=url,
        nats_url=suite.nats_url,
        grpc_listen="127.0.0.1:0",
        peers={
            "members": f"127.0.0.1:{suite.runtimes['members'].port}",
            "campaigns": f"127.0.0.1:{suite.runtimes['campaigns'].port}",
        },
    )
    runtime = ServiceRuntime(notify_definition, settings)
    await runtime.start()
    await asyncio.wait_for(runtime.ready.wait(), timeout=20)
    suite.runtimes["notify"] = runtime
    suite.channels["notify"] = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}")
    return runtime


@asynccontextmanager
async def rig(
    suite: Suite,
    database_url: DatabaseFactory,
    monkeypatch: pytest.MonkeyPatch,
    provider: ProviderState | None = None,
    **env: str,
) -> AsyncIterator[Rig]:
    """members, campaigns and notify running; the gateway and the local SMS
    provider served over HTTP, the provider's receipts going to the
    gateway; notify's channels configured by ``env`` on top of quick
    retries and the provider."""
    state = provider or ProviderState()
    members = await suite.start(members_definition, await database_url("members"))
    await seed_organisation(suite)
    campaigns = await start_campaigns(suite, await database_url("campaigns"))
    notify_url = await database_url("notify")
    async with served(provider_app(state)) as provider_port:
        monkeypatch.setenv("NOTIFY_RECEIPT_SECRET", RECEIPT_SECRET)
        for name, value in {
            "NOTIFY_SMS_URL": f"http://127.0.0.1:{provider_port}/messages",
            "NOTIFY_RETRY_BASE_SECONDS": "0.05",
            "NOTIFY_RETRY_CAP_SECONDS": "0.2",
            "NOTIFY_MAX_ATTEMPTS": "10",
            **env,
        }.items():
            monkeypatch.setenv(name, value)
        await start_notify(suite, notify_url)
        app = create_app(
            Settings(
                service="gateway",
                environment="test",
                var_dir=suite.var_dir,
                nats_url=suite.nats_url,
                peers={
                    "members": f"127.0.0.1:{members.port}",
                    "campaigns": f"127.0.0.1:{campaigns.port}",
                    "notify": f"127.0.0.1:{suite.runtimes['notify'].port}",
                },
            )
        )
        async with served(app) as gateway_port:
            state.receipts_to = f"http://127.0.0.1:{gateway_port}/v1/notify/providers/sms/receipts"
            state.receipts_secret = RECEIPT_SECRET
            db = Database(notify_url)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway_port}") as http:
                try:
                    yield Rig(
                        suite,
                        db,
                        state,
                        http,
                        members_pb2_grpc.MembersServiceStub(suite.channels["members"]),
                    )
                finally:
                    await db.dispose()
                    await app.state.peers.close()
                    from services.gateway.notify_client import close_notify

                    await close_notify(app)
            # Stop the dispatcher before its outside world goes away.
            await suite.stop("notify")


async def outbox_subjects(db: Database, ids: set[str]) -> set[str]:
    async with db.sessions() as session:
        rows = await session.execute(sa.select(outbox_table.c.subject))
        return {row.subject for row in rows if row.subject.startswith("notify.v1.message.")}


# -- SMS --------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_sms_through_an_outage_receipts_dead_letters_and_a_replay(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The provider serves China only. (Other messages, such as the welcome
    # the planner sends each new member, pass through it too: the checks
    # below are about this test's own messages.)
    provider = ProviderState(countries=("+86",))
    async with rig(suite, database_url, monkeypatch, provider) as r:
        reachable = [await r.enroll(f"+86 138 0013 81{n:02d}") for n in range(5)]
        absent = await r.enroll("+86 139 0013 0000")  # the network cannot find it
        abroad = await r.enroll("+34 612 345 678")  # a country the account does not serve

        # An outage: every message is tried, fails, and waits for its retry.
        provider.down = True
        sends = {m: await r.queue(Channel.SMS, member_id=m) for m in [*reachable, absent]}
        ids = list(sends.values())
        during = await r.settled(ids, lambda m: m.attempts >= 2, timeout=30)
        assert {m.status for m in during.values()} == {MessageStatus.QUEUED}
        provider.down = False
        sends[abroad] = await r.queue(Channel.SMS, member_id=abroad)
        ids.append(sends[abroad])

        # Every reachable message gets through once the provider is back,
        # once each, and the receipts (through the gateway) make them
        # DELIVERED.
        settled = await r.settled(
            ids,
            lambda m: m.status in (MessageStatus.DELIVERED, MessageStatus.FAILED),
        )
        for member in reachable:
            message = settled[sends[member]]
            assert message.status is MessageStatus.DELIVERED
            assert message.delivered_at is not None
            assert message.attempts >= 3  # two failures at least, then taken
            assert provider.accepted[message.message_id] == message.provider_message_id
        assert {sends[m] for m in [*reachable, absent]} <= set(provider.accepted)
        assert sends[abroad] not in provider.accepted
        assert provider.duplicates == 0

        # Refused by the provider: failed at once, with its reason.
        refused = settled[sends[abroad]]
        assert refused.status is MessageStatus.FAILED
        assert refused.attempts == 1
        assert refused.status_reason == "destination country not supported by this account"
        # Delivered nowhere: failed by the receipt, with the network's reason.
        lost = settled[sends[absent]]
        assert (lost.status, lost.status_reason) == (MessageStatus.FAILED, "absent subscriber")

        # Both are dead letters an operator lists...
        listed = await r.gateway.get(
            "/v1/notify/dead-letters",
            params={"channel": "sms", "template": "consumption_alert"},
            headers=HQ_HEADERS,
        )
        assert listed.status_code == 200, listed.text
        dead = {m["message_id"]: m for m in listed.json()["messages"]}
        assert set(dead) == {sends[abroad], sends[absent]}
        assert dead[sends[abroad]]["status"] == "failed"
        # ...and replays once the provider serves Spain too.
        provider.countries = ("+86", "+34")
        key = {"idempotency-key": str(uuid.uuid4())}
        replayed = await r.gateway.post(
            f"/v1/notify/dead-letters/{sends[abroad]}/replay", headers=HQ_HEADERS | key
        )
        assert replayed.status_code == 200, replayed.text
        assert replayed.json()["status"] == "queued"
        assert replayed.json()["attempts"] == 0
        again = await r.gateway.post(
            f"/v1/notify/dead-letters/{sends[abroad]}/replay", headers=HQ_HEADERS | key
        )
        assert again.json() == replayed.json()
        [back] = (
            await r.settled([sends[abroad]], lambda m: m.status is MessageStatus.DELIVERED)
        ).values()
        assert back.status_reason is None
        assert provider.accepted[sends[abroad]] == back.provider_message_id
        # A delivered message is no dead letter to replay.
        refused_again = await r.gateway.post(
            f"/v1/notify/dead-letters/{sends[abroad]}/replay",
            headers=HQ_HEADERS | {"idempotency-key": str(uuid.uuid4())},
        )
        assert refused_again.status_code == 422
        assert refused_again.json()["reason"] == "MESSAGE_NOT_FAILED"

        # The history a store sees, and the events of the whole story.
        history = await r.gateway.get(
            "/v1/notify/messages", params={"member_id": abroad}, headers=HQ_HEADERS
        )
        assert history.status_code == 200, history.text
        mine = [m for m in history.json()["messages"] if m["message_id"] == sends[abroad]]
        assert [m["status"] for m in mine] == ["delivered"]
        assert await outbox_subjects(r.db, set(ids)) >= {
            "notify.v1.message.queued",
            "notify.v1.message.sent",
            "notify.v1.message.delivered",
            "notify.v1.message.failed",
        }


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_receipts_need_the_shared_secret(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(suite, database_url, monkeypatch) as r:
        member = await r.enroll("+86 138 0013 8201")
        [sent] = (await r.settled([await r.queue(Channel.SMS, member_id=member)])).values()
        receipt = {"id": sent.provider_message_id, "status": "failed", "reason": "forged"}
        for secret in ({}, {"x-receipt-secret": "wrong"}):
            answer = await r.gateway.post(
                "/v1/notify/providers/sms/receipts", json=receipt, headers=secret
            )
            assert answer.status_code == 401
            assert answer.json()["reason"] == "INVALID_RECEIPT_SECRET"
        unknown = await r.gateway.post(
            "/v1/notify/providers/sms/receipts",
            json={"id": "SM-nobody-sent-this", "status": "delivered"},
            headers={"x-receipt-secret": RECEIPT_SECRET},
        )
        assert unknown.status_code == 404
        assert unknown.json()["reason"] == "MESSAGE_NOT_FOUND"
        # The provider's own receipt arrives and counts once.
        [done] = (
            await r.settled([sent.message_id], lambda m: m.status is MessageStatus.DELIVERED)
        ).values()
        repeated = await r.gateway.post(
            "/v1/notify/providers/sms/receipts",
            json={"id": sent.provider_message_id, "status": "failed", "reason": "late"},
            headers={"x-receipt-secret": RECEIPT_SECRET},
        )
        assert repeated.status_code == 200
        assert repeated.json()["status"] == "delivered"
        assert (await r.message(done.message_id)).status is MessageStatus.DELIVERED


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_sms_rate_limit_spaces_sends(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(suite, database_url, monkeypatch, NOTIFY_SMS_RATE_PER_SECOND="10") as r:
        member = await r.enroll("+86 138 0013 8301")
        ids = [await r.queue(Channel.SMS, member_id=member) for _ in range(15)]
        await r.settled(ids)
        arrivals = sorted(r.provider.taken_at[i] for i in ids)
        # 15 sends at 10 a second, bursts of one: 1.4 s from the first send
        # to the last. Arrivals are timed at the provider, and the first may
        # come late (a new connection on a busy machine), so the bound has
        # room; without the limit all 15 arrive within a tenth of that.
        assert arrivals[-1] - arrivals[0] >= 1.0


# -- e-mail ---------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_email_through_a_real_smtp_server_with_starttls_and_auth(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mailbox = Mailbox()
    controller, ca_file = smtp_server(tmp_path, mailbox)
    try:
        async with rig(
            suite,
            database_url,
            monkeypatch,
            NOTIFY_SMTP_HOST="127.0.0.1",
            NOTIFY_SMTP_PORT=str(controller.port),
            NOTIFY_SMTP_USERNAME=SMTP_USER,
            NOTIFY_SMTP_PASSWORD=SMTP_PASSWORD,
            NOTIFY_SMTP_FROM="会员中心 <club@shop.example>",
            NOTIFY_SMTP_CA_FILE=str(ca_file),
        ) as r:
            member = await r.enroll("+86 138 0013 8401", email="li.na@example.com")
            nobody = await r.enroll("+86 138 0013 8402", email="nobody@example.com")
            welcome = await r.queue(
                Channel.EMAIL,
                member_id=member,
                template="welcome",
                subject="欢迎加入会员",
                body="李娜您好：欢迎加入会员！您的会员号是 " + member + "。",
            )
            bounced = await r.queue(Channel.EMAIL, member_id=nobody, subject="余额变动")
            settled = await r.settled([welcome, bounced])
    finally:
        controller.stop()

    assert settled[welcome].status is MessageStatus.SENT
    # (The planner's own welcome to a new member may come by e-mail too.)
    mails = {
        mail["X-Cornucopia-Message-Id"]: (envelope, mail)
        for envelope in mailbox.envelopes
        for mail in [
            email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        ]
    }
    envelope, mail = mails[welcome]
    assert set(mailbox.over_tls) == {True}
    assert set(mailbox.logins) == {SMTP_USER.encode()}
    assert envelope.rcpt_tos == ["li.na@example.com"]
    assert mail["Subject"] == "欢迎加入会员"
    assert mail["To"] == "li.na@example.com"
    assert "club@shop.example" in mail["From"]
    assert mail.get_content().strip() == "李娜您好：欢迎加入会员！您的会员号是 " + member + "。"
    assert mail["X-Cornucopia-Message-Id"] == welcome
    assert settled[welcome].provider_message_id == mail["Message-ID"].strip("<>")
    # A mailbox that does not exist: failed at once with the server's answer.
    refused = settled[bounced]
    assert refused.status is MessageStatus.FAILED
    assert refused.attempts == 1
    assert refused.status_reason is not None
    assert refused.status_reason == (
        "the mail server refused the recipient: SMTP 550: mailbox unavailable"
    )
    assert "nobody" not in refused.status_reason


# -- push -----------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_push_webhook_is_signed_and_retried(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = PushReceiver(fail_first=2)
    async with (
        served(receiver.app()) as port,
        rig(
            suite,
            database_url,
            monkeypatch,
            NOTIFY_PUSH_URL=f"http://127.0.0.1:{port}/hooks/notify",
            NOTIFY_PUSH_SECRET=PUSH_SECRET,
        ) as r,
    ):
        to_staff = await r.queue(
            Channel.PUSH,
            staff_id="advisor.one",
            template="followup_task_created",
            body="新的回访任务：会员 M0000000001，今天 16:00 前。",
        )
        [sent] = (await r.settled([to_staff])).values()
    assert sent.status is MessageStatus.SENT
    assert sent.attempts == 3  # two 503s, then taken
    assert receiver.refused == 0
    [taken] = receiver.taken
    assert taken["staff_id"] == "advisor.one"
    assert taken["member_id"] is None
    assert taken["message_id"] == to_staff
    assert sent.provider_message_id == "PUSH-1"
    # What the receiver's check stops: a body changed in transit, an old
    # timestamp.
    body, stamp = b'{"message_id":"x"}', str(int(time.time()))
    signed = push.signature(PUSH_SECRET, stamp, body)
    assert push.verify(PUSH_SECRET, stamp, body, signed, now=time.time())
    assert not push.verify(PUSH_SECRET, stamp, body + b" ", signed, now=time.time())
    assert not push.verify(PUSH_SECRET, stamp, body, signed, now=time.time() + 3600)


# -- post -------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_postal_mailing_list_carries_the_address_read_at_export(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = M.PostalAddress(
        province="上海市",
        city="上海市",
        district="静安区",
        street="南京西路 1601 号",
        postcode="200040",
    )
    async with rig(suite, database_url, monkeypatch) as r:
        member = await r.enroll("+86 138 0013 8501", address=address)
        homeless = await r.enroll("+86 138 0013 8502")
        letter = await r.queue(
            Channel.POST, member_id=member, template="birthday", body="生日快乐！"
        )
        no_address = await r.queue(Channel.POST, member_id=homeless, template="birthday")
        settled = await r.settled([letter, no_address])
        assert settled[letter].status is MessageStatus.SENT
        assert settled[no_address].status is MessageStatus.FAILED
        assert settled[no_address].status_reason == "no postal address on file"

        exported = await r.gateway.get("/v1/notify/mailing-list", headers=HQ_HEADERS)
        assert exported.status_code == 200, exported.text
        assert exported.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(exported.content.decode("utf-8-sig"))))
        assert [(row["Message ID"], row["Member ID"]) for row in rows] == [(letter, member)]
        assert rows[0]["Street"] == "南京西路 1601 号"
        assert rows[0]["Postcode"] == "200040"
        assert rows[0]["Name"] == "李娜"
        assert rows[0]["Letter"] == "生日快乐！"
        export_file = exported.headers["content-disposition"]
        export_id = export_file.split("mailing-list-")[1].split(".csv")[0]

        # Exported rows are not exported again; the export itself can be.
        nothing = await r.gateway.get("/v1/notify/mailing-list", headers=HQ_HEADERS)
        assert list(csv.DictReader(io.StringIO(nothing.content.decode("utf-8-sig")))) == []
        same = await r.gateway.get(
            "/v1/notify/mailing-list", params={"export_id": export_id}, headers=HQ_HEADERS
        )
        assert same.content == exported.content

        # The address as it is at export time, as a workbook.
        await r.members.UpdateMember(
            M.UpdateMemberRequest(
                member=M.Member(
                    member_id=member,
                    address=M.PostalAddress(
                        province="上海市", city="上海市", district="黄浦区", street="南京东路 1 号"
                    ),
                ),
                update_mask={"paths": ["address"]},
            ),
            metadata=auth(),
        )
        second = await r.queue(Channel.POST, member_id=member, template="anniversary")
        await r.settled([second])
        workbook = await r.gateway.get(
            "/v1/notify/mailing-list", params={"format": "xlsx"}, headers=HQ_HEADERS
        )
        assert workbook.status_code == 200, workbook.text
        sheet = openpyxl.load_workbook(io.BytesIO(workbook.content)).active
        assert sheet is not None
        cells = [[c.value for c in line] for line in sheet.iter_rows()]
        assert cells[0][0] == "Message ID"
        assert [line[0] for line in cells[1:]] == [second]
        assert cells[1][6] == "南京东路 1 号"
        assert cells[1][5] == "黄浦区"

        refused = await r.gateway.get(
            "/v1/notify/mailing-list",
            headers={"authorization": "Bearer " + token((Role.STORE_MANAGER,))},
        )
        assert refused.status_code == 403


# -- call tasks ---------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_call_task_lands_on_campaigns_list_inside_a_call_window(
    suite: Suite, database_url: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(suite, database_url, monkeypatch) as r:
        member = await r.enroll("+86 138 0013 8601")
        refusing = await r.enroll("+86 138 0013 8602", phone=False)
        call = await r.queue(
            Channel.CALL_TASK, member_id=member, template="points_expiring", subject="积分即将过期"
        )
        no_call = await r.queue(Channel.CALL_TASK, member_id=refusing, template="points_expiring")
        settled = await r.settled([call, no_call])
        sent = settled[call]
        assert sent.status is MessageStatus.SENT
        # Campaigns records the call as skipped; the message fails with why.
        assert settled[no_call].status is MessageStatus.FAILED
        assert settled[no_call].status_reason == "call skipped: NO_PHONE_CONSENT"
        followups = followups_pb2_grpc.FollowUpServiceStub(r.suite.channels["campaigns"])
        found = await followups.ListFollowUpTasks(
            followups_pb2.ListFollowUpTasksRequest(member_id=member), metadata=auth()
        )
        [task] = found.tasks
        assert task.task_id == sent.provider_message_id
        assert task.plan_kind == followups_pb2.FOLLOW_UP_PLAN_KIND_REQUESTED
        assert task.plan_id == "notify"
        assert task.reason == "notify: 积分即将过期"
        assert task.store_id == "S001"
        due = task.due_time.ToDatetime(dt.UTC)
        assert campaigns_domain.in_window(due, "Asia/Shanghai")
        assert due >= sent.created_at - dt.timedelta(seconds=1)

        # The same message sent again (a crash before the mark, a replay)
        # finds the same task.
        channel_again = followups.CreateFollowUpTask(
            followups_pb2.CreateFollowUpTaskRequest(
                request_id=call, member_id=member, reason="notify: 积分即将过期"
            ),
            metadata=(("authorization", "Bearer " + token((Role.SERVICE,), subject="notify")),),
        )
        assert (await channel_again).task_id == task.task_id
        # Staff may not create such tasks themselves.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await followups.CreateFollowUpTask(
                followups_pb2.CreateFollowUpTaskRequest(
                    request_id="x", member_id=member, reason="call"
                ),
                metadata=auth(),
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


# -- traces -----------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_send_joins_the_trace_of_the_triggering_event(
    suite: Suite,
    database_url: DatabaseFactory,
    monkeypatch: pytest.MonkeyPatch,
    spans: InMemorySpanExporter,
) -> None:
    async with rig(suite, database_url, monkeypatch) as r:
        # The send asks members for the address even if the member's welcome
        # (sent meanwhile) left it in the dispatcher's short cache.
        shared_peers(suite.runtimes["notify"].context).members.contact_ttl = 0.0
        member = await r.enroll("+86 138 0013 8701")
        spans.clear()
        tracer = trace.get_tracer("tests")
        with tracer.start_as_current_span("loyalty.v1.stored_value.debited process") as trigger:
            message_id = await r.queue(Channel.SMS, member_id=member, template="consumption_alert")
        await r.settled([message_id])

        async def sends() -> list[Any]:
            return [
                s for s in spans.get_finished_spans() if s.name == "notify send consumption_alert"
            ]

        [send] = await eventually(sends, bool)
        assert send.context.trace_id == trigger.get_span_context().trace_id
        assert send.parent is not None
        assert send.parent.span_id == trigger.get_span_context().span_id
        assert send.attributes is not None
        assert send.attributes["cornucopia.message_id"] == message_id
        assert send.attributes["cornucopia.outcome"] == "sent"
        # The provider call (httpx) and the members lookup (gRPC) are
        # children of the send, in the same trace.
        children = [
            s
            for s in spans.get_finished_spans()
            if s.parent is not None and s.parent.span_id == send.context.span_id
        ]
        assert any("GetMember" in s.name for s in children)
