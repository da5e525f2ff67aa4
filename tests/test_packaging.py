"""Packaging: cog.yaml is valid Cog config, agrees with pyproject.toml, and the committed input
schema is the one the predictor declares."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
COG_SCHEMA = ROOT / "tests" / "data" / "cog_config_schema_v1.0.json"  # tests/data/SOURCES.md
GPU_ONLY = {"torchao"}  # fp8 on the GPU (fast_path.py); never needed on the CPU
CPU_ONLY = {"cog"}  # cog.yaml installs the SDK through build.sdk_version


def pins(requirements: list[str]) -> dict[str, str]:
    result = {}
    for line in requirements:
        name, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip()).groups()
        result[name.lower().replace("_", "-")] = version
    return result


def cog_config() -> dict:
    return yaml.safe_load((ROOT / "cog.yaml").read_text())


def test_cog_yaml_is_valid_against_cogs_config_schema():
    jsonschema.validate(cog_config(), json.loads(COG_SCHEMA.read_text()))


def test_cog_yaml_targets_the_predictor_on_a_gpu():
    config = cog_config()
    assert config["run"] == "predict.py:Predictor"
    assert config["build"]["gpu"] is True and str(config["build"]["python_version"]) == "3.11"


def test_cog_yaml_packages_agree_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    cpu, gpu = pins(project["dependencies"]), pins(cog_config()["build"]["python_packages"])
    assert {k: v for k, v in gpu.items() if k not in GPU_ONLY} == {k: v for k, v in cpu.items() if k not in CPU_ONLY}
    assert cog_config()["build"]["sdk_version"] == cpu["cog"]


def test_committed_openapi_schema_is_current():
    from scripts.gen_schema import SCHEMA_PATH, generate

    assert SCHEMA_PATH.read_text() == generate(), "stale .cog/openapi_schema.json: run `make schema` and commit it"


def test_the_image_preloads_the_allocator_it_installs():
    """tcmalloc is the worker's allocator in the image (bench/README.md, "Allocator"): its package is
    installed, LD_PRELOAD names its library, and `make serve` sets the same environment (the preload where
    the file exists)."""
    import workarounds

    config = cog_config()
    environment = dict(item.split("=", 1) for item in config["environment"])
    assert "libtcmalloc-minimal4" in config["build"]["system_packages"]
    assert environment == workarounds.SERVING_ENVIRONMENT  # what tests and benches start servers with
    makefile = (ROOT / "Makefile").read_text()
    assert f"TCMALLOC := {workarounds.TCMALLOC}" in makefile
    for name, value in environment.items():
        assert f"{name}={'$(TCMALLOC)' if name == 'LD_PRELOAD' else value}" in makefile


def test_the_glibc_fallback_environment_has_nothing_of_tcmalloc():
    """A server started where tcmalloc is not installed (or with preload=False: the soak's glibc run)
    gets glibc's settings only: no preload of a missing library, no tcmalloc variables."""
    import workarounds

    fallback = workarounds.serving_environment(preload=False)
    assert fallback == {"MALLOC_ARENA_MAX": "2"}
    assert set(workarounds.serving_environment()) <= set(workarounds.SERVING_ENVIRONMENT)
