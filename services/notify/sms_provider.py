"""A local SMS provider that behaves like a real one, for development, the
tests and the benchmark:

    python -m services.notify.sms_provider --port 8025 [--fail-first K]
        [--fail-rate R] [--receipts-to URL] [--receipts-secret S] [--api-key K]

``POST /messages`` takes a JSON or form body with ``to``, ``text`` and
``reference`` (notify's defaults, see ``SmsSettings``) and answers
``{"id": "SM..."}``; the same reference again gets the same id (as real
providers deduplicate). A number that is not E.164 is refused with 400 and
a reason. ``--fail-first K`` answers the first K sends with 500 (an
outage that ends), ``--fail-rate R`` a fraction R of them with 500 or 429
(with Retry-After). With ``--receipts-to`` it posts a delivery receipt
for every accepted message to that URL (``{"id", "status", "reason"}``,
header ``X-Receipt-Secret``), retrying until the receiver takes it:
numbers ending in 0000 come back ``failed`` ("absent subscriber").
``--countries`` limits the calling codes served: others are refused (400).

It keeps no personal data beyond its own run, and logs none."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

E164 = re.compile(r"^\+[1-9]\d{6,14}$")
RECEIPT_SECRET_HEADER = "X-Receipt-Secret"  # noqa: S105 - a header name
UNDELIVERABLE_SUFFIX = "0000"


@dataclass
class ProviderState:
    """What the provider was told to do, and what it saw: how many sends it
    accepted, refused and failed, and when each arrived (for rate checks)."""

    fail_first: int = 0
    fail_rate: float = 0.0
    # Down: every send gets 503, until it is set back (an outage that ends).
    down: bool = False
    api_key: str = ""
    receipts_to: str = ""
    receipts_secret: str = ""
    receipt_delay: float = 0.05
    # Country calling codes served ("+86", "+34"); empty: every country.
    countries: tuple[str, ...] = ()
    seed: int | None = None
    requests: int = 0
    accepted: dict[str, str] = field(default_factory=dict)  # reference -> id
    texts: dict[str, str] = field(default_factory=dict)  # id -> text
    destinations: dict[str, str] = field(default_factory=dict)  # id -> number
    refused: int = 0
    failed: int = 0
    arrivals: list[float] = field(default_factory=list)
    taken_at: dict[str, float] = field(default_factory=dict)  # reference -> when
    receipts_sent: int = 0
    # Sends of a reference already accepted (a client sending twice).
    duplicates: int = 0
    _random: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        # Simulated failures, not secrets.
        self._random = random.Random(self.seed)  # noqa: S311


def create_app(state: ProviderState) -> FastAPI:
    receipts: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    async def deliver_receipts() -> None:
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                provider_id, number = await receipts.get()
                await asyncio.sleep(state.receipt_delay)
                failed = number.endswith(UNDELIVERABLE_SUFFIX)
                body = {
                    "id": provider_id,
                    "status": "failed" if failed else "delivered",
                    "reason": "absent subscriber" if failed else "",
                }
                # Real providers retry a receipt the receiver did not take.
                for attempt in range(20):
                    with contextlib.suppress(httpx.HTTPError):
                        answer = await client.post(
                            state.receipts_to,
                            json=body,
                            headers={RECEIPT_SECRET_HEADER: state.receipts_secret},
                        )
                        if answer.status_code < 300:
                            state.receipts_sent += 1
                            break
                    await asyncio.sleep(min(2.0, 0.05 * 2**attempt))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Always running: receipts_to may be set after start (a test serves
        # the receiver later).
        task = asyncio.create_task(deliver_receipts())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = FastAPI(title="Local SMS provider", lifespan=lifespan)

    @app.post("/messages")
    async def send(request: Request) -> JSONResponse:  # noqa: PLR0911 - one answer per behaviour
        state.requests += 1
        state.arrivals.append(time.monotonic())
        if state.api_key and request.headers.get("authorization") != f"Bearer {state.api_key}":
            return JSONResponse({"error": "invalid API key"}, status_code=401)
        if state.down or state.requests <= state.fail_first:
            state.failed += 1
            return JSONResponse({"error": "temporarily unavailable"}, status_code=503)
        if state.fail_rate and state._random.random() < state.fail_rate:
            state.failed += 1
            if state._random.random() < 0.5:
                return JSONResponse(
                    {"error": "throttled"}, status_code=429, headers={"Retry-After": "1"}
                )
            return JSONResponse({"error": "internal error"}, status_code=500)
        fields = await _fields(request)
        to, text, reference = fields.get("to", ""), fields.get("text", ""), fields.get("reference")
        if not E164.match(to):
            state.refused += 1
            return JSONResponse({"error": "invalid destination number"}, status_code=400)
        if state.countries and not to.startswith(state.countries):
            state.refused += 1
            return JSONResponse(
                {"error": "destination country not supported by this account"}, status_code=400
            )
        if not text:
            state.refused += 1
            return JSONResponse({"error": "empty message"}, status_code=400)
        if reference and reference in state.accepted:
            state.duplicates += 1
            return JSONResponse({"id": state.accepted[reference], "duplicate": True})
        provider_id = "SM" + uuid.uuid4().hex[:24]
        state.accepted[reference or provider_id] = provider_id
        state.taken_at[reference or provider_id] = time.monotonic()
        state.texts[provider_id] = text
        state.destinations[provider_id] = to
        if state.receipts_to:
            receipts.put_nowait((provider_id, to))
        return JSONResponse({"id": provider_id})

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {
            "requests": state.requests,
            "accepted": len(state.accepted),
            "refused": state.refused,
            "failed": state.failed,
            "receipts_sent": state.receipts_sent,
        }

    return app


async def _fields(request: Request) -> dict[str, str]:
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = json.loads(await request.body())
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in body.items()} if isinstance(body, dict) else {}
    form = await request.form()
    return {k: str(v) for k, v in form.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--fail-first", type=int, default=0)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--receipts-to", default="")
    parser.add_argument("--receipts-secret", default="")
    parser.add_argument("--api-key", default="")
    parser.add_argument(
        "--countries", default="", help="calling codes served, e.g. +86,+34; default: all"
    )
    args = parser.parse_args(argv)
    state = ProviderState(
        fail_first=args.fail_first,
        fail_rate=args.fail_rate,
        api_key=args.api_key,
        receipts_to=args.receipts_to,
        receipts_secret=args.receipts_secret,
        countries=tuple(c.strip() for c in args.countries.split(",") if c.strip()),
    )
    # The socket is bound here so that the port (any free one with 0) is
    # known before serving starts.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    print(f"SMS provider listening on http://{args.host}:{port}/messages", flush=True)
    config = uvicorn.Config(create_app(state), log_level="warning", access_log=False)
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


if __name__ == "__main__":
    main()
