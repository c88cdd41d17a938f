"""Files a service writes and the gateway streams on to the caller as they
come (statements, sales exports): the first chunk is awaited before the
response starts, so that an error becomes a problem rather than a truncated
file, and it names the file and its type."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import grpc
from fastapi.responses import StreamingResponse

from services.gateway.deps import READ_PROBLEMS
from services.gateway.problems import ProblemError

XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"

# The responses= of a route answering with a workbook.
WORKBOOK_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {XLSX: {"schema": {"type": "string", "format": "binary"}}},
        "description": "The workbook, as an attachment.",
    },
    **READ_PROBLEMS,
}


class FileChunk(Protocol):
    """A piece of a file as the services stream it: the first one names the
    file and its type."""

    file_name: str
    content_type: str
    data: bytes


C = TypeVar("C", bound=FileChunk)


def attachment(file_name: str) -> str:
    """A Content-Disposition naming the file: an ASCII ``filename`` for
    every client, and the exact name as ``filename*`` (RFC 6266) when it
    is not plain ASCII."""
    plain = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in file_name
    )
    header = f'attachment; filename="{plain}"'
    if plain != file_name:
        header += f"; filename*=UTF-8''{quote(file_name, safe='')}"
    return header


async def stream_file(
    call: grpc.aio.UnaryStreamCall[Any, C],
    failed: Callable[[grpc.aio.AioRpcError], ProblemError],
    default_name: str,
) -> StreamingResponse:
    """The file of a server-streaming ``call``, streamed as the service
    writes it; ``failed`` turns an error before the first chunk into the
    caller's problem, ``default_name`` names a file the service did not."""
    stream = aiter(call)
    try:
        first = await anext(stream, None)
    except grpc.aio.AioRpcError as exc:
        raise failed(exc) from None

    async def body() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield first.data
            async for part in stream:
                yield part.data
        finally:
            call.cancel()  # the client went away mid-file: stop the service's stream

    return StreamingResponse(
        body(),
        media_type=(first.content_type if first is not None else "") or XLSX,
        headers={
            "Content-Disposition": attachment(
                (first.file_name if first is not None else "") or default_name
            )
        },
    )
