"""`python -m cluster` (`make serve-cluster`): a local Ray instance and the app, in the foreground.

    python -m cluster --replicas 2 --port 5000          # fixed: 2 replicas (one GPU each where Ray finds GPUs)
    python -m cluster --min-replicas 1 --max-replicas 4 # autoscaling

Ray, its Serve proxy (the Cog HTTP API on --host:--port) and the replicas (each one Cog server)
all run on this machine, the Cog servers on 127.0.0.1. This process supervises a child that is
Ray's driver (a driver exits by itself when raylet dies). Ctrl-C or SIGTERM, to this process or to
its process group, stops everything this started within 20 s, whatever order the signals reach
Ray's own processes in: the driver stops the app (each replica stops its Cog server and removes
its folder; up to 8 s), then Ray (up to 4 s); then this process ends whatever it started that is
still running (SIGTERM, SIGKILL 3 s later), found because it remembers every process from the
start and adopts the orphans (a child subreaper). A second Ctrl-C skips the waiting. On a Ray
cluster of your own, run `serve run cluster.app:build …` instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from child_process import become_subreaper, die_with_parent

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("cluster")
SERVE_SHUTDOWN_S = 8.0  # the replicas stop their Cog servers (a running prediction is not waited for)
RAY_SHUTDOWN_S = 4.0
DRIVER_STOP_S = SERVE_SHUTDOWN_S + RAY_SHUTDOWN_S + 1.0  # then what is left is ended (3 s, SIGKILL 2 s after)


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=None, help="a fixed number of replicas (default 2)")
    parser.add_argument("--min-replicas", type=int, default=None, help="autoscaling: the fewest replicas")
    parser.add_argument("--max-replicas", type=int, default=None, help="autoscaling: the most replicas")
    parser.add_argument("--host", default="0.0.0.0", help="where the HTTP API listens (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "5000")), help="default $PORT or 5000")
    parser.add_argument("--num-gpus", type=float, default=None, help="per replica (default: 1 if Ray finds GPUs)")
    parser.add_argument("--num-cpus", type=float, default=None, help="per replica (default: 1 with GPUs, else a share)")
    parser.add_argument("--max-queued-requests", type=int, default=64)
    parser.add_argument("--retry-after-s", type=float, default=5)
    parser.add_argument("--loras-per-replica", type=int, default=8)
    parser.add_argument("--no-affinity", action="store_true", help="Ray's plain routing (no LoRA affinity)")
    parser.add_argument("--affinity-wait-s", type=float, default=2.0, help="wait for a replica holding the LoRA")
    parser.add_argument("--upload-url", default=None, help="each Cog server's --upload-url")
    parser.add_argument("--work-dir", default=None, help="replica folders (default: a new one in $TMPDIR, removed)")
    parser.add_argument("--log-dir", default=None, help="one Cog server log per replica (default: this output)")
    parser.add_argument("--health-check-period-s", type=float, default=10)
    parser.add_argument(
        "--graceful-shutdown-timeout-s", type=float, default=1200, help="a replica scaled down finishes its prediction"
    )
    parser.add_argument("--ray-temp-dir", default=None, help="Ray's session folder (default /tmp/ray)")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)  # the supervised child
    return parser.parse_args(argv)


def cluster_args(options, gpus: float, cpus: float) -> dict:
    autoscale = options.min_replicas is not None or options.max_replicas is not None
    most = (options.max_replicas or max(options.min_replicas or 1, 1)) if autoscale else (options.replicas or 2)
    num_gpus = options.num_gpus if options.num_gpus is not None else (1 if gpus else 0)
    num_cpus = options.num_cpus if options.num_cpus is not None else (1 if num_gpus else min(1.0, cpus / (most + 1)))
    args = {
        "num_gpus": num_gpus,
        "num_cpus": num_cpus,
        "max_queued_requests": options.max_queued_requests,
        "retry_after_s": options.retry_after_s,
        "loras_per_replica": options.loras_per_replica,
        "affinity": not options.no_affinity,
        "affinity_wait_s": options.affinity_wait_s,
        "upload_url": options.upload_url,
        "log_dir": options.log_dir,
        "health_check_period_s": options.health_check_period_s,
        "graceful_shutdown_timeout_s": options.graceful_shutdown_timeout_s,
        "cog_host": "127.0.0.1",  # one machine: the ingress reaches the Cog servers on loopback
    }
    if autoscale:
        args |= {"min_replicas": options.min_replicas if options.min_replicas is not None else 1, "max_replicas": most}
    else:
        args["num_replicas"] = most
    if num_gpus and most * num_gpus > gpus:
        logger.warning("%s replicas × %s GPU, but Ray found %s GPUs: some replicas will wait", most, num_gpus, gpus)
    return args


class Descendants:
    """Every process this one started, directly or not, remembered from the start (psutil), so that
    all of them can be ended whatever order they die in: this process adopts orphans (subreaper),
    and one whose parent (raylet, a replica) died first is still here to end."""

    def __init__(self, every_s: float = 1.0):
        self.me = psutil.Process()
        self.seen: dict[int, psutil.Process] = {}
        self.adopted: set[int] = set()  # not started by this process: reaped here when they exit
        self.every_s = every_s
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        become_subreaper()
        threading.Thread(target=self._watch, name="descendants", daemon=True).start()

    def _watch(self) -> None:
        while not self.stopped.wait(self.every_s):
            self.remember()
            for pid in list(self.adopted):
                with contextlib.suppress(ChildProcessError):  # not (yet) this process's child
                    os.waitpid(pid, os.WNOHANG)
                if not self.seen[pid].is_running():
                    self.adopted.discard(pid)

    def remember(self) -> list[psutil.Process]:
        """The ones still running, after adding those started since the last look."""
        with self.lock:
            with contextlib.suppress(psutil.Error):
                for process in self.me.children(recursive=True):
                    if process.pid not in self.seen:
                        self.seen[process.pid] = process
                        if process.ppid() != self.me.pid:
                            self.adopted.add(process.pid)
            return [process for process in self.seen.values() if _running(process)]

    def end(self, grace_s: float) -> None:
        """SIGTERM to every one still running, SIGKILL to what is left after `grace_s`; reaped."""
        self.stopped.set()
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
            alive = []
            for process in self.remember():
                with contextlib.suppress(psutil.Error):
                    process.send_signal(sig)
                    alive.append(process)
            if not alive:
                return
            if sig == signal.SIGKILL:
                logger.warning("killed %d processes that had not stopped", len(alive))
            psutil.wait_procs(alive, timeout=wait_s)


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _bounded(name: str, function, timeout: float) -> bool:
    """`function()` in a thread, waited for at most `timeout` s: True if it finished."""
    thread = threading.Thread(target=function, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        logger.warning("%s did not finish within %.0f s", name, timeout)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing is reported anywhere unless you opt in
    # Ray's workers (the ingress, the replicas) import `cluster` and the project's modules from here.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return drive(options) if options.driver else supervise(argv, options)


def supervise(argv: list[str], options) -> int:
    """This process: the driver (below) in a child process, and every process started from it
    ended at the stop. Not Ray's driver itself: Ray's driver exits on its own when raylet dies."""
    signals: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: signals.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: signals.append(signum))
    descendants = Descendants()
    # Replica folders (LoRA caches, TMPDIR) go in a folder of this run's own, removed at the end.
    work_dir = options.work_dir or tempfile.mkdtemp(prefix="flux-cluster-")
    args = [sys.executable, "-m", "cluster", *argv, "--work-dir", work_dir, "--driver"]
    driver = subprocess.Popen(args, preexec_fn=die_with_parent)
    # 1. Serve until the driver exits (the app failed to deploy) or a signal comes.
    while driver.poll() is None and not signals:
        time.sleep(0.2)
    # 2. The driver stops the app and Ray, for a bounded time; a second signal stops waiting for it.
    if signals:
        logger.info("stopping (%s; again to force)", signal.Signals(signals[0]).name)
        with contextlib.suppress(ProcessLookupError):
            driver.send_signal(signal.SIGTERM)  # a signal sent to this process alone has not reached it
        deadline = time.monotonic() + DRIVER_STOP_S
        while driver.poll() is None and len(signals) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        if driver.poll() is None:
            logger.warning("not waiting any longer for Serve and Ray to stop: ending their processes")
    # 3. Whatever is left of what this started, whatever order it died in.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    descendants.end(grace_s=3.0 if driver.poll() is not None else 1.0)
    if not options.work_dir:  # with what replicas that Ray killed past their grace period left
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0 if signals else (driver.returncode or 0)


def _interrupt(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop; forcing it is the supervisor's
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def drive(options) -> int:
    """Ray's driver: a local Ray instance and the app, until SIGTERM or SIGINT."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    import ray
    from ray import serve

    from cluster.app import build

    started, status, clean = False, 0, True
    try:
        ray.init(include_dashboard=False, _temp_dir=options.ray_temp_dir)
        started = True
        signal.signal(signal.SIGTERM, _interrupt)  # again: ray.init installed handlers of its own
        signal.signal(signal.SIGINT, _interrupt)
        resources = ray.cluster_resources()
        args = cluster_args(options, resources.get("GPU", 0), resources.get("CPU", os.cpu_count() or 1))
        args["work_dir"] = options.work_dir
        logger.info("starting the app: %s", args)
        serve.start(http_options={"host": options.host, "port": options.port}, proxy_location="HeadOnly")
        serve.run(build(args), name="flux", route_prefix="/")
        logger.info("serving the Cog HTTP API on http://%s:%d (Ctrl-C stops it)", options.host, options.port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except RuntimeError as error:  # the app failed to deploy: Ray's message says why (e.g. Cog's SETUP_FAILED)
        logger.error("%s", error)
        status = 1
    finally:
        # The app (each replica stops its Cog server), then Ray, each for a bounded time: a Ray
        # process that died first (raylet on a SIGTERM to the process group) makes them wait.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if started:
            clean = _bounded("serve.shutdown", serve.shutdown, SERVE_SHUTDOWN_S)
            clean = clean and _bounded("ray.shutdown", ray.shutdown, RAY_SHUTDOWN_S)
    if not clean:  # Ray's exit handlers would wait again; the supervisor ends what is left
        logging.shutdown()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
