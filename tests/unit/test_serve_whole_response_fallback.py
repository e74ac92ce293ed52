"""Where there is no TCP socket under `send` (another ASGI server, a test client), the whole-response
middleware passes every message through unchanged and says once that it is inactive."""

from __future__ import annotations

import asyncio
import logging

from ehrfm.serve import whole_response
from ehrfm.serve.whole_response import WholeResponseMiddleware, connection_socket


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_without_a_socket_messages_pass_through_and_it_says_so_once(monkeypatch):
    monkeypatch.setattr(whole_response, "_reported", False)
    messages = [
        {"type": "http.response.start", "status": 200, "headers": []},
        {"type": "http.response.body", "body": b"a", "more_body": True},
        {"type": "http.response.body", "body": b"b"},
    ]

    async def app(scope, receive, send):
        for message in messages:
            await send(message)

    sent: list[dict] = []

    async def plain_send(message):  # a function, not uvicorn's response cycle: no transport behind it
        sent.append(message)

    assert connection_socket(plain_send) is None
    middleware = WholeResponseMiddleware(app)
    records = _Records()  # on Serve's logger itself: Ray may stop it propagating to the root
    serve_logger = logging.getLogger("ray.serve")
    serve_logger.addHandler(records)
    try:
        for _ in range(2):
            asyncio.run(middleware({"type": "http"}, None, plain_send))
    finally:
        serve_logger.removeHandler(records)
    assert sent == messages * 2
    inactive = [r for r in records.records if "whole-response middleware inactive" in r.getMessage()]
    assert len(inactive) == 1 and inactive[0].levelno == logging.WARNING


def test_other_scopes_are_not_touched():
    seen: list[str] = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    asyncio.run(WholeResponseMiddleware(app)({"type": "websocket"}, None, None))
    asyncio.run(WholeResponseMiddleware(app)({"type": "lifespan"}, None, None))
    assert seen == ["websocket", "lifespan"]
