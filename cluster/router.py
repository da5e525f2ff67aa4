"""LoraAffinityRouter: Ray Serve's power-of-two-choices router, patient with a request's LoRA.

Ray's own multiplexed routing tries the replicas holding a request's model id once; when they are
all busy it falls back at once to the replicas with the fewest ids, so under load a LoRA ends up
downloaded and parsed on every replica (measured in bench/bench_cluster.py). Here a request whose
LoRA some replica holds waits for one of those for up to `wait_s` (a LoRA load elsewhere costs a
download and a parse; waiting costs at most that long), then Ray's routing takes over unchanged:
fewest ids, then any replica. Requests with no LoRA, or one no replica holds, are routed by Ray
as before. Installed through Ray's own `RequestRouterConfig` (app.py).
"""

from __future__ import annotations

import random
import time

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)


class LoraAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Built from Ray's public router mixins as Ray's default router is (power of two choices)."""

    def initialize_state(self, wait_s: float = 2.0, **kwargs) -> None:
        self.wait_s = wait_s

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        model_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        candidates = None
        if model_id and time.time() - pending_request.created_at < self.wait_s:
            holders = {r.replica_id for r in candidate_replicas if model_id in r.multiplexed_model_ids}
            if holders:
                pending_request.routing_context.should_backoff = True  # probe again after Ray's backoff
                candidates = holders
        if candidates is None:
            if model_id:
                candidates = self.apply_multiplex_routing(pending_request=pending_request)
            else:
                candidates = self.apply_locality_routing(pending_request=pending_request)
        if not candidates:
            return []
        chosen = random.sample(sorted(candidates, key=str), min(2, len(candidates)))
        return [[self.curr_replicas[replica_id] for replica_id in chosen]]
