"""The life of a prediction in the front: accepted → queued → run on the backend → ended.

`Predictions` owns the records (front/records.py) of the predictions this front runs, the queue in
front of the backend, and the events sent to clients' webhooks. Every accepted prediction ends:

- queued, canceled before it ran: `canceled` at once;
- the backend could not take it (`Unavailable`): sent again until `unavailable_retry_s` has
  passed, then `failed` ("no model server could take it; retry");
- the server running it died (`Stopped`): `failed` with an error that says so and that the input
  was fine to retry;
- the front itself stopped: at its next start, its records still in flight are `failed` the same
  way (their webhooks get that terminal event).

The queue is bounded (`max_queued` predictions accepted and not yet started on a model server,
wherever they wait: here or in the cluster's router): past it a create is refused (429) before
anything is recorded. A prediction is `processing` from the moment a model server starts it (the
`start` webhook event), as on Cog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from front.backend import Backend, Stopped, Unavailable
from front.inputs import Prediction, RequestError
from front.records import CANCELED, FAILED, PROCESSING, SUCCEEDED, TERMINAL, Record, new_id
from front.schema import ModelSchema
from front.webhooks import WebhookSender

logger = logging.getLogger(__name__)

SERVER_DIED = "The model server stopped while running this prediction ({why}); the input was fine: retry it."
FRONT_DIED = "The server restarted while this prediction was in flight; the input was fine: retry it."
NO_SERVER = "No model server could take this prediction ({why}); retry it."
FRONT_STOPPING = "The server is stopping and did not start this prediction; the input was fine: retry it."


@dataclass
class _Job:
    record: Record
    inputs: dict  # as sent to the backend (secrets included: kept in memory only)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    cancel: bool = False
    running: bool = False  # handed to the backend
    placed: bool = False  # a model server has started it (the backend's `processing` event)


class Predictions:
    def __init__(
        self,
        store,
        backend: Backend,
        schema: ModelSchema,
        webhooks: WebhookSender,
        *,
        max_queued: int,
        unavailable_retry_s: float,
        view: Callable[[Record], dict] = Record.public,
        on_finish: Callable[[Record], None] | None = None,
    ):
        self.store = store
        self.backend = backend
        self.schema = schema
        self.webhooks = webhooks
        self.max_queued = max_queued
        self.unavailable_retry_s = unavailable_retry_s
        self.view = view  # the prediction object a record's webhooks carry (per API)
        self.on_finish = on_finish  # metrics (front/metrics.py)
        self.name = f"{socket.gethostname()}:{os.getpid()}:{new_id()[:8]}"  # this front, in its records
        self.jobs: dict[str, _Job] = {}
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.stopping = False

    async def start(self) -> None:
        await self._resolve_orphans()
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._worker()) for _ in range(self.backend.capacity)]
        self.tasks.append(loop.create_task(self._expire()))

    async def stop(self, drain_s: float = 25.0) -> None:
        """A clean stop (SIGTERM): nothing new is accepted; predictions not yet handed to a model server
        end `failed` (retry); running ones get up to `drain_s` seconds to finish, then end `failed`
        too. Their webhooks hear it."""
        self.stopping = True
        for job in list(self.jobs.values()):
            if not job.running:
                await self._finish(job, FAILED, error=FRONT_STOPPING)
        deadline = time.monotonic() + drain_s
        while any(job.running for job in self.jobs.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for task in self.tasks:
            task.cancel()
        for job in list(self.jobs.values()):
            await self._finish(job, FAILED, error=FRONT_DIED)
        await self.webhooks.close()

    # ---- what the routes call

    async def create(self, tenant: str, request: Prediction, *, queue_factor: int = 1, **fields) -> Record:
        """Record and queue a checked prediction; `fields`: more of the record's (api, base_url, stream).
        `queue_factor`: how many times `max_queued` may wait before this create is refused."""
        if self.stopping:
            raise RequestError(503, "The server is stopping: retry in a moment.")
        queued = sum(1 for job in self.jobs.values() if not job.placed)
        if queued >= self.max_queued * queue_factor:
            raise RequestError(429, f"Too many predictions are waiting ({queued}); retry in a few seconds.")
        record = Record(
            id=request.id or new_id(),
            tenant=tenant,
            input=self.schema.redacted(request.given),
            webhook=request.webhook,
            webhook_events_filter=request.webhook_events_filter,
            front=self.name,
            **fields,
        )
        if not await asyncio.to_thread(self.store.add, record):
            raise RequestError(409, f"Prediction id {record.id!r} is taken: choose another id.")
        self.jobs[record.id] = _Job(record, request.input)
        self.queue.put_nowait(record.id)
        return record

    async def existing(self, tenant: str, prediction_id: str) -> Record | None:
        """A repeated PUT: the prediction if it is this tenant's; RequestError if another tenant holds the id."""
        record = await self.get(None, prediction_id)
        if record is None:
            return None
        if record.tenant != tenant:
            raise RequestError(409, f"Prediction id {prediction_id!r} is taken: choose another id.")
        return record

    async def get(self, tenant: str | None, prediction_id: str) -> Record | None:
        """The record, if it is `tenant`'s (None: anyone's)."""
        job = self.jobs.get(prediction_id)
        record = job.record if job is not None else await asyncio.to_thread(self.store.get, prediction_id)
        if record is None or (tenant is not None and record.tenant != tenant):
            return None
        return record

    async def page(self, tenant: str, limit: int, before: float | None) -> list[Record]:
        return await asyncio.to_thread(self.store.page, tenant, limit, before)

    async def wait(self, prediction_id: str, gone: asyncio.Event | None = None, timeout: float | None = None) -> Record:
        """Wait until the prediction ends (a sync request) or `timeout` seconds pass; if `gone` is set
        first (the client hung up), cancel it, as Cog does."""
        job = self.jobs.get(prediction_id)
        if timeout is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait(prediction_id, gone), timeout)
            return job.record if job is not None else await self.get(None, prediction_id)
        while job is not None and not job.record.done:
            job.changed.clear()
            waiters = [asyncio.ensure_future(job.changed.wait())]
            if gone is not None:
                waiters.append(asyncio.ensure_future(gone.wait()))
            done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in pending:
                waiter.cancel()
            if gone is not None and gone.is_set() and not job.record.done:
                await self.cancel(job.record.tenant, prediction_id)
                gone = None
        return job.record if job is not None else await self.get(None, prediction_id)

    async def cancel(self, tenant: str, prediction_id: str) -> Record | None:
        record = await self.get(tenant, prediction_id)
        job = self.jobs.get(prediction_id)
        if record is None or record.done or job is None:
            return record
        job.cancel = True
        if job.running:
            await self.backend.cancel(prediction_id)  # a backend cancels one not yet started once it starts
        if not job.placed:
            await self._finish(job, CANCELED)
        return job.record

    async def on_event(self, prediction_id: str, payload: dict) -> None:
        """Progress reported by the Cog server running the prediction (its webhook)."""
        job = self.jobs.get(prediction_id)
        if job is None or job.record.done or not isinstance(payload, dict):
            return
        if not job.placed and payload.get("status") in (PROCESSING, *TERMINAL):
            job.placed = True
            job.record.advance(PROCESSING)
            await asyncio.to_thread(self.store.put, job.record)
            self._notify(job.record, "start")
            job.changed.set()
        logs = payload.get("logs")
        if isinstance(logs, str) and logs != job.record.logs:
            job.record.logs = logs
            await asyncio.to_thread(self.store.put, job.record)
            self._notify(job.record, "logs")

    # ---- running them

    async def _worker(self) -> None:
        while not self.stopping:
            prediction_id = await self.queue.get()
            job = self.jobs.get(prediction_id)
            if job is None or job.record.done or job.cancel:
                continue
            await self._run(job)

    async def _run(self, job: _Job) -> None:
        deadline = time.monotonic() + self.unavailable_retry_s
        job.running = True
        while True:
            try:
                answer = await self.backend.run(job.record.id, job.inputs, lambda p: self.on_event(job.record.id, p))
            except Unavailable as error:
                if time.monotonic() < deadline and not job.cancel:
                    await asyncio.sleep(0.5)
                    continue
                await self._finish(job, CANCELED if job.cancel else FAILED, error=NO_SERVER.format(why=error))
                return
            except Stopped as error:
                logger.warning("prediction %s: %s", job.record.id, error)
                await self._finish(job, FAILED, error=SERVER_DIED.format(why=error))
                return
            except Exception as error:  # a bug of ours: the prediction still ends
                logger.exception("prediction %s: the backend failed", job.record.id)
                await self._finish(job, FAILED, error=SERVER_DIED.format(why=type(error).__name__))
                return
            status = answer.get("status")
            await self._finish(
                job,
                status if status in TERMINAL else FAILED,
                output=answer.get("output"),
                error=answer.get("error") if status != SUCCEEDED else None,
                logs=answer.get("logs") or job.record.logs,
                metrics=answer.get("metrics") or {},
                replica=answer.get("replica"),
            )
            return

    async def _finish(self, job: _Job, status: str, **changes) -> None:
        record = job.record
        if not record.advance(status, **{k: v for k, v in changes.items() if v is not None or k == "output"}):
            return
        await asyncio.to_thread(self.store.put, record)
        self._notify(record, "completed")
        job.changed.set()
        self.jobs.pop(record.id, None)
        if self.on_finish is not None:
            self.on_finish(record)

    def counts(self) -> tuple[int, int]:
        """(waiting, running): accepted and not started, started and not finished."""
        placed = sum(1 for job in self.jobs.values() if job.placed)
        return len(self.jobs) - placed, placed

    def _notify(self, record: Record, event: str) -> None:
        if record.webhook:
            self.webhooks.send(record.webhook, record.webhook_events_filter, event, self.view(record))

    async def _resolve_orphans(self) -> None:
        """Records left in flight by a front of this machine (host name) that no longer runs (this one
        before a restart): they end `failed`, and their webhooks hear it. Fronts on other machines
        resolve their own when they restart."""
        for record in await asyncio.to_thread(self.store.in_flight):
            if record.front == self.name or record.front.split(":")[0] != socket.gethostname():
                continue
            if _alive(record.front):
                continue  # another front on this machine, still running
            if record.advance(FAILED, error=FRONT_DIED):
                await asyncio.to_thread(self.store.put, record)
                self._notify(record, "completed")

    async def _expire(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.store.expire)
            await asyncio.sleep(60)


def _alive(front: str) -> bool:
    """Whether the front process named `host:pid:…` still runs (same machine only)."""
    try:
        pid = int(front.split(":")[1])
        if pid == os.getpid():  # this process under another name: an earlier run (a container's pid 1)
            return False
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError, IndexError):
        return False
    except PermissionError:
        return True
    return True
