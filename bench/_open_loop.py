"""An open-loop HTTP load generator for the serving benchmark.

Closed-loop clients (send, wait, send) slow down with the server and hide queueing; an open loop
sends at the offered rate whatever happens, so a saturated service shows up as latency and
timeouts. Arrivals are evenly spaced, in-flight requests are bounded (a request that would exceed
the bound counts as an error, never as a silent skip), each request has its own timeout.

CPU per request is the CPU time of every process this one started (the local Ray cluster: GCS,
raylet, Serve controller, proxy, replicas) during the window, over the requests completed: the
service's whole cost, not just the replica's, and unaffected by other work on the machine. The
generator's own CPU is reported beside it. So is the CPU that everything else on the machine used
in the same window (machine-wide busy time, steal included, minus those two), in cores: latency
needs spare cores, so a run beside other work is flagged rather than mistaken for the service's
own tail.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

import numpy as np


def descendants_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by the processes this one started, recursively."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        total += times.user + times.system
    return total


def machine_busy_cpu_seconds() -> float:
    """CPU seconds every core of the machine has spent not idle (steal counted as busy: on a VM it is
    time another tenant took)."""
    import psutil

    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    guest = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)  # already inside user/nice
    return sum(times) - idle - guest


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


@dataclass
class LoadResult:
    offered_per_s: float
    seconds: float
    sent: int
    completed: int  # 200s
    errors: int  # non-200, timeouts, connection errors, over the in-flight bound
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    service_cpu_ms_per_request: float
    generator_cpu_ms_per_request: float
    other_cpu_cores: float  # what the rest of the machine used meanwhile, in cores

    def row(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


async def _run(
    url: str, bodies: list[bytes], rate: float, seconds: float, token: str | None, timeout_s: float, max_in_flight: int
) -> LoadResult:
    import aiohttp

    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    n = max(1, int(rate * seconds))
    latencies: list[float] = []
    errors = 0
    in_flight = 0

    async def one(session: aiohttp.ClientSession, body: bytes) -> None:
        nonlocal errors, in_flight
        start = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                ok = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        finally:
            in_flight -= 1
        if ok:
            latencies.append(time.perf_counter() - start)
        else:
            errors += 1

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=max_in_flight, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        busy0, own0, machine0 = descendants_cpu_seconds(), own_cpu_seconds(), machine_busy_cpu_seconds()
        t0 = time.perf_counter()
        for i in range(n):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if in_flight >= max_in_flight:
                errors += 1
                continue
            in_flight += 1
            tasks.append(asyncio.create_task(one(session, bodies[i % len(bodies)])))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        busy1, own1, machine1 = descendants_cpu_seconds(), own_cpu_seconds(), machine_busy_cpu_seconds()
    ms = np.asarray(latencies) * 1000.0 if latencies else np.asarray([np.nan])
    done = max(len(latencies), 1)
    generator = own1 - own0
    return LoadResult(
        offered_per_s=rate,
        seconds=wall,
        sent=len(tasks),
        completed=len(latencies),
        errors=errors,
        p50_ms=float(np.percentile(ms, 50)),
        p95_ms=float(np.percentile(ms, 95)),
        p99_ms=float(np.percentile(ms, 99)),
        max_ms=float(np.max(ms)),
        service_cpu_ms_per_request=1000.0 * (busy1 - busy0) / done,
        generator_cpu_ms_per_request=1000.0 * generator / done,
        other_cpu_cores=max(0.0, (machine1 - machine0) - (busy1 - busy0) - generator) / wall,
    )


def open_loop(
    url: str,
    bodies: list[bytes],
    rate: float,
    seconds: float,
    token: str | None = None,
    timeout_s: float = 2.0,
    max_in_flight: int = 256,
) -> LoadResult:
    """Offer `rate` requests/s for `seconds` to `url` (POST, bodies in turn)."""
    return asyncio.run(_run(url, bodies, rate, seconds, token, timeout_s, max_in_flight))
