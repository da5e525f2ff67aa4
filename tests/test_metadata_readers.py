"""Generation data that real readers understand: our png, jpg and webp outputs read back with sd-parsers
(the library image browsers use), as Forge writes them for FLUX, and never a failed output because of it."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import struct

import pytest
from PIL import Image
from sd_parsers import ParserManager

import images
from tests.cog_server import scaled_lora

SMALL = {"aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 2}
SMALL = {**SMALL, "disable_safety_checker": True}
TAG = re.compile(r"<lora:([^:>]+):([^>]+)>")


def autov3(data: bytes) -> str:
    """CivitAI's AutoV3, written here from its definition: SHA-256 of the bytes after the header."""
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n :]).hexdigest()[:12]


def model_hash(tiny_weights, part: str) -> str:
    files = sorted((tiny_weights / part / "transformer").glob("*.safetensors"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:10]


def read(path):
    """(sd-parsers' PromptInfo, the raw parameters text) of an output."""
    info = ParserManager().parse(str(path))
    assert info is not None, f"sd-parsers finds nothing in {path.name}"
    return info, info.raw_parameters["parameters"]


def lora_hashes(raw: str) -> dict[str, str]:
    """The `Lora hashes: "name: hash, …"` field of the settings line (sd-parsers keeps it only raw)."""
    found = re.search(r'Lora hashes: "([^"]*)"', raw.rsplit("\n", 1)[-1])
    return dict(item.split(": ") for item in found.group(1).split(", ")) if found else {}


@pytest.fixture
def styles(tiny_weights, monkeypatch, tmp_path):
    """Two LoRAs the server offers (LORA_LOCAL_DIR), as name → bytes."""
    monkeypatch.setenv("LORA_LOCAL_DIR", str(tmp_path))
    files = {"style-a.safetensors": scaled_lora(tiny_weights, 5), "style-b.safetensors": scaled_lora(tiny_weights, -2)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path, files


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_sd_parsers_reads_every_field_of_every_format(run, tiny_weights, styles, fmt):
    folder, files = styles
    extra = f"{folder / 'style-a.safetensors'}:0.5, {folder / 'style-b.safetensors'}:-0.4"
    outputs = run(
        prompt="an ascii art fox", seed=77, num_outputs=2, lora_scale=0.8, extra_lora=extra, output_format=fmt, **SMALL
    )
    expected = {"fine-tune": 0.8, "style-a.safetensors": 0.5, "style-b.safetensors": -0.4}
    hashes = {
        "fine-tune": autov3((tiny_weights / "lora.safetensors").read_bytes()),
        **{name: autov3(data) for name, data in files.items()},
    }
    for index, path in enumerate(outputs):
        info, raw = read(path)
        (sampler,) = info.samplers
        prompt = str(info.prompts[0])
        assert TAG.sub("", prompt).strip() == "an ascii art fox"
        assert {name: float(scale) for name, scale in TAG.findall(prompt)} == expected
        assert lora_hashes(raw) == hashes
        assert sampler.name == "Euler" and sampler.parameters["scheduler"] == "Simple"
        assert sampler.parameters["seed"] == str(77 + index) and sampler.parameters["steps"] == "2"
        assert sampler.parameters["cfg_scale"] == "1" and info.metadata["Distilled CFG Scale"] == "3.5"
        assert info.metadata["Size"] == "256x256"
        (model,) = info.models
        assert (model.name, model.hash) == ("FLUX.1-dev", model_hash(tiny_weights, "FLUX.1-dev"))


def test_schnell_has_no_guidance_and_its_own_model(run, tiny_weights):
    info, raw = read(run(prompt="a cat", seed=3, model="schnell", lora_scale=0, output_format="png", **SMALL)[0])
    (model,) = info.models
    assert (model.name, model.hash) == ("FLUX.1-schnell", model_hash(tiny_weights, "FLUX.1-schnell"))
    assert "Distilled CFG Scale" not in raw and "<lora:" not in raw and "Lora hashes" not in raw
    assert info.samplers[0].parameters["steps"] == "2"


def test_labels_belong_to_the_request_not_to_whoever_loaded_the_bytes_first(run, styles, predictor):
    folder, files = styles
    (folder / "someone-elses-private.safetensors").write_bytes(files["style-a.safetensors"])
    run(prompt="a cat", seed=1, extra_lora=str(folder / "someone-elses-private.safetensors"), **SMALL)
    for repeat in range(2):  # a fresh write of the same file, then "the same set as before"
        if repeat:
            run(prompt="a cat", seed=1, extra_lora=str(folder / "style-a.safetensors"), **SMALL)
        (path,) = run(prompt="a cat", seed=1, extra_lora=str(folder / "style-a.safetensors"), **SMALL)
        _, raw = read(path)
        assert "style-a.safetensors" in raw and "someone-elses" not in raw
        view = predictor.loras.state(predictor.models.get("dev", "txt2img").transformer)
        assert [label for label, _ in view["extra"].loras] == ["style-a.safetensors"]


def test_every_lora_keeps_its_hash_when_parsed_ones_do_not_all_fit_in_memory(
    run, styles, predictor, tiny_weights, monkeypatch
):
    folder, files = styles
    monkeypatch.setattr(predictor.loras, "memory_bytes", 1)  # LORA_MEMORY_MAX_BYTES: one parsed LoRA at a time
    for name, data in files.items():  # new files: parsed in this request, the first evicted by the second
        (folder / f"fresh-{name}").write_bytes(data)
    extra = ", ".join(str(folder / f"fresh-{name}") for name in files)
    (path,) = run(prompt="a cat", seed=1, extra_lora=extra, output_format="png", **SMALL)
    _, raw = read(path)
    expected = {f"fresh-{name}": autov3(data) for name, data in files.items()}
    assert lora_hashes(raw) == {"fine-tune": autov3((tiny_weights / "lora.safetensors").read_bytes()), **expected}


def test_a_lone_surrogate_is_written_escaped_in_every_format(tmp_path):
    """Valid in JSON and in a Python string, refused by every encoder: written as its escape. (check_inputs
    refuses one in the prompt before any work; labels and future fields are covered here.)"""
    data = images.GenerationData("a cat \ud83d and more", 2, 3.5, 1, (64, 64), "FLUX.1-dev", "0123456789")
    data = dataclasses.replace(data, loras=(("odd\udc00name", 1.0, "0" * 12),))
    for fmt in ("png", "jpg", "webp"):
        (path,) = images.OutputWriter(tmp_path).save([Image.new("RGB", (64, 64))], fmt, 90, [data])
        info, raw = read(path)
        assert TAG.sub("", str(info.prompts[0])).strip() == "a cat \\ud83d and more"
        assert lora_hashes(raw) == {"odd_name": "0" * 12}  # a name: what would split or end it is "_"


def test_a_jpeg_over_its_64_kb_of_exif_keeps_the_settings_and_cuts_the_prompt(tmp_path):
    """10,000 characters of emoji are 40 KB in UTF-16; 40 LoRAs with 300-character names 50 KB more."""
    loras = tuple((f"https://example.com/{'x' * 300}-{i}.safetensors", 0.5, f"{i:012x}") for i in range(40))
    data = images.GenerationData("🐱" * 10_000, 28, 3.5, 9, (256, 256), "FLUX.1-dev", "0123456789", loras)
    image = Image.new("RGB", (64, 64), (200, 10, 10))
    for fmt in ("jpg", "webp", "png"):
        (path,) = images.OutputWriter(tmp_path).save([image], fmt, 90, [data])
        info, raw = read(path)
        assert info.samplers[0].parameters["seed"] == "9" and info.metadata["Size"] == "256x256"
        prompt = TAG.sub("", str(info.prompts[0])).strip()
        if fmt == "jpg":
            assert prompt.endswith("…") and 1_000 < len(prompt) < 10_000 and prompt.startswith("🐱🐱")
            assert len(TAG.findall(str(info.prompts[0]))) == len(lora_hashes(raw)) == 40
        else:  # no such limit: all of it
            assert prompt == "🐱" * 10_000 and len(lora_hashes(raw)) == 40


def test_data_that_cannot_be_embedded_never_fails_the_output(run, monkeypatch, caplog):
    def broken(data, output_format):
        raise ValueError("metadata trouble")

    monkeypatch.setattr(images, "_embedded", broken)  # a fault in building the metadata, injected
    with caplog.at_level(logging.WARNING, logger="images"):
        (path,) = run(prompt="a cat", seed=1, output_format="jpg", **SMALL)
    with Image.open(path) as image:
        assert image.size == (256, 256)
    assert "could not be embedded" in caplog.text and ParserManager().parse(str(path)) is None
