"""Online scoring of person records (transfer/predictor.py): the offline path's windows and risks,
counts of unknown codes and truncated events, PRS masking and partial PRS, field validation."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from ehrfm.constants import EOS_ID
from ehrfm.model.risk import load_risk_model
from ehrfm.transfer.predictor import PersonRecord, RiskPredictor, demographic_code, records_to_events
from tests.support.risk_model_factory import (
    CONTEXT,
    PGS_IDS,
    Person,
    code,
    labels_at,
    make_person,
    offline_risks,
    offline_timelines,
    person_record,
    write_risk_model,
    write_tokenizer,
)

FULL_PRS = {k: float(i) - 1.5 for i, k in enumerate(PGS_IDS)}
HYPERTENSION, HBA1C_CODE = code("CONDITION", 320128), code("MEASUREMENT", 3004410)  # SNOMED/59621000, LOINC/4548-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("risk")
    return write_risk_model(root / "model", write_tokenizer(root / "tokenizer.json"), seed=1)


@pytest.fixture(scope="module")
def predictor(model_dir):
    return RiskPredictor.load(model_dir)


def evening_of(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(18, 30))


def test_online_windows_and_risks_equal_the_offline_path(predictor, model_dir):
    genotyped = make_person(11, seed=1, n_visits=8, prs=FULL_PRS, unknown_code=True)
    plain = make_person(12, seed=2, n_visits=5, sex=8507)
    times = {11: evening_of(genotyped.visits[5][1]), 12: evening_of(plain.visits[3][1])}
    records = [predictor.parse(person_record(p, times[p.person_id])) for p in (genotyped, plain)]

    online = predictor.predict(records)
    windows = predictor.windows(records)
    model, spec = load_risk_model(model_dir)
    offline = offline_risks(
        model,
        spec,
        offline_timelines([genotyped, plain], predictor.tokenizer),
        labels_at([(11, times[11]), (12, times[12])]),
    )

    assert windows.tokens.tolist() == offline["tokens"]
    assert windows.length.tolist() == [CONTEXT, CONTEXT]
    np.testing.assert_allclose([r["risk"] for r in online], offline["risk"], rtol=1e-6)
    np.testing.assert_allclose([r["risk_prs_masked"] for r in online], offline["risk_prs_masked"], rtol=1e-6)
    assert len({round(r["risk"], 6) for r in online}) == 2  # the two persons really differ
    expected_percentile = np.interp([r["risk"] for r in online], spec.reference_quantiles, np.linspace(0, 100, 101))
    np.testing.assert_allclose([r["percentile"] for r in online], expected_percentile)


def test_short_windows_scored_alone_or_beside_longer_ones_equal_the_full_width_offline_risks(predictor, model_dir):
    """Online batches are cut to their longest window (causal attention: the padding after it
    changes no real position), so a short person alone runs a much narrower forward."""
    short = make_person(21, seed=3, n_visits=3, prs=FULL_PRS)  # scored after its first visit
    long = make_person(22, seed=4, n_visits=8)
    times = {21: evening_of(short.visits[0][1]), 22: evening_of(long.visits[6][1])}
    records = {p.person_id: predictor.parse(person_record(p, times[p.person_id])) for p in (short, long)}
    assert predictor.windows([records[21]]).length[0] < CONTEXT == predictor.windows([records[22]]).length[0]

    model, spec = load_risk_model(model_dir)
    offline = offline_risks(
        model, spec, offline_timelines([short, long], predictor.tokenizer), labels_at(sorted(times.items()))
    )
    together = predictor.predict([records[21], records[22]])
    alone = predictor.predict([records[21]]) + predictor.predict([records[22]])
    for online in (together, alone):
        np.testing.assert_allclose([r["risk"] for r in online], offline["risk"], rtol=1e-6)
        np.testing.assert_allclose([r["risk_prs_masked"] for r in online], offline["risk_prs_masked"], rtol=1e-6)


def mean_head_model_dir(tmp_path_factory, name: str, **head):
    """model_dir's decoder weights (seed 1) under a mean-pooling head with `head`'s extra inputs."""
    root = tmp_path_factory.mktemp(name)
    tokenizer = write_tokenizer(root / "tokenizer.json")
    return write_risk_model(root / "model", tokenizer, seed=1, head_inputs="last+mean+prs", **head)


@pytest.fixture(scope="module")
def history_model_dir(tmp_path_factory):
    """A head reading three windows of history."""
    return mean_head_model_dir(tmp_path_factory, "history", history_windows=3)


def test_whole_history_scores_online_equal_the_offline_path_and_read_the_older_windows(history_model_dir):
    predictor = RiskPredictor.load(history_model_dir)
    long = make_person(31, seed=5, n_visits=8, prs=FULL_PRS)  # more than three windows of history
    short = make_person(32, seed=6, n_visits=3)  # scored after its first visit: fits in its newest window
    times = {31: evening_of(long.visits[6][1]), 32: evening_of(short.visits[0][1])}
    records = {p.person_id: predictor.parse(person_record(p, times[p.person_id])) for p in (long, short)}
    windows = predictor.windows([records[31], records[32]])
    assert windows.window_lengths[0].tolist() == [CONTEXT] * 3
    assert windows.window_lengths[1, :2].tolist() == [0, 0] and 0 < windows.window_lengths[1, 2] < CONTEXT

    model, spec = load_risk_model(history_model_dir)
    offline = offline_risks(
        model, spec, offline_timelines([long, short], predictor.tokenizer), labels_at(sorted(times.items()))
    )
    assert windows.tokens.tolist() == offline["tokens"]
    together = predictor.predict([records[31], records[32]])
    alone = predictor.predict([records[31]]) + predictor.predict([records[32]])
    for online in (together, alone):
        np.testing.assert_allclose([r["risk"] for r in online], offline["risk"], rtol=1e-6)
        np.testing.assert_allclose([r["risk_prs_masked"] for r in online], offline["risk_prs_masked"], rtol=1e-6)

    newest_only = dataclasses.replace(spec, history_windows=1)
    one_window = offline_risks(
        model, newest_only, offline_timelines([long, short], predictor.tokenizer), labels_at(sorted(times.items()))
    )
    assert one_window["risk"][1] == offline["risk"][1]  # nothing older to read: the same score
    assert abs(one_window["risk"][0] - offline["risk"][0]) > 1e-4  # the older history moves the score


@pytest.fixture(scope="module")
def values_model_dir(tmp_path_factory):
    """A head that also reads the window's recent HbA1c bins (the factory's one code with bins)."""
    return mean_head_model_dir(tmp_path_factory, "values", value_codes=3)


def test_a_head_reading_value_bins_scores_online_as_offline_and_the_bins_reach_the_risk(values_model_dir):
    predictor = RiskPredictor.load(values_model_dir)
    model, spec = load_risk_model(values_model_dir)
    assert spec.value_codes == [HBA1C_CODE] and spec.value_recency_days == [30, 365]  # the only binned code
    assert spec.value_code_ids == [predictor.tokenizer.token_id[HBA1C_CODE]]
    measured = make_person(41, seed=7, n_visits=6, prs=FULL_PRS)
    other = make_person(42, seed=8, n_visits=4)
    times = {41: evening_of(measured.visits[4][1]), 42: evening_of(other.visits[2][1])}
    records = [predictor.parse(person_record(p, times[p.person_id])) for p in (measured, other)]
    online = predictor.predict(records)
    offline = offline_risks(
        model, spec, offline_timelines([measured, other], predictor.tokenizer), labels_at(sorted(times.items()))
    )
    np.testing.assert_allclose([r["risk"] for r in online], offline["risk"], rtol=1e-6)
    np.testing.assert_allclose([r["risk_prs_masked"] for r in online], offline["risk_prs_masked"], rtol=1e-6)

    windows = predictor.windows(records)
    bins = spec.value_readout().features(windows.tokens, windows.ages, windows.length)
    assert bins.shape == (2, 3 * 1 * 4) and bins[:, 8:].sum(axis=1).tolist() == [1.0, 1.0]  # anywhere: one bin each
    with torch.no_grad():  # the value columns' weights are the last ones of the head
        predictor.model.head.linear.weight[:, -bins.shape[1] :] = 0.0
    blind = predictor.predict(records)
    # (a random head saturates some risks near 0 or 1, so at least one person must move)
    assert max(abs(a["risk"] - b["risk"]) for a, b in zip(online, blind)) > 1e-3


@pytest.mark.parametrize(("visit_days", "truncated"), [(5, 0), (6, 3), (8, 11)])
def test_truncated_events_are_counted_before_the_oldest_window(history_model_dir, visit_days, truncated):
    predictor = RiskPredictor.load(history_model_dir)
    person = one_day_visits(8)
    record = predictor.parse(person_record(person, evening_of(person.visits[visit_days - 1][0])))
    [out] = predictor.predict([record])
    # BOS + 3 demographic codes, then 6 tokens (4 of them events) per day; three windows hold 36 tokens
    tokens_so_far = 4 + 6 * visit_days
    assert out["truncated_events"] == truncated
    assert (tokens_so_far <= 3 * CONTEXT) == (truncated == 0)


def test_on_the_records_last_day_offline_windows_hold_no_eos_either(predictor, model_dir):
    """An offline label on the last day of the whole record: its window ends like the online one,
    without the closing EOS (that the record ends there is not known at the prediction time)."""
    person = make_person(41, seed=7, n_visits=1, prs=FULL_PRS)
    when = evening_of(person.visits[-1][1])
    record = predictor.parse(person_record(person, when))
    model, spec = load_risk_model(model_dir)
    offline = offline_risks(model, spec, offline_timelines([person], predictor.tokenizer), labels_at([(41, when)]))
    assert predictor.windows([record]).tokens.tolist() == offline["tokens"]
    assert EOS_ID not in offline["tokens"][0]
    # fp32 over batches of other shapes: 1e-6 relative was seen to fail by 2e-6
    np.testing.assert_allclose(predictor.predict([record])[0]["risk"], offline["risk"][0], rtol=1e-5)


def test_later_events_stay_hidden_and_the_default_time_is_the_last_event(predictor):
    person = make_person(13, seed=3, n_visits=9)
    cut = person.visits[4][1]
    full = predictor.parse(person_record(person, evening_of(cut)))
    upto = person_record(person)
    upto["events"] = [e for e in upto["events"] if e["time"] <= dt.datetime.combine(cut, dt.time()).isoformat()]
    truncated_record = predictor.parse(upto)  # no prediction_time: the last event's time
    assert truncated_record.scored_time().date() == cut
    windows = predictor.windows([full, truncated_record])
    assert windows.tokens[0].tolist() == windows.tokens[1].tolist()
    assert windows.ages[0].tolist() == windows.ages[1].tolist()
    a, b = predictor.predict([full, truncated_record])
    assert a == pytest.approx(b, rel=1e-6)  # float32 rounding differs by position in a batch, nothing more
    later = predictor.predict([predictor.parse(person_record(person, evening_of(person.visits[8][1])))])[0]
    assert later["risk"] != a["risk"]


def one_day_visits(days: int) -> Person:
    """Single-day visits: per day VISIT, CONDITION, MEASUREMENT (+ value bin), VISIT_END and a gap."""
    person = Person(20, dt.date(1960, 5, 5), 8532, 8527, 38003564)
    for k in range(days):
        day = dt.date(2015, 1, 1) + dt.timedelta(days=10 * k)
        person.visits.append((day, day, 9202))
        person.conditions.append((day, 320128))
        person.measurements.append((day, 3004410, 6.0 + k / 10))
    return person


@pytest.mark.parametrize("visit_days", [1, 2, 3, 6])
def test_truncated_events_are_counted_from_the_window_start(predictor, visit_days):
    person = one_day_visits(8)
    record = predictor.parse(person_record(person, evening_of(person.visits[visit_days - 1][0])))
    [out] = predictor.predict([record])
    # BOS + 3 demographic codes, then 6 tokens (gap, 4 codes, 1 value bin) per day; the window
    # (12 tokens) holds the last two days = 8 events; everything earlier is truncated
    events_so_far, tokens_so_far = 3 + 4 * visit_days, 4 + 6 * visit_days
    expected = 0 if tokens_so_far <= CONTEXT else events_so_far - 8
    assert out["truncated_events"] == expected == {1: 0, 2: 3, 3: 7, 6: 19}[visit_days]
    assert out["unknown_codes"] == 0


def test_unknown_codes_count_only_events_up_to_the_prediction_time(predictor):
    person = make_person(14, seed=4, n_visits=8, unknown_code=True)  # the unknown code sits at visit 4
    before = predictor.parse(person_record(person, evening_of(person.visits[2][1])))
    after = predictor.parse(person_record(person, evening_of(person.visits[6][1])))
    assert [r["unknown_codes"] for r in predictor.predict([before, after])] == [0, 1]
    person.race_concept_id = 8516  # a race code absent from the vocabulary counts too
    assert (
        predictor.predict([predictor.parse(person_record(person, evening_of(person.visits[6][1])))])[0]["unknown_codes"]
        == 2
    )


def test_prs_masking_changes_only_genotyped_persons(predictor):
    base = make_person(15, seed=5, n_visits=6)
    genotyped = predictor.parse({**person_record(base), "prs": FULL_PRS})
    plain = predictor.parse(person_record(base))
    g, p = predictor.predict([genotyped, plain])
    assert g["has_prs"] and not p["has_prs"]
    assert p["risk"] == p["risk_prs_masked"]
    assert abs(g["risk"] - g["risk_prs_masked"]) > 1e-4
    assert g["risk_prs_masked"] == pytest.approx(p["risk"], rel=1e-6)  # masked = the same person without PRS


def test_partial_prs_is_genotyped_only_above_the_share_and_fills_the_mean(model_dir):
    predictor = RiskPredictor.load(model_dir, min_prs_share=0.5)
    record = person_record(make_person(16, seed=6, n_visits=4))
    half = {PGS_IDS[0]: 1.2, PGS_IDS[2]: -0.7}
    explicit = {**dict.fromkeys(PGS_IDS, 0.0), **half}
    one = {PGS_IDS[1]: 2.0}
    rows = predictor.predict([predictor.parse({**record, "prs": p}) for p in (half, explicit, one, None)])
    assert [r["has_prs"] for r in rows] == [True, True, False, False]
    assert rows[0]["risk"] == rows[1]["risk"]  # missing ids are the population mean (0)
    assert rows[2]["risk"] == rows[3]["risk"] == rows[2]["risk_prs_masked"]  # too few ids: as non-genotyped
    assert rows[0]["risk"] != rows[3]["risk"]
    strict = RiskPredictor.load(model_dir, min_prs_share=1.0)
    assert strict.predict([strict.parse({**record, "prs": half})])[0]["has_prs"] is False


def test_a_record_without_events_scores_its_demographic_prefix_and_aware_times_become_utc(predictor):
    empty = predictor.parse({"birth_date": "1980-02-02", "sex": "male", "prediction_time": "1980-02-02T05:00:00"})
    aware = predictor.parse(
        {
            "birth_date": "1980-02-02",
            "sex": "female",
            "race_concept_id": 8516,
            "events": [{"code": HYPERTENSION, "time": "2001-01-01T23:30:00-05:00"}],
        }
    )
    assert aware.events[0].time == dt.datetime(2001, 1, 2, 4, 30) and aware.scored_time() == aware.events[0].time
    windows = predictor.windows([empty, aware])
    assert windows.length.tolist() == [4, 6]  # BOS + 3 demographic codes; then a gap token and the condition
    first_code = predictor.first_code_token
    assert windows.tokens[1, 2] == 1 and windows.tokens[1, 4] < first_code <= windows.tokens[1, 5]  # RACE/8516 is UNK
    rows = predictor.predict([empty, aware])
    assert [r["unknown_codes"] for r in rows] == [0, 1] and [r["truncated_events"] for r in rows] == [0, 0]


BIRTH = "1961-04-02"


@pytest.mark.parametrize(
    "change, location, message",
    [
        (
            {"events": [{"code": "CONDITION/1", "time": "1960-12-30T08:00:00"}]},
            ("events",),
            "events[0].time is before birth_date",
        ),
        (
            {
                "events": [{"code": HYPERTENSION, "time": "2000-01-01T00:00:00"}] * 2
                + [{"code": "C/1", "time": "2100-05-05T00:00:00"}]
            },
            ("events",),
            "events[2].time is after the request's own clock",
        ),
        (
            {
                "events": [
                    {"code": "C/1", "time": "1899-12-30T00:00:00"},
                    {"code": "C/1", "time": "1960-12-30T08:00:00"},
                ]
            },
            ("events",),
            "events[0].time is before 1900-01-01 (2 of 2 events have implausible times)",
        ),
        ({"birth_date": "0001-01-01"}, ("birth_date",), "is before 1900-01-01"),
        ({"birth_date": "2100-05-05"}, ("birth_date",), "is after the request's own clock"),
        ({"prediction_time": "2100-05-05T00:00:00"}, ("prediction_time",), "is after the request's own clock"),
        ({"prediction_time": "1899-12-30T00:00:00"}, ("prediction_time",), "is before 1900-01-01"),
        ({"birth_date": "1900-03-03", "prediction_time": "2026-03-04T00:00:00"}, ("prediction_time",), "over 125"),
        (
            {
                "birth_date": "1900-03-03",
                "prediction_time": None,
                "events": [{"code": "C/1", "time": "2026-03-04T00:00:00"}],
            },
            ("prediction_time",),
            "over 125 years at the prediction time (by default the last event's time)",
        ),
        ({"prediction_time": "1950-03-03T00:00:00"}, ("prediction_time",), "before birth_date"),
        (
            {"events": [{"code": HBA1C_CODE, "time": "1999-01-01T00:00:00", "numeric_value": float("nan")}]},
            ("events", 0, "numeric_value"),
            "finite",
        ),
        (
            {"events": [{"code": HBA1C_CODE, "time": "1999-01-01T00:00:00", "numeric_value": 1e300}]},
            ("events", 0, "numeric_value"),
            "float32",
        ),
        ({"prs": {PGS_IDS[0]: float("inf")}}, ("prs", PGS_IDS[0]), "finite"),
        ({"prs": {"PGS999999": 0.3, PGS_IDS[0]: 0.1}}, ("prs",), "1 of the 2 PGS ids given are not among the model's"),
        ({"sex": "robot"}, ("sex",), "'male', 'female'"),
        ({"events": [{"code": "GENDER/8507", "time": "1999-01-01T00:00:00"}]}, ("events", 0, "code"), "come from"),
        ({"events": [{"code": "Race/5", "time": "1999-01-01T00:00:00"}]}, ("events", 0, "code"), "come from"),
        ({"events": [], "prediction_time": None}, ("prediction_time",), "required when there are no events"),
        ({"weight": 81.5}, ("weight",), "Extra inputs"),
    ],
)
def test_validation_errors_name_the_field_and_hide_the_values(predictor, change, location, message):
    data = {
        "birth_date": BIRTH,
        "sex": "female",
        "prediction_time": "2001-07-07T00:00:00",
        "events": [{"code": HYPERTENSION, "time": "2000-01-01T00:00:00"}],
        **change,
    }
    with pytest.raises(ValidationError) as caught:
        predictor.parse(data)
    assert isinstance(caught.value, ValueError)
    errors = caught.value.errors(include_input=False)
    assert [e["loc"] for e in errors] == [location]
    assert message in errors[0]["msg"]
    text = str(caught.value)
    assert "input_value" not in text
    for value in (BIRTH, "1960-12-30", "1950-03-03", "robot", "81.5", "1e+300", "PGS999999", "2100", "1899", "0001-01"):
        assert value not in text
    assert "1900-03-03" not in text and "2026" not in text


def test_unknown_pgs_ids_are_refused_at_scoring_too(predictor):
    record = PersonRecord.model_validate({**person_record(make_person(17, seed=7, n_visits=3)), "prs": {"PGS777": 1.0}})
    with pytest.raises(ValueError, match="1 of the 1 PGS ids given") as caught:
        predictor.predict([record])
    assert "PGS777" not in str(caught.value)


def test_the_clock_of_the_plausibility_check_is_the_validating_one_with_a_day_of_skew():
    base = {"birth_date": "1961-04-02", "sex": "female"}
    now = dt.datetime(2001, 1, 1, 12, tzinfo=dt.UTC)
    for time, ok in (
        ("2001-01-02T11:00:00", True),
        ("2001-01-02T13:00:00", False),
        ("2001-01-02T12:30:00+02:00", True),
    ):
        body = {**base, "events": [{"code": "C/1", "time": time}]}
        if ok:
            PersonRecord.model_validate(body, context={"now": now})
        else:
            with pytest.raises(ValidationError, match="events\\[0\\].time is after"):
                PersonRecord.model_validate(body, context={"now": now})
    # 125 years old is still plausible, 126 is not
    PersonRecord.model_validate({**base, "birth_date": "1900-03-03", "prediction_time": "2026-03-02T00:00:00"})
    with pytest.raises(ValidationError, match="over 125"):
        PersonRecord.model_validate({**base, "birth_date": "1900-03-03", "prediction_time": "2026-03-03T00:00:00"})


def test_demographic_codes_take_the_form_the_model_knows():
    record = PersonRecord.model_validate(
        {"birth_date": "1970-01-01", "sex": "female", "race_concept_id": 8527, "prediction_time": "1990-01-01T00:00"}
    )
    # A model trained with the concept table knows the vocabulary form; its race code is absent here.
    known = {"Gender/F", "Gender/M", "Ethnicity/Hispanic"}
    codes = records_to_events([record], known)["code"].to_pylist()
    assert codes == ["MEDS_BIRTH", "Gender/F", "RACE/8527", "ETHNICITY/0"]
    assert records_to_events([record])["code"].to_pylist() == ["MEDS_BIRTH", "GENDER/8532", "RACE/8527", "ETHNICITY/0"]
    assert demographic_code("ETHNICITY", 38003564, {"Ethnicity/Not Hispanic"}) == "Ethnicity/Not Hispanic"
    assert demographic_code("GENDER", 0, {"Gender/F"}) == "GENDER/0"  # unknown sex: no vocabulary form
