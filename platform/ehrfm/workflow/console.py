"""What the main job prints: one line per stage outcome, a heartbeat, and a summary table at the end.

On a terminal a stage's own output (and Ray's progress bars) goes to the terminal as before. When
stdout is not a terminal (a CI log, `make run > run.log`) redrawn progress bars become thousands of
lines that look like stalls, so each stage's output goes to `<workdir>/logs/<stage>.log` instead,
progress bars are turned off, and the console gets a plain line every `heartbeat_s` seconds while a
stage runs. Either way the job ends with a summary table (stage, status, time, output) whose last
line is the failing stage's error, if one failed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

HEARTBEAT_S = 30.0
# set (unless the user set them) for a run whose stdout is not a terminal; stages run in this
# process, so Ray processes they start inherit them
QUIET_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # Ray Data's bars (driver and Train workers)
    "RAY_DEDUP_LOGS": "1",  # identical worker lines once, with a repeat count
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TQDM_DISABLE": "1",  # any other tqdm bar
}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CHROME = re.compile(
    r"^(Traceback \(most recent call last\)|During handling|The above exception|\s*File \"|\s*\^+\s*$|-+$)"
)


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stdout if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def quiet_environment() -> dict[str, str]:
    """Set QUIET_ENV where unset; returns what was set (for the record)."""
    applied = {}
    for key, value in QUIET_ENV.items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied


def last_meaningful_line(text: str) -> str:
    """The line an operator needs from a failure's output: the last one that is not traceback
    chrome, progress-bar residue or blank (ANSI colours stripped, carriage-return redraws resolved)."""
    for raw in reversed(text.splitlines()):
        line = _ANSI.sub("", raw.rsplit("\r", 1)[-1]).strip()
        if line and not _CHROME.match(line) and "%|" not in line:
            return line[:300]
    return ""


@dataclass
class StageOutcome:
    """One row of the summary table."""

    stage: str
    status: str  # ran | skipped | disabled | failed | not run
    seconds: float | None = None
    output: str = ""
    error: str = ""


class Console:
    """Where the pipeline's own lines go, and how a stage's output is kept."""

    def __init__(self, workdir: Path, stream: TextIO | None = None, capture: bool | None = None):
        self.stream = sys.stdout if stream is None else stream
        self.capture = (not is_terminal(self.stream)) if capture is None else capture
        self.logs = workdir / "logs"
        if self.capture:
            # a stage's output is sent to its log through descriptor 1: the console keeps its own copy
            with contextlib.suppress(AttributeError, OSError, ValueError):
                fd = self.stream.fileno()
                self.stream.flush()
                self.stream = os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8")

    def line(self, text: str, fresh: bool = False) -> None:
        """One line; `fresh`: on a terminal, after a stage's output, which may have left a progress
        bar's cursor mid-line, start on a new line rather than gluing onto it."""
        prefix = "\n" if fresh and not self.capture else ""
        self.stream.write(f"{prefix}{text}\n")
        self.stream.flush()

    def log_path(self, stage: str) -> Path:
        return self.logs / f"{stage}.log"

    @contextlib.contextmanager
    def stage_output(self, stage: str, header: str) -> Iterator[Path | None]:
        """Run the body with the stage's output in its log file (capture mode) and a heartbeat."""
        if not self.capture:
            try:
                yield None
            except SystemExit:
                raise  # a command's own one-line message: the summary shows it
            except BaseException:
                traceback.print_exc()  # on a terminal the traceback stays where the stage printed
                raise
            return
        self.logs.mkdir(parents=True, exist_ok=True)
        path = self.log_path(stage)
        stop = threading.Event()
        started = time.perf_counter()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                self.line(f"{header}: still running, {time.perf_counter() - started:.0f}s (log: {path})")

        with open(path, "w", encoding="utf-8", buffering=1) as log:
            heartbeat = threading.Thread(target=beat, name=f"heartbeat-{stage}", daemon=True)
            with _redirected(log):
                heartbeat.start()
                try:
                    yield path
                except SystemExit:
                    raise  # the command printed its own message (argparse's usage error, a one-line refusal)
                except BaseException:
                    traceback.print_exc(file=log)
                    raise
                finally:
                    stop.set()
                    heartbeat.join()

    def tail_error(self, stage: str, exc: BaseException | None) -> str:
        """The failing stage's error as one line: its exception's message, else its log's last line."""
        if exc is not None and not (isinstance(exc, SystemExit) and not isinstance(exc.code, str)):
            message = str(exc).strip()
            if message and not isinstance(exc, SystemExit):
                message = f"{type(exc).__name__}: {message}"
            line = last_meaningful_line(message)
            if line:
                return line
        path = self.log_path(stage)
        if path.is_file():
            return last_meaningful_line(path.read_text(encoding="utf-8", errors="replace"))
        return ""


class _StageStream(io.TextIOBase):
    """What sys.stdout/sys.stderr are while a stage runs: writes go to the current stage's log.

    A logging handler made during a stage (Ray's and Ray Data's loggers are configured on first
    use) keeps the stream object it was given; a plain file would be closed when the stage ends
    and every later record through that handler would fail ("--- Logging error ---"). This object
    outlives the stages: between them it writes where the process's stream wrote before."""

    def __init__(self, name: str):
        self.name = name
        self.target: TextIO | None = None
        self.outside: TextIO | None = None

    def _current(self) -> TextIO:
        return self.target or self.outside or getattr(sys, f"__{self.name}__")

    def write(self, text: str) -> int:
        try:
            return self._current().write(text)
        except ValueError:  # the stream outside the stages was closed since (a finished test's capture)
            return getattr(sys, f"__{self.name}__").write(text)

    def flush(self) -> None:
        with contextlib.suppress(Exception):
            self._current().flush()

    def fileno(self) -> int:
        return self._current().fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


_STAGE_STREAMS = {"stdout": _StageStream("stdout"), "stderr": _StageStream("stderr")}


@contextlib.contextmanager
def _redirected(log: TextIO) -> Iterator[None]:
    """sys.stdout/sys.stderr and file descriptors 1/2 into `log` (Ray and C++ libraries write to
    the descriptors; pytest's capture and the pipeline's callers replace the Python objects)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = []
    for fd in (1, 2):
        try:
            saved.append((fd, os.dup(fd)))
            os.dup2(log.fileno(), fd)
        except OSError:
            pass
    out, err = _STAGE_STREAMS["stdout"], _STAGE_STREAMS["stderr"]
    if sys.stdout is not out:
        out.outside = sys.stdout
    if sys.stderr is not err:
        err.outside = sys.stderr
    out.target = err.target = log
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        out.target = err.target = None
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def summary_table(outcomes: list[StageOutcome]) -> str:
    """stage | status | time | output, then `error (<stage>): <line>` for a failed stage, last."""
    rows = [("stage", "status", "time", "output")]
    for o in outcomes:
        # a skipped stage shows, in parentheses, the time of the run that made its output
        time_ = "-" if o.seconds is None else f"{o.seconds:.1f}s"
        rows.append((o.stage, o.status, f"({time_})" if o.status == "skipped" else time_, o.output or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["", "summary:"]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    failed = [o for o in outcomes if o.status == "failed"]
    lines += [f"error ({o.stage}): {o.error or 'no message'}" for o in failed]
    return "\n".join(lines)
