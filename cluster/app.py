"""The Ray Serve application: `build(args)` → CogIngress in front of the CogReplica deployment.

    serve run cluster.app:build min_replicas=1 max_replicas=8        # on a running Ray cluster
    applications: [{import_path: cluster.app:build, args: {...}}]    # a Serve config / a RayService

`args` are ClusterArgs (validated; unknown names are refused). Replicas autoscale between
`min_replicas` and `max_replicas` at one ongoing request per replica, or `num_replicas` fixes
their number. Each asks Ray for `num_gpus` GPUs (1 in production) and `num_cpus` CPUs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from cluster.ingress import CogIngress
from cluster.replica import CogReplica, ReplicaSettings
from cluster.router import LoraAffinityRouter


class ClusterArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(None, ge=1, description="a fixed number of replicas (no autoscaling)")
    min_replicas: int = Field(1, ge=0, description="autoscaling: the fewest replicas")
    max_replicas: int = Field(4, ge=1, description="autoscaling: the most replicas")
    num_gpus: float = Field(1, ge=0, description="GPUs per replica (0 on a CPU machine)")
    num_cpus: float = Field(1, ge=0, description="CPUs per replica")
    max_queued_requests: int = Field(64, ge=1, description="requests waiting for a replica; more get 429")
    retry_after_s: float = Field(5, ge=0, description="the 429's Retry-After")
    loras_per_replica: int = Field(8, ge=1, description="LoRA ids each replica is routed by (LRU)")
    affinity: bool = Field(True, description="route by LoRA; False: Ray's plain routing")
    affinity_wait_s: float = Field(
        2.0, ge=0, description="how long a request waits for a replica holding its LoRAs (0: Ray's own multiplexing)"
    )
    router_max_backoff_s: float = Field(0.1, gt=0, description="how often a queued request looks for a replica")
    upload_url: str | None = Field(None, description="each Cog server's --upload-url")
    work_dir: str = Field(
        str(Path(tempfile.gettempdir()) / "flux-cluster"), description="replica folders (LoRA cache, TMPDIR)"
    )
    log_dir: str | None = Field(None, description="Cog server logs, one file per replica (default: Ray's logs)")
    env: dict[str, str] = Field(default_factory=dict, description="added to every Cog server's environment")
    cog_host: str | None = Field(None, description="where Cog servers listen (default: the node's address)")
    setup_timeout_s: float = Field(1800, gt=0, description="Cog start + setup() per replica")
    health_check_period_s: float = Field(10, gt=0)
    health_check_timeout_s: float = Field(30, gt=0)
    graceful_shutdown_timeout_s: float = Field(
        1200,
        ge=0,
        description="a replica removed (scale-down, upgrade) takes no new work and finishes its prediction "
        "for up to this long: a LoRA download may take LORA_DOWNLOAD_TOTAL_TIMEOUT (900 s), then the image",
    )
    unavailable_retry_s: float = Field(30, ge=0, description="how long requests are re-sent past dead Cog servers")
    state_dir: str | None = Field(None, description="the front's prediction records (default FRONT_STATE_DIR)")
    prediction_store: str | None = Field(
        None, description="redis://… to share records (default PREDICTION_STORE; secrets belong in the environment)"
    )

    @model_validator(mode="after")
    def _replica_bounds(self) -> ClusterArgs:
        if self.num_replicas is None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


def build(args: ClusterArgs) -> serve.Application:
    """The application; Serve's config files and `serve run` call this with their `args`."""
    if isinstance(args, dict):
        args = ClusterArgs(**args)
    if args.num_replicas is not None:
        scaling = {"num_replicas": args.num_replicas}
    else:
        scaling = {
            "autoscaling_config": {
                "min_replicas": args.min_replicas,
                "max_replicas": args.max_replicas,
                "initial_replicas": max(args.min_replicas, 1),
                "target_ongoing_requests": 1,
            }
        }
    router = {"max_backoff_s": args.router_max_backoff_s}
    if args.affinity and args.affinity_wait_s > 0:
        router["request_router_class"] = LoraAffinityRouter
        router["request_router_kwargs"] = {"wait_s": args.affinity_wait_s, "loras_per_replica": args.loras_per_replica}
    replicas = CogReplica.options(
        max_ongoing_requests=1,
        max_queued_requests=args.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=args.retry_after_s),
        ray_actor_options={"num_gpus": args.num_gpus, "num_cpus": args.num_cpus},
        health_check_period_s=args.health_check_period_s,
        health_check_timeout_s=args.health_check_timeout_s,
        graceful_shutdown_timeout_s=args.graceful_shutdown_timeout_s,
        request_router_config=RequestRouterConfig(**router),
        **scaling,
    ).bind(
        ReplicaSettings(
            work_dir=args.work_dir,
            env=args.env,
            upload_url=args.upload_url,
            loras_per_replica=args.loras_per_replica,
            setup_timeout_s=args.setup_timeout_s,
            log_dir=args.log_dir,
            cog_host=args.cog_host,
        )
    )
    ingress = CogIngress.options(
        num_replicas=1,  # the front: it holds the queue and the running predictions (cancel, repeated PUT)
        max_ongoing_requests=10_000,  # it only waits on replicas
        ray_actor_options={"num_cpus": 0},
    )
    most = args.num_replicas or args.max_replicas
    front = {
        "capacity": args.max_queued_requests + most,  # handed to Ray's router at once; the rest wait in the front
        "max_queued": args.max_queued_requests,
        "affinity": args.affinity,
        "unavailable_retry_s": args.unavailable_retry_s,
        "state_dir": args.state_dir,
        "store": args.prediction_store,
    }
    return ingress.bind(replicas, front)
