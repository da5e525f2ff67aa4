"""The weights tree: where each part lives, and downloading the parts that are missing.

One tree, found through FLUX_WEIGHTS_DIR (default `weights/`), laid out like the Hugging Face
repos it comes from:

    FLUX.1-dev/          black-forest-labs/FLUX.1-dev (diffusers folders only; gated: HF_TOKEN)
    FLUX.1-schnell/      black-forest-labs/FLUX.1-schnell (transformer/ and scheduler/)
    safety-checker/      CompVis/stable-diffusion-safety-checker
    nsfw-detector/       Falconsai/nsfw_image_detection
    lora.safetensors     the trained fine-tune (optional: without it the model is plain FLUX)

A missing part is downloaded with huggingface_hub (HF_ENDPOINT and HF_TOKEN are honoured, progress
goes to the logs) into `<part>.partial/`, where an interrupted download resumes (file by file: the
files already there are kept), and is renamed to its final name only when every file of the repo's
commit that the part wants is there: a part that exists is a part that is whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class Part:
    name: str  # folder in the tree
    repo_id: str  # where it is downloaded from
    patterns: tuple[str, ...]  # which files of the repo it needs
    required: tuple[str, ...]  # files whose presence marks it whole


PARTS = {
    part.name: part
    for part in (
        Part(
            "FLUX.1-dev",
            "black-forest-labs/FLUX.1-dev",
            # The diffusers folders only: not the 24 GB single-file checkpoint at the repo root.
            (
                "model_index.json",
                "scheduler/*",
                "text_encoder/*",
                "text_encoder_2/*",
                "tokenizer/*",
                "tokenizer_2/*",
                "transformer/*",
                "vae/*",
            ),
            (
                "model_index.json",
                "transformer/config.json",
                "vae/config.json",
                "text_encoder/config.json",
                "text_encoder_2/config.json",
                "scheduler/scheduler_config.json",
            ),
        ),
        Part(
            "FLUX.1-schnell",
            "black-forest-labs/FLUX.1-schnell",
            ("transformer/*", "scheduler/*"),
            ("transformer/config.json", "scheduler/scheduler_config.json"),
        ),
        Part(
            "safety-checker",
            "CompVis/stable-diffusion-safety-checker",
            ("*.json", "*.safetensors"),
            ("config.json", "preprocessor_config.json"),
        ),
        Part(
            "nsfw-detector",
            "Falconsai/nsfw_image_detection",
            ("*.json", "*.safetensors"),
            ("config.json", "preprocessor_config.json"),
        ),
    )
}
MAIN_LORA = "lora.safetensors"


def weights_dir() -> Path:
    return Path(os.environ.get("FLUX_WEIGHTS_DIR") or DEFAULT_DIR)


def is_whole(root: Path, part: Part) -> bool:
    return all((root / part.name / file).is_file() for file in part.required)


def ensure(part_name: str, root: Path | None = None) -> Path:
    """The local folder of a part, downloading it first if it is missing."""
    root = root or weights_dir()
    part = PARTS[part_name]
    if not is_whole(root, part):
        download(part, root)
    return root / part.name


def download(part: Part, root: Path) -> None:
    from huggingface_hub import HfApi, constants, get_cached_repo_tree, snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    target, partial = root / part.name, root / f"{part.name}.partial"
    hint = (
        f"Put it in {target} (for tests: `make tiny-weights DIR={root}`), "
        f"or allow access to {constants.ENDPOINT} (HF_ENDPOINT) with HF_TOKEN set if the repo is gated."
    )
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(f"weights part {part.name} is missing from {root} and HF_HUB_OFFLINE is set. {hint}")
    logger.info("downloading %s from %s/%s into %s", part.name, constants.ENDPOINT, part.repo_id, target)
    try:
        # Resolve the commit here, not in snapshot_download: when the hub cannot be reached it hands
        # back whatever an interrupted download left in `partial` as if it were the snapshot.
        commit = HfApi().repo_info(part.repo_id).sha
        snapshot_download(part.repo_id, revision=commit, local_dir=partial, allow_patterns=list(part.patterns))
        # The file list of that commit, as snapshot_download saw it: every wanted file must be there.
        listed = [file.path for file in get_cached_repo_tree(part.repo_id, revision=commit, local_dir=partial)]
    except Exception as error:
        logger.exception("download of %s failed", part.name)
        raise RuntimeError(
            f"weights part {part.name} is missing from {root} and could not be downloaded ({_reason(error)}). {hint}"
        ) from None
    wanted = [*filter_repo_objects(listed, allow_patterns=list(part.patterns)), *part.required]
    missing = sorted({file for file in wanted if not (partial / file).is_file()})
    if missing:
        raise RuntimeError(
            f"weights part {part.name} is missing from {root}: the download from {part.repo_id} "
            f"lacks {', '.join(missing)}. {hint}"
        )
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's resume bookkeeping
    if target.exists():  # an incomplete folder someone left: replace it whole
        shutil.rmtree(target)
    partial.rename(target)
    logger.info("weights part %s ready", part.name)


def _reason(error: Exception) -> str:
    """Why a download failed, in one short line: the hub's own words when it answered."""
    response = getattr(error, "response", None)
    if response is not None and getattr(error, "server_message", None):
        detail = f"HTTP {response.status_code}: {error.server_message}"
    else:
        detail = str(error)
    return f"{type(error).__name__}: {' '.join(detail.split())[:300]}"


def main_lora(root: Path | None = None) -> Path | None:
    """The trained fine-tune, or None when the tree has none (plain FLUX)."""
    path = (root or weights_dir()) / MAIN_LORA
    return path if path.is_file() else None


def model_hash(folder: Path) -> str:
    """A short name for the weights in `folder` (a part's transformer/), for generation data's "Model
    hash" (10 hex digits, as A1111 writes it): the SHA-256 of its .safetensors files in name order.

    Hashing 24 GB takes a while, so the result is kept in `folder/.model-hash.json` with the files'
    names, sizes and modification times, and reused while they are the same (a read-only tree
    hashes at every setup)."""
    files = sorted(folder.glob("*.safetensors"))
    identity = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    record = folder / ".model-hash.json"
    try:
        kept = json.loads(record.read_text())
        if kept["files"] == identity:
            return kept["sha256"][:10]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    started = time.perf_counter()
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(16 << 20):
                digest.update(chunk)
    logger.info("model hash of %s: %d files in %.1f s", folder.parent.name, len(files), time.perf_counter() - started)
    try:
        partial = record.with_suffix(".partial")
        partial.write_text(json.dumps({"files": identity, "sha256": digest.hexdigest()}))
        partial.replace(record)
    except OSError as error:
        logger.info("model hash not kept (%s): it is computed again at each setup", type(error).__name__)
    return digest.hexdigest()[:10]
