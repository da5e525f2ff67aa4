"""The weights tree (model_weights.py): downloading missing parts, against a stand-in for the Hub.

The tiny tree's folders (tests/conftest.py) are served as the real repos (black-forest-labs/FLUX.1-dev,
...) by tests/fake_hub.py on 127.0.0.1, each FLUX one with a big file at its root that no part asks
for, the way the real FLUX repos carry a single-file checkpoint. huggingface_hub reads HF_ENDPOINT and
HF_HUB_OFFLINE when it is imported, so every download runs as the product runs it: in a fresh
process, `model_weights.ensure(part, root)`, with the environment pointing it at the fake hub and
its own HF_HOME (no saved token, no shared cache).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from fake_hub import FakeHub  # noqa: E402

import model_weights  # noqa: E402

TOKEN = "hf_fake_token_for_tests"
DEV, SCHNELL = "black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell"
BIG = {"FLUX.1-dev": "flux1-dev.safetensors", "FLUX.1-schnell": "flux1-schnell.safetensors"}
SCHNELL_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"

ENSURE = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
import model_weights
print(model_weights.ensure(sys.argv[1], Path(sys.argv[2])))
"""


@pytest.fixture(scope="module")
def repos(tiny_weights, tmp_path_factory) -> dict[str, Path]:
    """The tiny parts as Hub repos, plus a big root file in the FLUX ones that no part wants."""
    folder = tmp_path_factory.mktemp("repos")
    repos = {}
    for name, part in model_weights.PARTS.items():
        shutil.copytree(tiny_weights / name, folder / name)
        if name in BIG:
            (folder / name / BIG[name]).write_bytes(os.urandom(1 << 20))
        repos[part.repo_id] = folder / name
    return repos


@pytest.fixture
def hub(repos):
    with FakeHub(repos, token=TOKEN, gated={DEV}) as hub:
        yield hub


def environment(home: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    pythonpath = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])  # keeps tests/offline
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), PYTHONPATH=pythonpath, **extra)
    env.update(NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")  # the hub is local, whatever proxy is set
    return env


def ensure(part: str, root: Path, home: Path, endpoint: str, **extra: str) -> subprocess.CompletedProcess:
    """model_weights.ensure(part, root) in a fresh process, as setup() runs it."""
    command = [sys.executable, "-c", ENSURE, part, str(root)]
    env = environment(home, endpoint, **extra)
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    return proc.stderr.strip().splitlines()[-1]


def contents(folder: Path) -> dict[str, bytes]:
    """The part's files (not the tree's own bookkeeping: model_weights' `.model-hash.json`)."""
    files = (p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def refused_endpoint() -> str:
    """A loopback port nothing listens on: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_missing_part_is_downloaded_through_hf_endpoint(tiny_weights, hub, tmp_path):
    root = tmp_path / "weights"
    proc = ensure("FLUX.1-schnell", root, tmp_path / "home", hub.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(root / "FLUX.1-schnell")

    # Exactly the part, byte for byte, renamed into place; no bookkeeping left behind.
    assert contents(root / "FLUX.1-schnell") == contents(tiny_weights / "FLUX.1-schnell")
    assert sorted(p.name for p in root.iterdir()) == ["FLUX.1-schnell"]
    # Only the allow_patterns files were fetched: the big checkpoint is listed by the hub, never requested.
    assert BIG["FLUX.1-schnell"] in hub.files(SCHNELL)
    assert sorted(hub.resolved("GET")) == sorted(f"{SCHNELL}/{p}" for p in contents(tiny_weights / "FLUX.1-schnell"))
    assert not [r.path for r in hub.requests if BIG["FLUX.1-schnell"] in r.path]
    # Progress is in the logs.
    assert f"downloading FLUX.1-schnell from {hub.url}/{SCHNELL}" in proc.stderr
    assert f"Fetching {len(contents(tiny_weights / 'FLUX.1-schnell'))} files" in proc.stderr

    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(root / "FLUX.1-schnell" / "transformer")
    assert transformer.config.guidance_embeds is False


def test_gated_repo_needs_hf_token(tiny_weights, hub, tmp_path):
    root = tmp_path / "weights"
    denied = ensure("FLUX.1-dev", root, tmp_path / "home", hub.url)
    line = error_line(denied)
    assert line.startswith(f"RuntimeError: weights part FLUX.1-dev is missing from {root}")
    assert "GatedRepoError" in line and "HF_TOKEN" in line
    assert not (root / "FLUX.1-dev").exists()
    assert not any("authorization" in r.headers for r in hub.requests)

    hub.requests.clear()
    proc = ensure("FLUX.1-dev", root, tmp_path / "home", hub.url, HF_TOKEN=TOKEN)
    assert proc.returncode == 0, proc.stderr
    assert contents(root / "FLUX.1-dev") == contents(tiny_weights / "FLUX.1-dev")
    assert not (root / "FLUX.1-dev.partial").exists()
    to_repo = [r for r in hub.requests if DEV in r.path]
    assert to_repo and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in to_repo)
    assert len(hub.resolved("GET")) == len(contents(tiny_weights / "FLUX.1-dev"))
    assert not [r.path for r in hub.requests if BIG["FLUX.1-dev"] in r.path]


def test_interrupted_download_never_looks_whole_and_resumes(tiny_weights, hub, tmp_path):
    root = tmp_path / "weights"
    part, partial = root / "FLUX.1-schnell", root / "FLUX.1-schnell.partial"
    # huggingface_hub's record of a finished file (wherever the download goes): both configs are done.
    done = ["transformer/config.json.metadata", "scheduler/scheduler_config.json.metadata"]

    # 1. The process dies mid-transfer of the weights, once both configs are in (setup killed, machine lost).
    hub.stall.add(SCHNELL_WEIGHTS)
    command = [sys.executable, "-c", ENSURE, "FLUX.1-schnell", str(root)]
    env = environment(tmp_path / "home1", hub.url)
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (hub.stalled.is_set() and all(any(root.glob(f"*/.cache/huggingface/download/{p}")) for p in done)):
            assert proc.poll() is None and time.monotonic() < deadline, "the download never reached the stall"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not part.exists() and partial.is_dir()
    assert not (partial / SCHNELL_WEIGHTS).exists()
    assert not model_weights.is_whole(root, model_weights.PARTS["FLUX.1-schnell"])

    # 2. Restarted where the hub cannot be reached (and the HF cache did not survive): an error, not a
    #    part made of the configs alone.
    unreachable = ensure("FLUX.1-schnell", root, tmp_path / "home2", refused_endpoint())
    assert "weights part FLUX.1-schnell is missing" in error_line(unreachable)
    assert not part.exists()

    # 3. Restarted with the hub back (and one more dropped connection): only what is missing is fetched.
    hub.stall.clear()
    hub.break_once.add(SCHNELL_WEIGHTS)
    seen = len(hub.requests)
    resumed = ensure("FLUX.1-schnell", root, tmp_path / "home3", hub.url)
    assert resumed.returncode == 0, resumed.stderr
    gets = [r.path for r in hub.requests[seen:] if r.method == "GET" and "/resolve/" in r.path]
    assert len(gets) == 2 and all(p.endswith(SCHNELL_WEIGHTS) for p in gets)  # dropped once, then whole
    assert contents(part) == contents(tiny_weights / "FLUX.1-schnell")
    assert not partial.exists()


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "connection refused"])
def test_offline_and_missing_is_one_clear_error(hub, tmp_path, how):
    root = tmp_path / "weights"
    if how == "HF_HUB_OFFLINE":
        proc = ensure("FLUX.1-schnell", root, tmp_path / "home", hub.url, HF_HUB_OFFLINE="1")
        assert hub.requests == []
    else:
        proc = ensure("FLUX.1-schnell", root, tmp_path / "home", refused_endpoint())
    line = error_line(proc)  # the whole message is the last line of the log
    assert line.startswith(f"RuntimeError: weights part FLUX.1-schnell is missing from {root}")
    assert f"make tiny-weights DIR={root}" in line and "HF_TOKEN" in line and "HF_ENDPOINT" in line
    assert not (root / "FLUX.1-schnell").exists()


def test_repo_missing_from_the_hub(hub, tmp_path):
    hub.missing.add("Falconsai/nsfw_image_detection")
    line = error_line(ensure("nsfw-detector", tmp_path / "weights", tmp_path / "home", hub.url))
    assert "weights part nsfw-detector is missing" in line and "RepositoryNotFoundError" in line


def test_whole_part_is_not_downloaded_again(tiny_weights, hub, tmp_path):
    root = tmp_path / "weights"
    shutil.copytree(tiny_weights / "FLUX.1-schnell", root / "FLUX.1-schnell")
    proc = ensure("FLUX.1-schnell", root, tmp_path / "home", hub.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(root / "FLUX.1-schnell")
    assert hub.requests == []

    # A folder with the right name but not whole is replaced by a whole download.
    (root / "FLUX.1-schnell" / "scheduler" / "scheduler_config.json").unlink()
    proc = ensure("FLUX.1-schnell", root, tmp_path / "home", hub.url)
    assert proc.returncode == 0, proc.stderr
    assert hub.resolved("GET")
    assert contents(root / "FLUX.1-schnell") == contents(tiny_weights / "FLUX.1-schnell")


def test_main_lora(tmp_path, monkeypatch):
    assert model_weights.main_lora(tmp_path) is None
    (tmp_path / "lora.safetensors").write_bytes(b"x")
    assert model_weights.main_lora(tmp_path) == tmp_path / "lora.safetensors"
    monkeypatch.setenv("FLUX_WEIGHTS_DIR", str(tmp_path))
    assert model_weights.weights_dir() == tmp_path
    assert model_weights.main_lora() == tmp_path / "lora.safetensors"


def test_fake_hub_serves_resolve_urls(tmp_path):
    """The fake hub's /resolve/ URLs, as a LoRA downloader would use them: GET, HEAD, Range, gating."""
    data = os.urandom(5000)
    (tmp_path / "lora.safetensors").write_bytes(data)
    with FakeHub({"someone/lora": tmp_path, "someone/gated": tmp_path}, token=TOKEN, gated={"someone/gated"}) as hub:

        def fetch(path, method="GET", **headers):
            request = urllib.request.Request(hub.url + path, method=method, headers=headers)
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request) as response:
                return response.status, response.headers, response.read()

        status, headers, body = fetch("/someone/lora/resolve/main/lora.safetensors")
        assert (status, body) == (200, data)
        status, headers, body = fetch("/someone/lora/resolve/main/lora.safetensors", "HEAD")
        assert (status, body, headers["Content-Length"]) == (200, b"", "5000")
        assert headers["X-Repo-Commit"] == hub.commit("someone/lora") and headers["X-Linked-Etag"]
        status, headers, body = fetch("/someone/lora/resolve/main/lora.safetensors", Range="bytes=1000-")
        assert (status, body, headers["Content-Range"]) == (206, data[1000:], "bytes 1000-4999/5000")
        with pytest.raises(urllib.error.HTTPError) as denied:
            fetch("/someone/gated/resolve/main/lora.safetensors")
        assert (denied.value.code, denied.value.headers["X-Error-Code"]) == (401, "GatedRepo")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert fetch("/someone/gated/resolve/main/lora.safetensors", **auth)[2] == data
        with pytest.raises(urllib.error.HTTPError) as missing:
            fetch("/someone/lora/resolve/main/nothing.safetensors")
        assert (missing.value.code, missing.value.headers["X-Error-Code"]) == (404, "EntryNotFound")
        assert hub.resolved("HEAD") == ["someone/lora/lora.safetensors"]
