"""The HTTP API (FastAPI; OpenAPI at /docs, schema at /openapi.json), independent of Ray.

`create_api(backend, limits, token)` builds the app around a `ScoringBackend` (in Serve, the
ingress deployment that forwards to the model replicas). Request bodies are the predictor's own
`PersonRecord`, so the API validates exactly what the model accepts.

Errors are field-level and never echo input: a body that is not JSON is a 400, a JSON body that
fails validation (schema or plausibility) a 422, both with `detail` listing `{loc, msg, type}`
(pydantic's `input` and `ctx` are dropped); a body over the size limit is a 413, a missing or
wrong bearer token a 401 with `WWW-Authenticate: Bearer`, a scoring failure a 500, no model
replica able to answer a 503 with Retry-After. The OpenAPI document lists each of them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
from typing import Any, Literal, Protocol

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from ehrfm.serve.config import LimitsConfig
from ehrfm.serve.scoring import EXPLAIN_METHOD
from ehrfm.transfer.predictor import PersonRecord

API_VERSION = "v1"
READY_TIMEOUT_S = 5.0


class ScoringBackend(Protocol):
    """What the routes call; outcomes are `{"result": {...}}` or `{"error": {loc, msg, type}}`."""

    async def score(self, records: list[PersonRecord]) -> list[dict[str, Any]]: ...

    async def explain(self, record: PersonRecord) -> dict[str, Any]: ...

    async def model_info(self) -> dict[str, Any]: ...


class ModelUnavailable(RuntimeError):
    """No model replica answered (all retries spent, or none deployed yet): a 503."""


class ApiError(Exception):
    def __init__(self, status: int, errors: list[dict[str, Any]]):
        super().__init__(status)
        self.status, self.errors = status, errors


# ---- response bodies (the OpenAPI schema) --------------------------------------------------------
class ScoreResult(BaseModel):
    risk: float = Field(description="calibrated probability of the task's outcome within the horizon")
    risk_prs_masked: float = Field(description="the same risk with the PRS masked (model's missing-PRS path)")
    prs_contribution: float = Field(description="risk - risk_prs_masked")
    percentile: float | None = Field(description="percentile (0-100) of risk among the validation population")
    has_prs: bool = Field(description="whether the PRS counted as present (enough of the model's PGS ids given)")
    unknown_codes: int = Field(description="events up to the prediction time whose code the vocabulary lacks")
    truncated_events: int = Field(description="events up to the prediction time left out of the model's window")
    model_name: str
    model_version: str = Field(description="registry version that scored this person ('local' for a directory)")


class ScoreBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    persons: list[PersonRecord] = Field(min_length=1)


class ScoreBatchResponse(BaseModel):
    results: list[ScoreResult]


class EventContribution(BaseModel):
    index: int = Field(description="position of the event in the request's events list")
    code: str
    time: dt.datetime
    contribution: float = Field(description="risk with the event minus risk without it")


class ExplainResult(ScoreResult):
    method: Literal["occlusion"] = EXPLAIN_METHOD
    events: list[EventContribution]
    events_considered: int = Field(description="most recent events up to the prediction time that were occluded")
    events_not_considered: int = Field(description="older events up to the prediction time not occluded")


class ModelInfo(BaseModel):
    name: str
    version: str
    alias: str | None
    task: str
    horizon_days: int
    context: int
    history_windows: int  # windows of `context` tokens read per person, newest last
    head_inputs: str
    value_codes: int = Field(0, description="lab codes whose recent value bins the head reads beside the states")
    pgs_ids: list[str]
    min_prs_share: float
    calibrated: bool
    tokenizer_version: str
    metrics: dict[str, float]
    loaded_at: str


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="where: 'body', then field names and list positions")
    msg: str = Field(description="what is wrong (never the submitted value)")
    type: str


class FieldErrors(BaseModel):
    detail: list[FieldError]


class Message(BaseModel):
    detail: str


def error_responses(auth: bool, body: bool = True) -> dict[int | str, dict[str, Any]]:
    """The error statuses of a /v1 route, for the OpenAPI document (`body`: it reads a request body)."""
    responses: dict[int | str, dict[str, Any]] = {
        400: {"model": FieldErrors, "description": "the body is not valid JSON"},
        413: {"model": Message, "description": "the body is larger than the limit"},
        422: {"model": FieldErrors, "description": "the body fails validation: the fields are named, values never"},
        500: {"model": FieldErrors, "description": "scoring failed (the exception type only)"},
        503: {
            "model": Message,
            "description": "no model replica is available; retry after the Retry-After seconds",
            "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
        },
    }
    if not body:
        responses = {503: responses[503]}
    if auth:
        responses[401] = {
            "model": Message,
            "description": "missing or invalid bearer token",
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
        }
    return dict(sorted(responses.items(), key=lambda item: str(item[0])))


class Status(BaseModel):
    status: str
    model_name: str | None = None
    model_version: str | None = None


# ---- helpers -------------------------------------------------------------------------------------
def public_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Field-level errors without the submitted values (pydantic's `input`, `ctx`, `url`)."""
    return [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", "value_error"))}
        for e in errors
    ]


def _unwrap(outcome: dict[str, Any], loc: tuple) -> dict[str, Any]:
    if "error" in outcome:
        error = outcome["error"]
        status = 500 if error.get("type") == "scoring_error" else 422
        raise ApiError(status, [{**error, "loc": [*loc, *error.get("loc", [])]}])
    return outcome["result"]


def _check_events(record: PersonRecord, limits: LimitsConfig, loc: tuple) -> None:
    if len(record.events) > limits.max_events:
        raise ApiError(
            422,
            [
                {
                    "loc": [*loc, "events"],
                    "type": "too_long",
                    "msg": f"{len(record.events)} events; at most {limits.max_events} per person",
                }
            ],
        )


def bearer_guard(token: str | None):
    """A dependency that lets a request through only with `Authorization: Bearer <token>`
    (constant-time comparison); None means auth was disabled on purpose (auth.enabled=false)."""
    scheme = HTTPBearer(auto_error=False, description="the service's token (EHRFM_SERVE_TOKEN or its token file)")

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:
        if token is None:
            return
        given = "" if credentials is None else credentials.credentials
        if not hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8")):
            raise HTTPException(
                status_code=401, detail="missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    return check


def create_api(backend: ScoringBackend, limits: LimitsConfig, token: str | None = None) -> FastAPI:
    app = FastAPI(
        title="ehrfm risk scoring",
        version=API_VERSION,
        max_body_size=limits.max_body_bytes,
        description=(
            "Risk of a task's outcome from a person's coded events, birth date, sex and optional "
            "polygenic risk scores, by the model registered under the served alias. "
            f"Limits: {limits.max_body_bytes} bytes per body, {limits.max_events} events per person, "
            f"{limits.max_persons} persons per batch. Explanations are by occlusion."
        ),
    )
    guarded = [Depends(bearer_guard(token))]
    errors = error_responses(auth=token is not None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = public_errors(list(exc.errors()))
        not_json = any(error["type"] == "json_invalid" for error in detail)
        return JSONResponse(status_code=400 if not_json else 422, content={"detail": detail})

    @app.exception_handler(OverflowError)
    async def _out_of_range(request: Request, exc: OverflowError) -> JSONResponse:
        # a datetime validator converting an extreme offset time (year 1 or 9999) to UTC overflows;
        # pydantic passes only ValueError on as a validation error, so this one arrives bare
        return JSONResponse(
            status_code=422,
            content={
                "detail": [
                    {"loc": ["body"], "msg": "a date or time is out of the supported range", "type": "value_error"}
                ]
            },
        )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": public_errors(exc.errors)})

    @app.exception_handler(ModelUnavailable)
    async def _unavailable(request: Request, exc: ModelUnavailable) -> JSONResponse:
        return JSONResponse(
            status_code=503, headers={"Retry-After": "1"}, content={"detail": "no model replica is available; retry"}
        )

    @app.get("/healthz", response_model=Status, tags=["operations"])
    async def healthz() -> Status:
        """Liveness: the API process answers."""
        return Status(status="ok")

    @app.get(
        "/readyz",
        response_model=Status,
        tags=["operations"],
        responses={503: {"description": "no model loaded or reachable yet"}},
    )
    async def readyz() -> Status | JSONResponse:
        """Readiness: a model replica answers with its loaded model."""
        try:
            info = await asyncio.wait_for(backend.model_info(), READY_TIMEOUT_S)
        except (TimeoutError, ModelUnavailable):
            return JSONResponse(status_code=503, content={"status": "not ready"})
        return Status(status="ready", model_name=info["name"], model_version=info["version"])

    @app.get(
        f"/{API_VERSION}/model",
        response_model=ModelInfo,
        dependencies=guarded,
        responses=error_responses(token is not None, body=False),
        tags=["model"],
    )
    async def model() -> dict[str, Any]:
        """The served model: registry name and version, task, horizon, PGS ids, validation metrics."""
        return await backend.model_info()

    @app.post(
        f"/{API_VERSION}/score", response_model=ScoreResult, dependencies=guarded, responses=errors, tags=["scoring"]
    )
    async def score(person: PersonRecord) -> dict[str, Any]:
        """Score one person. Events after the prediction time (default: the last event's time) are
        ignored; PGS ids the model does not use are refused; missing ones count as missing (a
        person with fewer than `min_prs_share` of the ids is scored as not genotyped)."""
        _check_events(person, limits, ("body",))
        [outcome] = await backend.score([person])
        return _unwrap(outcome, ("body",))

    @app.post(
        f"/{API_VERSION}/score:batch",
        response_model=ScoreBatchResponse,
        dependencies=guarded,
        responses=errors,
        tags=["scoring"],
    )
    async def score_batch(request: ScoreBatchRequest) -> dict[str, Any]:
        """Score many persons; any invalid person fails the request with its index in `loc`."""
        if len(request.persons) > limits.max_persons:
            raise ApiError(
                422,
                [
                    {
                        "loc": ["body", "persons"],
                        "type": "too_long",
                        "msg": f"{len(request.persons)} persons; at most {limits.max_persons}",
                    }
                ],
            )
        for i, person in enumerate(request.persons):
            _check_events(person, limits, ("body", "persons", i))
        outcomes = await backend.score(request.persons)
        return {"results": [_unwrap(o, ("body", "persons", i)) for i, o in enumerate(outcomes)]}

    @app.post(
        f"/{API_VERSION}/explain",
        response_model=ExplainResult,
        dependencies=guarded,
        responses=errors,
        tags=["scoring"],
    )
    async def explain(person: PersonRecord) -> dict[str, Any]:
        """Score one person and name the events that move the risk most, by occlusion: each of the
        most recent events up to the prediction time is removed once and the person rescored
        (contribution = risk with - risk without). PRS contribution = risk - risk with PRS masked."""
        _check_events(person, limits, ("body",))
        return _unwrap(await backend.explain(person), ("body",))

    return app
