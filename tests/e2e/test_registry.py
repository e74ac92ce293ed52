"""A fresh interpreter loads the registered champion (tests/support/registry_models.py) with the code logged
with it, not the checkout's, and gets the predictor's risks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from ehrfm.mlops.pyfunc_model import records_frame
from ehrfm.transfer.predictor import RiskPredictor
from tests.support.registry_models import (
    make_workdir,
    people,
    register_t2d_champion,
    registry_tracking,
)

pytestmark = pytest.mark.mlflow


@pytest.fixture(scope="module")
def tracking(mlflow_server):
    with registry_tracking(mlflow_server) as uri:
        yield uri


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def t2d_champion(tracking, workdir):
    """Version 1 of ehrfm-t2d, logged from a model directory and registered (promoted: no champion yet)."""
    return register_t2d_champion(workdir)


@pytest.mark.e2e  # a new interpreter importing torch, ray and mlflow: ~15-30 s on a shared 2-core machine
def test_a_fresh_process_loads_the_champion_with_the_logged_code(t2d_champion, tmp_path):
    directory, _, _, _ = t2d_champion
    _, requests = people()
    predictor = RiskPredictor.load(directory)
    frame = records_frame([predictor.parse(r) for r in requests])
    (tmp_path / "input.json").write_text(json.dumps(frame["person"].tolist()))
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model('models:/ehrfm-t2d@champion')\n"
        "import ehrfm\n"
        "frame = pd.DataFrame({'person': json.load(open('input.json'))})\n"
        "print(json.dumps({'ehrfm': ehrfm.__file__, 'risk': model.predict(frame)['risk'].tolist()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(answer["ehrfm"]).parts[-3:] == ("code", "ehrfm", "__init__.py")  # the logged copy, not the checkout
    expected = [r["risk"] for r in predictor.predict([predictor.parse(r) for r in requests])]
    np.testing.assert_allclose(answer["risk"], expected, rtol=1e-9)
