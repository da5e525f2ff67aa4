"""Delivering a prediction's events to the client's webhook, as Cog would, but from the front.

Events are Cog's: `start` (accepted), `logs` (new log lines), `output`, `completed` (terminal);
`webhook_events_filter` keeps some of them (all by default). Each delivery POSTs the prediction
object as it stands, through the SSRF guard (the address checked again and connected to as
checked, no redirects followed), in order per prediction. A `logs` event waiting behind a
delivery is replaced by the newer one. A failed delivery (connection refused, 429, 5xx) is retried
with backoff; the terminal event up to `attempts` times, the others once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from errors import UserError
from net.fetch import Fetcher, Limits
from net.url_guard import Guard, redact

logger = logging.getLogger(__name__)


@dataclass
class _Queue:
    url: str
    events: list[tuple[str, dict]] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


class WebhookSender:
    """`sign(body)`: headers that sign a delivery (Replicate's scheme: front/replicate_api.py)."""

    def __init__(
        self,
        guard: Guard,
        *,
        sign: Callable[[bytes], dict[str, str]] | None = None,
        timeout_s: float = 10.0,
        attempts: int = 6,
        backoff_s: float = 0.5,
    ):
        self.guard = guard
        self.sign = sign
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self._queues: dict[str, _Queue] = {}

    def send(self, url: str, events_filter: list[str] | None, event: str, prediction: dict) -> None:
        """Queue `event` for `prediction` (its public object) if the filter keeps it."""
        if events_filter is not None and event not in events_filter:
            return
        key = prediction["id"]
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(url)
            queue.task = asyncio.get_running_loop().create_task(self._deliver(key, queue))
        if event == "logs" and queue.events and queue.events[-1][0] == "logs":
            queue.events[-1] = (event, prediction)
        else:
            queue.events.append((event, prediction))
        queue.wake.set()

    async def _deliver(self, key: str, queue: _Queue) -> None:
        try:
            while True:
                if not queue.events:
                    queue.wake.clear()
                    try:
                        await asyncio.wait_for(queue.wake.wait(), timeout=30)
                    except TimeoutError:
                        if not queue.events:
                            return
                    continue
                event, prediction = queue.events.pop(0)
                await self._post(queue.url, event, prediction)
                if event == "completed":
                    return
        finally:
            self._queues.pop(key, None)

    async def _post(self, url: str, event: str, prediction: dict) -> None:
        body = json.dumps(prediction).encode()
        attempts = self.attempts if event == "completed" else 2
        for attempt in range(attempts):
            try:
                status = await asyncio.to_thread(self._post_once, url, body)
                if status < 300:
                    return
                if status != 429 and status < 500:
                    logger.info("webhook %s for %s: HTTP %d, not retried", event, prediction["id"], status)
                    return
                reason = f"HTTP {status}"
            except UserError as error:
                reason = str(error)
            if attempt + 1 < attempts:
                await asyncio.sleep(self.backoff_s * 2**attempt)
        logger.warning("webhook %s for %s to %s failed: %s", event, prediction["id"], redact(url), reason)

    def _post_once(self, url: str, body: bytes) -> int:
        fetcher = Fetcher(self.guard, Limits(timeout=self.timeout_s, total_timeout=self.timeout_s, max_file_bytes=0))
        headers = {"Content-Type": "application/json", **(self.sign(body) if self.sign else {})}
        return fetcher.post(url, body, headers, "webhook")

    async def close(self) -> None:
        """Wait briefly for terminal deliveries in progress (a clean stop)."""
        tasks = [q.task for q in self._queues.values() if q.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
