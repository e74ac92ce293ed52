"""A response leaves the HTTP server whole or not at all (platform/ehrfm/serve/whole_response.py).

Real uvicorn in a child process, real sockets, a real SIGKILL between the response's headers and its
body: without the middleware the client gets the headers and then an end of stream (a cut 200); with it
the connection is reset before any byte, which HAProxy replays on another replica."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ehrfm.serve.whole_response import CALLBACK_PATH, CALLBACK_VAR, middlewares

SERVER = textwrap.dedent(
    """
    import asyncio, json, socket, struct, sys
    import uvicorn
    from ehrfm.serve.whole_response import WholeResponseMiddleware, connection_socket

    def held_state(scope):
        sock = scope["test.socket"]
        linger_on, _ = struct.unpack("ii", sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
        return {"cork": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK), "linger": linger_on}

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await receive()
        before = held_state(scope) if scope["path"] == "/state" else None
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        if scope["path"] == "/slow":
            print("started", flush=True)  # headers handed to the server; the test kills us now
            await asyncio.sleep(30)
        during = held_state(scope) if scope["path"] == "/state" else None
        await send({"type": "http.response.body", "body": json.dumps({"before": before, "during": during}).encode()})

    def with_socket(inner):  # hands the app the connection's socket, to report its state
        async def outer(scope, receive, send):
            scope["test.socket"] = connection_socket(send)
            await inner(scope, receive, send)
        return outer

    port, wrapped, loop = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
    uvicorn.run(with_socket(WholeResponseMiddleware(app) if wrapped else app), host="127.0.0.1", port=port, loop=loop,
                log_level="warning")
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(tmp_path: Path, wrapped: bool, loop: str) -> tuple[subprocess.Popen, socket.socket]:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, str(script), str(port), "1" if wrapped else "0", loop], stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            return server, socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.05)


def _read_until_closed(client: socket.socket) -> tuple[bytes, str | None]:
    received = b""
    try:
        while chunk := client.recv(4096):
            received += chunk
    except OSError as error:
        return received, type(error).__name__
    return received, None


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "whole_response"])
def test_a_server_killed_between_headers_and_body(tmp_path, wrapped, loop):
    server, client = _start(tmp_path, wrapped, loop)
    try:
        client.sendall(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
        assert server.stdout.readline().strip() == "started"
        server.send_signal(signal.SIGKILL)  # well inside the kernel's 200-ms cork ceiling
        server.wait(timeout=10)
        received, error = _read_until_closed(client)
    finally:
        client.close()
        if server.poll() is None:
            server.kill()
    if wrapped:
        # nothing left the machine: a reset with no response, which HAProxy replays (`empty-response`)
        assert (received, error) == (b"", "ConnectionResetError")
    else:
        # what the middleware prevents: a 200's headers, then the end of the stream, no body
        assert received.startswith(b"HTTP/1.1 200 OK\r\n") and received.endswith(b"\r\n\r\n") and error is None


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_responses_are_held_while_written_and_released_after(tmp_path, loop):
    server, client = _start(tmp_path, True, loop)
    try:
        states = []
        for _ in range(2):  # one keep-alive connection: the second request sees what the first left
            client.sendall(b"GET /state HTTP/1.1\r\nHost: test\r\n\r\n")
            received = b""
            while not received.endswith(b"\r\n0\r\n\r\n"):  # chunked: the body's length is not known at its start
                chunk = client.recv(4096)
                assert chunk, "the connection closed before the whole response"
                received += chunk
            head, chunked = received.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200 OK")
            states.append(json.loads(chunked.split(b"\r\n")[1]))
    finally:
        client.close()
        server.kill()
        server.wait(timeout=10)
    for state in states:
        assert state["during"] == {"cork": 1, "linger": 1}  # between headers and body: corked, reset on death
    # after a response the connection is back to normal (not corked, a plain close), for the next one
    assert states[1]["before"] == {"cork": 0, "linger": 0}


def test_the_callback_returns_the_middleware_serve_wraps_its_servers_in():
    from starlette.middleware import Middleware

    from ehrfm.serve.whole_response import WholeResponseMiddleware

    returned = middlewares()
    assert len(returned) == 1 and isinstance(returned[0], Middleware) and returned[0].cls is WholeResponseMiddleware
    assert CALLBACK_VAR == "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
    module, _, name = CALLBACK_PATH.partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is middlewares
