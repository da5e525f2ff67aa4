"""Run the public front (`python -m front`, as `make serve` does) with its Cog server, over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from tests.cog_server import OFFLINE, ROOT, free_port


class FrontServer:
    """`python -m front` on 127.0.0.1 (its Cog server on another loopback port), started like `make serve`."""

    def __init__(self, weights: Path, *, env: dict[str, str] | None = None, state_dir: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="front-", suffix=".log", delete=False)
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="front-state-"))
        self.env = {
            **os.environ,
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "FLUX_WEIGHTS_DIR": str(weights),
            "FRONT_STATE_DIR": str(self.state_dir),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        paths = [str(OFFLINE), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
        self.env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> FrontServer:
        self.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.stop()
        if exc_type is None and not os.environ.get("KEEP_COG_LOGS"):
            self.log.close()
            Path(self.log.name).unlink(missing_ok=True)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "front"],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL the front alone (its Cog server dies with it: parent-death signal)."""
        self.process.kill()
        self.process.wait()

    def logs(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def cog_pid(self) -> int:
        """The Cog server (coglet) the front started."""
        import psutil

        for child in psutil.Process(self.process.pid).children():
            if "cog.server.http" in " ".join(child.cmdline()):
                return child.pid
        raise RuntimeError("the front has no Cog server")

    def wait_ready(self, timeout: float = 180, headers: dict | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the front exited ({self.process.returncode}):\n{self.logs()[-3000:]}")
            try:
                if requests.get(self.url + "/health-check", timeout=5).json().get("status") == "READY":
                    return
            except (requests.ConnectionError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the front never became READY:\n{self.logs()[-3000:]}")

    def post(self, body: dict, *, headers: dict | None = None, timeout: float = 120) -> requests.Response:
        return requests.post(self.url + "/predictions", json=body, headers=headers, timeout=timeout)

    def get(self, prediction_id: str, *, headers: dict | None = None) -> requests.Response:
        return requests.get(f"{self.url}/predictions/{prediction_id}", headers=headers, timeout=30)

    def wait_done(self, prediction_id: str, *, headers: dict | None = None, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.get(prediction_id, headers=headers).json()
            if record.get("status") in ("succeeded", "failed", "canceled"):
                return record
            time.sleep(0.1)
        raise TimeoutError(f"{prediction_id} did not end in {timeout} s")
