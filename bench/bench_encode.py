"""Encoding the outputs (issue 25 §2): the wall time of writing 4 outputs over writing 1, with our
OutputWriter (one thread per image) beside the serial loop it replaced; and WebP's `method` at the same
quality, time and bytes against Pillow's default (4), on three kinds of picture.

The pictures are synthetic "photos": random phases under a 1/f^k amplitude spectrum, the statistics
of natural images (k ≈ 1; larger k is smoother, a studio background; smaller, foliage or grain). The
tiny model's outputs are noise, which no encoder compresses like a real picture.
"""

from __future__ import annotations

import io
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, paired_ratio  # noqa: E402  (also puts the project root on sys.path)

import images  # noqa: E402

SIZE = 1024  # 1 MP, the default aspect ratio's output
QUALITY = 90  # the default output_quality
DETAIL = {"smooth": 1.9, "photo": 1.3, "detailed": 1.0}  # k of the 1/f^k amplitude spectrum
METHODS = range(7)


def photo(size: int = SIZE, k: float = DETAIL["photo"], seed: int = 0) -> Image.Image:
    """An RGB picture with natural images' spectrum: amplitude 1/f^k, random phases."""
    rng = np.random.default_rng(seed)
    f2 = np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2
    f2[0, 0] = 1.0
    channels = []
    for _ in range(3):
        spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / f2 ** (k / 2)
        spectrum[0, 0] = 0.0
        channels.append(np.real(np.fft.ifft2(spectrum)))
    x = np.stack(channels, -1)
    x = (x - x.mean()) / x.std() * 45 + 120
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def data(seed: int) -> images.GenerationData:
    return images.GenerationData("a photo of a fox in the snow", 28, 3.5, seed, (SIZE, SIZE), "FLUX.1-dev", "0" * 10)


def webp_methods(rounds: int) -> dict:
    """Per kind of picture and method: median ms and bytes, and both against Pillow's default."""
    results: dict = {}
    for kind, k in DETAIL.items():
        picture = photo(k=k)
        sizes: dict[str, int] = {}

        def encode(method: int | None, picture=picture, sizes=sizes):
            buffer = io.BytesIO()
            picture.save(buffer, "WEBP", quality=QUALITY, **({} if method is None else {"method": method}))
            sizes["default" if method is None else str(method)] = buffer.tell()

        cases = {"default": lambda: encode(None), **{str(m): (lambda m=m: encode(m)) for m in METHODS}}
        times = interleaved(cases, rounds)
        results[kind] = {
            name: {
                "ms": statistics.median(times[name]) * 1000,
                "bytes": sizes[name],
                "time / default": paired_ratio(times[name], times["default"]),
                "bytes / default": sizes[name] / sizes["default"],
            }
            for name in cases
        }
    return results


_PICTURES: list[Image.Image] = []  # a process pool worker's own copies (_process_init)


def _process_init() -> None:
    _PICTURES.extend(photo(seed=seed) for seed in range(4))


def _process_encode(i: int, output_format: str, folder: str) -> None:
    images.encode(_PICTURES[i], Path(folder) / f"{i}.{output_format}", data(i), output_format, QUALITY)


def four_over_one(rounds: int) -> dict:
    """Per format: wall time of writing 4 outputs / 1, ours (threads) and the serial loop it replaced;
    and the machine's floor: the same 4 encodes in 2 processes of their own (no GIL, nothing shared)."""
    pictures = [photo(seed=seed) for seed in range(4)]
    made = [data(seed) for seed in range(4)]
    results: dict = {}
    workers = min(4, os.cpu_count() or 1)
    with (
        tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp,
        ProcessPoolExecutor(workers, initializer=_process_init) as processes,
    ):
        writer = images.OutputWriter(tmp)
        list(processes.map(_process_encode, range(workers), ["jpg"] * workers, [tmp] * workers))  # started

        def serial(output_format: str) -> None:
            folder = writer.new_prediction()
            for i, picture in enumerate(pictures):
                images.encode(picture, folder / f"{i}.{output_format}", made[i], output_format, QUALITY)

        for output_format in ("webp", "png", "jpg"):
            cpu: list[float] = []  # process CPU seconds of each "4" run: over its wall time, the cores it used

            def four(f=output_format, cpu=cpu):
                started = time.process_time()
                writer.save(pictures, f, QUALITY, made)
                cpu.append(time.process_time() - started)

            times = interleaved(
                {
                    "1": lambda f=output_format: writer.save(pictures[:1], f, QUALITY, made[:1]),
                    "4": four,
                    "4 serial": lambda f=output_format: serial(f),
                    "4 processes": lambda f=output_format: list(
                        processes.map(_process_encode, range(4), [f] * 4, [tmp] * 4)
                    ),
                },
                rounds,
            )
            results[output_format] = {
                "ms": {name: statistics.median(t) * 1000 for name, t in times.items()},
                "4 / 1": paired_ratio(times["4"], times["1"]),
                "4 serial / 1": paired_ratio(times["4 serial"], times["1"]),
                "4 processes / 1": paired_ratio(times["4 processes"], times["1"]),
                "cores used by 4": sum(cpu[-rounds:]) / sum(times["4"]),
            }
        writer.cleanup()
    return results


def run(rounds: int = 5) -> dict:
    started = time.perf_counter()
    results = {
        "size": SIZE,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "quality": QUALITY,
        "chosen_webp_method": images.WEBP_METHOD,
        "four_over_one": four_over_one(rounds),
        "webp_methods": webp_methods(rounds),
    }
    results["seconds"] = time.perf_counter() - started
    return results
