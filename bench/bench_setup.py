"""4. setup() on the tiny weights against a bare FluxPipeline.from_pretrained, and where it goes."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from common import ROOT, interleaved, median, paired_ratio

_depth: list[str] = []


@contextmanager
def _timing(owner, name: str, label: str, spent: dict[str, float]):
    """Wrap owner.name (a module function, a method or a classmethod) to add its wall time to spent[label]."""
    own = vars(owner).get(name)  # what to put back (None: inherited, so delete our shadow)
    is_classmethod = isinstance(inspect.getattr_static(owner, name), classmethod)
    original = getattr(owner, name)  # bound to `owner` for a classmethod; a plain function otherwise

    def wrapper(*args, **kwargs):
        outermost = not _depth
        _depth.append(label)
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _depth.pop()
            if outermost:  # nested calls (the dev pipeline loading its transformer) count once
                spent[label] += time.perf_counter() - start

    setattr(owner, name, staticmethod(wrapper) if is_classmethod else wrapper)
    try:
        yield
    finally:
        if own is not None:
            setattr(owner, name, own)
        else:
            delattr(owner, name)


def breakdown(tree: Path) -> dict[str, float]:
    """One setup() with its parts timed (seconds); "other" is what no part accounts for."""
    from contextlib import ExitStack

    from diffusers import FluxTransformer2DModel

    import lora_loader
    import pipelines
    import predict

    spent: dict[str, float] = defaultdict(float)
    with ExitStack() as stack:
        for owner, name, label in (
            (pipelines.FluxPipeline, "from_pretrained", "dev pipeline from_pretrained"),
            (FluxTransformer2DModel, "from_pretrained", "schnell transformer from_pretrained"),
            *((cls, "from_pipe", "img2img/inpaint from_pipe") for cls in pipelines.PIPELINE_CLASSES.values()),
            (predict.SafetyChecker, "load", "safety checker + NSFW detector"),
            (lora_loader, "_inject_adapter", "LoRA adapter injected"),
            (lora_loader, "parse_lora", "main LoRA parsed"),
        ):
            stack.enter_context(_timing(owner, name, label, spent))
        start = time.perf_counter()
        predict.Predictor().setup()
        total = time.perf_counter() - start
    parts = dict(spent)
    parts["other (weights tree checks, logging, outputs)"] = total - sum(parts.values())
    return {"total": total, **parts}


def cold_import_seconds() -> float:
    """`import predict` in a fresh interpreter (torch, diffusers, transformers, cog)."""
    code = "import time; s = time.perf_counter(); import predict; print(time.perf_counter() - s)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def run(tree: Path, *, rounds: int = 3) -> dict:
    from diffusers import FluxPipeline

    import predict

    times = interleaved(
        {
            "setup": lambda: predict.Predictor().setup(),
            "from_pretrained": lambda: FluxPipeline.from_pretrained(tree / "FLUX.1-dev"),
        },
        rounds=rounds,
        warmup=1,
    )
    return {
        "seconds": {k: median(v) for k, v in times.items()},
        "raw_seconds": times,
        "ratios": {"setup / from_pretrained": paired_ratio(times["setup"], times["from_pretrained"])},
        "breakdown": breakdown(tree),
        "cold_import_predict": cold_import_seconds(),
    }
