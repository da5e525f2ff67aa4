"""Where LoRAs come from: parse an `extra_lora` string, download it safely, keep it in a disk cache.

Accepted sources (`parse_source`):
    owner/model, owner/model/<version>, owner/model/versions/<version>  Replicate (also behind
        https://replicate.com/); weights come from `/_weights` as a tar holding one .safetensors
    https://…/trained_model.tar (any URL to a .tar)                       a Replicate training output
    huggingface.co/owner/repo[/tree/<rev>/<folder>]                       the one LoRA file in it
    huggingface.co/owner/repo/resolve|blob/<rev>/<path>                   that file
    civitai.com/models/<id>[/<slug>][?modelVersionId=<v>]                  newest version, or version v
    civitai.com/api/download/models/<v>                                   version v
    any http(s) URL to a .safetensors file (query string kept), or a local path

Base URLs come from HF_ENDPOINT, REPLICATE_ENDPOINT and CIVITAI_ENDPOINT; tokens from HF_TOKEN,
REPLICATE_API_TOKEN and CIVITAI_API_TOKEN (sent as Authorization headers, only to the host they
belong to, never logged). Every failure is a UserError with one line for the user.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import socket
import struct
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlencode, urljoin, urlsplit

import requests
import urllib3

from errors import UserError

logger = logging.getLogger(__name__)

ACCEPTED_FORMS = (
    "owner/model[/version] or https://replicate.com/owner/model[/versions/<id>] (Replicate); "
    "a URL to a Replicate training's .tar; huggingface.co/owner/repo[/resolve/<rev>/<file>]; "
    "civitai.com/models/<id>[?modelVersionId=<v>] or civitai.com/api/download/models/<v>; "
    "an http(s) URL to a .safetensors file; a local .safetensors path"
)
HF_PREFERRED = ("lora.safetensors", "pytorch_lora_weights.safetensors")
MAX_REDIRECTS = 10
CHUNK = 1 << 20
USER_AGENT = "flux-lora-cog"


# ---------------------------------------------------------------- settings (read from env per call)


@dataclass(frozen=True)
class Settings:
    hf_endpoint: str
    replicate_endpoint: str
    civitai_endpoint: str
    timeout: float  # seconds per connect/read
    total_timeout: float  # seconds for a whole download
    max_file_bytes: int
    allow_private: bool

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            hf_endpoint=env.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/"),
            replicate_endpoint=env.get("REPLICATE_ENDPOINT", "https://replicate.com").rstrip("/"),
            civitai_endpoint=env.get("CIVITAI_ENDPOINT", "https://civitai.com").rstrip("/"),
            timeout=float(env.get("LORA_DOWNLOAD_TIMEOUT", "30")),
            total_timeout=float(env.get("LORA_DOWNLOAD_TOTAL_TIMEOUT", "900")),
            max_file_bytes=int(env.get("LORA_MAX_FILE_BYTES", str(4 << 30))),
            allow_private=env.get("LORA_ALLOW_PRIVATE_URLS", "") in ("1", "true", "yes"),
        )


# ---------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Source:
    """A parsed LoRA source. `key` is the normalised cache key; `label` is safe to log."""

    kind: str  # local | replicate | huggingface | civitai | url
    key: str
    label: str
    path: Path | None = None  # local
    repo: str = ""  # replicate owner/model, huggingface owner/repo
    version: str = ""  # replicate version, civitai version id
    revision: str = ""  # huggingface
    filename: str = ""  # huggingface file path in the repo ("" = pick one)
    folder: str = ""  # huggingface subfolder to pick from
    model_id: str = ""  # civitai model id
    url: str = ""  # url kind; civitai download query


_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPLICATE = re.compile(rf"^/?(?P<owner>{_NAME})/(?P<name>{_NAME})(?:/(?:versions/)?(?P<version>[A-Za-z0-9]+))?/?$")
_KNOWN_HOSTS = ("huggingface.co", "hf.co", "civitai.com", "replicate.com", "replicate.delivery")


def redact(url: str) -> str:
    """A URL fit for logs and errors: no query string, no user info."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")


def _unsupported(text: str) -> UserError:
    shown = redact(text) if "://" in text else text[:200]
    return UserError(f"Unsupported LoRA source {shown!r}. Accepted: {ACCEPTED_FORMS}.")


def parse_source(text: str) -> Source:
    text = (text or "").strip()
    if not text:
        raise UserError(f"Empty LoRA source. Accepted: {ACCEPTED_FORMS}.")
    if text.startswith("file://"):
        return _local(Path(unquote(urlsplit(text).path)))
    if "://" not in text:
        if text.startswith(("/", "./", "../", "~")) or Path(text).is_file():
            return _local(Path(text).expanduser())
        if text.lower().startswith(tuple(f"{p}{h}/" for h in _KNOWN_HOSTS for p in ("", "www."))):
            text = "https://" + text
        elif m := _REPLICATE.match(text):
            return _replicate(m)
        else:
            raise _unsupported(text)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _unsupported(text)
    host = parts.hostname.lower().removeprefix("www.")
    if host in ("huggingface.co", "hf.co"):
        return _huggingface(parts, text)
    if host == "civitai.com":
        return _civitai(parts, text)
    if host == "replicate.com" and (m := _REPLICATE.match(parts.path)):
        return _replicate(m)
    path = parts.path.lower()
    if path.endswith((".safetensors", ".tar")):
        normal = parts._replace(scheme=parts.scheme.lower(), netloc=parts.netloc.lower(), fragment="").geturl()
        return Source("url", f"url:{normal}", redact(text), url=normal)
    raise _unsupported(text)


def _local(path: Path) -> Source:
    return Source("local", f"local:{path.resolve()}", str(path), path=path)


def _replicate(m: re.Match) -> Source:
    repo = f"{m['owner']}/{m['name']}".lower()
    version = m["version"] or ""
    label = f"{repo}/versions/{version}" if version else repo
    return Source("replicate", f"replicate:{label}", label, repo=repo, version=version)


def _huggingface(parts, text: str) -> Source:
    segs = [unquote(s) for s in parts.path.split("/") if s]
    if len(segs) < 2 or segs[0] in ("datasets", "spaces"):
        raise UserError(f"Hugging Face LoRA {redact(text)!r}: give a model repo, huggingface.co/owner/repo.")
    repo, rest = f"{segs[0]}/{segs[1]}", segs[2:]
    revision, filename, folder = "main", "", ""
    if len(rest) >= 2 and rest[0] in ("resolve", "blob", "tree"):
        revision, path = rest[1], "/".join(rest[2:])
        if rest[0] == "tree" or not path:
            folder = path
        else:
            filename = path  # resolve/blob name a file (one that is not safetensors fails its check)
    elif rest and rest[-1].endswith(".safetensors"):
        filename = "/".join(rest)
    elif rest:
        folder = "/".join(rest)
    where = filename or (folder + "/" if folder else "")
    label = f"huggingface.co/{repo}" + (f"@{revision}" if revision != "main" else "") + (f":{where}" if where else "")
    return Source(
        "huggingface",
        f"hf:{repo}@{revision}:{where}",
        label,
        repo=repo,
        revision=revision,
        filename=filename,
        folder=folder,
    )


_CIVITAI_DEFAULT_QUERY = {"type": "Model", "format": "SafeTensor"}


def _civitai(parts, text: str) -> Source:
    query = dict(parse_qsl(parts.query))
    if m := re.match(r"^/models/(\d+)(?:/[^/]*)?/?$", parts.path):
        if version := query.get("modelVersionId", ""):
            if not version.isdigit():
                raise _unsupported(text)
            return Source("civitai", f"civitai:version:{version}", f"civitai version {version}", version=version)
        model = m[1]
        return Source("civitai", f"civitai:model:{model}", f"civitai model {model}", model_id=model)
    if m := re.match(r"^/api/download/models/(\d+)/?$", parts.path):
        version = m[1]
        query.pop("token", None)  # a token pasted into the URL is never part of the cache key
        extra = "" if query in ({}, _CIVITAI_DEFAULT_QUERY) else "?" + urlencode(sorted(query.items()))
        key = f"civitai:version:{version}{extra}"
        return Source("civitai", key, f"civitai version {version}", version=version, url=parts.query)
    raise _unsupported(text)


class RedactQueries(logging.Filter):
    """Strips query strings (signatures, pasted tokens) from URLs that urllib3 logs at DEBUG."""

    _QUERY = re.compile(r"\?[^\s\"']*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._QUERY.sub("?…", a) if isinstance(a, str) else a for a in record.args)
        return True


def redact_library_logs() -> None:
    """Install RedactQueries on urllib3's request log, once."""
    target = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, RedactQueries) for f in target.filters):
        target.addFilter(RedactQueries())


# ---------------------------------------------------------------- SSRF guard


def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (what the connection may use)."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def check_url_allowed(url: str, settings: Settings) -> None:
    """Refuse URLs whose host resolves to a loopback, private, link-local or metadata address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"Refusing to fetch {redact(url)!r}: only http(s) URLs are allowed.")
    if settings.allow_private:
        return
    host = parts.hostname
    try:
        addresses = resolve_host(host, parts.port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError) as e:
        raise UserError(f"Could not resolve host {host!r} of {redact(url)!r}.") from e
    for text in addresses:
        address = ipaddress.ip_address(text.split("%")[0])
        mapped = getattr(address, "ipv4_mapped", None)
        if mapped is not None:
            address = mapped
        if not address.is_global or address.is_multicast:
            raise UserError(
                f"Refusing to fetch {redact(url)!r}: {host} resolves to a private, loopback, link-local or "
                "metadata address (set LORA_ALLOW_PRIVATE_URLS=1 to allow private mirrors)."
            )


# ---------------------------------------------------------------- HTTP


class _Fetcher:
    """GETs with per-hop SSRF checks, bounded time and size, and credentials kept on their own host."""

    def __init__(self, settings: Settings, session: requests.Session):
        self.settings = settings
        self.session = session

    def open(self, url: str, headers: dict[str, str], what: str) -> requests.Response:
        origin = urlsplit(url)[:2]
        for _ in range(MAX_REDIRECTS + 1):
            check_url_allowed(url, self.settings)
            hop_headers = {"User-Agent": USER_AGENT}
            if urlsplit(url)[:2] == origin:
                hop_headers.update(headers)
            try:
                response = self.session.get(
                    url,
                    headers=hop_headers,
                    stream=True,
                    allow_redirects=False,
                    timeout=(self.settings.timeout, self.settings.timeout),
                )
            except requests.exceptions.Timeout as e:
                raise UserError(f"{what}: timed out after {self.settings.timeout:g} s ({redact(url)}).") from e
            except requests.exceptions.RequestException as e:
                raise UserError(f"{what}: could not connect to {redact(url)}.") from e
            if response.is_redirect and "location" in response.headers:
                url = urljoin(url, response.headers["location"])
                response.close()
                continue
            if response.status_code >= 400:
                response.close()
                raise UserError(f"{what}: {_describe_status(response)} ({redact(url)}).")
            return response
        raise UserError(f"{what}: too many redirects.")

    def json(self, url: str, headers: dict[str, str], what: str):
        response = self.open(url, headers, what)
        body = self._read_capped(response, 32 << 20, what)
        try:
            return json.loads(body), response
        except ValueError as e:
            raise UserError(f"{what}: the server did not answer with JSON ({redact(url)}).") from e

    def to_file(self, url: str, headers: dict[str, str], dest: Path, what: str) -> None:
        response = self.open(url, headers, what)
        cap = self.settings.max_file_bytes
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > cap:
            response.close()
            raise UserError(f"{what}: the file is {int(length):,} bytes, over the {cap:,}-byte limit.")
        deadline = time.monotonic() + self.settings.total_timeout
        size = 0
        with response, open(dest, "wb") as out:
            for chunk in self._chunks(response, what):
                size += len(chunk)
                if size > cap:
                    raise UserError(f"{what}: the file is over the {cap:,}-byte limit.")
                if time.monotonic() > deadline:
                    raise UserError(f"{what}: download took longer than {self.settings.total_timeout:g} s.")
                out.write(chunk)
        if length.isdigit() and size != int(length):
            raise UserError(f"{what}: the download was cut short ({size:,} of {int(length):,} bytes).")

    def _read_capped(self, response: requests.Response, cap: int, what: str) -> bytes:
        data = bytearray()
        with response:
            for chunk in self._chunks(response, what):
                data += chunk
                if len(data) > cap:
                    raise UserError(f"{what}: the answer is too large.")
        return bytes(data)

    def _chunks(self, response: requests.Response, what: str):
        try:
            yield from response.iter_content(CHUNK)
        except requests.exceptions.ConnectionError as e:
            if e.args and isinstance(e.args[0], urllib3.exceptions.ReadTimeoutError):
                raise UserError(f"{what}: timed out after {self.settings.timeout:g} s without data.") from e
            raise UserError(f"{what}: the connection broke during the download.") from e
        except requests.exceptions.RequestException as e:
            raise UserError(f"{what}: the connection broke during the download.") from e


def _describe_status(response: requests.Response) -> str:
    code = response.status_code
    hf_code = response.headers.get("x-error-code", "")
    if hf_code == "GatedRepo":
        return f"HTTP {code}, the repo is gated: accept its terms on Hugging Face and set HF_TOKEN"
    if hf_code == "RepoNotFound":
        return f"HTTP {code}, repo not found (or private: set HF_TOKEN)"
    if hf_code in ("EntryNotFound", "RevisionNotFound"):
        return f"HTTP {code}, {'file' if hf_code == 'EntryNotFound' else 'revision'} not found in the repo"
    if code in (401, 403):
        return f"HTTP {code}, access denied (is the token missing or wrong?)"
    if code == 404:
        return "HTTP 404, not found"
    return f"HTTP {code}"


# ---------------------------------------------------------------- file checks


def check_safetensors(path: Path) -> None:
    """Raise UserError unless `path` is a complete safetensors file. Nothing is unpickled, ever."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"not a safetensors file ({_sniff(head)})")
        (n,) = struct.unpack("<Q", head)
        if not 2 <= n <= min(size - 8, 100 << 20):
            raise UserError(f"not a safetensors file ({_sniff(head + f.read(504))})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise UserError("not a safetensors file (its header is not JSON)") from e
    if not isinstance(header, dict):
        raise UserError("not a safetensors file (its header is not a JSON object)")
    end = 0
    tensors = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = entry["data_offsets"]
            if not 0 <= begin <= stop or not all(isinstance(d, int) and d >= 0 for d in entry["shape"]):
                raise ValueError
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"not a safetensors file (bad entry {name!r})") from e
        end = max(end, stop)
        tensors += 1
    if tensors == 0:
        raise UserError("the safetensors file holds no tensors")
    if 8 + n + end != size:
        raise UserError(f"the safetensors file is truncated or padded ({size:,} bytes, expected {8 + n + end:,})")


def _sniff(head: bytes) -> str:
    text = head.lstrip()[:64].lower()
    if not head:
        return "the file is empty"
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"<")):
        return "got an HTML page, probably an error or login page"
    if head.startswith(b"PK\x03\x04"):
        return "it is a zip archive (or a pickled PyTorch checkpoint), which is not accepted"
    if head[:1] == b"\x80":
        return "it is a Python pickle, which is never loaded"
    if text.startswith((b"{", b"[")):
        return "got a JSON document"
    return "unrecognised content"


def _pick(names: list[str], where: str) -> str:
    """The one LoRA file among `names`: the only .safetensors, else a preferred name."""
    candidates = [n for n in names if n.lower().endswith(".safetensors")]
    if len(candidates) == 1:
        return candidates[0]
    for preferred in HF_PREFERRED:
        matches = [n for n in candidates if n.rsplit("/", 1)[-1] == preferred]
        if len(matches) == 1:
            return matches[0]
    if not candidates:
        raise UserError(f"{where} holds no .safetensors file (found: {', '.join(names[:20]) or 'nothing'}).")
    raise UserError(
        f"{where} holds several .safetensors files and none is named {' or '.join(HF_PREFERRED)}: "
        f"{', '.join(candidates[:20])}. Name the file in the URL (…/resolve/main/<file>)."
    )


def _extract_tar(archive: Path, dest: Path, cap: int, what: str) -> None:
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        name = _pick(sorted(members), f"{what}: the archive")
        member = members[name]
        if member.size > cap:
            raise UserError(f"{what}: {name} is {member.size:,} bytes, over the {cap:,}-byte limit.")
        with tar.extractfile(member) as src, open(dest, "wb") as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)


def finalize_download(raw: Path, dest: Path, settings: Settings, what: str) -> None:
    """Check a downloaded file (a safetensors, or a tar holding one) and move it to `dest` atomically."""
    try:
        check_safetensors(raw)
        os.replace(raw, dest)
        return
    except UserError as e:
        first_error = e
    if tarfile.is_tarfile(raw):
        inner = raw.with_suffix(".inner")
        try:
            _extract_tar(raw, inner, settings.max_file_bytes, what)
            try:
                check_safetensors(inner)
            except UserError as e:
                raise UserError(f"{what}: the archive's file is {e}.") from e
            os.replace(inner, dest)
        finally:
            inner.unlink(missing_ok=True)
        return
    raise UserError(f"{what}: {first_error}.")


# ---------------------------------------------------------------- resolution and the cache


class LoraCache:
    """LoRA files on disk, keyed by normalised source, bounded in bytes, least recently used out first."""

    def __init__(self, cache_dir: Path, max_bytes: int):
        self.cache_dir = Path(cache_dir)
        self.max_bytes = int(max_bytes)
        self.tmp_dir = self.cache_dir / ".tmp"
        self.lock_dir = self.cache_dir / ".locks"
        self.downloads = 0  # completed downloads, for tests and metrics
        self._cleaned = False
        self._session = requests.Session()
        redact_library_logs()

    @classmethod
    def from_env(cls) -> LoraCache:
        default = Path("/tmp/lora-cache") if Path("/tmp").is_dir() else Path.home() / ".cache" / "flux-lora"
        directory = Path(os.environ.get("LORA_CACHE_DIR", str(default)))
        return cls(directory, int(os.environ.get("LORA_CACHE_MAX_BYTES", str(20 << 30))))

    def path_for(self, source: Source) -> Path:
        return self.cache_dir / (hashlib.sha256(source.key.encode()).hexdigest()[:40] + ".safetensors")

    def fetch(self, source: str) -> Path:
        """A local, complete, valid .safetensors file for `source`; UserError (one line) on any failure."""
        parsed = parse_source(source)
        if parsed.kind == "local":
            return self._check_local(parsed)
        self._prepare_dirs()
        dest = self.path_for(parsed)
        with self._locked(dest):
            if dest.is_file():
                os.utime(dest)
                logger.info("LoRA %s: from the disk cache (%s bytes)", parsed.label, f"{dest.stat().st_size:,}")
                return dest
            start = time.monotonic()
            self._download(parsed, dest)
            self.downloads += 1
            logger.info(
                "LoRA %s: downloaded %s bytes in %.2f s",
                parsed.label,
                f"{dest.stat().st_size:,}",
                time.monotonic() - start,
            )
        self._evict(keep=dest)
        return dest

    def _prepare_dirs(self) -> None:
        """Create the cache's folders; drop partial downloads a crashed process left (over an hour old)."""
        for d in (self.cache_dir, self.tmp_dir, self.lock_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self._cleaned:
            return
        self._cleaned = True
        for stale in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > 3600:
                    stale.unlink()

    def _check_local(self, source: Source) -> Path:
        path = source.path
        if not path.is_file():
            raise UserError(f"LoRA file {source.label!r} does not exist.")
        try:
            check_safetensors(path)
        except UserError as e:
            raise UserError(f"LoRA file {source.label!r}: {e}.") from e
        return path

    @contextlib.contextmanager
    def _locked(self, dest: Path):
        """One download per entry, across threads and processes (flock conflicts between open files)."""
        with open(self.lock_dir / (dest.stem + ".lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _download(self, source: Source, dest: Path) -> None:
        settings = Settings.from_env()
        fetcher = _Fetcher(settings, self._session)
        what = f"LoRA {source.label}"
        url, headers = _resolve(source, settings, fetcher, what)
        fd, raw = tempfile.mkstemp(dir=self.tmp_dir, suffix=".part")
        os.close(fd)
        raw = Path(raw)
        try:
            fetcher.to_file(url, headers, raw, what)
            finalize_download(raw, dest, settings, what)
        finally:
            raw.unlink(missing_ok=True)

    def _evict(self, keep: Path) -> None:
        entries = []
        for path in self.cache_dir.glob("*.safetensors"):
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            logger.info("LoRA cache: evicted %s (%s bytes) to stay under %s bytes", path.name, size, self.max_bytes)


def _bearer(variable: str) -> dict[str, str]:
    token = os.environ.get(variable, "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _resolve(source: Source, settings: Settings, fetcher: _Fetcher, what: str) -> tuple[str, dict[str, str]]:
    """The URL of the file (or tar) to download for `source`, and the headers for its host."""
    if source.kind == "url":
        return source.url, {}
    if source.kind == "replicate":
        base = f"{settings.replicate_endpoint}/{source.repo}"
        url = f"{base}/versions/{source.version}/_weights" if source.version else f"{base}/_weights"
        return url, _bearer("REPLICATE_API_TOKEN")
    if source.kind == "huggingface":
        return _resolve_huggingface(source, settings, fetcher, what)
    if source.kind == "civitai":
        return _resolve_civitai(source, settings, fetcher, what)
    raise AssertionError(source.kind)


def _resolve_huggingface(source: Source, settings: Settings, fetcher: _Fetcher, what: str):
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    # HF_TOKEN (else the saved login) goes on every Hugging Face request; hf_hub_url honours HF_ENDPOINT.
    token = os.environ.get("HF_TOKEN", "").strip() or None
    headers = {k: v for k, v in build_hf_headers(token=token).items() if k.lower() == "authorization"}
    filename = source.filename
    if not filename:
        tree = f"{settings.hf_endpoint}/api/models/{source.repo}/tree/{quote(source.revision, safe='')}"
        if source.folder:
            tree += "/" + quote(source.folder, safe="")
        names: list[str] = []
        url = tree + "?recursive=true&expand=false"
        for _ in range(100):  # the tree is paginated with Link headers
            entries, response = fetcher.json(url, headers, what)
            if not isinstance(entries, list):
                raise UserError(f"{what}: unexpected answer from the Hugging Face API.")
            names += [e["path"] for e in entries if isinstance(e, dict) and e.get("type") == "file"]
            url = response.links.get("next", {}).get("url")
            if not url:
                break
        filename = _pick(sorted(names), f"{what}: the repo")
    return hf_hub_url(source.repo, filename, revision=source.revision, endpoint=settings.hf_endpoint), headers


def _resolve_civitai(source: Source, settings: Settings, fetcher: _Fetcher, what: str):
    headers = _bearer("CIVITAI_API_TOKEN")
    base = settings.civitai_endpoint
    if source.version:
        query = source.url or urlencode(_CIVITAI_DEFAULT_QUERY)
        return f"{base}/api/download/models/{source.version}?{query}", headers
    model, _ = fetcher.json(f"{base}/api/v1/models/{source.model_id}", headers, what)
    versions = model.get("modelVersions") if isinstance(model, dict) else None
    if not versions:
        raise UserError(f"{what}: the model has no published versions.")
    newest = versions[0]  # CivitAI lists a model's versions newest first
    files = [f for f in newest.get("files") or [] if f.get("type", "Model") == "Model"]
    safetensors = [f for f in files if (f.get("metadata") or {}).get("format") == "SafeTensor"]
    if not safetensors:
        found = ", ".join(f.get("name", "?") for f in files) or "none"
        raise UserError(f"{what}: its newest version has no SafeTensor model file (files: {found}).")
    chosen = next((f for f in safetensors if f.get("primary")), safetensors[0])
    logger.info("LoRA %s: newest version is %s (%s)", source.label, newest.get("id"), chosen.get("name"))
    download = chosen.get("downloadUrl") or f"/api/download/models/{newest.get('id')}"
    parts = urlsplit(download)  # served from the configured endpoint, whatever host the API names
    return f"{base}{parts.path}" + (f"?{parts.query}" if parts.query else ""), headers
