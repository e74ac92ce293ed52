"""Pretraining: configs, training windows, and real Ray Train + DeepSpeed runs on CPU (2 workers, gloo).

The Ray runs share one local cluster, one set of materialised datasets and the session's MLflow
server; each is a few dozen steps of a tiny model on timelines from tests/support/timeline_factory.py.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from ehrfm.config import load_config
from ehrfm.constants import PAD_ID
from ehrfm.model import load_model
from ehrfm.model.io import load_state_dict
from ehrfm.tracking import CLIENT_RETRY_ENV
from ehrfm.training.config import PretrainConfig
from ehrfm.training.engine import WarmupCosine, deepspeed_config
from ehrfm.training.windows import TimelineManifest, WindowCollate
from tests.support.timeline_factory import T2D_TOKEN, write_timelines

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
SMALL = CONFIGS / "pretrain-cpu-small.yaml"
BASE_RUN = ["schedule.max_steps=30", "schedule.val_every=5", "schedule.checkpoint_every=10"]


# ---- configs and windows (no Ray) -------------------------------------------------------------
def test_the_shipped_pretrain_configs_validate():
    small = load_config(PretrainConfig, SMALL)
    assert (small.model.hidden, small.model.layers, small.model.context) == (64, 2, 128)
    assert not small.bf16 and small.scaling.num_workers == 2 and not small.scaling.use_gpu
    cpu_20k = load_config(PretrainConfig, CONFIGS / "pretrain-cpu-20k.yaml")  # the same decoder, longer window
    assert (cpu_20k.model.hidden, cpu_20k.model.layers, cpu_20k.model.context) == (64, 2, 512)
    assert cpu_20k.schedule.max_steps == 1500 and not cpu_20k.scaling.use_gpu
    big = load_config(PretrainConfig, CONFIGS / "pretrain-gpu-300m.yaml")
    m = big.model
    assert (m.hidden, m.layers, m.heads, m.context, m.prs_tokens, m.prs_hidden) == (960, 12, 8, 2048, 10, 4096)
    assert big.bf16 and big.scaling.use_gpu and big.deepspeed.zero_stage in (2, 3)
    assert big.scaling.num_workers > 1


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="zero_stge"):
        load_config(PretrainConfig, SMALL, ["deepspeed.zero_stge=3"])
    with pytest.raises(ValueError, match="stop_at_step"):
        load_config(PretrainConfig, SMALL, ["schedule.stop_at_step=100"])
    with pytest.raises(ValueError, match="bf16"):
        load_config(PretrainConfig, SMALL, ["deepspeed.precision=bf16"])
    with pytest.raises(ValueError, match="init_from"):
        load_config(PretrainConfig, SMALL, ["model.fusion=cross", "model.adapter=true"])
    with pytest.raises(ValueError, match="model.hiden"):
        load_config(PretrainConfig, SMALL, ["model.hiden=3"])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_follows_the_training_config(stage):
    cfg = load_config(PretrainConfig, SMALL, [f"deepspeed.zero_stage={stage}", "schedule.grad_accum=3"])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == cfg.data.batch_size * 3 * 4
    assert ds["gradient_clipping"] == cfg.optim.grad_clip and ds["bf16"]["enabled"] is False
    assert ("stage3_prefetch_bucket_size" in ds["zero_optimization"]) == (stage == 3)
    gpu = load_config(PretrainConfig, CONFIGS / "pretrain-gpu-300m.yaml")
    assert deepspeed_config(gpu, 8)["bf16"]["enabled"] is True


def test_warmup_then_cosine_schedule():
    schedule = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.55)
    assert schedule(110) == pytest.approx(0.1) and schedule(500) == pytest.approx(0.1)
    values = [schedule(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_windows_are_slices_of_timelines_fixed_per_epoch(tmp_path):
    write_timelines(tmp_path, persons=60, files=1, min_events=5, max_events=200)
    table = pq.read_table(tmp_path / "timelines" / "part-00000.parquet")
    collate = WindowCollate(context=64, num_pgs=8, seed=3, epoch=0)
    batch = collate(table)
    assert batch["tokens"].shape == (60, 64) and batch["prs"].shape == (60, 8)
    torch.testing.assert_close(batch["tokens"][:, 1:], batch["targets"][:, :-1])
    tokens = table["tokens"].to_pylist()
    for row, timeline in enumerate(tokens):
        window = batch["tokens"][row].tolist() + [batch["targets"][row, -1].item()]
        real = [t for t in window if t != PAD_ID]
        start = next(i for i in range(len(timeline)) if timeline[i : i + len(real)] == real)
        assert len(real) == min(len(timeline) - start, 65)  # right-padded only when the timeline ends
        assert window[len(real) :] == [PAD_ID] * (65 - len(real))
    shuffled = table.take(np.random.default_rng(0).permutation(60))
    again = WindowCollate(64, 8, 3, 0)(shuffled)
    order = np.argsort(again["subject_id"].numpy())
    assert torch.equal(again["tokens"][order], batch["tokens"][np.argsort(batch["subject_id"].numpy())])
    later = WindowCollate(64, 8, 3, 1)(table)
    long_rows = np.array([len(t) > 80 for t in tokens])
    assert (later["tokens"][long_rows] != batch["tokens"][long_rows]).any(dim=1).float().mean() > 0.8
    assert torch.equal(batch["has_prs"], torch.from_numpy(table["has_prs"].to_numpy(zero_copy_only=False)))


def test_manifest_problems_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        TimelineManifest.read(tmp_path)
    write_timelines(tmp_path, persons=10, files=1)
    manifest = tmp_path / "timelines" / "manifest.json"
    data = json.loads(manifest.read_text())
    assert TimelineManifest.read(tmp_path).vocab_size == data["vocab_size"]
    data["num_pgs"] = 3
    manifest.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="num_pgs=3"):
        TimelineManifest.read(tmp_path)


@pytest.fixture
def local_server_is_the_session_server(mlflow_server, monkeypatch, tmp_path):
    """No MLFLOW_TRACKING_URI, and the local server's settings naming the session's server, so the
    fallback finds it running and starts nothing; what ensure_tracking_uri exports is undone after."""
    for key in ("MLFLOW_TRACKING_URI", *CLIENT_RETRY_ENV):
        monkeypatch.setenv(key, "")  # recorded first, so teardown restores the value (or its absence)
        monkeypatch.delenv(key)
    monkeypatch.setenv("EHRFM_MLFLOW_PORT", mlflow_server.rsplit(":", 1)[1])
    monkeypatch.setenv("EHRFM_MLFLOW_DIR", str(tmp_path / "never-started"))
    return tmp_path / "never-started"


def test_tracking_uri_is_the_config_then_the_environment_then_the_local_server(
    local_server_is_the_session_server, mlflow_server, tmp_path, monkeypatch
):
    from ehrfm.training.run_logger import resolve_tracking_uri

    children = {p.pid for p in psutil.Process().children(recursive=True)}
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri(store, str(tmp_path)) == store  # explicit store: no server at all
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert resolve_tracking_uri(None, str(tmp_path)) == mlflow_server  # running: reused
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_server  # exported for what the driver starts
    assert {k: os.environ[k] for k in CLIENT_RETRY_ENV} == CLIENT_RETRY_ENV
    assert {p.pid for p in psutil.Process().children(recursive=True)} == children
    assert not local_server_is_the_session_server.exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_tracking_uri(None, "s3://bucket/runs") == "http://mlflow.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ValueError, match="s3://bucket/runs is remote"):
        resolve_tracking_uri(None, "s3://bucket/runs")


# ---- Ray Train + DeepSpeed runs -------------------------------------------------------------
@pytest.fixture(scope="module")
def timelines(tmp_path_factory):
    return write_timelines(tmp_path_factory.mktemp("pretrain-data"), persons=400, files=2)


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pretrain-runs")


def make_config(timelines, storage: Path, overrides: list[str]) -> PretrainConfig:
    cfg = load_config(PretrainConfig, SMALL, BASE_RUN + overrides)
    cfg.data.dir = str(timelines.root)
    cfg.run.storage_path = str(storage)
    return cfg


@pytest.fixture(scope="module")
def datasets(ray_cluster, timelines, storage):
    from ehrfm.training.pretrain import load_datasets

    return load_datasets(make_config(timelines, storage, []))


@pytest.fixture(scope="module")
def pretrain(datasets, timelines, storage, mlflow_server):
    """Run (or resume) a pretraining run named `name`; returns (result, final train_state)."""
    from ehrfm.training.pretrain import run_pretraining

    def run(name: str, *overrides: str):
        cfg = make_config(timelines, storage, [f"run.name={name}", f"mlflow.tracking_uri={mlflow_server}", *overrides])
        result = run_pretraining(cfg, datasets)
        state = json.loads((Path(result.checkpoint) / "train_state.json").read_text())
        return result, state

    return run


@pytest.fixture(scope="module")
def cross_zero3(pretrain):
    return pretrain("cross-zero3", "deepspeed.zero_stage=3", "model.fusion=cross")


@pytest.fixture(scope="module")
def prefix_zero2(pretrain):
    return pretrain("prefix-zero2", "deepspeed.zero_stage=2", "model.fusion=prefix")


def val_losses(state: dict) -> list[float]:
    return [point["val_loss"] for point in state["history"]]


def assert_learns(state: dict, vocab: int) -> None:
    losses = val_losses(state)
    assert [p["step"] for p in state["history"]] == [5, 10, 15, 20, 25, 30]
    assert losses[-1] < losses[0] - 0.25, losses  # validation loss falls ...
    assert losses[-1] < math.log(vocab) - 0.5, losses  # ... well below a uniform guess
    assert all(b < a + 0.02 for a, b in zip(losses, losses[1:])), losses


@pytest.mark.ray
def test_zero3_with_cross_attention_fusion_pretrains(cross_zero3, timelines, mlflow_server):
    result, state = cross_zero3
    assert_learns(state, timelines.vocab_size)
    assert state["step"] == 30 and state["restarts"] == 0 and state["tokens_seen"] > 30 * 16 * 20
    checkpoint = Path(result.checkpoint)
    assert sorted(p.name for p in checkpoint.parent.glob("checkpoint_0*")) == [
        "checkpoint_0000020",
        "checkpoint_0000030",
    ]
    weights = torch.load(checkpoint / "model.pt", weights_only=True)  # plain tensors, safe to load
    from ehrfm.training.checkpoint import DEEPSPEED_SAFE_GLOBALS

    shards = sorted((checkpoint / "deepspeed" / "state").glob("*.pt"))
    assert len(shards) == 4  # model + ZeRO-3 optimiser partition of each of the 2 ranks
    with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):  # what resuming loads, weights_only
        assert all(isinstance(torch.load(p, weights_only=True), dict) for p in shards)
    gates = [v.item() for k, v in weights.items() if k.endswith("cross.gate")]
    assert len(gates) == 2 and all(abs(g) > 1e-3 for g in gates)  # the cross-attention gates opened
    # Logged to MLflow by rank 0: params once, metrics on the step axis, throughput.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs(
        [client.get_experiment_by_name("ehrfm-pretrain").experiment_id],
        filter_string=f"tags.`ehrfm.run_dir` = '{result.run_dir}'",
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["config.deepspeed.zero_stage"] == "3" and run.data.params["world_size"] == "2"
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [5, 10, 15, 20, 25, 30]
    assert [m.value for m in history] == pytest.approx(val_losses(state))
    assert run.data.metrics["tokens_per_s"] > 0 and run.data.metrics["peak_memory_mb_max_worker"] > 0
    assert "mfu" not in run.data.metrics  # MFU is a GPU figure


@pytest.mark.ray
@pytest.mark.e2e
def test_zero2_with_prefix_fusion_pretrains(prefix_zero2, timelines):
    result, state = prefix_zero2
    assert_learns(state, timelines.vocab_size)
    assert result.metrics["step"] == 30 and result.metrics["val_loss"] == pytest.approx(val_losses(state)[-1])


def t2d_log_likelihood(model, batch: dict, prs: torch.Tensor) -> torch.Tensor:
    """Mean log p(T2D) over each person's real next-token positions."""
    with torch.no_grad():
        logits, _ = model(batch["tokens"], batch["ages"], prs, batch["has_prs"])
    logp = torch.log_softmax(logits.float(), dim=-1)[..., T2D_TOKEN]
    real = batch["targets"] != PAD_ID
    return (logp * real).sum(1) / real.sum(1)


@pytest.mark.ray
@pytest.mark.parametrize("run", ["cross_zero3", pytest.param("prefix_zero2", marks=pytest.mark.e2e)])
def test_pretrained_model_uses_the_prs_for_t2d(run, request, timelines):
    result, _ = request.getfixturevalue(run)
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


@pytest.mark.ray
@pytest.mark.e2e
def test_rerun_resumes_and_a_killed_worker_recovers_on_the_same_curve(pretrain, cross_zero3, storage, mlflow_server):
    _, reference = cross_zero3
    same = ["deepspeed.zero_stage=3", "model.fusion=cross"]
    first, state = pretrain("resumed", *same, "schedule.stop_at_step=15")
    assert state["step"] == 15 and val_losses(state) == pytest.approx(val_losses(reference)[:3], abs=1e-6)
    # Same run again (same storage path + name): resumes from step 15; rank 1 dies once before
    # step 22, FailureConfig restarts the worker group from the last registered checkpoint.
    result, state = pretrain("resumed", *same, "fault.kill_rank_at_step=22")
    marker = storage / "resumed" / ".fault_injected"
    assert marker.read_text().startswith("rank 1 killed before step 22")
    assert state["step"] == 30 and state["restarts"] >= 1
    # Tolerance: same losses to 1e-6 (data windows, RNG and optimiser state are all restored).
    assert val_losses(state) == pytest.approx(val_losses(reference), abs=1e-6)
    assert [p["train_loss"] for p in state["history"]] == pytest.approx(
        [p["train_loss"] for p in reference["history"]], abs=1e-6
    )
    assert state["tokens_seen"] == reference["tokens_seen"]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs(
        [client.get_experiment_by_name("ehrfm-pretrain").experiment_id],
        filter_string=f"tags.`ehrfm.run_dir` = '{result.run_dir}'",
    )
    assert len(runs) == 1  # one MLflow run across the three worker-group starts
    resumes = [m.value for m in client.get_metric_history(runs[0].info.run_id, "resumed_from_step")]
    assert len(resumes) == 2 and all(step in (15, 20) for step in resumes)  # from checkpoints, not step 0


@pytest.mark.ray
@pytest.mark.e2e
def test_ehr_only_model_then_prs_adapter(
    datasets, timelines, storage, mlflow_server, local_server_is_the_session_server
):
    from ehrfm.training.pretrain import main, run_pretraining

    base_storage = storage / "ehr-only"
    code = main(
        [
            "--config",
            str(SMALL),
            "--data",
            str(timelines.root),
            "--storage",
            str(base_storage),
            "--name",
            "ehr-only",
            "model.fusion=none",
            "deepspeed.zero_stage=2",
            "schedule.max_steps=20",
            "schedule.val_every=10",
            "schedule.checkpoint_every=10",
        ]
    )
    assert code == 0
    summary = json.loads((base_storage / "ehr-only" / "pretrain_result.json").read_text())
    base_checkpoint = Path(summary["checkpoint"])
    base_state = json.loads((base_checkpoint / "train_state.json").read_text())
    assert val_losses(base_state)[-1] < val_losses(base_state)[0]
    assert summary["tracking_uri"] == mlflow_server  # no URI set: the driver found the local server
    assert not local_server_is_the_session_server.exists()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs(
        [client.get_experiment_by_name("ehrfm-pretrain").experiment_id],
        filter_string=f"tags.`ehrfm.run_dir` = '{summary['run_dir']}'",
    )
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss")] == [10, 20]

    cfg = make_config(
        timelines,
        storage,
        [
            "run.name=adapter",
            f"run.init_from={base_checkpoint}",
            "mlflow.enabled=false",
            "model.fusion=cross",
            "model.adapter=true",
            "schedule.max_steps=20",
            "schedule.val_every=10",
            "schedule.checkpoint_every=10",
        ],
    )
    result = run_pretraining(cfg, datasets)
    base, adapted = load_state_dict(base_checkpoint), load_state_dict(result.checkpoint)
    prs_keys = {k for k in adapted if k not in base}
    assert prs_keys and all(".cross." in k or k.startswith(("prs_encoder.", "cross_memory.")) for k in prs_keys)
    for key, value in base.items():  # the EHR decoder is frozen: bit-identical weights
        assert torch.equal(adapted[key], value), key
    assert all(abs(adapted[k].item()) > 1e-3 for k in prs_keys if k.endswith("gate"))
    adapter_state = json.loads((Path(result.checkpoint) / "train_state.json").read_text())
    assert val_losses(adapter_state)[-1] < val_losses(base_state)[-1]  # the PRS adds information
