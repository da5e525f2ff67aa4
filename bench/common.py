"""Shared helpers of the CPU benchmarks: timing, interleaved A/B runs, the FLUX-width transformer."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))  # lora_fixtures: the LoRA file writers

from bench.gpu_bench import FLUX_TRANSFORMER  # noqa: E402  (FLUX.1-dev's real transformer config)

# FLUX.1's real width (24 heads × 128, T5 4096, CLIP pooled 768) with 1 double and 1 single block:
# per-block costs extrapolate to the real 19 + 38.
FLUX_WIDTH = {**FLUX_TRANSFORMER, "num_layers": 1, "num_single_layers": 1, "guidance_embeds": True}
REAL_BLOCKS = (19, 38)


def flux_width_transformer(seed: int = 0, **config):
    """The FLUX-width transformer, float32, eval, random weights (N(0, 0.02): realistic magnitudes);
    `config` overrides FLUX_WIDTH."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**{**FLUX_WIDTH, **config})
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    return model.eval().requires_grad_(False)


def timed(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def interleaved(
    cases: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Run every case once per round, in turn (ABAB…), after `warmup` untimed rounds; seconds per case
    (wall time, or `clock`'s: `time.thread_time` counts only this thread's CPU time)."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            times[name].append(timed(fn, clock))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-round ratios (each pair ran side by side, so machine noise mostly cancels)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))
