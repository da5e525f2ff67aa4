"""The public front over real HTTP: what a stranger sends never reaches Cog unchecked (issue: the
public front), prediction records, tenants. Each test talks to `python -m front` as `make serve`
runs it, with its real Cog server behind it on loopback."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.cog_server import _running, data_uri, decode_data_uri, png_bytes
from tests.front_server import FrontServer
from tests.receivers import Receiver

SMALL = {"prompt": "an ascii cat", "num_inference_steps": 2, "aspect_ratio": "custom", "width": 256, "height": 256}
TOKEN_A, TOKEN_B = "tenant-a-" + "a" * 24, "tenant-b-" + "b" * 24
A, B = {"Authorization": f"Bearer {TOKEN_A}"}, {"Authorization": f"Bearer {TOKEN_B}"}


def isolated_network() -> bool:
    """Only loopback here (an empty network namespace, as .ci/run provides): a test may name other
    addresses, since nothing can leave."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


needs_isolation = pytest.mark.skipif(not isolated_network(), reason="names non-loopback addresses: empty netns only")


@pytest.fixture(scope="module")
def rx():
    with Receiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def front(tiny_weights, rx):
    env = {"ALLOWED_PRIVATE_ORIGINS": rx.url, "MAX_INPUT_FILE_BYTES": str(200_000)}
    with FrontServer(tiny_weights, env=env) as server:
        server.wait_ready()
        yield server


def refused(response: requests.Response, *field: str) -> str:
    """The message of a 422 that names `field` (Cog's detail shape)."""
    assert response.status_code == 422, response.text[:300]
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", *field], detail
    return detail["msg"]


def test_a_prediction_through_the_front_is_cogs_answer(front):
    response = front.post({"input": SMALL})
    assert response.status_code == 200, response.text[:300]
    body = response.json()
    assert body["status"] == "succeeded" and body["input"] == SMALL
    mime, data = decode_data_uri(body["output"][0])
    assert mime == "image/webp" and data[:4] == b"RIFF"
    assert front.get(body["id"]).json()["output"] == body["output"]


def test_cogs_own_routes_are_not_reachable(front):
    for method, path in [("POST", "/shutdown"), ("GET", "/shutdown"), ("POST", "/trainings"), ("GET", "/docs")]:
        assert requests.request(method, front.url + path, timeout=10).status_code in (404, 405), path
    assert front.post({"input": SMALL}).status_code == 200  # still serving


def test_a_webhook_to_the_server_itself_is_refused_before_any_work(front):
    """The attack: one anonymous request whose webhook is Cog's /shutdown stopped the server."""
    before = requests.get(front.url + "/predictions", timeout=10).json()["results"]
    for url in (f"{front.url}/shutdown", "http://localhost:5000/shutdown", "http://[::1]:5000/shutdown"):
        response = front.post({"input": SMALL, "webhook": url}, headers={"Prefer": "respond-async"})
        assert "Refusing" in refused(response, "webhook")
    assert requests.get(front.url + "/predictions", timeout=10).json()["results"] == before  # nothing recorded
    assert requests.get(front.url + "/health-check", timeout=10).json()["status"] == "READY"


@needs_isolation
@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.1/hook", "http://169.254.169.254/latest/meta-data/", "http://168.63.129.16/", "http://[fec0::1]/"],
)
def test_webhooks_to_internal_addresses_are_refused(front, url):
    response = front.post({"input": SMALL, "webhook": url}, headers={"Prefer": "respond-async"})
    assert "Refusing" in refused(response, "webhook")


def test_webhooks_are_delivered_by_the_front_to_an_allowed_origin(front, rx):
    prediction_id = uuid.uuid4().hex
    body = {"id": prediction_id, "input": SMALL, "webhook": rx.webhook_url}
    response = front.post(body, headers={"Prefer": "respond-async"})
    assert response.status_code == 202 and response.json()["status"] == "starting"
    final = rx.wait_webhook(prediction_id)
    assert final["status"] == "succeeded" and final["output"][0].startswith("data:image/webp")
    assert rx.webhooks_for(prediction_id)[0]["status"] == "processing"  # the `start` event, as Cog sends it
    # the filter keeps only the terminal event
    only = uuid.uuid4().hex
    body = {"id": only, "input": SMALL, "webhook": rx.webhook_url, "webhook_events_filter": ["completed"]}
    assert front.post(body, headers={"Prefer": "respond-async"}).status_code == 202
    rx.wait_webhook(only)
    time.sleep(0.5)
    assert [w["status"] for w in rx.webhooks_for(only)] == ["succeeded"]


@pytest.mark.parametrize("field", ["image", "mask"])
def test_server_paths_are_refused_alike_whether_or_not_they_exist(front, field, tmp_path):
    existing = tmp_path / "secret.png"
    existing.write_bytes(png_bytes((256, 256)))
    image = {"image": data_uri(png_bytes((256, 256)))} if field == "mask" else {}
    messages = set()
    for value in (str(existing), "/etc/passwd", "/no/such/file.png", f"file://{existing}", "../x.png"):
        messages.add(refused(front.post({"input": {**SMALL, **image, field: value}}), "input", field))
    assert len(messages) == 1, messages
    assert "server paths" in messages.pop()


def test_image_urls_are_fetched_by_the_front_through_the_guard(front, rx):
    picture = png_bytes((256, 256), color=(20, 200, 20))
    url = rx.serve("green.png", picture, "image/png")
    response = front.post({"input": {**SMALL, "image": url, "prompt_strength": 0.5}})
    assert response.status_code == 200 and response.json()["status"] == "succeeded", response.text[:300]
    # the record shows what the client sent: the data it was turned into stays between front and Cog
    assert response.json()["input"]["image"] == url
    # a loopback URL that is not the allowed origin: refused, never fetched
    other = Receiver()
    with other:
        other.serve("x.png", picture, "image/png")
        message = refused(front.post({"input": {**SMALL, "image": f"{other.url}/files/x.png"}}), "input", "image")
        assert "Refusing" in message and other.requests == []


def test_image_downloads_are_capped_in_bytes(front, rx):
    """MAX_INPUT_FILE_BYTES is 200,000 here; a larger answer (or one that says it is) stops the download."""
    url = rx.serve("big.png", b"\x89PNG" + os.urandom(300_000), "image/png")
    assert "limit" in refused(front.post({"input": {**SMALL, "image": url}}), "input", "image")
    big = data_uri(b"\x89PNG" + os.urandom(300_000))
    assert "limit" in refused(front.post({"input": {**SMALL, "image": big}}), "input", "image")


def test_a_body_over_the_limit_is_refused_from_its_content_length(front):
    """413 from the header alone: the body is never sent, and the answer comes at once."""
    with socket.create_connection(("127.0.0.1", front.port), timeout=10) as sock:
        sock.sendall(
            b"POST /predictions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000000\r\n\r\n"
        )
        answer = sock.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]


def test_bad_bodies_are_answered_as_cog_answers_them(front):
    assert requests.post(front.url + "/predictions", data=b"{not json", timeout=10).status_code == 400
    assert refused(front.post({}), "input") == "Field required"
    assert refused(front.post({"input": {}}), "input", "prompt") == "Field required"
    assert "less than or equal" in refused(front.post({"input": {**SMALL, "num_outputs": 9}}), "input", "num_outputs")
    assert refused(front.post({"input": SMALL, "id": "../../x"}), "id")


def test_records_are_kept_and_listed_newest_first(front):
    ids = [uuid.uuid4().hex for _ in range(2)]
    for prediction_id in ids:
        response = front.post({"id": prediction_id, "input": {**SMALL, "hf_api_token": "hf_secret_value_123"}})
        assert "hf_api_token" not in response.json()["input"]  # write-only: never stored, never shown
    listed = [r["id"] for r in requests.get(front.url + "/predictions", timeout=10).json()["results"]]
    assert listed[:2] == ids[::-1]
    record = front.get(ids[0]).json()
    assert record["status"] == "succeeded" and record["completed_at"] >= record["started_at"] >= record["created_at"]
    assert "hf_secret_value_123" not in json.dumps(record)
    assert front.get("no-such-prediction").status_code == 404


def test_the_schema_keeps_cogs_input_and_output_exactly(front):
    ours = requests.get(front.url + "/openapi.json", timeout=10).json()
    cog = json.loads((Path(__file__).resolve().parent.parent / ".cog" / "openapi_schema.json").read_text())
    for name in ("Input", "Output"):
        assert ours["components"]["schemas"][name] == cog["components"]["schemas"][name]
    assert "/shutdown" not in ours["paths"]
    documented = set(ours["paths"]["/predictions"]["post"]["responses"])
    assert {"200", "202", "400", "409", "413", "422", "429", "503"} <= documented


def test_health_check_shows_no_setup_logs(front):
    health = requests.get(front.url + "/health-check", timeout=10).json()
    assert health["status"] == "READY" and "logs" not in health.get("setup", {})


# ---- tenants


@pytest.fixture(scope="module")
def tenants_front(tiny_weights):
    with FrontServer(tiny_weights, env={"API_TOKENS": f"{TOKEN_A},{TOKEN_B}"}) as server:
        server.wait_ready()
        yield server


def test_tokens_are_required_and_predictions_belong_to_their_tenant(tenants_front):
    front = tenants_front
    assert front.post({"input": SMALL}).status_code == 401
    assert front.post({"input": SMALL}, headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    prediction_id = uuid.uuid4().hex
    response = front.post({"id": prediction_id, "input": SMALL}, headers=A)
    assert response.status_code == 200 and response.json()["status"] == "succeeded"
    assert front.get(prediction_id, headers=A).status_code == 200
    assert front.get(prediction_id, headers=B).status_code == 404
    assert front.get(prediction_id).status_code == 401
    cancel = requests.post(f"{front.url}/predictions/{prediction_id}/cancel", headers=B, timeout=10)
    assert cancel.status_code == 404
    put = requests.put(f"{front.url}/predictions/{prediction_id}", json={"input": SMALL}, headers=B, timeout=30)
    assert put.status_code == 409  # refused, never merged
    assert requests.get(front.url + "/predictions", headers=B, timeout=10).json()["results"] == []
    mine = requests.get(front.url + "/predictions", headers=A, timeout=10).json()["results"]
    assert [r["id"] for r in mine] == [prediction_id]
    # a repeated PUT by its owner is idempotent: the same prediction, not a new one
    again = requests.put(f"{front.url}/predictions/{prediction_id}", json={"input": SMALL}, headers=A, timeout=30)
    assert again.status_code == 200 and again.json()["output"] == response.json()["output"]


def test_an_open_front_says_so(front):
    assert "API_TOKENS is not set" in front.logs()


# ---- no prediction lost


def test_a_prediction_whose_cog_server_dies_ends_failed_and_the_next_succeeds(tiny_weights, rx):
    import psutil

    with FrontServer(tiny_weights, env={"ALLOWED_PRIVATE_ORIGINS": rx.url}) as front:
        front.wait_ready()
        prediction_id = uuid.uuid4().hex
        slow = {**SMALL, "num_inference_steps": 50, "width": 1024, "height": 1024}
        body = {"id": prediction_id, "input": slow, "webhook": rx.webhook_url}
        assert front.post(body, headers={"Prefer": "respond-async"}).status_code == 202
        deadline = time.monotonic() + 30
        while front.get(prediction_id).json()["status"] != "processing" and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        cog = psutil.Process(front.cog_pid())
        for process in [cog, *cog.children(recursive=True)]:
            process.kill()
        record = front.wait_done(prediction_id, timeout=30)
        assert record["status"] == "failed" and "retry" in record["error"], record["error"]
        assert rx.wait_webhook(prediction_id, timeout=30)["status"] == "failed"
        front.wait_ready(timeout=120)  # the front restarted its Cog server
        response = front.post({"input": SMALL})
        assert response.status_code == 200 and response.json()["status"] == "succeeded"


def test_records_survive_a_restart_and_in_flight_ones_end_failed(tiny_weights, tmp_path):
    state = tmp_path / "state"
    with FrontServer(tiny_weights, state_dir=state) as front:
        front.wait_ready()
        done = front.post({"input": SMALL}).json()
        running = uuid.uuid4().hex
        slow = {**SMALL, "num_inference_steps": 50, "width": 1024, "height": 1024}
        assert front.post({"id": running, "input": slow}, headers={"Prefer": "respond-async"}).status_code == 202
        time.sleep(0.5)
        front.kill()  # SIGKILL: no clean stop
    with FrontServer(tiny_weights, state_dir=state) as front:
        front.wait_ready()
        assert front.get(done["id"]).json()["output"] == done["output"]
        record = front.get(running).json()
        assert record["status"] == "failed" and "restarted" in record["error"]


# ---- the Cog server alone (what Replicate's platform calls): defence in depth


def test_cog_alone_refuses_server_paths_alike(cog_server, tmp_path):
    existing = tmp_path / "secret.png"
    existing.write_bytes(png_bytes((256, 256)))
    errors = set()
    for value in (str(existing), "/etc/passwd", "/no/such/file.png"):
        body = cog_server.predict({**SMALL, "image": value, "prompt_strength": 0.01}).json()
        assert body["status"] == "failed" and not body.get("output"), body
        errors.add(body["error"])
    assert len(errors) == 1 and "server paths" in errors.pop()


def test_a_worker_stopped_by_sigterm_leaves_no_folders(tiny_weights, tmp_path):
    import signal as signals

    from tests.cog_server import CogServer

    with CogServer(tiny_weights, env={"TMPDIR": str(tmp_path)}) as server:
        server.wait_for("READY", timeout=180)
        assert server.predict(SMALL).json()["status"] == "succeeded"
        worker = server.worker()
        assert sorted(p.name.split("-")[1] for p in tmp_path.glob("flux-*")) == ["inputs", "out"]
        worker.send_signal(signals.SIGTERM)
        deadline = time.monotonic() + 30
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(worker)
        assert [p.name for p in tmp_path.glob("flux-*")] == []


@pytest.fixture
def redis_url(tmp_path):
    """A real redis-server (Debian's package; .ci/run installs it) on a free loopback port."""
    import shutil
    import subprocess

    from tests.cog_server import free_port

    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (.ci/run installs Debian's redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen([*args, "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


def test_records_on_redis_survive_a_front_restart_and_stay_with_their_tenant(tiny_weights, redis_url, tmp_path):
    env = {"PREDICTION_STORE": redis_url, "API_TOKENS": f"{TOKEN_A},{TOKEN_B}"}
    with FrontServer(tiny_weights, env=env, state_dir=tmp_path / "a") as front:
        front.wait_ready()
        done = front.post({"input": SMALL}, headers=A).json()
        assert done["status"] == "succeeded"
    with FrontServer(tiny_weights, env=env, state_dir=tmp_path / "b") as front:  # nothing on its disk
        front.wait_ready()
        assert front.get(done["id"], headers=A).json()["output"] == done["output"]
        assert front.get(done["id"], headers=B).status_code == 404
        listed = requests.get(front.url + "/predictions", headers=A, timeout=10).json()["results"]
        assert [r["id"] for r in listed] == [done["id"]]


def test_metrics_count_predictions_and_their_stages(front, rx, tiny_weights):
    from tests.cog_server import scaled_lora

    lora = rx.serve("metrics-lora.safetensors", scaled_lora(tiny_weights, 2.0))
    for _ in range(2):  # a miss (download), then a hit
        assert front.post({"input": {**SMALL, "extra_lora": lora}}).json()["status"] == "succeeded"
    response = requests.get(front.url + "/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'predictions_total{mode="txt2img",status="succeeded"}' in text
    assert 'prediction_stage_seconds_count{stage="queue"}' in text
    assert 'prediction_stage_seconds_count{stage="predict"}' in text  # Cog's own predict_time
    assert 'model_servers{state="READY"} 1.0' in text
    assert 'lora_cache_events_total{event="misses",server="local"} 1.0' in text
    assert 'lora_cache_events_total{event="hits",server="local"} 1.0' in text
    assert 'prediction_stage_seconds_count{stage="generate"}' in text
    assert "an ascii cat" not in text  # nothing a request said


def test_the_grafana_dashboard_queries_exported_metrics_only():
    import re

    from front.metrics import Metrics
    from front.records import Record

    metrics = Metrics()
    record = Record(id="x", tenant="", input={}, status="succeeded", started_at="2026-01-01T00:00:01Z")
    record.created_at, record.metrics = "2026-01-01T00:00:00Z", {"predict_time": 1.0}
    record.metrics["lora_cache_hits"] = 1
    metrics.finished(record)
    metrics.render(0, 0, {"status": "READY"})
    exported = metrics.names()
    dashboard = json.loads((Path(__file__).resolve().parent.parent / "deploy" / "grafana-dashboard.json").read_text())
    queried = set()
    name = re.compile(r"\b((?:predictions?|prediction_stage|model|lora_cache)_[a-z_]+)\b")
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            queried |= set(name.findall(target["expr"]))
    assert queried and queried <= exported, queried - exported


def test_a_prediction_streams_its_record_until_it_completes(front):
    prediction_id = uuid.uuid4().hex
    body = {"id": prediction_id, "input": {**SMALL, "num_inference_steps": 12, "width": 512, "height": 512}}
    assert front.post(body, headers={"Prefer": "respond-async"}).status_code == 202
    events = []
    with requests.get(f"{front.url}/predictions/{prediction_id}/stream", stream=True, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    assert events[-1][0] == "completed" and events[-1][1]["status"] == "succeeded"
    assert all(name == "prediction" for name, _ in events[:-1])
    assert front.get(prediction_id).json()["progress"] is None  # finished


# ---- the hostile-input battery through the front: each ends as its one line, nothing else changes


def _gz_tar(data: bytes) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("lora.safetensors")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_hostile_lora_inputs_through_the_front(front, rx, tiny_weights):
    from tests.cog_server import scaled_lora

    bomb = rx.serve("bomb.tar", _gz_tar(b"\0" * (4 << 20)))
    valid = rx.serve("ok-lora.safetensors", scaled_lora(tiny_weights, 1.5))
    cases = {
        "huggingface.co/own%20er/repo": "not a valid repo id",
        "https://huggingface.co/a%2F..%2F..%2Fapi/whoami-v2": "not a valid repo id",
        bomb: "compressed archive is not accepted",
        ", ".join([valid] * 9): "over the 8 accepted",
        "http://127.0.0.2:1/x.safetensors": "Refusing to fetch",
        "/etc/passwd": "local paths are not accepted",
    }
    for extra_lora, expected in cases.items():
        body = front.post({"input": {**SMALL, "extra_lora": extra_lora}}).json()
        assert body["status"] == "failed" and expected in body["error"], (extra_lora[:60], body.get("error"))
        assert "Traceback" not in body["error"] and "\n" not in body["error"].strip()
    assert front.post({"input": {**SMALL, "extra_lora": valid}}).json()["status"] == "succeeded"


def test_outputs_survive_metadata_that_does_not_fit(front):
    """A JPEG whose parameters text is over 64 KB raised `EXIF data is too long` after the GPU work."""
    long_prompt = "an ascii art 城堡 " * 600  # ~9,000 characters, UTF-16 in EXIF: over 64 KB with the rest
    body = front.post({"input": {**SMALL, "prompt": long_prompt[:9_999], "output_format": "jpg"}}).json()
    assert body["status"] == "succeeded", body.get("error")
    mime, data = decode_data_uri(body["output"][0])
    assert mime == "image/jpeg" and data[:2] == b"\xff\xd8"


def test_a_wide_input_image_stays_within_the_documented_sizes(front):
    import io

    from PIL import Image

    wide = data_uri(png_bytes((1448, 256)))
    body = front.post({"input": {**SMALL, "image": wide, "prompt_strength": 0.5, "output_format": "png"}}).json()
    assert body["status"] == "succeeded", body.get("error")
    assert Image.open(io.BytesIO(decode_data_uri(body["output"][0])[1])).size == (1440, 256)


def test_sigterm_drains_the_running_prediction_and_fails_the_queued_one(tiny_weights, rx):
    with FrontServer(tiny_weights, env={"ALLOWED_PRIVATE_ORIGINS": rx.url}) as front:
        front.wait_ready()
        running, queued = uuid.uuid4().hex, uuid.uuid4().hex
        slow = {**SMALL, "num_inference_steps": 30, "width": 768, "height": 768}
        for prediction_id in (running, queued):
            body = {"id": prediction_id, "input": slow, "webhook": rx.webhook_url}
            assert front.post(body, headers={"Prefer": "respond-async"}).status_code == 202
        rx.wait_webhook(running, statuses=("processing",), timeout=30)
        front.stop()  # SIGTERM, as Kubernetes and systemd stop it
        assert front.process.returncode == 0, front.logs()[-2000:]
        assert rx.wait_webhook(running, timeout=5)["status"] == "succeeded"
        final = rx.wait_webhook(queued, timeout=5)
        assert final["status"] == "failed" and "stopping" in final["error"]
