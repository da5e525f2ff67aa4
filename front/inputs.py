"""Checking a prediction request before anything is accepted (run off the event loop).

A stranger's request is hostile until checked, including the fields Cog would otherwise handle
itself (FACTS.md, "What coglet 0.23.1 trusts"):

- the body: a JSON object of at most `max_body_bytes` (the route answers 413 before reading more);
- `id`: letters, digits, `_ . -`, at most 64;
- `input`: valid by the model's schema (schema.ModelSchema), unknown fields dropped as Cog drops them;
- file fields (`image`, `mask`): a `data:` URI of at most `max_file_bytes` passes; an http(s) URL is
  fetched here, through the SSRF guard (every hop checked, connected only to the checked address,
  one deadline, a byte cap, never decompressed) and handed to Cog as a data URI; anything else —
  a server path, `file://` — is refused with one message, whether or not it exists;
- `webhook`: an http(s) URL the SSRF guard accepts (checked again when each event is delivered);
  `webhook_events_filter`: Cog's event names.

Failures are `RequestError`s: an HTTP status and, for 422, Cog's `detail` shape naming the field.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

from errors import UserError
from front.schema import EVENTS, ID_PATTERN, ModelSchema
from net.fetch import Fetcher, Limits
from net.url_guard import Guard

ID = re.compile(ID_PATTERN)
DATA_URI = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*)(;base64)?,", re.I)
MAX_WEBHOOK_CHARS = 2048


class RequestError(Exception):
    """A request the front refuses: `status`, and `field` (a path under the body) for a 422."""

    def __init__(self, status: int, message: str, field: tuple[str, ...] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def body(self) -> dict:
        if self.status == 422:
            return {"detail": [{"loc": ["body", *self.field], "msg": self.message, "type": "value_error"}]}
        return {"detail": self.message}


@dataclass(frozen=True)
class Prediction:
    """A checked request: what the front records and what it sends to Cog."""

    id: str | None
    given: dict  # the input as the client sent it (known fields only): what the record shows
    input: dict  # what Cog gets: file fields as data URIs
    webhook: str | None
    webhook_events_filter: list[str] | None


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise RequestError(422, "The body must be a JSON object with an `input` object.")
    return body


def check_prediction(
    raw: bytes, path_id: str | None, schema: ModelSchema, guard: Guard, *, max_file_bytes: int, timeout_s: float
) -> Prediction:
    """Every check of a prediction request, in one place (see the module's docstring)."""
    body = parse_body(raw)
    prediction_id = path_id if path_id is not None else body.get("id")  # a PUT's path names it
    if prediction_id is not None and (not isinstance(prediction_id, str) or not ID.match(prediction_id)):
        raise RequestError(
            422, "id must be 1–64 letters, digits, '_', '.' or '-', starting with a letter or digit.", ("id",)
        )
    inputs = body.get("input")
    if not isinstance(inputs, dict):
        raise RequestError(422, "Field required" if inputs is None else "Input should be an object", ("input",))
    inputs = schema.known(inputs)
    for name, message in schema.errors(inputs):
        raise RequestError(422, message, ("input", name) if name else ("input",))
    webhook = check_webhook(body.get("webhook"), guard)
    events = body.get("webhook_events_filter")
    if events is not None and (not isinstance(events, list) or not all(e in EVENTS for e in events)):
        raise RequestError(
            422, f"webhook_events_filter must be a list of {', '.join(EVENTS)}.", ("webhook_events_filter",)
        )
    given = dict(inputs)
    for name in schema.file_fields:
        if inputs.get(name) is not None:
            inputs[name] = file_input(name, inputs[name], guard, max_file_bytes, timeout_s)
    events = list(dict.fromkeys(events)) if events is not None else None
    return Prediction(prediction_id, given, inputs, webhook, events)


def check_webhook(url, guard: Guard) -> str | None:
    if url is None:
        return None
    if not isinstance(url, str) or len(url) > MAX_WEBHOOK_CHARS:
        raise RequestError(
            422, f"webhook must be an http(s) URL of at most {MAX_WEBHOOK_CHARS} characters.", ("webhook",)
        )
    try:
        guard.check(url)
    except UserError as error:
        raise RequestError(422, f"webhook: {error}", ("webhook",)) from None
    return url


def file_input(name: str, value: str, guard: Guard, max_bytes: int, timeout_s: float) -> str:
    """The file input `value` as a data URI of at most `max_bytes` (see the module's docstring)."""
    match = DATA_URI.match(value)
    if match:
        payload = value[match.end() :]
        size = len(payload) * 3 // 4 if match.group(3) else len(payload)
        if size > max_bytes:
            raise RequestError(422, f"{name} is over the {max_bytes:,}-byte limit for input files.", ("input", name))
        if match.group(3):
            try:
                base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(422, f"{name} is a data URI whose base64 is malformed.", ("input", name)) from None
        return value
    if not re.match(r"https?://", value, re.I):
        raise RequestError(
            422,
            f"{name} must be a data: URI or an http(s) URL; server paths and other schemes are not accepted.",
            ("input", name),
        )
    fetcher = Fetcher(guard, Limits(timeout=min(timeout_s, 30.0), total_timeout=timeout_s, max_file_bytes=max_bytes))
    try:
        data, content_type = fetcher.read(value, name, max_bytes)
    except UserError as error:
        raise RequestError(422, str(error), ("input", name)) from None
    mime = content_type.split(";")[0].strip().lower()
    if not re.fullmatch(r"image/[\w.+-]+", mime):
        mime = "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(data).decode()
