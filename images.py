"""Images in and out: output sizes, reading the user's image and mask, writing the outputs.

Everything a user can get wrong about an image ends here in a UserError with one line that
says what was wrong and what to do.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path

from PIL import Image, ImageOps

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
# coglet 0.23 makes /tmp/coglet/predictions/<id>/{inputs,outputs} for every prediction, leaves them
# empty (inputs go to TMPDIR) and never removes them: 3 directories, 12 KB on ext4, per prediction.
COGLET_PREDICTIONS = Path("/tmp/coglet/predictions")
STALE_AFTER_S = 10.0


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
    return round_to_multiple(width * scale), round_to_multiple(height * scale)


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
    """Writes each prediction's images into a fresh directory with collision-free names.

    Cog uploads outputs by basename, so names carry a per-prediction id. The previous
    prediction's directory is removed when the next one starts (Cog has sent its files by
    then), and so are the empty folders coglet leaves behind, so disk use stays bounded over
    days of serving.
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root or tempfile.gettempdir())
        self.current: Path | None = None

    def new_prediction(self) -> Path:
        self.cleanup()
        prune_empty_dirs(COGLET_PREDICTIONS)
        self.current = Path(tempfile.mkdtemp(prefix="flux-out-", dir=self.root))
        return self.current

    def cleanup(self) -> None:
        if self.current is not None:
            for file in self.current.iterdir():
                file.unlink(missing_ok=True)
            self.current.rmdir()
            self.current = None

    def save(self, images: list[Image.Image], output_format: str, quality: int) -> list[Path]:
        directory = self.new_prediction()
        token = uuid.uuid4().hex[:12]
        paths = []
        for index, image in enumerate(images):
            path = directory / f"out-{token}-{index}.{output_format}"
            options = {} if output_format == "png" else {"quality": quality}
            image.convert("RGB").save(path, format=OUTPUT_FORMATS[output_format], **options)
            paths.append(path)
        return paths


def prune_empty_dirs(root: Path, older_than: float = STALE_AFTER_S) -> int:
    """Remove the folders directly under `root` that hold no file at all and have not changed for
    `older_than` seconds (coglet's leftovers); returns how many went. Never removes a file: rmdir
    refuses a folder that is not empty, so a folder still in use is left alone."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return 0
    now, removed = time.time(), 0
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            folders = [entry.path]
            for parent, dirs, files in os.walk(entry.path):
                if files or any(os.path.islink(os.path.join(parent, d)) for d in dirs):
                    raise OSError("not empty")
                folders.extend(os.path.join(parent, d) for d in dirs)
            if any(now - os.stat(folder).st_mtime < older_than for folder in folders):
                continue
            for folder in reversed(folders):  # children before parents
                os.rmdir(folder)
            removed += 1
        except OSError:
            continue
    if removed:
        logger.debug("removed %d empty folder(s) from %s", removed, root)
    return removed


class InputDownloads:
    """A folder of this worker's own for the files Cog downloads `image`/`mask` URLs into.

    Cog (0.23.1, `URLPath.convert`) downloads a URL input into a `tempfile.NamedTemporaryFile` in
    the default temp folder before the prediction starts, and removes it afterwards, except when
    the download fails (a 404, a URL that hangs): then the partial file stays for good. So setup()
    points Python's `tempfile.tempdir` (a process-wide setting) at a folder of this worker's,
    and each prediction, as it starts, removes the download files left there by earlier ones:
    at most the failed downloads since the last prediction remain, never a growing pile. Folders
    of workers that have exited are removed at setup.
    """

    PREFIX = "flux-inputs-"
    # NamedTemporaryFile's names: "tmp" + 8 characters of this alphabet, then Cog's suffix.
    DOWNLOAD_NAME = re.compile(r"^tmp[a-z0-9_]{8}")

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root or tempfile.gettempdir())
        self.folder = self.root / f"{self.PREFIX}{os.getpid()}"

    def isolate(self) -> Path:
        """Create this worker's folder, make it the process's temp folder and remove dead workers' ones."""
        for entry in self.root.glob(f"{self.PREFIX}*"):
            pid = entry.name.removeprefix(self.PREFIX)
            if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
        self.folder.mkdir(mode=0o700, exist_ok=True)
        tempfile.tempdir = str(self.folder)
        return self.folder

    def sweep(self, keep: list[Path | None]) -> int:
        """Remove earlier predictions' leftover downloads, never the files in `keep` (this
        prediction's inputs); returns how many went."""
        keep_names = {Path(p).name for p in keep if p is not None and Path(p).parent == self.folder}
        removed = 0
        for entry in os.scandir(self.folder) if self.folder.is_dir() else ():
            if entry.name in keep_names or not self.DOWNLOAD_NAME.match(entry.name):
                continue
            if entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
        if removed:
            logger.info("removed %d input file(s) left by failed downloads", removed)
        return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True
