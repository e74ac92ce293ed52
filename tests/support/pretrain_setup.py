"""What tests/{unit,integration,e2e}/test_pretrain.py share: the shipped configs, the run config on the
factory's timelines, a runner for named (resumable) pretraining runs, the local-server environment, and the
checks a run's history and model are held to. The fixtures stay in the test modules and call these."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from ehrfm.config import load_config
from ehrfm.constants import PAD_ID
from ehrfm.tracking import CLIENT_RETRY_ENV
from ehrfm.training.config import PretrainConfig
from tests.support.timeline_factory import T2D_TOKEN

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
SMALL = CONFIGS / "pretrain-cpu-small.yaml"
BASE_RUN = ["schedule.max_steps=30", "schedule.val_every=5", "schedule.checkpoint_every=10"]


def point_the_local_server_at(mlflow_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No MLFLOW_TRACKING_URI, and the local server's settings naming the session's server, so the
    fallback finds it running and starts nothing; what ensure_tracking_uri exports is undone after."""
    for key in ("MLFLOW_TRACKING_URI", *CLIENT_RETRY_ENV):
        monkeypatch.setenv(key, "")  # recorded first, so teardown restores the value (or its absence)
        monkeypatch.delenv(key)
    monkeypatch.setenv("EHRFM_MLFLOW_PORT", mlflow_server.rsplit(":", 1)[1])
    monkeypatch.setenv("EHRFM_MLFLOW_DIR", str(tmp_path / "never-started"))
    return tmp_path / "never-started"


def make_config(timelines, storage: Path, overrides: list[str]) -> PretrainConfig:
    cfg = load_config(PretrainConfig, SMALL, BASE_RUN + overrides)
    cfg.data.dir = str(timelines.root)
    cfg.run.storage_path = str(storage)
    return cfg


def pretraining_runner(datasets, timelines, storage: Path, mlflow_server: str):
    """Run (or resume) a pretraining run named `name`; returns (result, final train_state)."""
    from ehrfm.training.pretrain import run_pretraining

    def run(name: str, *overrides: str):
        cfg = make_config(timelines, storage, [f"run.name={name}", f"mlflow.tracking_uri={mlflow_server}", *overrides])
        result = run_pretraining(cfg, datasets)
        state = json.loads((Path(result.checkpoint) / "train_state.json").read_text())
        return result, state

    return run


def val_losses(state: dict) -> list[float]:
    return [point["val_loss"] for point in state["history"]]


def assert_learns(state: dict, vocab: int) -> None:
    losses = val_losses(state)
    assert [p["step"] for p in state["history"]] == [5, 10, 15, 20, 25, 30]
    assert losses[-1] < losses[0] - 0.25, losses  # validation loss falls ...
    assert losses[-1] < math.log(vocab) - 0.5, losses  # ... well below a uniform guess
    assert all(b < a + 0.02 for a, b in zip(losses, losses[1:])), losses


def t2d_log_likelihood(model, batch: dict, prs: torch.Tensor) -> torch.Tensor:
    """Mean log p(T2D) over each person's real next-token positions."""
    with torch.no_grad():
        logits, _ = model(batch["tokens"], batch["ages"], prs, batch["has_prs"])
    logp = torch.log_softmax(logits.float(), dim=-1)[..., T2D_TOKEN]
    real = batch["targets"] != PAD_ID
    return (logp * real).sum(1) / real.sum(1)


def assert_uses_the_prs_for_t2d(result, timelines) -> None:
    """The pretrained model gives the high-PRS half of held-out genotyped people a higher T2D
    likelihood, because of the PRS input (moving PRS column 0 moves it), and nothing for the rest."""
    from ehrfm.model import load_model
    from ehrfm.training.windows import WindowCollate

    model = load_model(result.checkpoint)
    table = pa.concat_tables(pq.read_table(p) for p in sorted((timelines.root / "timelines").glob("*.parquet")))
    held_out = table.filter(pc.equal(table["split"], "test"))
    batch = WindowCollate(model.cfg.context, timelines.num_pgs, seed=0, epoch=-1)(held_out)
    genotyped = batch["has_prs"]
    z0 = batch["prs"][:, 0]
    factual = t2d_log_likelihood(model, batch, batch["prs"])
    median = z0[genotyped].median()
    high, low = factual[genotyped & (z0 > median)], factual[genotyped & (z0 < median)]
    assert len(high) >= 15 and len(low) >= 15
    assert high.mean() > low.mean() + 0.15  # higher T2D likelihood for the high-PRS half (held out)
    # The difference comes from the PRS input, not from the history: same people, PRS column 0 moved.
    raised, lowered = batch["prs"].clone(), batch["prs"].clone()
    raised[:, 0], lowered[:, 0] = 2.0, -2.0
    effect = t2d_log_likelihood(model, batch, raised) - t2d_log_likelihood(model, batch, lowered)
    assert (effect[genotyped] > 0).float().mean() > 0.9 and effect[genotyped].mean() > 0.3
    torch.testing.assert_close(effect[~genotyped], torch.zeros_like(effect[~genotyped]))  # missing: no effect
