"""The LoRAs in the predictor: the main fine-tune at lora_scale, an extra one, and failures."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from errors import UserError

SMALL = {"aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 2, "output_format": "png"}


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def plain_flux(tiny_weights, tmp_path_factory):
    """run(**inputs) of a second Predictor on the same weights tree without its lora.safetensors: the
    deployment that is plain FLUX, the reference for scale 0."""
    from cog._inspector import check_input, create_predictor

    import predict

    tree = tmp_path_factory.mktemp("plain-tree")
    for part in tiny_weights.iterdir():
        if part.name != "lora.safetensors":
            os.symlink(part, tree / part.name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLUX_WEIGHTS_DIR", str(tree))
        runner = predict.Predictor()
        runner.setup()
    fields = create_predictor("predict", "Predictor").inputs
    yield lambda **inputs: runner.run(**check_input(fields, inputs))
    runner.outputs.cleanup()


@pytest.fixture
def local_loras(tiny_weights, monkeypatch, tmp_path):
    """LORA_LOCAL_DIR: a folder the server offers; the tiny tree's LoRA is copied into it."""
    monkeypatch.setenv("LORA_LOCAL_DIR", str(tmp_path))
    shutil.copy(tiny_weights / "lora.safetensors", tmp_path / "main-copy.safetensors")
    return tmp_path


@pytest.mark.parametrize("model", ["dev", "schnell"])
def test_lora_scale_zero_is_exactly_the_base_model(run, plain_flux, model):
    base = plain_flux(prompt="a cat", seed=11, model=model, **SMALL)[0]
    assert (
        pixels(run(prompt="a cat", seed=11, model=model, lora_scale=0, **SMALL)[0]).tobytes() == pixels(base).tobytes()
    )
    assert not np.array_equal(pixels(run(prompt="a cat", seed=11, model=model, lora_scale=1, **SMALL)[0]), pixels(base))


def test_lora_scale_is_applied_once_linear_and_signed(run):
    """s·ΔW once: 0.37 moves the picture about 0.37 as far as 1 does, and -0.37 the other way. Scales
    of ±1 alone could not tell s from s³ (Replicate's predictors apply s²)."""
    images = {s: pixels(run(prompt="a cat", seed=11, lora_scale=s, **SMALL)[0]) for s in (-0.37, 0, 0.37, 1)}
    full = np.abs(images[1] - images[0]).mean()
    up, down = np.abs(images[0.37] - images[0]).mean(), np.abs(images[-0.37] - images[0]).mean()
    assert full > 0.5
    assert 0.25 < up / full < 0.65 and 0.25 < down / full < 0.65  # about linear (s² gives 0.14, s³ 0.05)
    assert np.abs(images[0.37] - images[-0.37]).mean() > max(up, down)  # opposite directions


def test_extra_lora_adds_the_same_delta_as_the_main_one(run, local_loras):
    """The main LoRA at 0 plus the same file as extra at 0.7 is the main LoRA at 0.7."""
    extra = str(local_loras / "main-copy.safetensors")
    via_extra = pixels(run(prompt="a cat", seed=11, lora_scale=0, extra_lora=extra, extra_lora_scale=0.7, **SMALL)[0])
    via_main = pixels(run(prompt="a cat", seed=11, lora_scale=0.7, **SMALL)[0])
    assert np.abs(via_extra - via_main).max() <= 1


def test_a_failing_extra_lora_is_one_clear_line_and_leaves_the_model_exact(run, local_loras):
    before = run(prompt="a cat", seed=11, **SMALL)[0].read_bytes()
    (local_loras / "bad.safetensors").write_bytes(b"<html>not a lora</html>")
    for source in (str(local_loras / "missing.safetensors"), str(local_loras / "bad.safetensors"), "not a lora"):
        with pytest.raises(UserError) as error:
            run(prompt="a cat", seed=11, extra_lora=source, **SMALL)
        assert "\n" not in str(error.value)
    assert run(prompt="a cat", seed=11, **SMALL)[0].read_bytes() == before
