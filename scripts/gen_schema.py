"""Write `.cog/openapi_schema.json`, the schema Cog's server validates every input against.

    python scripts/gen_schema.py            (or: make schema)
    python scripts/gen_schema.py --check    exit 1 if the committed file is stale

`cog build` normally writes this file; without Docker we generate it the same way: Cog's own
inspector reads the predictor's inputs, and this script lays them out as Cog's Go CLI does
(pkg/schema/openapi.go): enums as `allOf` references to a component named after the field,
`x-order`, `minimum`/`maximum`, defaults; an Optional field is nullable, and a field neither
Optional nor with a default is required.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / ".cog" / "openapi_schema.json"

_OK = {"200": {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}}
_VALIDATION_ERROR = {
    "description": "Validation Error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
}


def title_case(name: str) -> str:
    return " ".join(word.capitalize() for word in name.split("_"))


def number(value):
    """Integral numbers as JSON integers, as Go's encoder writes them."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def input_schema(info) -> tuple[dict, dict]:
    """The Input component and the enum components of a cog PredictorInfo."""
    properties, enums, required = {}, {}, []
    for name, field in info.inputs.items():
        prop: dict = {"x-order": field.order}
        if field.choices:
            enums[name] = {
                "title": name,
                "description": "An enumeration.",
                "enum": list(field.choices),
                "type": field.type.json_type()["type"],
            }
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop["title"] = title_case(name)
            prop.update(field.type.json_type())
        default = getattr(field.default, "default", field.default)  # a FieldInfo or a plain value
        if field.type.repetition.name == "OPTIONAL":
            prop["nullable"] = True
        if default is not None:
            prop["default"] = number(default)
        elif field.type.repetition.name == "REQUIRED":
            required.append(name)
        if field.description:
            prop["description"] = field.description
        if field.ge is not None:
            prop["minimum"] = number(field.ge)
        if field.le is not None:
            prop["maximum"] = number(field.le)
        properties[name] = prop
    schema = {"title": "Input", "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema, enums


def openapi(info) -> dict:
    inputs, enums = input_schema(info)
    output = info.output.json_type()
    ref = "#/components/schemas/"
    timestamp = {"type": "string", "format": "date-time"}
    components = {
        "Input": inputs,
        "Output": output,
        **enums,
        "PredictionRequest": {
            "title": "PredictionRequest",
            "type": "object",
            "properties": {"id": {"title": "Id", "type": "string"}, "input": {"$ref": ref + "Input"}},
        },
        "PredictionResponse": {
            "title": "PredictionResponse",
            "type": "object",
            "properties": {
                "input": {"$ref": ref + "Input"},
                "output": {"$ref": ref + "Output"},
                "id": {"title": "Id", "type": "string"},
                "version": {"title": "Version", "type": "string"},
                "created_at": {"title": "Created At", **timestamp},
                "started_at": {"title": "Started At", **timestamp},
                "completed_at": {"title": "Completed At", **timestamp},
                "status": {"title": "Status", "type": "string"},
                "error": {"title": "Error", "type": "string"},
                "logs": {"title": "Logs", "type": "string"},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
        "Status": {
            "title": "Status",
            "description": "An enumeration.",
            "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
            "type": "string",
        },
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {"detail": {"title": "Detail", "type": "array", "items": {"$ref": ref + "ValidationError"}}},
        },
        "ValidationError": {
            "title": "ValidationError",
            "required": ["loc", "msg", "type"],
            "type": "object",
            "properties": {
                "loc": {
                    "title": "Location",
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                },
                "msg": {"title": "Message", "type": "string"},
                "type": {"title": "Error Type", "type": "string"},
            },
        },
    }
    paths = {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": _OK}},
        "/health-check": {
            "get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get", "responses": _OK}
        },
        "/predictions": {
            "post": {
                "summary": "Predict",
                "description": "Run a single prediction on the model",
                "operationId": "predict_predictions_post",
                "requestBody": {"content": {"application/json": {"schema": {"$ref": ref + "PredictionRequest"}}}},
                "responses": {
                    "200": {
                        "description": "Successful Response",
                        "content": {"application/json": {"schema": {"$ref": ref + "PredictionResponse"}}},
                    },
                    "422": _VALIDATION_ERROR,
                },
            }
        },
        "/predictions/{prediction_id}/cancel": {
            "post": {
                "summary": "Cancel",
                "operationId": "cancel_predictions__prediction_id__cancel_post",
                "parameters": [
                    {
                        "required": True,
                        "schema": {"title": "Prediction Id", "type": "string"},
                        "name": "prediction_id",
                        "in": "path",
                    }
                ],
                "responses": {**_OK, "422": _VALIDATION_ERROR},
            }
        },
    }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": paths,
        "components": {"schemas": components},
    }


def generate() -> str:
    sys.path.insert(0, str(ROOT))
    from cog._inspector import create_predictor

    info = create_predictor("predict", "Predictor")
    return json.dumps(openapi(info), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate Cog's input schema from predict.py.")
    parser.add_argument("--check", action="store_true", help="fail if the committed schema is stale")
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        if not SCHEMA_PATH.is_file() or SCHEMA_PATH.read_text() != text:
            sys.stderr.write(f"{SCHEMA_PATH} is stale: run `make schema` and commit it.\n")
            return 1
        return 0
    SCHEMA_PATH.parent.mkdir(exist_ok=True)
    SCHEMA_PATH.write_text(text)
    sys.stdout.write(f"wrote {SCHEMA_PATH}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
