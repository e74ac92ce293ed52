"""The Serve deployments of the scoring service, in one of two topologies (`ServeConfig.topology`).

one_hop (default): `RiskModel` is the FastAPI ingress itself. The proxy hands a request to a model
replica, which validates it, waits in its `@serve.batch` queue with other requests and scores
them together: no second Serve call, no second serialization of the person. Behind the HAProxy
ingress (serve/ingress.py, the default) a request whose replica dies, before or while holding it,
is replayed on another replica, and so is one whose response it was writing: its HTTP server sends
each response whole or resets the connection (serve/whole_response.py; before it, 2 responses in 50
kills were cut after their headers, docs/OPERATIONS.md "Failures"). Behind Serve's Python proxy a
replica that dies takes every request it holds with it. Run 2 replicas.

two_hop: a thin `ScoringAPI` ingress validates and forwards to `RiskModel` replicas, retrying on
another replica when the one it called died (scoring is a pure function of the request, so a retry
is safe): a killed model replica fails no request behind Serve's Python proxy either, since the
ingress that answers the client lives on, at the cost of one more Serve call per request (behind HAProxy at 100
requests/s on 2 cores: 2.3-6.3 ms more CPU per request, p99 28-47 ms against 10-18 ms; bench/serve.py).

Both: `Explainer` is a deployment of its own, with its own concurrency limit, so explanations
(one forward pass per occluded event) queue there and never in front of scoring.

Model replicas (`_ModelHolder`)
- `reconfigure(user_config)` (Serve calls it at start and on every user_config change, without
  replacing the replica) loads the model named by model_uri/model_version in a thread, then swaps
  it in with one assignment: requests keep being scored by the old version until the new one has
  loaded and passed its canary, so a version switch fails no request. Each batch holds on to the
  model it started with and reports that version.
- `score_person` is `@serve.batch`: single-person calls are scored together,
  `max_batch_size` / `batch_wait_timeout_s` from the user_config. With the default wait of 0 a
  batch takes whatever queued while the previous one ran, so batches grow with the load and an
  idle service adds no wait. `score_persons` scores a `/v1/score:batch` request as one batch.
  The model runs in a worker thread so the replica keeps answering health checks meanwhile.
- With `alias_poll_s` > 0 a replica re-resolves `models:/<name>@<alias>` on that period and
  switches by itself when the alias has moved.
- `check_health` fails while no model is loaded.

The bearer token is read in the ingress replica (env or secret file); with auth on and no token
the replica does not start. Logs hold versions, counts and exception types only, never request
content.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from ehrfm.serve import model_store
from ehrfm.serve.api import ModelUnavailable, create_api
from ehrfm.serve.auth import read_token
from ehrfm.serve.config import BatchingConfig, ServeConfig
from ehrfm.serve.scoring import explain_record, score_records
from ehrfm.transfer.predictor import PersonRecord

logger = logging.getLogger("ray.serve")
_DEFAULT_BATCH = BatchingConfig()
_REPLICA_GONE = (RayActorError, ReplicaUnavailableError)


class ModelSettings(BaseModel):
    """The user_config of the model-holding deployments (ServeConfig.model_user_config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_uri: str
    model_version: str | None = None
    alias_poll_s: float = 0.0
    tracking_uri: str | None = None
    min_prs_share: float = 0.5
    verify_weights: bool = True
    max_batch_size: int = _DEFAULT_BATCH.max_batch_size
    batch_wait_timeout_s: float = _DEFAULT_BATCH.batch_wait_timeout_s
    explain_max_events: int = 64
    explain_top_k: int = 10

    def model_identity(self) -> tuple:
        return self.model_uri, self.model_version, self.tracking_uri, self.min_prs_share, self.verify_weights


def _stamp(outcome: dict[str, Any], loaded: model_store.LoadedModel) -> dict[str, Any]:
    if "result" in outcome:
        outcome["result"].update(model_name=loaded.ref.name, model_version=loaded.ref.version)
    return outcome


async def call_with_retries(handle: Any, method: str, args: tuple, retries: int) -> Any:
    """One call to a replica of `handle`'s deployment, retried on another one when its replica died."""
    attempts = retries + 1
    for attempt in range(attempts):
        try:
            return await getattr(handle, method).remote(*args)
        except _REPLICA_GONE as exc:
            logger.warning(
                "%s replica lost during %s (%s); attempt %d of %d",
                handle.deployment_name,
                method,
                type(exc).__name__,
                attempt + 1,
                attempts,
            )
            if attempt + 1 < attempts:
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
        except DeploymentUnavailableError as exc:
            raise ModelUnavailable(type(exc).__name__) from None
    raise ModelUnavailable(f"{method}: {attempts} attempts failed")


class _ModelHolder:
    """Loading, version switching and alias polling, shared by the scoring and explaining replicas."""

    def __init__(self) -> None:
        self._loaded: model_store.LoadedModel | None = None
        self._settings: ModelSettings | None = None
        self._load_lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        settings = ModelSettings.model_validate(user_config)
        if self._settings is None or self._settings.model_identity() != settings.model_identity():
            if settings.tracking_uri:
                import mlflow

                mlflow.set_tracking_uri(settings.tracking_uri)
            await self._switch(settings)
        # only once the model loaded: a failed update leaves the replica as it was
        self._apply(settings)
        self._settings = settings
        self._restart_poller(settings)

    def _apply(self, settings: ModelSettings) -> None:
        """Settings that take effect without a reload (batching, for the scorers)."""

    async def _switch(self, settings: ModelSettings, follow_alias: bool = False) -> bool:
        """Load the model the settings name now (the alias's current version when `follow_alias`)
        unless it is the one in service; True if swapped."""
        pinned = None if follow_alias else settings.model_version
        async with self._load_lock:
            ref = await asyncio.to_thread(model_store.resolve, settings.model_uri, pinned)
            current = self._loaded
            if (
                current is not None
                and current.ref == ref
                and current.predictor.min_prs_share == settings.min_prs_share
                and self._settings is not None
                and self._settings.verify_weights == settings.verify_weights
            ):
                return False
            loaded = await asyncio.to_thread(
                model_store.load, ref, settings.min_prs_share, verify_weights=settings.verify_weights
            )
            self._loaded = loaded
        logger.info(
            "serving %s version %s (was %s)", ref.name, ref.version, None if current is None else current.ref.version
        )
        return True

    def _restart_poller(self, settings: ModelSettings) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        if settings.alias_poll_s > 0 and "@" in settings.model_uri:
            self._poller = asyncio.get_running_loop().create_task(self._poll_alias(settings))

    async def _poll_alias(self, settings: ModelSettings) -> None:
        while True:
            await asyncio.sleep(settings.alias_poll_s)
            try:
                await self._switch(settings, follow_alias=True)
            except Exception as exc:  # noqa: BLE001  (keep serving the loaded version)
                logger.warning(
                    "alias check of %s failed (%s); still serving version %s",
                    settings.model_uri,
                    type(exc).__name__,
                    self._loaded.ref.version if self._loaded else None,
                )

    def _model(self) -> model_store.LoadedModel:
        if self._loaded is None:
            raise RuntimeError("no model loaded yet")
        return self._loaded

    def info(self) -> dict[str, Any]:
        return self._model().info()

    def check_health(self) -> None:
        self._model()


class _Scorer(_ModelHolder):
    """A model replica that scores: single persons through the batch queue, lists as one batch."""

    def _apply(self, settings: ModelSettings) -> None:
        self.score_person.set_max_batch_size(settings.max_batch_size)
        self.score_person.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    @serve.batch(max_batch_size=_DEFAULT_BATCH.max_batch_size, batch_wait_timeout_s=_DEFAULT_BATCH.batch_wait_timeout_s)
    async def score_person(self, records: list[PersonRecord]) -> list[dict[str, Any]]:
        return await self.score_persons(records)

    async def score_persons(self, records: list[PersonRecord]) -> list[dict[str, Any]]:
        loaded = self._model()
        outcomes = await asyncio.to_thread(score_records, loaded.predictor, records)
        return [_stamp(o, loaded) for o in outcomes]


@serve.deployment(name="Explainer")
class ExplainerDeployment(_ModelHolder):
    """Occlusion explanations on replicas of their own (max_ongoing_requests bounds them)."""

    async def explain(self, record: PersonRecord) -> dict[str, Any]:
        loaded, settings = self._model(), self._settings
        outcome = await asyncio.to_thread(
            explain_record, loaded.predictor, record, settings.explain_max_events, settings.explain_top_k
        )
        return _stamp(outcome, loaded)


class _Ingress:
    """The API side: bearer token, FastAPI app, explanations forwarded to the Explainer."""

    def _setup_api(self, settings: dict[str, Any], explainer: Any) -> None:
        self._config = ServeConfig.model_validate(settings)
        self._explainer = explainer
        self._token = read_token(self._config.auth)  # TokenError: auth on without a token, no replica starts
        if self._token is None:
            logger.warning("scoring API up; bearer auth is DISABLED (auth.enabled=false): /v1 routes are open")
        else:
            logger.info("scoring API up; bearer auth on")

    def __serve_build_asgi_app__(self):
        return create_api(self, self._config.limits, self._token)

    async def explain(self, record: PersonRecord) -> dict[str, Any]:
        return await call_with_retries(self._explainer, "explain", (record,), self._config.retries)


@serve.deployment(name="RiskModel")
@serve.ingress()
class RiskService(_Scorer, _Ingress):
    """one_hop: the model replica is the ingress."""

    def __init__(self, settings: dict[str, Any], explainer: Any) -> None:
        _Scorer.__init__(self)
        self._setup_api(settings, explainer)

    async def score(self, records: list[PersonRecord]) -> list[dict[str, Any]]:
        if len(records) == 1:
            return [await self.score_person(records[0])]
        return await self.score_persons(records)

    async def model_info(self) -> dict[str, Any]:
        try:
            return self.info()
        except RuntimeError:
            raise ModelUnavailable("no model loaded yet") from None


@serve.deployment(name="RiskModel")
class RiskModelDeployment(_Scorer):
    """two_hop: model replicas behind ScoringAPI."""


@serve.deployment(name="ScoringAPI")
@serve.ingress()
class ScoringIngress(_Ingress):
    """two_hop: validates and forwards to RiskModel replicas, retrying when one died."""

    def __init__(self, model: Any, settings: dict[str, Any], explainer: Any) -> None:
        self._model = model
        self._setup_api(settings, explainer)

    async def _call(self, method: str, *args: Any) -> Any:
        return await call_with_retries(self._model, method, args, self._config.retries)

    async def score(self, records: list[PersonRecord]) -> list[dict[str, Any]]:
        if len(records) == 1:
            return [await self._call("score_person", records[0])]
        return await self._call("score_persons", records)

    async def model_info(self) -> dict[str, Any]:
        return await self._call("info")


def build_deployments(config: ServeConfig):
    """The bound application, sized and configured from `config` (see the module docstring)."""
    user_config = config.model_user_config()
    settings = config.model_dump(mode="json")
    explainer = ExplainerDeployment.options(
        user_config=user_config, **config.explain_deployment.deployment_options()
    ).bind()
    model_options = config.model_deployment.deployment_options()
    if config.topology == "one_hop":
        return RiskService.options(user_config=user_config, **model_options).bind(settings, explainer)
    model = RiskModelDeployment.options(user_config=user_config, **model_options).bind()
    ingress = ScoringIngress.options(**config.ingress_deployment.deployment_options())
    return ingress.bind(model, settings, explainer)
