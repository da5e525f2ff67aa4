"""LoRA files: safetensors judged from the header alone, and the one LoRA in a tar."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from lora_fixtures import tar_bytes
from safetensors.numpy import save

from errors import UserError
from loras.files import MAX_HEADER_BYTES, check_safetensors, extract_tar, finalize_download


def raw(header: dict, data_size: int, pad: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + pad + b"\0" * data_size


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def write(tmp_path: Path, data: bytes, name: str = "x.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def error_for(tmp_path: Path, data: bytes) -> str:
    with pytest.raises(UserError) as e:
        check_safetensors(write(tmp_path, data))
    assert "\n" not in str(e.value) and e.value.__cause__ is None
    return str(e.value)


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"])
def test_floating_point_files_pass(tmp_path, dtype):
    width = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}.get(dtype, 1)
    check_safetensors(write(tmp_path, raw({"a": entry(dtype, [2, 3], 0, 6 * width), "__metadata__": {}}, 6 * width)))


def test_integer_alphas_pass_as_kohya_writes_them(tmp_path):
    # sd-scripts networks/flux_extract_lora.py saves `torch.tensor(rank)` (int64) without --save_precision.
    header = {"m.lora_down.weight": entry("F32", [1, 2], 0, 8), "m.alpha": entry("I64", [], 8, 16)}
    check_safetensors(write(tmp_path, raw(header, 16)))


def test_a_real_file_passes(tmp_path):
    check_safetensors(write(tmp_path, save({"a": np.ones((4, 2), np.float32), "b": np.ones(3, np.float16)})))


@pytest.mark.parametrize(
    "header, size, message",
    [
        ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [1], 4, 8)}, 8, "overlaps another's or leaves a gap"),
        ({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, 12, "overlaps another's or leaves a gap"),
        ({"a": entry("F32", [2], 0, 8)}, 4, "truncated or padded"),
        ({"a": entry("F32", [2], 0, 8)}, 12, "truncated or padded"),
        ({"a": entry("F32", [3], 0, 8)}, 8, "shape and data type do not match its byte range"),
        ({"a": entry("F16", [4], 0, 4)}, 4, "shape and data type do not match its byte range"),
        ({"a": entry("XX", [1], 0, 4)}, 4, "unknown data type"),
        ({"a": entry("I64", [1], 0, 8)}, 8, r"non-floating-point tensors \(I64: a\)"),
        ({"a": entry("F32", [1], 0, 4), "m": entry("BOOL", [4], 4, 8)}, 8, r"non-floating-point tensors \(BOOL: m\)"),
        ({"a": entry("U8", [4], 0, 4)}, 4, "non-floating-point"),
        ({"a": entry("F4", [2], 0, 1)}, 1, "non-floating-point"),
        ({"__metadata__": {"x": "y"}}, 0, "holds no tensors"),
        ({"a": {"dtype": "F32", "shape": [1]}}, 4, "not valid JSON of the safetensors layout"),
    ],
)
def test_bad_headers_are_clear_errors(tmp_path, header, size, message):
    assert re.search(message, error_for(tmp_path, raw(header, size)))


def test_malformed_headers(tmp_path):
    assert "not valid JSON" in error_for(tmp_path, struct.pack("<Q", 5) + b"{abc}")
    assert "not a JSON object" in error_for(tmp_path, struct.pack("<Q", 9) + b"[1, 2, 3]")
    assert "runs past the end of the file" in error_for(tmp_path, struct.pack("<Q", 1000) + b"{}")
    assert "too short" in error_for(tmp_path, b"\x01\x02")
    assert "empty" in error_for(tmp_path, b"")


def test_an_oversized_header_is_refused_from_its_length_alone(tmp_path):
    n = MAX_HEADER_BYTES + 1
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:  # sparse: a header length over the limit, inside the file
        f.write(struct.pack("<Q", n) + b"{")
        f.truncate(8 + n + 16)
    with pytest.raises(UserError, match=f"header is {n:,} bytes, over the {MAX_HEADER_BYTES:,}-byte limit"):
        check_safetensors(path)
    assert "over the" in error_for(tmp_path, struct.pack("<Q", 1 << 40) + b"\0" * 8)


def test_what_the_file_is_instead(tmp_path):
    assert "HTML page" in error_for(tmp_path, b"<!DOCTYPE html><html>nope</html>")
    assert "zip archive" in error_for(tmp_path, b"PK\x03\x04" + b"\0" * 100)
    assert "pickle" in error_for(tmp_path, b"\x80\x02}q\x00." + b"\0" * 20)
    assert "JSON document" in error_for(tmp_path, b'{"error": "not found"}')


def test_a_large_file_is_judged_by_its_header(tmp_path):
    n = 1 << 34  # 16 GiB of (sparse) tensor data behind a valid header
    text = json.dumps({"a": entry("F32", [n // 4], 0, n)}).encode()
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + n)
    check_safetensors(path)


def test_tar_members(tmp_path):
    lora = save({"a": np.ones(4, np.float32)})
    archive = write(tmp_path, tar_bytes({"out/config.yaml": b"x", "out/lora.safetensors": lora}), "t.tar")
    dest = tmp_path / "dest.safetensors"
    finalize_download(archive, dest, 1 << 20, "LoRA t")
    assert dest.read_bytes() == lora
    archive = write(tmp_path, tar_bytes({"lora.safetensors": lora}), "t.tar")
    with pytest.raises(UserError, match="over the 10-byte limit"):
        extract_tar(archive, tmp_path / "x", 10, "LoRA t")
    archive = write(tmp_path, tar_bytes({"lora.safetensors": b"<html>"}), "t.tar")
    with pytest.raises(UserError, match="the archive's file is not a safetensors file"):
        finalize_download(archive, tmp_path / "y.safetensors", 1 << 20, "LoRA t")
    assert not (tmp_path / "y.safetensors").exists()


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_compressed_archives_are_refused_before_anything_is_expanded(tmp_path, mode):
    """A 46 KB .tar.xz wrote 300 MB in 1.4 s, outside the download deadline: only plain tars (what
    Replicate writes) are opened."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        data = b"\0" * (8 << 20)  # 8 MiB of zeros: a few KB compressed
        info = tarfile.TarInfo("lora.safetensors")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    archive = write(tmp_path, buffer.getvalue(), "t.tar")
    assert archive.stat().st_size < 100_000
    with pytest.raises(UserError, match="compressed archive is not accepted"):
        finalize_download(archive, tmp_path / "z.safetensors", 1 << 30, "LoRA t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.tar"]  # nothing was written
    with pytest.raises(UserError, match="damaged"):
        extract_tar(archive, tmp_path / "x", 1 << 30, "LoRA t")
