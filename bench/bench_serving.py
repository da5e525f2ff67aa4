"""1. Serving overhead: a full Predictor.run against the bare diffusers call + saving the same file.

Both sides use the same tiny weights, size, steps, seed, prompt and output format; runs are
interleaved (A B C D, A B C D, …) and each figure is the median of the per-round ratios.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from common import interleaved, median, paired_ratio

logger = logging.getLogger(__name__)

PROMPT = "an ascii art cat"


def run(tree: Path, *, size: int = 1024, steps: int = 4, rounds: int = 3) -> dict:
    from cog._inspector import check_input, create_predictor
    from diffusers import FluxPipeline

    import predict

    runner = predict.Predictor()
    runner.setup()
    fields = create_predictor("predict", "Predictor").inputs
    inputs = {
        "prompt": PROMPT,
        "aspect_ratio": "custom",
        "width": size,
        "height": size,
        "num_inference_steps": steps,
        "seed": 1,
    }

    def ours(**extra):
        return lambda: runner.run(**check_input(fields, {**inputs, **extra}))

    bare = FluxPipeline.from_pretrained(tree / "FLUX.1-dev")
    bare.set_progress_bar_config(disable=True)
    with_lora = FluxPipeline.from_pretrained(tree / "FLUX.1-dev")
    with_lora.set_progress_bar_config(disable=True)
    with_lora.load_lora_weights(str(tree / "lora.safetensors"), adapter_name="main")
    out = Path(tempfile.mkdtemp(prefix="bench-serving-"))

    def baseline(pipe):
        def call():
            image = pipe(
                prompt=PROMPT,
                width=size,
                height=size,
                num_inference_steps=steps,
                guidance_scale=3.5,
                max_sequence_length=512,
                generator=[torch.Generator("cpu").manual_seed(1)],
            ).images[0]
            image.convert("RGB").save(out / "bare.webp", format="WEBP", quality=90)

        return call

    cases = {
        "predict": ours(),  # defaults: main LoRA at 1.0 (adapters on), safety checker on, webp 90
        "bare": baseline(bare),  # no LoRA, no safety checker
        "bare_lora": baseline(with_lora),  # the same LoRA as an unfused diffusers adapter
        "predict_no_lora": ours(lora_scale=0),  # adapters off
        "predict_no_lora_no_safety": ours(lora_scale=0, disable_safety_checker=True),
    }
    times = interleaved(cases, rounds=rounds, warmup=1)
    runner.outputs.cleanup()
    for f in out.iterdir():
        f.unlink()
    out.rmdir()
    return {
        "size": size,
        "steps": steps,
        "rounds": rounds,
        "lora_max_rank": runner.loras.max_rank,
        "seconds": {k: median(v) for k, v in times.items()},
        "raw_seconds": times,
        "ratios": {
            "predict / bare": paired_ratio(times["predict"], times["bare"]),
            "predict / bare_lora": paired_ratio(times["predict"], times["bare_lora"]),
            "predict_no_lora / bare": paired_ratio(times["predict_no_lora"], times["bare"]),
            "predict_no_lora_no_safety / bare": paired_ratio(times["predict_no_lora_no_safety"], times["bare"]),
        },
    }
