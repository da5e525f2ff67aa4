"""Where the front's predictions run: the `Backend` protocol and the one-Cog-server backend.

A backend runs one prediction to its end and answers Cog's prediction object; it never faces a
client. The single-GPU deployment's is `CogBackend` (one Cog server on loopback, that the front
started: front/__main__.py); the cluster's runs them on Ray Serve replicas (cluster/backend.py).

Failures a backend reports: `Unavailable` (nothing could take the prediction: it never started,
so it may be sent again) and `Stopped` (the server running it died: it did start; the input was
fine). Progress comes back through `on_event(payload)` with Cog's own prediction objects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol
from urllib.parse import quote

import httpx2

logger = logging.getLogger(__name__)

OnEvent = Callable[[dict], Awaitable[None]]


class Unavailable(Exception):
    """No server could take the prediction (it did not start)."""


class Stopped(Exception):
    """The server running the prediction stopped before answering."""


class Backend(Protocol):
    capacity: int  # predictions it runs at once

    async def run(self, prediction_id: str, inputs: dict, on_event: OnEvent) -> dict: ...
    async def cancel(self, prediction_id: str) -> None: ...
    async def health(self) -> dict: ...
    async def close(self) -> None: ...


class CogBackend:
    """One Cog server at `url`; progress from its webhooks to `events_url(prediction_id)` (a route of
    the front that only this server knows: front/app.py)."""

    capacity = 1

    def __init__(self, url: str, events_url: Callable[[str], str] | None = None, *, busy_retry_s: float = 5.0):
        self.url = url.rstrip("/")
        self.events_url = events_url
        self.busy_retry_s = busy_retry_s
        self.client = httpx2.AsyncClient(timeout=httpx2.Timeout(None, connect=5.0))

    async def run(self, prediction_id: str, inputs: dict, on_event: OnEvent) -> dict:
        body = {"id": prediction_id, "input": inputs}
        if self.events_url is not None:
            # Progress only: the answer to this request carries the outcome, and a "completed" event
            # would carry every output again (3.4 MB for a 1 MP png) for the front to parse twice.
            body["webhook"] = self.events_url(prediction_id)
            body["webhook_events_filter"] = ["start", "logs"]
        path = f"{self.url}/predictions/{quote(prediction_id, safe='')}"
        deadline = time.monotonic() + self.busy_retry_s
        while True:
            try:
                response = await self.client.put(path, json=body)
            except httpx2.ConnectError as error:
                raise Unavailable(f"the model server is not reachable ({type(error).__name__})") from None
            except httpx2.TransportError as error:
                raise Stopped(f"the model server stopped ({type(error).__name__})") from None
            # Cog answers 409 for a moment after its previous prediction (FACTS.md), 503 while setting up.
            if response.status_code in (409, 503) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                continue
            if response.status_code in (409, 503):
                raise Unavailable(f"the model server answered {response.status_code}")
            try:
                answer = response.json()
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                raise Stopped(f"the model server answered HTTP {response.status_code} without a prediction")
            if response.status_code == 422:  # the schema file and the server disagree: the front's bug
                return {"status": "failed", "error": f"The model server refused the input: {answer.get('detail')}"}
            return answer

    async def cancel(self, prediction_id: str) -> None:
        try:
            await self.client.post(f"{self.url}/predictions/{quote(prediction_id, safe='')}/cancel", timeout=10)
        except httpx2.TransportError as error:
            logger.warning("cancel of %s: the model server did not answer (%s)", prediction_id, type(error).__name__)

    async def health(self) -> dict:
        try:
            health = (await self.client.get(self.url + "/health-check", timeout=5)).json()
        except (httpx2.TransportError, ValueError):
            return {"status": "STARTING"}
        return health if isinstance(health, dict) else {"status": "STARTING"}

    async def close(self) -> None:
        await self.client.aclose()
