"""A minimal ASGI driver: one HTTP request, as a server would send it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from asgi_dbset.types import ASGIApp, Message


@dataclass
class Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return json.loads(self.body)


def http_scope(path: str, query: str = "") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 12345),
        "server": ("testserver", 80),
        "state": {},
    }


async def request(
    app: ASGIApp,
    path: str,
    query: str = "",
    *,
    on_chunk: Callable[[bytes], None] | None = None,
    disconnect_after: float | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> Response:
    """Send one GET (with *headers* besides ``host``); the client disconnects
    when the response is complete, or after ``disconnect_after`` seconds."""
    response = Response()
    done = asyncio.Event()
    sent_request = False

    async def receive() -> Message:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if disconnect_after is None:
            await done.wait()
        else:
            try:
                await asyncio.wait_for(done.wait(), disconnect_after)
            except TimeoutError:
                pass
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            response.status = message["status"]
            response.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            if body:
                response.chunks.append(body)
                if on_chunk is not None:
                    on_chunk(body)
            if not message.get("more_body", False):
                done.set()

    scope = http_scope(path, query)
    scope["headers"] += headers or []
    await app(scope, receive, send)
    return response
