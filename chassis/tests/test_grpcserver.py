"""The gRPC edge on a real grpc.aio server: the interceptors treat
streaming calls (client, server and bidirectional) as they treat unary ones
(token checked before the handler runs, domain errors raised mid-stream
mapped to their status with details, anything else a bare INTERNAL, one
access log line per call), and the server's connection options (maximum
connection age, keepalive) come from the settings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from chassis import grpcserver
from chassis.auth import Role, Scope, ScopeLevel, current_principal, mint_token
from chassis.config import ConfigError, GrpcConnections, Settings
from chassis.errors import FieldViolation, InvalidArgument, NotFound
from chassis.grpcclient import bearer, open_channel, rich_error
from chassis.grpcserver import GrpcServer, GrpcService, server_options
from chassis.telemetry import configure_tracing

SECRET = "test-secret-of-a-reasonable-length-0123456789"
SERVICE = "test.streams.v1.StreamsService"
DOMAIN = "members.cornucopia"
# What an unexpected exception carries; none of it may reach the caller.
SECRET_TEXT = "KeyError for +8613800138000 in /srv/app/secret_module.py"

UNARY = f"/{SERVICE}/Echo"
SERVER_STREAM = f"/{SERVICE}/Count"
CLIENT_STREAM = f"/{SERVICE}/Upload"
BIDI = f"/{SERVICE}/Chat"
ENDLESS = f"/{SERVICE}/Endless"


def _raise_for(message: bytes) -> None:
    """The handlers' behaviour on a request: ``not-found`` and ``invalid``
    raise domain errors, ``crash`` an unexpected one."""
    if message == b"not-found":
        raise NotFound("no such thing", reason="THING_NOT_FOUND", metadata={"thing_id": "T1"})
    if message == b"invalid":
        raise InvalidArgument([FieldViolation("chunk", "not a valid chunk")])
    if message == b"crash":
        raise RuntimeError(SECRET_TEXT)


class Streams:
    """One handler of each kind over raw bytes; records who ran and when."""

    def __init__(self) -> None:
        self.ran: list[tuple[str, str]] = []  # (handler, principal subject)
        self.closed: list[str] = []  # the principal when an endless stream was closed

    def _saw(self, handler: str) -> None:
        self.ran.append((handler, current_principal().subject))

    async def echo(self, request: bytes, _context: Any) -> bytes:
        self._saw("echo")
        _raise_for(request)
        return request

    async def count(self, request: bytes, _context: Any) -> AsyncIterator[bytes]:
        # Two messages, then what the request asks for.
        self._saw("count")
        for number in range(2):
            yield str(number).encode()
            await asyncio.sleep(0)
        self._saw("count")  # the principal is still current mid-stream
        _raise_for(request)
        yield b"done"

    async def upload(self, requests: AsyncIterator[bytes], _context: Any) -> bytes:
        self._saw("upload")
        received = 0
        async for chunk in requests:
            _raise_for(chunk)
            received += 1
        return str(received).encode()

    async def chat(self, requests: AsyncIterator[bytes], _context: Any) -> AsyncIterator[bytes]:
        self._saw("chat")
        async for message in requests:
            _raise_for(message)
            yield message.upper()

    async def endless(self, _request: bytes, _context: Any) -> AsyncIterator[bytes]:
        self._saw("endless")
        try:
            while True:
                yield b"x" * 1024
                await asyncio.sleep(0.001)
        finally:
            self.closed.append(current_principal().subject)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        def same(message: bytes) -> bytes:
            return message

        codec: dict[str, Any] = {"request_deserializer": same, "response_serializer": same}
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Echo": grpc.unary_unary_rpc_method_handler(self.echo, **codec),
                "Count": grpc.unary_stream_rpc_method_handler(self.count, **codec),
                "Upload": grpc.stream_unary_rpc_method_handler(self.upload, **codec),
                "Chat": grpc.stream_stream_rpc_method_handler(self.chat, **codec),
                "Endless": grpc.unary_stream_rpc_method_handler(self.endless, **codec),
            },
        )


class AccessLog:
    """Stands in for the edge's logger: what it was told, with the
    structlog context bound at the time."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.written = asyncio.Event()

    def _record(self, event: str, **fields: Any) -> None:
        self.lines.append({**structlog.contextvars.get_contextvars(), "event": event, **fields})
        self.written.set()

    info = warning = error = exception = _record

    def calls(self, method: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["event"] == "rpc" and line["rpc"] == method]

    async def wait_for_calls(self, method: str, count: int = 1) -> None:
        """Until ``count`` calls have been logged: the caller may see its
        status a moment before the server has written the line."""
        async with asyncio.timeout(10):
            while len(self.calls(method)) < count:
                self.written.clear()
                await self.written.wait()


class Edge:
    def __init__(self, server: GrpcServer, streams: Streams, log: AccessLog) -> None:
        self.server = server
        self.streams = streams
        self.log = log
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        # When set, request streams send nothing before it is: see
        # test_a_streaming_call_without_a_valid_token_is_refused...
        self.gate: asyncio.Event | None = None

    async def requests(self, *messages: bytes) -> AsyncIterator[bytes]:
        if self.gate is not None:
            await self.gate.wait()
        for message in messages:
            yield message

    def unary(self, method: str) -> Any:
        return self.channel.unary_unary(method)

    def server_stream(self, method: str) -> Any:
        return self.channel.unary_stream(method)

    def client_stream(self, method: str) -> Any:
        return self.channel.stream_unary(method)

    def bidi(self, method: str) -> Any:
        return self.channel.stream_stream(method)


def streams_server(streams: Streams, connections: GrpcConnections | None = None) -> GrpcServer:
    """The chassis's server, interceptors and all, serving ``streams``."""
    return GrpcServer(
        "members",
        "127.0.0.1:0",
        SECRET,
        [
            GrpcService(
                full_name=SERVICE,
                servicer=streams.handler(),
                add_to_server=lambda handler, srv: srv.add_generic_rpc_handlers((handler,)),
            )
        ],
        connections=connections,
    )


@pytest.fixture
async def edge(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Edge]:
    log = AccessLog()
    monkeypatch.setattr(grpcserver, "log", log)
    streams = Streams()
    server = streams_server(streams)
    await server.start()
    await server.set_serving(True)
    connected = Edge(server, streams, log)
    yield connected
    await connected.channel.close()
    await server.stop(grace=0)


def token(subject: str = "staff-1") -> tuple[tuple[str, str]]:
    return bearer(mint_token(SECRET, subject, [Role.HQ_ADMIN], Scope(ScopeLevel.HQ)))


async def failure(call: Any) -> grpc.aio.AioRpcError:
    """The error a call ends with, after whatever messages it streamed."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if hasattr(call, "__aiter__"):
            async for _message in call:
                pass
        else:
            await call
    return caught.value


# Each streaming kind, called with the given metadata and messages that end
# with the given one.
StreamCall = Callable[[Edge, Iterable[tuple[str, str]], bytes], Any]

STREAMING: dict[str, tuple[str, StreamCall]] = {
    "server-streaming": (
        SERVER_STREAM,
        lambda edge, metadata, last: edge.server_stream(SERVER_STREAM)(last, metadata=metadata),
    ),
    "client-streaming": (
        CLIENT_STREAM,
        lambda edge, metadata, last: edge.client_stream(CLIENT_STREAM)(
            edge.requests(b"a", b"b", last), metadata=metadata
        ),
    ),
    "bidirectional": (
        BIDI,
        lambda edge, metadata, last: edge.bidi(BIDI)(
            edge.requests(b"a", b"b", last), metadata=metadata
        ),
    ),
}


KINDS = [pytest.param(method, call, id=name) for name, (method, call) in STREAMING.items()]


# -- authentication ----------------------------------------------------------------


@pytest.mark.parametrize(("method", "call"), KINDS)
@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        pytest.param((), "MISSING_CREDENTIALS", id="no-token"),
        pytest.param((("authorization", "Bearer not-a-token"),), "TOKEN_INVALID", id="bad-token"),
    ],
)
async def test_a_streaming_call_without_a_valid_token_is_refused_before_its_handler_runs(
    edge: Edge,
    method: str,
    call: StreamCall,
    metadata: tuple[tuple[str, str], ...],
    reason: str,
) -> None:
    # The caller's messages wait until the call has ended: the handler could
    # not have read them anyway, and a grpc.aio client whose write fails as
    # the call ends reports INTERNAL instead of the server's status
    # (grpc/grpc#36066).
    edge.gate = asyncio.Event()
    error = rich_error(await failure(call(edge, metadata, b"last")))
    edge.gate.set()
    assert error.code is grpc.StatusCode.UNAUTHENTICATED
    assert (error.reason, error.domain) == (reason, DOMAIN)
    assert edge.streams.ran == []


@pytest.mark.parametrize(("method", "call"), KINDS)
async def test_a_streaming_handler_runs_as_the_token_s_principal(
    edge: Edge, method: str, call: StreamCall
) -> None:
    outcome = call(edge, token("staff-7"), b"last")
    if hasattr(outcome, "__aiter__"):
        assert [message async for message in outcome]
    else:
        assert await outcome == b"3"
    assert edge.streams.ran
    assert {subject for _handler, subject in edge.streams.ran} == {"staff-7"}


async def test_a_public_streaming_method_needs_no_token(edge: Edge) -> None:
    # The health service's Watch sends with context.write rather than by
    # yielding; it is served like any other streaming method.
    health = health_pb2_grpc.HealthStub(edge.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
    first = await anext(aiter(watch))
    watch.cancel()
    assert first.status == health_pb2.HealthCheckResponse.SERVING


# -- errors ------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "call"), KINDS)
async def test_a_domain_error_raised_mid_stream_arrives_with_its_code_and_details(
    edge: Edge, method: str, call: StreamCall
) -> None:
    error = rich_error(await failure(call(edge, token(), b"not-found")))
    assert error.code is grpc.StatusCode.NOT_FOUND
    assert error.message == "no such thing"
    assert (error.reason, error.domain) == ("THING_NOT_FOUND", DOMAIN)
    assert dict(error.metadata) == {"thing_id": "T1"}


async def test_messages_sent_before_a_mid_stream_error_reach_the_caller(edge: Edge) -> None:
    call = edge.bidi(BIDI)(edge.requests(b"a", b"b", b"invalid"), metadata=token())
    received: list[bytes] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for message in call:
            received.append(message)
    assert received == [b"A", b"B"]
    error = rich_error(caught.value)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_FIELDS"
    assert error.violations == (FieldViolation("chunk", "not a valid chunk"),)


@pytest.mark.parametrize(("method", "call"), KINDS)
async def test_an_unexpected_exception_mid_stream_becomes_internal_and_tells_nothing(
    edge: Edge, method: str, call: StreamCall
) -> None:
    raw = await failure(call(edge, token(), b"crash"))
    error = rich_error(raw)
    assert error.code is grpc.StatusCode.INTERNAL
    assert error.message == "internal error"
    assert (error.reason, error.domain) == ("INTERNAL", DOMAIN)
    sent = (raw.details() or "").encode() + repr(raw.trailing_metadata()).encode()
    sent += b"".join(v for _k, v in raw.trailing_metadata() if isinstance(v, bytes))
    for fragment in (b"8613800138000", b"secret_module", b"RuntimeError", b"KeyError"):
        assert fragment not in sent
    # It is logged on the server instead.
    assert [line["rpc"] for line in edge.log.lines if line["event"] == "unhandled error"] == [
        method
    ]


# -- the access log ----------------------------------------------------------------


@pytest.mark.parametrize(("method", "call"), KINDS)
@pytest.mark.parametrize(
    ("signed_in", "last", "code"),
    [
        pytest.param(True, b"last", "OK", id="ok"),
        pytest.param(True, b"not-found", "NOT_FOUND", id="domain-error"),
        pytest.param(True, b"crash", "INTERNAL", id="crash"),
        pytest.param(False, b"last", "UNAUTHENTICATED", id="no-token"),
    ],
)
async def test_a_streaming_call_writes_one_access_log_line_with_its_code_and_duration(
    edge: Edge,
    method: str,
    call: StreamCall,
    signed_in: bool,
    last: bytes,
    code: str,
) -> None:
    if not signed_in:
        edge.gate = asyncio.Event()  # see the test of refused calls above
    outcome = call(edge, token() if signed_in else (), last)
    try:
        if hasattr(outcome, "__aiter__"):
            async for _message in outcome:
                pass
        else:
            await outcome
    except grpc.aio.AioRpcError:
        pass
    if edge.gate is not None:
        edge.gate.set()
    await edge.log.wait_for_calls(method)
    (line,) = edge.log.calls(method)
    assert line["code"] == code
    assert isinstance(line["duration_ms"], float)
    assert line["duration_ms"] >= 0


async def test_a_unary_call_still_writes_its_access_log_line(edge: Edge) -> None:
    assert await edge.unary(UNARY)(b"hello", metadata=token()) == b"hello"
    error = rich_error(await failure(edge.unary(UNARY)(b"not-found", metadata=token())))
    assert error.reason == "THING_NOT_FOUND"
    await edge.log.wait_for_calls(UNARY, 2)
    assert [line["code"] for line in edge.log.calls(UNARY)] == ["OK", "NOT_FOUND"]


async def test_calls_are_traced_and_health_probes_are_not(edge: Edge) -> None:
    """By the server and by a service's channel (``open_channel``) alike."""
    spans = InMemorySpanExporter()
    configure_tracing("tests", extra_processors=(SimpleSpanProcessor(spans),))
    health = health_pb2_grpc.HealthStub(edge.channel)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    assert await edge.unary(UNARY)(b"hello", metadata=token()) == b"hello"
    traced = [(span.name, span.kind) for span in spans.get_finished_spans()]
    assert traced == [(UNARY, SpanKind.SERVER)]
    spans.clear()
    service_channel = open_channel(f"127.0.0.1:{edge.server.port}")
    try:
        probe = health_pb2_grpc.HealthStub(service_channel)
        await probe.Check(health_pb2.HealthCheckRequest())
        assert await service_channel.unary_unary(UNARY)(b"hello", metadata=token()) == b"hello"
    finally:
        await service_channel.close()
    traced = sorted((span.name, span.kind.name) for span in spans.get_finished_spans())
    assert traced == [(UNARY, "CLIENT"), (UNARY, "SERVER")]


async def test_a_stream_the_caller_abandons_is_closed_as_that_principal_and_logged(
    edge: Edge,
) -> None:
    call = edge.server_stream(ENDLESS)(b"", metadata=token("staff-9"))
    received = 0
    async for _message in call:
        received += 1
        if received == 3:
            break
    call.cancel()
    await edge.log.wait_for_calls(ENDLESS)
    (line,) = edge.log.calls(ENDLESS)
    assert line["code"] == "CANCELLED"
    assert edge.streams.closed == ["staff-9"]


# -- connection options ------------------------------------------------------------


def test_connections_default_to_a_five_minute_age_for_kubernetes() -> None:
    connections = Settings.from_env("members", {}).grpc_connections
    assert connections == GrpcConnections(
        max_age_seconds=300,
        # Long enough for the longest call, a member file import or export.
        max_age_grace_seconds=600,
        keepalive_time_seconds=60,
        keepalive_timeout_seconds=20,
    )
    options = dict(server_options(connections))
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert options["grpc.max_connection_age_grace_ms"] == 600_000
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.keepalive_timeout_ms"] == 20_000
    # Callers' own pings (every 30 s) stay welcome.
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.min_ping_interval_without_data_ms"] <= 30_000


def test_connections_are_set_from_the_environment() -> None:
    env = {
        "GRPC_MAX_CONNECTION_AGE_SECONDS": "120",
        "GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS": "600",
        "GRPC_KEEPALIVE_TIME_SECONDS": "45.5",
        "GRPC_KEEPALIVE_TIMEOUT_SECONDS": "5",
    }
    options = dict(server_options(Settings.from_env("members", env).grpc_connections))
    assert options["grpc.max_connection_age_ms"] == 120_000
    assert options["grpc.max_connection_age_grace_ms"] == 600_000
    assert options["grpc.keepalive_time_ms"] == 45_500
    assert options["grpc.keepalive_timeout_ms"] == 5_000


def test_a_maximum_age_of_zero_means_none() -> None:
    env = {"GRPC_MAX_CONNECTION_AGE_SECONDS": "0"}
    options = dict(server_options(Settings.from_env("members", env).grpc_connections))
    assert "grpc.max_connection_age_ms" not in options
    assert "grpc.max_connection_age_grace_ms" not in options


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GRPC_MAX_CONNECTION_AGE_SECONDS", "five minutes"),
        ("GRPC_MAX_CONNECTION_AGE_SECONDS", "-1"),
        ("GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS", "inf"),
        ("GRPC_KEEPALIVE_TIME_SECONDS", "0"),
        ("GRPC_KEEPALIVE_TIMEOUT_SECONDS", "nan"),
    ],
)
def test_a_connection_duration_that_is_not_a_number_of_seconds_is_refused(
    name: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env("members", {name: value})


async def test_the_server_sends_callers_away_when_their_connection_is_old(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A connection that reaches its maximum age is closed; the caller's
    # channel reconnects by itself and its calls keep working.
    monkeypatch.setattr(grpcserver, "log", AccessLog())
    server = streams_server(
        Streams(), GrpcConnections(max_age_seconds=0.3, max_age_grace_seconds=0.1)
    )
    await server.start()
    states: list[grpc.ChannelConnectivity] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            echo = channel.unary_unary(UNARY)
            assert await echo(b"one", metadata=token()) == b"one"
            async with asyncio.timeout(10):
                state = channel.get_state()
                while state is grpc.ChannelConnectivity.READY:
                    await channel.wait_for_state_change(state)
                    state = channel.get_state()
                states.append(state)
            assert await echo(b"two", metadata=token()) == b"two"
    finally:
        await server.stop(grace=0)
    assert states
    assert states[0] is not grpc.ChannelConnectivity.READY
