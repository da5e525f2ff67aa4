"""Run the real Cog HTTP server (coglet) as the container does, and talk to it over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


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
        self.args = [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1", *extra_args]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> CogServer:
        self.process = subprocess.Popen(
            self.args, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
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
