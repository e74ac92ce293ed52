"""The Ray internals `ehrfm.tune.ray_compat` relies on, checked one by one (no cluster needed).

A Ray upgrade that moves or changes any of them fails here, naming what changed, instead of
leaving a sweep waiting forever for the CPUs of a stopped trial. Then re-check the workaround
against the new Ray (is there a public way now? see the module docstring) and bump
RAY_VERSION_CHECKED.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import ray
from ray.train.v2._internal.execution.controller.controller import TrainController
from ray.train.v2.api.callback import UserCallback
from ray.tune.trainable.function_trainable import FunctionTrainable

from ehrfm.tune import ray_compat

PACKAGE = Path(ray_compat.__file__).resolve().parents[1]


def test_ray_is_the_version_the_workaround_was_checked_against():
    assert ray.__version__ == ray_compat.RAY_VERSION_CHECKED, (
        f"Ray {ray.__version__} != {ray_compat.RAY_VERSION_CHECKED}: re-check ehrfm/tune/ray_compat.py"
    )


def test_controller_callbacks_still_reach_the_controller_and_it_can_abort():
    # the hook our callback implements, with the signature it is called with
    hook = inspect.signature(ray_compat.ControllerCallback.after_controller_start)
    assert list(hook.parameters) == ["self", "train_run_context"]
    # RunConfig accepts it, and the trainer hands non-user callbacks to the controller
    assert not issubclass(ray_compat.ControllerHandleCallback, UserCallback)
    config = ray.train.RunConfig(callbacks=[ray_compat.ControllerHandleCallback(mailbox=None)])
    assert isinstance(config.callbacks[0], ray_compat.ControllerHandleCallback)
    from ray.train.v2.api import data_parallel_trainer

    source = inspect.getsource(data_parallel_trainer.DataParallelTrainer._create_default_callbacks)
    assert "not isinstance(cb, UserCallback)" in source, "Ray no longer passes internal callbacks through"
    # the controller's abort: an async actor method that shuts the worker group down
    assert inspect.iscoroutinefunction(TrainController.abort)
    body = inspect.getsource(TrainController.abort).split('"""')[-1]
    assert "self._worker_group.abort()" in body, "the controller's abort no longer aborts its worker group"
    from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

    # the worker group's abort removes the placement group (ray-project/ray#56011)
    assert "shutdown" in inspect.getsource(WorkerGroup.abort)


def test_function_trainable_still_runs_the_function_through_the_overridden_hooks():
    for name in ("_trainable_func", "cleanup", "setup"):
        assert callable(getattr(FunctionTrainable, name, None)), f"FunctionTrainable.{name} is gone"
    assert list(inspect.signature(FunctionTrainable._trainable_func).parameters)[:2] == ["self", "config"]
    assert issubclass(ray_compat.AbortingFunctionTrainable, FunctionTrainable)


def test_no_ray_internal_or_private_import_outside_the_compat_module():
    pattern = re.compile(r"^\s*(from|import)\s+ray(\.\w+)*\.(_internal|_private)\b", re.MULTILINE)
    offenders = [
        str(path.relative_to(PACKAGE.parent))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != Path(ray_compat.__file__).resolve() and pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
    assert pattern.search(Path(ray_compat.__file__).read_text(encoding="utf-8"))  # the pattern does find one
