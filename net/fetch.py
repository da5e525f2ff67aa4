"""Guarded HTTP for every fetch made on a user's behalf: LoRA downloads and the API calls that find
them, input images given as URLs, and webhook deliveries.

Every hop (the first URL and each redirect) goes through the SSRF guard and connects only to the
address the guard checked (net.url_guard). A credential is sent only to the one origin it
belongs to, never across a redirect to another host. One `Deadline` bounds everything a fetch
does (API calls, redirects, the file): a watchdog shuts the socket down when it passes, so a
server trickling bytes (in the headers or the body) cannot hold a worker past it. Sizes are
capped (Content-Length up front, counted bytes as they come). Failures are one-line UserErrors
raised `from None`: no exception chain carries a URL's query string or a token into a log.

Settings (read per fetch): LORA_DOWNLOAD_TIMEOUT (s per connect / per read without data),
LORA_DOWNLOAD_TOTAL_TIMEOUT (s for a whole fetch), LORA_MAX_FILE_BYTES; TLS trust from
REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, else certifi's bundle (what requests uses).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import certifi
import urllib3
from requests.utils import parse_header_links, requote_uri

from errors import UserError
from net.url_guard import Guard, Target, origin, redact

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 10
CHUNK = 1 << 20
MAX_JSON_BYTES = 32 << 20
USER_AGENT = "flux-lora-cog"
REDIRECT_CODES = (301, 302, 303, 307, 308)
PROGRESS_EVERY_S = 0.5  # a download's progress in the logs: at most two lines a second
_TOKEN = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces: nothing that could split a header


@dataclass(frozen=True)
class Limits:
    timeout: float  # seconds per connect, and per read that waits for data
    total_timeout: float  # seconds for a whole fetch: API calls, redirects and the file
    max_file_bytes: int

    @classmethod
    def from_env(cls) -> Limits:
        env = os.environ
        try:
            return cls(
                timeout=float(env.get("LORA_DOWNLOAD_TIMEOUT", "30")),
                total_timeout=float(env.get("LORA_DOWNLOAD_TOTAL_TIMEOUT", "900")),
                max_file_bytes=int(env.get("LORA_MAX_FILE_BYTES", str(4 << 30))),
            )
        except ValueError:
            raise RuntimeError(
                "LORA_DOWNLOAD_TIMEOUT, LORA_DOWNLOAD_TOTAL_TIMEOUT and LORA_MAX_FILE_BYTES must be numbers"
            ) from None


@dataclass(frozen=True)
class Credential:
    """A bearer token and the one origin (scheme://host:port) it may be sent to.

    `private`: the token is not lent to every request (a user's own, or the operator's HF_TOKEN),
    so what it fetches is cached apart, under `scope` (a hash of origin and token)."""

    origin: str
    token: str = field(repr=False)
    private: bool = False
    what: str = "token"  # for errors: "the Hugging Face token", ...

    def __post_init__(self):
        if not _TOKEN.match(self.token):
            raise UserError(f"{self.what} is malformed (it must be printable ASCII without spaces).")

    @property
    def header(self) -> str:
        return f"Bearer {self.token}"

    @property
    def scope(self) -> str:
        if not self.private:
            return ""
        return hashlib.sha256(f"{self.origin}\0{self.token}".encode()).hexdigest()[:32]


class Deadline:
    """A point in time that a whole fetch must finish by."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def error(self, what: str) -> UserError:
        return UserError(f"{what}: took longer than {self.seconds:g} s (LORA_DOWNLOAD_TOTAL_TIMEOUT).")

    def check(self, what: str) -> None:
        if self.remaining() <= 0:
            raise self.error(what)


class _Watchdog:
    """Shuts down a connection's socket once the deadline passes, waking any blocked read."""

    def __init__(self, conn: urllib3.connection.HTTPConnection, deadline: Deadline):
        self.conn = conn
        self.deadline = deadline
        self.sockets: list[socket.socket] = []  # kept: http.client drops conn.sock on Connection: close
        self.fired = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lora-deadline", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._done.wait(max(self.deadline.remaining(), 0)):
            return
        self.fired.set()
        while not self._done.is_set():  # again and again: the socket may appear later (connect)
            for sock in [self.conn.sock, *self.sockets]:
                if sock is not None:
                    with contextlib.suppress(OSError, ValueError):
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the fd, under any TLS layer
            self._done.wait(0.05)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


class Response:
    """An open response: status, headers, the URL it answers, and its body in chunks."""

    def __init__(self, conn, raw: urllib3.BaseHTTPResponse, watchdog: _Watchdog, url: str, fetcher: Fetcher):
        self.conn, self.raw, self.watchdog, self.url, self.fetcher = conn, raw, watchdog, url, fetcher
        self.status = raw.status
        self.headers = raw.headers

    def chunks(self, what: str, size: int = CHUNK) -> Iterator[bytes]:
        while True:
            with self.fetcher.network_errors(what, self):
                chunk = self.raw.read(size)
            if not chunk:
                return
            yield chunk

    def next_link(self) -> str | None:
        """The `rel="next"` URL of a paginated answer (Link header), absolute."""
        for link in parse_header_links(self.headers.get("link", "")):
            if link.get("rel") == "next" and link.get("url"):
                return urljoin(self.url, link["url"])
        return None

    def close(self) -> None:
        self.watchdog.stop()
        with contextlib.suppress(Exception):
            self.raw.release_conn()
        with contextlib.suppress(Exception):
            self.conn.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Fetcher:
    """GETs with per-hop SSRF checks, one deadline, bounded sizes, credentials kept on their origin."""

    def __init__(self, guard: Guard, limits: Limits):
        self.guard = guard
        self.limits = limits
        self.deadline = Deadline(limits.total_timeout)
        self.ca_certs = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certifi.where()

    def open(
        self, url: str, what: str, *, credential: Credential | None = None, trusted: frozenset[str] = frozenset()
    ) -> Response:
        """The response to GET `url` after redirects; UserError for 4xx/5xx and every failure.

        `trusted`: origins this request may reach even when private (configured endpoints)."""
        for _ in range(MAX_REDIRECTS + 1):
            url = requote_uri(url)
            target = self.guard.check(url, trusted=origin(url) in trusted)
            headers = {"User-Agent": USER_AGENT, "Host": target.host_header, "Accept-Encoding": "identity"}
            if credential is not None and origin(url) == credential.origin:
                headers["Authorization"] = credential.header
            response = self._send("GET", target, url, headers, what)
            location = response.headers.get("location")
            if response.status in REDIRECT_CODES and location:
                response.close()
                url = urljoin(url, location)
                logger.debug("%s: redirected to %s", what, redact(url))
                continue
            if response.status >= 400:
                response.close()
                raise UserError(f"{what}: {describe_status(response)} ({redact(url)}).")
            return response
        raise UserError(f"{what}: too many redirects (over {MAX_REDIRECTS}).")

    def json(self, url: str, what: str, **kw):
        """(parsed JSON, response) of GET `url`; the body is capped at 32 MiB."""
        with self.open(url, what, **kw) as response:
            body = bytearray()
            for chunk in response.chunks(what):
                body += chunk
                if len(body) > MAX_JSON_BYTES:
                    raise UserError(f"{what}: the answer of {redact(url)} is too large.")
        try:
            return json.loads(body), response
        except ValueError:
            raise UserError(f"{what}: the server did not answer with JSON ({redact(url)}).") from None

    def to_file(self, url: str, dest: Path, what: str, **kw) -> None:
        """Download `url` into `dest`, at most LORA_MAX_FILE_BYTES, within the deadline; its progress in the
        logs (`LoRA x: 1,048,576 of 9,437,184 bytes`, "?" for an unknown total) every PROGRESS_EVERY_S."""
        cap = self.limits.max_file_bytes
        with self.open(url, what, **kw) as response:
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > cap:
                raise UserError(f"{what}: the file is {int(length):,} bytes, over the {cap:,}-byte limit.")
            size, shown = 0, time.monotonic()
            total = f"{int(length):,}" if length.isdigit() else "?"
            with open(dest, "wb") as out:
                for chunk in response.chunks(what):
                    size += len(chunk)
                    if size > cap:
                        raise UserError(f"{what}: the file is over the {cap:,}-byte limit.")
                    out.write(chunk)
                    if time.monotonic() - shown >= PROGRESS_EVERY_S:
                        shown = time.monotonic()
                        logger.info("%s: %s of %s bytes", what, f"{size:,}", total)
        if length.isdigit() and size != int(length):
            raise UserError(f"{what}: the download was cut short ({size:,} of {int(length):,} bytes).")

    def read(self, url: str, what: str, cap: int) -> tuple[bytes, str]:
        """(body, Content-Type) of GET `url`, at most `cap` bytes (as sent: never decompressed)."""
        with self.open(url, what) as response:
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > cap:
                raise UserError(f"{what}: the file is {int(length):,} bytes, over the {cap:,}-byte limit.")
            body = bytearray()
            for chunk in response.chunks(what):
                body += chunk
                if len(body) > cap:
                    raise UserError(f"{what}: the file is over the {cap:,}-byte limit.")
            return bytes(body), response.headers.get("content-type", "")

    def post(self, url: str, body: bytes, headers: dict[str, str], what: str) -> int:
        """POST `body` to `url` (no redirects followed) and return the status; UserError when the
        address is refused or the exchange fails. The answer's body is read at most up to 64 KiB."""
        url = requote_uri(url)
        target = self.guard.check(url)
        headers = {"User-Agent": USER_AGENT, "Host": target.host_header, **headers}
        with self._send("POST", target, url, headers, what, body) as response:
            for read, _ in zip(response.chunks(what, 16 << 10), range(4), strict=False):
                del read
            return response.status

    # ---- one hop

    def _send(
        self, method: str, target: Target, url: str, headers: dict[str, str], what: str, body: bytes | None = None
    ) -> Response:
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        for i, address in enumerate(target.addresses):
            self.deadline.check(what)
            timeout = max(min(self.limits.timeout, self.deadline.remaining()), 0.001)
            conn = self.guard.connection(target, address, timeout, self.ca_certs)
            watchdog = _Watchdog(conn, self.deadline)
            pending = Response(conn, _NoResponse(), watchdog, url, self)
            try:
                try:
                    conn.connect()
                except (OSError, urllib3.exceptions.HTTPError) as e:
                    if watchdog.fired.is_set():
                        raise self.deadline.error(what) from None
                    if isinstance(e, (ssl.SSLError, urllib3.exceptions.SSLError)):
                        raise UserError(
                            f"{what}: the TLS connection to {target.host} failed (is its certificate valid for "
                            f"that name?) ({redact(url)})."
                        ) from None
                    if i + 1 < len(target.addresses):  # refused, unreachable, timed out: the next address
                        pending.close()
                        continue
                    raise UserError(f"{what}: could not connect to {redact(url)}.") from None
                watchdog.sockets.append(conn.sock)
                conn.timeout = self.limits.timeout  # per read from here on; the watchdog bounds the total
                with self.network_errors(what, pending):
                    conn.request(method, path, body=body, headers=headers, preload_content=False, decode_content=False)
                    raw = conn.getresponse()
                return Response(conn, raw, watchdog, url, self)
            except BaseException:
                pending.close()
                raise
        raise AssertionError("a target has at least one address")

    @contextlib.contextmanager
    def network_errors(self, what: str, response: Response):
        """Turn what the network raises into one-line UserErrors (nothing chained)."""
        try:
            yield
        except UserError:
            raise
        except (TimeoutError, urllib3.exceptions.TimeoutError):
            if response.watchdog.fired.is_set():
                raise self.deadline.error(what) from None
            raise UserError(f"{what}: timed out after {self.limits.timeout:g} s without data.") from None
        except (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError, ValueError):
            if response.watchdog.fired.is_set():
                raise self.deadline.error(what) from None
            raise UserError(f"{what}: the connection broke during the download.") from None


class _NoResponse:
    """Stands in for the response while a hop is still connecting."""

    status = 0
    headers: dict[str, str] = {}

    def release_conn(self) -> None:
        pass


def describe_status(response: Response) -> str:
    code = response.status
    hf_code = response.headers.get("x-error-code", "")
    if hf_code == "GatedRepo":
        return (
            f"HTTP {code}, the repo is gated: accept its terms on Hugging Face and send a Hugging Face token "
            "that may read it"
        )
    if hf_code == "RepoNotFound":
        return f"HTTP {code}, repo not found (or private: send a Hugging Face token that may read it)"
    if hf_code in ("EntryNotFound", "RevisionNotFound"):
        return f"HTTP {code}, {'file' if hf_code == 'EntryNotFound' else 'revision'} not found in the repo"
    if code in (401, 403):
        return f"HTTP {code}, access denied (is the token missing or wrong?)"
    if code == 404:
        return "HTTP 404, not found"
    return f"HTTP {code}"


class RedactQueries(logging.Filter):
    """Strips query strings (signatures, pasted tokens) from URLs that urllib3 logs."""

    _QUERY = re.compile(r"\?[^\s\"']*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._QUERY.sub("?…", a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = self._QUERY.sub("?…", record.msg)
        return True


def redact_library_logs() -> None:
    """Install RedactQueries on urllib3's loggers that name URLs (e.g. 'Failed to parse headers (url=…)'), once."""
    for name in ("urllib3.connection", "urllib3.connectionpool"):
        target = logging.getLogger(name)
        if not any(isinstance(f, RedactQueries) for f in target.filters):
            target.addFilter(RedactQueries())
