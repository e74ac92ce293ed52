"""The main job's stage bookkeeping: run, skip when inputs are unchanged, re-run when forced or changed."""

import json

import pytest

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


STAGE_ORDER = [
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


class Recorder:
    """A stand-in for the `ehrfm` commands: records what ran (the bookkeeping is what is tested)."""

    def __init__(self, fail: str | None = None):
        self.ran: list[str] = []
        self.fail = fail

    def __call__(self, command, args):
        self.ran.append(command)
        if command == self.fail:
            print('Traceback (most recent call last):\n  File "x.py", line 1\nsome progress 40%|####  | 4/10\r')
            raise SystemExit(f"ehrfm {command}: model.layers must be positive (got -1)")
        return 0


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_a_config_edit_in_place_reruns_that_stage_and_every_later_one(tmp_path, repo_root, capsys, monkeypatch):
    from ehrfm.workflow import stage_plan

    monkeypatch.chdir(repo_root)  # the config paths are relative to the checkout, as in `make run`
    pretrain_yaml = tmp_path / "pretrain.yaml"
    pretrain_yaml.write_text((repo_root / "jobs/configs/pretrain-cpu-small.yaml").read_text())
    finetune_yaml = tmp_path / "finetune.yaml"
    finetune_yaml.write_text((repo_root / "jobs/configs/finetune-t2d.yaml").read_text())
    tune_yaml = tmp_path / "tune.yaml"  # names its base fine-tune config inside the YAML
    tune_yaml.write_text(
        (repo_root / "jobs/configs/tune-t2d.yaml")
        .read_text()
        .replace("finetune_config: jobs/configs/finetune-t2d.yaml", f"finetune_config: {finetune_yaml}")
    )
    cfg = PipelineConfig(persons=50, pretrain_config=str(pretrain_yaml), tune_config=str(tune_yaml))
    workdir = tmp_path / "run"
    first = Recorder()
    records = run_pipeline(cfg, workdir, runner=first)
    assert first.ran == STAGE_ORDER
    assert str(pretrain_yaml.resolve()) in records["pretrain"]["configs"]
    assert str(finetune_yaml.resolve()) in records["tune"]["configs"]  # a config named by a config

    # unchanged: nothing is due, nothing runs
    assert set(stage_plan(cfg, workdir).values()) == {"up to date", "disabled"}
    again = Recorder()
    run_pipeline(cfg, workdir, runner=again)
    assert again.ran == []
    capsys.readouterr()

    # model.layers edited at the same path: pretrain and every stage after it, not those before
    _edit(pretrain_yaml, "layers: 2", "layers: 3")
    plan = stage_plan(cfg, workdir)
    due = [name for name in STAGE_ORDER if plan[name] == "due"]
    assert due == ["pretrain", "finetune", "zero_shot", "tune", "evaluate", "register", "serve"]
    edited = Recorder()
    run_pipeline(cfg, workdir, runner=edited)
    assert edited.ran == due
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == 4  # synthesize, validate, preprocess, label

    # a config another config names (tune's YAML -> its base fine-tune YAML): tune and what reads it
    _edit(finetune_yaml, "unfrozen_layers: 0", "unfrozen_layers: 1")
    plan = stage_plan(cfg, workdir)
    assert [name for name in STAGE_ORDER if plan[name] == "due"] == ["tune", "evaluate", "register", "serve"]
    assert stage_plan(cfg, workdir, start_from="label")["synthesize"] == "up to date"
    run_pipeline(cfg, workdir, runner=Recorder())

    # an output changed after its stage finished (a file added, deleted or rewritten): due again
    (workdir / "labels" / "stray.parquet").write_bytes(b"x")
    plan = stage_plan(cfg, workdir)
    assert [name for name in STAGE_ORDER if plan[name] == "due"] == [
        "label",
        "finetune",
        "zero_shot",
        "tune",
        "evaluate",
        "register",
        "serve",
    ]


def test_a_failing_stage_ends_the_job_with_the_summary_and_its_error_last(tmp_path, capsys):
    from ehrfm.workflow import StageFailed

    workdir = tmp_path / "run"
    with pytest.raises(StageFailed, match="stage label failed: ehrfm label: model.layers must be positive"):
        run_pipeline(PipelineConfig(persons=50), workdir, runner=Recorder(fail="label"))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "error (label): ehrfm label: model.layers must be positive (got -1)"
    table = {line.split()[0]: line.split()[1] for line in lines[lines.index("summary:") + 2 : -1]}
    assert table == {
        "synthesize": "ran",
        "score_prs": "disabled",
        "validate": "ran",
        "preprocess": "ran",
        "pretrain": "ran",
        "label": "failed",
        "finetune": "not",
        "zero_shot": "not",
        "tune": "not",
        "evaluate": "not",
        "register": "not",
        "serve": "not",
    }
    assert any(line.startswith("[6/12] label: FAILED after") for line in lines)
    # the stage's own output is in its log, not on the console
    assert "Traceback" not in "\n".join(lines)
    assert "40%|" in (workdir / "logs" / "label.log").read_text()
    assert not (workdir / "labels" / "_stage.json").exists()  # a failed stage is never up to date


def test_last_meaningful_line_skips_traceback_chrome_and_progress_bars():
    from ehrfm.workflow.console import last_meaningful_line

    text = (
        'loading\nTraceback (most recent call last):\n  File "a.py", line 3, in f\n    g()\n    ^^^\n'
        "ValueError: pretrain.yaml: model.layers must be positive\n\x1b[2mbatches  40%|####  | 4/10\x1b[0m\r\n\n"
    )
    assert last_meaningful_line(text) == "ValueError: pretrain.yaml: model.layers must be positive"
    assert last_meaningful_line("\n \n") == ""


def test_on_a_terminal_outcomes_start_a_fresh_line_and_quiet_settings_are_only_defaults(tmp_path, monkeypatch):
    import io
    import os

    from ehrfm.workflow.console import QUIET_ENV, Console, quiet_environment

    stream = io.StringIO()
    console = Console(tmp_path, stream=stream, capture=False)
    stream.write("batches  40%|####  | 4/10")  # a progress bar left mid-line
    console.line("[5/12] pretrain: done in 3.0s", fresh=True)
    assert stream.getvalue().splitlines()[-1] == "[5/12] pretrain: done in 3.0s"

    for key in QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")  # the user's choice is kept
    applied = quiet_environment()
    assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1" and os.environ["RAY_DEDUP_LOGS"] == "0"
    assert "RAY_DEDUP_LOGS" not in applied and set(applied) == set(QUIET_ENV) - {"RAY_DEDUP_LOGS"}


def test_a_usage_error_exit_names_the_commands_own_message_not_its_exit_code(tmp_path, capsys):
    import sys

    from ehrfm.workflow import StageFailed

    def runner(command, args):
        if command == "validate":
            print("ehrfm validate: error: --omop: no such directory", file=sys.stderr)
            raise SystemExit(2)  # what argparse does
        return 0

    with pytest.raises(StageFailed):
        run_pipeline(PipelineConfig(persons=50), tmp_path / "run", runner=runner)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "error (validate): ehrfm validate: error: --omop: no such directory"
    assert "[3/12] validate: FAILED after" in "\n".join(lines)


def test_a_logging_handler_made_in_one_stage_writes_into_the_next_stages_log(tmp_path):
    """Ray's loggers get their handler on first use, inside some stage; after that stage's log file
    is closed the handler must still work (no '--- Logging error ---'), writing where output goes now."""
    import io
    import logging

    from ehrfm.workflow.console import Console

    console = Console(tmp_path, stream=io.StringIO(), capture=True)
    logger = logging.getLogger("ehrfm-test-stage-logger")
    logger.propagate = False
    try:
        with console.stage_output("first", "[1/2] first"):
            logger.addHandler(logging.StreamHandler())  # binds to sys.stderr as it is during the stage
            logger.warning("record of the first stage")
        with console.stage_output("second", "[2/2] second"):
            logger.warning("record of the second stage")
    finally:
        logger.handlers.clear()
    first, second = (console.log_path(s).read_text() for s in ("first", "second"))
    assert "record of the first stage" in first and "record of the second stage" not in first
    assert "record of the second stage" in second and "Logging error" not in second
