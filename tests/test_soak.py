"""Soak: many sequential predictions over HTTP against one real Cog server, with varied sizes, formats,
seeds, models, LoRAs, img2img and failures mixed in. Every success must be the right picture (same
request → same bytes, whatever ran in between); the worker's and the server's resident memory must be
flat after warm-up, and open file descriptors, temp files and coglet's per-prediction folders must
not grow.

It is slow (1,000 predictions, ≈ 2.5 min on 2 cores) and runs with `-m slow`: `make soak`, which CI runs
after `make test`; SOAK_N sets the count. The unit tests at the bottom, of the workarounds that keep
a long-running worker's disk use bounded (workarounds.py), run with every `make test`.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

import workarounds
from tests.cog_server import CogServer, data_uri, decode_data_uri, png_bytes, report, scaled_lora
from tests.receivers import Receiver

WARMUP = 60
# Allowed growth of the worker's resident memory from WARMUP to the end, in bytes. glibc's malloc
# untrimmed grew ≈ +40 MiB from 60 to 200 predictions and kept creeping (+70 MiB over 1,000):
# fragmentation, not Python objects. With tcmalloc, or glibc with workarounds.HeapTrim, it stays flat
# (tcmalloc's caches still fill up over the first 300 or so: +13 to +25 MiB from prediction 60).
RSS_SLACK = 32 << 20
# Flat means levelled off. Caches that fill up raise RSS in a few steps (tcmalloc's page heap: one
# step of +10 MiB in the worker at prediction 600, then level); a creep sets new highs again and again.
# So over the second half of the soak, per process: at most NEW_HIGHS samples above every earlier one by
# more than `step`, and the second half's highest at most `rise` above the first half's (MiB). Coglet's
# server process on tcmalloc with gperftools' default thread caches (32 MiB) set 3 to 6 new highs
# (+2.5 to +3.3 MiB); with the image's 8 MiB cap (workarounds.SERVING_ENVIRONMENT), none.
NEW_HIGHS = 2
LEVEL_MIB = {"worker": {"step": 1.0, "rise": 16}, "coglet's server process": {"step": 0.3, "rise": 4}}
SIZES = [(256, 256), (256, 320), (320, 256), (272, 272)]
FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}
INIT_IMAGE = data_uri(png_bytes((320, 320), color=(30, 160, 90)))
FAILURES = [  # (extra inputs, text the one-line error must hold)
    ({"mask": INIT_IMAGE}, "mask was given without image"),
    ({"image": data_uri(b"\x89PNG\r\n\x1a\n truncated")}, "image could not be read"),
    ({"extra_lora": "{rx}/files/missing.safetensors"}, "404"),
    ({"seed": 2**63}, "is out of range"),
    ({"output_quality": 1, "output_format": "webp"}, "internal error (RuntimeError: injected fault"),
    ({"prompt": "  "}, "prompt is empty"),
]


def recipe(rng: random.Random) -> dict:
    """One successful request of the mix."""
    width, height = rng.choice(SIZES)
    inputs = {
        "prompt": rng.choice(["an ascii art cat", "ascii owl", "a lighthouse, ascii"]),
        "aspect_ratio": "custom",
        "width": width,
        "height": height,
        "seed": rng.randint(0, 2**32),
        "num_inference_steps": rng.choice([1, 1, 2]),
        "output_format": rng.choice(list(FORMATS)),
        "lora_scale": rng.choice([1, 1, 0.5, 0, -0.7]),
    }
    if rng.random() < 0.1:
        inputs["num_outputs"] = 2
    if rng.random() < 0.2:
        inputs["model"] = "schnell"
    if rng.random() < 0.4:
        inputs["extra_lora"] = rng.choice(["{rx}/files/a.safetensors", "{rx}/files/b.safetensors"])
        inputs["extra_lora_scale"] = rng.choice([1, 0.6])
    if rng.random() < 0.1:
        inputs["image"] = INIT_IMAGE
    return inputs


def plan(count: int, seed: int = 1234) -> list[tuple[dict, str | None]]:
    """The request mix: (inputs, None) for a success or (inputs, error text) for a failure.

    Successes are drawn from a pool of 30 recipes, so each recurs several times with other models,
    LoRAs, sizes and failures in between: a recurrence must give the very same bytes.
    """
    rng = random.Random(seed)
    pool = [recipe(rng) for _ in range(30)]
    requests = []
    for i in range(count):
        inputs = dict(pool[i] if i < len(pool) else rng.choice(pool))  # every recipe once during warm-up
        error = None
        if i >= 3 and rng.random() < 0.12:
            extra, error = rng.choice(FAILURES)
            if "mask" in extra:
                inputs.pop("image", None)
            inputs.update(extra)
        requests.append((inputs, error))
    return requests


def tmp_snapshot(tmpdir) -> tuple[set[str], int]:
    """(names in TMPDIR other than the reused output folder, files in output folders)."""
    names, outputs = set(), 0
    for entry in os.scandir(tmpdir):
        if entry.name.startswith("flux-out-"):
            outputs += len(os.listdir(entry.path))
        else:
            names.add(entry.name)
    return names, outputs


# The worker's allocators: the image's (tcmalloc, preloaded as cog.yaml does; where Debian's package is
# installed) and glibc's malloc with 2 arenas and workarounds.HeapTrim (the same without the preload).
ALLOCATORS = {
    "tcmalloc": workarounds.serving_environment(),
    "glibc": workarounds.serving_environment(preload=False),
}


@pytest.fixture(scope="module", params=list(ALLOCATORS))
def soak_server(tiny_weights, tmp_path_factory, request):
    if request.param == "tcmalloc" and "LD_PRELOAD" not in ALLOCATORS["tcmalloc"]:
        pytest.skip(f"{workarounds.TCMALLOC} is not installed (Debian: libtcmalloc-minimal4)")
    tmpdir = tmp_path_factory.mktemp("soak-tmp")
    with Receiver() as rx:
        rx.serve("a.safetensors", scaled_lora(tiny_weights, 3.0))
        rx.serve("b.safetensors", scaled_lora(tiny_weights, -2.0))
        env = {
            "TMPDIR": str(tmpdir),
            "LORA_CACHE_DIR": str(tmp_path_factory.mktemp("soak-lora-cache")),
            "LORA_ALLOW_PRIVATE_URLS": "1",
            "FLUX_TEST_FAULTS": "1",  # tests/fault_inject/faults.py
            **ALLOCATORS[request.param],
        }
        with CogServer(tiny_weights, env=env) as server:
            server.wait_for("READY")
            server.tmpdir, server.rx = tmpdir, rx
            yield server


def second_half_highs(samples: list[float], step: float) -> tuple[list[float], float]:
    """Over the second half of `samples`: those above every earlier sample by more than `step` (new
    highs), and how far the second half's highest lies above the first half's (0 if not)."""
    half = len(samples) // 2
    highs, highest = [], max(samples[:half])
    for sample in samples[half:]:
        if sample > highest + step:
            highs.append(sample)
        highest = max(highest, sample)
    return highs, highest - max(samples[:half])


def soak(server, count: int, request, tag: str) -> None:
    rx, tmpdir = server.rx, server.tmpdir
    worker, pid = server.worker(), server.worker().pid
    import psutil

    orchestrator = psutil.Process(server.process.pid)
    seen: dict[str, list[bytes]] = {}
    repeats = failures = 0
    finished: dict[str, float] = {}
    figures, rss_trend = {}, []
    started = time.monotonic()
    for i, (inputs, error) in enumerate(plan(count)):
        inputs = {k: v.replace("{rx}", rx.url) if isinstance(v, str) else v for k, v in inputs.items()}
        prediction_id = f"{tag}-{i}"
        body = server.predict(inputs, timeout=120, id=prediction_id).json()
        finished[prediction_id] = time.time()
        assert body["id"] == prediction_id
        if error is not None:
            failures += 1
            assert body["status"] == "failed", (i, inputs, body)
            assert error in body["error"] and "\n" not in body["error"], (i, body["error"])
        else:
            assert body["status"] == "succeeded", (i, inputs, body)
            outputs = [decode_data_uri(uri)[1] for uri in body["output"]]
            assert len(outputs) == inputs.get("num_outputs", 1)
            size = (320, 320) if "image" in inputs else (inputs["width"], inputs["height"])
            for data in outputs:
                image = Image.open(io.BytesIO(data))
                assert (image.format, image.size) == (FORMATS[inputs["output_format"]], size), (i, inputs)
            key = json.dumps(inputs, sort_keys=True)
            if key in seen:
                repeats += 1
                assert outputs == seen[key], f"request {i} gave other bytes than the same request before: {inputs}"
            seen[key] = outputs
        if (i + 1) % 20 == 0:
            rss_trend.append((worker.memory_info().rss >> 20, round(orchestrator.memory_info().rss / 2**20, 1)))
        if i + 1 == WARMUP or i + 1 == count:
            figures["warm" if i + 1 == WARMUP else "end"] = {
                "rss": worker.memory_info().rss,
                "server_rss": orchestrator.memory_info().rss,
                "fds": worker.num_fds(),
                "server_fds": orchestrator.num_fds(),
                "tmp": tmp_snapshot(tmpdir),
            }
    elapsed = time.monotonic() - started

    # Let the earliest predictions' coglet folders age past the pruning threshold, then run one more.
    first_done = min(finished.values())
    time.sleep(max(0.0, first_done + workarounds.STALE_AFTER_S + 1 - time.time()))
    cutoff = time.time() - workarounds.STALE_AFTER_S - 1  # the prune runs as this prediction starts
    server.predict({"prompt": "a cat", "aspect_ratio": "custom", "width": 256, "height": 256, "seed": 1}, id=f"{tag}-x")
    coglet = workarounds.COGLET_PREDICTIONS
    stale = [p for p, t in finished.items() if t < cutoff and (coglet / p).exists()]
    left = sum(1 for p in finished if (coglet / p).exists())

    warm, end = figures["warm"], figures["end"]
    report(
        request,
        f"{count} predictions ({failures} failures, {repeats} repeats checked byte-for-byte) in {elapsed:.0f} s "
        f"({elapsed / count * 1000:.0f} ms each); worker RSS {warm['rss'] / 2**20:.0f} → {end['rss'] / 2**20:.0f} MiB, "
        f"server RSS {warm['server_rss'] / 2**20:.1f} → {end['server_rss'] / 2**20:.1f} MiB; "
        f"fds worker {warm['fds']} → {end['fds']}, server {warm['server_fds']} → {end['server_fds']}; "
        f"TMPDIR {sorted(warm['tmp'][0])}+{warm['tmp'][1]} files → {sorted(end['tmp'][0])}+{end['tmp'][1]} files; "
        f"coglet folders left {left} of {len(finished)}; (worker, server) RSS every 20 (MiB): {rss_trend}",
    )
    assert server.worker().pid == pid and server.health()["status"] == "READY"
    assert failures >= count // 20 and repeats >= count // 5, (failures, repeats)
    assert end["rss"] - warm["rss"] < RSS_SLACK, f"worker memory grew {(end['rss'] - warm['rss']) >> 20} MiB"
    assert end["server_rss"] - warm["server_rss"] < RSS_SLACK // 2, "coglet's server process memory grew"
    for side, (name, level) in enumerate(LEVEL_MIB.items() if len(rss_trend) >= 2 else ()):
        highs, rise = second_half_highs([r[side] for r in rss_trend], level["step"])
        assert len(highs) <= NEW_HIGHS and rise <= level["rise"], f"{name}'s memory kept growing: new highs {highs}"
    assert end["fds"] <= warm["fds"] + 2 and end["server_fds"] <= warm["server_fds"] + 2, (warm, end)
    assert end["tmp"][0] == warm["tmp"][0], "temp files piled up"
    assert end["tmp"][1] <= 2, "output files piled up"
    assert not stale, f"coglet's empty per-prediction folders were not pruned: {stale[:5]}…"


@pytest.mark.slow
def test_soak(soak_server, request):
    soak(soak_server, int(os.environ.get("SOAK_N", "1000")), request, f"soak-{request.node.callspec.id}")


# Recorded every 20 predictions of `make soak` on tcmalloc (MiB): coglet's server process with gperftools'
# default thread caches (a creep), and the worker with the image's 8 MiB cap in CI (one cache step).
SERVER_DEFAULT_CACHES = [68.8, 69.2, 71.1, 71.1, 71.7, 71.7, 72.3, 73.9, 73.9, 74.0, 74.0, 74.0, 74.2, 75.8, 76.2,
    76.2, 76.9, 76.9, 76.9, 77.6, 77.6, 77.8, 78.3, 78.3, 78.3, 79.0, 79.0, 79.0, 79.5, 80.2, 80.2, 80.2, 80.2, 80.2,
    80.2, 80.2, 80.2, 80.2, 80.6, 80.6, 80.6, 80.6, 80.6, 81.1, 81.5, 81.5, 81.6, 81.6, 81.6, 81.6]  # fmt: skip
WORKER_ONE_STEP = [584, 584] + [589] * 28 + [599] * 20


def test_a_creep_is_not_level_and_a_cache_step_is():
    level = LEVEL_MIB["coglet's server process"]
    highs, rise = second_half_highs(SERVER_DEFAULT_CACHES, level["step"])
    assert len(highs) > NEW_HIGHS and highs == [79.0, 79.5, 80.2, 80.6, 81.1, 81.5]
    level = LEVEL_MIB["worker"]
    highs, rise = second_half_highs(WORKER_ONE_STEP, level["step"])
    assert highs == [599] and rise == 10 <= level["rise"]
    assert second_half_highs([556, 540, 555, 541, 554, 541, 548, 541], level["step"]) == ([], 0)  # glibc swings


# ---------------------------------------------------------------- the workarounds, as units


def test_prune_empty_dirs_removes_only_old_empty_trees(tmp_path):
    old = time.time() - 3600
    for name in ("old-empty", "old-with-file", "new-empty"):
        for sub in ("inputs", "outputs"):
            (tmp_path / name / sub).mkdir(parents=True)
    (tmp_path / "old-with-file" / "inputs" / "x.png").write_bytes(b"x")
    (tmp_path / "a-file").write_bytes(b"keep me")
    for path in sorted(tmp_path.rglob("*"), reverse=True):
        if "new-empty" not in str(path):
            os.utime(path, (old, old))
    assert workarounds.prune_empty_dirs(tmp_path, older_than=60) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "new-empty", "old-with-file"]
    assert (tmp_path / "old-with-file" / "inputs" / "x.png").read_bytes() == b"x"
    assert workarounds.prune_empty_dirs(tmp_path / "does-not-exist") == 0


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_failed_input_downloads_are_swept_by_the_next_prediction(tmp_path, monkeypatch):
    """Cog leaves the temp file of an image URL whose download failed; the worker's own input folder
    is swept as each prediction starts, sparing that prediction's inputs and anything not named like
    a download. Over a real server: tests/test_http_faults.py's "image url" cases."""
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)  # isolate() sets it: that is its job
    downloads = workarounds.InputDownloads(tmp_path)
    assert downloads.sweep(keep=[]) == 0  # inactive until isolate(): outside Cog's worker
    folder = downloads.isolate()
    assert folder.is_dir() and folder.name == f"flux-inputs-{os.getpid()}"
    assert Path(tempfile.NamedTemporaryFile(suffix="in.png", delete=False).name).parent == folder  # where Cog writes

    leftover, current, other = folder / "tmpq1w2e3r_.png", folder / "tmpzzzzzzzzmask.png", folder / "model.bin"
    for path in (leftover, current, other):
        path.write_bytes(b"x")
    assert downloads.sweep(keep=[current, None]) == 2  # the leftover and the NamedTemporaryFile above
    assert not leftover.exists() and current.exists() and other.exists()
    assert downloads.sweep(keep=[]) == 1 and not current.exists()


def test_folders_of_killed_workers_go_at_the_next_setup(tmp_path):
    """A worker killed outright runs no exit handler: its input and output folders are removed when
    the next worker isolates itself; those of live workers, and anything else, stay."""
    dead, alive = dead_pid(), os.getppid()
    names = [f"flux-inputs-{dead}", f"flux-out-{dead}-abc123", f"flux-inputs-{alive}", f"flux-out-{alive}-x"]
    names += [f"flux-out-{os.getpid()}-old", "flux-out-notapid", "someone-elses"]  # same pid: an earlier life
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "out-0.webp").write_bytes(b"x")
    assert workarounds.remove_dead_workers_folders(tmp_path) == 3
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f"flux-inputs-{alive}", f"flux-out-{alive}-x", "flux-out-notapid", "someone-elses"])


def test_heap_trim_returns_free_heap_only_when_memory_grew():
    """glibc's malloc keeps freed memory; HeapTrim gives it back after a prediction once RSS grew past its
    slack, and costs nothing more than reading RSS otherwise."""
    heap = workarounds.HeapTrim(enabled=True, slack_bytes=8 << 20)
    with heap:  # the first prediction: trims and takes the level
        pass
    if heap.trims == 0:
        pytest.skip("not glibc's malloc in this process (another allocator, or not Linux)")
    with heap:  # nothing grew: nothing done
        pass
    assert heap.trims == 1
    blocks = [bytearray(60_000) for _ in range(1_500)]  # 90 MB of heap chunks, below mmap's threshold
    del blocks[::2]  # half of them freed between live ones: glibc keeps the pages
    grown = workarounds.resident_bytes()
    with heap:
        pass
    assert heap.trims == 2
    assert workarounds.resident_bytes() < grown - (16 << 20), "the freed half was not returned"
    assert len(blocks) == 750


def test_heap_trim_is_off_outside_the_worker():
    heap = workarounds.HeapTrim(enabled=False, slack_bytes=0)
    with heap:
        pass
    assert heap.trims == 0
