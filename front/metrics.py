"""Prometheus metrics for the operator, served by the front at GET /metrics (prometheus-client's
text format). Counts and timings only: no input, prompt, LoRA or token is ever a label.

    predictions_total{status, mode}          finished predictions (mode: txt2img, img2img, inpaint)
    prediction_stage_seconds{stage}          queue (accepted → started), and the model server's own
                                             stages from Cog's per-prediction metrics (`<stage>_time`:
                                             lora_fetch, lora_apply, generate, safety, encode) and
                                             predict (Cog's predict_time)
    predictions_waiting, predictions_running accepted and not started / started and not finished
    model_servers{state}                     the model servers (the cluster's replicas) by state
    lora_cache_events_total{event, server}   the LoRA disk cache of each model server: hits, misses
                                             (downloads), evictions (from Cog's `lora_cache_<event>`)
"""

from __future__ import annotations

from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from front.records import Record

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 900)
STATES = ("READY", "BUSY", "STARTING", "SETUP_FAILED", "UNREACHABLE")


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.predictions = Counter("predictions", "Finished predictions", ["status", "mode"], registry=self.registry)
        self.stages = Histogram(
            "prediction_stage_seconds", "Time per stage of a prediction", ["stage"], buckets=BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.waiting = Gauge("predictions_waiting", "Accepted, not yet started", registry=self.registry)
        self.running = Gauge("predictions_running", "Started, not yet finished", registry=self.registry)
        self.servers = Gauge("model_servers", "Model servers (replicas) by state", ["state"], registry=self.registry)
        self.lora_cache = Counter(
            "lora_cache_events", "LoRA disk cache hits, misses and evictions", ["event", "server"],
            registry=self.registry,
        )  # fmt: skip

    def finished(self, record: Record) -> None:
        self.predictions.labels(record.status, mode_of(record.input)).inc()
        if record.started_at:
            self.stages.labels("queue").observe(max(_seconds(record.started_at) - _seconds(record.created_at), 0))
        for name, value in (record.metrics or {}).items():
            if isinstance(value, int | float) and name.endswith("_time"):
                self.stages.labels(name.removesuffix("_time")).observe(max(float(value), 0.0))
            elif isinstance(value, int | float) and name.startswith("lora_cache_") and value > 0:
                self.lora_cache.labels(name.removeprefix("lora_cache_"), record.replica or "local").inc(value)

    def render(self, waiting: int, running: int, health: dict) -> bytes:
        self.waiting.set(waiting)
        self.running.set(running)
        counts = health.get("replicas") or {health.get("status", "UNREACHABLE"): 1}
        for state in {*STATES, *counts}:
            self.servers.labels(state).set(counts.get(state, 0))
        return generate_latest(self.registry)

    def names(self) -> set[str]:
        """Every series name this exports (for checking dashboards against)."""
        return {sample.name for family in self.registry.collect() for sample in family.samples} | {
            family.name for family in self.registry.collect()
        }


def mode_of(inputs: dict) -> str:
    if inputs.get("image") and inputs.get("mask"):
        return "inpaint"
    return "img2img" if inputs.get("image") else "txt2img"


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
