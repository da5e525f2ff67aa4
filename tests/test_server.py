"""The real Cog server (coglet) over HTTP on the tiny weights, as users reach the container."""

from __future__ import annotations

import base64
import io

import pytest
import requests
from PIL import Image

from tests import seed_page

SMALL = {"aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 2}


def decode(data_uri: str) -> Image.Image:
    header, _, payload = data_uri.partition(",")
    assert header.startswith("data:image/")
    return Image.open(io.BytesIO(base64.b64decode(payload)))


@pytest.fixture(scope="module")
def schema(cog_server):
    cog_server.wait_for("READY")
    return requests.get(cog_server.url + "/openapi.json", timeout=10).json()["components"]["schemas"]


def test_openapi_matches_the_model_page_field_for_field(schema):
    page = seed_page.fields()
    inputs = schema["Input"]["properties"]
    assert set(inputs) == set(page)
    assert sorted(inputs, key=lambda name: inputs[name]["x-order"]) == list(page)
    assert schema["Input"]["required"] == ["prompt"]
    for name, want in page.items():
        got = inputs[name]
        if want["enum"]:
            enum = schema[got["allOf"][0]["$ref"].rsplit("/", 1)[1]]
            assert (enum["type"], enum["enum"]) == (want["type"], want["enum"]), name
        else:
            assert got["type"] == want["type"], name
        assert got.get("default") == want["default"], name
        assert got["description"] == want["description"], name
        assert got.get("maximum") == want["maximum"], name
        # The page shows no "Min: 0" (guidance_scale, prompt_strength, output_quality): 0 or none.
        assert got.get("minimum") == want["minimum"] or (want["minimum"] is None and got.get("minimum") in (None, 0))
    assert schema["Output"] == seed_page.output_schema()


def test_sync_prediction_returns_image_data_uris(cog_server):
    response = cog_server.predict({"prompt": "an ascii cat", "num_outputs": 2, "seed": 1, **SMALL})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "succeeded", body
    images = [decode(uri) for uri in body["output"]]
    assert [image.size for image in images] == [(256, 256)] * 2
    assert all(image.format == "WEBP" for image in images)
    assert "seeds [1, 2]" in body["logs"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_outputs", 5),
        ("num_inference_steps", 0),
        ("width", 2000),
        ("lora_scale", -1.5),
        ("guidance_scale", 11),
        ("aspect_ratio", "7:3"),
        ("model", "pro"),
        ("output_format", "gif"),
        ("num_outputs", "two"),
        ("disable_safety_checker", "maybe"),
    ],
)
def test_invalid_inputs_are_422_naming_the_field(cog_server, field, value):
    response = cog_server.predict({"prompt": "a cat", field: value})
    assert response.status_code == 422, response.text
    assert field in [location for detail in response.json()["detail"] for location in detail["loc"]]


def test_missing_prompt_is_422(cog_server):
    response = cog_server.predict({"seed": 1})
    assert response.status_code == 422 and "prompt" in response.text


def test_optional_fields_are_omitted_not_null(cog_server):
    """As with every Cog model, an optional field is left out to mean "unset"; null is a 422 naming it."""
    assert cog_server.predict({"prompt": "a cat", **SMALL}).json()["status"] == "succeeded"
    response = cog_server.predict({"prompt": "a cat", "seed": None, **SMALL})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"][-1] == "seed"


def test_failed_prediction_is_one_clear_line_and_the_server_stays_ready(cog_server):
    response = cog_server.predict({"prompt": "a cat", "mask": "data:image/png;base64," + _png_b64()})
    body = response.json()
    assert body["status"] == "failed"
    assert body["error"].endswith("mask was given without image: inpainting needs both, or drop the mask.")
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    after = cog_server.predict({"prompt": "a cat", "seed": 3, **SMALL}).json()
    assert after["status"] == "succeeded"


def test_garbage_image_upload_fails_cleanly(cog_server):
    garbage = "data:image/png;base64," + base64.b64encode(b"not a png").decode()
    body = cog_server.predict({"prompt": "a cat", "image": garbage}).json()
    assert body["status"] == "failed" and "could not be read as an image" in body["error"]
    assert cog_server.predict({"prompt": "a cat", "seed": 3, **SMALL}).json()["status"] == "succeeded"


def test_img2img_over_http_follows_the_image_size(cog_server):
    body = cog_server.predict(
        {
            "prompt": "a cat",
            "image": "data:image/png;base64," + _png_b64((320, 480)),
            "num_inference_steps": 2,
            "output_format": "png",
        }
    ).json()
    assert body["status"] == "succeeded", body
    assert decode(body["output"][0]).size == (320, 480)


def _png_b64(size=(64, 64)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()
