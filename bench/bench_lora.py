"""2. LoRA switching against the anchor approach, 3. the per-step cost of the LoRA as applied
(the bucketed adapter against one multiplying through all of its ranks), and 5. switching LyCORIS
LoKr fine-tunes (written into the weights) against LoRAs of the same file size.

Both on a transformer of FLUX.1's real width (common.FLUX_WIDTH: 3072 wide, 24 heads × 128,
joint_attention_dim 4096) with 1 double and 1 single block, float32, with real-shaped rank-16
LoRAs (kohya `lora_unet_double_blocks_0_…`/`…single_blocks_0_linear1`, and diffusers/PEFT keys)
written by tests/lora_fixtures.py. The models with our adapter and the anchor's model share the base
weights (no copy); only the fused case has weights of its own.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import torch
from common import REAL_BLOCKS, interleaved, median, paired_ratio, timed

logger = logging.getLogger(__name__)

RANK = 16
SWITCH_RANKS = (16, 128)  # extra LoRAs' ranks for the switch: the common one and the most Replicate's trainer makes


def _shallow(model):
    """A copy of `model`'s modules sharing its parameters and buffers (adapters go into the copy)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def _write_loras(base, directory: Path, rank: int = RANK) -> dict[str, Path]:
    """The rank-16 main LoRA and two extras of `rank` (kohya BFL keys with split qkv, diffusers keys)."""
    import lora_fixtures as fx

    files = {
        "main": fx.diffusers_peft(base, rank=RANK, seed=1),
        "kohya": fx.bfl_family(base, style="kohya", rank=rank, alpha=rank, seed=2),
        "diffusers": fx.diffusers_peft(base, rank=rank, alpha="keys", seed=3),
    }
    return {name: lora.write(directory / f"r{rank}-{name}.safetensors") for name, lora in files.items()}


class _WriteTimes(logging.Handler):
    """The write part of each switch, from lora_loader's own log line ("… rewritten in X ms")."""

    PATTERN = re.compile(r"layers rewritten in ([\d.]+) ms")

    def __init__(self):
        super().__init__(logging.INFO)
        self.ms: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if found := self.PATTERN.search(record.getMessage()):
            self.ms.append(float(found[1]))

    def __enter__(self):
        log = logging.getLogger("lora_loader")
        self._level = log.level
        log.setLevel(logging.INFO)  # setLevel, not .level: it also clears the logger's isEnabledFor cache
        log.addHandler(self)
        return self

    def __exit__(self, *exc):
        log = logging.getLogger("lora_loader")
        log.removeHandler(self)
        log.setLevel(self._level)


def _extrapolation(model) -> float:
    """How many times more LoRA-able Linear elements (Σ in+out) the full 19 + 38 block model has."""
    per = {"double": 0, "single": 0, "top": 0}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".lora_" not in name and not name.endswith("base_layer"):
            kind = "double" if name.startswith("transformer_blocks.") else "single" if "single_" in name else "top"
            per[kind] += m.in_features + m.out_features
    doubles, singles = REAL_BLOCKS
    return (doubles * per["double"] + singles * per["single"] + per["top"]) / sum(per.values())


def _anchor_pipe(transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def switching(base, files: dict[str, Path], cache_dir: Path, *, switches: int = 10, rounds: int = 5) -> dict:
    """Requests alternating between two cached extra LoRAs (main LoRA on): ours, the anchor, and the
    floor of any switch, a plain copy of the new LoRA's parsed bytes into buffers of their shapes."""
    from lora_loader import LoraManager
    from loras.cache import LoraCache

    os.environ["LORA_LOCAL_DIR"] = str(files["kohya"].parent)  # the extras are named by path, as a user's would be
    ours = _shallow(base)
    manager = LoraManager([ours], None, LoraCache(cache_dir, 1 << 31), max_rank=128, main=files["main"])
    extras = [str(files["kohya"]), str(files["diffusers"])]
    for extra in extras:  # first use: parse (the LoRA is then in memory, as on a server after one request)
        manager.apply(ours, 1.0, extra, 1.0)
    parsed = [manager._parsed(extra, None) for extra in extras]  # noqa: SLF001  (the bytes a switch writes)
    buffers = [{k: (torch.empty_like(a), torch.empty_like(b)) for k, (a, b) in p.pairs.items()} for p in parsed]

    anchor = _anchor_pipe(_shallow(base))

    def anchor_change(i):
        # The anchor: on each change, unload everything, load main + extra from their files, set scales.
        anchor.unload_lora_weights()
        anchor.load_lora_weights(str(files["main"]), adapter_name="main")
        anchor.load_lora_weights(extras[i], adapter_name="extra")
        anchor.set_adapters(["main", "extra"], [1.0, 1.0])

    def plain_copy(i):
        for key, (a, b) in parsed[i].pairs.items():
            buffers[i][key][0].copy_(a)
            buffers[i][key][1].copy_(b)

    def alternate(apply):
        def go():
            for i in range(switches):
                apply(i % 2)

        return go

    with _WriteTimes() as writes:
        times = interleaved(
            {
                "ours": alternate(lambda i: manager.apply(ours, 1.0, extras[i], 1.0)),
                "plain copy": alternate(plain_copy),
                "anchor": alternate(anchor_change),
            },
            rounds=rounds,
            warmup=1,
        )
    # The log's write times, per round (the warm-up round's first, skipped).
    per_round = [writes.ms[(r + 1) * switches : (r + 2) * switches] for r in range(rounds)]
    times["ours: write"] = [sum(ms) / 1e3 for ms in per_round]
    manager.apply(ours, 1.0, extras[0], 1.0)
    same = [timed(lambda: manager.apply(ours, 1.0, extras[0], 1.0)) for _ in range(50)]
    per_switch = {k: [t / switches for t in v] for k, v in times.items()}
    anchor.unload_lora_weights()
    factor = _extrapolation(base)
    ms = {k: median(v) * 1e3 for k, v in per_switch.items()}
    return {
        "rank": parsed[0].rank,
        "lora_bytes_float32": [p.nbytes for p in parsed],
        "switches_per_round": switches,
        "rounds": rounds,
        "ms_per_switch": ms,
        "ms_same_as_previous": median(same) * 1e3,
        "ratio_anchor_over_ours": paired_ratio(times["anchor"], times["ours"]),
        "ratio_write_over_copy": paired_ratio(times["ours: write"], times["plain copy"]),
        "ratio_ours_over_copy": paired_ratio(times["ours"], times["plain copy"]),
        "extrapolation_factor_to_19_38_blocks": factor,
        "ms_per_switch_full_model_estimate": {"ours": ms["ours"] * factor, "anchor": ms["anchor"] * factor},
        "raw_seconds": times,
    }


def flux_width_tree(tiny: Path, dest: Path):
    """The tiny weights tree with FLUX-width transformers (1 double + 1 single block, float32; the text
    projections sized for the tiny text encoders), a rank-16 main LoRA for them; the rest linked."""
    import lora_fixtures as fx
    from common import flux_width_transformer

    dest.mkdir(parents=True)
    for item in tiny.iterdir():
        if item.name not in ("FLUX.1-dev", "FLUX.1-schnell", "lora.safetensors"):
            (dest / item.name).symlink_to(item)
    text = {"joint_attention_dim": 32, "pooled_projection_dim": 32}  # scripts/tiny_weights.HIDDEN
    for model, guidance in (("FLUX.1-dev", True), ("FLUX.1-schnell", False)):
        (dest / model).mkdir()
        for item in (tiny / model).iterdir():
            if item.name != "transformer":
                (dest / model / item.name).symlink_to(item)
        transformer = flux_width_transformer(seed=0, guidance_embeds=guidance, **text)
        transformer.save_pretrained(dest / model / "transformer")
        if guidance:
            fx.diffusers_peft(transformer, rank=RANK, seed=1).write(dest / "lora.safetensors")
            dev = transformer
    return dest, dev


def http_switching(tree: Path, dev, directory: Path, rank: int, *, rounds: int = 6) -> dict:
    """Over real HTTP (`make serve` on the FLUX-width tree): a request whose extra LoRA differs from the
    previous one's against one that repeats it. dev, 256², 1 step, png, no safety checker, main LoRA at
    1; the extras are local files (LORA_LOCAL_DIR), parsed once before timing. The figure is the
    difference of predict time outside the pipeline (predict_time − the log's "generated … in"), which
    the pipeline's own noise does not blur; the end-to-end difference is reported beside it."""
    from bench_serving import HttpServer

    files = _write_loras(dev, directory, rank)
    extras = [str(files["kohya"]), str(files["diffusers"])]
    server = HttpServer(tree, env={"LORA_LOCAL_DIR": str(directory)})
    inputs = {
        "prompt": "an ascii art cat",
        "aspect_ratio": "custom",
        "width": 256,
        "height": 256,
        "num_inference_steps": 1,
        "output_format": "png",
        "disable_safety_checker": True,
        "seed": 1,
    }
    try:
        for extra in extras:  # first use: fetched and parsed (then in memory)
            server.post({**inputs, "extra_lora": extra})
        answers: dict[str, list[dict]] = {"switch": [], "reuse": []}
        for i in range(rounds):  # A(switch) A(reuse) B(switch) B(reuse) …
            for case in ("switch", "reuse"):
                answers[case].append(server.post({**inputs, "extra_lora": extras[i % 2]}))
    finally:
        server.close()

    def outside(a):
        return a["predict_s"] - a["generate_s"]

    pairs = list(zip(answers["switch"], answers["reuse"], strict=True))

    return {
        "rounds": rounds,
        "extra_ms_outside_pipeline": median([outside(s) - outside(r) for s, r in pairs]) * 1e3,
        "extra_ms_end_to_end": median([s["total_s"] - r["total_s"] for s, r in pairs]) * 1e3,
        "apply_ms": {k: median([a.get("lora_apply_s", 0.0) for a in v]) * 1e3 for k, v in answers.items()},
        "write_ms": {k: median([a.get("lora_write_s", 0.0) for a in v]) * 1e3 for k, v in answers.items()},
        "request_s": {k: median([a["total_s"] for a in v]) for k, v in answers.items()},
    }


def _inputs(image_tokens: int, text_tokens: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, image_tokens, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, text_tokens, 4096, generator=g),
        "pooled_projections": torch.randn(1, 768, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(image_tokens, 3),
        "txt_ids": torch.zeros(text_tokens, 3),
        "return_dict": False,
    }


def per_step(base, files: dict[str, Path], extra: Path, cache_dir: Path, *, size=256, text_tokens=512, rounds=3):
    """One denoising step (one transformer call) with no LoRA, with the rank-16 main LoRA, and with it
    and a rank-128 extra, each through the bucketed adapter (ours) and as before this change: all of
    its ranks (`rank_buckets=()`) through PEFT's own forward. The adapter is the default one: main
    128 + extra 128."""
    from lora_loader import ADAPTER, RANK_BUCKETS, LoraManager
    from loras.cache import LoraCache

    os.environ["LORA_LOCAL_DIR"] = str(extra.parent)
    models: dict[str, torch.nn.Module] = {"no LoRA": base}
    ranks: dict[str, int] = {"no LoRA": 0}
    for request, extra_lora in (("main r16", None), ("main r16 + extra r128", str(extra))):
        for design, buckets in (("ours", RANK_BUCKETS), ("all ranks", ())):
            model = _shallow(base)
            manager = LoraManager(
                [model], None, LoraCache(cache_dir, 1 << 31), main=files["main"], rank_buckets=buckets
            )
            manager.apply(model, 1.0, extra_lora, 1.0)  # as predict does: the main LoRA at 1 (+ the extra)
            if design == "all ranks":  # the design before, exactly: PEFT's own forward too
                for layer in manager.adapter_layers(model).values():
                    layer.lora_variant.pop(ADAPTER)
            name = f"{request}, {design}"
            models[name], ranks[name] = model, manager.ranks_in_use(model)

    full = _inputs((size // 16) ** 2, text_tokens)
    small = _inputs(16, 16)

    def step(model, inputs):
        def go():
            with torch.no_grad():
                model(**inputs)

        return go

    # Timed as one thread's CPU time: on a machine shared with other work, wall time with torch's
    # thread pool measures the neighbours (a descheduled worker thread stalls every parallel op), while
    # the CPU time of a single-threaded step is the work itself. The ratios are what they measure.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for model in models.values():  # warm-up on a small input (allocator, first-call costs)
            step(model, small)()
        times = interleaved({k: step(m, full) for k, m in models.items()}, rounds, warmup=0, clock=time.thread_time)
    finally:
        torch.set_num_threads(threads)
    result = {
        "clock": "CPU time of one thread (torch.set_num_threads(1))",
        "size": size,
        "image_tokens": (size // 16) ** 2,
        "text_tokens": text_tokens,
        "lora_rank": RANK,
        "extra_rank": 128,
        "rounds": rounds,
        "ranks_per_step": ranks,
        "seconds": {k: median(v) for k, v in times.items()},
        "ratio_vs_no_lora": {k: paired_ratio(v, times["no LoRA"]) for k, v in times.items()},
        "raw_seconds": times,
    }
    del models
    return result


# The modules SimpleTuner's FLUX LyCORIS preset targets ("Attention", "FeedForward"), as diffusers names them.
LOKR_TARGETS = (
    *("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj"),
    *("attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
)


def lokr_switching(base, directory: Path, cache_dir: Path, *, switches: int = 4, rounds: int = 3) -> dict:
    """Requests alternating between two LoKr fine-tunes as SimpleTuner makes them (lycoris-lora, both sides
    whole, factor 16: written into the touched weights from pristine copies) against two LoRAs of about the
    same file size on the same modules (copied into the adapter), and the host memory the copies take."""
    import lora_fixtures as fx

    from lora_loader import LoraManager
    from loras.cache import LoraCache

    directory.mkdir(parents=True, exist_ok=True)
    os.environ["LORA_LOCAL_DIR"] = str(directory)
    lokr = [str(fx.lycoris_file(base, "lokr-full-w2", directory / f"lokr-{i}.safetensors", seed=i)) for i in (1, 2)]
    targets = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(LOKR_TARGETS)}
    elements = sum(m.in_features + m.out_features for m in targets.values())
    rank = max(1, round(Path(lokr[0]).stat().st_size / 4 / elements))  # a float32 LoRA file of the LoKr's size
    lora = []
    for i in (1, 2):
        file = fx.diffusers_peft(base, rank=rank, seed=10 + i, targets=LOKR_TARGETS)
        lora.append(str(file.write(directory / f"lora-{i}.safetensors")))
    model = _shallow(base)
    manager = LoraManager([model], None, LoraCache(cache_dir, 1 << 31), max_rank=max(8, rank))
    for extra in (*lokr, *lora):  # first use: parse (then in memory, as on a server after one request)
        manager.apply(model, 0.0, extra, 1.0)
    manager.apply(model, 0.0, lokr[0], 1.0)
    pristine = manager.deltas.pristine_bytes
    touched = len(manager.deltas.pristine)
    manager.reset()

    def alternate(files):
        def go():
            for i in range(switches):
                manager.apply(model, 0.0, files[i % 2], 1.0)

        return go

    times = interleaved(
        {"LoKr ↔ LoKr": alternate(lokr), "LoRA ↔ LoRA": alternate(lora), "LoKr ↔ LoRA": alternate([lokr[0], lora[0]])},
        rounds=rounds,
        warmup=1,
    )
    manager.reset()
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    factor = _extrapolation(base)
    ms = {k: median(v) / switches * 1e3 for k, v in times.items()}
    return {
        "file_bytes": {"lokr": Path(lokr[0]).stat().st_size, "lora": Path(lora[0]).stat().st_size},
        "lora_rank": rank,
        "modules": len(targets),
        "switches_per_round": switches,
        "rounds": rounds,
        "ms_per_switch": ms,
        "ratio_lokr_over_lora": paired_ratio(times["LoKr ↔ LoKr"], times["LoRA ↔ LoRA"]),
        "pristine_bytes": pristine,
        "touched_weights": touched,
        "model_bytes": model_bytes,
        "extrapolation_factor_to_19_38_blocks": factor,
        "ms_per_switch_full_model_estimate": {k: v * factor for k, v in ms.items()},
        "raw_seconds": times,
    }


def run(tiny_tree: Path | None = None, *, quick: bool = False) -> dict:
    from common import flux_width_transformer

    start = time.perf_counter()
    base = flux_width_transformer()
    built = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        tmp = Path(tmp)
        switch = {}
        for rank in SWITCH_RANKS:
            files = _write_loras(base, tmp / "files", rank)
            switch[str(rank)] = switching(base, files, tmp / "cache", rounds=3 if quick else 5)
            switch[str(rank)]["file_bytes"] = {k: p.stat().st_size for k, p in files.items()}
        if tiny_tree is not None:  # the same switches over HTTP, on a FLUX-width weights tree
            tree, dev = flux_width_tree(tiny_tree, tmp / "flux-width")
            for rank in SWITCH_RANKS:
                folder = tmp / f"http-r{rank}"
                switch[str(rank)]["http"] = http_switching(tree, dev, folder, rank, rounds=3 if quick else 6)
            del dev
        files = _write_loras(base, tmp / "files")
        extra = _write_loras(base, tmp / "files", 128)["diffusers"]
        step = per_step(base, files, extra, tmp / "cache", rounds=1 if quick else 3)
        lokr = lokr_switching(base, tmp / "lokr", tmp / "cache", rounds=2 if quick else 4)
    return {
        "model": "FluxTransformer2DModel, FLUX width, 1 double + 1 single block, float32",
        "parameters_millions": sum(p.numel() for p in base.parameters()) / 1e6,
        "build_seconds": built,
        "switching": switch,
        "per_step": step,
        "lokr": lokr,
    }
