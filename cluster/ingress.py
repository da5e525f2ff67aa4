"""CogIngress: the public front (front/) on Ray Serve, in front of the CogReplica deployment.

The ingress is the front itself, not a second copy of it: `__serve_build_asgi_app__` returns
`front.app.create_app(...)` with a `RayBackend`, so a request's path (tokens, checks, records,
queue, webhooks) is front/app.py's, for one GPU and for the cluster alike. What differs is where
predictions run: `RayBackend.run` sends each one through Ray's router to a replica, routed by its
LoRAs (routing.py); a replica whose Cog server is gone sends it back (`CogUnavailable`), and it is
sent again to another replica; a replica that dies while running it ends it `failed`
(front/predictions.py). Cancels go to the Cog server running the prediction.

Replicas register their Cog server's address here (`register`), for cancels and health.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from urllib.parse import quote

import httpx2
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from cluster import routing
from cluster.replica import REGISTER_EVERY_S, CogUnavailable, Forward, Progress
from front.app import create_app
from front.backend import Stopped, Unavailable
from front.settings import FrontSettings

logger = logging.getLogger(__name__)


class RayBackend:
    """front.backend.Backend over the CogReplica deployment."""

    def __init__(self, replicas: DeploymentHandle, *, capacity: int, affinity: bool, unavailable_retry_s: float):
        self.replicas = replicas
        self.capacity = capacity  # predictions handed to Ray's router at once (it queues and bounds them)
        self.affinity = affinity
        self.unavailable_retry_s = unavailable_retry_s
        self.running: dict[str, str] = {}  # prediction id → the Cog server running it
        self.cancelled: set[str] = set()  # cancelled while waiting in Ray's queue: cancelled once placed
        self.registry: dict[str, tuple[str, float]] = {}  # replica → (its Cog server's URL, last registered)
        self.setup_failure: dict | None = None
        self.client = httpx2.AsyncClient(timeout=httpx2.Timeout(None, connect=10.0))

    async def run(self, prediction_id: str, inputs: dict, on_event) -> dict:
        body = json.dumps({"id": prediction_id, "input": inputs}).encode()
        path = f"/predictions/{quote(prediction_id, safe='')}"
        forward = Forward("PUT", path, (("content-type", "application/json"),), body, progress=True)
        key = routing.routing_key(body) if self.affinity else ""
        deadline = time.monotonic() + self.unavailable_retry_s
        while True:
            stream = self.replicas.options(stream=True, multiplexed_model_id=key).forward.remote(forward)
            try:
                placed = await stream.__anext__()
                self.running[prediction_id] = placed.url
                await on_event({"id": prediction_id, "status": "processing"})
                if prediction_id in self.cancelled:
                    await self.cancel(prediction_id)
                while isinstance(answer := await stream.__anext__(), Progress):
                    await on_event(answer.payload)  # the Cog server's logs: steps, downloads
            except CogUnavailable as error:
                if time.monotonic() > deadline:
                    raise Unavailable(str(error)) from None
                key = ""  # the replica holding the LoRA is the one that is gone: any other will do
                await asyncio.sleep(0.2)
                continue
            except BackPressureError as error:
                raise Unavailable(f"every replica is busy and {error.message}") from None
            except asyncio.CancelledError:
                stream.cancel()
                raise
            except Exception as error:  # the replica died while running it
                raise Stopped(f"its replica failed: {type(error).__name__}") from None
            finally:
                self.running.pop(prediction_id, None)
                self.cancelled.discard(prediction_id)
            try:
                result = json.loads(answer.body)
            except ValueError:
                result = None
            if answer.status in (409, 503) or not isinstance(result, dict):
                raise Stopped(f"its replica's Cog server answered HTTP {answer.status}")
            return {**result, "replica": placed.replica}

    async def cancel(self, prediction_id: str) -> None:
        url = self.running.get(prediction_id)
        if url is None:
            self.cancelled.add(prediction_id)
            return
        path = f"/predictions/{quote(prediction_id, safe='')}/cancel"
        deadline = time.monotonic() + 5.0
        while self.running.get(prediction_id) == url:
            try:
                answer = await self.client.post(url + path, timeout=10)
            except httpx2.TransportError:
                return
            # Sent a moment before the Cog server registered the prediction: try again while it runs.
            if answer.status_code != 404 or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.05)

    async def health(self) -> dict:
        now = time.monotonic()
        urls = [url for url, seen in self.registry.values() if now - seen < 3 * REGISTER_EVERY_S]
        healths = await asyncio.gather(*(self._health_of(url) for url in urls))
        counts = dict(Counter(h.get("status", "UNREACHABLE") for h in healths))
        for status in ("READY", "BUSY"):
            for health in healths:
                if health.get("status") == status:
                    return {**health, "replicas": counts}
        if self.setup_failure:
            return {**self.setup_failure, "status": "SETUP_FAILED", "replicas": counts}
        return {"status": "STARTING", "replicas": counts}

    async def _health_of(self, url: str) -> dict:
        try:
            health = (await self.client.get(url + "/health-check", timeout=5)).json()
        except (httpx2.TransportError, ValueError):
            return {"status": "UNREACHABLE"}
        return health if isinstance(health, dict) else {"status": "UNREACHABLE"}

    async def close(self) -> None:
        await self.client.aclose()


@serve.deployment
@serve.ingress()
class CogIngress:
    def __init__(self, replicas: DeploymentHandle, settings: dict):
        self.settings = settings
        self.backend = RayBackend(
            replicas,
            capacity=settings["capacity"],
            affinity=settings["affinity"],
            unavailable_retry_s=settings["unavailable_retry_s"],
        )

    def __serve_build_asgi_app__(self):
        async def backend(events_url):
            return self.backend

        front = FrontSettings.from_env()  # tokens and the store from the environment (Kubernetes Secrets)
        overrides = {k: self.settings[k] for k in ("state_dir", "store", "max_queued") if self.settings.get(k)}
        return create_app(front.with_changes(**overrides), backend)

    # ---- called by the replicas

    def register(self, replica: str, url: str) -> None:
        self.backend.registry[replica] = (url, time.monotonic())
        self.backend.setup_failure = None

    def unregister(self, replica: str) -> None:
        self.backend.registry.pop(replica, None)

    def setup_failed(self, replica: str, health: dict) -> None:
        self.backend.setup_failure = health
