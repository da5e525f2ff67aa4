"""LoRA files on disk: is this a complete, well-formed safetensors file; the one LoRA in a tar.

`check_safetensors` judges a file from its header alone (the tensor data is never read): the
safetensors library validates the layout (header size and JSON, each tensor's byte range against
its shape and data type, ranges that overlap, leave gaps or run past the end); this module adds
the friendly diagnosis of what the file is instead (an HTML page, a zip, a pickle) and refuses
tensors that are not floating point. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import tarfile
from pathlib import Path

from safetensors import SafetensorError, safe_open

from errors import UserError
from untrusted import printable

MAX_HEADER_BYTES = 100_000_000  # what the safetensors format itself allows
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})  # and the F8_* types
INTEGER_ALPHA_DTYPES = frozenset({"I64", "I32", "I16", "I8", "U8"})  # accepted for one-element `alpha` tensors
HF_PREFERRED = ("lora.safetensors", "pytorch_lora_weights.safetensors")
CHUNK = 1 << 20

# The safetensors library's messages ("Error while deserializing header: …") → what to tell a user.
_LIBRARY_ERRORS = (
    ("header too large", f"its header is over {MAX_HEADER_BYTES:,} bytes"),
    ("header too small", "its header is too small"),
    ("invalid header length", "its header length runs past the end of the file"),
    ("invalid offset", "a tensor's byte range overlaps another's or leaves a gap"),
    ("file not fully covered", "the tensors' byte ranges do not match the file's size (truncated or padded)"),
    ("invalid shape, data type, or offset", "a tensor's shape and data type do not match its byte range"),
    ("unknown variant", "a tensor has an unknown data type"),
    ("invalid json", "its header is not valid JSON of the safetensors layout"),
    ("invalid utf-8", "its header is not UTF-8 text"),
    ("invalid header start", "its header does not start with '{'"),
)


def check_safetensors(path: Path) -> None:
    """Raise UserError unless `path` is a complete safetensors file of floating-point tensors.

    Reads the header only. The error's message is a phrase to prefix with the LoRA's name
    ("not a safetensors file (got an HTML page, …)")."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
    if len(head) < 8:
        raise UserError(f"not a safetensors file ({_sniff(head)})")
    (n,) = struct.unpack("<Q", head[:8])
    if not (2 <= n <= size - 8 and head[8:9] == b"{"):
        hint = _sniff(head)
        if hint == "unrecognised content":
            if n > MAX_HEADER_BYTES:
                hint = f"its header would be {n:,} bytes, over the {MAX_HEADER_BYTES:,}-byte limit"
            elif n > size - 8:
                hint = "its header runs past the end of the file (truncated?)"
            elif n < 2:
                hint = "its header is empty"
            else:
                hint = "its header is not a JSON object"
        raise UserError(f"not a safetensors file ({hint})")
    if n > MAX_HEADER_BYTES:
        raise UserError(f"not a safetensors file (its header is {n:,} bytes, over the {MAX_HEADER_BYTES:,}-byte limit)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            dtypes = {name: piece.get_dtype() for name, piece in slices.items()}
            scalars = {name for name, piece in slices.items() if math.prod(piece.get_shape()) == 1}
    except SafetensorError as e:
        raise UserError(f"not a valid safetensors file ({_explain(str(e))})") from None
    if not dtypes:
        raise UserError("the safetensors file holds no tensors")
    # Integer alphas are real: kohya's flux_extract_lora.py writes torch.tensor(rank), an int64 scalar.
    alphas = {n for n in scalars if n.endswith("alpha") and dtypes[n] in INTEGER_ALPHA_DTYPES}
    odd = sorted(
        {d for n, d in dtypes.items() if d not in FLOAT_DTYPES and not d.startswith("F8_") and n not in alphas}
    )
    if odd:
        names = [n for n, d in dtypes.items() if d in odd and n not in alphas][:3]
        raise UserError(
            f"the safetensors file holds non-floating-point tensors ({', '.join(odd)}: {', '.join(names)}); "
            "a LoRA holds F16, BF16, F32, F64 or F8 tensors"
        )


def _explain(message: str) -> str:
    lowered = message.lower()
    for needle, text in _LIBRARY_ERRORS:
        if needle in lowered:
            return text
    return message.removeprefix("Error while deserializing header: ")[:200]


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
    if len(head) < 8:
        return "the file is too short"
    return "unrecognised content"


def pick_lora_file(names: list[str], where: str) -> str:
    """The one LoRA file among `names`: the only .safetensors, else a preferred name."""
    candidates = [n for n in names if n.lower().endswith(".safetensors")]
    if len(candidates) == 1:
        return candidates[0]
    for preferred in HF_PREFERRED:
        matches = [n for n in candidates if n.rsplit("/", 1)[-1] == preferred]
        if len(matches) == 1:
            return matches[0]
    if not candidates:
        found = ", ".join(printable(n) for n in names[:20]) or "nothing"
        raise UserError(f"{where} holds no .safetensors file (found: {found}).")
    raise UserError(
        f"{where} holds several .safetensors files and none is named {' or '.join(HF_PREFERRED)}: "
        f"{', '.join(printable(n) for n in candidates[:20])}. Name the file in the URL (…/resolve/main/<file>)."
    )


def extract_tar(archive: Path, dest: Path, cap: int, what: str) -> None:
    """Copy the one LoRA file of an uncompressed tar (what Replicate writes): regular members only,
    never extracted to their own paths, the member's size checked from its header before any copy.
    Compressed tars are refused: a 46 KB .tar.xz can expand to hundreds of MB outside any deadline."""
    try:
        with tarfile.open(archive, mode="r:") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            name = pick_lora_file(sorted(members), f"{what}: the archive")
            member = members[name]
            if member.size > cap:
                raise UserError(f"{what}: {printable(name)} is {member.size:,} bytes, over the {cap:,}-byte limit.")
            with tar.extractfile(member) as src, open(dest, "wb") as out:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
    except (tarfile.TarError, EOFError, OSError):
        raise UserError(f"{what}: the archive is damaged or truncated.") from None


def _compressed(path: Path) -> bool:
    """gzip, bzip2, xz or zstd, by their magic numbers."""
    with open(path, "rb") as file:
        head = file.read(6)
    return head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd"))


def finalize_download(raw: Path, dest: Path, cap: int, what: str) -> None:
    """Check a downloaded file (a safetensors, or a tar holding one) and move it to `dest` atomically."""
    try:
        check_safetensors(raw)
        os.replace(raw, dest)
        return
    except UserError as e:
        first_error = e
    if _compressed(raw):
        raise UserError(f"{what}: a compressed archive is not accepted; give the .safetensors file or a plain tar.")
    if tarfile.is_tarfile(raw):
        inner = raw.with_suffix(".inner")
        try:
            extract_tar(raw, inner, cap, what)
            try:
                check_safetensors(inner)
            except UserError as e:
                raise UserError(f"{what}: the archive's file is {e}.") from None
            os.replace(inner, dest)
        finally:
            inner.unlink(missing_ok=True)
        return
    raise UserError(f"{what}: {first_error}.")


def autov3(path: Path) -> str:
    """CivitAI's "AutoV3" hash of a safetensors LoRA: the first 12 hex digits of the SHA-256 of the
    file's bytes after its 8-byte length and JSON header (the tensors only, so editing the metadata
    keeps the hash), as sd-scripts' `addnet_hash_safetensors` computes it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:12]
