"""pytest plugin: build DeepSpeed's CPU shared-memory communication op in the background.

The first DeepSpeed engine on a fresh machine JIT-compiles this C++ op (about 40 s of one core) while
every Ray Train worker waits on torch's build lock. Started when collection finishes, the build runs
beside the unit tests (single-threaded, so a core is free) and is cached before the first training
run needs it. Loading an op that is already cached takes a few seconds, so the plugin starts the
build whenever the session holds tests outside tests/unit. The build is never killed: a compiler
stopped while holding torch's build lock would leave the lock behind and hang the next training
run, so a short session leaves it to finish on its own.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

BUILD = (
    "from deepspeed.accelerator import get_accelerator\n"
    "builder = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
    "import deepspeed.ops\n"
    "if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):\n"
    "    builder.load(verbose=False)\n"
)
_BUILD = pytest.StashKey[subprocess.Popen]()


def pytest_collection_finish(session: pytest.Session) -> None:
    trains = any("/tests/unit/" not in str(item.path).replace("\\", "/") for item in session.items)
    if trains and not session.config.option.collectonly:
        session.stash[_BUILD] = subprocess.Popen(
            [sys.executable, "-c", BUILD],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not in the terminal's process group: Ctrl-C does not stop it mid-build
        )
