"""5. Scaling out: LoRA-affinity routing against Ray's plain routing, side by side (cluster/).

A skewed stream (Zipf, s = 1.1) of 200 requests over 10 LoRAs, sent by as many concurrent
clients as there are replicas (3, each an unmodified Cog server on the tiny weights), each replica
keeping at most LORAS_IN_MEMORY parsed LoRAs (LORA_MEMORY_MAX_BYTES) and advertising as many to
Ray's router. The LoRA files come from a local host that waits DOWNLOAD_S before each answer, a
stand-in for fetching a real 50–300 MB LoRA (the tiny model's are a few KB). Both variants run on
fresh replicas (cold caches) in one Ray instance, one after the other, with the same stream.

Then a list-heavy stream over 10 other LoRAs (`<variant>_lists`): each request names a Zipf-drawn
LoRA, and most also one or two more, as an `extra_lora` list with scales (`A:0.8, B:0.5`), so the
same LoRA comes in many combinations; routing by each LoRA (ours) finds a replica holding some of
them, routing by the whole list (Ray's multiplexing) only one that served that exact list.

Counted: downloads (GETs at the host) and parses (lines "parsed N layers" in the responses' logs,
after a download or from a replica's disk cache), per 100 requests; latency p50/p95 at the client.

    .venv/bin/python bench/run.py --only cluster
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import random
import re
import socket
import statistics
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
REPLICAS = 3
LORAS = 10
LORAS_IN_MEMORY = 3
ADVERTISED = LORAS_IN_MEMORY  # LoRA ids each replica is routed by (loras_per_replica)
DOWNLOAD_S = 1.0
ZIPF_S = 1.1
PARSED = re.compile(r"LoRA .*: parsed \d+ layers")  # lora_loader's line for a LoRA read from its file
VARIANTS = {  # ClusterArgs for each routing, in the order they run
    "affinity": {"affinity": True},  # ours: LoraAffinityRouter (waits up to affinity_wait_s for a LoRA's replica)
    "ray_multiplex": {"affinity": True, "affinity_wait_s": 0},  # Ray's own multiplexed routing
    "plain": {"affinity": False},  # Ray's power-of-two choices, no LoRA id
}
SMALL = {"aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 1}


class FileHost:
    """Files on 127.0.0.1 whose answers each start `delay_s` after the request; counts GETs per name."""

    def __init__(self, files: dict[str, bytes], delay_s: float = 0.0):
        self.files, self.delay_s = files, delay_s
        self.gets: Counter[str] = Counter()
        self._lock = threading.Lock()
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/").split("?")[0]
                with host._lock:
                    host.gets[name] += 1
                time.sleep(host.delay_s)
                data = host.files.get(name)
                self.send_response(200 if data is not None else 404)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                self.wfile.write(data or b"")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def url(self, name: str) -> str:
        return self.base + name

    def __enter__(self) -> FileHost:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


def zipf_stream(count: int, n: int, s: float, seed: int = 0) -> list[int]:
    weights = [1 / (k**s) for k in range(1, n + 1)]
    return random.Random(seed).choices(range(n), weights=weights, k=count)


def list_stream(count: int, n: int, s: float, seed: int = 1) -> list[tuple[int, ...]]:
    """Requests naming 1 (20 %), 2 (50 %) or 3 (30 %) distinct Zipf-drawn LoRAs."""
    rng = random.Random(seed)
    weights = [1 / (k**s) for k in range(1, n + 1)]
    stream = []
    for _ in range(count):
        size = rng.choices((1, 2, 3), weights=(2, 5, 3))[0]
        picks: list[int] = []
        while len(picks) < size:
            pick = rng.choices(range(n), weights=weights)[0]
            if pick not in picks:
                picks.append(pick)
        stream.append(tuple(picks))
    return stream


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, replicas: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/health-check", timeout=10).json().get("replicas", {}).get("READY", 0) >= replicas:
                return
        except (requests.ConnectionError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{replicas} replicas were not READY after {timeout} s")


def _stream(url: str, host: FileHost, picks: list[tuple[int, ...]], clients: int, prefix: str = "lora") -> dict:
    def one(i: int) -> tuple[float, int, str]:  # latency, LoRAs parsed, replica
        sources = [host.url(f"{prefix}{k}.safetensors") for k in picks[i]]
        if len(sources) > 1:
            sources = [f"{source}:{scale}" for source, scale in zip(sources, (0.8, 0.5, 0.3), strict=False)]
        inputs = {"prompt": f"bench {i}", "seed": i, "extra_lora": ", ".join(sources), **SMALL}
        started = time.monotonic()
        answer = requests.post(url + "/predictions", json={"input": inputs}, timeout=300)
        took = time.monotonic() - started
        body = answer.json()
        if answer.status_code != 200 or body.get("status") != "succeeded":
            raise RuntimeError(f"request {i}: {answer.status_code} {str(body)[:300]}")
        return took, len(PARSED.findall(body.get("logs") or "")), answer.headers.get("X-Cluster-Replica", "")

    host.gets.clear()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(len(picks))))
    wall = time.monotonic() - started
    latencies = [took for took, _, _ in results]
    per_100 = 100 / len(picks)
    downloads = sum(host.gets.values())
    parses = sum(parsed for _, parsed, _ in results)
    return {
        "requests": len(picks),
        "wall_s": wall,
        "downloads_per_100": downloads * per_100,
        "parses_per_100": parses * per_100,
        "p50_s": statistics.median(latencies),
        "p95_s": percentile(latencies, 95),
        "replicas_used": len({r for _, _, r in results}),
        "latencies_s": latencies,
        "requests_detail": [  # (LoRA, replica, parsed it, seconds), in stream order
            (picks[i], replica, parsed, round(took, 3)) for i, (took, parsed, replica) in enumerate(results)
        ],
    }


def run(tree: Path, *, quick: bool = False, count: int = 200, replicas: int = REPLICAS) -> dict:
    from tests.cog_server import scaled_lora

    count = 60 if quick else count
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    import ray
    from ray import serve
    from safetensors.torch import load as load_tensors

    from cluster.app import build

    files = {f"lora{k}.safetensors": scaled_lora(tree, 1.0 + 0.25 * k) for k in range(LORAS)}
    one_lora = sum(t.nbytes for t in load_tensors(next(iter(files.values()))).values())  # as parsed in memory
    files |= {f"list{k}.safetensors": scaled_lora(tree, -1.0 - 0.25 * k) for k in range(LORAS)}
    picks = [(k,) for k in zipf_stream(count, LORAS, ZIPF_S)]
    lists = list_stream(count, LORAS, ZIPF_S)
    token = Path.home() / ".ray" / "auth_token"
    token_existed = token.exists()
    results: dict = {
        "replicas": replicas,
        "loras": LORAS,
        "loras_in_memory": LORAS_IN_MEMORY,
        "download_s": DOWNLOAD_S,
        "zipf_s": ZIPF_S,
        "clients": replicas,
        "stream": dict(Counter(k for (k,) in picks).most_common()),
        "list_sizes": dict(Counter(len(request) for request in lists)),
    }
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with FileHost(files, DOWNLOAD_S) as host, tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        ray.init(include_dashboard=False, _temp_dir=str(Path(tmp) / "ray"), logging_level=logging.WARNING)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
            for name, routing in VARIANTS.items():
                args = {
                    "num_replicas": replicas,
                    "num_gpus": 0,
                    "num_cpus": 0.5,
                    "max_queued_requests": 4 * count,
                    "loras_per_replica": ADVERTISED,
                    **routing,
                    "cog_host": "127.0.0.1",
                    "work_dir": str(Path(tmp) / name),
                    "log_dir": str(Path(tmp) / f"{name}-logs"),
                    "graceful_shutdown_timeout_s": 5,
                    # Room for LORAS_IN_MEMORY parsed LoRAs and no more.
                    "env": {
                        "FLUX_WEIGHTS_DIR": str(tree),
                        "LORA_ALLOW_PRIVATE_URLS": "1",
                        "LORA_MEMORY_MAX_BYTES": str(int(one_lora * (LORAS_IN_MEMORY + 0.5))),
                        "LOG_LEVEL": "INFO",
                    },
                }
                started = time.monotonic()
                serve.run(build(args), name=name, route_prefix="/")
                _wait_ready(url, replicas)
                logger.info("cluster bench: %s, %d replicas up in %.0f s", name, replicas, time.monotonic() - started)
                results[name] = _stream(url, host, picks, clients=replicas)
                results[f"{name}_lists"] = _stream(url, host, lists, clients=replicas, prefix="list")
                serve.delete(name)
        finally:
            serve.shutdown()
            ray.shutdown()
            if not token_existed:
                token.unlink(missing_ok=True)
    if {"affinity", "ray_multiplex", "plain"} <= results.keys():
        a, m, p = (results[name] for name in ("affinity", "ray_multiplex", "plain"))
        results["ratios"] = {
            "loads plain / affinity": p["parses_per_100"] / max(a["parses_per_100"], 1e-9),
            "loads ray_multiplex / affinity": m["parses_per_100"] / max(a["parses_per_100"], 1e-9),
            "downloads plain / affinity": p["downloads_per_100"] / max(a["downloads_per_100"], 1e-9),
            "p95 affinity / plain": a["p95_s"] / p["p95_s"],
        }
        a, m, p = (results[f"{name}_lists"] for name in ("affinity", "ray_multiplex", "plain"))
        results["ratios_lists"] = {
            "loads plain / affinity": p["parses_per_100"] / max(a["parses_per_100"], 1e-9),
            "loads ray_multiplex / affinity": m["parses_per_100"] / max(a["parses_per_100"], 1e-9),
            "downloads plain / affinity": p["downloads_per_100"] / max(a["downloads_per_100"], 1e-9),
            "p95 affinity / plain": a["p95_s"] / p["p95_s"],
        }
    return results
