"""A small stand-in for the Hugging Face Hub, served on 127.0.0.1, for tests.

It serves model repos from local folders through the endpoints that huggingface_hub 2.4's
`snapshot_download` and `hf_hub_download` call (read from the library, checked by running it):

    GET  /api/models/{repo_id}                          repo_info: {"id", "sha", "siblings", ...}
    GET  /api/models/{repo_id}/revision/{rev}           the same, at a revision
    GET  /api/models/{repo_id}/tree/{rev}[/{path}]      list_repo_tree (?recursive=true): files, folders
    HEAD /{repo_id}/resolve/{rev}/{path}                file metadata: X-Repo-Commit, ETag, Content-Length,
                                                        and for LFS files X-Linked-Etag / X-Linked-Size
    GET  /{repo_id}/resolve/{rev}/{path}                the bytes; `Range: bytes=N-[M]` gives 206

A revision is "main" or the repo's commit (a hash of its files). Errors carry the Hub's
X-Error-Code header (RepoNotFound, GatedRepo, RevisionNotFound, EntryNotFound), which
huggingface_hub turns into its typed errors. Like the Hub, a gated repo's metadata and file
list are public; its files need `Authorization: Bearer <token>` (401 without one, 403 with
a wrong one). Simplifications: LFS files are served straight from /resolve (the Hub redirects
them to a CDN); no Xet headers, so clients use plain HTTP; no pagination (< 1000 files).

Switches, plain attributes that tests may change at any time:

    hub.gated        repo ids whose files need the token
    hub.missing      repo ids answered with 404 RepoNotFound, as if they did not exist
    hub.break_once   repo paths ("transformer/x.safetensors") whose next GET sends half its
                     bytes and closes the connection
    hub.stall        repo paths whose GETs send half their bytes and then hang until the hub is
                     closed (for killing a client mid-download); hub.stalled is set when one does

Every request is logged in hub.requests as Request(method, path, headers), headers lower-cased.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".msgpack", ".h5", ".model")


class Request(NamedTuple):
    method: str
    path: str  # as sent, with the query string
    headers: dict[str, str]  # lower-cased names


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class FakeHub:
    def __init__(self, repos: dict[str, Path], token: str | None = None, gated=()):
        self.repos = {repo_id: Path(folder) for repo_id, folder in repos.items()}
        self.token = token
        self.gated: set[str] = set(gated)
        self.missing: set[str] = set()
        self.break_once: set[str] = set()
        self.stall: set[str] = set()
        self.stalled = threading.Event()
        self.requests: list[Request] = []
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()  # releases stalled transfers
        self._server.shutdown()
        self._server.server_close()

    # What tests ask of the log.

    def resolved(self, method: str = "GET") -> list[str]:
        """'repo_id/path' of every /resolve request with this method, in order."""
        found = []
        for request in self.requests:
            parts = urlsplit(request.path).path.strip("/").split("/", 4)
            if request.method == method and len(parts) == 5 and parts[2] == "resolve":
                found.append(f"{parts[0]}/{parts[1]}/{unquote(parts[4])}")
        return found

    # The repos, as the Hub describes them.

    def files(self, repo_id: str) -> dict[str, Path]:
        root = self.repos[repo_id]
        # Dot files are the local tree's own bookkeeping (model_weights keeps `.model-hash.json` there).
        files = (p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith("."))
        return {p.relative_to(root).as_posix(): p for p in files}

    def commit(self, repo_id: str) -> str:
        digest = hashlib.sha1()
        for path, file in self.files(repo_id).items():
            digest.update(f"{path}\0{git_blob_id(file)}\0".encode())
        return digest.hexdigest()

    def check_revision(self, repo_id: str, revision: str) -> str:
        commit = self.commit(repo_id)
        if revision not in ("main", commit):
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def info(self, repo_id: str, revision: str) -> dict:
        commit = self.check_revision(repo_id, revision)
        return {
            "_id": commit[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit,
            "lastModified": "2024-08-01T00:00:00.000Z",
            "createdAt": "2024-08-01T00:00:00.000Z",
            "private": False,
            "gated": "manual" if repo_id in self.gated else False,
            "disabled": False,
            "tags": [],
            "siblings": [{"rfilename": path} for path in self.files(repo_id)],
        }

    def tree(self, repo_id: str, revision: str, under: str, recursive: bool) -> list[dict]:
        self.check_revision(repo_id, revision)
        prefix = f"{under.strip('/')}/" if under.strip("/") else ""
        entries, folders = [], set()
        for path, file in self.files(repo_id).items():
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :].split("/")
            for depth in range(1, len(rest) if recursive else min(len(rest), 2)):
                folders.add(prefix + "/".join(rest[:depth]))
            if recursive or len(rest) == 1:
                entry = {"type": "file", "oid": git_blob_id(file), "size": file.stat().st_size, "path": path}
                if is_lfs(path):
                    entry["lfs"] = {"oid": sha256(file), "size": file.stat().st_size, "pointerSize": 134}
                entries.append(entry)
        return [
            {"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
            for f in sorted(folders)
        ] + entries

    def check_access(self, repo_id: str, headers: dict[str, str]) -> None:
        if repo_id not in self.gated:
            return
        sent = headers.get("authorization", "")
        restricted = f"Access to model {repo_id} is restricted"
        if not sent.startswith("Bearer "):
            raise HubError(401, "GatedRepo", f"{restricted}. You must have access to it and be authenticated.")
        if sent != f"Bearer {self.token}":
            raise HubError(403, "GatedRepo", f"{restricted} and you are not in the authorized list.")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.handle_request(body=True)

    def do_HEAD(self) -> None:
        self.handle_request(body=False)

    def handle_request(self, body: bool) -> None:
        hub: FakeHub = self.server.hub
        headers = {name.lower(): value for name, value in self.headers.items()}
        hub.requests.append(Request(self.command, self.path, headers))
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        try:
            if parts == ["api", "agent-harnesses"]:  # asked for by huggingface_hub's user-agent code
                return self.send_json({"standardEnvVars": [], "harnesses": {}})
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id = self.repo(hub, "/".join(parts[2:4]))
                rest = parts[4:]
                if not rest:
                    return self.send_json(hub.info(repo_id, "main"))
                if rest[0] == "revision" and len(rest) == 2:
                    return self.send_json(hub.info(repo_id, rest[1]))
                if rest[0] == "tree" and len(rest) >= 2:
                    recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
                    return self.send_json(hub.tree(repo_id, rest[1], "/".join(rest[2:]), recursive))
            elif len(parts) >= 5 and parts[2] == "resolve":
                repo_id = self.repo(hub, "/".join(parts[:2]))
                return self.send_file(hub, repo_id, parts[3], "/".join(parts[4:]), headers, body)
            raise HubError(404, None, "Sorry, we can't find the page you are looking for.")
        except HubError as error:
            self.send_error_json(error, body)

    def repo(self, hub: FakeHub, repo_id: str) -> str:
        if repo_id not in hub.repos or repo_id in hub.missing:
            raise HubError(404, "RepoNotFound", "Repository not found")
        return repo_id

    def send_file(self, hub: FakeHub, repo_id: str, revision: str, path: str, headers, body: bool) -> None:
        commit = hub.check_revision(repo_id, revision)
        hub.check_access(repo_id, headers)
        file = hub.files(repo_id).get(path)
        if file is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on revision {revision}")
        data = file.read_bytes()
        start, end = 0, len(data)  # [start, end)
        status, extra = 200, {}
        ranged = headers.get("range", "")
        if ranged.startswith("bytes="):
            first, _, last = ranged[len("bytes=") :].partition("-")
            start, end = int(first or 0), min(int(last) + 1 if last else len(data), len(data))
            if start >= len(data):
                raise HubError(416, None, "Requested range not satisfiable")
            status, extra = 206, {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Repo-Commit", commit)
        if is_lfs(path):
            self.send_header("ETag", f'"{sha256(file)}"')
            self.send_header("X-Linked-Etag", f'"{sha256(file)}"')
            self.send_header("X-Linked-Size", str(len(data)))
        else:
            self.send_header("ETag", f'"{git_blob_id(file)}"')
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        if not body:
            return
        chunk = data[start:end]
        if path in hub.break_once or path in hub.stall:
            self.wfile.write(chunk[: len(chunk) // 2])
            self.wfile.flush()
            if path in hub.stall:
                hub.stalled.set()
                hub._closing.wait(timeout=60)
            hub.break_once.discard(path)
            self.close_connection = True
            return
        self.wfile.write(chunk)

    def send_json(self, payload) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, error: HubError, body: bool) -> None:
        data = json.dumps({"error": error.message}).encode()
        self.send_response(error.status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if error.code:
            self.send_header("X-Error-Code", error.code)
        self.send_header("X-Error-Message", error.message)
        self.end_headers()
        if body:
            self.wfile.write(data)


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


def git_blob_id(file: Path) -> str:
    """The git object id of a file: what the Hub gives as a regular file's ETag and oid."""
    data = file.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(file: Path) -> str:
    """An LFS file's oid: what the Hub gives as its X-Linked-Etag."""
    return hashlib.sha256(file.read_bytes()).hexdigest()
