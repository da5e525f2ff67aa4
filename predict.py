"""The Cog predictor: FLUX.1 dev/schnell with a LoRA fine-tune, as on its Replicate model page.

One prediction: inputs → checks → sizes → pipeline → LoRAs → generate → safety → encode.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from contextlib import contextmanager

import diffusers
import torch
import transformers
from cog import BaseRunner, Input, Path

import images
import model_weights
from errors import UserError
from images import ASPECT_RATIOS, InputDownloads, OutputWriter
from lora_loader import LoraManager
from lora_sources import LoraCache
from pipelines import FluxModels, ModelTraits, device_and_dtype
from safety import SafetyChecker

logger = logging.getLogger(__name__)

SEED_MAX = 2**63  # torch.Generator takes signed and unsigned 64-bit seeds; we accept 0 ≤ seed+i < 2^63


class Predictor(BaseRunner):
    def setup(self) -> None:
        limit_allocator_growth()
        logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(message)s", force=True)
        diffusers.utils.logging.disable_progress_bar()  # progress bars would flood the prediction logs
        transformers.utils.logging.disable_progress_bar()
        started = time.perf_counter()
        root = model_weights.weights_dir()
        device, dtype = device_and_dtype()
        self.models = FluxModels(
            model_weights.ensure("FLUX.1-dev", root), model_weights.ensure("FLUX.1-schnell", root), device, dtype
        )
        self.safety = SafetyChecker.load(
            model_weights.ensure("safety-checker", root), model_weights.ensure("nsfw-detector", root), device, dtype
        )
        self.loras = LoraManager.from_env(
            list(self.models.transformers.values()),
            self.models.text_encoder,
            LoraCache.from_env(),
            main=model_weights.main_lora(root),
        )
        if device.type == "cuda":
            self.compile(warmup_sizes=[ASPECT_RATIOS["1:1"], ASPECT_RATIOS["16:9"]])
        self.outputs = OutputWriter()
        self.inputs = InputDownloads()
        self.inputs.isolate()  # last: from here on Python's temp files go to this worker's folder
        logger.info("setup done in %.1f s", time.perf_counter() - started)

    def compile(self, warmup_sizes: list[tuple[int, int]]) -> None:
        """The GPU fast path, after the LoRA adapter exists so that LoRA swaps never recompile; warmed
        up in every LoRA adapter state, at batch 1 and 2 (fast_path.warmup). The compiled graphs are
        kept in FLUX_COMPILE_CACHE (default: compile-cache/ in the weights tree; 0: off) so that a
        restart on the same GPU and software skips most of the compiling."""
        cache = os.environ.get("FLUX_COMPILE_CACHE", str(model_weights.weights_dir() / "compile-cache"))
        self.models.optimize(
            fp8=os.environ.get("FLUX_FP8") == "1",
            warmup_sizes=warmup_sizes,
            states=self.loras.compile_states,
            cache_dir=None if cache in ("", "0") else Path(cache),
            cache_key_extra=f"LoRA adapter rank {self.loras.rank} (main {len(self.loras.regions['main'])})",
        )

    def run(
        self,
        prompt: str = Input(
            description="Prompt for generated image. If you include the `trigger_word` used in the training "
            "process you are more likely to activate the trained object, style, or concept in the resulting image."
        ),
        image: Path | None = Input(
            description="Input image for img2img or inpainting mode. If provided, aspect_ratio, width, and "
            "height inputs are ignored.",
            default=None,
        ),
        mask: Path | None = Input(
            description="Input mask for inpainting mode. Black areas will be preserved, white areas will be "
            "inpainted. Must be provided along with 'image' for inpainting mode.",
            default=None,
        ),
        aspect_ratio: str = Input(
            description="Aspect ratio for the generated image in text-to-image mode. The size will always be 1 "
            "megapixel, i.e. 1024x1024 if aspect ratio is 1:1. To use arbitrary width and height, set aspect "
            "ratio to 'custom'. Note: Ignored in img2img and inpainting modes.",
            choices=[*ASPECT_RATIOS, "custom"],
            default="1:1",
        ),
        width: int | None = Input(
            description="Width of the generated image in text-to-image mode. Only used when "
            "aspect_ratio=custom. Must be a multiple of 16 (if it's not, it will be rounded to nearest multiple "
            "of 16). Note: Ignored in img2img and inpainting modes.",
            ge=256,
            le=1440,
            default=None,
        ),
        height: int | None = Input(
            description="Height of the generated image in text-to-image mode. Only used when "
            "aspect_ratio=custom. Must be a multiple of 16 (if it's not, it will be rounded to nearest multiple "
            "of 16). Note: Ignored in img2img and inpainting modes.",
            ge=256,
            le=1440,
            default=None,
        ),
        num_outputs: int = Input(description="Number of images to output.", ge=1, le=4, default=1),
        lora_scale: float = Input(
            description="Determines how strongly the main LoRA should be applied. Sane results between 0 and 1.",
            ge=-1,
            le=2,
            default=1,
        ),
        num_inference_steps: int = Input(
            description="Number of inference steps. More steps can give more detailed images, but take longer.",
            ge=1,
            le=50,
            default=28,
        ),
        model: str = Input(
            description="Which model to run inferences with. The dev model needs around 28 steps but the "
            "schnell model only needs around 4 steps.",
            choices=["dev", "schnell"],
            default="dev",
        ),
        guidance_scale: float = Input(
            description="Guidance scale for the diffusion process. Lower values can give more realistic images. "
            "Good values to try are 2, 2.5, 3 and 3.5",
            ge=0,
            le=10,
            default=3.5,
        ),
        prompt_strength: float = Input(
            description="Prompt strength when using img2img / inpaint. 1.0 corresponds to full destruction of "
            "information in image",
            ge=0,
            le=1,
            default=0.8,
        ),
        seed: int | None = Input(description="Random seed. Set for reproducible generation.", default=None),
        extra_lora: str | None = Input(
            description="Combine this fine-tune with another LoRA. Supports Replicate models in the format "
            "<owner>/<username> or <owner>/<username>/<version>, HuggingFace URLs in the format "
            "huggingface.co/<owner>/<model-name>, CivitAI URLs in the format civitai.com/models/<id>[/<model-name>], "
            "or arbitrary .safetensors URLs from the Internet. For example, 'fofr/flux-pixar-cars'",
            default=None,
        ),
        extra_lora_scale: float = Input(
            description="Determines how strongly the extra LoRA should be applied.", ge=-1, le=2, default=1
        ),
        output_format: str = Input(
            description="Format of the output images.", choices=["webp", "jpg", "png"], default="webp"
        ),
        output_quality: int = Input(
            description="Quality when saving the output images, from 0 to 100. 100 is best quality, 0 is lowest "
            "quality. Not relevant for .png outputs",
            ge=0,
            le=100,
            default=90,
        ),
        disable_safety_checker: bool = Input(description="Disable safety checker for generated images.", default=False),
    ) -> list[Path]:
        with user_errors():
            # 1. Check inputs and pick the mode and the pipeline.
            self.inputs.sweep(keep=[image, mask])
            seed = check_inputs(prompt, image, mask, seed, num_outputs)
            mode = "inpaint" if mask is not None else "img2img" if image is not None else "txt2img"
            pipe, traits = self.models.get(model, mode), self.models.traits(model)
            steps = capped_steps(num_inference_steps, traits, model)

            # 2. Sizes and input images.
            call = {}
            if mode == "txt2img":
                width, height = images.txt2img_size(aspect_ratio, width, height)
            else:
                logger.info("%s: aspect_ratio, width and height are ignored; the size follows the image", mode)
                call["image"] = init_image = images.load_image(image)
                width, height = init_image.size
                call["strength"] = denoising_strength(prompt_strength, steps)
            if mode == "inpaint":
                call["mask_image"] = mask_image = images.load_mask(mask, init_image.size)

            # 3. LoRAs: exactly the main one at lora_scale plus the extra one, on this model.
            self.loras.apply(pipe.transformer, lora_scale, extra_lora, extra_lora_scale)

            # 4. Generate: one batch, output i from seed + i.
            seeds = [seed + i for i in range(num_outputs)]
            logger.info("%s %s %d×%d, %d steps, seeds %s", model, mode, width, height, steps, seeds)
            started = time.perf_counter()
            outputs = pipe(
                prompt=prompt,
                width=width,
                height=height,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                num_images_per_prompt=num_outputs,
                max_sequence_length=traits.max_sequence_length,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                **call,
            ).images
            logger.info("generated %d image(s) in %.2f s", len(outputs), time.perf_counter() - started)
            if mode == "inpaint":
                outputs = [images.keep_unmasked(out, init_image, mask_image) for out in outputs]

            # 5. Safety, then encode.
            if disable_safety_checker:
                logger.info("safety checker disabled")
            else:
                outputs = [outputs[i] for i in self.safety.filter(outputs)]
            return [Path(p) for p in self.outputs.save(outputs, output_format, output_quality)]


def check_inputs(prompt, image, mask, seed, num_outputs) -> int:
    """Every check that needs more than the schema; returns the seed to use."""
    if prompt is None or not prompt.strip():
        raise UserError("prompt is empty: describe the image you want.")
    if mask is not None and image is None:
        raise UserError("mask was given without image: inpainting needs both, or drop the mask.")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "big")
        logger.info("no seed given: using random seed %d", seed)
    if not 0 <= seed <= SEED_MAX - num_outputs:
        raise UserError(f"seed {seed} is out of range: use an integer from 0 to {SEED_MAX - 4}.")
    return seed


def capped_steps(steps: int, traits: ModelTraits, model: str) -> int:
    if traits.max_steps is not None and steps > traits.max_steps:
        logger.info(
            "%s runs at most %d steps: using %d instead of %d", model, traits.max_steps, traits.max_steps, steps
        )
        return traits.max_steps
    return steps


def denoising_strength(prompt_strength: float, steps: int) -> float:
    """img2img/inpaint strength, raised if needed so that at least one denoising step runs."""
    if prompt_strength * steps < 1:
        logger.info("prompt_strength %.3g with %d steps would run no step: running 1", prompt_strength, steps)
        return 1 / steps
    return prompt_strength


def limit_allocator_growth() -> None:
    """Keep the worker's memory flat over thousands of predictions (process-wide, so in setup()).

    Measured (tests/test_soak.py): with glibc's defaults the worker's RSS creeps up with every few
    hundred predictions (614 → 684 MiB over 1,000) through allocator fragmentation; with two arenas
    and blocks of 1 MiB or more mapped and trimmed straight back to the OS, it stays flat.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:  # not glibc (e.g. macOS): nothing to tune
        return
    libc = ctypes.CDLL(libc_name)
    if not hasattr(libc, "mallopt"):
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    libc.mallopt(m_arena_max, 2)
    libc.mallopt(m_mmap_threshold, 1 << 20)
    libc.mallopt(m_trim_threshold, 1 << 20)


@contextmanager
def user_errors():
    """User mistakes (UserError) pass through as their one line; anything else is logged with its
    traceback and reported as one line that points to the logs."""
    try:
        yield
    except UserError as error:
        logger.info("prediction failed: %s", error)
        raise
    except Exception as error:
        logger.exception("prediction failed")
        raise RuntimeError(f"internal error ({type(error).__name__}: {error}); the traceback is in the logs.") from None
