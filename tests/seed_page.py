"""Read the model page we reproduce (tests/data/model_page.txt, see tests/data/SOURCES.md): its input
fields and output schema."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SEED = Path(__file__).resolve().parent / "data" / "model_page.txt"
TYPE_LINE = re.compile(r"^(string|integer|number|boolean)( \(enum\))?$")


def _value(text: str, kind: str):
    if kind == "boolean":
        return {"True": True, "False": False}[text]
    if kind in ("integer", "number"):
        return float(text)
    return text


def fields(path: Path = SEED) -> dict[str, dict]:
    """name → {type, enum, default, minimum, maximum, description}, in page order."""
    text = path.read_text()
    body = text.split("Field Type Default value Description", 1)[1].split("Output schema", 1)[0]
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    starts = [i for i in range(len(lines) - 1) if re.fullmatch(r"[a-z_]+", lines[i]) and TYPE_LINE.match(lines[i + 1])]
    result = {}
    for start, end in zip(starts, [*starts[1:], len(lines)], strict=True):
        name, kind_line, *middle, description = lines[start:end]
        kind, enum = TYPE_LINE.match(kind_line).groups()
        field = {
            "type": kind,
            "enum": None,
            "default": None,
            "minimum": None,
            "maximum": None,
            "description": description,
        }
        rest = iter(middle)
        for line in rest:
            if line == "Options:":
                field["enum"] = [option.strip() for option in next(rest).split(",")]
            elif line.startswith(("Min: ", "Max: ")):
                field["minimum" if line.startswith("Min") else "maximum"] = float(line.split(": ", 1)[1])
            else:
                field["default"] = _value(line, kind)
        result[name] = field
    return result


def output_schema(path: Path = SEED) -> dict:
    return ast.literal_eval(path.read_text().split("Schema", 1)[1].strip())
