"""The main job end to end on the session's Ray cluster and MLflow server: every stage runs, a champion is
registered, and a second run is cheap."""

import json
import socket

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ehrfm.small_counts import public_json
from ehrfm.workflow import PipelineConfig, run_pipeline

pytestmark = [pytest.mark.mlflow, pytest.mark.ray]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.e2e
def test_main_job_runs_every_stage_registers_a_champion_and_reruns_cheaply(
    tmp_path, ray_cluster, mlflow_server, monkeypatch, capsys
):
    """synthesize → … → pretrain → label → finetune → zero_shot → tune → evaluate → register → serve, tiny settings.

    Hypertension rather than T2D: its prevalence gives both classes in every split of a small cohort.
    """
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = PipelineConfig(
        persons=600,
        num_pgs=8,
        task="hypertension",
        n_boot=20,
        pretrain_overrides=[
            "schedule.max_steps=4",
            "schedule.log_every=2",
            "schedule.val_every=4",  # one validation and one checkpoint: each costs seconds of fixed overhead
            "schedule.checkpoint_every=4",
            "optim.warmup_steps=1",
        ],
        finetune_overrides=["train.epochs=1"],
        zero_shot_overrides=["n_samples=2", "max_new_tokens=8"],
        tune_samples=2,
        tune_overrides=["scheduler.max_epochs=1", "finetune.train.eval_batch_size=256"],
        serve_port=_free_port(),
        serve_smoke_persons=3,
    )
    workdir = tmp_path / "run"
    records = run_pipeline(cfg, workdir)
    assert [name for name, r in records.items() if r["fingerprint"] != "disabled"] == [
        "synthesize",
        "validate",
        "preprocess",
        "pretrain",
        "label",
        "finetune",
        "zero_shot",
        "tune",
        "evaluate",
        "register",
        "serve",
    ]

    report = json.loads((workdir / "evaluation" / "report.json").read_text())
    labels = pq.read_table(workdir / "labels" / "labels.parquet")
    predictions = pq.read_table(workdir / "finetune" / "predictions.parquet")
    test_rows = predictions.filter(pc.equal(predictions["split"], "test"))
    n_test, n_test_events = test_rows.num_rows, int(pc.sum(test_rows["label"]).as_py() or 0)
    # the report publishes person counts by the small-count rule (1..20 read "<=20")
    published = public_json({"n_test": n_test, "n_test_positive": n_test_events})
    assert report["n_test"] == published["n_test"]
    assert n_test < labels.num_rows
    # the sweep: the default fine-tune as its first trial plus one searched point; its winner is
    # the headline model, reported beside the default fine-tune with the paired tuning gain
    sweep = json.loads((workdir / "tune" / "sweep_result.json").read_text())
    assert len(sweep["trials"]) == 2 and sweep["registry"] is None  # the register stage registers
    default = sweep["default_trial"]["config"]  # the pipeline's own fine-tune, run as the first trial
    assert (default["model.mode"], default["optim.head_lr"]) == ("linear_probe", 3.0e-3)
    assert sweep["best_val_auroc"] == max(t["best_val_auroc"] for t in sweep["trials"])
    winner = pq.read_table(workdir / "tune" / "best" / "predictions.parquet").to_pandas()
    winner_test = winner[winner["split"] == "test"]
    assert len(winner_test) == n_test
    assert report["models"]["finetuned"]["n"] == public_json({"n": n_test, "n_positive": n_test_events})["n"]
    gain = report["comparisons"]["tuning_gain"]
    assert (gain["model"], gain["reference"]) == ("finetuned", "finetuned_default")
    assert gain["auroc_difference"] == pytest.approx(
        report["models"]["finetuned"]["auroc"] - report["models"]["finetuned_default"]["auroc"], abs=1e-9
    )
    for model in (
        "finetuned",
        "finetuned_prs_masked",
        "finetuned_default",
        "zero_shot_path_probability",
        "counts_lr",
        "prs_lr",
    ):
        low, value, high = (report["models"][model][k] for k in ("auroc_ci_low", "auroc", "auroc_ci_high"))
        assert 0.0 <= low <= value <= high <= 1.0, model
    assert "oracle_genetic" not in report["models"]  # the simulator's oracle is for T2D only

    registered = json.loads((workdir / "registry" / "registered.json").read_text())
    assert registered["name"] == "ehrfm-hypertension" and registered["promoted"] is True
    champion = MlflowClient(mlflow_server).get_model_version_by_alias("ehrfm-hypertension", "champion")
    assert int(champion.version) == registered["version"]
    assert float(champion.tags["val_auroc"]) == pytest.approx(registered["metric"])
    assert registered["metric"] == pytest.approx(sweep["metrics"]["val_auroc"])  # the sweep's winner was registered

    # stdout is not a terminal here: each stage's output is in its log, the console has one line per
    # stage outcome (+ heartbeats) and the summary table, the job's last lines (#19: < 300 lines)
    serve_log = (workdir / "logs" / "serve.log").read_text()
    assert "3/3 persons scored over HTTP match the registered model's own predictions" in serve_log
    console = capsys.readouterr().out.splitlines()
    assert len(console) < 300, len(console)
    summary = console[console.index("summary:") + 1 :]
    assert summary[0].split() == ["stage", "status", "time", "output"] and len(summary) == 1 + len(records)
    assert [row.split()[:2] for row in summary[1:]] == [
        [name, "disabled" if name == "score_prs" else "ran"] for name in records
    ]

    again = run_pipeline(cfg, workdir)
    assert capsys.readouterr().out.count("up to date, skipped") == 11
    assert {k: v["fingerprint"] for k, v in again.items()} == {k: v["fingerprint"] for k, v in records.items()}
