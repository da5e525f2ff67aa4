"""What a request is routed by: the normalised LoRA sources it names.

A request that names LoRAs is routed as Ray Serve's multiplexed model id `lora-<hash>`: the hash of
the sorted `Source.key`s of its `replicate_weights` and `extra_lora` (the product's own parser, so
the same LoRA typed two ways is one id, and a token in a URL never reaches Ray's logs or metrics).
A request without a LoRA, or whose LoRA does not parse (Cog answers that error), has no id and goes
to any free replica. Pure: no Ray, no network, no disk.
"""

from __future__ import annotations

import hashlib
import json

from errors import UserError
from loras.sources import parse_source

LORA_FIELDS = ("replicate_weights", "extra_lora")


def lora_keys(inputs: dict) -> list[str]:
    """The sorted, distinct `Source.key`s of the LoRA fields of a prediction's `input`."""
    keys = set()
    for name in LORA_FIELDS:
        value = inputs.get(name)
        if not isinstance(value, str) or not value.strip():
            continue
        try:
            keys.add(parse_source(value).key)
        except (UserError, ValueError):  # not a LoRA source: Cog's predictor says so to the client
            continue
    return sorted(keys)


def routing_key(body: bytes) -> str:
    """The multiplexed model id of a `POST/PUT /predictions` body; "" when it names no LoRA."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # not JSON: Cog answers 400
        return ""
    inputs = payload.get("input") if isinstance(payload, dict) else None
    keys = lora_keys(inputs) if isinstance(inputs, dict) else []
    if not keys:
        return ""
    return "lora-" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:20]


def prediction_id(body: bytes) -> str | None:
    """The `id` a `POST /predictions` body gives its prediction, if any."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    value = payload.get("id") if isinstance(payload, dict) else None
    return value if isinstance(value, str) and value else None
