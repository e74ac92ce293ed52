"""Each HTTP response leaves a scoring replica whole or not at all, so a replica killed mid-response is replayed.

Behind HAProxy (serve/ingress.py) a request whose replica dies before any byte of its response is
replayed on another replica. A replica that dies after writing the response headers and before the
body cannot be helped that way: HAProxy has passed the headers on, and the client gets a 200 with no
body. uvicorn writes the headers and the body in two socket writes, handed over from the user code's
thread one at a time, so under load a kill can land between them (measured: about 1 response in
20-50 kills, docs/OPERATIONS.md "Failures").

This middleware closes that window in the kernel. When the response starts it corks the connection
(TCP_CORK: the kernel holds partial segments instead of sending them) and sets SO_LINGER to zero (a
process that dies closes the connection with a reset, which discards what the kernel still holds);
after the last body part it restores the linger setting and uncorks, which sends headers and body
together. A replica killed in between therefore sends a reset and no byte of the response, and
HAProxy replays the request (`empty-response`). Killed after, it has handed the whole response to
the kernel, which delivers it. The window covers a response up to one TCP segment (64 KiB on
loopback, 1,448 bytes or the link's MSS between machines): a scoring response (about 500 bytes) fits,
a large `:batch` response between machines may not.

Serve applies it to the HTTP servers of the ingress replicas through its documented hook,
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH (`middlewares` below), which ingress.py sets for the HAProxy
ingress. It needs the connection's socket, which ASGI does not expose: it takes it from uvicorn's
send callable (the response cycle's transport). Where that is not there (another server, a platform
without TCP_CORK) it passes the response through unchanged and says so once in the log.
"""

from __future__ import annotations

import logging
import socket
import struct
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CALLBACK_VAR = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK_PATH = "ehrfm.serve.whole_response:middlewares"

_LINGER_RESET = struct.pack("ii", 1, 0)  # l_onoff=1, l_linger=0: close() sends RST, unsent data dropped
_LINGER_DEFAULT = struct.pack("ii", 0, 0)
_TCP_CORK = getattr(socket, "TCP_CORK", None)  # Linux

logger = logging.getLogger("ray.serve")  # into the replica's own Serve log
_reported = False


def connection_socket(send: Send) -> Any | None:
    """The TCP socket under uvicorn's `send` (its response cycle's transport), else None."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        return None
    sock = transport.get_extra_info("socket")  # a closing connection's too: `hold` meets its OSError
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return sock


def hold(sock: Any) -> None:
    """From here until `release`, nothing of the response leaves, and a death resets the connection."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 1)


def release(sock: Any) -> None:
    """Back to a normal close first (a death from here on delivers what is queued), then send it all."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_DEFAULT)
    sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 0)


class WholeResponseMiddleware:
    """Pure ASGI middleware: holds each response in the kernel from its start to its last body part."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sock = connection_socket(send) if _TCP_CORK is not None else None
        _report_once(active=sock is not None)
        if sock is None:
            await self.app(scope, receive, send)
            return
        held = False

        async def send_whole(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                try:
                    hold(sock)
                    held = True
                except OSError:  # the connection is already gone; uvicorn will notice
                    pass
            await send(message)
            if held and message["type"] == "http.response.body" and not message.get("more_body", False):
                held = False
                try:
                    release(sock)
                except OSError:
                    pass

        # A response that fails half-way stays held: the connection closes with a reset and HAProxy
        # replays the request, instead of passing on headers with no body.
        await self.app(scope, receive, send_whole)


def _report_once(active: bool) -> None:
    """One line per process, at its first request: whether responses are held whole."""
    global _reported
    if _reported:
        return
    _reported = True
    if active:
        logger.info("whole-response middleware active: each response is sent whole or the connection is reset")
    else:
        logger.warning(
            "whole-response middleware inactive: no TCP socket under this HTTP server's send, or no TCP_CORK "
            "on this platform; a replica that dies mid-response may cut that response"
        )


def middlewares() -> list[Middleware]:
    """Serve's HTTP callback (CALLBACK_VAR): the middlewares its HTTP servers wrap around every app."""
    return [Middleware(WholeResponseMiddleware)]
