"""Loading FLUX once: the dev pipeline, the schnell transformer beside it, and the img2img and
inpaint pipelines built from the same components (diffusers' from_pipe shares the modules; no
weight is copied).

Whether a transformer is "dev-like" (guidance-distilled) or "schnell-like" (timestep-distilled)
is read from its config (`guidance_embeds`), never from a name.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)

logger = logging.getLogger(__name__)

PIPELINE_CLASSES = {"txt2img": FluxPipeline, "img2img": FluxImg2ImgPipeline, "inpaint": FluxInpaintPipeline}


@dataclass(frozen=True)
class ModelTraits:
    """What a transformer's config says about how to run it."""

    guidance: bool  # dev: guidance embedding (guidance_scale matters); schnell: none
    max_sequence_length: int  # T5 tokens: 512 for dev, 256 for schnell
    max_steps: int | None  # schnell is distilled for up to 4 steps

    @classmethod
    def of(cls, transformer: FluxTransformer2DModel) -> ModelTraits:
        if transformer.config.guidance_embeds:
            return cls(guidance=True, max_sequence_length=512, max_steps=None)
        return cls(guidance=False, max_sequence_length=256, max_steps=4)


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    """bf16 on a CUDA GPU, exact float32 on the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


class FluxModels:
    """Every pipeline a request can need, keyed by (model, mode), all sharing one set of weights."""

    def __init__(self, dev_dir: Path, schnell_dir: Path, device: torch.device, dtype: torch.dtype):
        started = time.perf_counter()
        dev = FluxPipeline.from_pretrained(dev_dir, dtype=dtype).to(device)
        schnell_transformer = FluxTransformer2DModel.from_pretrained(
            schnell_dir, subfolder="transformer", dtype=dtype
        ).to(device)
        schnell_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(schnell_dir, subfolder="scheduler")
        self.transformers = {"dev": dev.transformer, "schnell": schnell_transformer}
        self.pipelines: dict[tuple[str, str], FluxPipeline] = {}
        for model, overrides in (
            ("dev", {}),
            ("schnell", {"transformer": schnell_transformer, "scheduler": schnell_scheduler}),
        ):
            for mode, cls in PIPELINE_CLASSES.items():
                # from_pipe casts every module to float32 unless told the dtype: pass it.
                pipe = dev if (model, mode) == ("dev", "txt2img") else cls.from_pipe(dev, dtype=dtype, **overrides)
                pipe.set_progress_bar_config(disable=True)
                self.pipelines[model, mode] = pipe
        self.device, self.dtype = device, dtype
        logger.info(
            "FLUX loaded on %s (%s) in %.1f s", device, str(dtype).removeprefix("torch."), time.perf_counter() - started
        )

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.pipelines["dev", "txt2img"].text_encoder

    def get(self, model: str, mode: str) -> FluxPipeline:
        return self.pipelines[model, mode]

    def traits(self, model: str) -> ModelTraits:
        return ModelTraits.of(self.transformers[model])

    def optimize(
        self,
        *,
        fp8: bool,
        warmup_sizes: list[tuple[int, int]],
        states,
        cache_dir: Path | None = None,
        adapter_shape: str = "",
    ) -> None:
        """The GPU fast path (fast_path.py) for both models: compile, attention backend, opt-in fp8,
        then a warm-up so compilation happens here and not on the first request. `states(transformer)`
        iterates over the states requests can find a transformer in (e.g. LoRA adapters on and off),
        each a compiled graph of its own: each is warmed up.

        `cache_dir` (None: no persistence): all of it runs inside `fast_path.compile_cache`, so a
        restart loads the compiled graphs the previous start saved there instead of rebuilding
        them. The file's key (`fast_path.compile_cache_key`) covers torch, the GPU, fp8, the warm-up
        sizes, the transformers' configs and `adapter_shape` (`LoraManager.adapter_shape`). The
        predictor wires both (a folder in the weights tree; FLUX_COMPILE_CACHE=0 switches it off)."""
        import fast_path

        cache = contextlib.nullcontext()
        if cache_dir is not None:
            key = fast_path.compile_cache_key(
                self.device, fp8, warmup_sizes=warmup_sizes, transformers=self.transformers, adapter=adapter_shape
            )
            cache = fast_path.compile_cache(cache_dir, key)
        with cache:
            for model, transformer in self.transformers.items():
                pipe = self.get(model, "txt2img")
                fast_path.optimize_pipeline(pipe, fp8=fp8)
                for _ in states(transformer):
                    fast_path.warmup(pipe, warmup_sizes)
