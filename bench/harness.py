"""Closed-loop load: N workers call as fast as answers come back for a fixed
time; latencies in milliseconds."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url


@dataclass
class Result:
    name: str
    calls: int
    seconds: float
    latencies_ms: list[float]
    errors: int

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def line(self) -> str:
        return (
            f"{self.name:<34} {self.rate:>9.1f}/s  p50 {self.pct(0.5):7.2f} ms  "
            f"p99 {self.pct(0.99):7.2f} ms  "
            f"mean {statistics.fmean(self.latencies_ms or [0]):7.2f} ms"
            f"  errors {self.errors}"
        )


async def drive(
    name: str,
    call: Callable[[int], Awaitable[None]],
    *,
    concurrency: int,
    seconds: float,
    max_calls: int = 1_000_000,
) -> Result:
    latencies: list[float] = []
    errors = 0
    counter = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal counter, errors
        while time.perf_counter() < deadline and counter < max_calls:
            counter += 1
            n = counter
            started = time.perf_counter()
            try:
                await call(n)
            except Exception:
                errors += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Result(name, len(latencies), time.perf_counter() - started, latencies, errors)


async def drive_at_rate(
    name: str,
    call: Callable[[int], Awaitable[None]],
    *,
    rate: float,
    seconds: float,
    drain_seconds: float = 30.0,
) -> Result:
    """Open-loop load: a call starts every 1/``rate`` s whether or not the
    earlier ones have answered, as tills do. Each latency runs from when its
    call was due, not from when it started, so a driver or a suite that
    falls behind shows as latency (no coordinated omission). ``seconds`` of
    arrivals, then up to ``drain_seconds`` for the last answers; calls
    still unanswered then count as errors. The rate printed is the answers
    over the arrivals' span and the wait for the last of them."""
    latencies: list[float] = []
    errors = 0
    interval = 1.0 / rate
    count = max(1, round(rate * seconds))
    began = time.perf_counter()

    async def one(n: int, due: float) -> None:
        nonlocal errors
        try:
            await call(n)
        except Exception:
            errors += 1
            return
        latencies.append((time.perf_counter() - due) * 1000)

    tasks: list[asyncio.Task[None]] = []
    for n in range(count):
        due = began + n * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n, due)))
    _done, pending = await asyncio.wait(tasks, timeout=drain_seconds)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    errors += len(pending)
    return Result(name, len(latencies), time.perf_counter() - began, latencies, errors)


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(
        [sys.executable, *args], env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT
    )


def stop_processes(processes: Iterable[subprocess.Popen[bytes]], wait: float = 15.0) -> None:
    """Ask each process to stop, then kill any still there after ``wait`` s."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            process.kill()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # utime and stime, in clock ticks
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ThrowawayDatabases:
    """PostgreSQL databases a benchmark creates on the server of an admin
    URL and drops when it ends, whatever happened."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.created: list[str] = []

    async def create(self) -> str:
        """A new, empty database; returns its plain ``postgresql://`` URL."""
        import asyncpg  # noqa: PLC0415 - only the PostgreSQL runs need it

        name = f"cornucopia_bench_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(self.admin_url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        self.created.append(name)
        # The admin URL with the new name (a socket directory given as
        # ``?host=`` is kept).
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    async def drop_all(self) -> None:
        if not self.created:
            return
        import asyncpg  # noqa: PLC0415

        admin = await asyncpg.connect(self.admin_url)
        try:
            for name in self.created:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
        self.created.clear()


async def warm_then_many_and_one(
    name: str, call: Callable[[int], Awaitable[None]], concurrency: int, seconds: float
) -> list[Result]:
    """What each baseline does: a second's warm-up, then ``call`` with
    ``concurrency`` callers and with one. Returns [many callers, one caller]."""
    await drive("warm-up", call, concurrency=concurrency, seconds=1)
    return [
        await drive(
            f"{name}, {concurrency} callers", call, concurrency=concurrency, seconds=seconds
        ),
        await drive(f"{name}, 1 caller", call, concurrency=1, seconds=seconds),
    ]


async def bare_grpc(address: str, concurrency: int, seconds: float) -> list[Result]:
    """The baseline of every service call: a bare grpc.aio health check
    against ``bench.baseline_server``, with ``concurrency`` callers and
    then one. Returns [many callers, one caller]."""
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def check(_n: int) -> None:
            await health.Check(health_pb2.HealthCheckRequest())

        return await warm_then_many_and_one("bare grpc.aio call", check, concurrency, seconds)


# --- /proc: CPU time ----------------------------------------------------------------


def pids_matching(*needles: str) -> list[int]:
    """Processes whose command line (or ps title) contains every needle."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        cmdline = cmdline_of(int(entry.name))
        if all(needle in cmdline for needle in needles):
            found.append(int(entry.name))
    return found


def cmdline_of(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(values[:8])
    idle = values[3] + values[4]
    ticks = os.sysconf("SC_CLK_TCK")
    return (total - idle) / ticks, total / ticks


class CpuMeter:
    """CPU seconds of named processes (several pids may share a name: the
    PostgreSQL backends of a service's database) between two readings."""

    def __init__(self, processes: Callable[[], dict[str, list[int]]]) -> None:
        self.processes = processes
        self.before: dict[str, dict[int, float]] = {}
        self.machine: tuple[float, float] = (0.0, 0.0)
        self.driver = 0.0

    def _read(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for name, pids in self.processes().items():
            for pid in pids:
                used = cpu_seconds(pid)
                if used is not None:
                    out.setdefault(name, {})[pid] = used
        return out

    def start(self) -> None:
        self.before = self._read()
        self.machine = machine_busy()
        self.driver = time.process_time()

    def stop(self) -> dict[str, float]:
        after = self._read()
        used = {
            name: sum(t - self.before.get(name, {}).get(pid, 0.0) for pid, t in pids.items())
            for name, pids in after.items()
        }
        busy, total = machine_busy()
        used["(load driver)"] = time.process_time() - self.driver
        used["(machine, all processes)"] = busy - self.machine[0]
        used["(machine, available)"] = total - self.machine[1]
        return used
