"""Online scoring on Ray Serve: batched model replicas that are the FastAPI ingress themselves
(`api`, `deployment.RiskService`; or, with `topology: two_hop`, `deployment.ScoringIngress` in front
of `deployment.RiskModelDeployment`), explanations on `deployment.ExplainerDeployment`, all loading
`models:/<name>@<alias>` from the MLflow registry with its weights checksum verified
(`model_store`). Entry points in `app`: `build_app` for Serve config files and the RayService,
`main` for `ehrfm serve`. Bearer auth is on unless disabled (`auth`); `ehrfm serve` refuses a port
something else answers on (`port`) and drains on SIGTERM."""
