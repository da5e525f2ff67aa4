"""What a request is routed by: one id per LoRA it names.

Each LoRA of a request (the main one from `replicate_weights`, every entry of an `extra_lora`
list, its `:<scale>` left out) gets the id `lora-<hash>` of its normalised `Source.key` (the
product's own parsers, so the same LoRA typed two ways is one id, and a token in a URL never
reaches Ray's logs or metrics). A request's Ray Serve multiplexed model id is its sorted, distinct
LoRA ids joined by commas (`routing_key`); the router (router.py) and the replicas split it again
(`lora_ids`), so `A` and `A:0.6, B` share A's id. A request without a LoRA, or whose LoRA fields
do not parse (Cog answers that error), has no id and goes to any free replica. Pure: no Ray, no
network, no disk.
"""

from __future__ import annotations

import hashlib
import json

from errors import UserError
from loras.sources import parse_source, split_sources

SEPARATOR = ","


def _lora_id(key: str) -> str:
    return "lora-" + hashlib.sha256(key.encode()).hexdigest()[:20]


def lora_keys(inputs: dict) -> list[str]:
    """The sorted, distinct `Source.key`s of the LoRAs a prediction's `input` names."""
    keys = set()
    main, extra = inputs.get("replicate_weights"), inputs.get("extra_lora")
    try:
        if isinstance(main, str) and main.strip():
            keys.add(parse_source(main).key)
        if isinstance(extra, str) and extra.strip():
            keys.update(parse_source(source).key for source, _ in split_sources(extra))
    except (UserError, ValueError):  # not LoRA sources: Cog's predictor says so to the client
        return []
    return sorted(keys)


def routing_key(body: bytes) -> str:
    """The multiplexed model id of a `POST/PUT /predictions` body; "" when it names no LoRA."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # not JSON: Cog answers 400
        return ""
    inputs = payload.get("input") if isinstance(payload, dict) else None
    keys = lora_keys(inputs) if isinstance(inputs, dict) else []
    return SEPARATOR.join(sorted({_lora_id(key) for key in keys}))


def lora_ids(model_id: str) -> list[str]:
    """The LoRA ids a multiplexed model id is made of."""
    return [part for part in model_id.split(SEPARATOR) if part]


def prediction_id(body: bytes) -> str | None:
    """The `id` a `POST/PUT /predictions` body gives its prediction, if any."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    value = payload.get("id") if isinstance(payload, dict) else None
    return value if isinstance(value, str) and value else None
