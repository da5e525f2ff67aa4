"""Allocator variants for the worker (bench/README.md, "Allocator"): time per request at 1 MP over HTTP
against the bare pipeline in its own default process, and the worker's RSS over 1,000 predictions.

Variants (each its own Cog server; all live at once and take requests in turn, so they see the same
machine): tcmalloc by LD_PRELOAD (the image's, cog.yaml; Debian's libtcmalloc-minimal4); glibc's malloc
with the product's fallback (`MALLOC_ARENA_MAX=2` from the serving environment, and
`workarounds.HeapTrim`: `malloc_trim(0)` after a prediction when RSS grew more than 16 MiB since the
last trim); glibc's default arenas with the same trimming, with trimming after every prediction, and
with no trimming; the previous product (`mallopt`: 2 arenas, mmap and trim thresholds 1 MiB); jemalloc
(libjemalloc2) by LD_PRELOAD where installed. Variants that change the product's behaviour do it with
a bench-only `sitecustomize.py` on the server's PYTHONPATH.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench_serving import BareProcess, HttpServer, interleaved_calls, serve_env
from common import ROOT, median, paired_ratio

from workarounds import TCMALLOC  # the image's, one definition

JEMALLOC = TCMALLOC.parent / "libjemalloc.so.2"
TCMALLOC_NAME = "tcmalloc (LD_PRELOAD, the image's)"
TCMALLOC_DEFAULT_CACHES = "tcmalloc, default thread caches (32 MiB in all)"
GLIBC_NAME = "glibc, 2 arenas, trim when RSS grew 16 MiB (the fallback without tcmalloc)"

_PATCH = """import sys
sys.path.insert(0, {root!r})
import workarounds
{body}
"""
PATCHES = {
    # HeapTrim's slack: 0 trims after every prediction; None never trims.
    "trim_always": "workarounds.HeapTrim.__init__.__defaults__ = (0,)",
    "no_trim": "workarounds.HeapTrim.__exit__ = lambda self, *exc: None",
    # The previous product: this mallopt in Cog's worker (it ran in setup(); here at the worker's start).
    "mallopt": """workarounds.HeapTrim.__exit__ = lambda self, *exc: None
import ctypes, ctypes.util
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallopt(-8, 2)  # M_ARENA_MAX
libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD""",
}


def variants() -> dict[str, dict]:
    """name → {"env": the server's extra environment, "patch": a PATCHES key or None}."""
    found = {}
    if TCMALLOC.exists():  # the image's allocator (cog.yaml; `make serve`); HeapTrim then does nothing
        found[TCMALLOC_NAME] = {"env": {}, "patch": None}
        # gperftools' default cap on the thread caches (32 MiB in all) instead of the image's 8 MiB
        found[TCMALLOC_DEFAULT_CACHES] = {"env": {"TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES": None}, "patch": None}
    fallback = {"LD_PRELOAD": None}  # the serving environment without the preload: 2 arenas
    glibc = {**fallback, "MALLOC_ARENA_MAX": None}  # and glibc's default arenas (up to 8 per core)
    found |= {
        GLIBC_NAME: {"env": fallback, "patch": None},
        "glibc, trim when RSS grew 16 MiB": {"env": glibc, "patch": None},
        "glibc, trim after every prediction": {"env": glibc, "patch": "trim_always"},
        "glibc defaults, no trim": {"env": glibc, "patch": "no_trim"},
        "before: glibc mallopt 2 arenas, thresholds 1 MiB": {"env": glibc, "patch": "mallopt"},
    }
    if JEMALLOC.exists():
        found["jemalloc (LD_PRELOAD)"] = {"env": {**glibc, "LD_PRELOAD": str(JEMALLOC)}, "patch": None}
    return found


def soak_sizes(i: int) -> int:
    """The soak's sizes: 256² to 512² in turn, so that freed blocks come in several sizes."""
    return (256, 320, 384, 256, 512)[i % 5]


def run(
    tree: Path, *, size: int = 1024, rounds: int = 5, soak: int = 1000, every: int = 100, only: list[str] | None = None
) -> dict:
    """`only`: run the variants whose names hold one of these words (the glibc fallback always runs: the
    reference of the "/ fallback" column)."""
    chosen = {n: v for n, v in variants().items() if n == GLIBC_NAME or only is None or any(w in n for w in only)}
    with tempfile.TemporaryDirectory(prefix="bench-alloc-") as tmp:
        paths = {}
        for key, body in PATCHES.items():
            folder = Path(tmp) / key
            folder.mkdir()
            (folder / "sitecustomize.py").write_text(_PATCH.format(root=str(ROOT), body=body))
            paths[key] = str(folder)
        servers = {}
        bare = bare_tc = None
        try:
            for name, v in chosen.items():
                servers[name] = HttpServer(tree, env=v["env"], pythonpath=paths.get(v["patch"], ""))
            bare = BareProcess(tree)  # glibc defaults, nothing of ours: what a user compares against
            cases = {name: (lambda s=s: s(size)) for name, s in servers.items()}
            cases["bare"] = lambda: bare(size)
            if TCMALLOC.exists():  # and the same allocator as ours: the serving overhead alone
                bare_tc = BareProcess(tree, env=serve_env())
                cases["bare tcmalloc"] = lambda: bare_tc(size)
            answers = interleaved_calls(cases, rounds=rounds)
            times = {case: [a["total_s"] for a in got] for case, got in answers.items()}
            rss: dict[str, list[float]] = {n: [s.worker_rss_mib()] for n, s in servers.items()}
            server_rss: dict[str, list[float]] = {n: [s.server_rss_mib()] for n, s in servers.items()}
            soak_times: dict[str, list[float]] = {n: [] for n in servers}
            for i in range(soak):  # round robin, so that all variants see the same machine
                for name, server in servers.items():
                    soak_times[name].append(server(soak_sizes(i), seed=i)["total_s"])
                if (i + 1) % every == 0:
                    for name, server in servers.items():
                        rss[name].append(server.worker_rss_mib())
                        server_rss[name].append(server.server_rss_mib())
            after = interleaved_calls(cases, rounds=max(2, rounds // 2))  # 1 MP again, after the soak
            for case, got in after.items():
                times[f"{case} after"] = [a["total_s"] for a in got]
        finally:
            for process in [*servers.values(), *(p for p in (bare, bare_tc) if p)]:
                process.close()
    table = {}
    for name in chosen:
        http = times[name]
        curve = rss[name]
        table[name] = {
            "http_s": median(http),
            "http / fallback": paired_ratio(http, times[GLIBC_NAME]),
            "http / bare default process": paired_ratio(http, times["bare"]),
            "http / bare after the soak": paired_ratio(times[f"{name} after"], times["bare after"]),
            "soak_ms": median(soak_times[name]) * 1e3,
            "worker_rss_mib": curve,
            "rss_growth_first_to_last_mib": curve[-1] - curve[0],
            "rss_growth_second_half_mib": curve[-1] - curve[len(curve) // 2],
            "server_rss_mib": server_rss[name],  # coglet's server process (HTTP, the data-URI responses)
            "server_rss_growth_second_half_mib": server_rss[name][-1] - server_rss[name][len(curve) // 2],
        }
    if "bare tcmalloc" in times:
        table[TCMALLOC_NAME]["http / bare with tcmalloc"] = paired_ratio(times[TCMALLOC_NAME], times["bare tcmalloc"])
        table[TCMALLOC_NAME]["bare tcmalloc / bare"] = paired_ratio(times["bare tcmalloc"], times["bare"])
    return {
        "size": size,
        "rounds": rounds,
        "soak": soak,
        "rss_every": every,
        "soak_sizes": sorted({soak_sizes(i) for i in range(5)}),
        "bare_s": median(times["bare"]),
        "variants": table,
        "raw": times,
    }
