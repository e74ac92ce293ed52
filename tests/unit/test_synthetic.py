"""The synthetic biobank cohort: determinism, CDM shape, concepts, PRS formats, truth, oracle (Ray tasks:
tests/integration; the default cohort's calibration targets: tests/e2e)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from ehrfm_synthetic import concepts as cc
from ehrfm_synthetic.cohort import load_synth_config, main, synthesize
from ehrfm_synthetic.figures import cohort_figures, prediction_times, read_part, table_parts
from ehrfm_synthetic.omop import CDM_COLUMNS, CLINICAL_TABLES
from ehrfm_synthetic.oracle import oracle_t2d_risk
from ehrfm_synthetic.time import from_datetime64
from ehrfm_synthetic.truth import load_truth

REPO = Path(__file__).resolve().parents[2]

SYNTHEA = Path("synthea27nj_omop54/parquet/Synthea27NjParquet")


def _generate(out: Path, *extra: str) -> dict:
    assert main(["--out", str(out), *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


def _table(out: Path, name: str, columns: list[str] | None = None) -> pa.Table:
    return pa.concat_tables([read_part(p, columns) if columns else pq.read_table(p) for p in table_parts(out, name)])


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """2,000 persons in 3 chunks: big enough for rates, small enough to be fast."""
    out = tmp_path_factory.mktemp("cohort")
    _generate(out, "--persons", "2000", "--seed", "11", "--chunk-size", "700", "--num-pgs", "24")
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small")
    _generate(out, "--persons", "300", "--seed", "5", "--chunk-size", "120", "--num-pgs", "8")
    return out


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(small, tmp_path):
    _generate(tmp_path / "again", "--persons", "300", "--seed", "5", "--chunk-size", "120", "--num-pgs", "8")
    first, second = _files(small), _files(tmp_path / "again")
    assert len(first) > 30 and first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    _generate(tmp_path / "other", "--persons", "300", "--seed", "6", "--chunk-size", "120", "--num-pgs", "8")
    other = _files(tmp_path / "other")
    assert other["omop/person/part-00000.parquet"] != first["omop/person/part-00000.parquet"]


def test_tables_have_the_cdm_v54_columns_of_real_omop_data(cohort, shared_data):
    for name in (*CLINICAL_TABLES, "concept"):
        parts = table_parts(cohort, name)
        assert parts, name
        ours = pq.read_schema(parts[0])
        real = pq.read_schema(shared_data / SYNTHEA / f"{name}.parquet")
        assert ours.names == real.names, name
        for field in ours:
            expected = real.field(field.name).type
            if field.name.endswith("_concept_id"):
                assert field.type == pa.int32(), (name, field.name)
            elif pa.types.is_integer(expected):
                assert pa.types.is_integer(field.type), (name, field.name)
            elif pa.types.is_decimal(expected):
                assert field.type == pa.float64(), (name, field.name)
            else:
                assert field.type == expected, (name, field.name, field.type, expected)


def test_person_ids_are_large_unique_int64_and_dates_realistic(cohort):
    person = _table(cohort, "person")
    ids = person.column("person_id").to_numpy()
    assert person.schema.field("person_id").type == pa.int64()
    assert len(np.unique(ids)) == len(ids) == 2000 and ids.min() > 10**9
    years = person.column("year_of_birth").to_numpy()
    assert years.min() >= 1930 and years.max() <= 2005 and years.std() > 10
    assert set(person.column("gender_concept_id").to_pylist()) == {cc.MALE, cc.FEMALE}
    period = _table(cohort, "observation_period")
    start = period.column("observation_period_start_date").cast(pa.int32()).to_numpy()
    end = period.column("observation_period_end_date").cast(pa.int32()).to_numpy()
    assert np.all(start <= end)
    assert start.min() >= np.datetime64("2000-01-01").astype(int) and end.max() <= np.datetime64("2024-12-31").astype(
        int
    )
    assert np.array_equal(np.sort(period.column("person_id").to_numpy()), np.sort(ids))


def test_visits_and_events_lie_inside_the_observation_period(cohort):
    period = _table(cohort, "observation_period")
    pid = period.column("person_id").to_numpy()
    order = np.argsort(pid)
    start = period.column("observation_period_start_date").cast(pa.int32()).to_numpy()[order]
    end = period.column("observation_period_end_date").cast(pa.int32()).to_numpy()[order]
    checks = {"visit_occurrence": ("visit_start_date", "visit_end_date"), "measurement": ("measurement_date",) * 2,
              "condition_occurrence": ("condition_start_date",) * 2, "death": ("death_date",) * 2}  # fmt: skip
    for name, (first, last) in checks.items():
        table = _table(cohort, name)
        row = np.searchsorted(pid[order], table.column("person_id").to_numpy())
        assert np.all(pid[order][row] == table.column("person_id").to_numpy()), name
        assert np.all(table.column(first).cast(pa.int32()).to_numpy() >= start[row]), name
        assert np.all(table.column(last).cast(pa.int32()).to_numpy() <= end[row]), name
    visits = _table(cohort, "visit_occurrence")
    assert set(visits.column("visit_concept_id").to_pylist()) == {cc.INPATIENT, cc.OUTPATIENT, cc.EMERGENCY}
    assert set(visits.column("visit_type_concept_id").to_pylist()) == {cc.EHR_TYPE}
    assert np.all(visits.column("visit_end_datetime").to_numpy() >= visits.column("visit_start_datetime").to_numpy())
    events = _table(cohort, "measurement", ["visit_occurrence_id"]).column("visit_occurrence_id").to_numpy()
    assert np.isin(events, visits.column("visit_occurrence_id").to_numpy()).all()


def test_every_concept_used_is_in_the_concept_table(cohort):
    known = set(_table(cohort, "concept").column("concept_id").to_pylist())
    used: set[int] = set()
    for name in CLINICAL_TABLES:
        table = _table(cohort, name)
        for column in table.column_names:
            if column.endswith("_concept_id"):
                used.update(v for v in table.column(column).to_pylist() if v is not None)
    assert used - known == set()
    assert {cc.T2D, cc.HYPERTENSION, cc.OBESITY, cc.CAD, cc.COPD, cc.METFORMIN, cc.HBA1C, cc.GLUCOSE, cc.BMI} <= used
    assert len(used) > 1000


def test_measurements_carry_values_units_and_ranges(cohort):
    m = _table(cohort, "measurement", ["measurement_concept_id", "value_as_number", "unit_concept_id", "range_low"])
    concept = m.column("measurement_concept_id").to_numpy()
    value = m.column("value_as_number").to_numpy(zero_copy_only=False)
    unit = m.column("unit_concept_id").to_numpy()
    for key, expected_unit, low, high in ((cc.HBA1C, cc.UNIT_PERCENT, 4.0, 12.0), (cc.GLUCOSE, cc.UNIT_MG_DL, 50, 350),
                                          (cc.BMI, cc.UNIT_KG_M2, 14.0, 70.0)):  # fmt: skip
        rows = concept == key
        assert rows.sum() > 100 and set(unit[rows]) == {expected_unit}
        assert np.all(np.isfinite(value[rows])) and low <= np.median(value[rows]) <= high
    assert np.isfinite(m.column("range_low").to_numpy(zero_copy_only=False)[concept == cc.HBA1C]).all()
    obs = _table(cohort, "observation", ["observation_concept_id", "value_as_concept_id"])
    smoking = obs.filter(pc.equal(obs.column("observation_concept_id"), cc.SMOKING_STATUS))
    assert set(smoking.column("value_as_concept_id").to_pylist()) == {
        cc.NEVER_SMOKER,
        cc.FORMER_SMOKER,
        cc.CURRENT_SMOKER,
    }


def test_treatment_follows_diagnosis(cohort):
    cond = _table(cohort, "condition_occurrence", ["person_id", "condition_concept_id", "condition_start_date"])
    drug = _table(cohort, "drug_exposure", ["person_id", "drug_concept_id", "drug_exposure_start_date"])
    t2d = cond.filter(pc.equal(cond.column("condition_concept_id"), cc.T2D))
    met = drug.filter(pc.equal(drug.column("drug_concept_id"), cc.METFORMIN))
    first_dx = {}
    for p, d in zip(
        t2d.column("person_id").to_pylist(), t2d.column("condition_start_date").cast(pa.int32()).to_pylist()
    ):
        first_dx[p] = min(d, first_dx.get(p, d))
    met_people = met.column("person_id").to_numpy()
    met_days = met.column("drug_exposure_start_date").cast(pa.int32()).to_numpy()
    assert len(met_people) > 100
    assert all(p in first_dx and day >= first_dx[p] for p, day in zip(met_people.tolist(), met_days.tolist()))


def test_hba1c_drifts_up_before_true_t2d_onset(cohort):
    truth = load_truth(cohort)
    m = _table(cohort, "measurement", ["person_id", "measurement_concept_id", "measurement_date", "value_as_number"])
    m = m.filter(pc.equal(m.column("measurement_concept_id"), cc.HBA1C))
    rows = truth.rows_of(m.column("person_id").to_numpy())
    onset = truth.inputs.onsets["t2d"][rows]
    years_before = (onset - m.column("measurement_date").cast(pa.int32()).to_numpy()) / 365.25
    value = m.column("value_as_number").to_numpy()
    cases = np.isfinite(onset)
    early = value[cases & (years_before > 6) & (years_before <= 20)]
    late = value[cases & (years_before > 0) & (years_before <= 1.5)]
    after = value[cases & (years_before > -1) & (years_before <= 0)]
    assert len(early) > 100 and len(late) > 100 and len(after) > 100
    assert late.mean() - early.mean() > 0.15  # prediabetic climb before onset
    assert after.mean() - late.mean() > 0.3  # and the diabetic level after it


def test_prs_files_agree_across_the_three_formats(cohort):
    prs = cohort / "prs"
    wide = pq.read_table(prs / "scores_wide.parquet")
    pgs_ids = wide.column_names[1:]
    assert len(pgs_ids) == 24 and all(re.fullmatch(r"PGS\d{6}", p) for p in pgs_ids) and pgs_ids == sorted(pgs_ids)
    samples = wide.column("sample_id").to_pylist()
    values = np.column_stack([wide.column(p).to_numpy() for p in pgs_ids])

    with gzip.open(prs / "aggregated_scores.txt.gz", "rt") as handle:
        assert handle.readline().rstrip("\n").split("\t") == ["sampleset", "IID", "PGS", "SUM", "DENOM", "AVG"]
    long = pacsv.read_csv(prs / "aggregated_scores.txt.gz", parse_options=pacsv.ParseOptions(delimiter="\t"))
    assert long.num_rows == len(samples) * len(pgs_ids)
    assert long.column("IID").to_pylist()[:: len(pgs_ids)] == samples
    assert long.column("PGS").to_pylist()[: len(pgs_ids)] == pgs_ids
    np.testing.assert_allclose(long.column("SUM").to_numpy().reshape(values.shape), values, rtol=1e-9)
    denom = long.column("DENOM").to_numpy()
    np.testing.assert_allclose(
        long.column("AVG").to_numpy(), long.column("SUM").to_numpy() / denom, rtol=1e-5
    )  # both printed to 6 digits

    sscore = pacsv.read_csv(prs / "scores.sscore", parse_options=pacsv.ParseOptions(delimiter="\t"))
    assert sscore.column_names[:4] == ["#IID", "ALLELE_CT", "DENOM", "NAMED_ALLELE_DOSAGE_SUM"]
    assert sscore.column_names[4:] == [f"{p}_AVG" for p in pgs_ids] + [f"{p}_SUM" for p in pgs_ids]
    assert sscore.column("#IID").to_pylist() == samples
    plink_sums = np.column_stack([sscore.column(f"{p}_SUM").to_numpy() for p in pgs_ids])
    np.testing.assert_allclose(plink_sums, values, rtol=1e-9)
    assert np.array_equal(sscore.column("DENOM").to_numpy(), denom[:: len(pgs_ids)])

    sample_map = pacsv.read_csv(prs / "sample_map.tsv", parse_options=pacsv.ParseOptions(delimiter="\t"),
                                convert_options=pacsv.ConvertOptions(column_types={"sample_id": pa.string()}))  # fmt: skip
    assert sample_map.column("sample_id").to_pylist() == samples
    persons = set(_table(cohort, "person", ["person_id"]).column("person_id").to_pylist())
    mapped = sample_map.column("person_id").to_pylist()
    assert set(mapped) <= persons and len(set(mapped)) == len(mapped)
    assert not set(samples) & {str(p) for p in persons}
    pcs = pacsv.read_csv(prs / "pcs.tsv", parse_options=pacsv.ParseOptions(delimiter="\t"))
    assert pcs.column_names == ["sample_id"] + [f"PC{i}" for i in range(1, 11)]
    assert pcs.column("sample_id").to_pylist() == samples


def test_genotyped_fraction_is_respected(cohort, tmp_path):
    manifest = json.loads((cohort / "manifest.json").read_text())
    assert abs(manifest["genotyped"] / 2000 - 0.6) < 4 * np.sqrt(0.24 / 2000)
    few = _generate(tmp_path / "few", "--persons", "400", "--num-pgs", "3", "--genotyped-fraction", "0.2")
    assert abs(few["genotyped"] / 400 - 0.2) < 4 * np.sqrt(0.16 / 400)
    assert pq.read_metadata(tmp_path / "few" / "prs" / "scores_wide.parquet").num_rows == few["genotyped"]


def _t2d_score_and_liability(cohort: Path) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """(truth pgs rows, best T2D score, true T2D liability, ancestry) over the genotyped persons."""
    truth = load_truth(cohort)
    pgs = pq.read_table(cohort / "truth" / "pgs.parquet").to_pylist()
    best_t2d = max((p for p in pgs if p["trait"] == "t2d"), key=lambda p: p["accuracy_reference"])["pgs_id"]
    wide = pq.read_table(cohort / "prs" / "scores_wide.parquet")
    table = truth.table.filter(truth.table.column("genotyped"))
    by_sample = dict(zip(table.column("sample_id").to_pylist(), range(table.num_rows)))
    rows = np.array([by_sample[s] for s in wide.column("sample_id").to_pylist()])
    liability = table.column("liability_t2d").to_numpy()[rows]
    ancestry = np.asarray(table.column("ancestry").to_pylist())[rows]
    return {"rows": pgs, "wide": wide}, wide.column(best_t2d).to_numpy(), liability, ancestry


def test_prs_track_liabilities_and_lose_accuracy_outside_the_reference_ancestry(cohort):
    pgs, score, liability, ancestry = _t2d_score_and_liability(cohort)
    unrelated = next(p["pgs_id"] for p in pgs["rows"] if p["trait"] == "")
    eur, afr = ancestry == "EUR", ancestry == "AFR"
    r_eur = np.corrcoef(score[eur], liability[eur])[0, 1]
    r_afr = np.corrcoef(score[afr], liability[afr])[0, 1]
    assert r_eur > 0.6 and r_afr < r_eur - 0.2
    assert abs(np.corrcoef(pgs["wide"].column(unrelated).to_numpy()[eur], liability[eur])[0, 1]) < 0.15


def test_prs_testbed_genotypes_everyone_with_a_sharper_t2d_score(tmp_path):
    config = REPO / "jobs" / "configs" / "synthetic-prs-testbed.yaml"
    manifest = _generate(tmp_path / "bed", "--config", str(config), "--persons", "800", "--num-pgs", "24")
    assert manifest["genotyped"] == 800
    pgs, score, liability, ancestry = _t2d_score_and_liability(tmp_path / "bed")
    eur = ancestry == "EUR"
    assert np.corrcoef(score[eur], liability[eur])[0, 1] > 0.88  # 0.95 by design; the default's best is 0.75
    assert {p["trait"] for p in pgs["rows"]} >= {"t2d", "cad", "copd"}  # the YAML merges into the defaults
    params = json.loads((tmp_path / "bed" / "truth" / "params.json").read_text())
    assert params["hazards"]["prediabetes"]["genetic"] == 1.2 and params["hazards"]["t2d"]["genetic"] == 1.6


def test_truth_files_are_complete_and_consistent(cohort):
    assert (cohort / "truth" / "params.json").exists() and (cohort / "truth" / "pgs.parquet").exists()
    truth = load_truth(cohort)
    assert truth.table.num_rows == 2000
    onsets, death = truth.inputs.onsets, truth.death
    assert np.all(onsets["prediabetes"] <= onsets["t2d"])
    for disease, day in onsets.items():
        assert np.all(~np.isfinite(day) | (day <= death)), disease
    coded = truth.table.column("first_coded_t2d").cast(pa.int32()).to_numpy(zero_copy_only=False)
    assert 0.1 < np.mean(np.isfinite(onsets["t2d"])) < 0.8 and 0.05 < np.mean(~np.isnan(coded.astype(float))) < 0.8
    with pytest.raises(KeyError, match="1 of 1 person ids"):
        truth.rows_of(np.array([12345]))


def test_oracle_probabilities_are_calibrated_and_genetics_matters(cohort):
    truth = load_truth(cohort)
    visits = _table(cohort, "visit_occurrence", ["person_id", "visit_end_datetime"])
    persons, t0 = prediction_times(visits.column("person_id").to_numpy(),
                                   from_datetime64(visits.column("visit_end_datetime").to_numpy()),
                                   np.random.default_rng(0))  # fmt: skip
    rows = truth.rows_of(persons)
    onset = truth.inputs.onsets["t2d"][rows]
    p_gen = oracle_t2d_risk(truth, persons, t0, 730, use_genetics=True)
    p_nogen = oracle_t2d_risk(truth, persons, t0, 730, use_genetics=False)
    assert np.array_equal(np.isnan(p_gen), onset <= t0)
    ok = ~np.isnan(p_gen)
    assert np.all((p_gen[ok] >= 0) & (p_gen[ok] <= 1))
    positives = np.sum(onset[ok] <= t0[ok] + 730)
    expected = p_gen[ok].sum()
    assert abs(positives - expected) < 4 * np.sqrt(expected) + 2  # the oracle integrates the true hazards
    shorter = oracle_t2d_risk(truth, persons[ok], t0[ok], 365)
    assert np.all(shorter <= p_gen[ok] + 1e-12)
    at_mean = np.isclose(truth.inputs.liability[rows, 0], truth.inputs.group_mean[rows, 0])
    assert not at_mean.any() and np.mean(np.abs(p_gen[ok] - p_nogen[ok]) > 1e-6) > 0.9
    truth.inputs.liability[:, 0] = truth.inputs.group_mean[:, 0]
    np.testing.assert_allclose(oracle_t2d_risk(truth, persons[ok], t0[ok]), p_nogen[ok])
    stamps = (t0[ok] * 86_400_000_000).astype("int64").astype("datetime64[us]")
    np.testing.assert_allclose(oracle_t2d_risk(truth, persons[ok], stamps), p_nogen[ok])


def test_figures_are_computed_and_written_to_the_manifest(cohort):
    manifest = json.loads((cohort / "manifest.json").read_text())
    figures = manifest["figures"]
    assert figures == cohort_figures(cohort, 730, 11)
    assert 0.01 < figures["prevalence"] < 0.2 and figures["eligible"] > 800
    assert 0.5 < figures["oracle_auroc_no_genetic"] < figures["oracle_auroc_genetic"] < 1.0
    assert figures["vocabulary_size"] > 1000 and 100 < figures["events_per_person"] < 2000
    assert manifest["rows"]["person"] == 2000 and manifest["seed"] == 11 and "out" not in manifest["config"]


def test_num_pgs_3481_on_a_tiny_cohort(tmp_path):
    manifest = _generate(tmp_path / "wide", "--persons", "40", "--num-pgs", "3481", "--seed", "2")
    wide = pq.read_schema(tmp_path / "wide" / "prs" / "scores_wide.parquet")
    assert len(wide.names) == 3482 and len(set(wide.names)) == 3482
    header = (tmp_path / "wide" / "prs" / "scores.sscore").open().readline().split("\t")
    assert len(header) == 4 + 2 * 3481
    with gzip.open(tmp_path / "wide" / "prs" / "aggregated_scores.txt.gz", "rt") as handle:
        assert sum(1 for _ in handle) == 1 + manifest["genotyped"] * 3481


def test_csv_output_matches_parquet_rows_and_is_iso_formatted(small, tmp_path):
    manifest = _generate(tmp_path / "csv", "--persons", "300", "--seed", "5", "--chunk-size", "120", "--num-pgs", "8",
                         "--format", "csv")  # fmt: skip
    assert manifest["rows"] == json.loads((small / "manifest.json").read_text())["rows"]
    assert manifest["figures"] == json.loads((small / "manifest.json").read_text())["figures"]
    lines = (tmp_path / "csv" / "omop" / "visit_occurrence" / "part-00000.csv").read_text().splitlines()
    assert re.search(r",\d{4}-\d{2}-\d{2},\"?\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\"?,", lines[1])


def test_refuses_to_overwrite_a_directory_that_is_not_a_cohort(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        synthesize(load_synth_config(None, [f"out={tmp_path}", "persons=10"]))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_overrides_merge_into_the_defaults_and_unknown_keys_fail():
    config = load_synth_config(None, ["model.hazards.t2d.genetic=0.5", "persons=7"])
    assert config.model.hazards["t2d"].genetic == 0.5 and config.model.hazards["t2d"].base == -2.6
    assert config.persons == 7 and config.model.hazards["cad"].genetic == 0.55
    with pytest.raises(ValueError, match="tpyo"):
        load_synth_config(None, ["model.hazards.t2d.tpyo=1"])


def test_shipped_concepts_are_the_ones_rederived_from_shared_data(shared_data, tmp_path):
    from ehrfm_synthetic.vocab_build import write_resources

    write_resources(shared_data, tmp_path)
    shipped = Path(cc.__file__).resolve().parent / "resources"
    for name in ("concepts.csv.gz", "measurement_values.csv.gz"):
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes(), name
    assert CDM_COLUMNS["concept"][0][0] == "concept_id"
