"""The main job's stage bookkeeping: run, skip when inputs are unchanged, re-run when forced or changed."""

import json

from ehrfm.workflow import PipelineConfig, run_pipeline


def _fingerprints(records):
    return {name: record["fingerprint"] for name, record in records.items()}


def test_stages_run_once_then_skip_and_rerun_on_change(tmp_path, capsys):
    workdir = tmp_path / "run"
    cfg = PipelineConfig(persons=150, num_pgs=8)
    first = run_pipeline(cfg, workdir, until="validate")
    assert list(first) == ["synthesize", "score_prs", "validate"]
    assert first["score_prs"]["fingerprint"] == "disabled"  # PRS come finished in scores mode
    report = json.loads((workdir / "validation" / "validation_report.json").read_text())
    assert report["tables"]["person"]["rows_in"] == 150
    capsys.readouterr()

    second = run_pipeline(cfg, workdir, until="validate")
    assert _fingerprints(second) == _fingerprints(first)
    assert capsys.readouterr().out.count("up to date, skipped") == 2

    forced = run_pipeline(cfg, workdir, start_from="validate", until="validate")
    out = capsys.readouterr().out
    assert "synthesize: up to date" in out and "validate: running" in out
    assert _fingerprints(forced) == _fingerprints(first)

    changed = run_pipeline(PipelineConfig(persons=160, num_pgs=8), workdir, until="validate")
    out = capsys.readouterr().out
    assert "up to date" not in out
    assert changed["synthesize"]["fingerprint"] != first["synthesize"]["fingerprint"]
    # a changed upstream fingerprint changes the downstream one too
    assert changed["validate"]["fingerprint"] != first["validate"]["fingerprint"]
