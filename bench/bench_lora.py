"""2. LoRA switching against the anchor approach, and 3. the per-step cost of the LoRA as applied.

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
import tempfile
import time
from pathlib import Path

import torch
from common import REAL_BLOCKS, interleaved, median, paired_ratio, timed

logger = logging.getLogger(__name__)

RANK = 16
STEP_SLOT_RANKS = (16, 64, 128)  # LORA_MAX_RANK values whose per-step cost is measured


def _shallow(model):
    """A copy of `model`'s modules sharing its parameters and buffers (adapters go into the copy)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def _write_loras(base, directory: Path) -> dict[str, Path]:
    import lora_fixtures as fx

    files = {
        "main": fx.diffusers_peft(base, rank=RANK, seed=1),
        "kohya": fx.bfl_family(base, style="kohya", rank=RANK, alpha=RANK, seed=2),
        "diffusers": fx.diffusers_peft(base, rank=RANK, alpha="keys", seed=3),
    }
    return {name: lora.write(directory / f"{name}.safetensors") for name, lora in files.items()}


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
    """Requests alternating between two cached extra LoRAs (main LoRA on), ours vs the anchor."""
    from lora_loader import LoraManager
    from loras.cache import LoraCache

    os.environ["LORA_LOCAL_DIR"] = str(files["kohya"].parent)  # the extras are named by path, as a user's would be
    ours = _shallow(base)
    manager = LoraManager([ours], None, LoraCache(cache_dir, 1 << 30), max_rank=128, main=files["main"])
    extras = [str(files["kohya"]), str(files["diffusers"])]
    for extra in extras:  # first use: parse (the LoRA is then in memory, as on a server after one request)
        manager.apply(ours, 1.0, extra, 1.0)

    anchor = _anchor_pipe(_shallow(base))

    def anchor_change(extra):
        # The anchor: on each change, unload everything, load main + extra from their files, set scales.
        anchor.unload_lora_weights()
        anchor.load_lora_weights(str(files["main"]), adapter_name="main")
        anchor.load_lora_weights(extra, adapter_name="extra")
        anchor.set_adapters(["main", "extra"], [1.0, 1.0])

    def alternate(apply):
        def go():
            for i in range(switches):
                apply(extras[i % 2])

        return go

    times = interleaved(
        {
            "ours": alternate(lambda extra: manager.apply(ours, 1.0, extra, 1.0)),
            "anchor": alternate(anchor_change),
        },
        rounds=rounds,
        warmup=1,
    )
    manager.apply(ours, 1.0, extras[0], 1.0)
    same = [timed(lambda: manager.apply(ours, 1.0, extras[0], 1.0)) for _ in range(50)]
    per_switch = {k: [t / switches for t in v] for k, v in times.items()}
    anchor.unload_lora_weights()
    factor = _extrapolation(base)
    ours_ms, anchor_ms = median(per_switch["ours"]) * 1e3, median(per_switch["anchor"]) * 1e3
    return {
        "switches_per_round": switches,
        "rounds": rounds,
        "ms_per_switch": {"ours": ours_ms, "anchor": anchor_ms},
        "ms_same_as_previous": median(same) * 1e3,
        "ratio_anchor_over_ours": paired_ratio(times["anchor"], times["ours"]),
        "extrapolation_factor_to_19_38_blocks": factor,
        "ms_per_switch_full_model_estimate": {"ours": ours_ms * factor, "anchor": anchor_ms * factor},
        "raw_seconds": times,
    }


def _two_adapters(model, manager, rank: int):
    """The previous design, for comparison: two PEFT adapters ("main", "extra") of `rank` in every
    Linear, both active, the main LoRA copied into the first, the second all zeros."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    targets = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for name in ("main", "extra"):
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0)
        inject_adapter_in_model(config, model, adapter_name=name)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    pairs = manager.main.components["transformer"]
    with torch.no_grad():
        for name, layer in layers.items():
            for adapter in ("main", "extra"):
                layer.lora_A[adapter].weight.zero_()
                layer.lora_B[adapter].weight.zero_()
            if name in pairs:
                down, up = pairs[name]
                layer.lora_A["main"].weight[: down.shape[0]].copy_(down)
                layer.lora_B["main"].weight[:, : down.shape[0]].copy_(up)
            layer.set_adapter(["main", "extra"], inference_mode=True)
    return model


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


def per_step(base, files: dict[str, Path], cache_dir: Path, *, size: int = 256, text_tokens: int = 512, rounds=2):
    """One denoising step (one transformer call) with the rank-16 main LoRA as each design applies it."""

    from lora_loader import LoraManager
    from loras.cache import LoraCache

    models: dict[str, torch.nn.Module] = {"no adapters": base}
    keep = []
    # (LORA_MAX_RANK, LORA_MAX_MAIN_RANK): per-request fine-tunes off (main region = the main LoRA's
    # rank), then on at the default, where the main region holds a rank-128 replicate_weights.
    for rank, main_rank in [*((r, 0) for r in STEP_SLOT_RANKS), (128, 32), (128, 128)]:
        model = _shallow(base)
        cache = LoraCache(cache_dir, 1 << 30)
        manager = LoraManager([model], None, cache, max_rank=rank, main=files["main"], max_main_rank=main_rank)
        manager.apply(model, 1.0, None, 1.0)  # as predict does by default: main on, extra region empty
        main = len(manager.regions["main"])
        models[f"1 adapter r{manager.rank} (main {main} + extra {rank}, ours)"] = model
        keep.append(manager)
    models["2 adapters r128 + r128 (the design before)"] = _two_adapters(_shallow(base), keep[-2], 128)
    fused = copy.deepcopy(base)  # its own weights: W + B·A for every layer of the LoRA
    lora = keep[0].main
    with torch.no_grad():
        layers = dict(fused.named_modules())
        for name, (down, up) in lora.components["transformer"].items():
            layers[name].weight += up @ down
    models["fused"] = fused

    full = _inputs((size // 16) ** 2, text_tokens)
    small = _inputs(16, 16)

    def step(model, inputs):
        def go():
            with torch.no_grad():
                model(**inputs)

        return go

    for model in models.values():  # warm-up on a small input (allocator, first-call costs)
        step(model, small)()
    times = interleaved({k: step(m, full) for k, m in models.items()}, rounds=rounds, warmup=0)
    base_times = times["no adapters"]
    result = {
        "size": size,
        "image_tokens": (size // 16) ** 2,
        "text_tokens": text_tokens,
        "lora_rank": RANK,
        "rounds": rounds,
        "seconds": {k: median(v) for k, v in times.items()},
        "ratio_vs_no_adapters": {k: paired_ratio(v, base_times) for k, v in times.items()},
        "raw_seconds": times,
    }
    del models, keep, fused
    return result


def run(*, quick: bool = False) -> dict:
    from common import flux_width_transformer

    start = time.perf_counter()
    base = flux_width_transformer()
    built = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        tmp = Path(tmp)
        files = _write_loras(base, tmp / "files")
        sizes = {k: p.stat().st_size for k, p in files.items()}
        switch = switching(base, files, tmp / "cache", rounds=3 if quick else 5)
        step = per_step(base, files, tmp / "cache", rounds=1 if quick else 2)
    return {
        "model": "FluxTransformer2DModel, FLUX width, 1 double + 1 single block, float32",
        "parameters_millions": sum(p.numel() for p in base.parameters()) / 1e6,
        "build_seconds": built,
        "lora_file_bytes": sizes,
        "switching": switch,
        "per_step": step,
    }
