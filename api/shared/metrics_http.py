"""GET /metrics on the API port, and TGI's `--prometheus-port`: a second listener serving the same text.

The second listener is a minimal asyncio HTTP/1.1 server on the app's event loop: it answers any
GET with the metrics and closes the connection, which is all a Prometheus scraper needs, and it
stays out of uvicorn's signal handling. It binds `--hostname`. A port already taken, or 0, only
means no second listener: the metrics stay on the API port, and a warning says so.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from tgserve.api.shared.metrics import CONTENT_TYPE
from tgserve.api.shared.state import ServerState, get_state

logger = logging.getLogger(__name__)
router = APIRouter(tags=["Text Generation Inference"])
READ_TIMEOUT_S = 10.0  # a scraper that sends no complete request head in this time is dropped
MAX_HEAD_LINES = 100  # request line + headers read before answering


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(state: ServerState = Depends(get_state)) -> Response:
    """Prometheus metrics in the text exposition format, with TGI's names."""
    # Rendering takes milliseconds (1024 tgi_batch_next_size buckets): keep it off the event loop.
    return Response(await asyncio.to_thread(state.metrics.render), media_type=CONTENT_TYPE)


async def start_metrics_listener(host: str, port: int, render: Callable[[], bytes]) -> asyncio.Server | None:
    """Serve `render()` on host:port; None (with a log line) when port is 0 or cannot be bound."""
    if port == 0:
        logger.info("--prometheus-port is 0: metrics are served on the API port only")
        return None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _answer(reader, writer, render)
        except (OSError, asyncio.TimeoutError, ValueError):
            pass  # the scraper went away or sent garbage: nothing to answer
        finally:
            writer.close()

    try:
        server = await asyncio.start_server(handle, host, port)
    except OSError as error:
        logger.warning("Cannot serve metrics on port %d (%s); they stay available at /metrics on the API port",
                       port, error.strerror or error)
        return None
    logger.info("Serving Prometheus metrics on %s:%d", host, port)
    return server


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, render: Callable[[], bytes]) -> None:
    request_line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
    for _ in range(MAX_HEAD_LINES):  # skip the headers; a GET has no body
        if await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S) in (b"\r\n", b"\n", b""):
            break
    method = request_line.split(b" ", 1)[0]
    if method in (b"GET", b"HEAD"):
        status, content_type, body = "200 OK", CONTENT_TYPE, await asyncio.to_thread(render)
    else:
        status, content_type, body = "405 Method Not Allowed", "text/plain", b"Method Not Allowed\n"
    head = (f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    writer.write(head if method == b"HEAD" else head + body)
    await writer.drain()
