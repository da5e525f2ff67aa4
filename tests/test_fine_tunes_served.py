"""Many fine-tunes on one server, over real HTTP: the main LoRA from COG_WEIGHTS (a Replicate-style
trained_model.tar served on 127.0.0.1), a fine-tune per request (`replicate_weights`), lists of
extra LoRAs with their own scales, and the generation data each output carries."""

from __future__ import annotations

import io
import re

import lora_fixtures as fx
import numpy as np
import pytest
from PIL import Image

from tests.cog_server import CogServer, decode_data_uri, scaled_lora
from tests.receivers import Receiver

SMALL = {"prompt": "an ascii art fox", "seed": 5, "aspect_ratio": "custom", "width": 256, "height": 256}
SMALL = {**SMALL, "num_inference_steps": 2, "output_format": "png", "disable_safety_checker": True}


@pytest.fixture(scope="module")
def rx(tiny_weights):
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_weights / "FLUX.1-dev" / "transformer")
    with Receiver() as receiver:
        tune = scaled_lora(tiny_weights, -3.0)  # the deployment's fine-tune, not the tree's own LoRA
        receiver.serve("trained_model.tar", fx.tar_bytes({"output/flux_train_replicate/lora.safetensors": tune}))
        receiver.serve("someone/same-as-cog-weights/_weights", fx.tar_bytes({"lora.safetensors": tune}))
        receiver.serve("someone/tree-lora/_weights", (tiny_weights / "lora.safetensors").read_bytes())
        receiver.serve("someone/tune-b/_weights", scaled_lora(tiny_weights, 5.0))
        receiver.serve("someone/peft/_weights", fx.diffusers_peft(transformer, rank=4, seed=41).to_bytes())
        receiver.serve("someone/kohya/_weights", fx.bfl_family(transformer, style="kohya", rank=4, seed=42).to_bytes())
        xlabs = fx.xlabs(transformer, rank=2, seed=43).to_bytes()
        receiver.serve("someone/xlabs/_weights", fx.tar_bytes({"output/lora.safetensors": xlabs}))
        yield receiver


@pytest.fixture(scope="module")
def server(tiny_weights, rx, tmp_path_factory):
    env = {
        "COG_WEIGHTS": f"{rx.url}/files/trained_model.tar",  # the operator's, on a private address: trusted
        "REPLICATE_ENDPOINT": rx.url + "/files",
        "LORA_CACHE_DIR": str(tmp_path_factory.mktemp("lora-cache")),
        "LORA_MAX_RANK": "12",
    }
    with CogServer(tiny_weights, env=env) as cog:
        cog.wait_for("READY")
        yield cog


def picture(server, **inputs) -> list[bytes]:
    body = server.predict({**SMALL, **inputs}).json()
    assert body["status"] == "succeeded", body
    return [decode_data_uri(uri)[1] for uri in body["output"]]


def read_parameters(path) -> str | None:
    """The generation parameters in an output, read as A1111 and CivitAI read them: a PNG text chunk
    named "parameters", else the EXIF UserComment ("UNICODE\\0" + UTF-16, as piexif writes it)."""
    with Image.open(path) as image:
        if "parameters" in image.info:
            return image.info["parameters"]
        comment = image.getexif().get_ifd(0x8769).get(0x9286)  # the Exif IFD, UserComment
    if isinstance(comment, bytes) and comment.startswith(b"UNICODE\0"):
        return comment[8:].decode("utf-16-be")
    return comment


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_the_main_lora_comes_from_cog_weights(server, rx):
    assert "LoRA main fine-tune:" in server.logs()  # named, not located: the URL may be the key to it
    assert "trained_model" not in server.logs() and "/files/" not in server.logs()
    default = picture(server)
    same = picture(server, replicate_weights="someone/same-as-cog-weights")  # the same fine-tune (other data)
    assert pixels(same[0]).tobytes() == pixels(default[0]).tobytes()
    assert picture(server, replicate_weights="someone/tree-lora") != default  # not weights/lora.safetensors
    assert picture(server, lora_scale=0) != default


def test_an_unreachable_cog_weights_fails_setup_with_one_line(tiny_weights, rx, tmp_path):
    env = {"COG_WEIGHTS": f"{rx.url}/files/missing.tar", "LORA_CACHE_DIR": str(tmp_path)}
    with CogServer(tiny_weights, env=env) as cog:
        health = cog.wait_for("SETUP_FAILED")
    logs = health["setup"]["logs"]
    assert "the main LoRA (COG_WEIGHTS) could not be loaded" in logs and "404" in logs


def test_replicate_weights_swaps_fine_tunes_and_back_bit_for_bit(server):
    own = picture(server)
    b = picture(server, replicate_weights="someone/tune-b")
    tree = picture(server, replicate_weights="someone/tree-lora")
    assert len({own[0], b[0], tree[0]}) == 3
    assert picture(server, replicate_weights="someone/tune-b") == b
    assert picture(server) == own  # the deployment's own fine-tune again, bit for bit


def test_lists_of_one_two_and_three_extra_loras(server):
    one = picture(server, extra_lora="someone/peft:0.5")
    assert one == picture(server, extra_lora="someone/peft", extra_lora_scale=0.5)  # `:s` is extra_lora_scale
    assert picture(server, extra_lora="someone/peft:0.5, someone/kohya:0") == one  # scale 0 is absent
    two = picture(server, extra_lora="someone/peft:0.5, someone/kohya:-0.8")
    three = picture(server, extra_lora="someone/peft:0.5\nsomeone/kohya:-0.8, someone/xlabs", extra_lora_scale=1.5)
    assert len({one[0], two[0], three[0]}) == 3
    reordered = picture(server, extra_lora="someone/xlabs:1.5, someone/kohya:-0.8, someone/peft:0.5")
    assert np.abs(pixels(reordered[0]) - pixels(three[0])).max() <= 1  # order: float rounding at most


def test_too_much_rank_together_is_one_clear_line(server):
    body = server.predict(
        {**SMALL, "extra_lora": "someone/peft, someone/kohya, someone/peft:0.3, someone/kohya"}
    ).json()
    assert body["status"] == "failed"
    assert "need 16 ranks together" in body["error"] and "over the 12" in body["error"] and "\n" not in body["error"]


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_every_output_carries_its_generation_data(server, fmt, tmp_path):
    inputs = {"num_outputs": 2, "seed": 77, "output_format": fmt, "extra_lora": "someone/kohya:-0.4"}
    outputs = picture(server, **inputs, hf_api_token="hf_SECRETSECRET", replicate_weights="someone/tune-b")
    for index, data in enumerate(outputs):
        path = tmp_path / f"out{index}.{fmt}"
        path.write_bytes(data)
        text = read_parameters(path)
        prompt, line = text.split("\n")
        assert prompt == SMALL["prompt"] + " <lora:someone/tune-b:1> <lora:someone/kohya:-0.4>"
        assert f"Seed: {77 + index}," in line and "Steps: 2," in line and "Size: 256x256" in line
        assert "Sampler: Euler" in line and "Distilled CFG Scale: 3.5" in line and "Model: FLUX.1-dev" in line
        assert re.search(r'Lora hashes: "someone/tune-b: [0-9a-f]{12}, someone/kohya: [0-9a-f]{12}"', line)
        assert "SECRET" not in text and "?" not in text and "/tmp" not in text


def test_the_labels_are_the_requests_own_when_the_bytes_are_the_same(server, tmp_path):
    """someone/same-as-cog-weights holds the deployment's fine-tune, byte for byte: each request's data
    names the LoRA as that request did, whoever loaded the bytes first."""
    for inputs, name in (
        ({"replicate_weights": "someone/same-as-cog-weights"}, "someone/same-as-cog-weights"),
        ({}, "fine-tune"),
        ({"replicate_weights": "someone/same-as-cog-weights"}, "someone/same-as-cog-weights"),
    ):
        path = tmp_path / "out.png"
        path.write_bytes(picture(server, **inputs)[0])
        assert read_parameters(path).split("\n")[0] == f"{SMALL['prompt']} <lora:{name}:1>"
