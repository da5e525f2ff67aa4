"""Allocator variants for the worker (bench/README.md, "Allocator"): time per request at 1 MP over HTTP
and in a bare pipeline process with the same setting, and the worker's RSS over many predictions.

Variants: today's `workarounds.limit_allocator_growth()` (glibc mallopt: 2 arenas, mmap and trim
thresholds 1 MiB, in Cog's worker only); glibc's defaults; `MALLOC_ARENA_MAX=2` alone; jemalloc
(Debian's libjemalloc2) by LD_PRELOAD. For every variant but the first the server runs with a
sitecustomize (written here, in a temporary folder on PYTHONPATH) that makes
`limit_allocator_growth` a no-op; the product is not changed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench_serving import BareProcess, HttpServer, interleaved_calls
from common import ROOT, median, paired_ratio

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
JEMALLOC_PROMPT_RETURN = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"
NO_MALLOPT = f"""import sys
sys.path.insert(0, {str(ROOT)!r})
import workarounds
workarounds.limit_allocator_growth = lambda: None
"""


def variants() -> dict[str, dict]:
    """name → (server env, whether the worker's mallopt runs, bare process env, bare --mallopt)."""
    found = {
        "mallopt (today)": {"env": {}, "mallopt": True},
        "glibc defaults": {"env": {}, "mallopt": False},
        "MALLOC_ARENA_MAX=2": {"env": {"MALLOC_ARENA_MAX": "2"}, "mallopt": False},
    }
    # The same two arenas with thresholds at glibc's ceiling (32 MiB) instead of 1 MiB: big tensors stay
    # in the heap instead of an mmap + page faults + munmap each (set by glibc's tunables, not mallopt).
    found["arenas 2, thresholds 32 MiB (GLIBC_TUNABLES)"] = {
        "env": {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold={32 << 20}"
                f":glibc.malloc.trim_threshold={32 << 20}"},
        "mallopt": False,
    }  # fmt: skip
    if Path(JEMALLOC).exists():
        found["jemalloc (LD_PRELOAD)"] = {"env": {"LD_PRELOAD": JEMALLOC}, "mallopt": False}
        found["jemalloc, dirty pages returned in 1 s (MALLOC_CONF)"] = {
            "env": {
                "LD_PRELOAD": JEMALLOC,
                "MALLOC_CONF": "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0",
            },
            "mallopt": False,
        }
    return found


def run(tree: Path, *, size: int = 1024, rounds: int = 5, soak_size: int = 256, soak: int = 200) -> dict:
    chosen = variants()
    with tempfile.TemporaryDirectory(prefix="bench-alloc-") as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(NO_MALLOPT)
        servers, bares = {}, {}
        try:
            for name, v in chosen.items():
                servers[name] = HttpServer(tree, env=v["env"], pythonpath="" if v["mallopt"] else tmp)
                bares[name] = BareProcess(tree, env=v["env"], mallopt=v["mallopt"])
            cases = {f"http {n}": (lambda s=s: s(size)) for n, s in servers.items()}
            cases |= {f"bare {n}": (lambda b=b: b(size)) for n, b in bares.items()}
            answers = interleaved_calls(cases, rounds=rounds)
            times = {case: [a["total_s"] for a in got] for case, got in answers.items()}
            base_http, base_bare = times["http mallopt (today)"], times["bare glibc defaults"]
            rss_start = {n: s.worker_rss_mib() for n, s in servers.items()}
            soak_times: dict[str, list[float]] = {n: [] for n in servers}
            for i in range(soak):  # round robin, so that all variants see the same machine
                for name, server in servers.items():
                    soak_times[name].append(server(soak_size, seed=i)["total_s"])
            rss_end = {n: s.worker_rss_mib() for n, s in servers.items()}
            bare_rss = {n: b(soak_size)["rss_mib"] for n, b in bares.items()}
        finally:
            for process in [*servers.values(), *bares.values()]:
                process.close()
    table = {}
    for name in chosen:
        http, bare = times[f"http {name}"], times[f"bare {name}"]
        table[name] = {
            "http_s": median(http),
            "http / http mallopt (today)": paired_ratio(http, base_http),
            "bare_s": median(bare),
            "bare / bare glibc defaults": paired_ratio(bare, base_bare),
            "http / bare (same setting)": paired_ratio(http, bare),
            "soak_s": median(soak_times[name]),
            "worker_rss_start_mib": rss_start[name],
            "worker_rss_end_mib": rss_end[name],
            "bare_rss_mib": bare_rss[name],
        }
    return {"size": size, "rounds": rounds, "soak_size": soak_size, "soak": soak, "variants": table, "raw": times}
