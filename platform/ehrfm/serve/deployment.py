"""The two Serve deployments: `RiskModel` (model replicas) and `ScoringAPI` (FastAPI ingress).

RiskModel
- `reconfigure(user_config)` (Serve calls it at start and on every user_config change, without
  replacing the replica) loads the model named by model_uri/model_version in a thread, then swaps
  it in with one assignment: requests keep being scored by the old version until the new one has
  loaded and passed its canary, so a version switch fails no request. Each batch holds on to the
  model it started with and reports that version.
- `score` is `@serve.batch`: single-person calls from any number of HTTP requests are scored
  together, `max_batch_size` / `batch_wait_timeout_s` from the user_config (size 1 = no batching).
  The model runs in a worker thread so the replica keeps answering health checks meanwhile.
- With `alias_poll_s` > 0 a replica re-resolves `models:/<name>@<alias>` on that period and
  switches by itself when the alias has moved.
- `check_health` fails while no model is loaded.

ScoringAPI
- Builds the FastAPI app at replica start (`__serve_build_asgi_app__`), with the bearer token read
  in the replica (env or secret file); with auth on and no token the replica does not start. Calls to RiskModel are retried (`retries`, short backoff)
  when the replica they went to died: scoring is a pure function of the request, so a retry on
  another replica is safe and a killed model replica loses no request.

Logs hold versions, counts and exception types only, never request content.
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
    """The RiskModel user_config (ServeConfig.model_user_config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_uri: str
    model_version: str | None = None
    alias_poll_s: float = 0.0
    tracking_uri: str | None = None
    min_prs_share: float = 0.5
    max_batch_size: int = _DEFAULT_BATCH.max_batch_size
    batch_wait_timeout_s: float = _DEFAULT_BATCH.batch_wait_timeout_s
    explain_max_events: int = 64
    explain_top_k: int = 10

    def model_identity(self) -> tuple:
        return self.model_uri, self.model_version, self.tracking_uri, self.min_prs_share


def _stamp(outcome: dict[str, Any], loaded: model_store.LoadedModel) -> dict[str, Any]:
    if "result" in outcome:
        outcome["result"].update(model_name=loaded.ref.name, model_version=loaded.ref.version)
    return outcome


@serve.deployment(name="RiskModel")
class RiskModelDeployment:
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
            await self._switch(settings.model_uri, settings.model_version, settings.min_prs_share)
        # only once the model loaded: a failed update leaves the replica as it was
        self.score.set_max_batch_size(settings.max_batch_size)
        self.score.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self._settings = settings
        self._restart_poller(settings)

    async def _switch(self, model_uri: str, pinned: str | None, min_prs_share: float) -> bool:
        """Load the model `model_uri` names now unless it is the one in service; True if swapped."""
        async with self._load_lock:
            ref = await asyncio.to_thread(model_store.resolve, model_uri, pinned)
            current = self._loaded
            if current is not None and current.ref == ref and current.predictor.min_prs_share == min_prs_share:
                return False
            loaded = await asyncio.to_thread(model_store.load, ref, min_prs_share)
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
                await self._switch(settings.model_uri, None, settings.min_prs_share)
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

    @serve.batch(max_batch_size=_DEFAULT_BATCH.max_batch_size, batch_wait_timeout_s=_DEFAULT_BATCH.batch_wait_timeout_s)
    async def score(self, records: list[PersonRecord]) -> list[dict[str, Any]]:
        loaded = self._model()
        outcomes = await asyncio.to_thread(score_records, loaded.predictor, records)
        return [_stamp(o, loaded) for o in outcomes]

    async def explain(self, record: PersonRecord) -> dict[str, Any]:
        loaded, settings = self._model(), self._settings
        outcome = await asyncio.to_thread(
            explain_record, loaded.predictor, record, settings.explain_max_events, settings.explain_top_k
        )
        return _stamp(outcome, loaded)

    def info(self) -> dict[str, Any]:
        return self._model().info()

    def check_health(self) -> None:
        self._model()


@serve.deployment(name="ScoringAPI")
@serve.ingress()
class ScoringIngress:
    def __init__(self, model: Any, settings: dict[str, Any]) -> None:
        self._config = ServeConfig.model_validate(settings)
        self._model = model
        self._token = read_token(self._config.auth)  # TokenError: auth on without a token, no replica starts
        if self._token is None:
            logger.warning("scoring API up; bearer auth is DISABLED (auth.enabled=false): /v1 routes are open")
        else:
            logger.info("scoring API up; bearer auth on")

    def __serve_build_asgi_app__(self):
        return create_api(self, self._config.limits, self._token)

    async def _call(self, method: str, *args: Any) -> Any:
        """One call to a RiskModel replica, retried on another one when its replica died."""
        attempts = self._config.retries + 1
        for attempt in range(attempts):
            try:
                return await getattr(self._model, method).remote(*args)
            except _REPLICA_GONE as exc:
                logger.warning(
                    "RiskModel replica lost during %s (%s); attempt %d of %d",
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

    async def score(self, records: list[PersonRecord]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self._call("score", record) for record in records)))

    async def explain(self, record: PersonRecord) -> dict[str, Any]:
        return await self._call("explain", record)

    async def model_info(self) -> dict[str, Any]:
        return await self._call("info")


def build_deployments(config: ServeConfig):
    """The bound application: ScoringAPI -> RiskModel, sized and configured from `config`."""
    model = RiskModelDeployment.options(
        user_config=config.model_user_config(), **config.model_deployment.deployment_options()
    )
    ingress = ScoringIngress.options(**config.ingress_deployment.deployment_options())
    return ingress.bind(model.bind(), config.model_dump(mode="json"))
