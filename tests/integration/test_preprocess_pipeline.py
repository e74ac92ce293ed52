"""`ehrfm preprocess` on a hand-made OMOP cohort (csv and parquet, bad rows of every kind, PRS):
exact tokens, exact row account, no val/test leakage, a MEDS dataset that the `meds` package
validates (codes `<vocabulary>/<concept_code>` from the cohort's concept table, static codes with a
null time, held-out subjects only in data/held_out), identical bytes on a second run, and an atomic
output that a failed run leaves untouched."""

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

from ehrfm.meds.writer import MEDS_DATA_SCHEMA
from ehrfm.omop.files import OmopSchemaError
from ehrfm.omop.spec import CDM_TABLES
from ehrfm.preprocess.config import PreprocessConfig
from ehrfm.preprocess.job import PreprocessInputs, atomic_directory, run_preprocess
from ehrfm.preprocess.tokenizer import Tokenizer
from ehrfm.schemas import timeline_schema
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
    # a trimmed vocabulary: these concepts take the `<vocabulary>/<concept_code>` form, the others
    # (8507, 38003564, 1503297, ...) keep the id form; 441840 is only a parent (concept_ancestor)
    _csv(
        omop / "concept.csv",
        """
concept_id,concept_name,domain_id,vocabulary_id,concept_class_id,standard_concept,concept_code,valid_start_date,valid_end_date,invalid_reason
8532,FEMALE,Gender,Gender,Gender,S,F,1970-01-01,2099-12-31,
8527,White,Race,Race,Race,S,5,1970-01-01,2099-12-31,
9202,Outpatient Visit,Visit,Visit,Visit,S,OP,1970-01-01,2099-12-31,
201826,Type 2 diabetes mellitus,Condition,SNOMED,Clinical Finding,S,44054006,1970-01-01,2099-12-31,
441840,Clinical finding,Condition,SNOMED,Clinical Finding,S,404684003,1970-01-01,2099-12-31,
3004410,Hemoglobin A1c,Measurement,LOINC,Lab Test,S,4548-4,1970-01-01,2099-12-31,
""",
    )
    _csv(
        omop / "concept_ancestor.csv",
        """
ancestor_concept_id,descendant_concept_id,min_levels_of_separation,max_levels_of_separation
441840,201826,1,1
201826,201826,0,0
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
        ("Gender/F", 0),
        ("Race/5", 0),
        ("ETHNICITY/38003564", 0),
        ("GAP/1825D+", day),
        ("Visit/OP", day),
        ("SNOMED/44054006", day),
        ("LOINC/4548-4", day),
        ("Q2", day),
        ("VISIT_END/Visit/OP", day),
        ("GAP/1-6D", day + 2),
        ("DRUG/1503297", day + 2),
        ("GAP/365-729D", day + 517),
        ("SNOMED/44054006", day + 517),
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
        "concept": (6, 6, 0, {}),
        "concept_ancestor": (2, 2, 0, {}),
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
    assert tok.value_edges == {"LOINC/4548-4": [5.0, 6.0, 7.0]}  # train values 7, 5, 6, 8 only
    assert tok.code_counts["Visit/OP"] == 2  # P1 and P3; V1's and X1's visits are not counted
    assert tok.fit_summary["train_persons"] == 4
    unk = run["report"]["tokens"]["unk_tokens_by_split"]
    assert unk == {"train": 0, "val": 1, "test": 1}
    val = _person(run["out"], V1)
    assert [tok.tokens[t] for t in val["tokens"]].count("[UNK]") == 1


def test_output_is_a_meds_dataset_the_meds_package_validates(run: dict) -> None:
    out = run["out"]
    files = sorted(str(p.relative_to(out)) for p in (out / "data").rglob("*.parquet"))
    by_split: dict[str, set[int]] = {}
    for name in files:
        split = name.split("/")[1]
        data = pq.read_table(out / name)
        assert data.schema == MEDS_DATA_SCHEMA
        meds.DataSchema.validate(data)  # the data schema via its pyarrow schema; extra columns allowed
        assert data.schema.field("time").type == meds.DataSchema.schema().field("time").type
        subjects = data["subject_id"].to_pylist()
        times = [t or dt.datetime.min for t in data["time"].to_pylist()]  # static (null) rows first
        assert list(zip(subjects, times)) == sorted(zip(subjects, times))
        assert not set(subjects) & set().union(*by_split.values())  # a subject lives in one file
        by_split.setdefault(split, set()).update(subjects)
    assert sorted(by_split) == ["held_out", "train", "tuning"]
    assert by_split == {"train": {P1, P2, P3, P4}, "tuning": {V1}, "held_out": {X1}}
    data = pa.concat_tables([pq.read_table(out / n) for n in files])
    rows = data.to_pylist()
    static = [r for r in rows if r["time"] is None]
    # gender, race, ethnicity per person, null time; nothing else is static
    assert sorted((r["subject_id"], r["code"]) for r in static if r["subject_id"] == P1) == [
        (P1, "ETHNICITY/38003564"),
        (P1, "Gender/F"),
        (P1, "Race/5"),
    ]
    assert len(static) == 18 and {r["code"].split("/")[0] for r in static} == {
        "Gender",
        "GENDER",
        "Race",
        "RACE",
        "ETHNICITY",
    }
    birth = [r for r in rows if r["code"] == meds.birth_code and r["subject_id"] == P1]
    assert [r["time"] for r in birth] == [dt.datetime(1950, 1, 1)]
    codes = {r["code"]: r["concept_id"] for r in rows}
    assert codes["SNOMED/44054006"] == 201826 and codes["LOINC/4548-4"] == 3004410 and codes["Visit/OP"] == 9202
    assert codes["VISIT_END/Visit/OP"] == 9202 and codes["DRUG/1503297"] == 1503297 and codes["GENDER/8507"] == 8507
    assert codes[meds.birth_code] is None and "CONDITION/201826" not in codes
    in_visit_101 = data.filter(pa.compute.equal(data["visit_id"], 101))
    assert set(in_visit_101["visit_type"].to_pylist()) == {"9201"} and in_visit_101.num_rows == 4

    code_meta = pq.read_table(out / meds.code_metadata_filepath)
    meds.CodeMetadataSchema.validate(code_meta)
    assert set(code_meta["code"].to_pylist()) == set(codes)  # one row per code the data use
    meta = {r["code"]: r for r in code_meta.to_pylist()}
    assert meta["SNOMED/44054006"]["description"] == "Type 2 diabetes mellitus"
    assert meta["SNOMED/44054006"]["parent_codes"] == ["SNOMED/404684003"]
    assert (meta["Gender/F"]["concept_id"], meta["Gender/F"]["vocabulary_id"]) == (8532, "Gender")
    assert meta["DRUG/1503297"]["concept_id"] is None and meta["DRUG/1503297"]["parent_codes"] == []

    dataset = json.loads((out / meds.dataset_metadata_filepath).read_text())
    meds.DatasetMetadataSchema.validate(dataset)
    assert (dataset["etl_name"], dataset["meds_version"], dataset["dataset_name"]) == (
        "ehrfm",
        "0.4.1",
        run["root"].name,
    )
    assert dataset["etl_version"] and dt.datetime.fromisoformat(dataset["created_at"]).tzinfo is not None

    splits = pq.read_table(out / meds.subject_splits_filepath)
    meds.SubjectSplitSchema.validate(splits)
    assert {s: {r["subject_id"] for r in splits.to_pylist() if r["split"] == s} for s in by_split} == by_split
    assert not (out / "events").exists() and not (out / "splits.parquet").exists()


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
    splits = pq.read_table(out / meds.subject_splits_filepath).sort_by("subject_id")
    assert dict(zip(splits["subject_id"].to_pylist(), splits["split"].to_pylist()))[V1] == "tuning"
    assert run["report"]["tokens"]["per_person"]["p100"] == max(len(t) for t in timelines["tokens"].to_pylist())
    assert not list(out.glob("_work")) and not list(out.parent.glob(".out.tmp-*"))


def test_second_run_gives_identical_bytes(run: dict, tmp_path: Path) -> None:
    again = tmp_path / "again"
    run_preprocess(CONFIG, _inputs(run["root"]), again)
    for sub in ("timelines", "data", "prs"):
        first = sorted(str(p.relative_to(run["out"] / sub)) for p in (run["out"] / sub).rglob("*.parquet"))
        assert first and first == sorted(str(p.relative_to(again / sub)) for p in (again / sub).rglob("*.parquet"))
        for name in first:
            assert (run["out"] / sub / name).read_bytes() == (again / sub / name).read_bytes(), f"{sub}/{name}"
    for name in (meds.code_metadata_filepath, meds.subject_splits_filepath):
        assert (run["out"] / name).read_bytes() == (again / name).read_bytes(), name
    assert (run["out"] / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


def test_shard_files_strategy_gives_the_same_bytes_and_row_account(run: dict, tmp_path: Path) -> None:
    """Events staged in per-shard files instead of a Ray shuffle (the 1M-person route), bad rows included."""
    out = tmp_path / "shard_files"
    report = run_preprocess(CONFIG.model_copy(update={"shuffle_strategy": "shard_files"}), _inputs(run["root"]), out)
    for sub in ("timelines", "data", "prs", "quarantine"):
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
