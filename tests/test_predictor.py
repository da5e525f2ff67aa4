"""The predictor, in process, on the tiny weights: what a user of the model page relies on."""

from __future__ import annotations

import io
import logging
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import images
from errors import UserError
from images import ASPECT_RATIOS

SMALL = {"aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 2}
MAGIC = {"webp": (b"RIFF", 8, b"WEBP"), "jpg": (b"\xff\xd8\xff", 0, b""), "png": (b"\x89PNG\r\n\x1a\n", 0, b"")}


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def write_image(path, size=(256, 256), color=None, seed=0):
    rng = np.random.default_rng(seed)
    array = np.full((size[1], size[0], 3), color, np.uint8) if color else rng.integers(0, 256, (size[1], size[0], 3))
    Image.fromarray(array.astype(np.uint8)).save(path)
    return str(path)


# --- sizes: the rules as unit tests, then one generation for each rule a user sees ---------------

# The model page's table (README.md): about one megapixel each, multiples of 16.
PAGE_SIZES = {
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


def test_every_aspect_ratio_has_the_page_size():
    assert set(ASPECT_RATIOS) == set(PAGE_SIZES)  # the schema's choices are exactly the page's
    for ratio, (width, height) in PAGE_SIZES.items():
        assert images.txt2img_size(ratio, None, None) == (width, height), ratio
        across, down = map(int, ratio.split(":"))
        assert width % 16 == 0 and height % 16 == 0 and 0.9e6 < width * height < 1.1e6, ratio
        assert abs(width / height - across / down) < 0.05 * across / down, ratio


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (256, 256, (256, 256)),
        (300, 1000, (304, 1008)),
        (1431, 263, (1424, 256)),
        (1440, 264, (1440, 272)),  # a half rounds up
        (257, 1439, (256, 1440)),
    ],
)
def test_custom_size_rounds_to_the_nearest_multiple_of_16(width, height, expected, caplog):
    with caplog.at_level(logging.INFO, logger="images"):
        assert images.txt2img_size("custom", width, height) == expected
    assert ("rounded to" in caplog.text) == ((width, height) != expected)


def test_width_and_height_are_ignored_unless_custom(caplog):
    with caplog.at_level(logging.INFO, logger="images"):
        assert images.txt2img_size("21:9", 512, 512) == (1536, 640)
    assert "ignored unless aspect_ratio is 'custom'" in caplog.text


@pytest.mark.parametrize(("width", "height"), [(512, None), (None, 512), (None, None)])
def test_custom_needs_both_width_and_height(width, height):
    with pytest.raises(UserError, match="custom.*width and height"):
        images.txt2img_size("custom", width, height)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((256, 256), (256, 256)),
        ((3000, 2000), (1440, 960)),  # longer side down to 1440
        ((200, 100), (512, 256)),  # shorter side up to 256
        ((16, 16), (256, 256)),
        ((333, 517), (336, 512)),  # rounded to multiples of 16
        ((1434, 256), (1440, 256)),
        ((1448, 256), (1440, 256)),  # rounding stays within the bounds (it gave 1456)
        ((256, 1447), (256, 1440)),
        ((8000, 8000), (1440, 1440)),
    ],
)
def test_image_size_keeps_the_aspect_within_256_to_1440(size, expected):
    assert images.size_for_image(*size) == expected


@pytest.mark.parametrize("size", [(40, 2000), (2000, 40), (1600, 256)])
def test_images_too_thin_for_flux_are_refused(size):
    with pytest.raises(UserError, match="too narrow for FLUX.*5.6:1"):
        images.size_for_image(*size)


def test_input_image_and_mask_are_read_at_the_output_size(tmp_path):
    image = images.load_image(write_image(tmp_path / "in.png", (3000, 2000), color=(10, 20, 30)))
    assert (image.mode, image.size) == ("RGB", (1440, 960))
    Image.new("RGBA", (50, 40), (255, 255, 255, 255)).save(tmp_path / "mask.png")
    mask = images.load_mask(tmp_path / "mask.png", image.size)
    assert (mask.mode, mask.size) == ("L", (1440, 960)) and mask.getextrema() == (255, 255)


def test_aspect_ratio_gives_its_size_and_ignores_width_and_height(run):
    [out] = run(prompt="a cat", aspect_ratio="21:9", width=512, height=512, num_inference_steps=1, seed=1)
    with Image.open(out) as image:
        assert image.size == (1536, 640)


def test_custom_size_is_rounded_in_the_output(run):
    [out] = run(prompt="a cat", aspect_ratio="custom", width=300, height=1000, num_inference_steps=1, seed=1)
    with Image.open(out) as image:
        assert image.size == (304, 1008)


def test_custom_without_width_is_a_clear_error(run):
    with pytest.raises(UserError, match="custom.*width and height"):
        run(prompt="a cat", aspect_ratio="custom", width=512)


# --- formats -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["webp", "jpg", "png"])
def test_output_formats_by_magic_bytes(run, fmt):
    [out] = run(prompt="a cat", output_format=fmt, seed=3, **SMALL)
    head = out.read_bytes()[:16]
    start, offset, tail = MAGIC[fmt]
    assert head.startswith(start) and head[offset : offset + len(tail)] == tail
    assert out.suffix == f".{fmt}"


@pytest.mark.parametrize("fmt", ["webp", "jpg"])
def test_output_quality_changes_the_encoding(run, fmt):
    low = run(prompt="a cat", output_format=fmt, output_quality=5, seed=3, **SMALL)[0].stat().st_size
    high = run(prompt="a cat", output_format=fmt, output_quality=100, seed=3, **SMALL)[0].stat().st_size
    assert high > 2 * low


def test_output_names_never_collide_and_old_outputs_are_removed(run):
    first = run(prompt="a cat", num_outputs=2, seed=3, **SMALL)
    first_dir = first[0].parent
    second = run(prompt="a cat", num_outputs=2, seed=3, **SMALL)
    assert len({p.name for p in first + second}) == 4
    assert second[0].parent != first_dir and not first_dir.exists()


def test_setup_outside_cogs_worker_leaves_the_temp_folder_alone(predictor):
    """Taking over Python's temp folder is a workaround for Cog's worker (workarounds.InputDownloads);
    a Predictor set up anywhere else leaves it as it was."""
    assert not predictor.inputs.active
    assert not Path(tempfile.gettempdir()).name.startswith("flux-inputs-")


# --- seeds -------------------------------------------------------------------------------------


def test_same_seed_same_bytes(run):
    a = run(prompt="a cat", seed=42, output_format="png", **SMALL)[0].read_bytes()
    b = run(prompt="a cat", seed=42, output_format="png", **SMALL)[0].read_bytes()
    c = run(prompt="a cat", seed=43, output_format="png", **SMALL)[0].read_bytes()
    assert a == b and a != c


def test_seed_zero_is_a_seed(run):
    a = pixels(run(prompt="a cat", seed=0, output_format="png", **SMALL)[0])
    b = pixels(run(prompt="a cat", seed=0, output_format="png", **SMALL)[0])
    assert (a == b).all()


def test_batch_output_i_is_the_single_run_with_seed_plus_i(run):
    batch = [pixels(p) for p in run(prompt="a cat", seed=100, num_outputs=3, output_format="png", **SMALL)]
    for i in range(3):
        single = pixels(run(prompt="a cat", seed=100 + i, output_format="png", **SMALL)[0])
        assert np.abs(batch[i] - single).max() <= 2  # batched kernels round differently (FACTS.md)
    assert np.abs(batch[0] - batch[1]).mean() > 5


def test_unset_seed_is_random_and_logged(run, caplog):
    with caplog.at_level(logging.INFO):
        a = pixels(run(prompt="a cat", output_format="png", **SMALL)[0])
        b = pixels(run(prompt="a cat", output_format="png", **SMALL)[0])
    assert np.abs(a - b).mean() > 5
    assert "random seed" in caplog.text and "seeds [" in caplog.text


def test_out_of_range_seed_is_a_clear_error(run):
    with pytest.raises(UserError, match="seed"):
        run(prompt="a cat", seed=-1, **SMALL)


# --- dev and schnell ---------------------------------------------------------------------------


def test_schnell_differs_from_dev(run):
    dev = pixels(run(prompt="a cat", model="dev", seed=5, num_inference_steps=4, output_format="png", **_no_steps())[0])
    schnell = pixels(
        run(prompt="a cat", model="schnell", seed=5, num_inference_steps=4, output_format="png", **_no_steps())[0]
    )
    assert np.abs(dev - schnell).mean() > 5


def test_schnell_caps_steps_at_four(run, caplog):
    with caplog.at_level(logging.INFO):
        capped = run(
            prompt="a cat", model="schnell", seed=5, num_inference_steps=28, output_format="png", **_no_steps()
        )[0].read_bytes()
    four = run(prompt="a cat", model="schnell", seed=5, num_inference_steps=4, output_format="png", **_no_steps())[
        0
    ].read_bytes()
    assert capped == four
    assert "at most 4 steps" in caplog.text


def test_schnell_ignores_guidance_and_dev_uses_it(run):
    kw = {"prompt": "a cat", "seed": 5, "output_format": "png", **SMALL}
    s1 = run(model="schnell", guidance_scale=1, **kw)[0].read_bytes()
    s2 = run(model="schnell", guidance_scale=9, **kw)[0].read_bytes()
    d1 = run(model="dev", guidance_scale=1, **kw)[0].read_bytes()
    d2 = run(model="dev", guidance_scale=9, **kw)[0].read_bytes()
    assert s1 == s2 and d1 != d2


def test_sequence_length_follows_the_model(predictor):
    assert predictor.models.traits("dev").max_sequence_length == 512
    assert predictor.models.traits("schnell").max_sequence_length == 256


def _no_steps():
    return {k: v for k, v in SMALL.items() if k != "num_inference_steps"}


# --- img2img and inpaint -----------------------------------------------------------------------


def test_img2img_output_size_follows_the_image(run, tmp_path):
    image = write_image(tmp_path / "in.png", (333, 517))
    [out] = run(prompt="a cat", image=image, aspect_ratio="16:9", num_inference_steps=2, seed=1)
    with Image.open(out) as result:
        assert result.size == (336, 512)


def test_img2img_uses_the_image_and_prompt_strength(run, tmp_path):
    red = write_image(tmp_path / "red.png", color=(255, 0, 0))
    blue = write_image(tmp_path / "blue.png", color=(0, 0, 255))
    kw = {"prompt": "a cat", "num_inference_steps": 4, "seed": 1, "output_format": "png"}

    # A partial strength keeps information from the image; strength 1 destroys all of it.
    def difference(strength):
        return np.abs(
            pixels(run(image=red, prompt_strength=strength, **kw)[0])
            - pixels(run(image=blue, prompt_strength=strength, **kw)[0])
        ).mean()

    assert difference(0.5) > 1 and difference(1.0) < 0.01


def test_prompt_strength_zero_still_runs_one_step(run, tmp_path, caplog):
    image = write_image(tmp_path / "in.png")
    with caplog.at_level(logging.INFO):
        [out] = run(prompt="a cat", image=image, prompt_strength=0, num_inference_steps=4, seed=1)
    assert out.exists() and "running 1" in caplog.text


def test_inpaint_keeps_black_mask_pixels_exactly(run, tmp_path):
    image = write_image(tmp_path / "in.png", (256, 256), seed=7)
    mask = np.zeros((256, 256), np.uint8)
    mask[:, 128:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    [out] = run(
        prompt="a cat",
        image=image,
        mask=str(tmp_path / "mask.png"),
        output_format="png",
        num_inference_steps=4,
        prompt_strength=1.0,
        seed=1,
    )
    result, original = pixels(out), pixels(image)
    assert (result[:, :128] == original[:, :128]).all()
    assert np.abs(result[:, 128:] - original[:, 128:]).mean() > 10


def test_inpaint_mask_of_another_size_and_mode_is_resized(run, tmp_path):
    image = write_image(tmp_path / "in.png", (256, 256), seed=7)
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((255, 255, 255, 255), (32, 0, 64, 64))
    mask.save(tmp_path / "mask.png")
    [out] = run(
        prompt="a cat", image=image, mask=str(tmp_path / "mask.png"), output_format="png", num_inference_steps=2, seed=1
    )
    result, original = pixels(out), pixels(image)
    assert result.shape == original.shape
    assert (result[:, :120] == original[:, :120]).all()


def test_mask_without_image_is_a_clear_error(run, tmp_path):
    mask = write_image(tmp_path / "mask.png")
    with pytest.raises(UserError, match="mask was given without image"):
        run(prompt="a cat", mask=mask)


# --- bad input ---------------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size and holds almost nothing (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()[:100]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "could not be read as an image"),
        (b"this is not an image at all", "could not be read as an image"),
        (truncated_png(), "could not be read as an image"),
        (png_header_only(100_000, 100_000), "megapixels"),
        (png_header_only(20_000, 1), "could not be read|too narrow"),
    ],
    ids=["empty", "text", "truncated", "bomb", "thin"],
)
def test_bad_images_fail_with_one_clear_line_and_the_next_request_works(run, tmp_path, content, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    before = run(prompt="a cat", seed=9, output_format="png", **SMALL)[0].read_bytes()
    with pytest.raises(UserError, match=message) as error:
        run(prompt="a cat", image=str(bad), **SMALL)
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)
    assert run(prompt="a cat", seed=9, output_format="png", **SMALL)[0].read_bytes() == before


def test_bad_mask_names_the_mask(run, tmp_path):
    image = write_image(tmp_path / "in.png")
    (tmp_path / "mask.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="^mask could not be read"):
        run(prompt="a cat", image=image, mask=str(tmp_path / "mask.png"))


def test_empty_prompt_is_a_clear_error(run):
    with pytest.raises(UserError, match="prompt is empty"):
        run(prompt="   ", **SMALL)


def test_unicode_and_very_long_prompts_work(run):
    assert run(prompt="猫のアスキーアート 🐱 " * 3, seed=1, **SMALL)[0].exists()
    assert run(prompt="an ascii cat " * 700, seed=1, **SMALL)[0].exists()  # 9,100 characters: past T5's 512 tokens


def test_schema_bounds_are_enforced_by_cog_checks(run):
    for bad in (
        {"num_outputs": 5},
        {"num_inference_steps": 0},
        {"lora_scale": 2.5},
        {"width": 100},
        {"output_quality": 101},
        {"aspect_ratio": "7:3"},
        {"model": "pro"},
        {"output_format": "gif"},
    ):
        with pytest.raises(ValueError):  # Cog's own check
            run(prompt="a cat", **bad)


def test_internal_errors_are_one_line_pointing_to_the_logs(predictor, run, caplog, monkeypatch):
    pipe = predictor.models.get("dev", "txt2img")

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(type(pipe), "__call__", broken)  # a fault inside diffusers, injected
    with caplog.at_level(logging.INFO), pytest.raises(RuntimeError) as error:
        run(prompt="a cat", **SMALL)
    assert str(error.value) == "internal error (RuntimeError: boom); the traceback is in the logs."
    assert "Traceback" in caplog.text
