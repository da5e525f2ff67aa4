"""Loaded by every Python process a test starts (tests/conftest.py puts this folder first on PYTHONPATH).

Always: no outside network (network_guard). With FLUX_TEST_FAULTS=1 in the environment, also the
fault injection of tests/fault_inject/faults.py (the Cog servers of test_http_faults and test_soak).
Python imports only the first sitecustomize on its path, so this is the one and it loads the rest.
"""

import importlib.util
import os
from pathlib import Path

import network_guard

network_guard.install()

if os.environ.get("FLUX_TEST_FAULTS") == "1":
    _faults = Path(__file__).resolve().parent.parent / "fault_inject" / "faults.py"
    _spec = importlib.util.spec_from_file_location("flux_test_faults", _faults)
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
