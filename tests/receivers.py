"""Local HTTP endpoints on 127.0.0.1 for driving the Cog server from tests.

One threaded server (`Receiver`) plays every remote party a prediction talks to:

- an upload target for `--upload-url http://127.0.0.1:PORT/upload/`: `PUT /upload/<name>` stores the
  body and answers 201 with a `Location` that `GET /files/<name>` serves back;
- a webhook receiver: `POST /webhook` records each JSON payload (`wait_webhook` waits for one);
  `fail_webhooks(n, status)` makes the next n deliveries fail, to see Cog retry;
- a file host for inputs and LoRAs: `serve(name, data)` publishes `GET /files/<name>` (`spread_s`: its
  body sent in ten pieces over that many seconds, a slow download);
  any other GET is a 404, and `GET /hang[/anything]?s=N` sends nothing for N seconds (at most 60)
  before a 200, to stand in for a server that hangs.

Everything is bounded: the server only binds loopback, and every wait has a timeout.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

MAX_HANG_S = 60.0


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client hanging up mid-answer is expected here
        pass


class Receiver:
    def __init__(self):
        self.uploads: dict[str, bytes] = {}
        self.upload_log: list[str] = []  # every PUT, in order (names can repeat if the server overwrote one)
        self.files: dict[str, tuple[bytes, str]] = {}
        self.spread: dict[str, float] = {}  # name → seconds its body is sent over
        self.webhooks: list[dict] = []
        self.webhook_requests: list[tuple[dict, bytes]] = []  # (headers, raw body) of every delivery
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self._fail_webhooks: list[int] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None):
                try:
                    self.send_response(status)
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if body and self.command != "HEAD":
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a hang test)
                    self.close_connection = True

            def do_PUT(self):
                path = urlsplit(self.path).path
                receiver._record("PUT", path)
                if not path.startswith("/upload/"):
                    return self._send(404)
                name = unquote(path[len("/upload/") :])
                data = self._body()
                with receiver._cond:
                    receiver.uploads[name] = data
                    receiver.upload_log.append(name)
                    receiver._cond.notify_all()
                self._send(201, b"", {"Location": f"{receiver.url}/files/{name}"})

            def do_POST(self):
                path = urlsplit(self.path).path
                receiver._record("POST", path)
                if path != "/webhook":
                    return self._send(404)
                raw = self._body()
                payload = json.loads(raw or b"null")
                with receiver._cond:
                    receiver.webhook_requests.append((dict(self.headers.items()), raw))
                    failing = receiver._fail_webhooks.pop(0) if receiver._fail_webhooks else None
                    receiver.webhooks.append({**payload, "_answered": failing or 200, "_at": time.monotonic()})
                    receiver._cond.notify_all()
                self._send(failing or 200)

            def do_GET(self):
                parts = urlsplit(self.path)
                receiver._record("GET", parts.path)
                if parts.path == "/hang" or parts.path.startswith("/hang/"):
                    seconds = min(float(parse_qs(parts.query).get("s", ["30"])[0]), MAX_HANG_S)
                    receiver._stop.wait(seconds)
                    return self._send(200, b"too late", {"Content-Type": "image/png"})
                if parts.path.startswith("/files/"):
                    name = unquote(parts.path[len("/files/") :])
                    if name in receiver.files:
                        data, content_type = receiver.files[name]
                        if receiver.spread.get(name):
                            return self._send_slowly(data, content_type, receiver.spread[name])
                        return self._send(200, data, {"Content-Type": content_type})
                    if name in receiver.uploads:
                        return self._send(200, receiver.uploads[name], {"Content-Type": "application/octet-stream"})
                self._send(404, b"not found", {"Content-Type": "text/plain"})

            do_HEAD = do_GET

            def _send_slowly(self, data: bytes, content_type: str, seconds: float):
                headers = {"Content-Type": content_type, "Content-Length": str(len(data))}
                try:
                    self.send_response(200)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    piece = -(-len(data) // 10)
                    for start in range(0, len(data), piece):
                        self.wfile.write(data[start : start + piece])
                        self.wfile.flush()
                        if receiver._stop.wait(seconds / 10):
                            return
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.upload_url = self.url + "/upload/"
        self.webhook_url = self.url + "/webhook"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    # ---- lifecycle

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    # ---- configuration

    def serve(self, name: str, data: bytes, content_type: str = "application/octet-stream", spread_s: float = 0) -> str:
        """Publish `data` at GET /files/<name> (sent over `spread_s` seconds); returns its URL."""
        self.files[name] = (data, content_type)
        self.spread[name] = spread_s
        return f"{self.url}/files/{name}"

    def fail_webhooks(self, count: int, status: int = 503) -> None:
        with self._cond:
            self._fail_webhooks = [status] * count

    def clear(self) -> None:
        with self._cond:
            self.uploads.clear()
            self.upload_log.clear()
            self.webhooks.clear()
            self.requests.clear()

    # ---- observation

    def _record(self, method: str, path: str) -> None:
        with self._cond:
            self.requests.append((method, path))

    def webhooks_for(self, prediction_id: str) -> list[dict]:
        with self._cond:
            return [w for w in self.webhooks if w.get("id") == prediction_id]

    def wait_webhook(self, prediction_id: str, statuses=("succeeded", "failed", "canceled"), timeout: float = 60):
        """The first webhook for `prediction_id` whose status is one of `statuses`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for payload in self.webhooks:
                    if payload.get("id") == prediction_id and payload.get("status") in statuses:
                        return payload
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(w.get("id"), w.get("status")) for w in self.webhooks]
                    raise TimeoutError(f"no webhook {statuses} for {prediction_id} in {timeout} s; got {seen}")
                self._cond.wait(min(left, 0.5))
