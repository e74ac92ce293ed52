"""Online scoring on Ray Serve: a FastAPI ingress (`api`, `deployment.ScoringIngress`) in front of
batched model replicas (`deployment.RiskModelDeployment`) that load `models:/<name>@<alias>` from
the MLflow registry (`model_store`). Entry points in `app`: `build_app` for Serve config files and
the RayService, `main` for `ehrfm serve`. Bearer auth is on unless disabled (`auth`); `ehrfm
serve` refuses a port something else answers on (`port`)."""
