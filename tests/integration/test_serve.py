"""The scoring service over real HTTP: Ray Serve (`serve.run` on the session's Ray cluster) in
front of models registered in a real loopback MLflow server.

Two applications run side by side: `ehrfm` (route /, 2 RiskModel replicas, auth off, small
limits) and `secure` (route /secure, 1 replica, bearer token from a secret file, polling the
alias every second). Checked: scores equal the offline path's predictions; occlusion
explanations equal rescoring without the event; every bad input is a 4xx naming the field and
echoing no value; nothing a request carried reaches the logs; auth on and off; a killed model
replica and a version switch under load fail no request; a hypothesis fuzz finds no 5xx.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ehrfm.cluster.local import free_port
from ehrfm.mlops.registry import log_risk_model, register_if_better
from ehrfm.model.risk import load_risk_model
from ehrfm.serve.app import build_app
from tests.support.risk_model_factory import (
    PGS_IDS,
    UNKNOWN_CONDITION,
    labels_at,
    make_person,
    offline_risks,
    offline_timelines,
    person_record,
    write_risk_model,
    write_tokenizer,
)

TASK = "servetest"  # its own registered model, so versions do not depend on other test files
MODEL = f"ehrfm-{TASK}"
TOKEN = "s3cret-test-token-0123456789"
MAX_EVENTS, MAX_PERSONS, MAX_BODY = 60, 4, 32 * 1024
MARKER_CODE, MARKER_BIRTH = "CONDITION/987650321", "1931-03-17"  # must never reach a log


# ---- configuration (no Ray) -------------------------------------------------------------------------
def test_serve_config_file_and_rayservice_args_are_valid_for_serve_and_build_a_config(repo_root, tmp_path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from ehrfm.serve.app import config_from_args

    schema = ServeDeploySchema.model_validate(yaml.safe_load((repo_root / "cluster" / "serve.yaml").read_text()))
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "ehrfm.serve.app:build_app"
    config = config_from_args(app.args)
    assert config.model_uri == "models:/ehrfm-t2d@champion" and config.model_deployment.autoscaling["max_replicas"] == 4
    assert "num_replicas" not in config.model_deployment.deployment_options()
    rayservice = next(
        d
        for d in yaml.safe_load_all((repo_root / "cluster" / "kuberay" / "rayservice.yaml").read_text())
        if d and d.get("kind") == "RayService"
    )
    (service_app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    assert config_from_args(service_app["args"]).model_uri.endswith("@champion")
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(app.args))
    dotted = config_from_args(
        {"config": str(tmp_path / "args.yaml"), "batching.max_batch_size": "1", "model_deployment": {"num_cpus": 0.5}}
    )
    assert dotted.batching.max_batch_size == 1 and dotted.model_deployment.num_cpus == 0.5
    assert dotted.model_deployment.autoscaling["min_replicas"] == 1  # nested dicts merge, not replace
    with pytest.raises(ValueError, match="batch_size"):
        config_from_args({"model_uri": "models:/m@a", "batching": {"batch_size": 4}})
    with pytest.raises(ValueError, match="max_replica"):
        config_from_args({"model_uri": "models:/m@a", "model_deployment": {"autoscaling": {"max_replica": 3}}})


def test_bearer_token_comes_from_the_environment_or_a_secret_file(tmp_path):
    from ehrfm.serve.auth import read_token
    from ehrfm.serve.config import AuthConfig

    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    assert read_token(AuthConfig(), {}) is None
    assert read_token(AuthConfig(), {"EHRFM_SERVE_TOKEN": "from-env"}) == "from-env"
    assert read_token(AuthConfig(), {"EHRFM_SERVE_TOKEN_FILE": str(secret)}) == "from-file"
    assert read_token(AuthConfig(token_file=str(secret)), {}) == "from-file"
    with pytest.raises(RuntimeError, match="auth.required"):
        read_token(AuthConfig(required=True), {})
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        read_token(AuthConfig(token_file=str(tmp_path / "empty")), {})


@pytest.fixture(scope="module")
def tracking(mlflow_server):
    """This module logs and registers on the session's loopback server (previous URI restored)."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("serve-tests")
    try:
        yield mlflow_server
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-models")
    tokenizer = write_tokenizer(root / "tokenizer.json")
    return {v: write_risk_model(root / f"v{v}", tokenizer, seed=v, task=TASK) for v in (1, 2)}


@pytest.fixture(scope="module")
def version_one(tracking, model_dirs):
    uri = log_risk_model(model_dirs[1], TASK, {"val_auroc": 0.61}, "# test model 1\n")
    registered = register_if_better(uri, TASK, 0.61)
    assert registered["version"] == 1 and registered["promoted"]
    return registered


def app_args(tracking_uri: str, **extra) -> dict:
    return {
        "model_uri": f"models:/{MODEL}@champion",
        "tracking_uri": tracking_uri,
        "limits": {"max_events": MAX_EVENTS, "max_persons": MAX_PERSONS, "max_body_bytes": MAX_BODY},
        # requests wait up to 20 ms for batch-mates, so a replica under load always holds some
        "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.02},
        "model_deployment": {"num_replicas": 2, "num_cpus": 0.2, "health_check_period_s": 2.0},
        "ingress_deployment": {"num_cpus": 0.2},
        **extra,
    }


@pytest.fixture(scope="module")
def service(ray_cluster, tracking, version_one, tmp_path_factory):
    from ray import serve

    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args(tracking, model_version="1")), name="ehrfm", route_prefix="/")
    serve.run(
        build_app(
            app_args(
                tracking,
                alias_poll_s=1.0,
                auth={"token_file": str(token_file)},
                model_deployment={"num_replicas": 1, "num_cpus": 0.2},
            )
        ),
        name="secure",
        route_prefix="/secure",
    )
    yield {"url": f"http://127.0.0.1:{port}", "tracking": tracking}
    serve.shutdown()


def post(url: str, body, **kwargs) -> requests.Response:
    return requests.post(
        url,
        data=body if isinstance(body, (bytes, str)) else json.dumps(body),
        headers={"Content-Type": "application/json", **kwargs.pop("headers", {})},
        timeout=60,
        **kwargs,
    )


FULL_PRS = {k: 0.9 - 0.6 * i for i, k in enumerate(PGS_IDS)}


def persons_and_requests():
    """A genotyped person with an unknown code, one without PRS, one with a partial PRS vector."""
    people = [
        make_person(31, seed=11, n_visits=8, prs=FULL_PRS, unknown_code=True),
        make_person(32, seed=12, n_visits=5, sex=8507),
        make_person(33, seed=13, n_visits=6, prs={PGS_IDS[0]: 1.4, PGS_IDS[3]: -0.3}),
    ]
    times = [dt.datetime.combine(p.visits[-2][1], dt.time(15)) for p in people]
    return people, times, [person_record(p, t) for p, t in zip(people, times)]


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
    info = requests.get(f"{url}/v1/model", timeout=30).json()
    assert (info["name"], info["version"], info["alias"], info["task"]) == (MODEL, "1", "champion", TASK)
    assert info["pgs_ids"] == PGS_IDS and info["metrics"]["val_auroc"] == pytest.approx(0.61)
    assert requests.get(f"{url}/docs", timeout=30).status_code == 200
    paths = requests.get(f"{url}/openapi.json", timeout=30).json()["paths"]
    assert {"/v1/score", "/v1/score:batch", "/v1/explain", "/v1/model", "/healthz", "/readyz"} <= set(paths)


def _valid() -> dict:
    return {
        "birth_date": "1961-04-02",
        "sex": "female",
        "prs": {PGS_IDS[0]: 0.3},
        "events": [
            {"code": "CONDITION/320128", "time": "2001-01-01T00:00:00"},
            {"code": "MEASUREMENT/3004410", "time": "2001-02-01T00:00:00", "numeric_value": 6.2},
        ],
    }


def _events(n: int) -> list[dict]:
    return [{"code": "CONDITION/320128", "time": f"20{10 + i // 300:02d}-01-01T00:00:00"} for i in range(n)]


TRUNCATED_JSON = b'{"birth_date": "1961-04-02", "sex": '
BAD_INPUTS = [  # (route, raw body, status, loc of the first error)
    ("score", TRUNCATED_JSON, 422, ["body", len(TRUNCATED_JSON)]),
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
                    {"code": "MEASUREMENT/3004410", "time": "2001-02-01T00:00:00", "numeric_value": float("nan")}
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
    for value in ("1961-04-02", "1950-05-05", "81.5", "[1961]"):  # unknown PGS ids are named: not patient data
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


def test_bearer_auth_guards_the_v1_routes_only_when_a_token_is_configured(service):
    url = f"{service['url']}/secure"
    _, _, bodies = persons_and_requests()
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert post(f"{url}/v1/score", bodies[1]).status_code == 401
    assert post(f"{url}/v1/score", bodies[1], headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert post(f"{url}/v1/score", bodies[1], headers={"Authorization": TOKEN}).status_code == 401
    assert requests.get(f"{url}/v1/model", timeout=30).status_code == 401
    unauthorized = post(f"{url}/v1/explain", bodies[1])
    assert unauthorized.status_code == 401 and unauthorized.headers["WWW-Authenticate"] == "Bearer"
    scored = post(f"{url}/v1/score", bodies[1], headers=good)
    assert scored.status_code == 200
    assert scored.json()["risk"] == pytest.approx(post(f"{service['url']}/v1/score", bodies[1]).json()["risk"])
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    assert requests.get(f"{url}/readyz", timeout=30).status_code == 200
    assert requests.get(f"{url}/v1/model", headers=good, timeout=30).status_code == 200
    assert post(f"{service['url']}/v1/score", bodies[1]).status_code == 200  # the open app has no token


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
        "CONDITION/320128",
        "MEASUREMENT/3004410",
        "VISIT/9202",
        "DRUG/1503297",
        "GENDER/8507",
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
        "CONDITION/320128",
        "MEASUREMENT/3004410",
        "VISIT/9202",
        "VISIT_END/9202",
        "DRUG/1503297",
        f"CONDITION/{UNKNOWN_CONDITION}",
    ]
) | st.text(min_size=1, max_size=20)


_finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def _plausible(draw) -> dict:
    """Mostly valid records (events after birth, known or unknown codes, extreme but finite
    values), so the model path itself is fuzzed, not only validation."""
    birth = draw(st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2000, 1, 1)))
    offsets = st.integers(0, 120 * 365 * 86_400)

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
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(body=_bodies, route=st.sampled_from(["score", "score:batch", "explain"]))
def test_fuzzed_bodies_never_get_a_5xx(service, body, route):
    response = post(f"{service['url']}/v1/{route}", json.dumps(body, allow_nan=True))
    assert response.status_code < 500, (route, response.status_code, response.text[:300])
    event(f"HTTP {response.status_code}")


# ---- load: a killed replica and a version switch lose no request ------------------------------------
class Load:
    """Client threads scoring one person in a loop (no client retries); records every outcome."""

    def __init__(self, url: str, body: dict, threads: int = 3):
        self.url, self.body = url, body
        self.outcomes: list[tuple[float, int, str | None, float | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            try:
                response = session.post(f"{self.url}/v1/score", json=self.body, timeout=120)
                ok = response.status_code == 200
                self.outcomes.append(
                    (
                        time.monotonic(),
                        response.status_code,
                        response.json()["model_version"] if ok else response.text[:200],
                        response.json()["risk"] if ok else None,
                    )
                )
            except requests.RequestException as exc:
                self.outcomes.append((time.monotonic(), -1, type(exc).__name__, None))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=150)

    def wait_for(self, n: int, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.outcomes) < n and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(self.outcomes) >= n, f"only {len(self.outcomes)} requests in {timeout_s}s"

    def failures(self) -> list:
        return [o for o in self.outcomes if o[1] != 200]


def replica_actors(app: str, deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


@pytest.mark.e2e
def test_killing_a_model_replica_under_load_loses_no_request(service, ray_cluster):
    body = persons_and_requests()[2][0]
    replicas = replica_actors("ehrfm", "RiskModel")
    assert len(replicas) == 2
    with Load(service["url"], body, threads=6) as load:
        load.wait_for(30)
        ray_cluster.kill(ray_cluster.get_actor(replicas[0], namespace="serve"), no_restart=True)
        killed_at = len(load.outcomes)
        load.wait_for(killed_at + 60)
    assert load.failures() == []
    # requests that were on the killed replica were retried by the ingress, not lost or failed
    serve_logs = Path(ray_cluster._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    retried = [
        line
        for path in serve_logs.glob("replica_ehrfm_ScoringAPI_*.log")
        for line in path.read_text(errors="replace").splitlines()
        if "RiskModel replica lost" in line
    ]
    # a kill between requests needs no retry; any retry that happened was for a lost replica
    assert all("ActorDiedError" in line or "Unavailable" in line for line in retried)
    risks = [o[3] for o in load.outcomes]
    assert max(risks) - min(risks) < 1e-6  # one person, one model: one risk (float32 batch rounding aside)
    deadline = time.monotonic() + 120
    while replicas[0] in replica_actors("ehrfm", "RiskModel") or len(replica_actors("ehrfm", "RiskModel")) < 2:
        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        time.sleep(1.0)


@pytest.mark.e2e
def test_version_switch_under_load_fails_no_request_and_reports_the_new_version(service, model_dirs):
    body = persons_and_requests()[2][1]
    expected = {}
    with Load(service["url"], body) as load:
        load.wait_for(20)
        uri = log_risk_model(model_dirs[2], TASK, {"val_auroc": 0.7}, "# test model 2\n")
        moved = register_if_better(uri, TASK, 0.7)
        assert moved["version"] == 2 and moved["promoted"] and moved["previous_champion_version"] == 1
        from ray import serve

        # the redeploy `ehrfm serve` does after the alias moved: the pinned version changes
        serve.run(build_app(app_args(service["tracking"], model_version="2")), name="ehrfm", route_prefix="/")
        switched_at = len(load.outcomes)
        load.wait_for(switched_at + 40)
    assert load.failures() == []
    versions = [o[2] for o in load.outcomes]
    assert versions[:20] == ["1"] * 20 and versions[-20:] == ["2"] * 20
    assert set(versions) == {"1", "2"}
    for version in ("1", "2"):
        risks = [o[3] for o in load.outcomes if o[2] == version]
        expected[version] = risks[0]
        assert max(risks) - min(risks) < 1e-6
    assert not math.isclose(expected["1"], expected["2"], rel_tol=1e-3)  # different weights, different risk
    # the alias-polling app switched by itself, without a redeploy
    headers = {"Authorization": f"Bearer {TOKEN}"}
    deadline = time.monotonic() + 120
    while True:
        response = post(f"{service['url']}/secure/v1/score", body, headers=headers).json()
        if response["model_version"] == "2" or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert response["model_version"] == "2" and response["risk"] == pytest.approx(expected["2"], rel=1e-5)
    assert Counter(versions)["2"] >= 20


@pytest.mark.e2e
def test_serve_command_deploys_the_champion_and_scores_made_up_persons_over_http(service, repo_root):
    """`ehrfm serve --smoke N` (what `make run` ends with), in its own process and Ray cluster."""
    import os
    import subprocess

    from mlflow import MlflowClient

    champion = MlflowClient().get_model_version_by_alias(MODEL, "champion").version
    env = {**os.environ, "MLFLOW_TRACKING_URI": service["tracking"], "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [
            sys.executable,
            "jobs/serve.py",
            "--model",
            MODEL,
            "--alias",
            "champion",
            "--port",
            str(free_port()),
            "--smoke",
            "3",
            "model_deployment.num_cpus=0.2",
            "ingress_deployment.num_cpus=0.2",
        ],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"deploying {MODEL} version {champion} (alias champion)" in done.stdout
    assert "3/3 persons scored over HTTP match the registered model's own predictions" in done.stdout
