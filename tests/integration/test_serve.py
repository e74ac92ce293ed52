"""The scoring service over real HTTP: Ray Serve (`serve.run` on the session's Ray cluster) in front of a
model registered in the session's MLflow server; the two applications are in tests/support/serve_app.py.

Checked: scores equal the offline path's predictions; occlusion explanations equal rescoring without the
event; every bad input is a 4xx naming the field and echoing no value (implausible dates and unknown PGS
ids included); nothing a request carried reaches the logs; the default config refuses a request without
the bearer token; the OpenAPI document lists every error status; `ehrfm serve` refuses a port another
server answers on; a hypothesis fuzz finds no 5xx (under load: tests/e2e/test_serve.py)."""

from __future__ import annotations

import datetime as dt
import json
import socket
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schemathesis import checks

from ehrfm.model.risk import load_risk_model
from tests.support.risk_model_factory import (
    CONTEXT,
    PGS_IDS,
    UNKNOWN_CONDITION,
    code,
    labels_at,
    offline_risks,
    offline_timelines,
    visit_end,
)
from tests.support.serve_app import (
    MAX_BODY,
    MAX_EVENTS,
    MAX_PERSONS,
    TOKEN,
    persons_and_requests,
    post,
    register_version_one,
    running_service,
    serve_tracking,
    write_model_dirs,
)

pytestmark = [pytest.mark.mlflow, pytest.mark.ray]

TASK = "servetest"  # its own registered model, so versions do not depend on other test files
MODEL = f"ehrfm-{TASK}"
MARKER_CODE, MARKER_BIRTH = "CONDITION/987650321", "1931-03-17"  # must never reach a log


@pytest.fixture(scope="module")
def tracking(mlflow_server):
    """This module logs and registers on the session's loopback server (previous URI restored)."""
    with serve_tracking(mlflow_server) as uri:
        yield uri


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return write_model_dirs(tmp_path_factory.mktemp("serve-models"), TASK)


@pytest.fixture(scope="module")
def version_one(tracking, model_dirs):
    return register_version_one(model_dirs, TASK)


@pytest.fixture(scope="module")
def service(ray_cluster, tracking, version_one, tmp_path_factory):
    with running_service(MODEL, tracking, tmp_path_factory.mktemp("secret")) as running:
        yield running


def test_scores_over_http_equal_the_registered_models_offline_predictions(service, model_dirs):
    people, times, bodies = persons_and_requests()
    single = [post(f"{service['url']}/v1/score", body) for body in bodies]
    assert [r.status_code for r in single] == [200, 200, 200]
    single = [r.json() for r in single]
    batch = post(f"{service['url']}/v1/score:batch", {"persons": bodies})
    assert batch.status_code == 200
    batch = batch.json()["results"]

    model, spec = load_risk_model(model_dirs[1])
    tokenizer_path = model_dirs[1] / "tokenizer.json"
    from ehrfm.preprocess.tokenizer import Tokenizer

    offline = offline_risks(
        model,
        spec,
        offline_timelines(people, Tokenizer.load(tokenizer_path)),
        labels_at([(p.person_id, t) for p, t in zip(people, times)]),
    )
    for served in (single, batch):
        np.testing.assert_allclose([r["risk"] for r in served], offline["risk"], rtol=1e-5)
        np.testing.assert_allclose([r["risk_prs_masked"] for r in served], offline["risk_prs_masked"], rtol=1e-5)
        np.testing.assert_allclose([r["percentile"] for r in served], spec.percentile(offline["risk"]), rtol=1e-4)
        assert [(r["model_name"], r["model_version"]) for r in served] == [(MODEL, "1")] * 3
        assert [r["has_prs"] for r in served] == [True, False, True]
        assert [r["unknown_codes"] for r in served] == [1, 0, 0]
        assert all(r["truncated_events"] > 0 for r in served)  # 12-token windows hold a few events only
        for r in served:
            assert r["prs_contribution"] == pytest.approx(r["risk"] - r["risk_prs_masked"], abs=1e-12)
    assert single[1]["prs_contribution"] == 0.0 and abs(single[0]["prs_contribution"]) > 1e-4
    assert len({round(r["risk"], 6) for r in single}) == 3


def test_explain_contributions_equal_rescoring_without_the_event(service):
    _, _, bodies = persons_and_requests()
    response = post(f"{service['url']}/v1/explain", bodies[0])
    assert response.status_code == 200
    explained = response.json()
    assert explained["method"] == "occlusion" and explained["model_version"] == "1"
    events = explained["events"]
    assert 1 <= len(events) <= 10 and explained["events_considered"] >= len(events)
    assert explained["events_not_considered"] > 0  # older events fall outside the 12-token window
    magnitudes = [abs(e["contribution"]) for e in events]
    assert magnitudes == sorted(magnitudes, reverse=True) and magnitudes[0] > 1e-4
    top = events[0]
    assert bodies[0]["events"][top["index"]]["code"] == top["code"]
    without = {**bodies[0], "events": [e for i, e in enumerate(bodies[0]["events"]) if i != top["index"]]}
    rescored = post(f"{service['url']}/v1/score", without).json()
    assert explained["risk"] - rescored["risk"] == pytest.approx(top["contribution"], abs=1e-5)
    assert explained["prs_contribution"] == pytest.approx(explained["risk"] - explained["risk_prs_masked"])


def test_health_readiness_model_info_and_openapi(service):
    url = service["url"]
    assert requests.get(f"{url}/healthz", timeout=30).json() == {
        "status": "ok",
        "model_name": None,
        "model_version": None,
    }
    ready = requests.get(f"{url}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["model_version"] == "1"
    info = requests.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    assert (info["name"], info["version"], info["alias"], info["task"]) == (MODEL, "1", "champion", TASK)
    assert info["pgs_ids"] == PGS_IDS and info["metrics"]["val_auroc"] == pytest.approx(0.61)
    assert (info["context"], info["history_windows"]) == (CONTEXT, 1)
    assert requests.get(f"{url}/docs", timeout=30).status_code == 200
    paths = requests.get(f"{url}/openapi.json", timeout=30).json()["paths"]
    assert {"/v1/score", "/v1/score:batch", "/v1/explain", "/v1/model", "/healthz", "/readyz"} <= set(paths)


def _valid() -> dict:
    return {
        "birth_date": "1961-04-02",
        "sex": "female",
        "prs": {PGS_IDS[0]: 0.3},
        "events": [
            {"code": code("CONDITION", 320128), "time": "2001-01-01T00:00:00"},
            {"code": code("MEASUREMENT", 3004410), "time": "2001-02-01T00:00:00", "numeric_value": 6.2},
        ],
    }


def _events(n: int) -> list[dict]:
    return [{"code": code("CONDITION", 320128), "time": f"20{10 + i // 300:02d}-01-01T00:00:00"} for i in range(n)]


TRUNCATED_JSON = b'{"birth_date": "1961-04-02", "sex": '
BAD_INPUTS = [  # (route, raw body, status, loc of the first error)
    ("score", TRUNCATED_JSON, 400, ["body", len(TRUNCATED_JSON)]),
    ("score", json.dumps({**_valid(), "sex": 7}), 422, ["body", "sex"]),
    ("score", json.dumps({**_valid(), "birth_date": [1961]}), 422, ["body", "birth_date"]),
    ("score", json.dumps({**_valid(), "events": {"code": "x"}}), 422, ["body", "events"]),
    (
        "score",
        json.dumps({**_valid(), "events": [{"code": "CONDITION/1", "time": "1950-05-05T00:00:00"}]}),
        422,
        ["body", "events"],
    ),
    ("score", json.dumps({**_valid(), "prediction_time": "1960-01-01T00:00:00"}), 422, ["body", "prediction_time"]),
    ("score", json.dumps({**_valid(), "prs": {"PGS999999": 0.2}}), 422, ["body", "prs"]),
    ("score", json.dumps({**_valid(), "prs": {PGS_IDS[0]: float("nan")}}), 422, ["body", "prs", PGS_IDS[0]]),
    ("score", json.dumps({**_valid(), "prs": {PGS_IDS[0]: 1e300}}), 422, ["body", "prs", PGS_IDS[0]]),
    (
        "score",
        json.dumps(
            {
                **_valid(),
                "events": [
                    {"code": code("MEASUREMENT", 3004410), "time": "2001-02-01T00:00:00", "numeric_value": float("nan")}
                ],
            }
        ),
        422,
        ["body", "events", 0, "numeric_value"],
    ),
    ("score", json.dumps({**_valid(), "events": _events(MAX_EVENTS + 1)}), 422, ["body", "events"]),
    ("score", json.dumps({**_valid(), "events": _events(MAX_BODY // 40)}), 413, None),
    ("score", json.dumps({**_valid(), "weight_kg": 81.5}), 422, ["body", "weight_kg"]),
    ("score", b"", 422, ["body"]),
    (
        "score",
        json.dumps({**_valid(), "events": [{"code": "CONDITION/1", "time": "9999-12-31T23:00:00-05:00"}]}),
        422,
        ["body"],
    ),
    ("score:batch", json.dumps({"persons": [_valid()] * (MAX_PERSONS + 1)}), 422, ["body", "persons"]),
    (
        "score:batch",
        json.dumps({"persons": [_valid(), {**_valid(), "prs": {"PGS1": 1.0}}]}),
        422,
        ["body", "persons", 1, "prs"],
    ),
    ("score:batch", json.dumps({"persons": []}), 422, ["body", "persons"]),
    ("explain", json.dumps({**_valid(), "prs": {"PGS999999": 0.2}}), 422, ["body", "prs"]),
    ("explain", json.dumps({**_valid(), "events": _events(MAX_EVENTS + 1)}), 422, ["body", "events"]),
]


@pytest.mark.parametrize(
    "route, body, status, loc", BAD_INPUTS, ids=[f"{i}-{case[0]}-{case[2]}" for i, case in enumerate(BAD_INPUTS)]
)
def test_bad_input_is_a_4xx_naming_the_field_and_echoing_no_value(service, route, body, status, loc):
    response = post(f"{service['url']}/v1/{route}", body)
    assert response.status_code == status, response.text[:300]
    if loc is not None:
        detail = response.json()["detail"]
        assert detail[0]["loc"] == loc and detail[0]["msg"]
        assert all(set(error) == {"loc", "msg", "type"} for error in detail)
    for value in ("1961-04-02", "1950-05-05", "81.5", "[1961]", "PGS999999", "PGS1"):
        assert value not in response.text


def test_request_content_never_reaches_the_logs(service, ray_cluster):
    body = {
        **_valid(),
        "birth_date": MARKER_BIRTH,
        "events": [{"code": MARKER_CODE, "time": "2001-01-01T00:00:00", "numeric_value": 123.456789}],
    }
    assert post(f"{service['url']}/v1/score", body).status_code == 200
    assert post(f"{service['url']}/v1/explain", body).status_code == 200
    assert post(f"{service['url']}/v1/score", {**body, "sex": "robot"}).status_code == 422
    assert post(f"{service['url']}/v1/score", {**body, "prs": {"PGS0424242": 1.0}}).status_code == 422
    time.sleep(2.0)  # let the log files flush
    logs = Path(ray_cluster._private.worker.global_worker.node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    serve_logs = [p for p in files if "serve" in str(p.relative_to(logs))]
    assert serve_logs, "no Serve log files found"
    assert any("/v1/score" in p.read_text(errors="replace") for p in serve_logs)  # access logs are there
    for path in files:
        text = path.read_text(errors="replace")
        for marker in (MARKER_CODE, MARKER_BIRTH, "123.456789", "PGS0424242", "robot"):
            assert marker not in text, f"{marker} found in {path.name}"


def test_default_config_refuses_requests_without_the_token_and_keeps_health_open(service):
    _, _, bodies = persons_and_requests()
    for url in (service["url"], f"{service['url']}/secure"):  # default auth / a token file named in the config
        refused = post(f"{url}/v1/score", bodies[1], token=None)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        assert post(f"{url}/v1/score", bodies[1], token="wrong").status_code == 401
        assert post(f"{url}/v1/score", bodies[1], token=None, headers={"Authorization": TOKEN}).status_code == 401
        assert post(f"{url}/v1/explain", bodies[1], token=None).status_code == 401
        assert requests.get(f"{url}/v1/model", timeout=30).status_code == 401
        assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
        assert requests.get(f"{url}/readyz", timeout=30).status_code == 200
        assert requests.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).ok
    scored = [post(f"{url}/v1/score", bodies[1]) for url in (service["url"], f"{service['url']}/secure")]
    assert [r.status_code for r in scored] == [200, 200]
    assert scored[0].json()["risk"] == pytest.approx(scored[1].json()["risk"])


IMPLAUSIBLE = [  # (change to a valid body, loc, message fragment, the value that must not come back)
    (
        {"events": [_events(1)[0], {"code": "CONDITION/1", "time": "2100-05-05T00:00:00"}]},
        "events",
        "events[1].time is after",
        "2100",
    ),
    (
        {"events": [{"code": "CONDITION/1", "time": "1899-12-30T00:00:00"}]},
        "events",
        "events[0].time is before 1900",
        "1899",
    ),
    (
        {"events": [{"code": "CONDITION/1", "time": "1950-05-05T00:00:00"}]},
        "events",
        "events[0].time is before birth_date",
        "1950-05-05",
    ),
    ({"birth_date": "0001-01-01"}, "birth_date", "before 1900", "0001-01-01"),
    ({"prediction_time": "2100-05-05T00:00:00"}, "prediction_time", "after the request's own clock", "2100"),
    (
        {"birth_date": "1900-03-03", "prediction_time": "2026-03-04T00:00:00"},
        "prediction_time",
        "over 125",
        "1900-03-03",
    ),
]


def test_implausible_dates_are_a_422_naming_the_field_never_the_value(service):
    for change, field, message, value in IMPLAUSIBLE:
        response = post(f"{service['url']}/v1/score", {**_valid(), **change})
        assert response.status_code == 422, (field, response.text[:300])
        [error] = response.json()["detail"]
        assert error["loc"] == ["body", field] and message in error["msg"]
        assert value not in response.text


def test_openapi_lists_every_status_of_the_v1_routes(service):
    paths = requests.get(f"{service['url']}/openapi.json", timeout=30).json()["paths"]
    for path, method in (("/v1/score", "post"), ("/v1/score:batch", "post"), ("/v1/explain", "post")):
        assert {"200", "400", "401", "413", "422", "500", "503"} <= set(paths[path][method]["responses"])
    assert {"200", "401", "503"} <= set(paths["/v1/model"]["get"]["responses"])
    assert set(paths["/healthz"]["get"]["responses"]) == {"200"}


def test_serve_command_refuses_a_port_another_server_answers_on(service, model_dirs, capsys):
    """Serve's proxy shares a port (SO_REUSEPORT): without this check a second service would take part of
    the traffic. This cluster's own proxy is recognised (a redeploy); a plain listener is not."""
    from ehrfm.serve.app import main
    from ehrfm.serve.port import foreign_listener
    from tests.support.serve_app import token_file

    own_port = int(service["url"].rsplit(":", 1)[1])
    assert foreign_listener("127.0.0.1", own_port, {"ehrfm", "secure"}) is None
    assert f"127.0.0.1:{own_port}" in foreign_listener("127.0.0.1", own_port, None)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = main(["--model-dir", str(model_dirs[1]), "--port", str(port), f"auth.token_file={token_file()}"])
    refusals = [line for line in capsys.readouterr().err.splitlines() if f"127.0.0.1:{port}" in line]
    assert code == 2
    assert refusals == [
        f"ehrfm serve: 127.0.0.1:{port} already accepts connections and is not this Ray cluster's Serve proxy; "
        "stop what listens there or choose another --port"
    ]


# ---- JSON fuzzing: no input makes a 5xx -------------------------------------------------------------
_json_leaf = (
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats(allow_nan=True) | st.text(max_size=12)
)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_times = st.datetimes().map(dt.datetime.isoformat)
_aware = st.tuples(_times, st.sampled_from(["", "Z", "+14:00", "-12:00", "+05:30"])).map("".join)
_codes = st.sampled_from(
    [
        code("CONDITION", 320128),
        code("MEASUREMENT", 3004410),
        code("VISIT", 9202),
        code("DRUG", 1503297),
        code("GENDER", 8507),
        "MEDS_BIRTH",
        f"CONDITION/{UNKNOWN_CONDITION}",
        "",
        "x" * 300,
    ]
) | st.text(max_size=20)
_values = (
    st.none() | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**40), 10**40) | st.text(max_size=5)
)
_event = st.fixed_dictionaries({"code": _codes, "time": _aware | _json_leaf}, optional={"numeric_value": _values})
_record = st.fixed_dictionaries(
    {
        "birth_date": st.dates().map(dt.date.isoformat) | _json_leaf,
        "sex": st.sampled_from(["male", "female", "other", "unknown", "MALE", ""]) | _json_leaf,
    },
    optional={
        "events": st.lists(_event, max_size=8) | _json,
        "race_concept_id": st.integers(-5, 10**19) | _json_leaf,
        "prs": st.dictionaries(st.sampled_from(PGS_IDS) | st.text(max_size=10), _values, max_size=5) | _json,
        "prediction_time": _aware | _json_leaf,
        "extra": _json,
    },
)
_vocab_codes = st.sampled_from(
    [
        code("CONDITION", 320128),
        code("MEASUREMENT", 3004410),
        code("VISIT", 9202),
        visit_end(9202),
        code("DRUG", 1503297),
        f"CONDITION/{UNKNOWN_CONDITION}",
    ]
) | st.text(min_size=1, max_size=20)


_finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def _plausible(draw) -> dict:
    """Mostly valid records (events after birth, known or unknown codes, extreme but finite
    values), so the model path itself is fuzzed, not only validation."""
    birth = draw(st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2000, 1, 1)))
    # times up to 2025 (births from 1900: ages up to 125), so plausibility lets them through to the model
    offsets = st.integers(0, int((dt.datetime(2025, 1, 1) - dt.datetime.combine(birth, dt.time())).total_seconds()))

    def at(seconds: int) -> str:
        return (dt.datetime.combine(birth, dt.time()) + dt.timedelta(seconds=seconds)).isoformat()

    events = draw(
        st.lists(
            st.builds(
                lambda code, t, value: {"code": code, "time": at(t), **value},
                _vocab_codes,
                offsets,
                st.just({}) | st.builds(lambda v: {"numeric_value": v}, _finite),
            ),
            max_size=30,
        )
    )
    record = {
        "birth_date": birth.isoformat(),
        "sex": draw(st.sampled_from(["male", "female", "other", "unknown"])),
        "events": events,
        "race_concept_id": draw(st.integers(0, 10**12)),
    }
    if draw(st.booleans()):
        record["prs"] = draw(st.dictionaries(st.sampled_from(PGS_IDS), _finite, max_size=4))
    if not events or draw(st.booleans()):
        record["prediction_time"] = at(draw(offsets))
    return record


_bodies = st.one_of(
    _plausible(),
    _record,
    st.fixed_dictionaries({"persons": st.lists(_plausible(), max_size=3)}),
    st.fixed_dictionaries({"persons": st.lists(_record, max_size=3)}),
    _json,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(body=_bodies, route=st.sampled_from(["score", "score:batch", "explain"]))
def test_fuzzed_bodies_never_get_a_5xx(service, body, route):
    response = post(f"{service['url']}/v1/{route}", json.dumps(body, allow_nan=True))
    assert response.status_code < 500, (route, response.status_code, response.text[:300])
    event(f"HTTP {response.status_code}")


# ---- Schemathesis: requests generated from the OpenAPI document ----------------------------------------
# What the document promises: no 5xx, only documented statuses, content types, headers and bodies,
# invalid bodies refused, and the bearer token enforced. Schema-valid bodies may still be refused
# (422): plausibility (times not in the future, events after birth) is beyond JSON Schema.
SCHEMA_CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
    checks.ignored_auth,
]


def test_generated_requests_get_the_responses_the_openapi_document_promises(service):
    """Every operation of the service's own OpenAPI document (fetched over HTTP, as a client would),
    positive and negative cases generated by Schemathesis."""
    schema = schemathesis.openapi.from_url(f"{service['url']}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/score", "/v1/score:batch", "/v1/explain", "/v1/model"}
    calls = Counter()
    for operation in operations:

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def conforms(case) -> None:
            response = case.call_and_validate(
                headers={"Authorization": f"Bearer {TOKEN}"}, checks=SCHEMA_CHECKS, timeout=60
            )
            calls[response.status_code // 100] += 1

        conforms()
    assert calls[2] > 0 and calls[4] > 0  # both accepted and refused requests were generated
