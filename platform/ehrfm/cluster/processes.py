"""The processes of a local Ray cluster: start one `ray start --block` node, tell whether it is
alive, and stop nodes together with everything they started.

A node is recorded by pid *and* creation time, so a pid reused by an unrelated process is never
signalled. Stopping sends SIGTERM to `ray start` (which stops its own node) and SIGKILLs whatever
is left after a grace period, job drivers included (Ray starts them in sessions of their own);
what a crashed `ray start` left behind is killed at once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class NodeProcess:
    """One `ray start --block` process; its creation time guards against a reused pid."""

    role: str
    pid: int
    created: float
    log: str


def _ray_cli() -> str:
    beside_python = Path(sys.executable).with_name("ray")
    return str(beside_python) if beside_python.exists() else (shutil.which("ray") or "ray")


def start_node(role: str, args: list[str], env: dict[str, str], logs: Path) -> NodeProcess:
    log_path = logs / f"{role}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [_ray_cli(), "start", "--block", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    return NodeProcess(role, process.pid, psutil.Process(process.pid).create_time(), str(log_path))


def live_process(node: NodeProcess) -> psutil.Process | None:
    try:
        process = psutil.Process(node.pid)
        if abs(process.create_time() - node.created) > 1.0 or process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except psutil.Error:
        return None


def _group_members(node: NodeProcess) -> list[psutil.Process]:
    """Live processes of the node's process group, started no earlier than the node itself."""
    members = []
    for process in psutil.process_iter():
        try:
            if (
                os.getpgid(process.pid) == node.pid
                and process.create_time() >= node.created - 1.0
                and process.status() != psutil.STATUS_ZOMBIE
            ):
                members.append(process)
        except (psutil.Error, ProcessLookupError):
            continue
    return members


def _signal(process: psutil.Process, sig: int) -> None:
    try:
        process.send_signal(sig)
    except psutil.Error:  # it has exited meanwhile
        pass


def _reap(pid: int) -> None:
    """Collect the exit status of a node we started in this process (no zombie left behind)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_nodes(nodes: list[NodeProcess], grace_s: float) -> None:
    """SIGTERM each `ray start` (it stops its own node); SIGKILL whatever is left after `grace_s`."""
    tracked: list[psutil.Process] = []
    for node in nodes:
        members = _group_members(node)
        tracked += members
        process = live_process(node)
        if process is None:  # `ray start` died: nothing will stop its node in order; kill the rest
            for member in members:
                _signal(member, signal.SIGKILL)
            continue
        tracked += [process, *process.children(recursive=True)]
        _signal(process, signal.SIGTERM)
    _, alive = psutil.wait_procs(tracked, timeout=grace_s)
    for process in alive:
        _signal(process, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=10)
    for node in nodes:
        _reap(node.pid)
