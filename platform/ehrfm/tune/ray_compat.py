"""The one module of ehrfm that reaches into Ray internals: stopping a trial's Train run cleanly.

Why it exists (Ray 2.60, Train V2 + Tune): a Tune trial here is only the driver of a Ray Train
run; the epochs run in a Train controller actor and its workers. When Tune stops the trial (ASHA,
or the end of the sweep) it ends the trial's actor; the controller dies with it but the workers'
placement group outlives it (placement groups live as long as the job), so the next trial waits
forever for those CPUs. Ray tracks this as https://github.com/ray-project/ray/issues/54305; its
placement-group cleaner (ray-project/ray#58515) needs the dashboard's state API, which a test
cluster or a busy machine may not have. No public API hands a trial its Train run's controller.

The workaround, all of it here: a Train *developer-API* controller callback (internal module path)
posts the controller's actor handle to the trial's mailbox when the run starts; the trial overrides
FunctionTrainable's private `_trainable_func`/`cleanup` to call the controller's `abort` (which
shuts the workers down and removes the placement group) when Tune stops it. The unit test
`test_ray_compat` checks every Ray symbol and behaviour this relies on, so a Ray upgrade that changes
them fails there, by name, instead of hanging a sweep.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import ray
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.tune.trainable.function_trainable import FunctionTrainable

RAY_VERSION_CHECKED = "2.60.0"  # the Ray release this module's assumptions were last checked against
ABORT_TIMEOUT_S = 60.0  # the controller's abort: stop the workers, remove the placement group


class ControllerHandleCallback(ControllerCallback):
    """Runs inside the Train controller: puts the controller's own handle in the trial's mailbox."""

    def __init__(self, mailbox):
        self._mailbox = mailbox

    def after_controller_start(self, train_run_context) -> None:
        self._mailbox.put(ray.get_runtime_context().current_actor)


class AbortingFunctionTrainable(FunctionTrainable):
    """A function trainable whose stop aborts the Train run its function started.

    Subclasses implement `fit(config, controller_callbacks)`: start the Train run with the given
    callbacks in its RunConfig and return when it ends.
    """

    def fit(self, config: dict[str, Any], controller_callbacks: list) -> None:
        raise NotImplementedError

    def setup(self, config):
        self._mailbox, self._fit_thread = None, None
        self._stopping = False
        super().setup(config)

    def _trainable_func(self, config: dict[str, Any]):
        from ray.util.queue import Queue

        if self._stopping:
            return None
        self._fit_thread = threading.current_thread()
        self._mailbox = Queue(maxsize=1, actor_options={"num_cpus": 0})
        try:
            self.fit(config, [ControllerHandleCallback(self._mailbox)])
        except Exception:
            if self._stopping:  # the run was aborted because Tune stopped the trial: not a failure
                return None
            raise
        return None

    def cleanup(self):
        """Tune's stop (ASHA, or the end of the sweep): abort a Train run still going, wait for it."""
        self._stopping = True
        runner = self._fit_thread
        if runner is not None and runner.is_alive() and self._mailbox is not None:
            abort_train_run(lambda: self._mailbox.get(timeout=ABORT_TIMEOUT_S))
            runner.join(timeout=ABORT_TIMEOUT_S)
        super().cleanup()


def abort_train_run(controller_handle: Callable[[], Any]) -> None:
    """Call the controller's abort and wait for it; a controller that already ended is fine."""
    try:
        controller = controller_handle()
        ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
    except (queue.Empty, ray.exceptions.RayError, TimeoutError):
        pass  # the controller already ended (its exit also ends the abort call)
