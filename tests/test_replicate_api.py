"""Replicate's own client, unmodified (`replicate` from PyPI), against the front's /v1 API over real
HTTP on the tiny weights: code written for Replicate runs against a self-hosted deployment with
only `api_token` and `base_url` changed."""

from __future__ import annotations

import io
import json
import time

import pytest
import requests
from PIL import Image

from tests.cog_server import png_bytes
from tests.front_server import FrontServer
from tests.receivers import Receiver

replicate = pytest.importorskip("replicate")

TOKEN = "replicate-user-" + "r" * 24
MODEL = "jan890/flux_dev_ascii_art"
VERSION = "cfe93c58"
SMALL = {"prompt": "an ascii cat", "num_inference_steps": 2, "aspect_ratio": "custom", "width": 256, "height": 256}
LONG = {**SMALL, "num_inference_steps": 50, "width": 1024, "height": 1024}


@pytest.fixture(scope="module")
def rx():
    with Receiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def front(tiny_weights, rx):
    env = {"API_TOKENS": TOKEN, "ALLOWED_PRIVATE_ORIGINS": rx.url}
    with FrontServer(tiny_weights, env=env) as server:
        server.wait_ready()
        yield server


@pytest.fixture(scope="module")
def client(front):
    client = replicate.Client(api_token=TOKEN, base_url=front.url)
    client.poll_interval = 0.1  # the client's own setting (REPLICATE_POLL_INTERVAL); 0.5 s by default
    return client


def image_at(url: str) -> Image.Image:
    """The bytes behind an output URL (plain http: the client returns URL strings, not FileOutput)."""
    assert isinstance(url, str) and url.startswith(("http://", "https://")), url
    response = requests.get(url, timeout=30)
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content))


def test_run_by_model_name_returns_output_urls(client):
    output = client.run(MODEL, input=SMALL)
    assert len(output) == 1
    picture = image_at(output[0])
    assert picture.format == "WEBP" and picture.size == (256, 256)


def test_run_by_version_and_every_format(client):
    for fmt, expected in (("png", "PNG"), ("jpg", "JPEG")):
        (url,) = client.run(f"{MODEL}:{VERSION}", input={**SMALL, "output_format": fmt})
        assert image_at(url).format == expected


def test_create_wait_reload_and_list(client):
    prediction = client.predictions.create(model=MODEL, input={**SMALL, "seed": 7})
    assert prediction.status in ("starting", "processing") and prediction.urls["get"].endswith(prediction.id)
    prediction.wait()
    assert prediction.status == "succeeded" and prediction.model == MODEL and prediction.version == VERSION
    assert prediction.metrics["predict_time"] > 0 and prediction.completed_at
    prediction.reload()
    assert prediction.status == "succeeded" and image_at(prediction.output[0]).size == (256, 256)
    listed = [p.id for p in client.predictions.list().results]
    assert prediction.id in listed


def test_cancel_of_a_long_prediction(client):
    prediction = client.predictions.create(model=MODEL, input=LONG)
    deadline = time.monotonic() + 30
    while prediction.status != "processing" and time.monotonic() < deadline:
        time.sleep(0.1)
        prediction.reload()
    prediction.cancel()
    started = time.monotonic()
    prediction.wait()
    assert prediction.status == "canceled" and time.monotonic() - started < 20


def test_a_file_input_is_uploaded_and_used(client, tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes((256, 256), color=(30, 160, 60)))
    with open(path, "rb") as photo:
        output = client.run(MODEL, input={**SMALL, "image": photo, "prompt_strength": 0.5, "output_format": "png"})
    assert image_at(output[0]).size == (256, 256)


def test_webhooks_are_signed_as_replicate_signs_them(client, rx):
    prediction = client.predictions.create(
        model=MODEL, input=SMALL, webhook=rx.webhook_url, webhook_events_filter=["completed"]
    )
    final = rx.wait_webhook(prediction.id, timeout=60)
    assert final["status"] == "succeeded" and final["output"][0].startswith("http")
    ((headers, raw),) = [(h, b) for h, b in rx.webhook_requests if json.loads(b)["id"] == prediction.id]
    secret = client.webhooks.default.secret()
    assert secret.key.startswith("whsec_")
    client.webhooks.validate(headers=headers, body=raw.decode(), secret=secret, tolerance=300)  # raises if not
    forged = {**headers, "webhook-signature": "v1," + "A" * 44}
    with pytest.raises(replicate.webhook.InvalidSignatureError):
        client.webhooks.validate(headers=forged, body=raw.decode(), secret=secret)


def test_a_stream_is_read_with_the_clients_streaming_api(client):
    events = list(client.stream(MODEL, input=SMALL))
    kinds = [e.event.value for e in events]
    assert kinds[-1] == "done" and "output" in kinds and "logs" in kinds
    (output,) = [e for e in events if e.event.value == "output"]
    assert image_at(str(output)).format == "WEBP"


def test_a_bad_input_raises_model_error_with_our_line(client, front):
    from tests.cog_server import data_uri

    with pytest.raises(replicate.exceptions.ModelError) as failed:
        client.run(MODEL, input={**SMALL, "mask": data_uri(png_bytes((256, 256)))})
    assert failed.value.prediction.error.startswith("mask was given without image")
    with pytest.raises(replicate.exceptions.ReplicateError) as invalid:
        client.run(MODEL, input={**SMALL, "num_outputs": 9})
    assert invalid.value.status == 422 and "num_outputs" in invalid.value.detail


def test_a_wrong_token_is_refused_as_replicate_refuses_it(front):
    stranger = replicate.Client(api_token="not-a-token-of-this-deployment", base_url=front.url)
    with pytest.raises(replicate.exceptions.ReplicateError) as refused:
        stranger.run(MODEL, input=SMALL)
    assert refused.value.status == 401
    with pytest.raises(replicate.exceptions.ReplicateError):
        stranger.models.get(MODEL)


def test_the_model_and_its_version_carry_the_schema(client):
    model = client.models.get(MODEL)
    assert (model.owner, model.name) == tuple(MODEL.split("/"))
    version = model.versions.get(VERSION)
    assert version.openapi_schema["components"]["schemas"]["Input"]["required"] == ["prompt"]
