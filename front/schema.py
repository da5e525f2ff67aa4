"""The model's schema as the front uses it and publishes it.

The model's `Input` and `Output` come from `.cog/openapi_schema.json` (what `cog build` and
`make schema` write from predict.py, and what Cog validates by), never from a copy: the front
validates a request's input by it before accepting the prediction (so an async prediction is not
accepted and then refused), derives which fields are files (`format: uri`) and secrets
(`x-cog-secret`), and publishes its own `/openapi.json`: Cog's paths it forwards, with every
status it answers documented, plus the routes of its own.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import jsonschema

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / ".cog" / "openapi_schema.json"

EVENTS = ("start", "output", "logs", "completed")
ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a prediction id the client chooses


@dataclass(frozen=True)
class ModelSchema:
    document: dict

    @classmethod
    def load(cls, path: Path = SCHEMA_FILE) -> ModelSchema:
        return cls(json.loads(path.read_text()))

    @property
    def input(self) -> dict:
        return self.document["components"]["schemas"]["Input"]

    @cached_property
    def file_fields(self) -> tuple[str, ...]:
        return tuple(k for k, v in self.input["properties"].items() if v.get("format") == "uri")

    @cached_property
    def secret_fields(self) -> tuple[str, ...]:
        return tuple(k for k, v in self.input["properties"].items() if v.get("x-cog-secret"))

    @cached_property
    def _validator(self) -> jsonschema.Draft7Validator:
        # OpenAPI 3.0's `nullable` is not JSON Schema: a null is refused, as Cog refuses it.
        root = {**self.input, "components": self.document["components"]}
        return jsonschema.Draft7Validator(root)

    def errors(self, inputs: dict) -> list[tuple[str | None, str]]:
        """(field or None, message) for each way `inputs` breaks the schema (unknown fields are not errors:
        Cog drops them, and so does `known`)."""
        found = []
        for error in sorted(self._validator.iter_errors(inputs), key=lambda e: list(e.path)):
            name = str(error.path[0]) if error.path else None
            if error.validator == "required":
                found.append((error.message.split("'")[1] if "'" in error.message else None, "Field required"))
            else:
                found.append((name, _short(error)))
        return found

    def known(self, inputs: dict) -> dict:
        """The fields Cog knows (it drops the others), with a null in a `nullable` field read as the
        field left out, as the schema says (Cog itself answers 422 to such a null)."""
        fields = self.input["properties"]
        return {k: v for k, v in inputs.items() if k in fields and not (v is None and fields[k].get("nullable"))}

    def redacted(self, inputs: dict) -> dict:
        """The input as records keep and show it: secret fields left out (they are write-only)."""
        return {k: v for k, v in inputs.items() if k not in self.secret_fields}

    def openapi(self, *, tokens: bool) -> dict:
        """The front's own OpenAPI document (see the module's docstring)."""
        doc = copy.deepcopy(self.document)
        schemas = doc["components"]["schemas"]
        schemas["PredictionRequest"] = {
            "title": "PredictionRequest",
            "type": "object",
            "required": ["input"],
            "properties": {
                "id": {"title": "Id", "type": "string", "pattern": ID_PATTERN},
                "input": {"$ref": "#/components/schemas/Input"},
                "webhook": {"title": "Webhook", "type": "string", "format": "uri", "maxLength": 2048},
                "webhook_events_filter": {
                    "title": "Webhook Events Filter",
                    "type": "array",
                    "items": {"type": "string", "enum": list(EVENTS)},
                },
            },
        }
        response = schemas["PredictionResponse"]["properties"]
        response["status"] = {"type": "string", "enum": ["starting", "processing", "succeeded", "failed", "canceled"]}
        # What a prediction that has not finished, or failed, carries: null (Cog's schema says otherwise).
        response["output"] = {"nullable": True, "allOf": [{"$ref": _ref("Output")}]}
        for name in ("error", "started_at", "completed_at"):
            response[name] = {**response[name], "nullable": True}
        response["webhook"] = {"type": "string", "nullable": True}
        response["webhook_events_filter"] = {"type": "array", "items": {"type": "string"}, "nullable": True}
        response["progress"] = {"type": "object", "nullable": True}
        schemas["Error"] = {
            "title": "Error",
            "type": "object",
            "properties": {"detail": {"type": "string"}, "error": {"type": "string"}, "status": {"type": "string"}},
        }
        schemas["PredictionList"] = {
            "type": "object",
            "properties": {
                "results": {"type": "array", "items": {"$ref": "#/components/schemas/PredictionResponse"}},
                "next": {"type": "string", "nullable": True},
            },
        }
        prediction = _json("#/components/schemas/PredictionResponse")
        error = _json("#/components/schemas/Error")
        invalid = _json("#/components/schemas/HTTPValidationError")
        common = {"401": ("Missing or unknown API token", error)} if tokens else {}
        prefer = {
            "name": "Prefer",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "enum": ["respond-async"]},
        }
        create = {
            "200": ("The prediction, finished", prediction),
            "202": ("Accepted (Prefer: respond-async): the prediction as it starts", prediction),
            "400": ("The body is not JSON", error),
            "409": ("The prediction id is taken", error),
            "413": ("The body is over the size limit", error),
            "422": ("An input, the webhook or the id is not acceptable", invalid),
            "429": ("Too many predictions queued: retry after Retry-After seconds", error),
            "503": ("No model server is available", error),
            **common,
        }
        body = {"required": True, "content": {"application/json": {"schema": {"$ref": _ref("PredictionRequest")}}}}
        ident = {"name": "prediction_id", "in": "path", "required": True, "schema": {"type": "string"}}
        new_id = {**ident, "schema": {"type": "string", "pattern": ID_PATTERN}}
        doc["paths"] = {
            "/": {"get": _operation("playground", {"200": ("The playground page", {"text/html": {"schema": {}}})})},
            "/health-check": {"get": _operation("health_check", {"200": ("The model server's state", _json({}))})},
            "/metrics": {
                "get": _operation("metrics", {"200": ("Prometheus text format", {"text/plain": {"schema": {}}})})
            },
            "/predictions": {
                "post": _operation("predict", create, requestBody=body, parameters=[prefer]),
                "get": _operation(
                    "list_predictions",
                    {"200": ("The caller's recent predictions, newest first", _json(_ref("PredictionList")))} | common,
                    parameters=[{"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}}],
                ),
            },
            "/predictions/{prediction_id}": {
                "put": _operation("predict_idempotent", create, requestBody=body, parameters=[new_id, prefer]),
                "get": _operation(
                    "get_prediction",
                    {"200": ("The prediction", prediction), "404": ("No such prediction of yours", error)} | common,
                    parameters=[ident],
                ),
            },
            "/predictions/{prediction_id}/stream": {
                "get": _operation(
                    "stream_prediction",
                    {
                        "200": ("Server-Sent Events", {"text/event-stream": {"schema": {}}}),
                        "404": ("No such prediction", error),
                    }
                    | common,
                    parameters=[ident],
                )
            },
            "/predictions/{prediction_id}/cancel": {
                "post": _operation(
                    "cancel",
                    {"200": ("Cancel requested: the prediction", prediction), "404": ("No such prediction", error)}
                    | common,
                    parameters=[ident],
                )
            },
        }
        if tokens:
            doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in doc["paths"].items():
                if path.startswith("/predictions"):
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
        return doc


def _ref(name: str) -> str:
    return f"#/components/schemas/{name}"


def _json(schema) -> dict:
    return {"application/json": {"schema": {"$ref": schema} if isinstance(schema, str) else schema}}


def _operation(name: str, responses: dict, **extra) -> dict:
    return {
        "operationId": name,
        "responses": {
            status: {"description": text, "content": content} for status, (text, content) in responses.items()
        },
        **extra,
    }


def _short(error: jsonschema.ValidationError) -> str:
    if error.validator in ("minimum", "maximum"):
        word = "greater than or equal to" if error.validator == "minimum" else "less than or equal to"
        return f"Input should be {word} {error.validator_value}"
    if error.validator == "type":
        return f"Input should be a valid {error.validator_value}"
    if error.validator == "enum":
        return "Input should be " + ", ".join(repr(v) for v in error.validator_value)
    return error.message[:300]
