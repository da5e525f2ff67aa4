"""The LoRA disk cache and its entry point, `LoraCache.fetch(source, tokens, operator=...)`.

Entries are named by a hash of the source's normalised key (`parse_source(text).key`) and, when a
private credential fetched them (a user's own token, or the operator's HF_TOKEN), a hash of that
credential: what one user's token can read is never served to a request without it. Downloads
land in `.tmp/` and are renamed into place once checked (atomic). Each entry has a lock (an
flock on `.locks/<entry>.lock`, a file that exists only while someone holds it), taken to fill
the entry, to serve it, and to evict it. The cache stays under `max_bytes`, least recently used
(access time, set on every use) out first; an entry used in the last EVICT_GRACE_S seconds is
kept (it may be loading now). An entry's mtime stays the time it was written.

A source that names something that moves (a Hugging Face branch: `huggingface.co/owner/repo`; a
CivitAI model: `civitai.com/models/<id>`, its newest version) is first resolved to the immutable
revision it names now (a commit, a version id), and cached by that revision: the site is asked again
at most every LORA_RESOLVE_TTL seconds, so a new revision is served within that time on every
replica, and the log says which revision a request used. If the site cannot be asked, the last
revision known is served (with a warning). (Replicate's `owner/model` is not re-resolved yet.)

Settings: LORA_CACHE_DIR (default /tmp/lora-cache), LORA_CACHE_MAX_BYTES (default 20 GiB),
LORA_RESOLVE_TTL (default 300 s).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from errors import UserError
from loras.files import finalize_download
from loras.sites import Endpoints, credential_for, current_revision, local_file, resolve
from loras.sources import Source, moving, parse_source, pinned, revision_of
from net.fetch import Fetcher, Limits, redact_library_logs
from net.url_guard import Guard, Resolver

logger = logging.getLogger(__name__)

EVICT_GRACE_S = 30.0
STALE_S = 3600.0
RESOLVE_TTL_S = 300.0  # LORA_RESOLVE_TTL's default


@dataclass(frozen=True)
class UserTokens:
    """A user's own tokens, sent only to their own site; the repr shows which are set, never them."""

    huggingface: str = ""
    civitai: str = ""

    def __repr__(self) -> str:
        shown = (f"{name}={'<set>' if getattr(self, name) else repr('')}" for name in ("huggingface", "civitai"))
        return f"UserTokens({', '.join(shown)})"


class _EntryLock:
    """An exclusive flock on a lock file that exists only while held (no pile of lock files).

    The holder unlinks the file before unlocking; whoever then gets the lock on the old, unlinked
    file sees that the path no longer names it and tries again."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self.fd = fd
                    return True
            except FileNotFoundError:
                pass
            os.close(fd)  # the previous holder removed it: lock the current one

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


class LoraCache:
    """LoRA files on disk, keyed by normalised source (and private credential), bounded in bytes."""

    def __init__(self, cache_dir: Path, max_bytes: int, *, resolver: Resolver | None = None):
        """`resolver(host, port) -> [address, ...]`: the DNS lookup the SSRF guard uses (tests inject one)."""
        self.cache_dir = Path(cache_dir)
        self.max_bytes = int(max_bytes)
        self.tmp_dir = self.cache_dir / ".tmp"
        self.lock_dir = self.cache_dir / ".locks"
        self.resolver = resolver
        self.counts: collections.Counter[str] = collections.Counter()  # hits, misses, evictions since start
        self._cleaned = False
        # (source key, credential scope) → (the source at the commit it named, when that was asked)
        self._pins: dict[tuple[str, str], tuple[Source, float]] = {}
        redact_library_logs()

    @classmethod
    def from_env(cls) -> LoraCache:
        default = Path("/tmp/lora-cache") if Path("/tmp").is_dir() else Path.home() / ".cache" / "flux-lora"
        directory = Path(os.environ.get("LORA_CACHE_DIR", str(default)))
        return cls(directory, int(os.environ.get("LORA_CACHE_MAX_BYTES", str(20 << 30))))

    def path_for(self, source: Source, scope: str = "") -> Path:
        """The entry for a source; `scope`: the hash of the private credential that fetched it, if any."""
        name = source.key + (f"\0credential:{scope}" if scope else "")
        return self.cache_dir / (hashlib.sha256(name.encode()).hexdigest()[:40] + ".safetensors")

    def fetch(
        self,
        source: str,
        tokens: UserTokens | None = None,
        *,
        operator: bool = False,
        label: str | None = None,
        deadline: float | None = None,
    ) -> Path:
        """A local, complete, valid .safetensors file for `source`; UserError (one line) on any failure.

        `tokens`: the user's own tokens (take precedence over the deployment's; sent to their site
        only). `operator=True`: the deployment's own LoRA: any local path, HF_TOKEN as a fallback.
        `label`: the name to log instead of the source's (the operator's URL may be a secret).
        `deadline` (time.monotonic()): a whole request's LoRA downloads share it."""
        parsed = parse_source(source)
        if label is not None:
            parsed = dataclasses.replace(parsed, label=label)
        tokens = tokens or UserTokens()
        limits = Limits.from_env()
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UserError(
                    f"LoRA {parsed.label}: the request's LoRA downloads took longer than "
                    f"{limits.total_timeout:g} s in all (LORA_DOWNLOAD_TOTAL_TIMEOUT)."
                )
            limits = dataclasses.replace(limits, total_timeout=min(limits.total_timeout, left))
        if parsed.kind == "local":
            return local_file(parsed, limits.max_file_bytes, operator=operator)
        endpoints = Endpoints.from_env()
        credential = credential_for(
            parsed, endpoints, huggingface=tokens.huggingface, civitai=tokens.civitai, operator=operator
        )
        self._prepare_dirs()
        scope = credential.scope if credential is not None else ""
        fetcher = None  # one deadline for a whole fetch: the pin's question and the download share it
        if moving(parsed):
            parsed, fetcher = self._pin(parsed, credential, endpoints, limits, scope)
        if operator:  # fetched on the operator's trust (private hosts, HF_TOKEN): never served to a user's request
            scope = f"operator:{scope}"
        if scope and (shared := self._serve(self.path_for(parsed), parsed)):
            return shared  # fetched without a private credential: anyone may have it
        dest = self.path_for(parsed, scope)
        with self._locked(dest):
            if self._touch(dest):
                self._log_hit(parsed, dest)
                return dest
            start = time.monotonic()
            fetcher = fetcher or Fetcher(Guard.from_env(self.resolver, loras=True), limits)
            self._download(parsed, credential, endpoints, fetcher, limits, dest, operator=operator)
            self.counts["misses"] += 1
            logger.info(
                "LoRA %s: downloaded %s bytes in %.2f s",
                parsed.label,
                f"{dest.stat().st_size:,}",
                time.monotonic() - start,
            )
        self._evict(keep=dest)
        return dest

    def _pin(self, source: Source, credential, endpoints: Endpoints, limits: Limits, scope: str):
        """(`source` at the revision it names now, asked at most every LORA_RESOLVE_TTL seconds; the Fetcher
        that asked, or None)."""
        ttl = float(os.environ.get("LORA_RESOLVE_TTL", str(RESOLVE_TTL_S)))
        known = self._pins.get((source.key, scope))
        now = time.monotonic()
        name = moving(source)
        fetcher = None
        if known is not None and now - known[1] < ttl:
            at = known[0]
        else:
            what = f"LoRA {source.label}"
            try:
                fetcher = Fetcher(Guard.from_env(self.resolver, loras=True), limits)
                at = pinned(source, current_revision(source, credential, fetcher, endpoints, what))
            except UserError as e:
                if known is None:
                    raise
                at = known[0]
                logger.warning("%s: could not ask what %s is (%s); serving the last known one", what, name, e)
            if known is not None and revision_of(known[0]) != revision_of(at):
                old, new = revision_of(known[0])[:12], revision_of(at)[:12]
                logger.info("LoRA %s: %s moved from %s to %s", source.label, name, old, new)
            self._pins[source.key, scope] = (at, now)
        noun = "commit" if source.kind == "huggingface" else "version"
        logger.info("LoRA %s: %s is %s %s", source.label, name, noun, revision_of(at))
        return at, fetcher

    @contextlib.contextmanager
    def entry_lock(self, path: Path):
        """Hold an entry's lock (nothing evicts or replaces it meanwhile), e.g. while loading it."""
        self._prepare_dirs()
        with self._locked(Path(path)):
            yield

    # ---- internals

    def _serve(self, path: Path, source: Source) -> Path | None:
        with self._locked(path):
            if self._touch(path):
                self._log_hit(source, path)
                return path
        return None

    @staticmethod
    def _touch(path: Path) -> bool:
        """Mark an entry as just used (its access time: the mtime stays the file's own, which the
        loader's in-memory cache keys on); False when there is none."""
        try:
            info = path.stat()
            os.utime(path, ns=(time.time_ns(), info.st_mtime_ns))
            return path.is_file()
        except FileNotFoundError:
            return False

    def _log_hit(self, source: Source, path: Path) -> None:
        self.counts["hits"] += 1
        with contextlib.suppress(OSError):
            logger.info("LoRA %s: from the disk cache (%s bytes)", source.label, f"{path.stat().st_size:,}")

    def _lock(self, path: Path) -> _EntryLock:
        return _EntryLock(self.lock_dir / (path.stem + ".lock"))

    @contextlib.contextmanager
    def _locked(self, path: Path):
        """One filler or user per entry, across threads and processes (flock conflicts between open files)."""
        lock = self._lock(path)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def _prepare_dirs(self) -> None:
        """Create the cache's folders; once per process, drop what a crashed process left (over an hour old)."""
        for d in (self.cache_dir, self.tmp_dir, self.lock_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self._cleaned:
            return
        self._cleaned = True
        now = time.time()
        for stale in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                if now - stale.stat().st_mtime > STALE_S:
                    stale.unlink()
        for left in self.lock_dir.glob("*.lock"):  # a holder that died leaves its file: release it
            with contextlib.suppress(OSError):
                if now - left.stat().st_mtime > STALE_S and (lock := _EntryLock(left)).acquire(blocking=False):
                    lock.release()

    def _download(
        self,
        source: Source,
        credential,
        endpoints: Endpoints,
        fetcher: Fetcher,
        limits: Limits,
        dest: Path,
        *,
        operator: bool = False,
    ) -> None:
        what = f"LoRA {source.label}"
        plan = resolve(source, credential, fetcher, endpoints, what, operator=operator)
        fd, raw = tempfile.mkstemp(dir=self.tmp_dir, suffix=".part")
        os.close(fd)
        raw = Path(raw)
        try:
            fetcher.to_file(plan.url, raw, what, credential=plan.credential, trusted=plan.trusted)
            finalize_download(raw, dest, limits.max_file_bytes, what)
        finally:
            raw.unlink(missing_ok=True)

    def _evict(self, keep: Path) -> None:
        entries = []
        for path in self.cache_dir.glob("*.safetensors"):
            with contextlib.suppress(FileNotFoundError):
                info = path.stat()
                entries.append((info.st_atime, info.st_size, path))
        total = sum(size for _, size, _ in entries)
        for used, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path == keep or time.time() - used < EVICT_GRACE_S:
                continue
            lock = self._lock(path)
            if not lock.acquire(blocking=False):
                continue  # being filled, served or loaded right now
            try:
                try:
                    info = path.stat()
                except FileNotFoundError:
                    total -= size
                    continue
                if info.st_atime != used:
                    continue  # used since we looked: no longer the least recently used
                path.unlink()
                total -= size
                self.counts["evictions"] += 1
                logger.info("LoRA cache: evicted %s (%s bytes) to stay under %s bytes", path.name, size, self.max_bytes)
            finally:
                lock.release()
