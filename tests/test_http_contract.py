"""The HTTP contract of the real Cog server (coglet), driven from this process over 127.0.0.1 only:
health states, schema validation for every field, sync/uploaded/async outputs, webhooks and their filter.

tests/test_server.py covers the schema against the model page, a sync data-URI prediction and a few
422s; this file covers the rest of the contract. Faults, cancellation and capacity are in
test_http_faults.py, the soak in test_soak.py, the fuzzer in test_fuzz.py.
"""

from __future__ import annotations

import io
import re
import shutil
import time

import pytest
import requests
from PIL import Image

from tests.cog_server import CogServer, decode_data_uri
from tests.receivers import Receiver

SMALL = {"aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 1}


def watch_startup(server: CogServer, timeout: float = 120) -> list[str]:
    """Every distinct /health-check status from the first answer until READY (or a final state)."""
    statuses: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"cog server exited:\n{server.logs()[-3000:]}")
        try:
            status = server.health()["status"]
        except requests.ConnectionError:
            time.sleep(0.02)
            continue
        if not statuses or statuses[-1] != status:
            statuses.append(status)
        if status in ("READY", "SETUP_FAILED", "DEFUNCT"):
            return statuses
        time.sleep(0.02)
    raise TimeoutError(f"health never settled: {statuses}")


@pytest.fixture(scope="module")
def receiver():
    with Receiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def upload_server(tiny_weights, receiver):
    """A server of its own with `--upload-url` pointed at the local receiver; its startup is recorded."""
    with CogServer(tiny_weights, extra_args=["--upload-url", receiver.upload_url]) as server:
        server.startup = watch_startup(server)
        yield server


# ---------------------------------------------------------------- health


def test_health_goes_starting_then_ready(upload_server):
    assert upload_server.startup == ["STARTING", "READY"], upload_server.startup
    health = upload_server.health()
    assert health["setup"]["status"] == "succeeded"


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        ("safety-checker", "safety-checker"),  # a whole part
        ("FLUX.1-dev/transformer/config.json", "FLUX.1-dev"),  # a file that makes a part whole
    ],
)
def test_setup_failure_is_setup_failed_naming_the_missing_part(tiny_weights, tmp_path, remove, named):
    broken = tmp_path / "weights"
    shutil.copytree(tiny_weights, broken)
    target = broken / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with CogServer(broken) as server:
        statuses = watch_startup(server)
        assert statuses[-1] == "SETUP_FAILED", statuses
        setup = server.health()["setup"]
        assert setup["status"] == "failed"
        assert f"weights part {named} is missing" in setup["logs"], setup["logs"]
        assert "HF_HUB_OFFLINE" in setup["logs"]  # and says why it was not downloaded
        # Predictions are refused with a clear message, not a 500, and the server stays up.
        response = requests.post(server.url + "/predictions", json={"input": {"prompt": "a cat"}}, timeout=10)
        assert response.status_code == 503 and "Setup" in response.json()["error"], response.text
        assert server.health()["status"] == "SETUP_FAILED"


# ---------------------------------------------------------------- validation


def invalid_values(prop: dict, enums: dict) -> list:
    """Values that the schema of one input rejects: out of range, wrong type, not in the enum."""
    if "allOf" in prop:  # an enum field
        enum = enums[prop["allOf"][0]["$ref"].rsplit("/", 1)[1]]["enum"]
        return ["definitely-not-a-choice", enum[0].upper() + "x", 3, None, enum[:1]]
    kind = prop["type"]
    values = []
    if kind == "integer":
        values += [1.5, "1", True, None]
    elif kind == "number":
        values += ["1", None, [1]]
    elif kind == "boolean":
        values += ["maybe", "true", 1, None]
    elif kind == "string":
        values += [5, ["a"], {"a": 1}, None]
    if "minimum" in prop:
        values.append(prop["minimum"] - (1 if kind == "integer" else 0.01))
    if "maximum" in prop:
        values.append(prop["maximum"] + (1 if kind == "integer" else 0.01))
    return values


def test_every_invalid_value_of_every_field_is_a_422_naming_it_before_any_model_work(cog_server):
    """Built from /openapi.json: each field's out-of-range, wrong-type, non-enum and null values."""
    cog_server.wait_for("READY")
    schemas = requests.get(cog_server.url + "/openapi.json", timeout=10).json()["components"]["schemas"]
    started_before = len(cog_server.started_predictions())
    problems, cases = [], 0
    for field, prop in schemas["Input"]["properties"].items():
        for value in invalid_values(prop, schemas):
            cases += 1
            inputs = {"prompt": "a cat", **SMALL, field: value}
            response = cog_server.predict(inputs, timeout=30)
            if response.status_code != 422:
                problems.append(f"{field}={value!r}: {response.status_code} {response.text[:200]}")
                continue
            locations = [detail["loc"] for detail in response.json()["detail"]]
            if ["body", "input", field] not in locations:
                problems.append(f"{field}={value!r}: 422 names {locations}")
    assert not problems, "\n".join(problems)
    assert cases >= 60
    # Rejected by coglet itself: not one of them reached the worker.
    assert len(cog_server.started_predictions()) == started_before
    assert cog_server.health()["status"] == "READY"


def test_unknown_fields_are_ignored_as_cog_does(cog_server):
    inputs = {"prompt": "a cat", "seed": 11, **SMALL}
    plain = cog_server.predict(inputs).json()
    extra = cog_server.predict({**inputs, "negative_prompt": "dogs", "not_a_field": [1, 2], "Seed": 5}).json()
    assert plain["status"] == extra["status"] == "succeeded", extra
    assert decode_data_uri(extra["output"][0]) == decode_data_uri(plain["output"][0])  # the same picture
    assert "Stripped unknown input fields" in cog_server.logs()


# ---------------------------------------------------------------- outputs: data URIs and uploads


def test_sync_outputs_are_data_uris_in_the_requested_format(cog_server):
    for fmt, mime, pil in (("png", "image/png", "PNG"), ("jpg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")):
        body = cog_server.predict({"prompt": "a cat", "seed": 2, "output_format": fmt, **SMALL}).json()
        assert body["status"] == "succeeded", body
        got_mime, data = decode_data_uri(body["output"][0])
        image = Image.open(io.BytesIO(data))
        assert (got_mime, image.format, image.size) == (mime, pil, (256, 256))


def test_upload_url_puts_each_output_under_a_unique_name(upload_server, receiver):
    receiver.clear()
    first = upload_server.predict({"prompt": "a cat", "num_outputs": 2, "seed": 4, **SMALL}).json()
    second = upload_server.predict({"prompt": "a cat", "num_outputs": 1, "seed": 4, "output_format": "png", **SMALL})
    second = second.json()
    assert first["status"] == second["status"] == "succeeded", (first, second)
    urls = first["output"] + second["output"]
    names = [url.rsplit("/", 1)[1] for url in urls]
    # Every output went to the receiver, once, under a name no other output used.
    assert all(url.startswith(receiver.url + "/files/") for url in urls), urls
    assert len(set(names)) == 3 and sorted(receiver.upload_log) == sorted(names)
    for url, fmt in zip(urls, ["WEBP", "WEBP", "PNG"], strict=True):
        image = Image.open(io.BytesIO(requests.get(url, timeout=10).content))
        assert (image.format, image.size) == (fmt, (256, 256))
    # Same seed, same picture, different names: seed 4's first output is the second request's output.
    assert receiver.uploads[names[0]] != receiver.uploads[names[1]]


# ---------------------------------------------------------------- async and webhooks


def test_async_prediction_delivers_processing_then_succeeded_to_the_webhook(upload_server, receiver):
    receiver.clear()
    response = upload_server.predict_async(
        "async-all", {"prompt": "a cat", "seed": 5, **SMALL}, webhook=receiver.webhook_url
    )
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "starting"
    final = receiver.wait_webhook("async-all", timeout=60)
    assert final["status"] == "succeeded", final
    events = receiver.webhooks_for("async-all")
    statuses = [event["status"] for event in events]
    # coglet sends webhooks concurrently: a throttled log update ("processing") can arrive after the
    # final event, so the order in which they arrive is not asserted.
    assert "processing" in statuses and statuses.count("succeeded") == 1
    assert set(statuses) <= {"starting", "processing", "succeeded"}, statuses
    assert final["output"][0].startswith(receiver.url + "/files/")  # uploaded, not inlined
    assert final["output"][0].rsplit("/", 1)[1] in receiver.uploads
    assert "seeds [5]" in final["logs"]
    upload_server.wait_for("READY")


def test_webhook_events_filter_completed_sends_only_the_final_event(upload_server, receiver):
    receiver.clear()
    response = upload_server.predict_async(
        "async-completed",
        {"prompt": "a cat", "seed": 6, **SMALL},
        webhook=receiver.webhook_url,
        webhook_events_filter=["completed"],
    )
    assert response.status_code == 202, response.text
    final = receiver.wait_webhook("async-completed", timeout=60)
    upload_server.wait_for("READY")
    time.sleep(1.0)  # anything else would have been sent by now
    events = receiver.webhooks_for("async-completed")
    assert [event["status"] for event in events] == ["succeeded"], events
    assert final["output"]


def test_failed_async_prediction_sends_failed_with_the_one_line_error(upload_server, receiver):
    receiver.clear()
    inputs = {"prompt": "   ", **SMALL}
    assert upload_server.predict_async("async-failed", inputs, webhook=receiver.webhook_url).status_code == 202
    final = receiver.wait_webhook("async-failed", timeout=60)
    assert final["status"] == "failed"
    assert final["error"].endswith("prompt is empty: describe the image you want.") and "\n" not in final["error"]
    assert not receiver.uploads


# ---------------------------------------------------------------- progress and stage metrics

STAGES = ("lora_fetch_time", "lora_apply_time", "generate_time", "safety_time", "encode_time")
DOWNLOAD_LINE = re.compile(r"^LoRA someone/slow: ([\d,]+) of ([\d,]+) bytes$", re.M)
STEP_LINE = re.compile(r"^step (\d+)/(\d+)$", re.M)


@pytest.fixture(scope="module")
def progress_server(tiny_weights, receiver, tmp_path_factory):
    """A server whose Replicate endpoint is the receiver: LoRAs come from it, as slowly as it sends them."""
    env = {"REPLICATE_ENDPOINT": receiver.url + "/files", "LORA_CACHE_DIR": str(tmp_path_factory.mktemp("lora"))}
    with CogServer(tiny_weights, env=env) as server:
        server.wait_for("READY")
        yield server


def test_steps_downloads_and_stage_metrics_reach_the_webhook_while_it_runs(progress_server, receiver, tiny_weights):
    """What coglet 0.23.1 delivers for a sync run() (README, "Progress"): each webhook carries all the logs and
    metrics so far, about every 0.5 s; our lines are one per step and at most two a second per download."""
    import lora_fixtures as fx

    from tests.cog_server import scaled_lora

    archive = fx.tar_bytes({"lora.safetensors": scaled_lora(tiny_weights, 2.0), "README.md": b"x" * (6 << 20)})
    receiver.serve("someone/slow/_weights", archive, spread_s=2.5)  # a 6 MB download over 2.5 s
    receiver.clear()
    inputs = {"prompt": "a cat", "seed": 3, "aspect_ratio": "custom", "width": 512, "height": 512}
    inputs |= {"num_inference_steps": 40, "extra_lora": "someone/slow", "output_format": "png"}
    assert progress_server.predict_async("progress", inputs, webhook=receiver.webhook_url).status_code == 202
    final = receiver.wait_webhook("progress", timeout=120)
    assert final["status"] == "succeeded", final
    events = sorted(receiver.webhooks_for("progress"), key=lambda event: event["_at"])
    running = [event for event in events if event["status"] == "processing"]

    logs = final["logs"]
    assert "\r" not in logs  # no progress bar's carriage returns
    assert [int(step) for step, _ in STEP_LINE.findall(logs)] == list(range(1, 41))
    assert {total for _, total in STEP_LINE.findall(logs)} == {"40"}
    downloads = [tuple(int(n.replace(",", "")) for n in line) for line in DOWNLOAD_LINE.findall(logs)]
    assert downloads and all(total == len(archive) and 0 < done <= total for done, total in downloads)
    assert len(downloads) <= 2.5 / 0.5 + 1  # throttled: at most two lines a second
    # While it runs: a download line before the download ends, a step line before the last step.
    assert any(DOWNLOAD_LINE.search(e["logs"] or "") and "downloaded" not in e["logs"] for e in running)
    assert any(STEP_LINE.search(e["logs"] or "") and "step 40/40" not in e["logs"] for e in running)

    metrics = final["metrics"]
    assert set(STAGES) <= set(metrics) and all(metrics[stage] >= 0 for stage in STAGES)
    assert metrics["lora_fetch_time"] >= 2.0 and sum(metrics[stage] for stage in STAGES) <= metrics["predict_time"]
    assert any("lora_fetch_time" in e["metrics"] and "generate_time" not in e["metrics"] for e in running)
    progress_server.wait_for("READY")


def test_a_sync_answer_carries_the_step_lines_and_stage_metrics(progress_server):
    body = progress_server.predict({"prompt": "a cat", "seed": 4, **SMALL, "num_inference_steps": 3}).json()
    assert body["status"] == "succeeded", body
    assert STEP_LINE.findall(body["logs"]) == [("1", "3"), ("2", "3"), ("3", "3")]
    assert set(STAGES) | {"predict_time"} <= set(body["metrics"])
