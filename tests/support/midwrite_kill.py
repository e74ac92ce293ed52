"""Kill Serve replicas behind the default HAProxy ingress while their responses are half written.

Run as a script by tests/e2e/test_serve.py (it starts a Ray cluster of its own, as `ehrfm serve` does,
with the environment `ehrfm.serve.ingress.use_ingress` gives it). Two replicas of a tiny FastAPI app
whose every response waits `--gap` seconds between its headers and its body, so that at any moment
most in-flight requests are in exactly the window a kill used to cut (a 200 with headers and no body).
Clients without retries score continuously, one connection per request; a replica's process is
SIGKILLed `--kills` times. Prints one JSON line: the kills and every request's outcome, counted.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import signal
import threading
import time
from collections import Counter

from ehrfm.serve.ingress import use_ingress

APP, DEPLOYMENT, ROUTE, BODY = "midwrite", "MidWrite", "/x", b'{"ok":1}'


def build(gap_s: float):
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    class BodyLater:
        """Holds each response's body `gap_s` after its headers were handed to the server."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            async def later(message):
                if message["type"] == "http.response.body":
                    await asyncio.sleep(gap_s)
                await send(message)

            await self.app(scope, receive, later)

    api.add_middleware(BodyLater)

    @serve.deployment(name=DEPLOYMENT, num_replicas=2, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=32)
    @serve.ingress(api)
    class MidWrite:
        @api.post(ROUTE)
        def answer(self) -> dict:
            return {"ok": 1}

    return MidWrite.bind()


def replica_processes() -> list:
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if f"ServeReplica:{APP}:{DEPLOYMENT}" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--gap", type=float, default=0.1)  # inside the kernel's 200-ms cork ceiling
    parser.add_argument("--clients", type=int, default=6)
    args = parser.parse_args()
    use_ingress("haproxy")  # the cluster about to start gets exactly what `ehrfm serve` gives its own
    import ray
    from ray import serve

    from ehrfm.cluster.local import free_port

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(args.gap), name=APP, route_prefix="/")

    def request() -> str:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("POST", ROUTE, b"{}")
            response = connection.getresponse()
            body = response.read()
            return "ok" if response.status == 200 and body == BODY else f"status {response.status}, {len(body)} bytes"
        except Exception as error:  # noqa: BLE001 - every failure is an outcome to count
            return type(error).__name__
        finally:
            connection.close()

    deadline = time.monotonic() + 120
    while request() != "ok":
        assert time.monotonic() < deadline, "the app never answered"
        time.sleep(0.5)
    outcomes: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            outcomes.append(request())

    clients = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for thread in clients:
        thread.start()
    kills = 0
    for _ in range(args.kills):
        deadline = time.monotonic() + 120
        while len(replica_processes()) != 2:  # the previous victim replaced
            assert time.monotonic() < deadline, "Serve did not replace the killed replica"
            time.sleep(0.3)
        time.sleep(2.0)  # both replicas hold requests again
        os.kill(replica_processes()[0].pid, signal.SIGKILL)
        kills += 1
    time.sleep(3.0)
    stop.set()
    for thread in clients:
        thread.join(timeout=35)
    print(json.dumps({"kills": kills, "outcomes": dict(Counter(outcomes))}), flush=True)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
