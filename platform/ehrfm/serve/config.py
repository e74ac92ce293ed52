"""Settings of the scoring service, one StrictModel so a misspelt key fails at deploy time.

The same model validates the `args` of the Serve application (`ehrfm.serve.app:build_app`, from
cluster/serve.yaml, the RayService or `ehrfm serve`). What the model replicas need travels as
their `user_config` (`model_user_config`): Serve calls `reconfigure` with it when a replica
starts and whenever it changes alone (a `deployments: [{name: RiskModel, user_config: ...}]`
override in a Serve config file), without replacing the replica. A change of the `args`
themselves makes Serve replace the replicas one by one (a rolling update).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ehrfm.config import StrictModel

DEFAULT_TOKEN_ENV = "EHRFM_SERVE_TOKEN"
DEFAULT_TOKEN_FILE_ENV = "EHRFM_SERVE_TOKEN_FILE"


class BatchingConfig(StrictModel):
    """Dynamic batching of single-person requests inside a model replica (`@serve.batch`). With no
    wait (the default) a batch is whatever queued while the previous batch ran: one person when the
    service is idle, up to `max_batch_size` under load, so batches fill exactly when it pays."""

    max_batch_size: int = Field(default=32, ge=1, le=1024)  # 1 = no batching
    batch_wait_timeout_s: float = Field(default=0.0, ge=0.0, le=5.0)


class LimitsConfig(StrictModel):
    """Request limits; anything beyond them is a 413/422, never work for the model."""

    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    max_events: int = Field(default=4096, ge=1)  # events of one person
    max_persons: int = Field(default=64, ge=1)  # persons of one /v1/score:batch request


class ExplainConfig(StrictModel):
    """Occlusion explanations: the most recent `max_events` events up to the prediction time are
    each left out once and the person rescored; the `top_k` largest changes are returned."""

    max_events: int = Field(default=64, ge=1, le=1024)
    top_k: int = Field(default=10, ge=1, le=1024)


class AuthConfig(StrictModel):
    """Bearer token on the /v1 routes, required unless `enabled` is false (a deliberate opt-out,
    warned about at startup): scores are patient data, so an open API must be a choice, not an
    accident. The token comes from the environment variable `token_env`, else the file
    `token_file` (or the file the variable `token_file_env` names). With auth on and no token the
    application refuses to start; `ehrfm serve` first creates a token file (serve/auth.py)."""

    enabled: bool = True
    token_env: str = DEFAULT_TOKEN_ENV
    token_file_env: str = DEFAULT_TOKEN_FILE_ENV
    token_file: str | None = None


class DeploymentSizing(StrictModel):
    """Replicas and resources of one deployment. `autoscaling` is Ray Serve's autoscaling_config
    (min_replicas, max_replicas, target_ongoing_requests, ...); when set it replaces num_replicas."""

    num_replicas: int = Field(default=2, ge=1)
    autoscaling: dict[str, Any] | None = None
    num_cpus: float = Field(default=1.0, ge=0.0)
    max_ongoing_requests: int = Field(default=64, ge=1)
    health_check_period_s: float = Field(default=10.0, gt=0.0)
    health_check_timeout_s: float = Field(default=30.0, gt=0.0)
    graceful_shutdown_timeout_s: float = Field(default=20.0, ge=0.0)

    @field_validator("autoscaling")
    @classmethod
    def _serve_accepts_it(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from ray.serve.config import AutoscalingConfig

            unknown = sorted(set(value) - set(AutoscalingConfig.model_fields))
            if unknown:  # Serve would ignore them silently
                raise ValueError(
                    f"unknown autoscaling key(s) {unknown}; Serve accepts {sorted(AutoscalingConfig.model_fields)}"
                )
            AutoscalingConfig(**value)  # raises naming the bad value
        return value

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options`."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = dict(self.autoscaling)
        else:
            options["num_replicas"] = self.num_replicas
        return options


class ServeConfig(StrictModel):
    """Everything `build_app` needs. `model_uri` is `models:/<name>@<alias>`, `models:/<name>/<n>`
    or a local risk-model directory (development and benchmarks; version reported as `local`)."""

    model_uri: str = Field(min_length=1)
    # The version the alias pointed at when deploying (`ehrfm serve` fills it), so every replica
    # serves the same version and a redeploy after the alias moved switches them all to the new one.
    model_version: str | None = None
    # > 0: replicas re-resolve the alias this often and switch when it has moved.
    alias_poll_s: float = Field(default=0.0, ge=0.0)
    tracking_uri: str | None = None  # else MLFLOW_TRACKING_URI of the replica's environment
    min_prs_share: float = Field(default=0.5, gt=0.0, le=1.0)
    # the downloaded files must match the SHA-256 recorded at registration (mlops/checksums.py);
    # false serves an unverified version, deliberately (warned about in the replica's log)
    verify_weights: bool = True
    # one_hop: the model replicas are the HTTP ingress (cheapest; the HAProxy ingress replays the requests
    # a dying replica held, and the one it was answering, whose response it sends whole or not at all:
    # serve/whole_response.py); two_hop: a ScoringAPI ingress in front retries on another model replica
    # when one dies, which Serve's Python proxy needs for the same guarantee, at one more Serve call per
    # request (serve/deployment.py, serve/ingress.py, docs/OPERATIONS.md "Failures")
    topology: Literal["one_hop", "two_hop"] = "one_hop"
    retries: int = Field(default=3, ge=0, le=10)  # retries of a call to a replica that died
    batching: BatchingConfig = BatchingConfig()
    limits: LimitsConfig = LimitsConfig()
    explain: ExplainConfig = ExplainConfig()
    auth: AuthConfig = AuthConfig()
    # 2 replicas: one dying (or restarting) leaves the other serving; half a core each fits 2 cores
    model_deployment: DeploymentSizing = DeploymentSizing(num_cpus=0.5)
    ingress_deployment: DeploymentSizing = DeploymentSizing(num_replicas=1, num_cpus=0.25)  # two_hop only
    # explanations cost a forward pass per occluded event: few at a time, on a replica of their own
    explain_deployment: DeploymentSizing = DeploymentSizing(num_replicas=1, num_cpus=0.25, max_ongoing_requests=2)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _pin_needs_a_registry_uri(self) -> ServeConfig:
        if self.model_version is not None and not self.model_uri.startswith("models:/"):
            raise ValueError("model_version applies to models:/ URIs only")
        return self

    def model_user_config(self) -> dict[str, Any]:
        """What the model replicas receive through `reconfigure` (JSON-serializable)."""
        return {
            "model_uri": self.model_uri,
            "model_version": self.model_version,
            "alias_poll_s": self.alias_poll_s,
            "tracking_uri": self.tracking_uri,
            "min_prs_share": self.min_prs_share,
            "verify_weights": self.verify_weights,
            "max_batch_size": self.batching.max_batch_size,
            "batch_wait_timeout_s": self.batching.batch_wait_timeout_s,
            "explain_max_events": self.explain.max_events,
            "explain_top_k": self.explain.top_k,
        }
