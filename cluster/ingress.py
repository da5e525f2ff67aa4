"""CogIngress: the Cog HTTP API, unchanged, in front of the CogReplica deployment.

    POST /predictions, PUT /predictions/{id}   routed by the request's LoRA (routing.py) to a replica;
                                               queued by Ray while every replica is busy; past
                                               `max_queued_requests`, 429 with Retry-After
    POST /predictions/{id}/cancel              sent to the Cog server running that prediction
    GET /health-check                          READY when at least one replica's Cog server is
    GET /openapi.json, GET /                   a replica's own

Clients of one Cog server work unchanged: bodies, status codes and content types are the Cog
server's (each response also names its replica in `X-Cluster-Replica`). One ingress replica: it
keeps the table of running predictions that cancels and repeated PUTs are sent by.
"""

import asyncio
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from cluster import routing
from cluster.replica import REGISTER_EVERY_S, Answer, CogUnavailable, Forward, end_to_end

logger = logging.getLogger(__name__)

app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)  # /openapi.json is the replicas' own


@dataclass(frozen=True)
class IngressSettings:
    affinity: bool = True  # route by LoRA (False: Ray's plain routing; the benchmark compares both)
    unavailable_retry_s: float = 30.0  # how long a request is re-sent while replicas' Cog servers are gone


@dataclass
class Running:
    """A prediction with an id, from the moment it is sent until it ends (its replica, once placed)."""

    placed: asyncio.Event = field(default_factory=asyncio.Event)
    url: str | None = None
    cancel_requested: bool = False


def _response(answer: Answer, replica: str | None = None) -> Response:
    headers = dict(answer.headers)
    if replica:
        headers["X-Cluster-Replica"] = replica
    return Response(content=answer.body, status_code=answer.status, headers=headers)


def _failed(status: int, error: str, headers: dict | None = None) -> JSONResponse:
    """An answer of the cluster's own, shaped like Cog's 409 (`error`, `status: failed`)."""
    return JSONResponse({"error": error, "status": "failed"}, status_code=status, headers=headers)


@serve.deployment
@serve.ingress(app)
class CogIngress:
    def __init__(self, replicas: DeploymentHandle, settings: IngressSettings):
        self.replicas = replicas
        self.settings = settings
        self.running: dict[str, Running] = {}
        self.registry: dict[str, tuple[str, float]] = {}  # replica → (its Cog server's URL, last registered)
        self.setup_failure: dict | None = None
        self.client = httpx2.AsyncClient(timeout=httpx2.Timeout(None, connect=10.0))
        self.background: set[asyncio.Task] = set()

    # ---- called by the replicas

    def register(self, replica: str, url: str) -> None:
        self.registry[replica] = (url, time.monotonic())
        self.setup_failure = None

    def unregister(self, replica: str) -> None:
        self.registry.pop(replica, None)

    def setup_failed(self, replica: str, health: dict) -> None:
        self.setup_failure = health

    # ---- predictions

    @app.post("/predictions")
    async def create(self, request: Request) -> Response:
        body = await request.body()
        return await self._predict(request, body, routing.prediction_id(body))

    @app.put("/predictions/{prediction_id}")
    async def put(self, prediction_id: str, request: Request) -> Response:
        return await self._predict(request, await request.body(), prediction_id)

    @app.post("/predictions/{prediction_id}/cancel")
    async def cancel(self, prediction_id: str) -> Response:
        entry = self.running.get(prediction_id)
        if entry is None:
            return JSONResponse({}, status_code=404)  # what a Cog server answers for an id it does not know
        if entry.url is None:  # still queued: cancelled as soon as a replica takes it
            entry.cancel_requested = True
            return JSONResponse({})
        return await self._cancel_at(prediction_id, entry)

    async def _predict(self, request: Request, body: bytes, prediction_id: str | None) -> Response:
        path = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1")
        if request.url.query:
            path += "?" + request.url.query
        hold = "respond-async" in request.headers.get("prefer", "").lower()
        forward = Forward(request.method, path, end_to_end(request.headers.items()), body, hold)
        if prediction_id and (url := await self._placed(prediction_id)):
            # A repeated PUT of a running prediction is Cog's to answer (idempotent): the server running it.
            return _response(await self._direct(url, forward))

        entry = Running()
        if prediction_id:
            self.running[prediction_id] = entry
        key = routing.routing_key(body) if self.settings.affinity else ""
        try:
            stream, placed, answer = await self._place(forward, key, entry, prediction_id)
        except BackPressureError as error:
            self._forget(prediction_id, entry)
            retry = math.ceil(error.retry_after_s or 1)
            return _failed(
                error.status_code,
                f"At capacity - every replica is busy and {error.message}; retry after {retry} s",
                {"Retry-After": str(retry)},
            )
        except CogUnavailable as error:
            self._forget(prediction_id, entry)
            return _failed(503, f"No replica could take the prediction: {error}")
        except asyncio.CancelledError:  # the client hung up: Ray cancels the request, as Cog would
            self._forget(prediction_id, entry)
            raise
        except Exception as error:  # the replica died while running it
            self._forget(prediction_id, entry)
            logger.warning("prediction %s: its replica failed: %s", prediction_id, error)
            return _failed(502, f"The replica running this prediction stopped ({type(error).__name__}); retry it")

        if hold and answer.status == 202:
            prediction_id = prediction_id or _answer_id(answer)
            if prediction_id:
                self.running[prediction_id] = entry
            self._spawn(self._drain(stream, prediction_id, entry))
        else:
            self._forget(prediction_id, entry)
        return _response(answer, placed.replica)

    async def _placed(self, prediction_id: str) -> str | None:
        """The Cog server running `prediction_id`, once a replica has it; None if it is not ours (any more)."""
        while (entry := self.running.get(prediction_id)) is not None:
            if entry.url:
                return entry.url
            try:
                await asyncio.wait_for(entry.placed.wait(), timeout=1.0)
            except TimeoutError:
                pass
        return None

    async def _place(self, forward: Forward, key: str, entry: Running, prediction_id: str | None):
        """Send `forward` through Ray's router; (stream, Placed, Answer). Re-sent while Cog servers are gone."""
        deadline = time.monotonic() + self.settings.unavailable_retry_s
        while True:
            stream = self.replicas.options(stream=True, multiplexed_model_id=key).forward.remote(forward)
            try:
                placed = await stream.__anext__()
                entry.url = placed.url
                entry.placed.set()
                if entry.cancel_requested and prediction_id:
                    self._spawn(self._cancel_at(prediction_id, entry))
                return stream, placed, await stream.__anext__()
            except CogUnavailable:
                entry.url = None
                entry.placed.clear()
                if time.monotonic() > deadline:
                    raise
                key = ""  # the replica holding the LoRA is the one that is gone: any other will do
                await asyncio.sleep(0.2)
            except asyncio.CancelledError:
                stream.cancel()
                raise

    async def _drain(self, stream, prediction_id: str | None, entry: Running) -> None:
        """An async prediction: its replica stays taken until the prediction ends."""
        try:
            async for _ in stream:
                pass
        except Exception as error:
            logger.warning("async prediction %s: its replica failed: %s", prediction_id, error)
        finally:
            self._forget(prediction_id, entry)

    async def _cancel_at(self, prediction_id: str, entry: Running) -> Response:
        path = f"/predictions/{quote(prediction_id, safe='')}/cancel"
        deadline = time.monotonic() + 5.0
        while True:
            if entry.url is None:  # back in Ray's queue (its Cog server was gone): cancelled once placed again
                entry.cancel_requested = True
                return JSONResponse({})
            try:
                answer = await self._direct(entry.url, Forward("POST", path, (), b""))
            except httpx2.TransportError as error:
                return _failed(502, f"The replica running this prediction did not answer ({error})")
            # Sent a moment before the Cog server registered the prediction: try again while it is ours.
            if answer.status != 404 or time.monotonic() > deadline or self.running.get(prediction_id) is not entry:
                return _response(answer)
            await asyncio.sleep(0.05)

    async def _direct(self, url: str, forward: Forward) -> Answer:
        response = await self.client.request(
            forward.method, url + forward.path, headers=list(forward.headers), content=forward.body
        )
        return Answer(response.status_code, end_to_end(response.headers.items()), response.content)

    def _forget(self, prediction_id: str | None, entry: Running) -> None:
        if prediction_id and self.running.get(prediction_id) is entry:
            del self.running[prediction_id]

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # ---- the rest of Cog's API

    @app.get("/health-check")
    async def health_check(self) -> Response:
        healths = await asyncio.gather(*(self._health_of(url) for url in self._replica_urls()))
        counts = dict(Counter(h.get("status", "UNREACHABLE") for h in healths))
        for status in ("READY", "BUSY"):
            for health in healths:
                if health.get("status") == status:
                    return JSONResponse({**health, "replicas": counts})
        if self.setup_failure:
            return JSONResponse({**self.setup_failure, "status": "SETUP_FAILED", "replicas": counts})
        return JSONResponse({"status": "STARTING", "replicas": counts})

    @app.get("/openapi.json")
    async def openapi(self) -> Response:
        return await self._from_any_replica("/openapi.json")

    @app.get("/")
    async def root(self) -> Response:
        return await self._from_any_replica("/")

    def _replica_urls(self) -> list[str]:
        now = time.monotonic()
        return [url for url, seen in self.registry.values() if now - seen < 3 * REGISTER_EVERY_S]

    async def _health_of(self, url: str) -> dict:
        try:
            health = (await self.client.get(url + "/health-check", timeout=5)).json()
        except (httpx2.TransportError, ValueError):
            return {"status": "UNREACHABLE"}
        return health if isinstance(health, dict) else {"status": "UNREACHABLE"}

    async def _from_any_replica(self, path: str) -> Response:
        for url in self._replica_urls():
            try:
                answer = await self._direct(url, Forward("GET", path, (), b""))
            except httpx2.TransportError:
                continue
            if answer.status == 200:
                return _response(answer)
        return _failed(503, "No replica is ready yet; see /health-check")


def _answer_id(answer: Answer) -> str | None:
    try:
        value = json.loads(answer.body).get("id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
