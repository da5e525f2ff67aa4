"""The LoRAs in the predictor: the main fine-tune at lora_scale, an extra one, and failures."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from errors import UserError

SMALL = {"aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 2, "output_format": "png"}


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture
def base_image(predictor, run, tiny_weights):
    """The plain FLUX image (no main LoRA at all) for seed 11."""
    predictor.loras.set_main(None)
    try:
        return run(prompt="a cat", seed=11, **SMALL)[0].read_bytes()
    finally:
        predictor.loras.set_main(tiny_weights / "lora.safetensors")


@pytest.mark.parametrize("model", ["dev", "schnell"])
def test_lora_scale_zero_is_exactly_the_base_model(run, predictor, tiny_weights, model):
    predictor.loras.set_main(None)
    try:
        base = run(prompt="a cat", seed=11, model=model, **SMALL)[0].read_bytes()
    finally:
        predictor.loras.set_main(tiny_weights / "lora.safetensors")
    assert run(prompt="a cat", seed=11, model=model, lora_scale=0, **SMALL)[0].read_bytes() == base
    assert run(prompt="a cat", seed=11, model=model, lora_scale=1, **SMALL)[0].read_bytes() != base


def test_lora_scale_is_applied_once_and_signed(run):
    images = {s: pixels(run(prompt="a cat", seed=11, lora_scale=s, **SMALL)[0]) for s in (-1, 0, 1)}
    # The tiny LoRA moves the tiny model's image by about one level per unit of scale.
    up, down = np.abs(images[1] - images[0]).mean(), np.abs(images[-1] - images[0]).mean()
    assert up > 0.3 and down > 0.3
    assert np.abs(images[1] - images[-1]).mean() > max(up, down)  # opposite directions


def test_extra_lora_adds_the_same_delta_as_the_main_one(run, tiny_weights):
    """The main LoRA at 0 plus the same file as extra at 0.7 is the main LoRA at 0.7."""
    extra = str(tiny_weights / "lora.safetensors")
    via_extra = pixels(run(prompt="a cat", seed=11, lora_scale=0, extra_lora=extra, extra_lora_scale=0.7, **SMALL)[0])
    via_main = pixels(run(prompt="a cat", seed=11, lora_scale=0.7, **SMALL)[0])
    assert np.abs(via_extra - via_main).max() <= 1


def test_a_failing_extra_lora_is_one_clear_line_and_leaves_the_model_exact(run, tmp_path, base_image):
    before = run(prompt="a cat", seed=11, **SMALL)[0].read_bytes()
    (tmp_path / "bad.safetensors").write_bytes(b"<html>not a lora</html>")
    for source in (str(tmp_path / "missing.safetensors"), str(tmp_path / "bad.safetensors"), "not a lora source"):
        with pytest.raises(UserError) as error:
            run(prompt="a cat", seed=11, extra_lora=source, **SMALL)
        assert "\n" not in str(error.value)
    assert run(prompt="a cat", seed=11, **SMALL)[0].read_bytes() == before
    assert before != base_image
