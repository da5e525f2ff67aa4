"""`python -m cluster` (`make serve-cluster`): a local Ray instance and the app, in the foreground.

    python -m cluster --replicas 2 --port 5000          # fixed: 2 replicas (one GPU each where Ray finds GPUs)
    python -m cluster --min-replicas 1 --max-replicas 4 # autoscaling

Ray, its Serve proxy (the Cog HTTP API on --host:--port) and the replicas (each one Cog server)
all run on this machine, the Cog servers on 127.0.0.1. Ctrl-C or SIGTERM stops
everything this started: the app (each replica stops its Cog server and removes its folder),
then Ray. On a Ray cluster of your own, run `serve run cluster.app:build …` instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("cluster")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


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
    parser.add_argument("--graceful-shutdown-timeout-s", type=float, default=60)
    parser.add_argument("--ray-temp-dir", default=None, help="Ray's session folder (default /tmp/ray)")
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


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing is reported anywhere unless you opt in
    # Ray's workers (the ingress, the replicas) import `cluster` and the project's modules from here.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    import ray
    from ray import serve

    from cluster.app import build

    # Replica folders (LoRA caches, TMPDIR) go in a folder of this run's own, removed at the end.
    work_dir = Path(options.work_dir) if options.work_dir else Path(tempfile.mkdtemp(prefix="flux-cluster-"))
    started, status = False, 0
    try:
        ray.init(include_dashboard=False, _temp_dir=options.ray_temp_dir)
        started = True
        signal.signal(signal.SIGTERM, _interrupt)  # again: ray.init installed handlers of its own
        signal.signal(signal.SIGINT, _interrupt)
        resources = ray.cluster_resources()
        args = cluster_args(options, resources.get("GPU", 0), resources.get("CPU", os.cpu_count() or 1))
        args["work_dir"] = str(work_dir)
        logger.info("starting the app: %s", args)
        serve.start(http_options={"host": options.host, "port": options.port}, proxy_location="HeadOnly")
        serve.run(build(args), name="flux", route_prefix="/")
        logger.info("serving the Cog HTTP API on http://%s:%d (Ctrl-C stops it)", options.host, options.port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt as stop:
        logger.info("stopping (%s)", stop or "SIGINT")
    except RuntimeError as error:  # the app failed to deploy: Ray's message says why (e.g. Cog's SETUP_FAILED)
        logger.error("%s", error)
        status = 1
    finally:
        if started:
            try:
                serve.shutdown()  # each replica stops its Cog server and removes its folder
            except KeyboardInterrupt:
                logger.warning("stopping Ray now")
            finally:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                ray.shutdown()
        if not options.work_dir:  # with what replicas that Ray killed past their grace period left
            shutil.rmtree(work_dir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
