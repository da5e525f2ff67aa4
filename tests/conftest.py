"""Shared fixtures: the tiny weights tree (built once per session), the predictor, the Cog server.

Tests are hermetic: no outside network for this process or any Python process a test starts
(tests/offline: connections and name lookups other than loopback fail at once), and no file read
from outside the repository (what they need from elsewhere is copied in tests/data/).
Tests marked `slow` or `browser` run only when asked for (`-m slow`, `-m browser`: make soak, make test-browser).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = ROOT / "tests" / "offline"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(OFFLINE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the real hub
# Every Python process started from here on loads tests/offline/sitecustomize.py.
os.environ["PYTHONPATH"] = os.pathsep.join([str(OFFLINE), *filter(None, [os.environ.get("PYTHONPATH")])])

import network_guard  # noqa: E402  (tests/offline)

network_guard.install()


def pytest_collection_modifyitems(config, items):
    """Long suites run only when asked for by their marker: `slow` (make soak), `browser` (make test-browser)."""
    asked = config.option.markexpr or ""
    for marker, target in (("slow", "make soak"), ("browser", "make test-browser")):
        if marker in asked:
            continue
        skip = pytest.mark.skip(reason=f"{marker}: runs with -m {marker} ({target})")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    from scripts.tiny_weights import build

    return build(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def predictor(tiny_weights):
    """One Predictor for the session, set up on the tiny weights as the server would (outside Cog's
    worker, setup() changes nothing process-wide but logging: workarounds.py)."""
    import predict

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLUX_WEIGHTS_DIR", str(tiny_weights))
        runner = predict.Predictor()
        runner.setup()
        yield runner


@pytest.fixture(scope="session")
def run(predictor):
    """run(**inputs) → list of output paths, with Cog's own input checks and defaults."""
    from cog._inspector import check_input, create_predictor

    fields = create_predictor("predict", "Predictor").inputs

    def call(**inputs):
        return predictor.run(**check_input(fields, inputs))

    return call


@pytest.fixture(scope="session")
def cog_server(tiny_weights):
    """The real Cog HTTP server (coglet) on the tiny weights, on a free loopback port."""
    from tests.cog_server import CogServer

    with CogServer(tiny_weights) as server:
        yield server
