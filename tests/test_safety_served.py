"""The safety checker in its place: in the predictor, and through the real Cog server."""

from __future__ import annotations

import shutil

import pytest

from tests.cog_server import CogServer
from tests.test_safety import rig_checker_flag_all, rig_detector

SMALL = {"aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 2}


def count_calls(module, counter: list) -> object:
    return module.register_forward_pre_hook(lambda *_: counter.append(1))


def test_disable_safety_checker_calls_neither_model(predictor, run):
    checker_calls, detector_calls = [], []
    hooks = [
        count_calls(predictor.safety.checker, checker_calls),
        count_calls(predictor.safety.detector, detector_calls),
    ]
    try:
        run(prompt="a cat", num_outputs=2, disable_safety_checker=True, seed=1, **SMALL)
        assert checker_calls == [] and detector_calls == []
        run(prompt="a cat", num_outputs=2, seed=1, **SMALL)
        assert checker_calls == [1]  # one batched call for both images; nothing flagged, no stage two
    finally:
        for hook in hooks:
            hook.remove()


@pytest.fixture(scope="module")
def nsfw_weights(tiny_weights, tmp_path_factory):
    """A tree whose checker flags every image and whose detector confirms it."""
    root = tmp_path_factory.mktemp("nsfw-weights")
    for part in ("FLUX.1-dev", "FLUX.1-schnell"):
        shutil.copytree(tiny_weights / part, root / part)
    shutil.copy(tiny_weights / "lora.safetensors", root / "lora.safetensors")
    rig_checker_flag_all(tiny_weights / "safety-checker", root / "safety-checker")
    rig_detector(tiny_weights / "nsfw-detector", root / "nsfw-detector", "confirm")
    return root


def test_all_nsfw_fails_over_http_and_the_server_stays_ready(nsfw_weights):
    with CogServer(nsfw_weights) as server:
        body = server.predict({"prompt": "a cat", "num_outputs": 2, "seed": 1, **SMALL}).json()
        assert body["status"] == "failed"
        assert body["error"].endswith("NSFW content detected. Try running it again, or try a different prompt.")
        after = server.predict({"prompt": "a cat", "seed": 1, "disable_safety_checker": True, **SMALL}).json()
        assert after["status"] == "succeeded" and len(after["output"]) == 1
