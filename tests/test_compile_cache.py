"""fast_path.compile_cache: compiled graphs survive a restart, for real, on the CPU.

Each "start" is a fresh Python process that compiles a small module with torch.compile's default
backend (inductor, which builds C++ with gcc on a CPU) inside `compile_cache`, and gets an empty
TORCHINDUCTOR_CACHE_DIR of its own: inductor's on-disk cache cannot help it, only the file that
`compile_cache` saved can. The starts run two at a time (about 25 s on 2 cores in all).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx.experimental._config as fx_config

import fast_path

ROOT = Path(__file__).resolve().parent.parent

# One start: argv[1] is a JSON list of [directory, key]; the same compiled module runs once inside
# compile_cache(directory, key) for each. Prints torch's cache hits and misses in the block, what was
# written, and the outputs as JSON; logs go to stderr.
START = """
import json, logging, sys
from pathlib import Path
import torch
from torch._dynamo.utils import counters
import fast_path

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
compiled = torch.compile(model, fullgraph=True, dynamic=True)  # dynamic, as fast_path compiles
x = torch.linspace(-2, 2, 5 * 16).reshape(5, 16)
KINDS = {"inductor": ("inductor", "fxgraph_cache"), "aot_autograd": ("aot_autograd", "autograd_cache")}


def count():
    return {k: (counters[g][f"{c}_hit"], counters[g][f"{c}_miss"]) for k, (g, c) in KINDS.items()}


results = []
for directory, key in json.loads(sys.argv[1]):
    path = Path(directory) / f"{key}.bin"
    before_file = path.stat().st_mtime_ns if path.exists() else None
    before = count()
    with torch.no_grad(), fast_path.compile_cache(directory, key):
        y = compiled(x)
    after = count()
    written = path.exists() and path.stat().st_mtime_ns != before_file
    results.append(
        {
            "hits": {k: after[k][0] - before[k][0] for k in KINDS},
            "misses": {k: after[k][1] - before[k][1] for k in KINDS},
            "saved_bytes": path.stat().st_size if written else None,
            "output": y.tolist(),
        }
    )
print(json.dumps(results))
"""


def start(steps: list[tuple[Path, str]], inductor_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    inductor_dir.mkdir()
    return subprocess.Popen(
        [sys.executable, "-c", START, json.dumps([[str(d), k] for d, k in steps])],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[list[dict], str]:
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    assert process.returncode == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1]), stderr


@pytest.fixture(scope="module")
def starts(tmp_path_factory):
    """Four starts in two rounds of two; what each returned and logged, and the cache folders."""
    tmp = tmp_path_factory.mktemp("compile-cache")
    shared, corrupt = tmp / "shared", tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "k.bin").write_bytes(b"\x00not a mega-cache file" * 100)
    (tmp / "a-file").write_text("")
    unwritable = tmp / "a-file" / "cache"  # below a file: no one can create it, root included
    processes = []
    try:
        # Round 1: the first start ever (no file yet) | a start that finds a corrupt file, then
        # saves to a folder it cannot create.
        processes += [start([(shared, "k")], tmp / "inductor-first")]
        processes += [start([(corrupt, "k"), (unwritable, "k")], tmp / "inductor-bad")]
        out = {"first": finish(processes[0]), "bad": finish(processes[1])}
        saved_first = (shared / "k.bin").read_bytes()
        # Round 2: a restart with the same key | a start with another key, in the same folder.
        processes += [start([(shared, "k")], tmp / "inductor-restart")]
        processes += [start([(shared, "other")], tmp / "inductor-other")]
        out |= {"restart": finish(processes[2]), "other": finish(processes[3])}
    finally:
        for process in processes:  # only after a failure: a start still running
            if process.poll() is None:
                process.kill()
                process.wait()
    return out, {"shared": shared, "corrupt": corrupt, "saved_first": saved_first}


def test_a_restart_loads_the_saved_graphs_and_computes_the_same(starts):
    out, dirs = starts
    [first], first_log = out["first"]
    [restart], restart_log = out["restart"]
    # First start: nothing to load, every graph built, all of it saved.
    assert "compile cache: loaded" not in first_log
    assert first["hits"] == {"inductor": 0, "aot_autograd": 0}
    assert first["misses"]["inductor"] >= 1 and first["misses"]["aot_autograd"] >= 1
    assert first["saved_bytes"] == len(dirs["saved_first"]) > 0
    assert "no " in first_log and "k.bin yet" in first_log
    # Restart: the file's inductor and AOTAutograd graphs are loaded and used; nothing is built.
    assert re.search(r"compile cache: loaded [1-9]\d* inductor", restart_log)
    assert re.search(r"[1-9]\d* aot_autograd", restart_log)
    assert restart["hits"]["inductor"] >= 1 and restart["hits"]["aot_autograd"] >= 1
    assert restart["misses"] == {"inductor": 0, "aot_autograd": 0}
    assert restart["output"] == first["output"]
    # Nothing new to save: the file is left as it was.
    assert restart["saved_bytes"] is None and "k.bin is up to date" in restart_log
    assert (dirs["shared"] / "k.bin").read_bytes() == dirs["saved_first"]
    # No temporary files left behind.
    assert sorted(p.name for p in dirs["shared"].iterdir()) == ["k.bin", "other.bin"]


def test_a_corrupt_file_is_ignored_with_a_warning_and_replaced(starts):
    out, dirs = starts
    [corrupt, unwritable], log = out["bad"]
    [first], _ = out["first"]
    assert re.search(r"WARNING fast_path: compile cache: .*k\.bin is not a readable cache file", log)
    assert corrupt["misses"]["inductor"] >= 1
    assert corrupt["output"] == first["output"]  # compiled from scratch, and right
    assert corrupt["saved_bytes"] == (dirs["corrupt"] / "k.bin").stat().st_size  # a good file now
    # A folder that cannot be written: a warning, and the start goes on.
    assert re.search(r"WARNING fast_path: compile cache: cannot save .*a-file/cache/k\.bin", log)
    assert unwritable["saved_bytes"] is None and unwritable["output"] == first["output"]


def test_another_key_does_not_load_this_keys_file(starts):
    out, dirs = starts
    [other], log = out["other"]
    assert "compile cache: loaded" not in log
    assert other["hits"] == {"inductor": 0, "aot_autograd": 0}
    assert other["misses"]["inductor"] >= 1
    assert (dirs["shared"] / "other.bin").stat().st_size == other["saved_bytes"]


# ---------------------------------------------------------------- the key


def test_cache_key_is_a_short_safe_file_name_that_follows_its_inputs():
    key = fast_path.compile_cache_key(torch.device("cpu"), fp8=False, adapter="rank=16")
    assert re.fullmatch(r"[A-Za-z0-9._-]+", key) and len(key) <= 64
    assert key.startswith(re.sub(r"[^A-Za-z0-9._]+", "-", f"torch{torch.__version__}-cpu-bf16-"))
    assert key == fast_path.compile_cache_key("cpu", False, adapter="rank=16")  # stable
    others = {
        fast_path.compile_cache_key("cpu", True, adapter="rank=16"),
        fast_path.compile_cache_key("cpu", False, adapter="rank=32"),
        fast_path.compile_cache_key("cpu", False),
        fast_path.compile_cache_key("cpu", False, adapter="rank=16", warmup_sizes=[(64, 64)]),
    }
    assert key not in others and len(others) == 4


def test_cache_key_names_the_gpu(monkeypatch):
    # No GPU here: stand in torch's two CUDA queries to check what the key takes from them.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    h100 = fast_path.compile_cache_key(torch.device("cuda"), fp8=True)
    assert "-sm90-fp8-" in h100 and "H100" not in h100 and " " not in h100
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert fast_path.compile_cache_key(torch.device("cuda"), fp8=True) != h100
    assert fast_path.compile_cache_key("cpu", True) != h100


# ---------------------------------------------------------------- FluxModels.optimize


def test_flux_models_optimize_keys_the_cache_by_sizes_and_adapter(tmp_path, caplog, monkeypatch, request):
    # The wiring (which file, the states walked inside the cache), not the cache itself (tests above):
    # compiled with the eager backend, so nothing is code-generated and nothing needs saving.
    from pipelines import FluxModels
    from tests.test_fast_path import tiny_pipe

    pipe = tiny_pipe()
    eager = functools.partial(type(pipe.transformer).compile_repeated_blocks, pipe.transformer, backend="eager")
    monkeypatch.setattr(pipe.transformer, "compile_repeated_blocks", eager, raising=False)
    monkeypatch.setattr(fast_path, "COMPILE_VAE_DECODER", False)
    models = object.__new__(FluxModels)  # the loading itself is not what this is about
    models.transformers, models.pipelines = {"dev": pipe.transformer}, {("dev", "txt2img"): pipe}
    models.device, models.dtype = torch.device("cpu"), torch.float32
    walked = []

    def states(transformer):
        for state in ("on", "off"):
            walked.append(state)
            yield

    def cache_files_named(**kwargs) -> str:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fast_path"):
            models.optimize(fp8=False, states=states, **kwargs)
        return sorted(set(re.findall(r"compile cache: .*?(/\S+\.bin)", caplog.text)))

    duck = fx_config.use_duck_shape  # optimize_pipeline sets it process-wide: put it back afterwards
    request.addfinalizer(lambda: setattr(fx_config, "use_duck_shape", duck))
    [a] = cache_files_named(warmup_sizes=[(64, 48)], cache_dir=tmp_path, adapter_shape="rank=8")
    assert walked == ["on", "off"] and caplog.text.count("warm-up 64x48") == 4  # 2 states × batch 1, 2
    assert Path(a).parent == tmp_path and re.fullmatch(r"torch.+-cpu-bf16-[0-9a-f]{16}\.bin", Path(a).name)
    [b] = cache_files_named(warmup_sizes=[(48, 64)], cache_dir=tmp_path, adapter_shape="rank=8")
    [c] = cache_files_named(warmup_sizes=[(64, 48)], cache_dir=tmp_path, adapter_shape="rank=16")
    [d] = cache_files_named(warmup_sizes=[(64, 48)], cache_dir=tmp_path, adapter_shape="rank=8")
    assert len({a, b, c}) == 3 and d == a
    assert cache_files_named(warmup_sizes=[(64, 48)]) == [] and "compile cache" not in caplog.text  # None: off
