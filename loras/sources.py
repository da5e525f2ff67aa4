"""What an `extra_lora` string names: parse it into a `Source`, without touching the network or the disk.

Accepted sources (`parse_source`):
    owner/model, owner/model/<version>, owner/model/versions/<version>  Replicate (also behind
        https://replicate.com/); weights come from `/_weights` as a tar holding one .safetensors
    https://…/trained_model.tar (any URL to a .tar)                       a Replicate training output
    huggingface.co/owner/repo[/tree/<rev>/<folder>]                       the one LoRA file in it
    huggingface.co/owner/repo/resolve|blob/<rev>/<path>                   that file
    civitai.com/models/<id>[/<slug>][?modelVersionId=<v>]                  newest version, or version v
    civitai.com/api/download/models/<v>                                   version v
    any http(s) URL to a .safetensors file (query string kept)
    a local path: /…, ./…, ../…, ~…, file://…, or any other name ending in .safetensors
        (whether a local path may be read is decided when fetching, see loras.sites.local_file)

`Source.key` is the normalised name of a source (the same LoRA typed two ways has one key; a token
pasted into a URL is never part of it); `Source.label` is safe to log and to show.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from errors import UserError
from net.url_guard import redact

ACCEPTED_FORMS = (
    "owner/model[/version] or https://replicate.com/owner/model[/versions/<id>] (Replicate); "
    "a URL to a Replicate training's .tar; huggingface.co/owner/repo[/resolve/<rev>/<file>]; "
    "civitai.com/models/<id>[?modelVersionId=<v>] or civitai.com/api/download/models/<v>; "
    "an http(s) URL to a .safetensors file; a local .safetensors path (where the server allows it)"
)
CIVITAI_DEFAULT_QUERY = {"type": "Model", "format": "SafeTensor"}


@dataclass(frozen=True)
class Source:
    """A parsed LoRA source. `key` is the normalised cache key; `label` is safe to log."""

    kind: str  # local | replicate | huggingface | civitai | url
    key: str
    label: str
    path: Path | None = None  # local: as typed, with ~ expanded (not resolved: nothing is looked up)
    repo: str = ""  # replicate owner/model, huggingface owner/repo
    version: str = ""  # replicate version, civitai version id
    revision: str = ""  # huggingface
    filename: str = ""  # huggingface file path in the repo ("" = pick one)
    folder: str = ""  # huggingface subfolder to pick from
    model_id: str = ""  # civitai model id
    url: str = ""  # url kind: the URL; civitai download: its query (never a token)
    token: str = field(default="", repr=False)  # civitai: a token pasted into the URL (?token=…)


_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPLICATE = re.compile(rf"^/?(?P<owner>{_NAME})/(?P<name>{_NAME})(?:/(?:versions/)?(?P<version>[A-Za-z0-9]+))?/?$")
_KNOWN_HOSTS = ("huggingface.co", "hf.co", "civitai.com", "replicate.com", "replicate.delivery")


def _unsupported(text: str) -> UserError:
    shown = redact(text) if "://" in text else text[:200]
    return UserError(f"Unsupported LoRA source {shown!r}. Accepted: {ACCEPTED_FORMS}.")


def parse_source(text: str) -> Source:
    """The `Source` that `text` names; UserError (one line, listing the accepted forms) otherwise.

    Pure: no file is looked at (a local path is recognised by its form alone) and no host is asked."""
    text = (text or "").strip()
    if not text:
        raise UserError(f"Empty LoRA source. Accepted: {ACCEPTED_FORMS}.")
    if text.lower().startswith("file://"):
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise _unsupported(text)
        return _local(unquote(parts.path), text)
    if "://" not in text:
        if text.startswith(("/", "./", "../", "~")):
            return _local(text, text)
        if text.lower().startswith(tuple(f"{p}{h}/" for h in _KNOWN_HOSTS for p in ("", "www."))):
            text = "https://" + text
        elif text.lower().endswith(".safetensors"):
            return _local(text, text)
        elif m := _REPLICATE.match(text):
            return _replicate(m)
        else:
            raise _unsupported(text)
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
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


SCALE_RANGE = (-1.0, 2.0)  # what extra_lora_scale accepts
_SCALED = re.compile(r"^(?P<source>.+?)\s*:\s*(?P<scale>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)$")


MAX_EXTRA_LORAS = 8  # entries of one extra_lora list


def split_sources(text: str | None, default_scale: float = 1.0) -> list[tuple[str, float]]:
    """[(source, scale)] of an `extra_lora` value: one source or several separated by commas (or
    newlines), each optionally suffixed `:<scale>` (else `default_scale`), e.g. "a/b:0.5, c/d".

    Every entry is parsed (`parse_source`) and every scale checked against SCALE_RANGE, so a bad
    list fails whole before anything is downloaded. A comma inside a URL must be written %2C. At most
    MAX_EXTRA_LORAS entries (each is a download and a parse)."""
    entries = []
    items = [item.strip() for item in re.split(r"[,\n]", text or "") if item.strip()]
    if len(items) > MAX_EXTRA_LORAS:
        raise UserError(
            f"extra_lora lists {len(items)} LoRAs, over the {MAX_EXTRA_LORAS} accepted in one request: use fewer."
        )
    for item in items:
        source, scale = item, float(default_scale)
        m = _SCALED.match(item)
        if m and "://" in m["source"] and not urlsplit(m["source"]).path:
            m = None  # https://host:8080 is a host and port, not a scale: a scale comes after the path
        if m:
            source, scale = m["source"], float(m["scale"])
            low, high = SCALE_RANGE
            if not low <= scale <= high:
                shown = f"{redact(source) if '://' in source else source[:200]}:{m['scale']}"
                raise UserError(f"extra_lora entry {shown!r}: its scale must be from {low:g} to {high:g}.")
        parse_source(source)
        entries.append((source, scale))
    return entries


def _local(path: str, label: str) -> Source:
    """A local path, normalised by its text only (abspath, not resolve: no file system access)."""
    expanded = os.path.expanduser(path)
    return Source("local", f"local:{os.path.abspath(expanded)}", label[:300], path=Path(expanded))


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
    _check_hub_names(repo, revision, filename or folder, text)
    where = filename or (folder + "/" if folder else "")
    label = f"huggingface.co/{repo}" + (f"@{revision}" if revision != "main" else "") + (f":{where}" if where else "")
    return Source(
        "huggingface",
        _hf_key(repo, revision, where),
        label,
        repo=repo,
        revision=revision,
        filename=filename,
        folder=folder,
    )


def _check_hub_names(repo: str, revision: str, path: str, text: str) -> None:
    """Names as the hub accepts them (its own validator for the repo id): a decoded `%2F..%2F` must
    never make us request another path of the hub, or of a private HF_ENDPOINT, with a token."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise UserError(
            f"Hugging Face LoRA {redact(text)!r}: {repo!r} is not a valid repo id (owner/name of letters, "
            "digits, '-', '_', '.')."
        ) from None
    for name, value in (("revision", revision), ("file path", path)):
        parts = value.split("/")
        if not re.fullmatch(r"[\w.\-/]*", value) or ".." in parts or (value and "" in parts):
            raise UserError(f"Hugging Face LoRA {redact(text)!r}: its {name} is not valid.")


def _hf_key(repo: str, revision: str, where: str) -> str:
    return f"hf:{repo}@{revision}:{where}"


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def moving(source: Source) -> str:
    """What in `source` changes ("" if nothing): a Hugging Face branch or tag (not a commit), or a CivitAI
    model named without a version (its newest version)."""
    if source.kind == "huggingface" and not _COMMIT.match(source.revision):
        return source.revision
    if source.kind == "civitai" and source.model_id and not source.version:
        return "the newest version"
    return ""


def pinned(source: Source, revision: str) -> Source:
    """`source` at an immutable `revision`, a commit or a version id (its key, and so its cache entry, names
    it; its label stays what the user typed)."""
    if source.kind == "huggingface" and _COMMIT.match(revision):
        where = source.filename or (source.folder + "/" if source.folder else "")
        return replace(source, key=_hf_key(source.repo, revision, where), revision=revision)
    if source.kind == "civitai" and revision.isdigit():
        return replace(source, key=f"civitai:version:{revision}", version=revision)  # = the version's own source
    raise ValueError(f"cannot pin {source.kind} source to {revision!r}")


def revision_of(source: Source) -> str:
    """The immutable revision a pinned source names (for logs)."""
    return source.revision if source.kind == "huggingface" else source.version


def _civitai(parts, text: str) -> Source:
    query = dict(parse_qsl(parts.query))
    token = query.pop("token", "").strip()  # moved into a header; never part of the key or the URL
    if m := re.match(r"^/models/(\d+)(?:/[^/]*)?/?$", parts.path):
        if version := query.get("modelVersionId", ""):
            if not version.isdigit():
                raise _unsupported(text)
            return Source(
                "civitai", f"civitai:version:{version}", f"civitai version {version}", version=version, token=token
            )
        model = m[1]
        return Source("civitai", f"civitai:model:{model}", f"civitai model {model}", model_id=model, token=token)
    if m := re.match(r"^/api/download/models/(\d+)/?$", parts.path):
        version = m[1]
        extra = "" if query in ({}, CIVITAI_DEFAULT_QUERY) else urlencode(sorted(query.items()))
        key = f"civitai:version:{version}" + (f"?{extra}" if extra else "")
        return Source("civitai", key, f"civitai version {version}", version=version, url=extra, token=token)
    raise _unsupported(text)


def public_label(text: str) -> str:
    """A source's name fit to log, show and embed in an image: its label, and only the file name of a
    local path (the server's folders are nobody's business)."""
    source = parse_source(text)
    return source.path.name if source.kind == "local" and source.path is not None else source.label
