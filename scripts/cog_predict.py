"""A one-shot prediction like `cog predict`, without Docker.

    FLUX_WEIGHTS_DIR=weights python scripts/cog_predict.py -i prompt="an ascii cat" -i image=@photo.png

Inputs are `-i name=value` (`@path` for files), checked and defaulted by Cog's own input checks;
outputs are written as the cog CLI writes them: output.0.webp, output.1.webp, …
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("cog_predict")


def parse_inputs(pairs: list[str], fields) -> dict:
    """`name=value` strings → typed values for the predictor's fields."""
    from cog import Path as CogPath

    values = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"-i {pair!r}: expected name=value with name one of: {', '.join(fields)}")
        kind = fields[name].type.primitive.name
        if raw.startswith("@"):
            values[name] = CogPath(raw[1:])
        elif kind == "INTEGER":
            values[name] = int(raw)
        elif kind == "FLOAT":
            values[name] = float(raw)
        elif kind == "BOOL":
            values[name] = raw.lower() in ("1", "true", "yes")
        else:
            values[name] = raw
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one prediction, like `cog predict`.")
    parser.add_argument("-i", "--input", action="append", default=[], help="name=value, or name=@file")
    parser.add_argument("-o", "--output", default="output", help="output name prefix (default: output)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from cog._inspector import check_input, create_predictor

    info = create_predictor("predict", "Predictor")
    try:
        inputs = check_input(info.inputs, parse_inputs(args.input, info.inputs))
    except ValueError as error:
        raise SystemExit(f"invalid input: {error}") from None

    import predict

    predictor = predict.Predictor()
    predictor.setup()
    try:
        outputs = predictor.run(**inputs)
    except Exception as error:
        raise SystemExit(f"prediction failed: {error}") from None
    for index, path in enumerate(outputs):
        target = Path(f"{args.output}.{index}{Path(path).suffix}")
        shutil.copyfile(path, target)
        logger.info("written %s", target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
