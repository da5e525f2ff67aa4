"""The whole predictor on a CUDA GPU, on the tiny weights: setup with the fast path, then the
request kinds users send, timed, with the count of torch.compile graphs after each (a growing
count after warm-up is a recompile).

    python bench/gpu_predictor.py            (needs CUDA; FLUX_FP8=1 for the fp8 path)
"""

import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main() -> int:
    import os

    from cog._inspector import check_input, create_predictor

    from scripts.tiny_weights import build

    if not torch.cuda.is_available():
        sys.stderr.write("no CUDA device\n")
        return 1
    root = build(Path(tempfile.mkdtemp()) / "weights")
    os.environ["FLUX_WEIGHTS_DIR"] = str(root)
    import predict

    runner = predict.Predictor()
    started = time.perf_counter()
    runner.setup()
    setup_s = time.perf_counter() - started
    log = logging.getLogger("gpu_predictor")
    log.info("setup %.1f s, dtype %s, graphs %d", setup_s, runner.models.dtype, graphs())
    fields = create_predictor("predict", "Predictor").inputs
    image = root / "in.png"
    mask = root / "mask.png"
    from PIL import Image

    Image.new("RGB", (1024, 768), (200, 30, 30)).save(image)
    m = Image.new("L", (1024, 768), 0)
    m.paste(255, (512, 0, 1024, 768))
    m.save(mask)
    cases = [
        ("dev 1024² 28 steps", {}),
        ("dev 1024² again", {}),
        ("dev 16:9", {"aspect_ratio": "16:9"}),
        ("dev 9:21", {"aspect_ratio": "9:21"}),
        ("dev lora_scale 0.5", {"lora_scale": 0.5}),
        ("dev lora_scale 0", {"lora_scale": 0}),
        ("dev extra lora", {"extra_lora": str(root / "lora.safetensors"), "lora_scale": 0, "extra_lora_scale": 0.8}),
        ("schnell 4 steps", {"model": "schnell"}),
        ("img2img", {"image": str(image)}),
        ("inpaint", {"image": str(image), "mask": str(mask)}),
        ("dev 4 outputs", {"num_outputs": 4}),
    ]
    for name, extra in cases:
        before = graphs()
        started = time.perf_counter()
        outputs = runner.run(**check_input(fields, {"prompt": "an ascii cat", "seed": 1, **extra}))
        torch.cuda.synchronize()
        log.info(
            "%-22s %6.3f s  %d outputs  new graphs %d",
            name,
            time.perf_counter() - started,
            len(outputs),
            graphs() - before,
        )
    log.info("peak GPU memory %.2f GB", torch.cuda.max_memory_allocated() / 1e9)
    return 0


if __name__ == "__main__":
    sys.exit(main())
