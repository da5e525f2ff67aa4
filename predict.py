"""The Cog predictor: FLUX.1 dev/schnell with a LoRA fine-tune, as on its Replicate model page.

One prediction: inputs → checks → sizes → pipeline → LoRAs → generate → safety → encode.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

# No transformers or diffusers at import (nor pipelines, which imports diffusers' pipelines): Cog's
# inspector would import all their submodules, and diffusers' imports warn before setup() has set up
# logging (workarounds.configure_logging). setup() imports pipelines.
import torch
from cog import BaseRunner, Input, Path, Secret

import images
import model_weights
import workarounds
from errors import UserError
from images import ASPECT_RATIOS, OutputWriter
from lora_loader import LoraManager
from loras.cache import LoraCache, UserTokens
from loras.sources import split_sources
from safety import SafetyChecker

if TYPE_CHECKING:
    from pipelines import ModelTraits

logger = logging.getLogger(__name__)

SEED_MAX = 2**63  # torch.Generator takes signed and unsigned 64-bit seeds; we accept 0 ≤ seed+i < 2^63
# Bounds on what one request's strings may cost before the model runs (tokenizing a 2 MB prompt took
# 19 s, a 20 MB one 273 s): T5 reads 512 tokens, about 2,000 characters of English; CLIP 77 tokens.
MAX_PROMPT_CHARS = 10_000
MAX_SOURCE_CHARS = 16_384  # LoRA sources: a URL or a name, or a list of them
MAX_TOKEN_CHARS = 1_024
# The deployment's own fine-tune in logs and generation data: COG_WEIGHTS may be a URL whose path is the
# key to a private model (replicate.delivery), so its name says nothing of where it lives.
MAIN_LORA_LABEL = "fine-tune"
WEIGHTS = {"dev": "FLUX.1-dev", "schnell": "FLUX.1-schnell"}  # model → its part of the weights tree


class Predictor(BaseRunner):
    def setup(self, weights: str | None = None) -> None:
        """`weights`: the deployment's fine-tune, which Cog fills from COG_WEIGHTS (a Replicate trained
        version's weights: any source `extra_lora` accepts); else `lora.safetensors` in the weights
        tree; else plain FLUX."""
        in_worker = workarounds.in_cog_worker()  # process-wide workarounds only there (workarounds.py)
        self.heap = workarounds.HeapTrim(enabled=in_worker)  # after each prediction, if memory grew
        workarounds.configure_logging(os.environ.get("LOG_LEVEL", "INFO"))
        started = time.perf_counter()
        self.model_thread = workarounds.ModelThread()  # every call into the models runs there
        self.model_thread.call(self.load, weights)
        self.outputs = OutputWriter()  # its last folder goes when the process exits
        self.inputs = workarounds.InputDownloads()
        if in_worker:
            self.inputs.isolate()  # last: from here on Python's temp files go to this worker's folder
        logger.info("setup done in %.1f s", time.perf_counter() - started)

    def load(self, weights: str | None) -> None:
        """The models, the safety checker and the deployment's LoRA (on the model thread)."""
        from pipelines import FluxModels, device_and_dtype  # after configure_logging (workarounds.py)

        root = model_weights.weights_dir()
        device, dtype = device_and_dtype()
        folders = {model: model_weights.ensure(part, root) for model, part in WEIGHTS.items()}
        self.models = FluxModels(folders["dev"], folders["schnell"], device, dtype)
        self.model_hashes = {
            model: model_weights.model_hash(folder / "transformer") for model, folder in folders.items()
        }
        self.safety = SafetyChecker.load(
            model_weights.ensure("safety-checker", root), model_weights.ensure("nsfw-detector", root), device, dtype
        )
        cache = LoraCache.from_env()
        with setup_errors("the main LoRA (COG_WEIGHTS)" if weights else "the main LoRA (weights/lora.safetensors)"):
            main = (
                cache.fetch(weights, operator=True, label=MAIN_LORA_LABEL) if weights else model_weights.main_lora(root)
            )
            self.loras = LoraManager.from_env(
                list(self.models.transformers.values()),
                self.models.text_encoder,
                cache,
                main=main,
                main_label=MAIN_LORA_LABEL,
                t5=self.models.get("dev", "txt2img").text_encoder_2,
            )
        if device.type == "cuda":
            self.compile(warmup_sizes=[ASPECT_RATIOS["1:1"], ASPECT_RATIOS["16:9"]])

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
            adapter_shape=self.loras.adapter_shape,
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
        # Fields of ours, after the model page's 18.
        replicate_weights: str | None = Input(
            description="Replicate LoRA weights to use. Leave blank to use the default weights.", default=None
        ),
        hf_api_token: Secret | None = Input(
            description="Your Hugging Face token, to use your own private or gated LoRAs. Sent only to Hugging "
            "Face, never logged or stored; LoRAs fetched with it are cached for requests that bring it.",
            default=None,
        ),
        civitai_api_token: Secret | None = Input(
            description="Your CivitAI API token, for LoRAs that need a login. Sent only to CivitAI, never logged "
            "or stored; LoRAs fetched with it are cached for requests that bring it.",
            default=None,
        ),
    ) -> list[Path]:
        if not self.model_thread.is_current():  # Cog's thread: the same call, on the model thread
            arguments = dict(locals())
            del arguments["self"]
            return self.model_thread.call(self.run, **arguments)
        with user_errors(), self.heap:
            # 1. Check inputs; pick the mode, the pipeline, the sizes and the seeds.
            self.inputs.check_local(image=image, mask=mask)
            self.inputs.sweep(keep=[image, mask])
            traits = self.models.traits(model)
            request = check_inputs(
                prompt, image, mask, aspect_ratio, width, height, num_outputs, num_inference_steps, traits,
                prompt_strength, seed, extra_lora, extra_lora_scale, replicate_weights, hf_api_token,
                civitai_api_token,
            )  # fmt: skip
            pipe = self.models.get(model, request.mode)

            # 2. LoRAs: exactly the main one (or replicate_weights) at lora_scale plus the extra ones.
            cache_before = self.loras.cache.counts.copy()
            applied = self.loras.apply(
                pipe.transformer,
                lora_scale,
                extra_lora,
                extra_lora_scale,
                main=replicate_weights,
                tokens=request.tokens,
            )
            self.record_metric("lora_fetch_time", round(applied.prepare_s, 4))
            self.record_metric("lora_apply_time", round(applied.write_s, 4))
            for event in ("hits", "misses", "evictions"):  # the disk cache's, for the operator's metrics
                self.record_metric(f"lora_cache_{event}", self.loras.cache.counts[event] - cache_before[event])

            # 3. Generate: one batch, output i from seed + i; a log line per step.
            logger.info(
                "%s %s %d×%d, %d steps, seeds %s", model, request.mode, *request.size, request.steps, request.seeds
            )
            with self.stage("generate") as timer:
                outputs = pipe(
                    prompt=prompt,
                    width=request.size[0],
                    height=request.size[1],
                    num_inference_steps=request.steps,
                    guidance_scale=guidance_scale,
                    num_images_per_prompt=num_outputs,
                    max_sequence_length=traits.max_sequence_length,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in request.seeds],
                    callback_on_step_end=log_step,
                    **request.images,
                ).images
            logger.info("generated %d image(s) in %.2f s", len(outputs), timer.seconds)
            if request.mode == "inpaint":
                outputs = [
                    images.keep_unmasked(o, request.images["image"], request.images["mask_image"]) for o in outputs
                ]

            # 4. Safety, then encode, each image with the data that made it (its own seed).
            with self.stage("safety"):
                kept = list(range(len(outputs))) if disable_safety_checker else self.safety.filter(outputs)
            if disable_safety_checker:
                logger.info("safety checker disabled")
            made = images.GenerationData(
                prompt,
                steps=request.steps,
                guidance=guidance_scale if traits.guidance else None,
                seed=request.seeds[0],
                size=request.size,
                model=WEIGHTS[model],
                model_hash=self.model_hashes[model],
                loras=tuple((lora.label, lora.scale, lora.autov3) for lora in applied.loras),
                strength=request.images.get("strength"),
            )
            data = [dataclasses.replace(made, seed=request.seeds[i]) for i in kept]
            with self.stage("encode"):
                saved = self.outputs.save([outputs[i] for i in kept], output_format, output_quality, data)
            return [Path(p) for p in saved]

    @contextmanager
    def stage(self, name: str):
        """Time a stage of a prediction into Cog's metrics as `<name>_time` (seconds), as Cog's own
        `predict_time`; a no-op outside a prediction (Cog's record_metric)."""
        timer = Timer()
        try:
            yield timer
        finally:
            timer.seconds = time.perf_counter() - timer.started
            self.record_metric(f"{name}_time", round(timer.seconds, 4))


@dataclass
class Timer:
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0


def log_step(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
    """The pipelines' callback_on_step_end: one short line per denoising step in the prediction's logs
    (`step 3/28`), which Cog carries to clients (README, "Progress")."""
    logger.info("step %d/%d", step + 1, pipe.num_timesteps)
    return callback_kwargs


@dataclass(frozen=True)
class Request:
    """What run() needs from a request's inputs once they are checked."""

    mode: str  # txt2img | img2img | inpaint
    size: tuple[int, int]  # (width, height)
    steps: int
    seeds: list[int]  # one per output
    images: dict = field(default_factory=dict)  # the pipeline's image / mask_image / strength arguments
    tokens: UserTokens | None = None


def check_inputs(
    prompt: str,
    image: Path | None,
    mask: Path | None,
    aspect_ratio: str,
    width: int | None,
    height: int | None,
    num_outputs: int,
    num_inference_steps: int,
    traits: ModelTraits,
    prompt_strength: float,
    seed: int | None,
    extra_lora: str | None,
    extra_lora_scale: float,
    replicate_weights: str | None,
    hf_api_token: Secret | None,
    civitai_api_token: Secret | None,
) -> Request:
    """Every check a request needs beyond the schema, in one place (UserError names the input), and
    what the rest of run() derives from the inputs. Bounds keep any single request cheap before the
    model runs: a prompt, a LoRA source and a token are bounded strings, images in pixels (images.py)."""
    if prompt is None or not prompt.strip():
        raise UserError("prompt is empty: describe the image you want.")
    if (odd := next((i for i, c in enumerate(prompt) if "\ud800" <= c <= "\udfff"), None)) is not None:
        raise UserError(
            f"prompt holds half of a UTF-16 pair ({prompt[odd].encode('unicode_escape').decode()} at character "
            f"{odd + 1}), which is no character: send valid Unicode (was the prompt cut inside an emoji?)."
        )
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UserError(
            f"prompt is {len(prompt):,} characters, over the {MAX_PROMPT_CHARS:,} accepted: FLUX reads only its "
            "first 512 tokens (about 2,000 characters of English), so shorten it."
        )
    for name, text in (("extra_lora", extra_lora), ("replicate_weights", replicate_weights)):
        if text is not None and len(text) > MAX_SOURCE_CHARS:
            raise UserError(f"{name} is {len(text):,} characters, over the {MAX_SOURCE_CHARS:,} accepted.")
    split_sources(extra_lora, extra_lora_scale)  # the list's syntax and scales, before any download
    tokens = {}
    for name, secret in (("hf_api_token", hf_api_token), ("civitai_api_token", civitai_api_token)):
        value = (secret.get_secret_value() or "").strip() if secret is not None else ""
        if len(value) > MAX_TOKEN_CHARS or any(c.isspace() or not c.isprintable() for c in value):
            raise UserError(
                f"{name} does not look like an API token (one line of at most {MAX_TOKEN_CHARS} characters)."
            )
        tokens[name] = value
    if mask is not None and image is None:
        raise UserError("mask was given without image: inpainting needs both, or drop the mask.")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "big")
        logger.info("no seed given: using random seed %d", seed)
    if not 0 <= seed <= SEED_MAX - num_outputs:
        raise UserError(
            f"seed {seed} is out of range: with num_outputs={num_outputs} (seeds seed … seed+{num_outputs - 1}), "
            f"use an integer from 0 to {SEED_MAX - num_outputs}."
        )
    steps = num_inference_steps
    if traits.max_steps is not None and steps > traits.max_steps:
        logger.info(
            "this model runs at most %d steps: using %d instead of %d", traits.max_steps, traits.max_steps, steps
        )
        steps = traits.max_steps
    call: dict = {}
    if image is None:
        mode, size = "txt2img", images.txt2img_size(aspect_ratio, width, height)
    else:
        mode = "inpaint" if mask is not None else "img2img"
        logger.info("%s: aspect_ratio, width and height are ignored; the size follows the image", mode)
        call["image"] = images.load_image(image)
        size = call["image"].size
        if mode == "inpaint":
            call["mask_image"] = images.load_mask(mask, size)
        if prompt_strength * steps < 1:
            logger.info("prompt_strength %.3g with %d steps would run no step: running 1", prompt_strength, steps)
            prompt_strength = 1 / steps
        call["strength"] = prompt_strength
    user_tokens = UserTokens(huggingface=tokens["hf_api_token"], civitai=tokens["civitai_api_token"])
    return Request(mode, size, steps, [seed + i for i in range(num_outputs)], call, user_tokens)


@contextmanager
def setup_errors(what: str):
    """A setup step whose failure is the operator's to fix: one line in Cog's setup.logs."""
    try:
        yield
    except UserError as error:
        raise RuntimeError(f"{what} could not be loaded: {error}") from None


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
