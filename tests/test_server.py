"""The real Cog server (coglet) over HTTP on the tiny weights, as users reach the container."""

from __future__ import annotations

import base64
import getpass
import io
import os
import socket
import subprocess
import sys
import time

import pytest
import requests
from PIL import Image

from tests import seed_page
from tests.cog_server import CogServer
from tests.receivers import Receiver

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
    ordered = sorted(inputs, key=lambda name: inputs[name]["x-order"])
    assert ordered[: len(page)] == list(page)  # the page's 18 first, in its order; fields of ours after
    assert ordered[len(page) :] == ["replicate_weights", "hf_api_token", "civitai_api_token"]
    for name in ("hf_api_token", "civitai_api_token"):
        assert inputs[name]["x-cog-secret"] and inputs[name]["format"] == "password"  # Cog redacts them
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


# ---------------------------------------------------------------- one server's life: logs, temp files, network

# Lines that are not ours: transformers' "requires torchvision … falling back" scan and "[transformers]"
# lines, diffusers' "[diffusers]" lines and its empty "kept in float32: []" warning, config dumps as JSON.
NOT_OURS = ("torchvision", "[transformers]", "[diffusers]", "Model config", "kept in float32", '"architectures"')


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_served_worker_logs_only_our_lines_and_leaves_nothing_in_tmpdir(tiny_weights, tmp_path):
    """Its setup.logs hold coglet's lines and our few (no library warnings, no config dumps); a name
    outside loopback fails at once (tests are offline); and once the server has stopped (SIGTERM to the
    server, as `docker stop` does) nothing of ours is left in its TMPDIR: not the last prediction's
    outputs, not a failed download's file, not the folders a killed worker had left before it started."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    killed = dead_pid()
    for name in (f"flux-inputs-{killed}", f"flux-out-{killed}-abcd1234"):
        (tmpdir / name).mkdir()
        (tmpdir / name / "tmpabcdefgh.png").write_bytes(b"x")
    small = {"aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 1}
    with Receiver() as rx, CogServer(tiny_weights, env={"TMPDIR": str(tmpdir)}) as server:
        server.wait_for("READY")
        deadline = time.monotonic() + 10  # coglet may report READY a moment before the last setup line
        while "setup done in" not in server.health()["setup"]["logs"] and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = server.health()["setup"]["logs"].splitlines()
        ours = [line.removeprefix("[coglet::setup] ") for line in lines if line.startswith("[coglet::setup] ")]
        others = [line for line in lines if not line.startswith("[coglet")]
        assert not others and not [line for line in lines if any(text in line for text in NOT_OURS)], lines
        assert len(ours) <= 8 and any(line.startswith("setup done in") for line in ours), ours

        started = time.monotonic()
        offline = server.predict({"prompt": "a cat", "extra_lora": "fofr/flux-pixar-cars", **small}).json()
        # offline, replicate.com does not resolve: refused with the guard's one line (the same as for a
        # private address, so that answers do not map names)
        assert offline["status"] == "failed" and "Refusing to fetch 'https://replicate.com/" in offline["error"]
        assert time.monotonic() - started < 10
        assert server.predict({"prompt": "a cat", "seed": 1, **small}).json()["status"] == "succeeded"
        missing = server.predict({"prompt": "a cat", "image": rx.url + "/missing.png", **small}).json()
        assert missing["status"] == "failed" and "404" in missing["error"]
        pid = server.worker().pid
        inputs, outputs = sorted(p.name for p in tmpdir.iterdir() if p.name.startswith("flux-"))
        assert inputs == f"flux-inputs-{pid}" and outputs.startswith(f"flux-out-{pid}-")
        assert any((tmpdir / inputs).iterdir())  # the failed download's file, which Cog leaves
        server.stop()
        assert server.process.returncode is not None
    left = sorted(p.name for p in tmpdir.iterdir())
    assert left in ([], [f"torchinductor_{getpass.getuser()}"]), left  # torch's compile cache is torch's


def test_processes_started_by_tests_are_offline():
    """Not only this process: every Python process a test starts (tests/offline/sitecustomize.py)."""
    with pytest.raises(socket.gaierror, match="tests are offline"):
        socket.getaddrinfo("replicate.com", 443)
    with pytest.raises(ConnectionRefusedError, match="tests are offline"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)
    code = (
        "import socket\n"
        "for call in (lambda: socket.getaddrinfo('huggingface.co', 443),\n"
        "             lambda: socket.create_connection(('192.0.2.1', 80), timeout=1)):\n"
        "    try:\n"
        "        call()\n"
        "    except OSError as error:\n"
        "        assert 'tests are offline' in str(error), error\n"
        "    else:\n"
        "        raise AssertionError('reached the network')\n"
        "socket.getaddrinfo('localhost', 80)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
