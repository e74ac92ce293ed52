"""The serving benchmark's floor: Ray Serve apps that do no work, so the difference to ehrfm is
what scoring costs. `one_hop` answers in its ingress replica; `two_hop` forwards to a second
deployment first, as a separate model deployment would."""

from fastapi import FastAPI, Request
from ray import serve

_one = FastAPI()


@serve.deployment(name="Echo", max_ongoing_requests=256)
@serve.ingress(_one)
class EchoIngress:
    @_one.post("/v1/score")
    async def score(self, request: Request) -> dict:
        return {"bytes": len(await request.body())}


@serve.deployment(name="EchoBackend", max_ongoing_requests=256)
class EchoBackend:
    async def __call__(self, n: int) -> dict:
        return {"bytes": n}


_two = FastAPI()


@serve.deployment(name="EchoFront", max_ongoing_requests=256)
@serve.ingress(_two)
class EchoFront:
    def __init__(self, backend) -> None:
        self._backend = backend

    @_two.post("/v1/score")
    async def score(self, request: Request) -> dict:
        return await self._backend.remote(len(await request.body()))


def one_hop(num_cpus: float = 0.25):
    return EchoIngress.options(ray_actor_options={"num_cpus": num_cpus}).bind()


def two_hop(num_cpus: float = 0.25):
    backend = EchoBackend.options(ray_actor_options={"num_cpus": num_cpus}).bind()
    return EchoFront.options(ray_actor_options={"num_cpus": num_cpus}).bind(backend)
