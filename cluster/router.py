"""LoraAffinityRouter: Ray Serve's power-of-two-choices router, sending a LoRA where it is loaded.

A request's multiplexed model id lists its LoRAs (routing.py). The router knows where each LoRA
is the moment a request is placed: `on_request_routed` (Ray calls it when a replica accepts a
request) records its LoRAs on that replica, most recent last, `loras_per_replica` of them as the
replica keeps; what replicas report to Ray's controller (seconds later) is added to that, and a
replica that is gone is forgotten. So `A` then `A` again finds A's replica even when the second
request comes right after the first, and `A:0.6, B` finds it too (it holds one of the two LoRAs).

A request goes to the replicas holding the most of its LoRAs, waiting for one of them for up to
`wait_s` (a LoRA load elsewhere costs a download and a parse; waiting costs at most that long).
Past `wait_s`, or when no replica holds any of them, it takes the first free replica of: those
holders, then the replicas holding the fewest LoRAs, then any. So a hot LoRA whose replica stays
busy spreads to a second replica, and its later requests find both. Requests with no LoRA are
routed as Ray routes them (locality, then power of two choices). Installed through Ray's own
`RequestRouterConfig` (app.py).
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict

from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from cluster.routing import lora_ids


def _two(replicas: list[RunningReplica]) -> list[RunningReplica]:
    """Power of two choices: Ray sends to the shorter queue of two picked at random."""
    return random.sample(replicas, min(2, len(replicas)))


class LoraAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Built from Ray's public router classes. Not FIFOMixin: that one hands a free replica to the
    oldest waiting request, whatever its LoRAs, which would undo the choice made here."""

    def initialize_state(self, wait_s: float = 2.0, loras_per_replica: int = 8, **kwargs) -> None:
        self.wait_s = wait_s
        self.loras_per_replica = loras_per_replica
        self.placed: dict[ReplicaID, OrderedDict[str, None]] = {}  # replica → the LoRAs sent to it, LRU first

    def held_by(self, replica: RunningReplica) -> set[str]:
        return set(self.placed.get(replica.replica_id, ())) | set(replica.multiplexed_model_ids)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        held = self.placed.setdefault(replica_id, OrderedDict())
        for lora in lora_ids(pending_request.metadata.multiplexed_model_id):
            held[lora] = None
            held.move_to_end(lora)
        while len(held) > self.loras_per_replica:
            held.popitem(last=False)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        # 1. Forget replicas that are gone.
        for replica_id in [r for r in self.placed if r not in self.curr_replicas]:
            del self.placed[replica_id]
        # 2. No LoRA: Ray's own routing.
        wanted = set(lora_ids(pending_request.metadata.multiplexed_model_id)) if pending_request else set()
        if not wanted:
            candidates = self.apply_locality_routing(pending_request=pending_request)
            return [_two([self.curr_replicas[r] for r in sorted(candidates, key=str)])] if candidates else []
        # 3. The replicas holding the most of the request's LoRAs: wait for them up to wait_s.
        pending_request.routing_context.should_backoff = True  # probe again after Ray's backoff
        held = {r.replica_id: self.held_by(r) for r in candidate_replicas}
        most = max((len(wanted & loras) for loras in held.values()), default=0)
        holders = [r for r in candidate_replicas if most and len(wanted & held[r.replica_id]) == most]
        if holders and time.time() - pending_request.created_at < self.wait_s:
            return [_two(holders)]
        # 4. Spread: the holders, then the replicas holding the fewest LoRAs, then any.
        holder_ids = {r.replica_id for r in holders}
        others = [r for r in candidate_replicas if r.replica_id not in holder_ids]
        fewest = min((len(held[r.replica_id]) for r in others), default=0)
        light = [r for r in others if len(held[r.replica_id]) == fewest]
        return [_two(holders), _two(light), _two(others)]
