"""Run the real Cog HTTP server (coglet) as the container does, and talk to it over HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = ROOT / "tests" / "offline"  # its sitecustomize.py: no outside network, optional fault injection


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CogServer:
    """`python -m cog.server.http` on 127.0.0.1, started from the project root like `make serve`."""

    def __init__(self, weights: Path, *, extra_args: list[str] = (), env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="cog-server-", suffix=".log", delete=False)
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),  # coglet starts its worker as `python`
            "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
            "PORT": str(self.port),
            "FLUX_WEIGHTS_DIR": str(weights),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        # The offline guard first, in the server and its worker, whatever PYTHONPATH the caller adds.
        paths = [str(OFFLINE), *(env or {}).get("PYTHONPATH", "").split(os.pathsep)]
        paths += os.environ.get("PYTHONPATH", "").split(os.pathsep)
        self.env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path for path in paths if path))
        self.args = [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1", *extra_args]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> CogServer:
        self.process = subprocess.Popen(
            self.args, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.stop()
        # The log is kept when the block failed (or with KEEP_COG_LOGS=1), so that runs do not fill /tmp.
        if exc_type is None and not os.environ.get("KEEP_COG_LOGS"):
            self.log.close()
            Path(self.log.name).unlink(missing_ok=True)

    def stop(self, timeout: float = 15) -> None:
        """Stop it as Docker, Kubernetes and tini stop a container: SIGTERM to the server alone, which
        shuts its worker down (so the worker's exit handlers run); waits for both, and kills whatever
        of them is still there after `timeout` seconds."""
        import psutil

        if self.process is None or self.process.poll() is not None:
            return
        try:
            processes = [psutil.Process(self.process.pid)]
            processes += processes[0].children(recursive=True)
        except psutil.NoSuchProcess:
            processes = []
        self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None or any(map(_running, processes)):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for process in filter(_running, processes):
            process.kill()
        self.process.wait()

    def logs(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def health(self) -> dict:
        return requests.get(self.url + "/health-check", timeout=5).json()

    def wait_for(self, *statuses: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cog server exited ({self.process.returncode}):\n{self.logs()[-3000:]}")
            try:
                health = self.health()
                if health["status"] in statuses:
                    return health
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"cog server never became {statuses}:\n{self.logs()[-3000:]}")

    def predict(self, inputs: dict, *, headers: dict | None = None, timeout: float = 120, **body):
        """POST /predictions; retries Cog's brief 409 right after a previous answer (FACTS.md)."""
        self.wait_for("READY")
        for _ in range(50):
            response = requests.post(
                self.url + "/predictions", json={"input": inputs, **body}, headers=headers, timeout=timeout
            )
            if response.status_code != 409:
                return response
            time.sleep(0.1)
        return response

    # ---- additions for the HTTP contract, fault, soak and fuzz tests

    def predict_async(self, prediction_id: str, inputs: dict, *, webhook: str | None = None, **body):
        """PUT /predictions/{id} with `Prefer: respond-async` (202 once accepted; results go to the webhook)."""
        payload = {"id": prediction_id, "input": inputs, **body}
        if webhook:
            payload["webhook"] = webhook
        return requests.put(
            f"{self.url}/predictions/{prediction_id}", json=payload, headers={"Prefer": "respond-async"}, timeout=30
        )

    def cancel(self, prediction_id: str) -> requests.Response:
        return requests.post(f"{self.url}/predictions/{prediction_id}/cancel", timeout=30)

    def worker(self):
        """The worker process (a psutil.Process): the child that runs setup() and predictions."""
        import psutil

        for child in psutil.Process(self.process.pid).children(recursive=True):
            if "_run_worker" in " ".join(child.cmdline()):
                return child
        raise RuntimeError("the cog server has no worker process")

    def log_events(self) -> list[dict]:
        """coglet's structured log lines (JSON), in order; other lines are skipped."""
        events = []
        for line in self.logs().splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass
        return events

    def started_predictions(self) -> list[str]:
        """Ids of every prediction coglet handed to the worker ("Starting prediction")."""
        return [
            e["fields"].get("prediction_id")
            for e in self.log_events()
            if e.get("fields", {}).get("message") == "Starting prediction"
        ]


def _running(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_bytes(size=(64, 64), mode: str = "RGB", color=(200, 10, 10), fmt: str = "PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.new(mode, size, color if mode in ("RGB", "RGBA") else 128)
    image.save(buffer, fmt)
    return buffer.getvalue()


def decode_data_uri(uri: str):
    """(mime type, bytes) of a data URI from a prediction's output."""
    match = re.match(r"data:([^;,]+)(;base64)?,(.*)", uri, re.S)
    assert match, uri[:80]
    assert match.group(2), "outputs are base64 data URIs"
    return match.group(1), base64.b64decode(match.group(3))


def report(request, line: str) -> None:
    """Show a measured figure in the pytest output even under -q and output capture."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"\n[{request.node.name}] {line}")


def scaled_lora(tiny_weights: Path, factor: float) -> bytes:
    """The tiny tree's own LoRA with its up-projections scaled: a valid, visibly different LoRA."""
    from safetensors.torch import load_file, save

    tensors = load_file(str(tiny_weights / "lora.safetensors"))
    return save({k: v * factor if "lora_B" in k else v for k, v in tensors.items()})
