"""The Ray pipeline against independent routes to the same timelines, on a small synthetic cohort:
the single-process polars reference (same OMOP + PRS input), and the pipeline's own events fed back
in as a MEDS dataset. The first run uses Ray's hash shuffle (shuffle_v2); the other strategies must
reproduce its bytes."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ehrfm.preprocess.config import PreprocessConfig
from ehrfm.preprocess.job import PreprocessInputs, run_preprocess
from ehrfm.preprocess.tokenizer import Tokenizer
from ehrfm.prs.person import PrsInputs
from ehrfm_synthetic.cohort import main as synthesize
from tests.support.polars_reference import reference_timelines

pytestmark = pytest.mark.ray
CONFIG = PreprocessConfig.model_validate(
    {"subjects_per_shard": 60, "progress_bars": False, "tokenizer": {"min_count": 3}, "shuffle_strategy": "shuffle_v2"}
)


def _timelines(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "timelines").glob("part-*.parquet"))]).sort_by(
        "subject_id"
    )


@pytest.fixture(scope="module")
def cohort(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("synthetic")
    assert synthesize(["--persons", "150", "--seed", "7", "--num-pgs", "4", "--out", str(root / "cohort")]) == 0
    inputs = PreprocessInputs.from_cohort(root / "cohort")
    report = run_preprocess(CONFIG, inputs, root / "out")
    return {"root": root, "inputs": inputs, "out": root / "out", "report": report}


def test_ray_pipeline_equals_polars_reference(cohort: dict) -> None:
    inputs = cohort["inputs"]
    assert inputs.pcs and inputs.sample_map and inputs.prs.endswith("scores_wide.parquet")
    reference = reference_timelines(inputs.omop, CONFIG, PrsInputs(inputs.prs, inputs.sample_map, inputs.pcs))
    tok = Tokenizer.load(cohort["out"] / "tokenizer.json")
    assert tok.tokens == reference.tokens and tok.value_edges == reference.value_edges
    timelines = _timelines(cohort["out"])
    assert cohort["report"]["events"]["shards"] == 3 and timelines.num_rows == 150
    for column in timelines.column_names:
        assert timelines[column].equals(reference.timelines[column]), column
    assert reference.events == cohort["report"]["events"]["events"]
    assert cohort["report"]["prs"]["transform"]["ancestry_adjusted"] is True


def _assert_same_bytes(first: Path, second: Path, subs: tuple[str, ...]) -> None:
    for sub in subs:
        names = sorted(str(p.relative_to(first / sub)) for p in (first / sub).rglob("*.parquet"))
        assert names and names == sorted(str(p.relative_to(second / sub)) for p in (second / sub).rglob("*.parquet"))
        for name in names:
            assert (first / sub / name).read_bytes() == (second / sub / name).read_bytes(), f"{sub}/{name}"


@pytest.mark.parametrize("strategy", ["sort_shuffle_pull_based", "shard_files"])
def test_meds_input_gives_the_same_timelines(cohort: dict, strategy: str) -> None:
    config = CONFIG.model_copy(update={"shuffle_strategy": strategy})
    out = cohort["root"] / f"from_meds-{strategy}"
    inputs = cohort["inputs"]
    report = run_preprocess(
        config,
        PreprocessInputs(meds=str(cohort["out"]), prs=inputs.prs, sample_map=inputs.sample_map, pcs=inputs.pcs),
        out,
    )
    assert report["tables"]["meds"]["rows_quarantined"] == 0
    assert report["tables"]["meds"]["rows_in"] == cohort["report"]["events"]["events"]
    # also: the hash shuffle (first run) and this strategy agree byte for byte
    _assert_same_bytes(cohort["out"], out, ("data", "timelines"))


def test_shard_files_strategy_gives_the_hash_shuffle_bytes(cohort: dict) -> None:
    """Events staged in per-shard files instead of a Ray shuffle: the same files, tokenizer and report."""
    out = cohort["root"] / "shard_files"
    report = run_preprocess(CONFIG.model_copy(update={"shuffle_strategy": "shard_files"}), cohort["inputs"], out)
    _assert_same_bytes(cohort["out"], out, ("data", "prs", "timelines"))
    assert (out / "tokenizer.json").read_bytes() == (cohort["out"] / "tokenizer.json").read_bytes()
    first = {k: v for k, v in cohort["report"].items() if k != "seconds"}
    assert {k: v for k, v in report.items() if k != "seconds"} == first
    assert report["events"]["events"] > 0 and not (out / "_work").exists()


def test_command_line_with_the_default_config(cohort: dict, repo_root: Path, capsys: pytest.CaptureFixture) -> None:
    from ehrfm.cli import run_command

    out = cohort["root"] / "cli"
    args = [
        "--cohort",
        str(cohort["root"] / "cohort"),
        "--out",
        str(out),
        "--config",
        str(repo_root / "jobs/configs/preprocess-default.yaml"),
        "shuffle_strategy=sort_shuffle_pull_based",
        "progress_bars=false",
        "subjects_per_shard=60",
        "tokenizer.min_count=3",
    ]
    assert run_command("preprocess", args) == 0
    printed = capsys.readouterr().out
    assert "persons per split:" in printed and "PRS: 4 scores" in printed
    for name in sorted(p.name for p in (cohort["out"] / "timelines").glob("*.parquet")):
        assert (out / "timelines" / name).read_bytes() == (cohort["out"] / "timelines" / name).read_bytes()
    assert run_command("preprocess", ["--omop", str(cohort["root"] / "missing"), "--out", str(out)]) == 2
    assert "--omop" in capsys.readouterr().err and (out / "timelines").is_dir()
