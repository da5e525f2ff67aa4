"""The steps every route of the front shares: who the caller is, the bounded body, the list cursor,
a client that hangs up, and refusals in the shape each API answers them."""

from __future__ import annotations

import asyncio
from datetime import datetime

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from front.inputs import RequestError
from front.records import Record

PAGE = 50  # records per page of a list

TITLES = {
    400: "Bad request",
    401: "Unauthenticated",
    404: "Not found",
    409: "Conflict",
    411: "Length required",
    413: "Payload too large",
    422: "Input validation failed",
    429: "Too many requests",
    503: "Unavailable",
}


def tenant(request: Request) -> str:
    """The caller's tenant ("" on an open front); 401 without a known token."""
    found = request.app.state.front.settings.tenants.tenant(request.headers.get("authorization"))
    if found is None:
        raise RequestError(401, "Missing or unknown API token: send Authorization: Bearer <token>.")
    return found


async def body(request: Request, limit: int) -> bytes:
    """The body, at most `limit` bytes: a larger Content-Length is refused before reading anything."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise RequestError(413, f"The body is {int(length):,} bytes, over the {limit:,}-byte limit.")
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        if len(received) > limit:
            raise RequestError(413, f"The body is over the {limit:,}-byte limit.")
    return bytes(received)


async def page(request: Request, caller: str) -> tuple[list[Record], str | None]:
    """One page of the caller's records, newest first, and the URL of the next page (or None)."""
    cursor = request.query_params.get("cursor")
    try:
        before = float(cursor) if cursor else None
    except ValueError:
        before = None
    records = await request.app.state.front.predictions.page(caller, PAGE + 1, before)
    if len(records) <= PAGE:
        return records, None
    records = records[:PAGE]
    created = datetime.fromisoformat(records[-1].created_at.replace("Z", "+00:00")).timestamp()
    return records, str(request.url.include_query_params(cursor=repr(created)))


async def watch_disconnect(request: Request, gone: asyncio.Event) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.5)
    gone.set()


async def refused(request: Request, error: RequestError) -> Response:
    """Cog's shapes for Cog's routes; Replicate's problem details (`title`, `detail`) under /v1."""
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    if error.status == 429:
        headers = {"Retry-After": "5"}
    if request.url.path.startswith("/v1/"):
        where = ".".join(error.field)
        detail = f"{where}: {error.message}" if error.status == 422 and where else error.message
        answer = {"title": TITLES.get(error.status, "Error"), "detail": detail, "status": error.status}
        return JSONResponse(answer, status_code=error.status, headers=headers)
    return JSONResponse(error.body(), status_code=error.status, headers=headers)
