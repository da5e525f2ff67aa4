"""CogReplica: one unmodified Cog server (coglet) for this project per Ray Serve replica.

The replica starts `python -m cog.server.http` from the project root on a free port of its node
(the venv's `bin` first on PATH, COG_PREDICT_TYPE_STUB=predict.py:Predictor, PORT), waits for
READY, and forwards each request's method, path, headers and body to it, answering Cog's status,
headers and body unchanged. So validation, webhooks, uploads, errors and the schema are Cog's own.

It serves one request at a time (`max_ongoing_requests=1`, set in app.py). `forward` is a stream:
first `Placed` (which Cog server took the request, so the ingress can send a cancel there), then
Cog's `Answer`; for an async prediction (`hold`) the stream stays open until the prediction ends,
which keeps this replica's one slot taken so Ray routes nothing else to it meanwhile.

The LoRA ids (routing.py) of the requests it served are advertised to Ray's router through
`@serve.multiplexed` (`loras_per_replica` of them, least recently used first out); the LoRA work
itself (download, parse, cache) is the Cog server's, in a LORA_CACHE_DIR of this replica's own.
`check_health` fails when the Cog server has exited or reports SETUP_FAILED: Ray replaces it.
The Cog server dies with its replica, however the replica dies (child_process.die_with_parent).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import psutil
import ray
from ray import serve

from child_process import die_with_parent
from cluster.routing import lora_ids

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent  # the project: predict.py, .cog/openapi_schema.json
REGISTER_EVERY_S = 30.0  # how often a replica tells the ingress where its Cog server is (again)
# Headers that belong to one hop, or that the sending side recomputes; the rest pass through unchanged.
HOP_HEADERS = frozenset(
    "connection keep-alive proxy-authenticate proxy-authorization te trailer transfer-encoding upgrade "
    "host content-length date server accept-encoding serve_multiplexed_model_id".split()
)


def end_to_end(headers) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in headers if k.lower() not in HOP_HEADERS)


@dataclass(frozen=True)
class ReplicaSettings:
    """What every replica needs to know; built by app.build() from ClusterArgs."""

    work_dir: str  # each replica works in <work_dir>/replica-<id>/ (LoRA cache, TMPDIR), removed at its end
    env: dict[str, str] = field(default_factory=dict)  # added to the Cog server's environment
    upload_url: str | None = None  # Cog's --upload-url
    loras_per_replica: int = 8  # LoRA ids a replica advertises to the router
    setup_timeout_s: float = 1800.0  # Cog start + setup(); on a GPU it compiles for minutes
    busy_retry_s: float = 30.0  # how long a 409 from our own Cog server is retried (it frees its slot late)
    log_dir: str | None = None  # Cog server logs to <log_dir>/<replica>.log; None: the replica's own output
    ingress: str = "CogIngress"  # the ingress deployment's name, to register with
    cog_host: str | None = None  # where Cog servers listen; None: the node's address (the ingress may be elsewhere)


@dataclass(frozen=True)
class Forward:
    """One HTTP request for the Cog server."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    hold: bool = False  # an async prediction: keep this replica until it ends
    progress: bool = False  # a prediction whose progress the caller follows (Progress items in the stream)


@dataclass(frozen=True)
class Placed:
    replica: str
    url: str  # the Cog server, reachable from the ingress's node


@dataclass(frozen=True)
class Answer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True)
class Progress:
    """What the Cog server reported of a running prediction (its webhook payload: logs, metrics)."""

    payload: dict


class ProgressReceiver:
    """Cog's webhooks for this replica's predictions, on a loopback port of the replica's own (the
    Cog server runs beside it): `POST /<id>` bodies are queued for that prediction's stream."""

    def __init__(self):
        self.queues: dict[str, asyncio.Queue] = {}
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        if self.server is None:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            lines = request.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 1 else ""
            length = next(
                (int(v) for k, _, v in (x.partition(":") for x in lines[1:]) if k.lower() == "content-length"), 0
            )
            body = await asyncio.wait_for(reader.readexactly(min(length, 16 << 20)), timeout=10)
            queue = self.queues.get(path.strip("/"))
            if queue is not None:
                with contextlib.suppress(ValueError):
                    queue.put_nowait(json.loads(body))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ValueError, OSError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class CogUnavailable(RuntimeError):
    """The replica's Cog server is gone and the request never reached it: safe to send elsewhere."""


class CogSetupFailed(RuntimeError):
    def __init__(self, message: str, health: dict | None = None):
        super().__init__(message)
        self.health = health or {}


def _node_address() -> str:
    """The address Ray knows this node by, where the ingress (maybe on another node) reaches its Cog servers."""
    node_id = ray.get_runtime_context().get_node_id()
    return next(node["NodeManagerAddress"] for node in ray.nodes() if node["NodeID"] == node_id)


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class CogProcess:
    """`python -m cog.server.http` for this project, as `make serve` and the container run it."""

    def __init__(self, host: str, folder: Path, settings: ReplicaSettings, log_path: Path | None):
        self.host, self.folder, self.settings, self.log_path = host, folder, settings, log_path
        self.process: subprocess.Popen | None = None
        self.url = ""

    def environment(self, port: int) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)  # coglet starts its worker as plain `python`
        return {
            **os.environ,
            **self.settings.env,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
            "PORT": str(port),
            "LORA_CACHE_DIR": str(self.folder / "lora-cache"),
            "TMPDIR": str(self.folder / "tmp"),
            "PYTHONUNBUFFERED": "1",
        }

    def start(self) -> None:
        (self.folder / "tmp").mkdir(parents=True, exist_ok=True)
        port = free_port(self.host)
        args = [sys.executable, "-m", "cog.server.http", "--host", self.host]
        if self.settings.upload_url:
            args += ["--upload-url", self.settings.upload_url]
        output = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 (the child keeps it)
        try:
            # Killed by the kernel when the replica dies, however it dies (its worker exits with it);
            # started from the replica's event loop thread, which lives as long as the replica.
            self.process = subprocess.Popen(
                args,
                cwd=ROOT,
                env=self.environment(port),
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
                preexec_fn=die_with_parent,
            )
        finally:
            if output:
                output.close()
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{port}"
        logger.info("Cog server pid %d on %s", self.process.pid, self.url)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def wait_ready(self, client: httpx2.AsyncClient, timeout: float) -> dict:
        """Cog's /health-check once READY; CogSetupFailed if setup failed, the server exited or timed out."""
        deadline = time.monotonic() + timeout
        health: dict = {}
        while time.monotonic() < deadline:
            if not self.running:
                raise CogSetupFailed(f"the Cog server exited with {self.process.returncode} before READY", health)
            try:
                health = (await client.get(self.url + "/health-check", timeout=5)).json()
            except (httpx2.TransportError, ValueError):
                health = health or {}
            status = health.get("status")
            if status == "READY":
                return health
            if status == "SETUP_FAILED":
                logs = (health.get("setup") or {}).get("logs") or ""
                raise CogSetupFailed(f"Cog setup failed: {logs.strip()[-2000:]}", health)
            await asyncio.sleep(0.2)
        last = health.get("status")
        raise CogSetupFailed(f"the Cog server was not READY after {timeout:.0f} s (last: {last})", health)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the server (it stops its worker, whose exit handlers clean up), waiting for both;
        SIGKILL for what is left after `timeout`. Idempotent."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            server = psutil.Process(self.process.pid)
            processes = [server, *server.children(recursive=True)]
        except psutil.NoSuchProcess:
            processes = []
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        _, alive = psutil.wait_procs(processes, timeout=max(0.1, timeout / 2))
        for process in alive:
            process.kill()
        self.process.wait()


@serve.deployment
class CogReplica:
    async def __init__(self, settings: ReplicaSettings):
        context = serve.get_replica_context()
        self.name = context.replica_id.unique_id
        self.app_name = context.app_name
        self.settings = settings
        self.folder = Path(settings.work_dir) / f"replica-{self.name}"
        log_path = Path(settings.log_dir) / f"{self.name}.log" if settings.log_dir else None
        if log_path:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        self.client = httpx2.AsyncClient(timeout=httpx2.Timeout(None, connect=10.0))
        self.progress = ProgressReceiver()
        self.cog = CogProcess(settings.cog_host or _node_address(), self.folder, settings, log_path)

        async def holds_lora(model_id: str) -> str:
            """The multiplexed "model": the Cog server does the LoRA work; Serve advertises the id."""
            return model_id

        # A function of this replica's own: Serve keeps the LRU of the ids it holds on it.
        self.holds_lora = serve.multiplexed(max_num_models_per_replica=settings.loras_per_replica)(holds_lora)
        self._registration: asyncio.Task | None = None
        try:
            self.cog.start()
            await self.cog.wait_ready(self.client, settings.setup_timeout_s)
        except CogSetupFailed as failure:
            logger.error("replica %s: %s", self.name, failure)
            await self._report_setup_failure(failure.health or {"status": "SETUP_FAILED", "error": str(failure)})
            self._close()
            raise
        self._registration = asyncio.create_task(self._register_forever())

    # ---- requests

    async def forward(self, request: Forward):
        for lora in lora_ids(serve.get_multiplexed_model_id()):
            await self.holds_lora(lora)
        yield Placed(self.name, self.cog.url)
        if request.progress:
            async for item in self._with_progress(request):
                yield item
            return
        answer = await self._send(request)
        yield answer
        if request.hold and answer.status == 202:
            await self._until_idle()

    async def _with_progress(self, request: Forward):
        """`request` (a prediction PUT) with a webhook to this replica's receiver: Progress items
        while it runs, then its Answer."""
        await self.progress.start()
        body = json.loads(request.body)
        key = secrets.token_hex(16)
        body["webhook"] = f"{self.progress.url}/{key}"
        queue = self.progress.queues[key] = asyncio.Queue()
        sent = dataclasses.replace(request, body=json.dumps(body).encode())
        answer = asyncio.ensure_future(self._send(sent))
        try:
            while not answer.done():
                waiting = asyncio.ensure_future(queue.get())
                await asyncio.wait([answer, waiting], return_when=asyncio.FIRST_COMPLETED)
                if waiting.done():
                    yield Progress(waiting.result())
                else:
                    waiting.cancel()
            yield answer.result()
        finally:
            answer.cancel()
            self.progress.queues.pop(key, None)

    async def _send(self, request: Forward) -> Answer:
        deadline = time.monotonic() + self.settings.busy_retry_s
        while True:
            if not self.cog.running:
                raise CogUnavailable(f"replica {self.name}: its Cog server exited ({self.cog.process.returncode})")
            try:
                response = await self.client.request(
                    request.method, self.cog.url + request.path, headers=list(request.headers), content=request.body
                )
            except httpx2.ConnectError as error:
                raise CogUnavailable(f"replica {self.name}: its Cog server refused the connection") from error
            # Nothing else runs on this Cog server, so a 409 is its slot being freed a moment late.
            if response.status_code == 409 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                continue
            return Answer(response.status_code, end_to_end(response.headers.items()), response.content)

    async def _until_idle(self) -> None:
        """Wait while the Cog server is BUSY with the async prediction it accepted (or until it is gone)."""
        while self.cog.running:
            try:
                status = (await self.client.get(self.cog.url + "/health-check", timeout=10)).json().get("status")
            except (httpx2.TransportError, ValueError):
                status = None
            if status != "BUSY":
                return
            await asyncio.sleep(0.1)

    # ---- health, registration, shutdown

    async def check_health(self) -> None:
        if not self.cog.running:
            raise RuntimeError(f"replica {self.name}: its Cog server exited ({self.cog.process.returncode})")
        health = (await self.client.get(self.cog.url + "/health-check", timeout=10)).json()
        if health.get("status") == "SETUP_FAILED":
            raise RuntimeError(f"replica {self.name}: its Cog server reports SETUP_FAILED")

    async def _register_forever(self) -> None:
        ingress = serve.get_deployment_handle(self.settings.ingress, app_name=self.app_name)
        while True:
            try:
                await ingress.register.remote(self.name, self.cog.url)
            except Exception as error:  # the ingress restarting: the next round registers again
                logger.warning("replica %s: could not register with the ingress: %s", self.name, error)
            await asyncio.sleep(REGISTER_EVERY_S)

    async def _report_setup_failure(self, health: dict) -> None:
        try:
            ingress = serve.get_deployment_handle(self.settings.ingress, app_name=self.app_name)
            await asyncio.wait_for(ingress.setup_failed.remote(self.name, health), timeout=10)
        except Exception as error:
            logger.warning("replica %s: could not report its setup failure: %s", self.name, error)

    def _close(self) -> None:
        if getattr(self, "_registration", None):
            self._registration.cancel()
            try:  # sent, not awaited: the ingress also drops replicas that stop registering
                serve.get_deployment_handle(self.settings.ingress, app_name=self.app_name).unregister.remote(self.name)
            except Exception as error:
                logger.info("replica %s: could not unregister: %s", self.name, error)
        if getattr(self, "progress", None):
            self.progress.close()
        if getattr(self, "cog", None):
            self.cog.stop()
        if getattr(self, "folder", None):
            shutil.rmtree(self.folder, ignore_errors=True)

    def __del__(self):
        """Serve calls this when it stops the replica (scale-down, replacement, shutdown)."""
        self._close()
