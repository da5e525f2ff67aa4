"""The baseline of figure 1 as a user writes it: a bare diffusers FluxPipeline + PIL save, in a Python
process of its own with default settings (bench_serving starts it with a clean environment, so it
inherits neither our environment nor our allocator settings).

    python bench/bare_pipeline.py WEIGHTS_TREE

Loads FLUX.1-dev from the tree, then reads one request per stdin line, `WIDTH HEIGHT STEPS SEED`,
and answers each with one JSON line on stdout: {"pipe_s", "save_s", "total_s", "rss_mib"}.
Nothing of this project is imported.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "an ascii art cat"


def main() -> int:
    tree = Path(sys.argv[1])
    import psutil
    import torch
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tree / "FLUX.1-dev")
    pipe.set_progress_bar_config(disable=True)
    out = Path(tempfile.mkdtemp(prefix="bench-bare-")) / "out.png"
    me = psutil.Process()
    print(json.dumps({"ready": True}), flush=True)  # noqa: T201  (the protocol with bench_serving)
    for line in sys.stdin:
        width, height, steps, seed = (int(x) for x in line.split())
        started = time.perf_counter()
        image = pipe(
            prompt=PROMPT,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=3.5,
            max_sequence_length=512,
            generator=[torch.Generator("cpu").manual_seed(seed)],
        ).images[0]
        generated = time.perf_counter()
        image.convert("RGB").save(out, format="PNG")
        done = time.perf_counter()
        answer = {
            "pipe_s": generated - started,
            "save_s": done - generated,
            "total_s": done - started,
            "rss_mib": me.memory_info().rss / 2**20,
        }
        print(json.dumps(answer), flush=True)  # noqa: T201
    out.unlink(missing_ok=True)
    out.parent.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
