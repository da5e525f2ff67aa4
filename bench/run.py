"""`make bench`: the CPU benchmark suite. Prints one table of ratios (each measured side by side in
this run) with absolute times, and writes everything to bench/results/latest.json.

    .venv/bin/python bench/run.py [--quick] [--only serving,lora,encode,setup,cluster,allocator] [--out PATH]

`allocator` (≈ 20 min: 1,000 predictions per variant) is not in the default set: `--only allocator` runs it;
`--allocators tcmalloc,jemalloc` runs only the variants whose names hold one of those words (and the
glibc fallback, the reference).

What the figures mean: bench/README.md. GPU figures: bench/GPU.md (bench/gpu_bench.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT  # noqa: E402  (also puts the project root on sys.path)

logger = logging.getLogger("bench")
SECTIONS = ("serving", "lora", "encode", "setup", "cluster")
EXTRA_SECTIONS = ("allocator",)  # on request only (--only allocator)


def _quiet() -> None:
    """Benchmarks time the work, not the logging: the predictor logs at WARNING here."""
    os.environ["LOG_LEVEL"] = "WARNING"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(figure, ratio, target, absolute times) rows of the table."""
    rows = []
    h = results.get("serving_http")
    if h:
        for size, fig in h["sizes"].items():
            t, st = fig["seconds"], fig["stages_s"]
            rows.append(
                (
                    f"1. HTTP (cog server) / bare FluxPipeline+save, own process ({size}², {h['steps']} steps, "
                    "png, lora_scale=0, no safety)",
                    f"{fig['ratio http / bare']:.3f}",
                    "≤ 1.05" if size == "1024" else "",
                    f"{t['http']:.3f} s vs {t['bare']:.3f} s",
                )
            )
            if fig.get("ratio http / bare, same allocator"):
                rows.append(
                    (
                        f"   … the serving cost alone ({size}²): HTTP / a bare process on the server's allocator too",
                        f"{fig['ratio http / bare, same allocator']:.3f}",
                        "≤ 1.05" if size == "1024" else "",
                        "tcmalloc on both sides",
                    )
                )
            if fig.get("ratio front / bare, same allocator"):
                rows.append(
                    (
                        f"   … through the public front (make serve: front + Cog, {size}²) / the same bare process",
                        f"{fig['ratio front / bare, same allocator']:.3f}",
                        "≤ 1.05" if size == "1024" else "",
                        f"front / Cog alone {fig['ratio front / http']:.3f}",
                    )
                )
            rows.append(
                (
                    "   … pipeline only: our generate_time / bare pipe()",
                    f"{fig['ratio pipeline: ours / bare']:.3f}",
                    "",
                    f"{st['pipeline']:.3f} s vs {st['bare_pipeline']:.3f} s",
                )
            )
            rows.append(
                (
                    "   … where the HTTP time goes",
                    "",
                    "",
                    f"predict {st['predict']:.3f} s (pipeline {st['pipeline']:.3f}, rest {st['predict_rest']:.3f}); "
                    f"Cog outside predict {st['cog_outside_predict']:.3f} s; bare png save {st['bare_save']:.3f} s; "
                    f"base64 of {fig['png_bytes'] / 1e6:.2f} MB {fig['base64_encode_s'] * 1e3:.1f} ms",
                )
            )
    s = results.get("serving")
    if s:
        t = s["seconds"]
        where = f"{s['size']}², {s['steps']} steps"
        rows += [
            (
                f"1b. in-process: Predictor.run / bare pipeline+save, same process ({where})",
                f"{s['ratios']['predict / bare']:.3f}",
                "≤ 1.05",
                f"{t['predict']:.2f} s vs {t['bare']:.2f} s",
            ),
            (
                "   … baseline with the same LoRA loaded",
                f"{s['ratios']['predict / bare_lora']:.3f}",
                "≤ 1.05",
                f"{t['predict']:.2f} s vs {t['bare_lora']:.2f} s",
            ),
            (
                "   … predict with lora_scale=0 / bare",
                f"{s['ratios']['predict_no_lora / bare']:.3f}",
                "",
                f"{t['predict_no_lora']:.2f} s vs {t['bare']:.2f} s",
            ),
            (
                "   … and no safety checker / bare",
                f"{s['ratios']['predict_no_lora_no_safety / bare']:.3f}",
                "",
                f"{t['predict_no_lora_no_safety']:.2f} s vs {t['bare']:.2f} s",
            ),
        ]
    lora = results.get("lora")
    if lora:
        for rank, w in lora["switching"].items():
            ms = w["ms_per_switch"]
            full = w["ms_per_switch_full_model_estimate"]
            mb = statistics.mean(w["lora_bytes_float32"]) / 1e6
            rows += [
                (
                    f"2. LoRA switch at rank {rank}: anchor / ours (FLUX width, 1+1 blocks)",
                    f"{w['ratio_anchor_over_ours']:.1f}×",
                    "≥ 10×" if rank == "16" else "> 1×",
                    f"{ms['anchor']:.1f} ms vs {ms['ours']:.1f} ms per switch "
                    f"(19+38 blocks ≈ {full['anchor']:.0f} vs {full['ours']:.0f} ms)",
                ),
                (
                    f"   … ours' write / a plain copy of the LoRA's bytes (rank {rank})",
                    f"{w['ratio_write_over_copy']:.2f}",
                    "≤ 2",
                    f"{ms['ours: write']:.2f} ms vs {ms['plain copy']:.2f} ms ({mb:.0f} MB float32); the whole "
                    f"apply (sources, checks, write) {ms['ours']:.2f} ms, {w['ratio_ours_over_copy']:.2f}× the copy",
                ),
            ]
            if "http" in w:
                h = w["http"]
                rows.append(
                    (
                        f"   … over HTTP: a switching request − a reusing one (rank {rank})",
                        "",
                        "",
                        f"{h['extra_ms_outside_pipeline']:+.1f} ms outside the pipeline "
                        f"({h['extra_ms_end_to_end']:+.0f} ms end to end, noisy); the server's log: "
                        f"LoRA applied in {h['apply_ms']['switch']:.1f} ms (write {h['write_ms']['switch']:.1f})",
                    )
                )
        w = lora["switching"]["16"]
        rows.append(("   … same LoRAs as the previous request", "", "≈ free", f"{w['ms_same_as_previous']:.3f} ms"))
        p = lora["per_step"]
        r, n, t = p["ratio_vs_no_lora"], p["ranks_per_step"], p["seconds"]
        where = f"FLUX width, {p['size']}², {p['text_tokens']} text tokens"
        for case, label, target in (
            ("main r16", f"rank-{p['lora_rank']} main LoRA", "≤ 1.03"),
            ("main r16 + extra r128", f"… + a rank-{p['extra_rank']} extra", ""),
        ):
            ours, before = f"{case}, ours", f"{case}, all ranks"
            rows.append(
                (
                    f"3. one step, {label} / no LoRA: ours ({n[ours]} ranks); before (all {n[before]}, PEFT's forward)",
                    f"{r[ours]:.3f}; {r[before]:.3f}",
                    target,
                    f"{t[ours]:.2f} s; {t[before]:.2f} s vs {t['no LoRA']:.2f} s ({where})",
                )
            )
    e = results.get("encode")
    if e:
        for fmt, fig in e["four_over_one"].items():
            ms = fig["ms"]
            rows.append(
                (
                    f"6. writing 4 outputs / 1, {fmt} ({e['size']}², quality {e['quality']}, one thread each; "
                    f"{e['cpus']} CPUs)",
                    f"{fig['4 / 1']:.2f}",
                    "≤ 2" if fmt != "jpg" else "",
                    f"{ms['4']:.0f} ms vs {ms['1']:.0f} ms, {fig['cores used by 4']:.1f} cores busy; one after "
                    f"another (before): {fig['4 serial / 1']:.2f} ({ms['4 serial']:.0f} ms); the machine's floor "
                    f"(the same in {min(4, e['cpus'])} processes): {fig['4 processes / 1']:.2f}; "
                    f"load {e['load_average'][0]:.1f}",
                )
            )
        chosen = str(e["chosen_webp_method"])
        for kind, methods in e["webp_methods"].items():
            fig = methods[chosen]
            rows.append(
                (
                    f"   … WebP method={chosen} / Pillow's default (4), {kind} picture: bytes; time",
                    f"{fig['bytes / default']:.3f}; {fig['time / default']:.2f}",
                    "bytes ≈ 1",
                    f"{fig['bytes']:,} vs {methods['default']['bytes']:,} bytes; "
                    f"{fig['ms']:.0f} vs {methods['default']['ms']:.0f} ms",
                )
            )
    k = (lora or {}).get("lokr")
    if k:
        ms, full = k["ms_per_switch"], k["ms_per_switch_full_model_estimate"]
        rows += [
            (
                "5. LoKr switch (SimpleTuner's, in the weights) / LoRA switch of the same file size",
                f"{k['ratio_lokr_over_lora']:.1f}×",
                "",
                f"{ms['LoKr ↔ LoKr']:.0f} ms vs {ms['LoRA ↔ LoRA']:.1f} ms per switch (rank {k['lora_rank']}, "
                f"{k['file_bytes']['lokr'] / 1e6:.1f} vs {k['file_bytes']['lora'] / 1e6:.1f} MB files; 19+38 blocks ≈ "
                f"{full['LoKr ↔ LoKr']:.0f} vs {full['LoRA ↔ LoRA']:.0f} ms); LoKr ↔ LoRA {ms['LoKr ↔ LoRA']:.0f} ms",
            ),
            (
                "   … pristine copies of the touched weights / the transformer's weights",
                f"{k['pristine_bytes'] / k['model_bytes']:.2f}",
                "",
                f"{k['pristine_bytes'] / 2**20:.0f} MiB for {k['touched_weights']} weights of "
                f"{k['model_bytes'] / 2**20:.0f} MiB (host memory on a GPU)",
            ),
        ]
    st = results.get("setup")
    if st:
        t = st["seconds"]
        rows.append(
            (
                "4. setup() / bare from_pretrained (tiny)",
                f"{st['ratios']['setup / from_pretrained']:.2f}",
                "",
                f"{t['setup']:.2f} s vs {t['from_pretrained']:.2f} s; cold `import predict` "
                f"{st['cold_import_predict']:.1f} s",
            )
        )
        for part, seconds in st["breakdown"].items():
            if part != "total":
                rows.append((f"   setup: {part}", "", "", f"{seconds:.3f} s"))
    c = results.get("cluster")
    if c and "ratios" in c:
        a, m, p = c["affinity"], c["ray_multiplex"], c["plain"]
        where = f"{c['replicas']} replicas, Zipf over {c['loras']} LoRAs, {a['requests']} requests"
        rows += [
            (
                f"5. LoRA loads per 100 requests, plain / affinity ({where})",
                f"{c['ratios']['loads plain / affinity']:.1f}×",
                "≥ 3×",
                f"{a['parses_per_100']:.1f} vs {p['parses_per_100']:.1f} "
                f"(Ray's multiplexing: {m['parses_per_100']:.1f})",
            ),
            (
                "   … LoRA downloads per 100 requests",
                f"{c['ratios']['downloads plain / affinity']:.1f}×",
                "",
                f"{a['downloads_per_100']:.1f} vs {p['downloads_per_100']:.1f} "
                f"(Ray's multiplexing: {m['downloads_per_100']:.1f})",
            ),
            (
                "   … p95 latency, affinity / plain",
                f"{c['ratios']['p95 affinity / plain']:.2f}",
                "< 1",
                f"p95 {a['p95_s']:.2f} vs {p['p95_s']:.2f} s (Ray's multiplexing {m['p95_s']:.2f}); "
                f"p50 {a['p50_s']:.2f} vs {p['p50_s']:.2f} s ({m['p50_s']:.2f})",
            ),
        ]
    a = results.get("allocator")
    if a:
        for name, v in a["variants"].items():
            curve = " → ".join(f"{x:.0f}" for x in v["worker_rss_mib"][:: max(1, len(v["worker_rss_mib"]) // 5)])
            rows.append(
                (
                    f"A. allocator {name}: HTTP / bare default process ({a['size']}², before / after the soak)",
                    f"{v['http / bare default process']:.3f} / {v['http / bare after the soak']:.3f}",
                    "≤ 1.05",
                    f"HTTP {v['http_s']:.2f} s ({v['http / fallback']:.2f}× the glibc fallback's); worker RSS MiB "
                    f"{curve} over {a['soak']} predictions ({v['soak_ms']:.0f} ms each), "
                    f"{v['rss_growth_second_half_mib']:+.0f} in the second half; coglet's server process MiB "
                    f"{v['server_rss_mib'][0]:.1f} → {v['server_rss_mib'][-1]:.1f}, "
                    f"{v['server_rss_growth_second_half_mib']:+.1f} in the second half",
                )
            )
            if "http / bare with tcmalloc" in v:
                rows.append(
                    (
                        "   … HTTP / a bare process with tcmalloc too (the serving overhead alone)",
                        f"{v['http / bare with tcmalloc']:.3f}",
                        "",
                        f"bare tcmalloc / bare glibc {v['bare tcmalloc / bare']:.2f}",
                    )
                )
    return rows


def _print_table(rows) -> None:
    headers = ("figure", "ratio", "target", "absolute")
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(4)]
    line = " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)  # noqa: T201
    print("-+-".join("-" * w for w in widths))  # noqa: T201
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))  # noqa: T201


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run, noisier)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS + EXTRA_SECTIONS}")
    parser.add_argument("--allocators", default="", help="allocator variants whose names hold one of these words")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    _quiet()
    import torch

    from scripts.tiny_weights import build

    started = time.perf_counter()
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "quick": args.quick,
    }
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tree = build(Path(tmp) / "weights")
        os.environ["FLUX_WEIGHTS_DIR"] = str(tree)
        os.environ.setdefault("LORA_CACHE_DIR", str(Path(tmp) / "lora-cache"))
        for section in only:
            section_start = time.perf_counter()
            print(f"[bench] {section}…", file=sys.stderr, flush=True)  # noqa: T201
            if section == "serving":
                import bench_serving

                results["serving_http"] = bench_serving.run_http(tree, rounds=3 if args.quick else 7)
                results["serving"] = bench_serving.run(tree, rounds=2 if args.quick else 3)
            elif section == "allocator":
                import bench_allocator

                soak, every = (50, 10) if args.quick else (1000, 100)
                allocators = [w for w in args.allocators.split(",") if w] or None
                results["allocator"] = bench_allocator.run(
                    tree, rounds=2 if args.quick else 5, soak=soak, every=every, only=allocators
                )
            elif section == "lora":
                import bench_lora

                results["lora"] = bench_lora.run(tree, quick=args.quick)
            elif section == "encode":
                import bench_encode

                results["encode"] = bench_encode.run(rounds=3 if args.quick else 7)
            elif section == "setup":
                import bench_setup

                results["setup"] = bench_setup.run(tree, rounds=2 if args.quick else 3)
            elif section == "cluster":
                import bench_cluster

                results["cluster"] = bench_cluster.run(tree, quick=args.quick)
            else:
                parser.error(f"unknown section {section!r}")
            results.setdefault("section_seconds", {})[section] = time.perf_counter() - section_start
            print(f"[bench] {section} done in {time.perf_counter() - section_start:.0f} s", file=sys.stderr)  # noqa: T201
    results["total_seconds"] = time.perf_counter() - started
    results["table"] = [dict(zip(("figure", "ratio", "target", "absolute"), r, strict=True)) for r in _rows(results)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    _print_table(_rows(results))
    print(f"\n{results['total_seconds']:.0f} s in all; JSON: {args.out}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
