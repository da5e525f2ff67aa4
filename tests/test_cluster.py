"""Scale out (cluster/): the Cog HTTP API behind Ray Serve, on real Ray and real Cog servers.

One cluster for the module, started as `make serve-cluster` starts it (`python -m cluster`): a
local Ray instance, 3 replicas (each an unmodified Cog server on the tiny weights, CPU) behind
the ingress on a free loopback port, a queue bound of 8, health checks every second. Its HOME
(where Ray 2.60 writes `.ray/auth_token`), Ray's session folder, the replicas' folders and the
Cog logs all live in one temporary folder, removed at the end; the last test stops it with
SIGTERM and checks that no process it started is left. LoRA files come from a local receiver
(LORA_ALLOW_PRIVATE_URLS=1 for the replicas); tests/offline keeps every process off the network.

The Kubernetes manifests (deploy/) are checked offline: built-in kinds with kubernetes-validate
--strict, the RayService against KubeRay's CRD schema (tests/data/kuberay/), its Serve config
with Ray's own schema and the app's ClusterArgs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jsonschema
import psutil
import pytest
import requests
import yaml

from bench.bench_cluster import FileHost
from cluster.routing import lora_ids, prediction_id, routing_key
from tests.cog_server import ROOT, decode_data_uri, free_port, report, scaled_lora
from tests.receivers import Receiver

REPLICAS = 3
QUEUE = 8  # max_queued_requests
RETRY_AFTER_S = 2
DOWNLOAD_S = 1.0  # the burst test's LoRA host answers this late
SMALL = {"aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 1, "output_format": "png"}
# Long enough to cancel mid-way (~0.3–1 s per step on 2 cores, 50 steps); a cancel stops it within a step.
LONG = {"aspect_ratio": "custom", "width": 1440, "height": 1440, "num_inference_steps": 50}
DEPLOY = ROOT / "deploy"
KUBERAY = ROOT / "tests" / "data" / "kuberay"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")  # Ray's own pydantic use


def body_of(inputs: dict) -> bytes:
    return json.dumps({"input": inputs}).encode()


# ---------------------------------------------------------------- the routing key (no cluster)


def test_the_routing_key_is_the_normalised_lora_sources():
    url = "https://Files.Example.com/loras/Style.safetensors"
    assert routing_key(body_of({"prompt": "a cat"})) == ""
    assert routing_key(body_of({"prompt": "a cat", "extra_lora": ""})) == ""
    one = routing_key(body_of({"prompt": "a", "extra_lora": "Owner/Model"}))
    assert one.startswith("lora-")
    assert routing_key(body_of({"prompt": "b", "extra_lora": " https://replicate.com/owner/model/ "})) == one
    assert routing_key(body_of({"prompt": "a", "extra_lora": url})) == routing_key(
        body_of({"prompt": "a", "extra_lora": url.replace("Files.Example.com", "files.example.com")})
    )
    both = routing_key(body_of({"prompt": "a", "replicate_weights": "owner/model", "extra_lora": url}))
    swapped = routing_key(body_of({"prompt": "a", "replicate_weights": url, "extra_lora": "owner/model"}))
    assert both == swapped and both not in ("", one)
    assert routing_key(body_of({"prompt": "a", "replicate_weights": "owner/model", "extra_lora": "owner/model"})) == one
    # An id names no secret: a signed URL's query never reaches Ray's logs and metrics.
    assert "sig" not in routing_key(body_of({"prompt": "a", "extra_lora": url + "?sig=secret"}))


def ids(**inputs) -> list[str]:
    return lora_ids(routing_key(body_of({"prompt": "a", **inputs})))


def test_each_lora_of_a_list_or_with_a_scale_has_its_own_id():
    (pixar,) = ids(extra_lora="fofr/flux-pixar-cars")
    assert ids(extra_lora="fofr/flux-pixar-cars:0.6") == [pixar]  # the scale is not the LoRA
    assert ids(replicate_weights="fofr/flux-pixar-cars") == [pixar]
    (a,), (c,) = ids(extra_lora="a/b"), ids(extra_lora="c/d")
    assert ids(extra_lora="a/b, c/d") == ids(extra_lora="c/d:0.5\na/b") == sorted([a, c])
    assert ids(replicate_weights="a/b", extra_lora="c/d:0.3") == sorted([a, c])
    (file,) = ids(extra_lora="https://h/x.safetensors")
    assert ids(extra_lora="https://h/x.safetensors:0.5") == [file]
    assert ids(extra_lora="https://h:8080/x.safetensors") != [file]  # a port is not a scale
    assert set(ids(extra_lora="fofr/flux-pixar-cars:0.6, a/b")) == {pixar, a}  # `A` then `A:0.6, B` share A


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"input": "x"}',
        body_of({"prompt": "a", "extra_lora": "not a lora source"}),
        body_of({"prompt": "a", "extra_lora": 3}),
        b"[" * 100_000,
    ],
)
def test_a_request_whose_lora_does_not_parse_routes_as_no_lora(body):
    assert routing_key(body) == ""  # and Cog answers the error itself


def test_prediction_ids_come_from_the_body():
    assert prediction_id(b'{"id": "p1", "input": {}}') == "p1"
    assert prediction_id(b'{"input": {}}') is None and prediction_id(b"nope") is None


# ---------------------------------------------------------------- the cluster


class Cluster:
    """`python -m cluster` in a process group of its own, everything it writes under `folder`."""

    def __init__(self, weights: Path, folder: Path, env: dict[str, str] | None = None):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = folder / "cog-logs"
        self.tmp = folder / "tmp"  # the launcher's TMPDIR: its replica folders go in a folder of its own here
        (folder / "home").mkdir()
        self.tmp.mkdir()
        self.log = open(folder / "cluster.log", "wb")  # noqa: SIM115 (closed in stop())
        args = [sys.executable, "-m", "cluster", "--replicas", str(REPLICAS), "--host", "127.0.0.1"]
        args += ["--port", str(self.port), "--num-cpus", "0.5", "--max-queued-requests", str(QUEUE)]
        args += ["--retry-after-s", str(RETRY_AFTER_S), "--health-check-period-s", "1"]
        args += ["--graceful-shutdown-timeout-s", "20", "--log-dir", str(self.log_dir)]
        args += ["--ray-temp-dir", str(folder / "ray")]
        env = {
            **os.environ,  # PYTHONPATH starts with tests/offline (conftest): no process reaches outside
            "FLUX_WEIGHTS_DIR": str(weights),
            "HF_HUB_OFFLINE": "1",
            "HOME": str(folder / "home"),  # Ray writes ~/.ray/auth_token here, not in the real home
            "TMPDIR": str(self.tmp),
            "LORA_ALLOW_PRIVATE_URLS": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            "FRONT_STATE_DIR": str(folder / "front"),
            **(env or {}),
        }
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.seen: dict[int, psutil.Process] = {}

    def logs(self) -> str:
        return (self.folder / "cluster.log").read_text(errors="replace")

    def health(self) -> dict:
        return requests.get(self.url + "/health-check", timeout=10).json()

    def wait_ready(self, replicas: int = REPLICAS, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        health: dict = {}
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the cluster exited:\n{self.logs()[-4000:]}"
            try:
                health = self.health()
                if health.get("replicas", {}).get("READY", 0) >= replicas:
                    return health
            except (requests.ConnectionError, ValueError):
                pass
            self.remember()
            time.sleep(0.5)
        raise TimeoutError(f"not {replicas} READY replicas after {timeout} s: {health}\n{self.logs()[-4000:]}")

    def remember(self) -> list[psutil.Process]:
        """Every process the cluster has started so far (kept, to check they all end)."""
        try:
            found = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for process in found:
            self.seen.setdefault(process.pid, process)
        return found

    def cog_servers(self) -> list[psutil.Process]:
        servers = []
        for process in self.remember():
            try:
                if "cog.server.http" in process.cmdline():
                    servers.append(process)
            except psutil.Error:
                pass
        return servers

    def predict(self, inputs: dict, *, timeout: float = 180, **body) -> requests.Response:
        return requests.post(self.url + "/predictions", json={"input": inputs, **body}, timeout=timeout)

    def stop(self, timeout: float = 90, *, group: bool = False) -> list[str]:
        """SIGTERM to the launcher, as Kubernetes would, or to its whole process group (`kill -- -PGID`,
        systemd, a terminal's Ctrl-C); what is still alive `timeout` s later (then killed)."""
        self.remember()
        if self.process.poll() is None:
            if group:
                os.killpg(self.process.pid, signal.SIGTERM)
            else:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(1)
        left = []
        for process in self.seen.values():
            if _alive(process):
                left.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
                process.kill()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()
        return left


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def rx(tiny_weights):
    with Receiver() as receiver:
        receiver.loras = {
            name: receiver.serve(f"{name}.safetensors", scaled_lora(tiny_weights, factor))
            for name, factor in zip("abcdefg", (2.0, 3.0, 4.0, -2.0, -3.0, 0.5, 1.5), strict=True)
        }
        yield receiver


@pytest.fixture(scope="module")
def cluster(tiny_weights, rx):
    token = Path.home() / ".ray" / "auth_token"
    token_before = token.exists()
    folder = Path(tempfile.mkdtemp(prefix="cluster-"))
    started = time.monotonic()
    server = Cluster(tiny_weights, folder, env={"ALLOWED_PRIVATE_ORIGINS": rx.url})  # the webhook receiver
    try:
        server.wait_ready()
        server.startup_s = time.monotonic() - started
        yield server
    finally:
        left = server.stop()
        if os.environ.get("KEEP_CLUSTER_LOGS"):
            sys.stderr.write(f"cluster folder kept: {folder}\n")
        else:
            shutil.rmtree(folder, ignore_errors=True)
        assert token.exists() == token_before, "the tests changed ~/.ray/auth_token"
        assert not left, f"processes left behind: {left}"


def outputs(response: requests.Response) -> list[bytes]:
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    assert body["status"] == "succeeded", body
    return [decode_data_uri(uri)[1] for uri in body["output"]]


def replica(response: requests.Response) -> str:
    return response.headers["X-Cluster-Replica"]


def downloads(rx, name: str) -> int:
    return sum(1 for method, path in rx.requests if method == "GET" and path == f"/files/{name}.safetensors")


def test_the_cluster_starts_with_every_replica_ready(cluster, request):
    health = cluster.health()
    assert health["status"] == "READY" and health["replicas"] == {"READY": REPLICAS}
    assert len(cluster.cog_servers()) == REPLICAS
    report(request, f"Ray + {REPLICAS} Cog replicas READY in {cluster.startup_s:.1f} s")


def test_one_lora_is_downloaded_once_and_its_requests_land_on_one_replica(cluster, rx, request):
    served = {}
    for name in "abc":
        answers = [
            cluster.predict({"prompt": "a cat", "seed": seed, "extra_lora": rx.loras[name], **SMALL})
            for seed in range(4 if name == "a" else 2)
        ]
        for answer in answers:
            outputs(answer)
        served[name] = {replica(answer) for answer in answers}
        assert len(served[name]) == 1, f"LoRA {name} was served by {served[name]}"
        assert downloads(rx, name) == 1, f"LoRA {name} was downloaded {downloads(rx, name)} times"
    spread = set().union(*served.values())
    assert len(spread) >= 2, f"three new LoRAs all went to one replica: {served}"
    report(request, f"LoRAs a, b, c → replicas {[sorted(served[n])[0] for n in 'abc']}, one download each")


def test_a_sequential_stream_of_two_loras_downloads_each_once_in_the_cluster(cluster, rx, request):
    """Each request is sent when the previous one answered: where a LoRA went is known at once, not
    when its replica reports it to Ray's controller (seconds later)."""
    served: dict[str, set[str]] = {"d": set(), "e": set()}
    for seed, name in enumerate("ddeedede"):
        answer = cluster.predict({"prompt": "a stream", "seed": seed, "extra_lora": rx.loras[name], **SMALL})
        outputs(answer)
        served[name].add(replica(answer))
    assert (downloads(rx, "d"), downloads(rx, "e")) == (1, 1)
    assert len(served["d"]) == len(served["e"]) == 1, served
    report(request, f"d d e e d e d e: one download each; d on {served['d']}, e on {served['e']}")


def test_a_list_with_scales_finds_the_replica_holding_one_of_its_loras(cluster, rx):
    first = cluster.predict({"prompt": "f", "seed": 1, "extra_lora": rx.loras["f"], **SMALL})
    outputs(first)
    both = cluster.predict({"prompt": "f g", "seed": 2, "extra_lora": f"{rx.loras['f']}:0.6, {rx.loras['g']}", **SMALL})
    outputs(both)
    assert replica(both) == replica(first)
    assert (downloads(rx, "f"), downloads(rx, "g")) == (1, 1)


def test_a_hot_lora_spreads_when_its_replica_stays_busy(cluster, rx, request):
    """Each request keeps its replica busy for longer than affinity_wait_s (2 s): three at once for
    one LoRA do not all wait for the one replica holding it."""
    slow = {**SMALL, "width": 1024, "height": 1024, "num_inference_steps": 20}
    first = cluster.predict({"prompt": "hot", "seed": 0, "extra_lora": rx.loras["a"], **SMALL})
    outputs(first)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(
            pool.map(
                lambda seed: cluster.predict({"prompt": "hot", "seed": seed, "extra_lora": rx.loras["a"], **slow}),
                range(1, 4),
            )
        )
    for answer in answers:
        outputs(answer)
    used = {replica(answer) for answer in answers}
    assert replica(first) in used and len(used) >= 2, used
    report(request, f"3 at once for a busy LoRA: {len(used)} replicas, {downloads(rx, 'a')} downloads in all")


def test_a_burst_larger_than_the_replicas_all_succeeds_in_parallel(cluster, tiny_weights, request):
    """Each request brings a LoRA no replica has yet, from a host that takes DOWNLOAD_S to answer (a real
    download's stand-in): a request's time is mostly waiting, so it shows what a GPU per replica would,
    that the replicas work side by side, even on the 2 cores that the 3 replicas share here."""
    files = {f"burst{i}.safetensors": scaled_lora(tiny_weights, 1 + i / 8) for i in range(3 + QUEUE)}
    with FileHost(files, delay_s=DOWNLOAD_S) as host:

        def one(i: int) -> tuple[float, requests.Response]:
            started = time.monotonic()
            inputs = {"prompt": "a burst", "seed": i, "extra_lora": host.url(f"burst{i}.safetensors"), **SMALL}
            answer = cluster.predict(inputs)
            return time.monotonic() - started, answer

        alone = [one(i) for i in range(3)]
        single = sorted(took for took, _ in alone)[1]
        burst = QUEUE  # every one of them may wait in the queue at once
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(burst) as pool:
            results = list(pool.map(one, range(3, 3 + burst)))
        wall = time.monotonic() - started
    for _, answer in alone + results:
        assert answer.status_code == 200, answer.text[:300]  # no 409 "At capacity"
        outputs(answer)
    rounds = -(-burst // REPLICAS)
    used = {replica(answer) for _, answer in results}
    report(
        request,
        f"burst of {burst} on {REPLICAS} replicas: {wall:.2f} s; one request {single:.2f} s, so {rounds} rounds "
        f"≈ {rounds * single:.2f} s and one after another {burst * single:.2f} s; replicas used: {len(used)}",
    )
    assert len(used) == REPLICAS
    assert wall < 1.5 * rounds * single + 1.0


def test_the_cluster_serves_the_front_with_a_single_cog_servers_outputs(cluster, cog_server):
    inputs = {"prompt": "an ascii art lighthouse", "seed": 42, **SMALL, "num_inference_steps": 2}
    alone = cog_server.predict(inputs)
    assert outputs(cluster.predict(inputs)) == outputs(alone)
    schema = requests.get(cluster.url + "/openapi.json", timeout=30)
    assert schema.status_code == 200 and schema.headers["content-type"] == "application/json"
    cogs = requests.get(cog_server.url + "/openapi.json", timeout=30).json()["components"]["schemas"]
    assert {k: schema.json()["components"]["schemas"][k] for k in ("Input", "Output")} == {
        k: cogs[k] for k in ("Input", "Output")
    }
    # bad input: a 422 naming the field, as Cog answers, before anything is queued
    bad = {"prompt": "a cat", "num_outputs": 9}
    answer = cluster.predict(bad)
    assert (
        answer.status_code == 422
        and answer.json()["detail"][0]["loc"] == cog_server.predict(bad).json()["detail"][0]["loc"]
    )
    # the front's own: Cog's /shutdown is not there
    assert requests.post(cluster.url + "/shutdown", timeout=30).status_code == 404


def test_an_async_prediction_reports_to_its_webhook(cluster, rx):
    inputs = {"prompt": "an async cat", "seed": 5, **SMALL}
    put = requests.put(
        cluster.url + "/predictions/async-1",
        json={"id": "async-1", "input": inputs, "webhook": rx.webhook_url},
        headers={"Prefer": "respond-async"},
        timeout=30,
    )
    assert put.status_code == 202, put.text
    final = rx.wait_webhook("async-1", timeout=60)
    assert final["status"] == "succeeded", final
    assert [decode_data_uri(uri)[1] for uri in final["output"]] == outputs(cluster.predict(inputs))
    assert "processing" in [w["status"] for w in rx.webhooks_for("async-1")]


def test_progress_the_stream_and_metrics_through_the_clusters_front(cluster, rx):
    """The replicas' Cog servers report to their replica, which streams it to the front: a record's
    progress, its SSE stream and the metrics are the same on the cluster as on one server."""
    # long enough for several of coglet's webhooks (about one every 0.5 s) while it denoises
    long = {"num_inference_steps": 40, "width": 1024, "height": 1024}
    body = {"id": "progress-1", "input": {"prompt": "steps", **SMALL, **long}}
    assert requests.post(cluster.url + "/predictions", json=body, headers={"Prefer": "respond-async"}, timeout=30).ok
    seen = []
    with requests.get(cluster.url + "/predictions/progress-1/stream", stream=True, timeout=120) as response:
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
    assert seen[-1]["status"] == "succeeded"
    steps = [r["progress"]["done"] for r in seen if r.get("progress") and r["progress"]["stage"] == "generate"]
    assert any(0 < done < 40 for done in steps), [r.get("progress") for r in seen]
    assert "step 40/40" in seen[-1]["logs"]
    text = requests.get(cluster.url + "/metrics", timeout=30).text
    assert f'model_servers{{state="READY"}} {float(REPLICAS)}' in text or 'model_servers{state="BUSY"}' in text
    assert 'prediction_stage_seconds_count{stage="generate"}' in text
    assert 'predictions_total{mode="txt2img",status="succeeded"}' in text


def test_replicates_client_runs_against_the_cluster(cluster):
    replicate = pytest.importorskip("replicate")
    client = replicate.Client(api_token="unused-on-an-open-front", base_url=cluster.url)
    client.poll_interval = 0.1
    (url,) = client.run("jan890/flux_dev_ascii_art", input={"prompt": "a cluster cat", **SMALL})
    assert requests.get(url, timeout=30).content[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_prediction_whose_cog_server_dies_mid_run_ends_failed_and_the_next_succeeds(cluster, rx):
    body = {"id": "dies-1", "input": {"prompt": "doomed", **LONG}, "webhook": rx.webhook_url}
    assert requests.post(cluster.url + "/predictions", json=body, headers={"Prefer": "respond-async"}, timeout=30).ok
    rx.wait_webhook("dies-1", statuses=("processing",), timeout=60)
    time.sleep(0.5)
    record = requests.get(cluster.url + "/predictions/dies-1", timeout=30).json()
    assert record["status"] == "processing"
    workers = {server: server.children(recursive=True) for server in cluster.cog_servers()}
    for children in workers.values():
        for child in children:
            child.cpu_percent(None)
    time.sleep(0.5)
    load = {s: sum(c.cpu_percent(None) for c in children) for s, children in workers.items()}
    victim = max(load, key=load.get)  # the Cog server whose worker is denoising
    for process in [victim, *workers[victim]]:
        with contextlib.suppress(psutil.Error):
            process.kill()
    final = rx.wait_webhook("dies-1", timeout=60)
    assert final["status"] == "failed" and "retry" in final["error"], final.get("error")
    assert requests.get(cluster.url + "/predictions/dies-1", timeout=30).json()["status"] == "failed"
    cluster.wait_ready(timeout=180)
    outputs(cluster.predict({"prompt": "after the crash", **SMALL}))


def test_cancel_through_the_ingress_stops_the_right_prediction(cluster, rx):
    assert requests.post(cluster.url + "/predictions/nobody/cancel", timeout=30).status_code == 404
    put = requests.put(
        cluster.url + "/predictions/cancel-a",
        json={"id": "cancel-a", "input": {"prompt": "a", "seed": 1, **LONG}, "webhook": rx.webhook_url},
        headers={"Prefer": "respond-async"},
        timeout=30,
    )
    assert put.status_code == 202, put.text
    sync: dict = {}

    def run_sync():
        body = {"id": "cancel-b", "input": {"prompt": "b", **LONG}}
        sync["answer"] = requests.put(cluster.url + "/predictions/cancel-b", json=body, timeout=180)

    thread = threading.Thread(target=run_sync, daemon=True)
    thread.start()
    rx.wait_webhook("cancel-a", statuses=("processing",), timeout=30)
    deadline = time.monotonic() + 30
    while cluster.health()["replicas"].get("BUSY", 0) < 2:
        assert time.monotonic() < deadline, cluster.health()["replicas"]
        time.sleep(0.2)
    time.sleep(1.0)  # both are denoising

    started = time.monotonic()
    assert requests.post(cluster.url + "/predictions/cancel-a/cancel", timeout=30).status_code == 200
    assert rx.wait_webhook("cancel-a", timeout=30)["status"] == "canceled"
    assert time.monotonic() - started < 15
    assert thread.is_alive(), "cancelling one prediction ended the other"

    assert requests.post(cluster.url + "/predictions/cancel-b/cancel", timeout=30).status_code == 200
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert sync["answer"].status_code == 200 and sync["answer"].json()["status"] == "canceled"
    assert time.monotonic() - started < 30
    cluster.wait_ready(timeout=60)


def test_a_killed_cog_server_is_replaced_and_requests_keep_succeeding(cluster, request):
    before = cluster.cog_servers()
    assert len(before) == REPLICAS
    victim = before[0]
    victim.kill()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda seed: cluster.predict({"prompt": "meanwhile", "seed": seed, **SMALL}), range(6)))
    for answer in answers:
        outputs(answer)
    deadline = time.monotonic() + 120
    while True:
        servers = cluster.cog_servers()
        if len(servers) == REPLICAS and victim.pid not in {s.pid for s in servers}:
            break
        assert time.monotonic() < deadline, f"not replaced: {[s.pid for s in servers]}"
        time.sleep(0.5)
    cluster.wait_ready(timeout=120)
    report(
        request,
        f"killed Cog server pid {victim.pid}: 6/6 requests succeeded; replaced in {time.monotonic() - started:.1f} s",
    )


def test_past_the_queue_bound_requests_get_429_with_retry_after_and_nothing_hangs(cluster, request):
    burst = 3 * (REPLICAS + QUEUE)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(burst) as pool:
        flood = [{"prompt": "flood", "seed": i, **SMALL} for i in range(burst)]
        answers = list(pool.map(lambda inputs: cluster.predict(inputs, timeout=120), flood))
    wall = time.monotonic() - started
    refused = [a for a in answers if a.status_code == 429]
    assert refused, "no request was refused past the queue bound"
    for answer in refused:
        assert answer.headers["Retry-After"].isdigit()
        assert "retry" in answer.json()["detail"]
    for answer in answers:
        if answer.status_code != 429:
            outputs(answer)
    assert len(answers) - len(refused) >= REPLICAS
    report(request, f"{burst} at once: {len(refused)} got 429, {burst - len(refused)} succeeded, in {wall:.1f} s")
    outputs(cluster.predict({"prompt": "after the flood", **SMALL}))


def test_a_replica_killed_outright_leaves_no_cog_server(cluster):
    server = cluster.cog_servers()[0]
    cog = [server, *server.children(recursive=True)]  # the Cog server and its worker
    replica_process = server.parent()
    assert "CogReplica" in " ".join(replica_process.cmdline())
    replica_process.kill()  # as the OOM killer does: no exit handler runs
    deadline = time.monotonic() + 10
    while any(_alive(process) for process in cog):
        assert time.monotonic() < deadline, [p.pid for p in cog if _alive(p)]
        time.sleep(0.2)
    cluster.wait_ready(timeout=120)  # Ray replaces the replica
    outputs(cluster.predict({"prompt": "after the replica", **SMALL}))


def test_sigterm_to_the_process_group_stops_every_process_it_started_within_20_s(cluster):
    """raylet and gcs_server die at once, before the launcher asks Serve and Ray to stop."""
    servers = cluster.cog_servers()
    assert len(cluster.seen) > 10 and servers  # Ray's processes, the replicas, their Cog servers and workers
    assert cluster.stop(timeout=20, group=True) == []
    assert cluster.process.returncode == 0, cluster.logs()[-3000:]
    assert list(cluster.tmp.iterdir()) == [], "replica folders left behind"


# ---------------------------------------------------------------- the Kubernetes manifests


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def test_the_plain_kubernetes_manifests_are_valid_strictly():
    import kubernetes_validate

    kinds = []
    for document in documents("kubernetes.yaml"):
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)
        kinds.append(document["kind"])
    assert sorted(kinds) == ["Deployment", "HorizontalPodAutoscaler", "Service"]


def strict(schema):
    """A CRD schema that refuses unknown fields (as `kubectl apply --validate=strict` does), not drops them."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def test_the_rayservice_matches_kuberays_crd_and_rays_serve_schema():
    from ray.serve.schema import ServeDeploySchema

    from cluster.app import ClusterArgs, build

    crd = yaml.load((KUBERAY / "ray.io_rayservices.yaml").read_text(), Loader=yaml.CSafeLoader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # the API server's, not the CRD's
    (service,) = documents("rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    jsonschema.validate(service, schema)
    with pytest.raises(jsonschema.ValidationError):  # the strictness is real
        jsonschema.validate({**service, "spec": {**service["spec"], "serveConfig": "x"}}, schema)

    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (application,) = serve_config.applications
    assert application.import_path == "cluster.app:build"
    args = ClusterArgs.model_validate(application.args)
    assert args.num_gpus == 1 and args.max_replicas > args.min_replicas
    build(args)  # the app builds from exactly these args
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True
    (workers,) = cluster["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert str(limits["nvidia.com/gpu"]) == "1"
    assert workers["maxReplicas"] >= args.max_replicas


def test_the_plain_manifests_expose_only_the_front():
    (deployment,) = [d for d in documents("kubernetes.yaml") if d["kind"] == "Deployment"]
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert set(containers) == {"front", "cog"}
    front, cog = containers["front"], containers["cog"]
    assert front["command"][:3] == ["python", "-m", "front"] and "http://127.0.0.1:5001" in front["command"]
    assert cog["command"] == ["python", "-m", "cog.server.http", "--host", "127.0.0.1"]
    assert "ports" not in cog and {e["name"]: e.get("value") for e in cog["env"]}["PORT"] == "5001"
    (service,) = [d for d in documents("kubernetes.yaml") if d["kind"] == "Service"]
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http" and [p["name"] for p in front["ports"]] == ["http"]
    tokens = {e["name"]: e for e in front["env"]}["API_TOKENS"]
    assert tokens["valueFrom"]["secretKeyRef"]["name"] == "flux-lora"  # from a Secret, never inline


def test_the_rayservice_exposes_only_the_front_and_keeps_secrets_in_secrets():
    (service,) = documents("rayservice.yaml")
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] not in ("0.0.0.0", "::")
    env = {e["name"]: e for e in head["template"]["spec"]["containers"][0]["env"]}
    for name in ("API_TOKENS", "PREDICTION_STORE"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "flux-lora"
    config = service["spec"]["serveConfigV2"]
    assert "token" not in config.lower() and "redis://" not in config
    (application,) = yaml.safe_load(config)["applications"]
    assert application["route_prefix"] == "/" and application["import_path"] == "cluster.app:build"


def test_the_probes_read_the_health_checks_status(cog_server):
    cog_server.wait_for("READY")
    (deployment,) = [d for d in documents("kubernetes.yaml") if d["kind"] == "Deployment"]
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    startup, readiness = containers["front"]["startupProbe"], containers["front"]["readinessProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60  # weights download + compile
    for probe in (startup, readiness, containers["cog"]["startupProbe"]):
        command = [sys.executable if part == "python" else part for part in probe["exec"]["command"]]
        env = {**os.environ, "PORT": str(cog_server.port)}
        assert subprocess.run(command, env=env, timeout=30).returncode == 0  # READY
        env["PORT"] = str(free_port())  # nothing listens there
        assert subprocess.run(command, env=env, timeout=30).returncode != 0


def test_the_ray_image_installs_the_cluster_extra():
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cluster"]
    dockerfile = (DEPLOY / "ray.Dockerfile").read_text()
    for requirement in extra:
        assert f'"{requirement}"' in dockerfile, f"deploy/ray.Dockerfile does not install {requirement}"
    packages = yaml.safe_load((ROOT / "cog.yaml").read_text())["build"]["python_packages"]
    assert not [p for p in packages if p.split("[")[0].split("=")[0] == "ray"], "the Cog image has no Ray"
