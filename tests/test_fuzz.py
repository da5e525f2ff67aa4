"""Schema-driven fuzzing of the real Cog server: hypothesis builds request bodies from /openapi.json
(values inside the schema, values just outside it, wrong types, unknown fields, junk files) and every
answer must be a 200 (succeeded or failed, never an unexplained state) or a 422; never a 5xx, never a
dead worker, and afterwards the server gives the same picture as before.

Bounded: FUZZ_EXAMPLES examples (default 60), each kept cheap (sizes and steps drawn small except at
the bounds); derandomized so CI runs the same examples each time (FUZZ_SEED picks another set).
"""

from __future__ import annotations

import os

import pytest
import requests
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st

from tests.cog_server import data_uri, decode_data_uri, png_bytes, report

REFERENCE = {"prompt": "an ascii art fox", "seed": 77, "aspect_ratio": "custom", "width": 256, "height": 256}
REFERENCE["num_inference_steps"] = 2
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
# Fields whose large values cost seconds each on CPU: drawn from a cheap subrange most of the time.
CHEAP = {"width": (256, 400), "height": (256, 400), "num_inference_steps": (1, 2), "num_outputs": (1, 2)}

JUNK_FILES = [
    data_uri(png_bytes((48, 48))),
    data_uri(png_bytes((300, 200), "L")),
    data_uri(b"GIF89a" + bytes(20), "image/gif"),
    data_uri(b""),
    data_uri(bytes(range(256)) * 4, "application/octet-stream"),
    "data:image/png;base64,@@@",
    "data:,hello",
    "not a url",
    "ftp://127.0.0.1/x.png",
    "http://127.0.0.1:9/unreachable.png",  # discard port: refused at once
]


def value_strategies(name: str, prop: dict, enums: dict) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """(values the schema accepts, values it must reject) for one input."""
    if "allOf" in prop:
        choices = enums[prop["allOf"][0]["$ref"].rsplit("/", 1)[1]]["enum"]
        return st.sampled_from(choices), st.one_of(st.text(max_size=8).filter(lambda v: v not in choices), st.none())
    kind, lo, hi = prop.get("type"), prop.get("minimum"), prop.get("maximum")
    if prop.get("format") == "uri":
        return st.sampled_from(JUNK_FILES), st.one_of(st.integers(), st.none())
    if kind == "integer":
        valid = st.integers(lo if lo is not None else 0, hi if hi is not None else 2**63)
        if name in CHEAP:
            valid = st.integers(*CHEAP[name])  # the upper bounds are in test_http_faults.py's battery
        outside = [v for v in (lo - 1 if lo is not None else None, hi + 1 if hi is not None else None) if v is not None]
        return valid, st.one_of(
            st.sampled_from(outside or [1.5]), st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: v % 1)
        )
    if kind == "number":
        valid = st.floats(lo if lo is not None else -1e6, hi if hi is not None else 1e6, allow_nan=False)
        outside = [
            v for v in (lo - 0.5 if lo is not None else None, hi + 0.5 if hi is not None else None) if v is not None
        ]
        return valid, st.one_of(st.sampled_from(outside or ["1"]), st.text(max_size=3))
    if kind == "boolean":
        return st.booleans(), st.sampled_from(["true", 0, 1, None])
    if kind == "string":
        return st.text(max_size=300), st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2))
    return st.none(), st.none()


@pytest.fixture(scope="module")
def fuzz_schema(cog_server):
    cog_server.wait_for("READY")
    return requests.get(cog_server.url + "/openapi.json", timeout=10).json()["components"]["schemas"]


def bodies(schemas: dict) -> st.SearchStrategy:
    """An `input` object: valid values for a random subset of the fields, then sometimes one field
    replaced by a value outside the schema, sometimes unknown fields added."""
    props = schemas["Input"]["properties"]
    valid, invalid = {}, {}
    for name, prop in props.items():
        valid[name], invalid[name] = value_strategies(name, prop, schemas)
    # 1 MP aspect ratios cost seconds each: mostly custom (cheap) sizes.
    valid["aspect_ratio"] = st.one_of(*[st.just("custom")] * 5, valid["aspect_ratio"])
    # Mostly failures (random strings are no LoRA, no token): keep them to about one request in four.
    rare = {"image", "mask", "extra_lora", "replicate_weights", "hf_api_token", "civitai_api_token"}
    optional = st.fixed_dictionaries(
        {"prompt": valid["prompt"]}, optional={n: s for n, s in valid.items() if n != "prompt" and n not in rare}
    )
    extra = st.fixed_dictionaries({}, optional={n: valid[n] for n in rare})

    @st.composite
    def body(draw):
        inputs = draw(optional)
        if draw(st.integers(0, 3)) == 0:
            inputs.update(draw(extra))
        if draw(st.integers(0, 2)) == 0:  # one field outside the schema (or the prompt missing)
            name = draw(st.sampled_from(sorted(props)))
            if name == "prompt" and draw(st.booleans()):
                inputs.pop("prompt")
            else:
                inputs[name] = draw(invalid[name])
        if draw(st.integers(0, 4)) == 0:
            keys = st.text(min_size=1, max_size=10).filter(lambda k: k not in props)
            inputs.update(draw(st.dictionaries(keys, st.integers(), max_size=2)))
        return inputs

    return body()


def test_fuzz_inputs_from_the_schema(cog_server, fuzz_schema, request):
    before = cog_server.predict(REFERENCE).json()
    assert before["status"] == "succeeded", before
    pid = cog_server.worker().pid
    seen = {"200-succeeded": 0, "200-failed": 0, "422": 0}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize="FUZZ_SEED" not in os.environ,
        suppress_health_check=list(HealthCheck),
    )
    @seed(int(os.environ.get("FUZZ_SEED", "0")))
    @given(bodies(fuzz_schema))
    # Three user errors that pass the schema are always among the examples, so every kind of answer is
    # reached whatever Hypothesis draws (its draws vary from run to run: 2 to 9 "failed" of 60 seen).
    @example({"prompt": ""})
    @example({"prompt": "a cat", "extra_lora": "Ñ"})
    @example({"prompt": "a cat", "hf_api_token": "\x04not a token\t"})
    def one(inputs):
        response = cog_server.predict(inputs, timeout=120)
        assert response.status_code in (200, 422), (inputs, response.status_code, response.text[:500])
        body = response.json()
        if response.status_code == 422:
            seen["422"] += 1
            assert body["detail"] and all(d["loc"][:2] == ["body", "input"] for d in body["detail"]), body
            return
        assert body["status"] in ("succeeded", "failed"), body
        seen[f"200-{body['status']}"] += 1
        if body["status"] == "failed":
            assert body["error"] and "\n" not in body["error"] and "Traceback" not in body["error"], body["error"]
        else:
            assert body["output"] and all(decode_data_uri(uri)[1] for uri in body["output"])
        cog_server.wait_for("READY", timeout=30)  # the slot frees a moment after the answer

    one()
    report(request, f"{EXAMPLES} fuzzed requests: {seen}")
    assert cog_server.worker().pid == pid, "the worker died and was restarted"
    after = cog_server.predict(REFERENCE).json()
    assert after["output"] == before["output"], "the fuzzing left state behind: the reference picture changed"
    assert min(seen.values()) >= 3, f"the fuzzer should reach every kind of answer: {seen}"
