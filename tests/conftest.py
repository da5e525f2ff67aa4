"""Shared fixtures: the tiny weights tree (built once per session), the predictor, the Cog server.

Tests run offline: any outbound connection other than to loopback fails.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the real hub

_connect = socket.socket.connect


def _loopback_only(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise ConnectionRefusedError(f"tests are offline: refused a connection to {host}")
    return _connect(self, address)


socket.socket.connect = _loopback_only


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    from scripts.tiny_weights import build

    return build(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def predictor(tiny_weights):
    """One Predictor for the session, set up on the tiny weights as the server would."""
    import predict

    previous = os.environ.get("FLUX_WEIGHTS_DIR")
    os.environ["FLUX_WEIGHTS_DIR"] = str(tiny_weights)
    runner = predict.Predictor()
    temp_folder = tempfile.tempdir
    runner.setup()
    tempfile.tempdir = temp_folder  # setup() points it at the worker's input folder; not pytest's business
    yield runner
    runner.outputs.cleanup()
    shutil.rmtree(runner.inputs.folder, ignore_errors=True)
    if previous is None:
        os.environ.pop("FLUX_WEIGHTS_DIR")
    else:
        os.environ["FLUX_WEIGHTS_DIR"] = previous


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
