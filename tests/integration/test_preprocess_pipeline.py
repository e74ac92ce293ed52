"""`ehrfm preprocess` on a hand-made OMOP cohort (csv and parquet, bad rows of every kind, PRS):
exact tokens, exact row account, no val/test leakage, MEDS-valid events, identical bytes on a
second run, and an atomic output that a failed run leaves untouched."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import meds
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ehrfm.omop.files import OmopSchemaError
from ehrfm.omop.spec import CDM_TABLES
from ehrfm.preprocess.config import PreprocessConfig
from ehrfm.preprocess.job import PreprocessInputs, atomic_directory, run_preprocess
from ehrfm.preprocess.tokenizer import Tokenizer
from ehrfm.schemas import EVENT_SCHEMA, timeline_schema
from ehrfm.splits import split_codes

pytestmark = pytest.mark.ray
D, T = dt.date, dt.datetime
P1, P2, P3, P4, V1, X1 = 1, 3, 4, 5, 2, 23  # P*: train split, V1: val, X1: test (hash of the id)


def _typed(table: str, rows: list[dict]) -> pa.Table:
    names = list(rows[0])
    schema = pa.schema([CDM_TABLES[table].arrow_schema.field(n) for n in names])
    return pa.Table.from_pylist(rows, schema=schema)


def _csv(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.strip() + "\n", encoding="utf-8")


def write_cohort(root: Path) -> None:
    """The cohort: every quarantine reason at least once, a cross-file and an in-file duplicate."""
    omop = root / "omop"
    _csv(
        omop / "PERSON.csv",
        f"""
person_id,gender_concept_id,year_of_birth,month_of_birth,day_of_birth,birth_datetime,race_concept_id,ethnicity_concept_id
{P1},8532,1950,1,1,,8527,38003564
{P2},8507,1960,6,15,,8527,38003564
{P3},8532,1970,3,3,,8516,38003564
{P4},8507,1980,12,31,,8527,38003563
{V1},8532,1990,1,1,,8527,38003564
{X1},8507,1991,1,1,,8527,38003564
,8532,1950,1,1,,0,0
90,8532,19x0,1,1,,0,0
{P1},8532,1951,1,1,,0,0
91,8532,1950,1,1,yesterday,0,0
""",
    )
    _csv(
        omop / "death.csv",
        f"""
person_id,death_date,death_type_concept_id
{P2},2005-01-01,32817
77,2005-01-01,32817
{P2},2006-01-01,32817
""",
    )
    visit = [
        (100, P1, 9202, T(2000, 1, 1, 8), T(2000, 1, 1, 9)),
        (101, P2, 9201, T(2004, 1, 1), T(2004, 1, 5)),
        (102, P3, 9202, T(2010, 5, 5), T(2010, 5, 5)),
        (103, P2, 9202, T(2005, 3, 1), T(2005, 3, 1)),  # after death
        (104, P4, 9202, T(2012, 1, 10), T(2012, 1, 1)),  # ends before it starts
        (105, P1, 9202, T(1940, 1, 1), T(1940, 1, 1)),  # before birth
        (106, 55, 9202, T(2010, 1, 1), T(2010, 1, 1)),  # unknown person
        (107, V1, 9202, T(2015, 1, 1), T(2015, 1, 1)),
        (108, X1, 9202, T(2016, 1, 1), T(2016, 1, 1)),
    ]
    (omop / "visit_occurrence").mkdir(parents=True)
    pq.write_table(
        _typed(
            "visit_occurrence",
            [
                {
                    "visit_occurrence_id": i,
                    "person_id": p,
                    "visit_concept_id": c,
                    "visit_start_date": s.date(),
                    "visit_start_datetime": s,
                    "visit_end_date": e.date(),
                    "visit_end_datetime": e,
                    "visit_type_concept_id": 32817,
                }
                for i, p, c, s, e in visit
            ],
        ),
        omop / "visit_occurrence" / "part-00000.parquet",
    )
    header = "condition_occurrence_id,person_id,condition_concept_id,condition_start_date,condition_type_concept_id,visit_occurrence_id"
    _csv(
        omop / "condition_occurrence" / "part-00000.csv",
        f"""
{header}
1,{P1},201826,2000-01-01,32817,100
2,{P1},201826,2001-06-01,32817,
3,{P3},201826,2010-05-05,32817,102
4,{P3},320128,2010-13-45,32817,
5,{P3},320128,2010-05-05,32817,,surplus,fields
3,{P3},320128,2011-01-01,32817,
""",
    )
    _csv(
        omop / "condition_occurrence" / "part-00001.csv",
        f"""
{header}
2,{P2},201826,2004-01-02,32817,
9,{P2},4329847,2004-01-02,32817,101
10,{V1},777,2015-01-01,32817,107
""",
    )
    measurement = [
        (1, P1, 3004410, T(2000, 1, 1, 8, 30), 7.0, 100),
        (2, P2, 3004410, T(2004, 1, 2), 5.0, 101),
        (3, P3, 3004410, T(2010, 5, 5), 6.0, None),
        (4, P4, 3004410, T(2012, 1, 10), 8.0, None),
        (5, V1, 3004410, T(2015, 1, 1), 1e6, 107),
        (6, X1, 3004410, T(2016, 1, 1), -1e6, 108),
        (7, X1, 999999, T(2016, 1, 1), 3.0, 108),
        (8, P4, 3004410, T(2012, 1, 11), float("nan"), None),
    ]
    pq.write_table(
        _typed(
            "measurement",
            [
                {
                    "measurement_id": i,
                    "person_id": p,
                    "measurement_concept_id": c,
                    "measurement_date": t.date(),
                    "measurement_datetime": t,
                    "measurement_type_concept_id": 32817,
                    "value_as_number": v,
                    "visit_occurrence_id": vi,
                }
                for i, p, c, t, v, vi in measurement
            ],
        ),
        omop / "measurement.parquet",
    )
    pq.write_table(
        _typed(
            "drug_exposure",
            [
                {
                    "drug_exposure_id": 1,
                    "person_id": P1,
                    "drug_concept_id": 1503297,
                    "drug_exposure_start_date": D(2000, 1, 3),
                    "drug_exposure_end_date": D(2000, 1, 10),
                    "drug_type_concept_id": 32817,
                }
            ],
        ),
        omop / "drug_exposure.parquet",
    )
    prs = root / "prs"
    prs.mkdir()
    pq.write_table(
        pa.table(
            {
                "sample_id": ["S1", "S2", "S3", "S4", "SV", "SX"],
                "PGS_A": [1.0, 2.0, 3.0, 6.0, 500.0, 1.5],
                "PGS_B": [0.5, 0.5, 1.5, 1.5, -80.0, 0.0],
            }
        ),
        prs / "scores.parquet",
    )
    _csv(prs / "sample_map.tsv", f"sample_id\tperson_id\nS1\t{P1}\nS2\t{P2}\nS3\t{P3}\nS4\t{P4}\nSV\t{V1}\n")


CONFIG = PreprocessConfig.model_validate(
    {
        "tokenizer": {"min_count": 1, "value_bins": 4, "min_values_for_bins": 3},
        "subjects_per_shard": 2,
        "progress_bars": False,
        "batch_rows": 4,
        "shuffle_strategy": "sort_shuffle_pull_based",  # fast on tiny data; test_preprocess_equivalence runs the hash one
    }
)


def _inputs(root: Path) -> PreprocessInputs:
    return PreprocessInputs(
        omop=str(root / "omop"),
        prs=str(root / "prs" / "scores.parquet"),
        sample_map=str(root / "prs" / "sample_map.tsv"),
    )


@pytest.fixture(scope="module")
def run(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("cohort")
    write_cohort(root)
    out = root / "out"
    report = run_preprocess(CONFIG, _inputs(root), out)
    return {"root": root, "out": out, "report": report}


def _timelines(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "timelines").glob("part-*.parquet"))]).sort_by(
        "subject_id"
    )


def _person(out: Path, subject: int) -> dict:
    table = _timelines(out)
    return table.filter(pa.compute.equal(table["subject_id"], subject)).to_pylist()[0]


def test_hand_made_person_round_trips_to_exact_tokens(run: dict) -> None:
    assert split_codes(np.array([P1, P2, P3, P4, V1, X1]), CONFIG.splits.ratios, 0).tolist() == [0, 0, 0, 0, 1, 2]
    tok = Tokenizer.load(run["out"] / "tokenizer.json")
    row = _person(run["out"], P1)
    day = (D(2000, 1, 1) - D(1950, 1, 1)).days
    expected = [
        ("[BOS]", 0),
        ("GENDER/8532", 0),
        ("RACE/8527", 0),
        ("ETHNICITY/38003564", 0),
        ("GAP/1825D+", day),
        ("VISIT/9202", day),
        ("CONDITION/201826", day),
        ("MEASUREMENT/3004410", day),
        ("Q2", day),
        ("VISIT_END/9202", day),
        ("GAP/1-6D", day + 2),
        ("DRUG/1503297", day + 2),
        ("GAP/365-729D", day + 517),
        ("CONDITION/201826", day + 517),
        ("[EOS]", day + 517),
    ]
    assert [(tok.tokens[t], a) for t, a in zip(row["tokens"], row["ages"])] == expected
    assert row["split"] == "train" and row["birth_date"] == D(1950, 1, 1)
    dead = [(tok.tokens[t], a) for t, a in zip(*(_person(run["out"], P2)[k] for k in ("tokens", "ages")))]
    assert dead[-2:] == [("MEDS_DEATH", (D(2005, 1, 1) - D(1960, 6, 15)).days)] * 1 + [
        ("[EOS]", (D(2005, 1, 1) - D(1960, 6, 15)).days)
    ]


def test_row_account_is_exact_for_every_reason(run: dict) -> None:
    tables = run["report"]["tables"]
    got = {t: (a["rows_in"], a["rows_kept"], a["rows_quarantined"], a["by_reason"]) for t, a in tables.items()}
    assert got == {
        "person": (
            10,
            6,
            4,
            {"missing_person_id": 1, "unparsable_date": 1, "unparsable_number": 1, "duplicate_primary_key": 1},
        ),
        "death": (3, 1, 2, {"unknown_person_id": 1, "duplicate_primary_key": 1}),
        "visit_occurrence": (
            9,
            5,
            4,
            {"unknown_person_id": 1, "end_before_start": 1, "before_birth": 1, "after_death": 1},
        ),
        "condition_occurrence": (9, 5, 4, {"malformed_row": 1, "unparsable_date": 1, "duplicate_primary_key": 2}),
        "drug_exposure": (1, 1, 0, {}),
        "measurement": (8, 7, 1, {"unparsable_number": 1}),
    }
    assert tables["condition_occurrence"]["cross_file_key_check"] is True
    quarantine = run["out"] / "quarantine"
    written = {t: sum(pq.read_metadata(p).num_rows for p in (quarantine / t).glob("*.parquet")) for t in tables}
    assert written == {t: a["rows_quarantined"] for t, a in tables.items()}
    dupes = pa.concat_tables(
        [
            pq.read_table(p, columns=["reason", "source_file"])
            for p in (quarantine / "condition_occurrence").glob("*duplicates*")
        ]
    )
    assert sorted(dupes["source_file"].to_pylist()) == ["part-00000.csv", "part-00001.csv"]
    assert run["report"]["events"]["events"] == sum(a["events"] for a in tables.values())


def test_vocabulary_and_bins_see_no_val_or_test_person(run: dict) -> None:
    tok = Tokenizer.load(run["out"] / "tokenizer.json")
    assert "CONDITION/777" not in tok.tokens and "MEASUREMENT/999999" not in tok.tokens
    assert tok.value_edges == {"MEASUREMENT/3004410": [5.0, 6.0, 7.0]}  # train values 7, 5, 6, 8 only
    assert tok.code_counts["VISIT/9202"] == 2  # P1 and P3; V1's and X1's visits are not counted
    assert tok.fit_summary["train_persons"] == 4
    unk = run["report"]["tokens"]["unk_tokens_by_split"]
    assert unk == {"train": 0, "val": 1, "test": 1}
    val = _person(run["out"], V1)
    assert [tok.tokens[t] for t in val["tokens"]].count("[UNK]") == 1


def test_events_are_valid_sorted_meds(run: dict) -> None:
    shards = sorted((run["out"] / "events").glob("*.parquet"))
    assert [p.name for p in shards] == [f"part-{s:05d}.parquet" for s in range(3)]
    seen = set()
    for path in shards:
        events = pq.read_table(path)
        assert events.schema == EVENT_SCHEMA
        meds.DataSchema.validate(events)
        keys = list(zip(events["subject_id"].to_pylist(), events["time"].to_pylist()))
        assert keys == sorted(keys)
        subjects = set(events["subject_id"].to_pylist())
        assert not subjects & seen
        seen |= subjects
    assert seen == {P1, P2, P3, P4, V1, X1}
    events = pa.concat_tables([pq.read_table(p) for p in shards])
    in_visit_101 = events.filter(pa.compute.equal(events["visit_id"], 101))
    assert set(in_visit_101["visit_type"].to_pylist()) == {"9201"} and in_visit_101.num_rows == 4


def test_prs_z_scored_on_train_persons(run: dict) -> None:
    out = run["out"]
    assert json.loads((out / "prs" / "pgs_ids.json").read_text()) == ["PGS_A", "PGS_B"]
    train = np.array([[1.0, 0.5], [2.0, 0.5], [3.0, 1.5], [6.0, 1.5]])
    z = (np.array([[1.0, 0.5], [500.0, -80.0]]) - train.mean(axis=0)) / train.std(axis=0)
    p1, v1, x1 = (_person(out, s) for s in (P1, V1, X1))
    assert np.allclose(p1["prs"], z[0], atol=1e-6) and np.allclose(v1["prs"], z[1], rtol=1e-6)
    assert (p1["has_prs"], v1["has_prs"], x1["has_prs"], x1["prs"]) == (True, True, False, [0.0, 0.0])
    prs = run["report"]["prs"]
    assert (prs["samples_in"], prs["samples_kept"], prs["excluded_by_reason"]) == (6, 5, {"unmapped_sample": 1})


def test_manifest_and_report(run: dict) -> None:
    out = run["out"]
    manifest = json.loads((out / "timelines" / "manifest.json").read_text())
    tok = Tokenizer.load(out / "tokenizer.json")
    assert (manifest["vocab_size"], manifest["num_pgs"], manifest["pgs_ids"]) == (tok.vocab_size, 2, ["PGS_A", "PGS_B"])
    assert manifest["tokenizer_version"] == tok.version
    assert manifest["counts"]["persons_by_split"] == {"train": 4, "val": 1, "test": 1}
    timelines = _timelines(out)
    assert timelines.schema == timeline_schema(2) and timelines.num_rows == 6
    assert manifest["counts"]["tokens"] == sum(len(t) for t in timelines["tokens"].to_pylist())
    assert all(len(t) == len(a) for t, a in zip(timelines["tokens"].to_pylist(), timelines["ages"].to_pylist()))
    inputs = manifest["input_checksums"]["sha256"]
    assert str(run["root"] / "omop" / "PERSON.csv") in inputs and all(len(v) == 64 for v in inputs.values())
    splits = pq.read_table(out / "splits.parquet").sort_by("subject_id")
    assert dict(zip(splits["subject_id"].to_pylist(), splits["split"].to_pylist()))[V1] == "val"
    assert run["report"]["tokens"]["per_person"]["p100"] == max(len(t) for t in timelines["tokens"].to_pylist())
    assert not list(out.glob("_work")) and not list(out.parent.glob(".out.tmp-*"))


def test_second_run_gives_identical_bytes(run: dict, tmp_path: Path) -> None:
    again = tmp_path / "again"
    run_preprocess(CONFIG, _inputs(run["root"]), again)
    for sub in ("timelines", "events", "prs"):
        first = sorted(p.name for p in (run["out"] / sub).glob("*.parquet"))
        assert first == sorted(p.name for p in (again / sub).glob("*.parquet"))
        for name in first:
            assert (run["out"] / sub / name).read_bytes() == (again / sub / name).read_bytes(), f"{sub}/{name}"
    assert (run["out"] / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


def test_shard_files_strategy_gives_the_same_bytes_and_row_account(run: dict, tmp_path: Path) -> None:
    """Events staged in per-shard files instead of a Ray shuffle (the 1M-person route), bad rows included."""
    out = tmp_path / "shard_files"
    report = run_preprocess(CONFIG.model_copy(update={"shuffle_strategy": "shard_files"}), _inputs(run["root"]), out)
    for sub in ("timelines", "events", "prs", "quarantine"):
        first = sorted(str(p.relative_to(run["out"])) for p in (run["out"] / sub).rglob("*.parquet"))
        assert first and first == sorted(str(p.relative_to(out)) for p in (out / sub).rglob("*.parquet"))
        for name in first:
            assert (run["out"] / name).read_bytes() == (out / name).read_bytes(), name
    assert (run["out"] / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    assert report["tables"] == run["report"]["tables"] and report["events"] == run["report"]["events"]
    assert report["tokens"] == run["report"]["tokens"] and not list(out.glob("_work"))


def test_failed_run_leaves_previous_output_untouched(run: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker.txt").write_text("previous run")
    omop = tmp_path / "omop"
    omop.mkdir()
    (omop / "death.csv").write_text("person_id,death_date\n1,2000-01-01\n")
    with pytest.raises(OmopSchemaError, match="no person table"):
        run_preprocess(CONFIG, PreprocessInputs(omop=str(omop)), out)
    assert sorted(p.name for p in out.iterdir()) == ["marker.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["omop", "out"]
    with pytest.raises(FileNotFoundError, match="--prs"):
        run_preprocess(CONFIG, PreprocessInputs(omop=str(omop), prs=str(tmp_path / "nope.parquet")), out)


def test_atomic_directory_replaces_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("half-written")
        raise RuntimeError("stage failed")
    assert (out / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_directory(out) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    # a killed process leaves only its hidden temp directory; `out` stays the last complete run
    script = (
        f"import time; from pathlib import Path; from ehrfm.preprocess.job import atomic_directory\n"
        f"with atomic_directory(Path({str(out)!r})) as tmp:\n"
        f"    (tmp / 'c.txt').write_text('partial'); print('inside', flush=True); time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "inside"
    process.kill()
    process.wait(timeout=30)
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert [p.name.startswith(".out.tmp-") for p in tmp_path.iterdir() if p.name != "out"] == [True]


@pytest.mark.mlflow
def test_counts_logged_to_mlflow_when_a_tracking_uri_is_set(run: dict, mlflow_server: str, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from ehrfm.preprocess.report import log_to_mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert log_to_mlflow(run["report"], {"tokenizer.min_count": 1}) is False
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("EHRFM_PREPROCESS_EXPERIMENT", "preprocess-test")
    assert log_to_mlflow(run["report"], {"tokenizer.min_count": 1}) is True
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("preprocess-test")
    [logged] = client.search_runs([experiment.experiment_id])
    metrics = logged.data.metrics
    assert metrics["rows_in.person"] == 10 and metrics["rows_quarantined.condition_occurrence"] == 4
    assert metrics["persons.train"] == 4 and metrics["tokens"] == run["report"]["tokens"]["total"]
    assert logged.data.params == {"tokenizer.min_count": "1"}
    assert (run["out"] / "summary.txt").read_text().startswith("table")


def test_schema_error_inside_a_ray_task_is_a_clear_message(ray_cluster, tmp_path: Path, capsys) -> None:
    from ehrfm.cli import run_command

    omop = tmp_path / "omop"
    _csv(
        omop / "person.csv",
        "person_id,gender_concept_id,year_of_birth,race_concept_id,ethnicity_concept_id\n1,8507,1970,0,0",
    )
    _csv(
        omop / "measurement.csv", "measurement_id,person_id,measurement_concept_id,measurement_type_concept_id\n1,1,3,4"
    )
    args = [
        "--omop",
        str(omop),
        "--out",
        str(tmp_path / "out"),
        "progress_bars=false",
        "shuffle_strategy=sort_shuffle_pull_based",
    ]
    assert run_command("preprocess", args) == 2
    lines = capsys.readouterr().err.splitlines()  # Ray's own log lines come too
    assert (
        "ehrfm preprocess: measurement.csv: measurement.measurement_date: "
        "required CDM v5.4 column missing from the header"
    ) in lines
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["omop"]
