"""Replicate's HTTP API, under /v1, over the front's predictions: code written for Replicate (the
official `replicate` client with `base_url`) runs unchanged against a self-hosted deployment.

    POST /v1/models/{owner}/{name}/predictions        create (this deployment's model only)
    POST /v1/predictions                              create by `version`
    GET  /v1/predictions/{id}, GET /v1/predictions    the caller's prediction, the caller's list
    POST /v1/predictions/{id}/cancel
    GET  /v1/predictions/{id}/stream                  Server-Sent Events (`stream: true`)
    GET  /v1/models/{owner}/{name}[/versions[/{id}]]  the model, its version and its schema
    POST /v1/files, GET /v1/files/{id}                inputs the client uploads (multipart `content`)
    GET  /v1/files/outputs/{id}/{index}/{signature}   an output's bytes (signed URL, expires with its record)
    GET  /v1/webhooks/default/secret                  the key webhooks are signed with

The same checks, records, queue and backends as Cog's API (front/app.py); what differs is the
shape: Replicate's prediction object (`model`, `version`, `urls`, outputs as URLs instead of data
URIs), `Prefer: wait[=N]` (held at most N seconds, 55 for a bare `wait`, then answered as
`starting`, which the client reads as "poll"), 201 for a create, errors as `title`/`detail`,
signed webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">`) and an SSE stream with `output`, `logs`, `error` and `done` events.
Settings: REPLICATE_MODEL (owner/name), REPLICATE_VERSION, WEBHOOK_SIGNING_SECRET (`whsec_…`;
default: one made once and kept in FRONT_STATE_DIR).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from front.inputs import RequestError, check_prediction, parse_body
from front.records import FAILED, Record, now_iso
from front.steps import body as read_body
from front.steps import page, tenant

DEFAULT_MODEL = "jan890/flux_dev_ascii_art"  # the model page this deployment reproduces
DEFAULT_VERSION = "cfe93c58"  # the version the page shows
COG_VERSION = "0.23.1"
BARE_WAIT_S = 55  # a bare `Prefer: wait` is answered within the client's 60 s read timeout
MAX_WAIT_S = 60
FILE_ID = re.compile(r"[a-z0-9]{26}")


@dataclass(frozen=True)
class Deployment:
    """This deployment as Replicate names it, and its signing key (webhooks and output URLs)."""

    owner: str
    name: str
    version: str
    key: bytes

    @classmethod
    def from_env(cls, state_dir: Path) -> Deployment:
        owner, _, name = os.environ.get("REPLICATE_MODEL", DEFAULT_MODEL).partition("/")
        secret = os.environ.get("WEBHOOK_SIGNING_SECRET", "").strip()
        if not secret:
            path = state_dir / "webhook-secret"
            if not path.exists():
                state_dir.mkdir(parents=True, exist_ok=True)
                path.write_text("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
                path.chmod(0o600)
            secret = path.read_text().strip()
        if not secret.startswith("whsec_"):
            raise RuntimeError("WEBHOOK_SIGNING_SECRET must be whsec_<base64>")
        return cls(owner, name, os.environ.get("REPLICATE_VERSION", DEFAULT_VERSION), base64.b64decode(secret[6:]))

    @property
    def model(self) -> str:
        return f"{self.owner}/{self.name}"

    @property
    def secret(self) -> str:
        return "whsec_" + base64.b64encode(self.key).decode()

    def sign(self, body: bytes) -> dict[str, str]:
        """Replicate's (Standard Webhooks') signature headers for one delivery of `body`."""
        message_id, timestamp = "msg_" + secrets.token_hex(12), str(int(time.time()))
        digest = hmac.new(self.key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
        return {
            "webhook-id": message_id,
            "webhook-timestamp": timestamp,
            "webhook-signature": "v1," + base64.b64encode(digest).decode(),
        }

    def output_signature(self, prediction_id: str, index: int) -> str:
        return hmac.new(self.key, f"output:{prediction_id}:{index}".encode(), hashlib.sha256).hexdigest()[:32]


def view(record: Record, deployment: Deployment) -> dict:
    """Replicate's prediction object for a record."""
    base = record.base_url.rstrip("/")
    own = f"{base}/v1/predictions/{quote(record.id, safe='')}"
    urls = {"get": own, "cancel": own + "/cancel", "web": own}
    if record.stream:
        urls["stream"] = own + "/stream"
    output = record.output
    if isinstance(output, list):
        output = [_output_url(record, i, item, deployment) for i, item in enumerate(output)]
    return {
        "id": record.id,
        "model": deployment.model,
        "version": deployment.version,
        "input": record.input,
        "logs": record.logs,
        "output": output,
        "data_removed": False,
        "error": _one_line(record.error) if record.error else None,
        "status": record.status,
        "source": "api",
        "created_at": record.created_at,
        "started_at": record.started_at,
        "completed_at": record.completed_at,
        "metrics": {k: v for k, v in (record.metrics or {}).items() if isinstance(v, int | float)},
        "urls": urls,
    }


def _output_url(record: Record, index: int, item, deployment: Deployment):
    if not isinstance(item, str) or not item.startswith("data:"):
        return item
    mime = item[5 : item.find(";")] if ";" in item[:64] else "application/octet-stream"
    ext = {"image/webp": "webp", "image/png": "png", "image/jpeg": "jpg"}.get(mime, "bin")
    signature = deployment.output_signature(record.id, index)
    where = f"{quote(record.id, safe='')}/{index}/{signature}/out-{index}.{ext}"
    return f"{record.base_url.rstrip('/')}/v1/files/outputs/{where}"


def _one_line(error: str) -> str:
    """Cog's `Prediction failed: … UserError: <ours>` as our own line."""
    error = re.sub(r"^(Prediction failed: )+", "", error)
    return re.sub(r"^(UserError|RuntimeError): ", "", error)


def add_routes(app: FastAPI) -> None:
    app.add_api_route("/v1/models/{owner}/{name}/predictions", create_for_model, methods=["POST"])
    app.add_api_route("/v1/predictions", create_for_version, methods=["POST"])
    app.add_api_route("/v1/predictions", listing, methods=["GET"])
    app.add_api_route("/v1/predictions/{prediction_id}", get, methods=["GET"])
    app.add_api_route("/v1/predictions/{prediction_id}/cancel", cancel, methods=["POST"])
    app.add_api_route("/v1/predictions/{prediction_id}/stream", stream, methods=["GET"])
    app.add_api_route("/v1/models/{owner}/{name}", model, methods=["GET"])
    app.add_api_route("/v1/models/{owner}/{name}/versions", versions, methods=["GET"])
    app.add_api_route("/v1/models/{owner}/{name}/versions/{version_id}", version, methods=["GET"])
    app.add_api_route("/v1/files", upload, methods=["POST"])
    app.add_api_route("/v1/files/{file_id}", file_metadata, methods=["GET"])
    app.add_api_route("/v1/files/outputs/{prediction_id}/{index}/{signature}/{name}", output, methods=["GET"])
    app.add_api_route("/v1/webhooks/default/secret", webhook_secret, methods=["GET"])


# ---- predictions


async def create_for_model(request: Request, owner: str, name: str) -> Response:
    _own_model(request, owner, name)
    return await _create(request)


async def create_for_version(request: Request) -> Response:
    return await _create(request, by_version=True)


async def _create(request: Request, *, by_version: bool = False) -> Response:
    front = request.app.state.front
    caller = tenant(request)
    body = parse_body(await read_body(request, front.settings.max_body_bytes))
    if by_version:
        wanted = str(body.get("version", "")).rpartition(":")[2]
        if wanted != front.deployment.version:
            raise RequestError(404, f"Version {wanted!r} not found: this deployment serves {front.deployment.version}.")
    if isinstance(body.get("input"), dict):
        body["input"] = front.files.resolve(body["input"], caller, front.schema.file_fields)
    if body.get("webhook_completed") and not body.get("webhook"):
        body["webhook"], body["webhook_events_filter"] = body["webhook_completed"], ["completed"]
    checked = await asyncio.to_thread(
        check_prediction,
        json.dumps({k: body.get(k) for k in ("input", "webhook", "webhook_events_filter") if k in body}).encode(),
        None,
        front.schema,
        front.guard,
        max_file_bytes=front.settings.max_file_bytes,
        timeout_s=front.settings.input_timeout_s,
    )
    record = await front.predictions.create(
        caller,
        checked,
        queue_factor=4,  # the client never retries a create: a busy deployment queues it
        api="replicate",
        base_url=str(request.base_url),
        stream=bool(body.get("stream")),
    )
    wait = _prefer_wait(request.headers.get("prefer", ""))
    if wait is None:
        return JSONResponse(view(record, front.deployment), status_code=201)
    record = await front.predictions.wait(record.id, timeout=wait)
    answer = view(record, front.deployment)
    if not record.done:
        answer["status"] = "starting"  # what the client reads as "not finished: poll"
    return JSONResponse(answer, status_code=201)


def _prefer_wait(prefer: str) -> float | None:
    match = re.search(r"(?:^|[,;\s])wait(?:=(\d+))?(?:$|[,;\s])", prefer.lower())
    if match is None:
        return None
    return min(float(match.group(1)), MAX_WAIT_S) if match.group(1) else BARE_WAIT_S


async def get(request: Request, prediction_id: str) -> Response:
    front = request.app.state.front
    record = await front.predictions.get(tenant(request), prediction_id)
    if record is None:
        raise RequestError(404, "Prediction not found.")
    return JSONResponse(view(record, front.deployment))


async def listing(request: Request) -> Response:
    front = request.app.state.front
    records, following = await page(request, tenant(request))
    results = [view(r, front.deployment) for r in records]
    return JSONResponse({"previous": None, "next": following, "results": results})


async def cancel(request: Request, prediction_id: str) -> Response:
    front = request.app.state.front
    record = await front.predictions.cancel(tenant(request), prediction_id)
    if record is None:
        raise RequestError(404, "Prediction not found.")
    return JSONResponse(view(record, front.deployment))


async def stream(request: Request, prediction_id: str) -> Response:
    """Server-Sent Events as the client parses them: `logs` (each new line), `output` (each output
    URL), `error`, then `done`; an `id:` on every event; `:` keep-alives while nothing happens."""
    front = request.app.state.front
    caller = tenant(request)
    if await front.predictions.get(caller, prediction_id) is None:
        raise RequestError(404, "Prediction not found.")

    async def events():
        counter, sent_logs, quiet = 0, 0, time.monotonic()
        while True:
            record = await front.predictions.get(caller, prediction_id)
            if record is None:
                return
            lines = record.logs.splitlines()
            for line in lines[sent_logs:]:
                counter += 1
                yield _event("logs", line, counter)
            if len(lines) > sent_logs:
                sent_logs, quiet = len(lines), time.monotonic()
            if record.done:
                shown = view(record, front.deployment)
                if record.status == FAILED:
                    counter += 1
                    yield _event("error", shown["error"] or "failed", counter)
                for url in shown["output"] or []:
                    counter += 1
                    yield _event("output", url, counter)
                yield _event(
                    "done", json.dumps({} if record.status != "canceled" else {"reason": "canceled"}), counter + 1
                )
                return
            if time.monotonic() - quiet > 10:
                quiet = time.monotonic()
                yield ": keep-alive\n\n"
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.2)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


def _event(name: str, data: str, number: int) -> str:
    lines = "".join(f"data: {line}\n" for line in (data.splitlines() or [""]))
    return f"event: {name}\nid: {number}\n{lines}\n"


# ---- the model


def _own_model(request: Request, owner: str, name: str) -> None:
    deployment = request.app.state.front.deployment
    if (owner, name) != (deployment.owner, deployment.name):
        raise RequestError(404, f"Model {owner}/{name} not found: this deployment serves {deployment.model}.")


def _version(request: Request) -> dict:
    front = request.app.state.front
    return {
        "id": front.deployment.version,
        "created_at": now_iso(),
        "cog_version": COG_VERSION,
        "openapi_schema": front.schema.document,
    }


async def model(request: Request, owner: str, name: str) -> Response:
    tenant(request)
    _own_model(request, owner, name)
    deployment = request.app.state.front.deployment
    return JSONResponse(
        {
            "url": f"{str(request.base_url).rstrip('/')}/v1/models/{deployment.model}",
            "owner": deployment.owner,
            "name": deployment.name,
            "description": "FLUX.1 dev/schnell with a LoRA fine-tune, self-hosted",
            "visibility": "private",
            "github_url": None,
            "paper_url": None,
            "license_url": None,
            "run_count": 0,
            "cover_image_url": None,
            "default_example": None,
            "latest_version": _version(request),
        }
    )


async def versions(request: Request, owner: str, name: str) -> Response:
    tenant(request)
    _own_model(request, owner, name)
    return JSONResponse({"previous": None, "next": None, "results": [_version(request)]})


async def version(request: Request, owner: str, name: str, version_id: str) -> Response:
    tenant(request)
    _own_model(request, owner, name)
    if version_id != request.app.state.front.deployment.version:
        raise RequestError(404, f"Version {version_id!r} not found.")
    return JSONResponse(_version(request))


async def webhook_secret(request: Request) -> Response:
    tenant(request)
    return JSONResponse({"key": request.app.state.front.deployment.secret})


# ---- files


class Files:
    """Files clients upload for inputs (POST /v1/files), one folder each in the state folder, the
    tenant's own, removed with the records' retention."""

    def __init__(self, root: Path, retention_s: float):
        self.root = root
        self.retention_s = retention_s

    def add(self, tenant: str, name: str, content_type: str, data: bytes) -> dict:
        file_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(26))
        folder = self.root / file_id
        folder.mkdir(parents=True)
        (folder / "content").write_bytes(data)
        meta = {
            "id": file_id,
            "name": name[:255],
            "content_type": content_type,
            "size": len(data),
            "etag": hashlib.md5(data, usedforsecurity=False).hexdigest(),
            "checksums": {"sha256": hashlib.sha256(data).hexdigest()},
            "metadata": {},
            "created_at": now_iso(),
            "tenant": tenant,
        }
        (folder / "meta.json").write_text(json.dumps(meta))
        return meta

    def get(self, tenant: str, file_id: str) -> tuple[dict, Path] | None:
        if not FILE_ID.fullmatch(file_id):
            return None
        folder = self.root / file_id
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("tenant") != tenant or time.time() - (folder / "content").stat().st_mtime > self.retention_s:
            return None
        return meta, folder / "content"

    def resolve(self, inputs: dict, tenant: str, file_fields: tuple[str, ...]) -> dict:
        """File inputs that name one of our own uploads (`…/v1/files/<id>`) as data URIs."""
        resolved = dict(inputs)
        for name in file_fields:
            value = inputs.get(name)
            match = re.search(r"/v1/files/([a-z0-9]{26})/?$", value) if isinstance(value, str) else None
            if match and value.startswith(("http://", "https://")):
                found = self.get(tenant, match.group(1))
                if found is None:
                    raise RequestError(422, f"{name}: no such uploaded file of yours.", ("input", name))
                meta, path = found
                resolved[name] = f"data:{meta['content_type']};base64," + base64.b64encode(path.read_bytes()).decode()
        return resolved

    def expire(self) -> None:
        cutoff = time.time() - self.retention_s
        for folder in self.root.glob("*") if self.root.is_dir() else ():
            content = folder / "content"
            if not content.exists() or content.stat().st_mtime < cutoff:
                for item in folder.glob("*"):
                    item.unlink(missing_ok=True)
                folder.rmdir()


def _file_view(meta: dict, base: str) -> dict:
    shown = {k: v for k, v in meta.items() if k != "tenant"}
    return {**shown, "urls": {"get": f"{base.rstrip('/')}/v1/files/{meta['id']}"}}


async def upload(request: Request) -> Response:
    front = request.app.state.front
    caller = tenant(request)
    length = request.headers.get("content-length", "")
    if not length.isdigit():
        raise RequestError(411, "Send the upload with a Content-Length.")
    if int(length) > front.settings.max_file_bytes + (1 << 20):
        raise RequestError(413, f"The file is over the {front.settings.max_file_bytes:,}-byte limit for input files.")
    form = await request.form(max_files=1, max_fields=8)
    content = form.get("content")
    if content is None or isinstance(content, str):
        raise RequestError(422, "Send the file as the multipart part `content`.", ("content",))
    data = await content.read()
    content_type = content.content_type or "application/octet-stream"
    meta = await asyncio.to_thread(front.files.add, caller, content.filename or "file", content_type, data)
    return JSONResponse(_file_view(meta, str(request.base_url)), status_code=201)


async def file_metadata(request: Request, file_id: str) -> Response:
    front = request.app.state.front
    found = front.files.get(tenant(request), file_id)
    if found is None:
        raise RequestError(404, "File not found.")
    return JSONResponse(_file_view(found[0], str(request.base_url)))


async def output(request: Request, prediction_id: str, index: int, signature: str, name: str) -> Response:
    """An output's bytes. The URL is signed (anyone holding it may read it, as Replicate's delivery
    URLs), and lives as long as its record."""
    front = request.app.state.front
    if not hmac.compare_digest(signature, front.deployment.output_signature(prediction_id, index)):
        raise RequestError(404, "Not Found")
    record = await front.predictions.get(None, prediction_id)
    outputs = record.output if record is not None and isinstance(record.output, list) else []
    if not 0 <= index < len(outputs) or not str(outputs[index]).startswith("data:"):
        raise RequestError(404, "Not Found")
    header, _, payload = outputs[index].partition(",")
    mime = header[5:].split(";")[0] or "application/octet-stream"
    return Response(base64.b64decode(payload), media_type=mime, headers={"Cache-Control": "private, max-age=3600"})
