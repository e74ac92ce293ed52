"""Entry points of the scoring service.

- `build_app(args)`: the Serve application builder named in cluster/serve.yaml and the
  RayService (`import_path: ehrfm.serve.app:build_app`). `args` is ServeConfig as a dict
  (`model_uri` is the only required key), optionally `config: <yaml file>` whose values the other
  keys override; dotted keys (`batching.max_batch_size: 1`, or `serve run ... key=value`) set
  nested fields.
- `main(argv)`: `ehrfm serve` / `jobs/serve.py`. Resolves `models:/<model>@<alias>` to a version,
  pins it in the deployment (re-running it after the alias moved is a rolling update of the
  running application to the new version), starts Serve bound to 127.0.0.1 unless told otherwise, with
  HAProxy as its HTTP ingress on a cluster of its own (`--ingress`, serve/ingress.py), and waits until
  /readyz answers. Bearer auth is on: the token comes from EHRFM_SERVE_TOKEN or the token file, which is
  created (0600, random) on first start and reused after (serve/auth.py). A port that already
  accepts connections and is not this cluster's Serve proxy is refused (exit 2, serve/port.py). With `--smoke N` it then scores N made-up persons over HTTP and checks them against
  the model scored in this process. On a Ray cluster of its own (or of the calling process) it
  keeps serving until SIGTERM or Ctrl-C (SIGINT), then drains (`drain`) and exits 0, or stops after
  the smoke run; on a running cluster (`--address`, RAY_ADDRESS) it deploys and exits, leaving the
  service up.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ehrfm.config import add_config_arguments, load_config, parse_config
from ehrfm.serve.config import DeploymentSizing, ServeConfig
from ehrfm.serve.ingress import INGRESS_MODES, describe, use_ingress

APP_NAME = "ehrfm"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def config_from_args(args: dict[str, Any]) -> ServeConfig:
    """ServeConfig from builder args (see the module docstring)."""
    args = dict(args or {})
    return load_config(ServeConfig, args.pop("config", None), list(args.items()), merge=True)


def build_app(args: dict[str, Any]):
    """Serve application builder: args dict -> bound application (ScoringAPI -> RiskModel).
    With auth on and no token it refuses here, in one line, rather than in a replica restart loop."""
    from ehrfm.serve.auth import check_auth
    from ehrfm.serve.deployment import build_deployments

    config = config_from_args(args)
    check_auth(config.auth)
    return build_deployments(config)


# ---- ehrfm serve ------------------------------------------------------------------------------------
def setup_auth(config: ServeConfig) -> None:
    """Make sure the service gets a token (creating the token file on first start) and say where it
    is and how clients send it; the token itself is printed only when just created, on a terminal.
    The replicas read the same file: its path, never the token, goes into the deployment config."""
    from ehrfm.serve.auth import ensure_token

    if not config.auth.enabled:
        print("WARNING: bearer auth is DISABLED (auth.enabled=false): anyone who reaches the port can score")
        return
    source = ensure_token(config.auth)
    if source.path is None:
        print(
            f"bearer auth on: token from {source.where}; clients send `Authorization: Bearer ${config.auth.token_env}`"
        )
        return
    config.auth.token_file = str(source.path)
    if source.created:
        print(f"created bearer token file {source.path} (mode 0600); later starts reuse it")
        if sys.stdout.isatty():
            print(f"token (shown this once): {source.token}")
        else:
            print("the token is not printed (stdout is not a terminal): read it from the file")
    print(f"bearer auth on: token in {source.path}; clients send `Authorization: Bearer $(cat {source.path})`")


def wait_ready(base_url: str, timeout_s: float = 300.0) -> dict[str, Any]:
    """Poll /readyz until the service has a model; the readiness body."""
    from ehrfm.serve.smoke import request_json

    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            status, body = request_json(f"{base_url}/readyz", timeout=10)
            if status == 200:
                return body
            last = status
        except OSError as exc:
            last = type(exc).__name__
        time.sleep(1.0)
    raise TimeoutError(f"{base_url}/readyz not ready after {timeout_s:.0f}s (last: {last})")


def smoke(base_url: str, config: ServeConfig, n: int, token: str | None) -> int:
    """Score `n` made-up persons over HTTP; 0 when every response is a 200 whose risk equals the
    model scored in this process (same version) to 1e-5 (float32 rounding differs with batch position)."""
    from ehrfm.serve import model_store
    from ehrfm.serve.smoke import request_json, synthetic_persons
    from ehrfm.transfer.predictor import PersonRecord

    local = model_store.load(
        model_store.resolve(config.model_uri, config.model_version),
        config.min_prs_share,
        verify_weights=config.verify_weights,
    )
    persons = synthetic_persons(local.predictor.tokenizer, local.predictor.spec.pgs_ids, n, seed=7)
    expected = local.predictor.predict([PersonRecord.model_validate(p) for p in persons])
    failures = 0
    print(f"{'person':>6}  {'risk':>8}  {'pct':>6}  {'PRS contribution':>16}  {'unknown':>7}  version")
    for i, (person, want) in enumerate(zip(persons, expected)):
        status, body = request_json(f"{base_url}/v1/score", person, token=token)
        ok = (
            status == 200
            and math.isclose(body["risk"], want["risk"], rel_tol=1e-5, abs_tol=1e-9)
            and body["model_version"] == local.ref.version
        )
        failures += not ok
        if status == 200:
            print(
                f"{i:>6}  {body['risk']:8.4f}  {body['percentile'] or float('nan'):6.1f}  "
                f"{body['prs_contribution']:+16.4f}  {body['unknown_codes']:>7}  {body['model_version']}"
            )
        else:
            print(f"{i:>6}  HTTP {status}")
    print(f"{n - failures}/{n} persons scored over HTTP match the registered model's own predictions")
    return 0 if failures == 0 else 1


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def wait_for_stop_signal() -> signal.Signals:
    """Block until SIGTERM or SIGINT arrives (main thread only); the signal. Installed after
    ray.init, replacing its SIGTERM handler (which aborts the process, cutting every connection)."""
    received: list[signal.Signals] = []
    arrived = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        received.append(signal.Signals(signum))
        arrived.set()

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    while not arrived.wait(1.0):
        pass
    # while draining: a second SIGTERM is ignored, a second Ctrl-C stops without waiting
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return received[0]


def drain(config: ServeConfig, why: str) -> None:
    """Stop taking requests, let those in flight finish, shut Serve down. `serve.shutdown()` alone
    kills the HTTP proxy at once, cutting every open connection (replicas drain behind it, but their
    answers have nowhere to go). Deleting the application first takes its routes off the ingress (new
    requests get 404; behind HAProxy a stopping replica first keeps accepting for the draining period,
    serve/ingress.py) while each replica finishes what it holds, up to its deployment's
    graceful_shutdown_timeout_s, before it stops; `serve.delete` returns once all have stopped."""
    from ray import serve

    sizings = [getattr(config, name) for name in type(config).model_fields]
    bound = max(s.graceful_shutdown_timeout_s for s in sizings if isinstance(s, DeploymentSizing))
    print(f"{why}: draining: no new requests; requests in flight get up to {bound:g}s to finish", flush=True)
    start = time.monotonic()
    try:
        serve.delete(APP_NAME)
    except TimeoutError as exc:  # serve.delete waits at most 60 s
        print(f"ehrfm serve: {exc}; shutting down anyway", file=sys.stderr)
    serve.shutdown()
    print(f"{why}: drained in {time.monotonic() - start:.1f}s; Serve shut down", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ehrfm serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ehrfm-t2d", help="registered model name")
    parser.add_argument("--alias", default="champion", help="registry alias to serve")
    parser.add_argument("--model-dir", default=None, help="serve a local risk-model directory (sets model_uri)")
    add_config_arguments(parser, "ServeConfig (model_uri may be omitted: --model, --alias)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="HTTP bind address (loopback by default)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a new local one)")
    parser.add_argument(
        "--ingress",
        choices=INGRESS_MODES,
        default=None,
        help="HTTP ingress of a cluster this command starts (serve/ingress.py): haproxy (default; replays a "
        "request whose replica died) or Serve's Python proxy; a running cluster keeps its own",
    )
    parser.add_argument(
        "--smoke",
        type=int,
        default=0,
        metavar="N",
        help="score N made-up persons over HTTP, check them, shut down and exit",
    )
    args = parser.parse_args(argv)
    default_uri = {"model_uri": f"models:/{args.model}@{args.alias}"}
    flags = {"model_dir": lambda v: {"model_uri": str(Path(v).resolve())}}
    config = parse_config(parser, ServeConfig, args, flags, base=default_uri)

    import ray
    from ray import serve

    from ehrfm.serve import model_store
    from ehrfm.serve.auth import TokenError, read_token
    from ehrfm.serve.port import foreign_listener
    from ehrfm.tracking import ensure_tracking_uri

    # a cluster this command starts runs no Serve yet: anything on the port is someone else's
    fresh = not ray.is_initialized() and not (args.address or os.environ.get("RAY_ADDRESS"))
    refusal = foreign_listener(args.host, args.port, None) if fresh else None
    if refusal:
        print(f"ehrfm serve: {refusal}", file=sys.stderr)
        return 2
    try:
        setup_auth(config)
    except TokenError as exc:
        print(f"ehrfm serve: {exc}", file=sys.stderr)
        return 2
    if config.model_uri.startswith("models:/"):
        config.tracking_uri = config.tracking_uri or ensure_tracking_uri()
        os.environ["MLFLOW_TRACKING_URI"] = config.tracking_uri
        ref = model_store.resolve(config.model_uri)
        config.model_version = ref.version
        print(f"deploying {ref.name} version {ref.version}" + (f" (alias {ref.alias})" if ref.alias else ""))
    started_here = not ray.is_initialized()
    if fresh:  # Serve's controller reads the ingress from the environment of the cluster it starts in
        print(describe(use_ingress(args.ingress)))
    elif args.ingress:
        print(f"note: --ingress {args.ingress} applies only to a cluster this command starts; this one keeps its own")
    if started_here:
        ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    # on a cluster that outlives this command the service keeps running after it exits
    external = started_here and bool(args.address or os.environ.get("RAY_ADDRESS"))
    if not fresh:  # a redeploy may find this cluster's own Serve proxy on the port
        status = serve.status()
        refusal = foreign_listener(
            args.host, args.port, set(status.applications) if status.proxies or status.applications else None
        )
        if refusal:
            print(f"ehrfm serve: {refusal}", file=sys.stderr)
            if started_here:
                ray.shutdown()
            return 2
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(config.model_dump(mode="json")), name=APP_NAME, route_prefix="/")
    base_url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    ready = wait_ready(base_url)
    print(f"ready at {base_url} (OpenAPI at {base_url}/docs): {ready['model_name']} version {ready['model_version']}")
    code = smoke(base_url, config, args.smoke, read_token(config.auth)) if args.smoke else 0
    if external:
        print(f"deployed as Serve application {APP_NAME!r}; `serve shutdown` stops it")
        return code
    if args.smoke:
        serve.shutdown()
    else:
        print("serving; SIGTERM or Ctrl-C drains and stops", flush=True)
        previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        why = wait_for_stop_signal().name
        try:
            drain(config, why)
        except KeyboardInterrupt:
            print("second Ctrl-C: not waiting for requests in flight", flush=True)
            serve.shutdown()
            code = 130
        finally:  # None: a handler set outside Python (Ray's), which cannot be put back
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    if started_here:
        ray.shutdown()
    return code
