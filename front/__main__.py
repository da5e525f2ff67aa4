"""`python -m front` (`make serve`): the public front on $HOST:$PORT, with one Cog server behind it.

The Cog server (`python -m cog.server.http`, exactly as the container runs it) is started here on
127.0.0.1 at `COG_PORT` (default: a free port), in a process group of its own that dies with this
process (Linux parent-death signal), and is restarted if it exits. `--cog-url URL` uses a Cog
server that runs elsewhere on a private address instead (Kubernetes: the pod's other container on
127.0.0.1). SIGINT or SIGTERM: the front stops taking requests, fails what is still queued (the
webhooks hear it), stops the Cog server (SIGTERM, then SIGKILL after 15 s) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import uvicorn

from child_process import die_with_parent
from front.app import create_app
from front.backend import CogBackend
from front.settings import FrontSettings

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("front")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CogProcess:
    """Cog's server on 127.0.0.1:`port`, run from the project root like the container runs it."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        bin_dir = str(Path(sys.executable).parent)  # coglet starts its worker as plain `python`
        self.env = {
            **os.environ,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "COG_PREDICT_TYPE_STUB": os.environ.get("COG_PREDICT_TYPE_STUB", "predict.py:Predictor"),
            "PORT": str(port),
        }
        self.process: subprocess.Popen | None = None
        self.stopping = False

    def start(self) -> None:
        args = [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"]
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=self.env, start_new_session=True, preexec_fn=die_with_parent
        )
        logger.info("Cog server starting on %s (pid %d), reachable from this machine only", self.url, self.process.pid)

    async def supervise(self) -> None:
        """Restart the Cog server when it exits (with a growing pause, at most 30 s)."""
        pause = 1.0
        while not self.stopping:
            await asyncio.sleep(0.5)
            if self.process is not None and self.process.poll() is not None and not self.stopping:
                logger.error("the Cog server exited (%s): restarting it in %.0f s", self.process.returncode, pause)
                self._kill_group()
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30.0)
                if not self.stopping:
                    self.start()

    def stop(self, timeout: float = 15.0) -> None:
        self.stopping = True
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        self._kill_group()
        self.process.wait()

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m front", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cog-url", default=None, help="a Cog server already running (default: start one here)")
    options = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per request to the Cog server
    settings = FrontSettings.from_env()
    cog = None
    if options.cog_url is None:
        cog = CogProcess(int(os.environ.get("COG_PORT") or _free_port()))
        cog.start()
    cog_url = options.cog_url or cog.url

    async def backend(events_url):
        return CogBackend(cog_url, events_url)

    app = create_app(settings, backend)
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=30)
    )

    async def serve() -> None:
        supervisor = asyncio.ensure_future(cog.supervise()) if cog else None
        logger.info("front listening on %s:%d", settings.host, settings.port)
        try:
            await server.serve()
        finally:
            if supervisor:
                supervisor.cancel()

    # uvicorn handles SIGINT/SIGTERM (stop accepting, finish open requests, lifespan shutdown: the
    # predictions drain) and raises the signal again once done: a handler of ours then turns it into
    # a normal return, so that the Cog server is stopped cleanly below.
    stopped_by: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stopped_by.append(signum))
    started = time.monotonic()
    try:
        asyncio.run(serve())
    finally:
        if cog:
            cog.stop()
        logger.info("front stopped after %.0f s", time.monotonic() - started)


if __name__ == "__main__":
    main()
