"""The public front: the only HTTP server strangers reach. A request's whole path is here.

    POST /predictions, PUT /predictions/{id}   1. token → tenant (401)   2. body ≤ limit (413)
                                               3. checks off the loop: JSON, id, input by the
                                                  schema, files fetched/bounded, webhook (400/422)
                                               4. recorded and queued (409 id taken, 429 queue full)
                                               5. 202 (Prefer: respond-async) or wait: 200
    GET /predictions/{id}, GET /predictions    the caller's records (404 for anyone else's)
    POST /predictions/{id}/cancel              the caller's (404 for anyone else's)
    GET /predictions/{id}/stream               Server-Sent Events of the caller's prediction
    GET /health-check, /openapi.json, /        the model server's state; the front's schema; the playground
    GET /metrics                               Prometheus metrics (front/metrics.py)
    /v1/…                                      Replicate's HTTP API (front/replicate_api.py)
    anything else                              404 (Cog's /shutdown among them)

The model server (Cog) listens on loopback only and hears from the front alone: predictions are
sent to it by the backend (front/backend.py) with a webhook to `/internal/events/<secret>/<id>`,
a route whose secret only the front and its Cog server know, so that progress reaches records.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from front import replicate_api
from front.backend import Backend
from front.inputs import RequestError, check_prediction
from front.metrics import CONTENT_TYPE, Metrics
from front.predictions import Predictions
from front.records import Record, open_store
from front.replicate_api import Deployment, Files
from front.schema import ModelSchema
from front.settings import FrontSettings
from front.steps import body, page, refused, tenant, watch_disconnect
from front.webhooks import WebhookSender
from net.url_guard import Guard

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"


@dataclass
class Front:
    settings: FrontSettings
    schema: ModelSchema
    guard: Guard
    backend: Backend
    predictions: Predictions
    events_secret: str
    deployment: Deployment  # as Replicate's API names it (front/replicate_api.py)
    files: Files
    metrics: Metrics


BackendFactory = Callable[[Callable[[str], str]], Awaitable[Backend]]


def create_app(settings: FrontSettings, backend_factory: BackendFactory, *, internal_url: str | None = None) -> FastAPI:
    """The front's app over the backend that `backend_factory(events_url)` makes. `internal_url`: the
    address where its own model server reaches it (the events route), e.g. http://127.0.0.1:PORT."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        schema = ModelSchema.load()
        guard = Guard.from_env()
        secret = secrets.token_urlsafe(32)
        base = internal_url or f"http://127.0.0.1:{settings.port}"
        backend = await backend_factory(lambda pid: f"{base}/internal/events/{secret}/{pid}")
        store = open_store(settings.store, settings.state_dir, settings.retention_s)
        deployment = Deployment.from_env(settings.state_dir)
        metrics = Metrics()

        def view(record: Record) -> dict:
            return replicate_api.view(record, deployment) if record.api == "replicate" else record.public()

        predictions = Predictions(
            store,
            backend,
            schema,
            WebhookSender(guard, sign=deployment.sign),
            max_queued=settings.max_queued,
            unavailable_retry_s=settings.unavailable_retry_s,
            view=view,
            on_finish=metrics.finished,
        )
        await predictions.start()
        files = Files(settings.state_dir / "files", settings.retention_s)
        app.state.front = Front(settings, schema, guard, backend, predictions, secret, deployment, files, metrics)
        if settings.tenants.open:
            logger.warning("API_TOKENS is not set: this front is open to anyone who can reach it")
        try:
            yield
        finally:
            await predictions.stop()
            await backend.close()
            store.close()

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.add_api_route("/predictions", create, methods=["POST"])
    app.add_api_route("/predictions", listing, methods=["GET"])
    app.add_api_route("/predictions/{prediction_id}", put, methods=["PUT"])
    app.add_api_route("/predictions/{prediction_id}", get, methods=["GET"])
    app.add_api_route("/predictions/{prediction_id}/cancel", cancel, methods=["POST"])
    app.add_api_route("/predictions/{prediction_id}/stream", stream, methods=["GET"])
    app.add_api_route("/internal/events/{secret}/{prediction_id}", events, methods=["POST"], include_in_schema=False)
    app.add_api_route("/health-check", health_check, methods=["GET"])
    app.add_api_route("/openapi.json", openapi, methods=["GET"])
    app.add_api_route("/metrics", metrics_text, methods=["GET"])
    app.add_api_route("/", root, methods=["GET"])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    replicate_api.add_routes(app)
    app.add_exception_handler(RequestError, refused)
    return app


# ---- the routes (thin: each step is a function below or a method of Predictions)


async def create(request: Request) -> Response:
    return await _predict(request, None)


async def put(request: Request, prediction_id: str) -> Response:
    return await _predict(request, prediction_id)


async def _predict(request: Request, path_id: str | None) -> Response:
    front: Front = request.app.state.front
    caller = tenant(request)  # 1
    raw = await body(request, front.settings.max_body_bytes)  # 2
    respond_async = "respond-async" in request.headers.get("prefer", "").lower()
    if path_id is not None and (record := await front.predictions.existing(caller, path_id)) is not None:
        return await _answer(request, front, record.id, respond_async)  # a repeated PUT: idempotent
    checked = await asyncio.to_thread(  # 3
        check_prediction,
        raw,
        path_id,
        front.schema,
        front.guard,
        max_file_bytes=front.settings.max_file_bytes,
        timeout_s=front.settings.input_timeout_s,
    )
    record = await front.predictions.create(caller, checked)  # 4
    return await _answer(request, front, record.id, respond_async)  # 5


async def _answer(request: Request, front: Front, prediction_id: str, respond_async: bool) -> Response:
    if respond_async:
        record = await front.predictions.get(None, prediction_id)
        return JSONResponse(record.public(), status_code=202)
    gone = asyncio.Event()
    watcher = asyncio.ensure_future(watch_disconnect(request, gone))
    try:
        record = await front.predictions.wait(prediction_id, gone)
    finally:
        watcher.cancel()
    return JSONResponse(record.public(), headers={"X-Cluster-Replica": record.replica} if record.replica else None)


async def get(request: Request, prediction_id: str) -> Response:
    front: Front = request.app.state.front
    record = await front.predictions.get(tenant(request), prediction_id)
    if record is None:
        raise RequestError(404, "No such prediction.")
    return JSONResponse(record.public())


async def listing(request: Request) -> Response:
    """The caller's recent predictions, newest first; `next` is the URL of the following page."""
    records, following = await page(request, tenant(request))
    return JSONResponse({"results": [r.public() for r in records], "next": following})


async def stream(request: Request, prediction_id: str) -> Response:
    """Server-Sent Events: `prediction` (the record, each time it changes: status, logs, progress),
    ending with `completed`; `:` keep-alives while nothing changes."""
    front: Front = request.app.state.front
    caller = tenant(request)
    if await front.predictions.get(caller, prediction_id) is None:
        raise RequestError(404, "No such prediction.")

    async def events():
        last, quiet = None, time.monotonic()
        while not await request.is_disconnected():
            record = await front.predictions.get(caller, prediction_id)
            if record is None:
                return
            shown = json.dumps(record.public())
            if shown != last:
                last, quiet = shown, time.monotonic()
                yield f"event: {'completed' if record.done else 'prediction'}\ndata: {shown}\n\n"
                if record.done:
                    return
            elif time.monotonic() - quiet > 10:
                quiet = time.monotonic()
                yield ": keep-alive\n\n"
            await asyncio.sleep(0.2)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


async def cancel(request: Request, prediction_id: str) -> Response:
    front: Front = request.app.state.front
    record = await front.predictions.cancel(tenant(request), prediction_id)
    if record is None:
        raise RequestError(404, "No such prediction.")
    return JSONResponse(record.public())


async def events(request: Request, secret: str, prediction_id: str) -> Response:
    front: Front = request.app.state.front
    if not secrets.compare_digest(secret, front.events_secret):
        raise RequestError(404, "Not Found")
    try:
        payload = await request.json()
    except ValueError:
        return Response(status_code=400)
    await front.predictions.on_event(prediction_id, payload)
    return Response(status_code=200)


async def health_check(request: Request) -> Response:
    """The model server's state, without its setup logs (they are the operator's: paths, settings)."""
    front: Front = request.app.state.front
    health = await front.backend.health()
    setup = health.get("setup") if isinstance(health.get("setup"), dict) else {}
    answer = {"status": health.get("status", "STARTING")}
    if setup:
        answer["setup"] = {k: setup.get(k) for k in ("started_at", "completed_at", "status")}
    if "replicas" in health:
        answer["replicas"] = health["replicas"]
    return JSONResponse(answer)


async def metrics_text(request: Request) -> Response:
    """Prometheus' text format (front/metrics.py): counts and timings, nothing a request said."""
    front: Front = request.app.state.front
    waiting, running = front.predictions.counts()
    body = front.metrics.render(waiting, running, await front.backend.health())
    return Response(body, media_type=CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    front: Front = request.app.state.front
    return JSONResponse(front.schema.openapi(tokens=not front.settings.tenants.open))


async def root(request: Request) -> Response:
    """The playground (front/static/): a page to try the model, built from /openapi.json."""
    return FileResponse(STATIC / "index.html", media_type="text/html")
