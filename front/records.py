"""Prediction records: every prediction the front accepted, from `starting` to a terminal state.

A record's states are explicit and one-way:

    starting ──▶ processing ──▶ succeeded | failed | canceled
        └────────────────────────────▲  (canceled or failed before it ran)

`Record.advance` is the only way a status changes, so a late or repeated update (a webhook that
arrives after the answer, a retry) can never move a finished prediction back.

Stores: `SqliteStore` (the default: a file in the state folder, nothing to install; one front) and
`RedisStore` (`PREDICTION_STORE=redis://host:port/db`: fronts that share work, or that must keep
records across a restart on another machine). Both keep a record for `retention_s` seconds after
it was created, then forget it (its outputs with it). `open_store(url, ...)` picks one.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

logger = logging.getLogger(__name__)

STARTING, PROCESSING, SUCCEEDED, FAILED, CANCELED = "starting", "processing", "succeeded", "failed", "canceled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELED})
_NEXT = {STARTING: {PROCESSING} | TERMINAL, PROCESSING: TERMINAL}
ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def new_id() -> str:
    """A prediction id as Replicate makes them: 26 lower-case letters and digits."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(26))


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Record:
    id: str
    tenant: str  # whose it is: a hash of the API token that created it ("" on an open front)
    input: dict  # as the client sent it, secrets redacted
    status: str = STARTING
    created_at: str = field(default_factory=now_iso)
    started_at: str | None = None
    completed_at: str | None = None
    logs: str = ""
    output: object = None
    error: str | None = None
    metrics: dict = field(default_factory=dict)
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None
    replica: str | None = None  # where it ran (the cluster's replica)
    front: str = ""  # the front process that runs it (in-flight records of a dead front are resolved)
    api: str = "cog"  # the API that created it: "cog" (Cog's) or "replicate" (/v1, front/replicate_api.py)
    base_url: str = ""  # where the client reached the front (for the absolute URLs of Replicate's API)
    stream: bool = False  # Replicate's `stream: true`

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def advance(self, status: str, **changes) -> bool:
        """Move to `status` with `changes`; False (nothing changed) if the move is not allowed."""
        if status != self.status and status not in _NEXT.get(self.status, ()):
            return False
        if status == self.status and self.done:
            return False
        self.status = status
        for name, value in changes.items():
            setattr(self, name, value)
        if status != STARTING and self.started_at is None:
            self.started_at = now_iso()
        if self.done and self.completed_at is None:
            self.completed_at = now_iso()
        return True

    def public(self) -> dict:
        """The prediction object clients see (Cog's fields, and Replicate's where Cog is silent)."""
        view = {
            "id": self.id,
            "input": self.input,
            "output": self.output,
            "status": self.status,
            "error": self.error,
            "logs": self.logs,
            "metrics": self.metrics,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "progress": progress(self.logs) if not self.done else None,
        }
        if self.webhook:
            view["webhook"] = self.webhook
            view["webhook_events_filter"] = self.webhook_events_filter
        return view

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Record:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


_STEP = re.compile(r"step (\d+)/(\d+)\s*$")
_DOWNLOAD = re.compile(r"([\d,]+) of ([\d,]+|\?) bytes\s*$")


def progress(logs: str) -> dict | None:
    """Where a running prediction is, from its last progress line (the predictor writes one per
    denoising step, `step k/n`, and a few per second of a LoRA download, `… x of y bytes`)."""
    for line in reversed(logs.splitlines()[-50:]):
        if match := _STEP.search(line):
            return {"stage": "generate", "done": int(match[1]), "total": int(match[2])}
        if match := _DOWNLOAD.search(line):
            total = None if match[2] == "?" else int(match[2].replace(",", ""))
            return {"stage": "lora_download", "done": int(match[1].replace(",", "")), "total": total}
    return None


def _created(record: Record) -> float:
    return datetime.fromisoformat(record.created_at.replace("Z", "+00:00")).timestamp()


class SqliteStore:
    """Records in one SQLite file; safe to call from any thread."""

    def __init__(self, path: Path, retention_s: float):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        # A record with its outputs is megabytes (a 1 MP png as a data URI: 3.4 MB). 64 KiB pages (set
        # when the file is made) write it in 8 ms instead of 20; WAL with synchronous=NORMAL keeps every
        # commit across a crash of the front (the point of the store) and may lose the last ones only to
        # a power loss, never consistency (SQLite's "WAL mode": bench/README.md, "The fixed tax").
        self._db.execute("PRAGMA page_size=65536")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS records (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
            "created REAL NOT NULL, front TEXT NOT NULL, done INTEGER NOT NULL, body TEXT NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS by_tenant ON records (tenant, created)")

    def put(self, record: Record) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?)",
                (record.id, record.tenant, _created(record), record.front, int(record.done), record.to_json()),
            )

    def add(self, record: Record) -> bool:
        """Insert a new record; False if its id is taken."""
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?)",
                    (record.id, record.tenant, _created(record), record.front, int(record.done), record.to_json()),
                )
            except sqlite3.IntegrityError:
                return False
            return True

    def get(self, prediction_id: str) -> Record | None:
        with self._lock:
            row = self._db.execute(
                "SELECT body FROM records WHERE id = ? AND created > ?", (prediction_id, self._cutoff())
            ).fetchone()
        return Record.from_json(row[0]) if row else None

    def page(self, tenant: str, limit: int, before: float | None = None) -> list[Record]:
        """The tenant's records, newest first, created before `before` (a timestamp) if given."""
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM records WHERE tenant = ? AND created > ? AND created < ? "
                "ORDER BY created DESC LIMIT ?",
                (tenant, self._cutoff(), before if before is not None else float("inf"), limit),
            ).fetchall()
        return [Record.from_json(row[0]) for row in rows]

    def in_flight(self) -> list[Record]:
        with self._lock:
            rows = self._db.execute("SELECT body FROM records WHERE done = 0").fetchall()
        return [Record.from_json(row[0]) for row in rows]

    def expire(self) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM records WHERE created <= ?", (self._cutoff(),)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _cutoff(self) -> float:
        return time.time() - self.retention_s


class RedisStore:
    """Records in Redis: `prediction:<id>` (JSON, expiring after the retention), a sorted set per
    tenant for listing and one for in-flight records."""

    def __init__(self, url: str, retention_s: float):
        import redis

        self.retention_s = retention_s
        self._redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)
        self._redis.ping()

    def put(self, record: Record) -> None:
        self._write(record, only_new=False)

    def add(self, record: Record) -> bool:
        return self._write(record, only_new=True)

    def _write(self, record: Record, *, only_new: bool) -> bool:
        ttl = max(int(self.retention_s - (time.time() - _created(record))), 1)
        if not self._redis.set(f"prediction:{record.id}", record.to_json(), ex=ttl, nx=only_new):
            return False
        pipe = self._redis.pipeline()
        pipe.zadd(f"predictions:{record.tenant}", {record.id: _created(record)})
        if record.done:
            pipe.zrem("predictions:in-flight", record.id)
        else:
            pipe.zadd("predictions:in-flight", {record.id: _created(record)})
        pipe.execute()
        return True

    def get(self, prediction_id: str) -> Record | None:
        body = self._redis.get(f"prediction:{prediction_id}")
        return Record.from_json(body) if body else None

    def page(self, tenant: str, limit: int, before: float | None = None) -> list[Record]:
        high = f"({before}" if before is not None else "+inf"
        ids = self._redis.zrevrangebyscore(f"predictions:{tenant}", high, time.time() - self.retention_s, 0, limit)
        bodies = self._redis.mget([f"prediction:{i.decode()}" for i in ids]) if ids else []
        return [Record.from_json(body) for body in bodies if body]

    def in_flight(self) -> list[Record]:
        ids = self._redis.zrange("predictions:in-flight", 0, -1)
        records = [self.get(i.decode()) for i in ids]
        return [r for r in records if r is not None and not r.done]

    def expire(self) -> int:
        cutoff = time.time() - self.retention_s
        removed = 0
        for key in self._redis.scan_iter("predictions:*"):
            removed += self._redis.zremrangebyscore(key, "-inf", cutoff)
        return removed

    def close(self) -> None:
        self._redis.close()


def open_store(url: str, state_dir: Path, retention_s: float) -> SqliteStore | RedisStore:
    """`redis://…` (or `rediss://…`): RedisStore; empty or `sqlite`: the SQLite file in `state_dir`."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url, retention_s)
    if url not in ("", "sqlite"):
        raise RuntimeError(f"PREDICTION_STORE must be empty, 'sqlite' or a redis:// URL, not {url!r}")
    return SqliteStore(state_dir / "predictions.sqlite3", retention_s)
