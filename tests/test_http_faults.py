"""Faults over HTTP against the real Cog server: internal errors, cancellation (explicit and by a sync
client hanging up), capacity, and a battery of bad inputs. Each must give a clear answer and leave
no state behind: the next prediction gives the same bytes as before, the worker is the same process,
and the server's temp folder holds what it held before.

The server runs with its own TMPDIR (so its temp files can be counted), a LoRA cache of its own,
and fault injection (FLUX_TEST_FAULTS=1, loaded by tests/offline/sitecustomize.py: `output_quality: 1`
raises inside the worker, standing in for a bug). Its LoRAs come from a local receiver configured as the Replicate
and CivitAI endpoints, the way a deployment trusts its own mirrors: the SSRF guard stays on, so a
URL a user types to that same receiver (loopback) is refused, as a public deployment must.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import time
import zlib
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image

from tests.cog_server import CogServer, data_uri, decode_data_uri, png_bytes, report, scaled_lora
from tests.receivers import Receiver

SMALL = {"aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 1}
REFERENCE = {"prompt": "an ascii art lighthouse", "seed": 42, **SMALL, "num_inference_steps": 2}
# Long enough to cancel mid-way on the tiny weights: ~0.3–1 s per step on 2 CPU cores, 50 steps.
LONG = {"prompt": "a long one", "aspect_ratio": "custom", "width": 1440, "height": 1440, "num_inference_steps": 50}
CANCEL_BOUND_S = 5.0  # cancel → READY; an uncancelled LONG prediction takes far longer (~15–40 s)
LORA_TIMEOUT_S = 3
EXTRA = "someone/extra"  # the extra LoRA, as a Replicate model served by the receiver
HANGING_LORA = "https://civitai.com/api/download/models/1"  # CIVITAI_ENDPOINT is the receiver's /hang


@pytest.fixture(scope="module")
def rx(tiny_weights):
    with Receiver() as receiver:
        receiver.serve(f"{EXTRA}/_weights", scaled_lora(tiny_weights, 4.0))  # as REPLICATE_ENDPOINT serves it
        receiver.lora_url = EXTRA
        for name, data in hostile_loras(tiny_weights).items():
            receiver.serve(f"someone/{name}/_weights", data)
        yield receiver


@pytest.fixture(scope="module")
def server(tiny_weights, rx, tmp_path_factory):
    tmpdir = tmp_path_factory.mktemp("server-tmp")
    cache = tmp_path_factory.mktemp("lora-cache")
    env = {
        "TMPDIR": str(tmpdir),
        "LORA_CACHE_DIR": str(cache),
        "REPLICATE_ENDPOINT": rx.url + "/files",  # owner/model → /files/owner/model/_weights
        "CIVITAI_ENDPOINT": rx.url + "/hang",  # civitai.com/api/download/models/<v> → a server that hangs
        "LORA_DOWNLOAD_TIMEOUT": str(LORA_TIMEOUT_S),
        "FLUX_TEST_FAULTS": "1",
    }
    with CogServer(tiny_weights, env=env) as cog:
        cog.wait_for("READY")
        cog.tmpdir, cog.lora_cache = tmpdir, cache
        cog.worker_pid = cog.worker().pid
        yield cog


def outputs(body: dict) -> list[bytes]:
    assert body["status"] == "succeeded", body
    return [decode_data_uri(uri)[1] for uri in body["output"]]


@pytest.fixture(scope="module")
def baseline(server, rx):
    """The reference pictures, without and with the extra LoRA, before any fault."""
    plain = outputs(server.predict(REFERENCE).json())
    lora = outputs(server.predict({**REFERENCE, "extra_lora": rx.lora_url, "extra_lora_scale": 0.8}).json())
    assert plain != lora, "the extra LoRA must change the picture, or the LoRA checks below prove nothing"
    return {"plain": plain, "lora": lora, "temp": temp_files(server)}


def temp_files(server) -> set[str]:
    """Everything in the server's TMPDIR except the one output folder it reuses, and the LoRA cache's tmp."""
    found = set()
    for root, dirs, files in os.walk(server.tmpdir):
        rel = Path(root).relative_to(server.tmpdir)
        if rel.parts and rel.parts[0].startswith("flux-out-"):
            continue
        found |= {str(rel / name) for name in files}
        found |= {str(rel / name) + "/" for name in dirs if not name.startswith("flux-out-")}
    outs = [d for d in os.listdir(server.tmpdir) if d.startswith("flux-out-")]
    assert len(outs) <= 1, f"output folders pile up: {outs}"
    leftovers = list((server.lora_cache / ".tmp").glob("*")) if (server.lora_cache / ".tmp").exists() else []
    assert not leftovers, f"partial LoRA downloads left behind: {leftovers}"
    return found


def assert_unharmed(server, baseline, rx=None):
    """Same worker, READY, no new temp files, and the reference pictures are still the same bytes."""
    server.wait_for("READY", timeout=30)
    assert server.worker().pid == server.worker_pid, "the worker was restarted"
    assert outputs(server.predict(REFERENCE).json()) == baseline["plain"]
    if rx is not None:
        again = server.predict({**REFERENCE, "extra_lora": rx.lora_url, "extra_lora_scale": 0.8}).json()
        assert outputs(again) == baseline["lora"]
    assert temp_files(server) == baseline["temp"]


def worker_cpu_seconds(server) -> float:
    times = server.worker().cpu_times()
    return times.user + times.system


def wait_for_log(server, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.logs():
        assert time.monotonic() < deadline, f"never logged {text!r}"
        time.sleep(0.05)


# ---------------------------------------------------------------- failures


def test_internal_error_is_one_line_and_its_traceback_goes_to_the_logs(server, baseline):
    body = server.predict({**REFERENCE, "output_quality": 1}).json()
    assert body["status"] == "failed"
    error = body["error"]
    assert "internal error (RuntimeError: injected fault: the encoder blew up)" in error
    assert error.endswith("the traceback is in the logs.") and "\n" not in error and "Traceback" not in error
    logs = server.logs()
    assert "Traceback (most recent call last)" in logs and "injected fault" in logs
    assert_unharmed(server, baseline)


# ---------------------------------------------------------------- cancellation


def test_cancel_stops_a_running_prediction_within_a_step_and_leaves_no_state(server, rx, baseline, request):
    rx.clear()
    inputs = {**LONG, "seed": 3, "extra_lora": rx.lora_url, "extra_lora_scale": -0.6}
    assert server.predict_async("to-cancel", inputs, webhook=rx.webhook_url).status_code == 202
    wait_for_log(server, "1440×1440, 50 steps")  # the LoRA is applied and denoising has begun
    time.sleep(1.5)
    assert server.health()["status"] == "BUSY"
    busy_cpu = worker_cpu_seconds(server)
    time.sleep(0.5)
    assert worker_cpu_seconds(server) - busy_cpu > 0.1, "the worker should be computing"

    started = time.monotonic()
    assert server.cancel("to-cancel").status_code == 200
    server.wait_for("READY", timeout=60)
    ready_after = time.monotonic() - started
    final = rx.wait_webhook("to-cancel", timeout=30)
    canceled_after = time.monotonic() - started
    idle_cpu = worker_cpu_seconds(server)
    time.sleep(1.0)
    idle = worker_cpu_seconds(server) - idle_cpu
    report(
        request,
        f"cancel → READY {ready_after:.2f} s, → webhook {canceled_after:.2f} s; worker CPU after {idle:.2f} s/s",
    )

    assert final["status"] == "canceled", final
    assert "processing" in [e["status"] for e in rx.webhooks_for("to-cancel")]  # arrival order is not kept
    assert ready_after < CANCEL_BOUND_S and canceled_after < CANCEL_BOUND_S
    assert idle < 0.2, "the cancelled prediction is still computing in the worker"
    assert_unharmed(server, baseline, rx)  # no half-applied LoRA: both reference pictures are unchanged


def test_a_sync_client_hanging_up_cancels_its_prediction(server, baseline, request):
    cancelled_before = server.logs().count("Prediction cancelled")
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        server.predict({**LONG, "seed": 4}, timeout=3)
    server.wait_for("READY", timeout=60)
    ready_after = time.monotonic() - started - 3
    idle_cpu = worker_cpu_seconds(server)
    time.sleep(1.0)
    idle = worker_cpu_seconds(server) - idle_cpu
    report(request, f"sync hang-up → READY {ready_after:.2f} s; worker CPU after {idle:.2f} s/s")
    assert ready_after < CANCEL_BOUND_S and idle < 0.2
    assert server.logs().count("Prediction cancelled") == cancelled_before + 1
    assert_unharmed(server, baseline)


def test_cancel_during_a_lora_download_leaves_no_partial_file(server, rx, baseline):
    rx.clear()
    inputs = {**REFERENCE, "extra_lora": HANGING_LORA}
    assert server.predict_async("cancel-download", inputs, webhook=rx.webhook_url).status_code == 202
    deadline = time.monotonic() + 30
    while ("GET", "/hang/api/download/models/1") not in rx.requests:
        assert time.monotonic() < deadline, rx.requests
        time.sleep(0.05)
    started = time.monotonic()
    server.cancel("cancel-download")
    assert rx.wait_webhook("cancel-download", timeout=30)["status"] == "canceled"
    server.wait_for("READY", timeout=30)
    assert time.monotonic() - started < CANCEL_BOUND_S
    assert_unharmed(server, baseline, rx)  # temp_files() checks the LoRA cache's .tmp is empty


def test_a_request_while_busy_gets_409_and_changes_nothing(server, rx, baseline):
    rx.clear()
    assert server.predict_async("busy-1", {**LONG, "seed": 5}, webhook=rx.webhook_url).status_code == 202
    server.wait_for("BUSY", timeout=30)
    other = {"prompt": "a cat", **SMALL, "extra_lora": rx.lora_url, "extra_lora_scale": 2}
    sync = requests.post(server.url + "/predictions", json={"input": other}, timeout=30)
    assert sync.status_code == 409 and "At capacity" in sync.json()["error"], sync.text
    queued = server.predict_async("busy-2", other, webhook=rx.webhook_url)
    assert queued.status_code == 409, queued.text
    assert server.health()["status"] == "BUSY"
    server.cancel("busy-1")
    assert rx.wait_webhook("busy-1", timeout=30)["status"] == "canceled"
    server.wait_for("READY", timeout=30)
    time.sleep(0.5)
    assert not rx.webhooks_for("busy-2") and "busy-2" not in server.started_predictions()
    assert_unharmed(server, baseline, rx)


# ---------------------------------------------------------------- the bad-input battery


def png_with_header(width: int, height: int) -> bytes:
    """A small, valid-looking PNG that claims width×height (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def jpeg_bytes(size=(320, 240)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (20, 120, 200)).save(buffer, "JPEG")
    return buffer.getvalue()


NOISE = random.Random(0).randbytes(4096)
VALID = png_bytes((320, 320))
IMAGE = data_uri(VALID)
ERR_UNREADABLE = "image could not be read as an image"
ERR_BIG = "megapixels accepted"
LOCAL_REFUSED = "local paths are not accepted"
SSRF = "Refusing to fetch"

# name → (inputs, expectation): ("error", text in the one-line error) or ("image", (w, h))
BATTERY = {
    "zero-byte image": ({"image": "data:image/png;base64,"}, ("error", ERR_UNREADABLE)),
    "truncated png": ({"image": data_uri(VALID[: len(VALID) // 2])}, ("error", ERR_UNREADABLE)),
    "corrupt jpeg": (
        {"image": data_uri(jpeg_bytes()[:200] + NOISE[:2000], "image/jpeg")},
        ("error", ERR_UNREADABLE),
    ),
    "text file": ({"image": data_uri(b"hello, I am not an image\n" * 50, "text/plain")}, ("error", ERR_UNREADABLE)),
    "pdf file": (
        {"image": data_uri(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "application/pdf")},
        ("error", ERR_UNREADABLE),
    ),
    "random bytes": ({"image": data_uri(NOISE)}, ("error", ERR_UNREADABLE)),
    "decompression bomb 30000²": ({"image": data_uri(png_with_header(30000, 30000))}, ("error", ERR_BIG)),
    "72 MP header": ({"image": data_uri(png_with_header(9000, 8000))}, ("error", ERR_BIG)),
    "too thin 40×2000": ({"image": data_uri(png_bytes((40, 2000)))}, ("error", "too narrow for FLUX")),
    "tiny 16×16 is scaled up": ({"image": data_uri(png_bytes((16, 16)))}, ("image", (256, 256))),
    "large 3000×2000 is scaled down": (
        {"image": data_uri(jpeg_bytes((3000, 2000)), "image/jpeg")},
        ("image", (1440, 960)),
    ),
    "rgba webp image": (
        {"image": data_uri(png_bytes((320, 320), "RGBA", (1, 2, 3, 0), "WEBP"), "image/webp")},
        ("image", (320, 320)),
    ),
    "mask of another size": ({"image": IMAGE, "mask": data_uri(png_bytes((100, 60), "L"))}, ("image", (320, 320))),
    "mask in RGBA": (
        {"image": IMAGE, "mask": data_uri(png_bytes((320, 320), "RGBA", (255, 255, 255, 0)))},
        ("image", (320, 320)),
    ),
    "mask in 1-bit": ({"image": IMAGE, "mask": data_uri(png_bytes((320, 320), "1"))}, ("image", (320, 320))),
    "mask in 16-bit": ({"image": IMAGE, "mask": data_uri(png_bytes((320, 320), "I;16"))}, ("image", (320, 320))),
    "garbage mask": ({"image": IMAGE, "mask": data_uri(b"\x89PNG garbage")}, ("error", "mask could not be read")),
    "data uri, bad base64": ({"image": "data:image/png;base64,!!!not-base64"}, ("error", "Input validation error")),
    "data uri, no comma": ({"image": "data:image/png;base64"}, ("error", "Input validation error")),
    "data uri, unknown encoding": ({"image": "data:image/png;utf-7,abc"}, ("any", None)),
    "unicode prompt": ({"prompt": "🦊 ascii キツネ — ثعلب \u200d\u0301 Ω≈ç√ \U0001f600" * 3}, ("image", (256, 256))),
    "nul and control characters": ({"prompt": "a\u0000cat\u0007\u001b[31m\r\n"}, ("image", (256, 256))),
    "10,000-character prompt": ({"prompt": ("ascii art cat, " * 667)[:10_000]}, ("image", (256, 256))),
    "10,001-character prompt": ({"prompt": "x" * 10_001}, ("error", "over the 10,000 accepted")),
    "2 MB prompt": ({"prompt": "ascii art cat, " * 140_000}, ("error", "over the 10,000 accepted")),
    "whitespace prompt": ({"prompt": " \t\n\u3000"}, ("error", "prompt is empty")),
    "steps at 1": ({"num_inference_steps": 1}, ("image", (256, 256))),
    "steps at 50": ({"num_inference_steps": 50}, ("image", (256, 256))),
    "schnell asked for 50 steps": ({"num_inference_steps": 50, "model": "schnell"}, ("image", (256, 256))),
    "size 256×1440": ({"width": 256, "height": 1440}, ("image", (256, 1440))),
    "size 1440×256": ({"width": 1440, "height": 256}, ("image", (1440, 256))),
    "size 1440×1440": ({"width": 1440, "height": 1440}, ("image", (1440, 1440))),
    "size 257×1439 rounds to 16s": ({"width": 257, "height": 1439}, ("image", (256, 1440))),
    "custom without width": ({"aspect_ratio": "custom", "width": None}, ("error", "needs both width and height")),
    "seed 0": ({"seed": 0}, ("image", (256, 256))),
    "seed at the top": ({"seed": 2**63 - 4, "num_outputs": 2}, ("image", (256, 256))),
    "seed past the top": ({"seed": 2**63}, ("error", "is out of range")),
    "seed past the top for 4 outputs": (
        {"seed": 2**63 - 3, "num_outputs": 4},
        ("error", f"with num_outputs=4 (seeds seed … seed+3), use an integer from 0 to {2**63 - 4}."),
    ),
    "negative seed": ({"seed": -1}, ("error", "is out of range")),
    "jpg quality 0": ({"output_quality": 0, "output_format": "jpg"}, ("image", (256, 256))),
    "webp quality 100": ({"output_quality": 100, "output_format": "webp"}, ("image", (256, 256))),
    "lora scales at both bounds": (
        {"lora_scale": -1, "extra_lora": EXTRA, "extra_lora_scale": 2},
        ("image", (256, 256)),
    ),
    "guidance and strength at 0": ({"guidance_scale": 0, "prompt_strength": 0, "image": IMAGE}, ("image", (320, 320))),
    "strength 1 guidance 10": ({"guidance_scale": 10, "prompt_strength": 1, "image": IMAGE}, ("image", (320, 320))),
    "inpaint from image and mask URLs": (
        {"image": "{rx}/files/in.png", "mask": "{rx}/files/mask.png"},
        ("image", (320, 320)),
    ),
    "image url 404": ({"image": "{rx}/missing.png"}, ("error", "404")),
    "image url hangs": ({"image": "{rx}/hang/image.png?s=30"}, ("error", "Input validation error")),
    "extra_lora 404": ({"extra_lora": "someone/nope"}, ("error", "404")),
    "extra_lora not a LoRA": ({"extra_lora": "someone/text"}, ("error", "LoRA")),
    "extra_lora not a URL": ({"extra_lora": "not a lora at all"}, ("error", "LoRA")),
    "extra_lora hangs": ({"extra_lora": HANGING_LORA}, ("error", "LoRA")),
    "extra_lora 64 KB string": ({"extra_lora": "a/" + "b" * 65_536}, ("error", "extra_lora is 65,538 characters")),
    "extra_lora list with a scale out of range": ({"extra_lora": f"{EXTRA}:0.5, {EXTRA}:3"}, ("error", ":3")),
    # The server's own files: refused with one message, whether the path exists or not.
    **{
        f"extra_lora local {path}": ({"extra_lora": path}, ("error", LOCAL_REFUSED))
        for path in (
            "/etc/passwd",
            "/nonexistent/x.safetensors",
            "~/.ssh/id_rsa",
            "../../etc/hosts",
            "file:///etc/passwd",
        )
    },
    # Server-side request forgery: the receiver is trusted as an endpoint, never as a user's URL.
    "extra_lora to loopback": ({"extra_lora": "{rx}/files/someone/extra/_weights.safetensors"}, ("error", SSRF)),
    "extra_lora to localhost": ({"extra_lora": "http://localhost:9/x.safetensors"}, ("error", SSRF)),
    "extra_lora to cloud metadata": ({"extra_lora": "http://169.254.169.254/latest/x.safetensors"}, ("error", SSRF)),
    "extra_lora to IPv4-mapped loopback": (
        {"extra_lora": "http://[::ffff:127.0.0.1]:9/x.safetensors"},
        ("error", SSRF),
    ),
    "extra_lora to NAT64 loopback": ({"extra_lora": "http://[64:ff9b::7f00:1]:9/x.safetensors"}, ("error", SSRF)),
    "extra_lora to 6to4 private": ({"extra_lora": "http://[2002:c0a8:101::1]:9/x.safetensors"}, ("error", SSRF)),
    # LoRA files that are not fully understood are refused, not applied in part.
    "extra_lora with a DoRA magnitude that fits no layer": ({"extra_lora": "someone/dora"}, ("error", "DoRA")),
    "extra_lora with NaN": ({"extra_lora": "someone/nan"}, ("error", "NaN")),
    "extra_lora with a bad header": ({"extra_lora": "someone/overlap"}, ("error", "LoRA")),
    "extra_lora with integer tensors": ({"extra_lora": "someone/int"}, ("error", "LoRA")),
    # A user's token is never echoed, in the error or the logs.
    "hf_api_token not echoed": (
        {"extra_lora": "not a lora at all", "hf_api_token": "hf_SECRETSECRET"},
        ("error", "LoRA"),
    ),
}
# Hanging servers must fail in bounded time: coglet's own 10 s for inputs, LORA_DOWNLOAD_TIMEOUT for LoRAs.
SLOW_BOUND_S = {"image url hangs": 20, "extra_lora hangs": LORA_TIMEOUT_S * 3 + 5, "2 MB prompt": 5}


def hostile_loras(tree: Path) -> dict[str, bytes]:
    """LoRA files a parser must refuse whole: a DoRA magnitude of the wrong length beside the pairs (DoRA
    itself is applied: tests/test_lora_oracle.py), NaN values, a header whose offsets overlap, integer tensors."""
    from safetensors.torch import load, save

    good = load(scaled_lora(tree, 1.0))
    name = next(k for k in good if k.endswith("lora_A.weight"))
    dora = {**good, name.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(good[name].shape[1] + 1)}
    nan = {**good, name: torch.full_like(good[name], float("nan"))}
    ints = {k: v.to(torch.int32) for k, v in good.items()}
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}).encode()  # fmt: skip
    overlap = struct.pack("<Q", len(header)) + header + bytes(24)
    return {"dora": save(dora), "nan": save(nan), "int": save(ints), "overlap": overlap}


# cog 0.23.1 (cog/types.py, URLPath.convert) creates the input's temp file, then downloads into it;
# when the download fails (404, timeout) the file stays. The predictor's InputDownloads sweeps it
# when the next prediction starts, so those cases check for leftovers after one more prediction.
@pytest.mark.parametrize("case", list(BATTERY))
def test_bad_input_battery(server, rx, baseline, case):
    inputs, (kind, want) = BATTERY[case]
    rx.serve("someone/text/_weights", b"this is not a safetensors file at all" * 10)
    rx.serve("in.png", png_bytes((320, 320), color=(200, 40, 40)), "image/png")
    rx.serve("mask.png", png_bytes((320, 320), mode="L"), "image/png")  # grey: inpaint everything, softly
    inputs = {k: v.replace("{rx}", rx.url) if isinstance(v, str) else v for k, v in inputs.items()}
    inputs = {k: v for k, v in {"prompt": "a cat", "seed": 9, **SMALL, **inputs}.items() if v is not None}
    before = temp_files(server)
    started = time.monotonic()
    response = server.predict(inputs, timeout=120)
    took = time.monotonic() - started
    assert response.status_code == 200, response.text  # a clear answer, never a 5xx
    body = response.json()
    if kind == "error":
        assert body["status"] == "failed", body
        assert want in body["error"] and "\n" not in body["error"] and "Traceback" not in body["error"], body["error"]
    elif kind == "image":
        for data in outputs(body):
            assert Image.open(io.BytesIO(data)).size == want
    else:
        assert body["status"] in ("succeeded", "failed"), body
    assert took < SLOW_BOUND_S.get(case, 60), f"{case} took {took:.1f} s"
    assert "SECRETSECRET" not in response.text and "SECRETSECRET" not in server.logs()
    server.wait_for("READY", timeout=30)
    assert server.worker().pid == server.worker_pid, "the worker died"
    if case.startswith("image url"):
        # Cog (0.23.1) leaves a failed download's temp file; the next prediction must sweep it.
        assert server.predict({"prompt": "a cat", "seed": 9, **SMALL}).json()["status"] == "succeeded"
    leaked = temp_files(server) - before
    for name in leaked:  # so that one case's leak does not fail the next ones
        (server.tmpdir / name).unlink(missing_ok=True)
    assert not leaked, f"left in TMPDIR: {sorted(leaked)}"


def test_after_the_battery_nothing_has_changed(server, rx, baseline):
    assert_unharmed(server, baseline, rx)
