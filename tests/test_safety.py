"""The two-stage NSFW filter (safety.py), on the tiny weights, with real models and no mocks.

Stage one and stage two are rigged through their own weights or configs, in copies of the tiny
tree: a checker whose concept thresholds lie below any cosine similarity flags everything; a
detector whose classifier bias favours "nsfw" confirms everything; one whose classifier is a
linear probe on its own features separates bright images from dark ones; one whose processor
makes images of the wrong size raises in its forward.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image

from errors import UserError

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from safety import NSFW_MESSAGE, NSFWError, SafetyChecker  # noqa: E402
from scripts.tiny_weights import build  # noqa: E402

CPU = torch.device("cpu")
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def solid(color, size: int = 64) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def noise(size: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def rig_checker_flag_all(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    model = StableDiffusionSafetyChecker.from_pretrained(src)
    with torch.no_grad():  # below any cosine similarity: every concept scores > 0
        model.concept_embeds_weights.fill_(-2.0)
    model.save_pretrained(dst)


def rig_detector(src: Path, dst: Path, how: str) -> None:
    from transformers import ViTForImageClassification, ViTImageProcessorPil

    shutil.copytree(src, dst)
    model = ViTForImageClassification.from_pretrained(src).eval()
    nsfw, normal = model.config.label2id["nsfw"], model.config.label2id["normal"]
    classifier = model.classifier
    with torch.no_grad():
        if how == "confirm":
            classifier.bias[nsfw], classifier.bias[normal] = 5.0, -5.0
        elif how == "bright-is-nsfw":
            # A linear probe on the detector's own [CLS] features: logit(nsfw) - logit(normal)
            # is +10 on a white image and -10 on a black one.
            pixels = ViTImageProcessorPil.from_pretrained(src)([solid(BLACK), solid(WHITE)], return_tensors="pt")
            dark, bright = model.vit(pixel_values=pixels["pixel_values"]).last_hidden_state[:, 0]
            direction = (bright - dark) * 20.0 / (bright - dark).square().sum()
            offset = -direction @ (bright + dark) / 2
            classifier.weight.zero_()
            classifier.bias.zero_()
            classifier.weight[nsfw], classifier.bias[nsfw] = direction / 2, offset / 2
            classifier.weight[normal], classifier.bias[normal] = -direction / 2, -offset / 2
        elif how == "crash":  # its processor makes 48×48 images for a 32×32 model: forward raises
            config = json.loads((src / "preprocessor_config.json").read_text())
            config["size"] = {"height": 48, "width": 48}
            (dst / "preprocessor_config.json").write_text(json.dumps(config))
            return
        else:
            raise AssertionError(how)
    model.save_pretrained(dst)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("weights")
    build(root)
    rig_checker_flag_all(root / "safety-checker", root / "checker-flag-all")
    for how in ("confirm", "bright-is-nsfw", "crash"):
        rig_detector(root / "nsfw-detector", root / f"detector-{how}", how)
    return root


def load(tree: Path, checker: str, detector: str) -> SafetyChecker:
    return SafetyChecker.load(tree / checker, tree / detector, CPU, torch.float32)


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def count_calls(model: torch.nn.Module) -> list[int]:
    """Counts forward calls (and the batch size of each) through a forward hook."""
    calls: list[int] = []

    def hook(module, args, kwargs):
        calls.append(len([*args, *kwargs.values()][0]))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_unflagged_images_are_kept_and_stage_two_is_not_called(tree):
    safety = load(tree, "safety-checker", "detector-crash")
    stage_one, stage_two = count_calls(safety.checker), count_calls(safety.detector)
    assert safety.filter([solid(WHITE), solid(BLACK), noise(64, 0)]) == [0, 1, 2]
    assert stage_one == [3]  # one call for the whole batch
    assert stage_two == []  # not even the broken detector is consulted


def test_flagged_but_cleared_images_are_kept(tree, caplog):
    safety = load(tree, "checker-flag-all", "nsfw-detector")
    stage_one, stage_two = count_calls(safety.checker), count_calls(safety.detector)
    # diffusers' own logger does not propagate: listen on it directly.
    diffusers_logger = logging.getLogger(StableDiffusionSafetyChecker.__module__)
    diffusers_logger.addHandler(diffusers_records := Recorder())
    try:
        with caplog.at_level(logging.INFO, logger="safety"):
            assert safety.filter([solid(WHITE), solid(BLACK)]) == [0, 1]
    finally:
        diffusers_logger.removeHandler(diffusers_records)
    assert stage_one == [2] and stage_two == [2]
    assert "image 1: the safety checker flags it, the NSFW detector overrules" in caplog.text
    assert "removed" not in caplog.text
    assert not diffusers_records.records  # no "a black image will be returned instead": it is not


def test_mixed_batch_drops_only_confirmed_images(tree, caplog):
    safety = load(tree, "checker-flag-all", "detector-bright-is-nsfw")
    stage_two = count_calls(safety.detector)
    images = [solid(WHITE), solid(BLACK), solid(BLACK), solid(WHITE), solid(BLACK)]
    with caplog.at_level(logging.INFO, logger="safety"):
        assert safety.filter(images) == [1, 2, 4]
    assert stage_two == [5]  # one call for the flagged images
    removed = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
    assert removed == [
        "NSFW content detected: image 0 removed from the output",
        "NSFW content detected: image 3 removed from the output",
    ]


def test_all_unsafe_raises_nsfw_error(tree, caplog):
    safety = load(tree, "checker-flag-all", "detector-confirm")
    with caplog.at_level(logging.WARNING, logger="safety"), pytest.raises(NSFWError) as raised:
        safety.filter([solid(WHITE), noise(64, 1)])
    assert isinstance(raised.value, UserError)
    assert str(raised.value) == NSFW_MESSAGE
    assert NSFW_MESSAGE == "NSFW content detected. Try running it again, or try a different prompt."
    assert "image 0 removed" in caplog.text and "image 1 removed" in caplog.text


def test_stage_two_crash_fails_closed(tree, caplog):
    safety = load(tree, "checker-flag-all", "detector-crash")
    stage_two = count_calls(safety.detector)
    with caplog.at_level(logging.WARNING, logger="safety"), pytest.raises(NSFWError):
        safety.filter([solid(WHITE), solid(BLACK)])
    assert stage_two == [2]  # it was called, and it raised
    failure = next(r for r in caplog.records if "the NSFW detector failed" in r.getMessage())
    assert "treating images [0, 1] as unsafe" in failure.getMessage()
    assert failure.exc_info and "doesn't match model" in str(failure.exc_info[1])  # traceback logged


def test_detector_without_nsfw_label_is_refused_at_load(tree, tmp_path):
    config_path = shutil.copytree(tree / "nsfw-detector", tmp_path / "detector") / "config.json"
    config = json.loads(config_path.read_text())
    config["id2label"], config["label2id"] = {"0": "safe", "1": "unsafe"}, {"safe": 0, "unsafe": 1}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no 'nsfw' label"):
        SafetyChecker.load(tree / "safety-checker", tmp_path / "detector", CPU, torch.float32)


def test_empty_batch_is_not_an_error(tree):
    assert load(tree, "checker-flag-all", "detector-confirm").filter([]) == []
