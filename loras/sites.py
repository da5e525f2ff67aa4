"""Per-site resolution: from a parsed `Source` to the one URL to download, and whose token goes with it.

Sites and their settings (read per fetch):
    Replicate     REPLICATE_ENDPOINT (https://replicate.com), REPLICATE_API_TOKEN
    Hugging Face  HF_ENDPOINT (https://huggingface.co), LORA_HF_TOKEN; never HF_TOKEN (that one is
                  the deployment's, for the gated FLUX weights) nor a saved huggingface login,
                  except for the operator's own LoRA (operator=True), which falls back to HF_TOKEN
    CivitAI       CIVITAI_ENDPOINT (https://civitai.com), CIVITAI_API_TOKEN
    local files   refused for requests unless LORA_LOCAL_DIR names a folder (see `local_file`)

A user's own token (Hugging Face, CivitAI) takes precedence over the deployment's and goes only to
its site's endpoint. An endpoint set in the environment is trusted even on a private address, for
the requests built here (a user-typed URL to the same host is still guarded).
"""

from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

from errors import UserError
from loras.files import check_safetensors, pick_lora_file
from loras.sources import CIVITAI_DEFAULT_QUERY, Source
from net.fetch import Credential, Fetcher
from net.url_guard import origin
from untrusted import printable

logger = logging.getLogger(__name__)

_DEFAULTS = {
    "HF_ENDPOINT": "https://huggingface.co",
    "REPLICATE_ENDPOINT": "https://replicate.com",
    "CIVITAI_ENDPOINT": "https://civitai.com",
}


@dataclass(frozen=True)
class Endpoints:
    huggingface: str
    replicate: str
    civitai: str
    configured: frozenset[str]  # origins of the endpoints set in the environment

    @classmethod
    def from_env(cls) -> Endpoints:
        env = os.environ
        values = {name: (env.get(name, "").strip() or default).rstrip("/") for name, default in _DEFAULTS.items()}
        configured = frozenset(origin(values[name]) for name in _DEFAULTS if env.get(name, "").strip())
        return cls(values["HF_ENDPOINT"], values["REPLICATE_ENDPOINT"], values["CIVITAI_ENDPOINT"], configured)

    def trusted(self, base: str) -> frozenset[str]:
        """The origins a request built from endpoint `base` may reach even when private."""
        return frozenset({origin(base)}) & self.configured

    def base(self, source: Source) -> str:
        return {"huggingface": self.huggingface, "replicate": self.replicate, "civitai": self.civitai}[source.kind]


@dataclass(frozen=True)
class Download:
    """What to GET for a source: the URL, the credential for its site, the origins trusted on the way."""

    url: str
    credential: Credential | None
    trusted: frozenset[str]


def credential_for(
    source: Source, endpoints: Endpoints, *, huggingface: str = "", civitai: str = "", operator: bool = False
) -> Credential | None:
    """The token a source's site gets: the user's own (`huggingface`, `civitai`), else the deployment's."""
    env = os.environ
    if source.kind == "huggingface":
        where, what = origin(endpoints.huggingface), "the Hugging Face token"
        if token := huggingface.strip():
            return Credential(where, token, private=True, what=what)
        if token := env.get("LORA_HF_TOKEN", "").strip():
            return Credential(where, token, what=what)
        if operator and (token := env.get("HF_TOKEN", "").strip()):
            return Credential(where, token, private=True, what=what)  # not lent: cached apart
        return None
    if source.kind == "civitai":
        where, what = origin(endpoints.civitai), "the CivitAI token"
        if token := civitai.strip() or source.token:
            return Credential(where, token, private=True, what=what)
        if token := env.get("CIVITAI_API_TOKEN", "").strip():
            return Credential(where, token, what=what)
        return None
    if source.kind == "replicate":
        if token := env.get("REPLICATE_API_TOKEN", "").strip():
            return Credential(origin(endpoints.replicate), token, what="REPLICATE_API_TOKEN")
        return None
    return None


def resolve(
    source: Source,
    credential: Credential | None,
    fetcher: Fetcher,
    endpoints: Endpoints,
    what: str,
    *,
    operator: bool = False,
) -> Download:
    """The file (or tar) to download for a remote `source`. A URL the operator configured (COG_WEIGHTS,
    `operator=True`) is trusted as an endpoint is, even on a private address; a user's never is."""
    if source.kind == "url":
        return Download(source.url, None, frozenset({origin(source.url)}) if operator else frozenset())
    base = endpoints.base(source)
    trusted = endpoints.trusted(base)
    if source.kind == "replicate":
        url = f"{base}/{source.repo}" + (f"/versions/{source.version}" if source.version else "") + "/_weights"
        return Download(url, credential, trusted)
    if source.kind == "huggingface":
        return Download(_huggingface_file(source, credential, fetcher, base, trusted, what), credential, trusted)
    if source.kind == "civitai":
        return Download(_civitai_file(source, credential, fetcher, base, trusted, what), credential, trusted)
    raise AssertionError(source.kind)


def current_revision(source: Source, credential, fetcher: Fetcher, endpoints: Endpoints, what: str) -> str:
    """What a moving source names now: the commit of a Hugging Face branch or tag (the Hub's
    /api/models/{repo}/revision/{rev}), the newest version of a CivitAI model (/api/v1/models/{id})."""
    if source.kind == "civitai":
        return str(
            _civitai_newest(source, credential, fetcher, endpoints.civitai, endpoints.trusted(endpoints.civitai), what)[
                "id"
            ]
        )
    base = endpoints.huggingface
    url = f"{base}/api/models/{source.repo}/revision/{quote(source.revision, safe='')}"
    info, _ = fetcher.json(url, what, credential=credential, trusted=endpoints.trusted(base))
    commit = info.get("sha") if isinstance(info, dict) else None
    if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise UserError(f"{what}: unexpected answer from the Hugging Face API (no commit for {source.revision!r}).")
    return commit


def _huggingface_file(source, credential, fetcher: Fetcher, base: str, trusted, what: str) -> str:
    from huggingface_hub import hf_hub_url  # builds the URL only: no request, no token

    filename = source.filename
    if not filename:
        tree = f"{base}/api/models/{source.repo}/tree/{quote(source.revision, safe='')}"
        if source.folder:
            tree += "/" + quote(source.folder, safe="")
        names: list[str] = []
        url: str | None = tree + "?recursive=true&expand=false"
        for _ in range(100):  # the tree is paginated with Link headers
            entries, response = fetcher.json(url, what, credential=credential, trusted=trusted)
            if not isinstance(entries, list):
                raise UserError(f"{what}: unexpected answer from the Hugging Face API.")
            names += [e["path"] for e in entries if isinstance(e, dict) and e.get("type") == "file" and "path" in e]
            url = response.next_link()
            if not url:
                break
        filename = pick_lora_file(sorted(names), f"{what}: the repo")
    return hf_hub_url(source.repo, filename, revision=source.revision, endpoint=base)


def _civitai_file(source, credential, fetcher: Fetcher, base: str, trusted, what: str) -> str:
    if not source.version:  # a model is pinned to its newest version first (loras.cache, `current_revision`)
        raise AssertionError(f"{what}: a CivitAI model without a version reached the download")
    return f"{base}/api/download/models/{source.version}?{source.url or urlencode(CIVITAI_DEFAULT_QUERY)}"


def _civitai_newest(source, credential, fetcher: Fetcher, base: str, trusted, what: str) -> dict:
    """A CivitAI model's newest version (CivitAI lists them newest first), which must hold a SafeTensor model."""
    model, _ = fetcher.json(f"{base}/api/v1/models/{source.model_id}", what, credential=credential, trusted=trusted)
    versions = model.get("modelVersions") if isinstance(model, dict) else None
    if not versions or not isinstance(versions, list) or not isinstance(versions[0], dict):
        raise UserError(f"{what}: the model has no published versions.")
    newest = versions[0]
    if not str(newest.get("id", "")).isdigit():
        raise UserError(f"{what}: unexpected answer from the CivitAI API (a version without an id).")
    files = [f for f in newest.get("files") or [] if isinstance(f, dict) and f.get("type", "Model") == "Model"]
    if not any((f.get("metadata") or {}).get("format") == "SafeTensor" for f in files):
        found = ", ".join(printable(f.get("name", "?")) for f in files) or "none"
        raise UserError(f"{what}: its newest version has no SafeTensor model file (files: {found}).")
    return newest


def local_file(source: Source, max_bytes: int, *, operator: bool = False) -> Path:
    """The local file a `local` source names, if this request may read it.

    operator=True (the deployment's own LoRA): any path. Otherwise only with LORA_LOCAL_DIR set, and
    then only regular files inside that folder once symlinks and `..` are resolved, at most
    `max_bytes`; every other path gets the same error, decided before the path is looked at."""
    label = source.label
    if operator:
        path = source.path
        if not path.is_file():
            raise UserError(f"LoRA file {label!r} does not exist or is not a regular file.")
        _check(path, label)
        return path
    root = os.environ.get("LORA_LOCAL_DIR", "").strip()
    if not root:
        raise UserError(
            f"LoRA {label!r}: local paths are not accepted by this server; give a URL, a Replicate model, "
            "or a Hugging Face or CivitAI link."
        )
    refused = UserError(
        f"LoRA file {label!r} is not among the files this server offers (its LoRA folder, LORA_LOCAL_DIR)."
    )
    root_path = Path(os.path.abspath(root))
    typed = Path(os.path.abspath(source.path))
    real_root = Path(os.path.realpath(root_path))
    if not (typed.is_relative_to(root_path) or typed.is_relative_to(real_root)):
        raise refused  # decided from the text alone
    real = Path(os.path.realpath(typed))
    if real == real_root or not real.is_relative_to(real_root):
        raise refused
    try:
        info = os.stat(real)
    except OSError:
        raise refused from None
    if not stat.S_ISREG(info.st_mode):
        raise refused
    if info.st_size > max_bytes:
        raise UserError(f"LoRA file {label!r} is {info.st_size:,} bytes, over the {max_bytes:,}-byte limit.")
    _check(real, label)
    return real


def _check(path: Path, label: str) -> None:
    try:
        check_safetensors(path)
    except UserError as e:
        raise UserError(f"LoRA file {label!r}: {e}.") from None
    except OSError:
        raise UserError(f"LoRA file {label!r} could not be read.") from None
