"""Images in and out: output sizes, reading the user's image and mask, compositing, writing the outputs.

Everything a user can get wrong about an image ends here in a UserError with one line that
says what was wrong and what to do.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, PngImagePlugin

from errors import UserError

logger = logging.getLogger(__name__)

# The model page's aspect-ratio table: about one megapixel each, multiples of 16.
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
MULTIPLE = 16  # FLUX latents are 1/8 of the image, packed 2×2
MIN_SIDE, MAX_SIDE = 256, 1440  # the page's bounds for width and height
MAX_INPUT_PIXELS = 64_000_000  # refuse larger uploads before decoding them (decompression bombs)
OUTPUT_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}


def round_to_multiple(value: float, multiple: int = MULTIPLE) -> int:
    """The nearest multiple (halves round up), never below one multiple."""
    return max(multiple, int(value / multiple + 0.5) * multiple)


def txt2img_size(aspect_ratio: str, width: int | None, height: int | None) -> tuple[int, int]:
    """(width, height) of a text-to-image request."""
    if aspect_ratio != "custom":
        if width is not None or height is not None:
            logger.info("width/height are ignored unless aspect_ratio is 'custom'")
        return ASPECT_RATIOS[aspect_ratio]
    if width is None or height is None:
        raise UserError("aspect_ratio 'custom' needs both width and height: set them (256 to 1440).")
    size = round_to_multiple(width), round_to_multiple(height)
    if size != (width, height):
        logger.info("custom size %d×%d rounded to %d×%d (multiples of 16)", width, height, *size)
    return size


def size_for_image(width: int, height: int) -> tuple[int, int]:
    """Output size for an input image: its aspect, the longer side at most 1440, multiples of 16.

    Images smaller than 256 px on their shorter side are scaled up to it (FLUX does poorly
    below that); shapes too thin to fit 256–1440 on both sides are refused.
    """
    scale = min(1.0, MAX_SIDE / max(width, height))
    if min(width, height) * scale < MIN_SIDE:
        scale = MIN_SIDE / min(width, height)
        if max(width, height) * scale > MAX_SIDE + MULTIPLE / 2:
            raise UserError(
                f"image is {width}×{height}: too narrow for FLUX, whose sides must both fit "
                f"{MIN_SIDE} to {MAX_SIDE} px. Crop it to an aspect ratio of at most 5.6:1."
            )
    # Rounding to 16 can step past a bound (1448×256 → 1456): the sides stay within 256–1440.
    return tuple(min(MAX_SIDE, max(MIN_SIDE, round_to_multiple(side * scale))) for side in (width, height))


def open_image(path: str | Path, what: str) -> Image.Image:
    """Decode an uploaded image fully, or fail with a message naming the input (`what`)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_INPUT_PIXELS:
                    raise UserError(
                        f"{what} is {image.width}×{image.height} pixels, more than the "
                        f"{MAX_INPUT_PIXELS // 1_000_000} megapixels accepted: upload a smaller image."
                    )
                image.load()
                return ImageOps.exif_transpose(image)
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(
            f"{what} has more pixels than the {MAX_INPUT_PIXELS // 1_000_000} megapixels accepted: "
            "upload a smaller image."
        ) from None
    except (OSError, SyntaxError, ValueError) as error:  # PIL's ways of saying the file is broken
        logger.info("could not decode %s: %r", what, error)
        raise UserError(
            f"{what} could not be read as an image ({type(error).__name__}): upload a PNG, JPEG or WebP file."
        ) from None


def load_image(path: str | Path) -> Image.Image:
    """The img2img / inpaint input: RGB at its output size (see size_for_image)."""
    image = open_image(path, "image").convert("RGB")
    size = size_for_image(*image.size)
    if size != image.size:
        logger.info("input image %d×%d resized to %d×%d", *image.size, *size)
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def load_mask(path: str | Path, size: tuple[int, int]) -> Image.Image:
    """The inpaint mask as 8-bit grey at `size`: white is repainted, black is kept."""
    mask = open_image(path, "mask").convert("L")
    if mask.size != size:
        logger.info("mask %d×%d resized to the image's %d×%d", *mask.size, *size)
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return mask


def keep_unmasked(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """Paste the original back where the mask is black, so kept pixels are exactly the input's."""
    return Image.composite(generated, original, mask)


class OutputWriter:
    """Writes each prediction's images into a fresh folder with collision-free names.

    Cog uploads outputs by basename, so names carry a per-prediction id. Cog reads the files after
    run() returns and never says when it is done with them, so a prediction's folder is removed when
    the next one starts, and the last one when the process exits: disk use stays bounded over days of
    serving and nothing is left behind. Folders are `flux-out-<pid>-<random>` in TMPDIR, so that those
    of a worker that was killed (no exit handler runs) can be found and removed at the next setup
    (workarounds.remove_dead_workers_folders).
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root or tempfile.gettempdir())
        self.current: Path | None = None
        atexit.register(self.cleanup)

    def new_prediction(self) -> Path:
        self.cleanup()
        self.current = Path(tempfile.mkdtemp(prefix=f"flux-out-{os.getpid()}-", dir=self.root))
        return self.current

    def cleanup(self) -> None:
        if self.current is not None:
            shutil.rmtree(self.current, ignore_errors=True)
            self.current = None

    def save(
        self,
        images: list[Image.Image],
        output_format: str,
        quality: int,
        data: list[GenerationData] | None = None,
    ) -> list[Path]:
        """Write `images`, each in a thread of its own (Pillow's encoders release the GIL); `data[i]`
        goes into image i: a PNG `parameters` text chunk, or the EXIF UserComment of a JPEG or WebP,
        where A1111, Forge, CivitAI and sd-parsers read it."""
        directory = self.new_prediction()
        token = uuid.uuid4().hex[:12]
        paths = [directory / f"out-{token}-{i}.{output_format}" for i in range(len(images))]
        jobs = [(image, paths[i], None if data is None else data[i]) for i, image in enumerate(images)]
        if len(jobs) == 1:
            encode(*jobs[0], output_format, quality)
        else:
            with ThreadPoolExecutor(min(len(jobs), os.cpu_count() or 1), thread_name_prefix="encode") as pool:
                list(pool.map(lambda job: encode(*job, output_format, quality), jobs))
        return paths


# WebP `method` (0 fastest … 6 smallest; Pillow's default is 4): chosen on measured size and time at the
# same quality (bench/README.md, "Encoding the outputs"): about half the time of 4, bytes within ±2 %.
WEBP_METHOD = 2


def encode(image: Image.Image, path: Path, data: GenerationData | None, output_format: str, quality: int) -> None:
    """Write one output. Its generation data never fails it: data that cannot be embedded is shortened
    (a JPEG's EXIF holds 64 KB) or, failing that, left out with a warning in the logs."""
    image = image.convert("RGB")
    options: dict = {}
    if output_format == "webp":
        options = {"quality": quality, "method": WEBP_METHOD}
    elif output_format == "jpg":
        options = {"quality": quality}
    try:
        embedded = {} if data is None else _embedded(data, output_format)
        image.save(path, format=OUTPUT_FORMATS[output_format], **options, **embedded)
    except Exception:
        if data is None:
            raise
        logger.warning("%s: its generation data could not be embedded; written without it", path.name, exc_info=True)
        image.save(path, format=OUTPUT_FORMATS[output_format], **options)


@dataclass(frozen=True)
class GenerationData:
    """What made one image, for the readers of A1111's "parameters" text (Forge, CivitAI, sd-parsers).

    `loras` are (label, scale, AutoV3 hash) with labels that are safe to publish (no token, no query
    string, no local folder). `guidance` None: a model without guidance (schnell), where
    guidance_scale changes nothing and is not written."""

    prompt: str
    steps: int
    guidance: float | None
    seed: int
    size: tuple[int, int]
    model: str  # the weights' name, e.g. FLUX.1-dev
    model_hash: str
    loras: tuple[tuple[str, float, str], ...] = ()
    strength: float | None = None

    def text(self, fits: Callable[[str], bool] = lambda text: True) -> str:
        """The text as Forge writes it for FLUX: the prompt with a `<lora:name:scale>` tag per LoRA,
        then one line `Steps: …, Sampler: Euler, …`. When it does not `fit`, the prompt is cut (marked
        with "…"); if even that is not enough, the LoRA tags and hashes go."""
        for loras in (True, False):
            if fits(text := self._render(self.prompt, loras)):
                return text
            low, high = -1, len(self.prompt) - 1  # the longest cut of the prompt that fits, if any
            while low < high:
                middle = (low + high + 1) // 2
                if fits(self._render(self.prompt[:middle] + "…", loras)):
                    low = middle
                else:
                    high = middle - 1
            if low >= 0:
                return self._render(self.prompt[:low] + "…", loras)
        return self._render("…", loras=False)

    def _render(self, prompt: str, loras: bool = True) -> str:
        names = [(_lora_name(label), scale, autov3) for label, scale, autov3 in self.loras] if loras else []
        tags = " ".join(f"<lora:{name}:{scale:g}>" for name, scale, _ in names)
        pairs = [("Steps", self.steps), ("Sampler", "Euler"), ("Schedule type", "Simple"), ("CFG scale", 1)]
        if self.guidance is not None:
            pairs.append(("Distilled CFG Scale", f"{self.guidance:g}"))
        pairs += [("Seed", self.seed), ("Size", f"{self.size[0]}x{self.size[1]}")]
        pairs += [("Model hash", self.model_hash), ("Model", self.model)]
        if self.strength is not None:
            pairs.append(("Denoising strength", f"{self.strength:g}"))
        if names:
            pairs.append(("Lora hashes", ", ".join(f"{name}: {autov3}" for name, _, autov3 in names)))
        line = ", ".join(f"{key}: {_quoted(_encodable(str(value)))}" for key, value in pairs)
        return f"{_encodable(prompt.strip())}{' ' + tags if tags else ''}\n{line}"


def _encodable(text: str) -> str:
    """`text` with lone surrogates (valid in JSON and Python strings, refused by every encoder) written
    as `\\udXXX` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _lora_name(label: str) -> str:
    """A LoRA's label as a name fit for a `<lora:name:scale>` tag and the `Lora hashes` list: no scheme,
    and none of the characters that end or split them (`:`, `<`, `>`, `,`, quotes, whitespace)."""
    name = label.split("://", 1)[-1]
    return "".join("_" if c in ':<>,"' or not c.isprintable() or c.isspace() else c for c in name)


def _quoted(value: str) -> str:
    """A value as A1111 writes it: as is, or as a JSON string when it holds a `,`, a `:` or a newline."""
    if "," not in value and ":" not in value and "\n" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


EXIF_IFD, USER_COMMENT = 0x8769, 0x9286
JPEG_MARKER_BYTES = 65533  # a JPEG segment's most: the EXIF block (from "Exif\0\0") must fit in one


def _embedded(data: GenerationData, output_format: str) -> dict:
    """Pillow save() options that carry `data`: a PNG text chunk, else EXIF UserComment (UTF-16, as
    A1111 writes it with piexif's "unicode" encoding), shortened to fit a JPEG's EXIF segment."""
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("parameters", data.text())
        return {"pnginfo": info}
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0"
    room = JPEG_MARKER_BYTES - len(exif.tobytes())
    text = data.text() if output_format != "jpg" else data.text(fits=lambda t: len(t.encode("utf-16-be")) <= room)
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")
    return {"exif": exif.tobytes()}
