"""The front's settings, read once from the environment (README, "The public front")."""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

MIB = 1 << 20
# The largest input file (image or mask), decoded: a 64-megapixel PNG of a photo is about this size.
DEFAULT_MAX_FILE_BYTES = 48 * MIB


def _number(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise RuntimeError(f"{name} must be a number, not {value!r}") from None


@dataclass(frozen=True)
class Tenants:
    """API tokens (API_TOKENS, comma-separated, or API_TOKENS_FILE, one per line). Each token is a
    tenant: a prediction is visible only with the token that created it. No tokens: an open front."""

    digests: frozenset[str] = field(default_factory=frozenset, repr=False)

    @classmethod
    def from_env(cls) -> Tenants:
        tokens = [t.strip() for t in os.environ.get("API_TOKENS", "").split(",")]
        path = os.environ.get("API_TOKENS_FILE", "").strip()
        if path:
            tokens += [line.strip() for line in Path(path).read_text().splitlines()]
        tokens = [t for t in tokens if t and not t.startswith("#")]
        for token in tokens:
            if len(token) < 16 or any(c.isspace() or not c.isprintable() for c in token):
                raise RuntimeError("API_TOKENS: each token must be at least 16 printable characters without spaces")
        return cls(frozenset(_digest(t) for t in tokens))

    @property
    def open(self) -> bool:
        return not self.digests

    def tenant(self, authorization: str | None) -> str | None:
        """The tenant of an `Authorization: Bearer <token>` header: "" on an open front, None if refused."""
        if self.open:
            return ""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = _digest(token.strip())
        found = False
        for known in self.digests:  # every one compared, in constant time
            found |= hmac.compare_digest(known, digest)
        return digest[:32] if found else None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class FrontSettings:
    port: int = 5000
    host: str = "0.0.0.0"
    state_dir: Path = Path("/tmp/flux-front")
    store: str = ""  # PREDICTION_STORE: "" (SQLite in state_dir) or redis://host:port/db
    retention_s: float = 3600.0  # PREDICTION_RETENTION_S: records and their outputs
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # MAX_INPUT_FILE_BYTES: image / mask, decoded
    input_timeout_s: float = 30.0  # INPUT_DOWNLOAD_TIMEOUT: a whole input URL fetch
    max_queued: int = 64  # MAX_QUEUED_PREDICTIONS: accepted but not started; more get 429
    unavailable_retry_s: float = 60.0  # how long a prediction waits for a Cog server that is down
    tenants: Tenants = field(default_factory=Tenants)

    def with_changes(self, **changes) -> FrontSettings:
        if "state_dir" in changes:
            changes["state_dir"] = Path(changes["state_dir"])
        return replace(self, **changes)

    @property
    def max_body_bytes(self) -> int:
        """MAX_BODY_BYTES: by default room for image and mask as base64 data URIs, plus 1 MiB."""
        return int(_number("MAX_BODY_BYTES", 2 * (self.max_file_bytes * 4 // 3 + 64) + MIB))

    @classmethod
    def from_env(cls) -> FrontSettings:
        env = os.environ
        return cls(
            port=int(_number("PORT", 5000)),
            host=env.get("HOST", "0.0.0.0"),
            state_dir=Path(env.get("FRONT_STATE_DIR", "/tmp/flux-front")),
            store=env.get("PREDICTION_STORE", "").strip(),
            retention_s=_number("PREDICTION_RETENTION_S", 3600.0),
            max_file_bytes=int(_number("MAX_INPUT_FILE_BYTES", DEFAULT_MAX_FILE_BYTES)),
            input_timeout_s=_number("INPUT_DOWNLOAD_TIMEOUT", 30.0),
            max_queued=int(_number("MAX_QUEUED_PREDICTIONS", 64)),
            tenants=Tenants.from_env(),
        )
