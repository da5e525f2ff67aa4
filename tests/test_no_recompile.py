"""LoRA swaps never recompile a compiled transformer (CPU proof of the GPU fast path's design).

A Predictor is set up on the tiny weights exactly as in production, then its transformers are
compiled the way `fast_path` does on a GPU (regional compilation of the repeated blocks,
fullgraph, dynamic shapes, no duck shaping), only with torch.compile's `eager` backend, which
runs on a CPU in seconds but guards and recompiles exactly as inductor does. The warm-up is
setup()'s own (`FluxModels.optimize` with the adapters on and off, batch 1 and 2). After it,
`torch._dynamo.config.error_on_recompile` is set and requests swap LoRAs of different ranks,
formats and target sets, at positive, negative and zero scales, on dev and schnell, at several
sizes, batch sizes and prompt lengths: any recompilation raises.

A step multiplies through a span of the adapter's ranks of one of a few lengths (rank buckets):
each is a graph of its own, warmed up in setup; requests move between buckets without compiling.
The last test does the same with the inductor backend on a bare transformer.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import lora_fixtures as fx
import numpy as np
import pytest
import torch
from PIL import Image

import fast_path
from errors import UserError

MAX_RANK = 16
SIZE = {"aspect_ratio": "custom", "width": 256, "height": 256}


@pytest.fixture(scope="module")
def compiled(tiny_weights, tmp_path_factory):
    """(run, predictor, LoRA files): a fresh Predictor whose transformers are compiled and warmed up."""
    import torch.fx.experimental._config as fx_config
    from cog._inspector import check_input, create_predictor

    import predict

    duck = fx_config.use_duck_shape  # put back by setattr (monkeypatch's undo would hide the setting)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLUX_WEIGHTS_DIR", str(tiny_weights))
        mp.setenv("LORA_MAX_RANK", str(MAX_RANK))
        mp.setenv("LORA_CACHE_DIR", str(tmp_path_factory.mktemp("lora-cache")))
        mp.setenv("FLUX_COMPILE_CACHE", str(tmp_path_factory.mktemp("compile-cache")))
        files = tmp_path_factory.mktemp("loras")
        mp.setenv("LORA_LOCAL_DIR", str(files))  # the LoRA files below are named by local path
        # fast_path sets this process-wide; it is put back afterwards for the other tests (below).
        mp.setattr(fast_path, "COMPILE_VAE_DECODER", False)  # not what this test is about; saves time
        torch._dynamo.reset()
        runner = predict.Predictor()
        runner.setup()  # on a CPU: loads, injects the LoRA adapter with the main LoRA's region; compiles nothing

        # setup()'s GPU branch, on the CPU: fast_path.optimize_pipeline, with the eager backend.
        for transformer in runner.models.transformers.values():
            eager = functools.partial(type(transformer).compile_repeated_blocks, transformer, backend="eager")
            mp.setattr(transformer, "compile_repeated_blocks", eager, raising=False)
        mp.delenv("FLUX_FP8", raising=False)
        runner.compile(warmup_sizes=[(256, 256)])  # exactly setup()'s GPU branch, at one small size
        fields = create_predictor("predict", "Predictor").inputs

        def run(**inputs):
            return runner.run(**check_input(fields, {"prompt": "an ascii cat", "seed": 1, **inputs}))

        dev = runner.models.transformers["dev"]
        clip = runner.models.text_encoder
        # Ranks 1..MAX_RANK, four formats, different target sets (all layers, attention only,
        # double blocks only, with and without CLIP, linear1 or not).
        loras = {
            "kohya-r16-clip": fx.bfl_family(dev, style="kohya", rank=16, alpha=8.0, clip=clip, seed=11),
            "diffusers-r4": fx.diffusers_peft(dev, rank=4, seed=12),
            "diffusers-r2-attn": fx.diffusers_peft(dev, rank=2, seed=13, targets=("attn.to_q", "attn.to_v")),
            "bfl-r8-no-linear1": fx.bfl_family(dev, style="bfl", rank=8, alpha=None, single_linear1=False, seed=14),
            "xlabs-r1": fx.xlabs(dev, rank=1, seed=15),
            "comfyui-r12": fx.bfl_family(dev, style="comfyui", rank=12, seed=16),
            "clip-only-r4": fx.diffusers_peft(dev, rank=4, seed=17, clip=clip, targets=("no.such.layer",)),
        }
        paths = {name: str(lora.write(files / f"{name}.safetensors")) for name, lora in loras.items()}
        yield run, runner, paths
        runner.outputs.cleanup()
    fx_config.use_duck_shape = duck
    torch._dynamo.reset()


def graphs() -> int:
    return fast_path._compiled_graph_count()


def pixels(paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in paths]


def test_warm_up_compiled_the_blocks(compiled):
    run, runner, _ = compiled
    for transformer in runner.models.transformers.values():
        blocks = [m for m in transformer.modules() if type(m).__name__ in transformer._repeated_blocks]
        assert blocks and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    assert graphs() > 0


def test_lora_swaps_across_requests_never_recompile(compiled, caplog):
    run, runner, loras = compiled
    requests = [
        {"extra_lora": loras["kohya-r16-clip"]},
        {"extra_lora": loras["diffusers-r4"], "extra_lora_scale": -0.7},
        {"extra_lora": loras["diffusers-r2-attn"], "lora_scale": 0},
        {"extra_lora": loras["bfl-r8-no-linear1"], "lora_scale": -1, "extra_lora_scale": 2},
        {"extra_lora": loras["xlabs-r1"], "model": "schnell", "num_inference_steps": 2},
        {"extra_lora": loras["comfyui-r12"], "extra_lora_scale": 0},
        {"extra_lora": loras["clip-only-r4"], "lora_scale": 0},  # transformer adapters off, CLIP's on
        {"lora_scale": 0},  # the base model: adapters off
        {"extra_lora": loras["kohya-r16-clip"], "model": "schnell", "num_outputs": 2},
        {"extra_lora": loras["diffusers-r4"], "num_outputs": 4, "lora_scale": 0.5},
        {"extra_lora": loras["xlabs-r1"], "width": 384, "height": 256},  # another size
        {},  # main LoRA only, default scale
        {"model": "schnell", "lora_scale": 0, "extra_lora": loras["comfyui-r12"], "extra_lora_scale": -1},
        # Per-request fine-tunes (replicate_weights, in the main region) and lists of extras.
        {"replicate_weights": loras["comfyui-r12"], "extra_lora": loras["diffusers-r4"]},
        {"replicate_weights": loras["kohya-r16-clip"], "model": "schnell", "lora_scale": -0.5},
        {"extra_lora": f"{loras['bfl-r8-no-linear1']}:0.5, {loras['diffusers-r4']}:-1\n{loras['xlabs-r1']}"},
        {"extra_lora": f"{loras['diffusers-r2-attn']}, {loras['clip-only-r4']}:0.7", "num_outputs": 2},
        {"extra_lora": loras["kohya-r16-clip"]},  # back to the first: same output as the first time
    ]
    before = graphs()
    outputs = []
    with torch._dynamo.config.patch(error_on_recompile=True), caplog.at_level(logging.INFO, logger="lora_loader"):
        for request in requests:
            outputs.append(pixels(run(**{"num_inference_steps": 2, **SIZE, **request})))
    assert graphs() == before, "a LoRA swap compiled a new graph"
    assert (outputs[0][0] == outputs[-1][0]).all()
    assert sum("LoRA applied" in r.message for r in caplog.records) >= len(requests) - 1
    # Each LoRA changed the picture (the swapped-in tensors are read by the compiled blocks).
    firsts = [out[0].tobytes() for out in outputs[:7]]
    assert len(set(firsts)) == len(firsts)


def test_lokr_and_lora_switches_never_recompile(compiled, tiny_weights):
    """LyCORIS LoKr (written into the weights: the compiled graph reads the same tensors) switched with LoRAs
    (on the adapter), as the extra or the per-request fine-tune, with a T5 part (T5 is not compiled)."""
    from diffusers import FluxTransformer2DModel

    run, runner, loras = compiled
    folder = Path(loras["diffusers-r4"]).parent
    fresh = FluxTransformer2DModel.from_pretrained(Path(tiny_weights) / "FLUX.1-dev" / "transformer")
    lokr = str(fx.lycoris_file(fresh, "lokr-decomposed", folder / "lokr.safetensors", seed=21))
    lokr_whole = str(fx.lycoris_file(fresh, "lokr-full-w2", folder / "lokr-whole.safetensors", seed=22))
    t5 = fx.t5_lora(runner.models.get("dev", "txt2img").text_encoder_2, "onetrainer", seed=23)
    t5 = str(t5.write(folder / "t5.safetensors"))
    requests = [
        {"extra_lora": lokr},
        {"extra_lora": loras["diffusers-r4"]},
        {"replicate_weights": lokr_whole, "extra_lora": loras["kohya-r16-clip"]},  # a LoKr fine-tune + a LoRA
        {"extra_lora": f"{lokr}, {t5}"},
        {"extra_lora": lokr_whole, "model": "schnell", "num_outputs": 2},
        {"replicate_weights": loras["comfyui-r12"], "extra_lora": lokr, "extra_lora_scale": -0.5},
        {"lora_scale": 0},
        {"extra_lora": lokr},  # back to the first: same output as the first time
    ]
    before = graphs()
    outputs = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for request in requests:
            outputs.append(pixels(run(**{"num_inference_steps": 2, **SIZE, **request})))
    assert graphs() == before, "a LoKr ↔ LoRA switch compiled a new graph"
    assert (outputs[0][0] == outputs[-1][0]).all()
    firsts = [out[0].tobytes() for out in outputs[:7]]
    assert len(set(firsts)) == len(firsts)  # each one changed the picture
    assert runner.loras.deltas.pristine  # the last LoKr is in the weights now


def test_switching_rank_buckets_never_recompiles(compiled):
    # The main region holds 16 ranks (the main LoRA is rank 4, counted as 8), the extra region 16:
    # buckets of 16 and 32 ranks, both warmed up; the span's position moves too.
    run, runner, loras = compiled
    dev = runner.models.transformers["dev"]
    assert runner.loras.buckets == (16, 32)
    requests = [
        ({}, 16),  # main only: 8 ranks
        ({"extra_lora": loras["kohya-r16-clip"]}, 32),  # 8 + 16
        ({"lora_scale": 0, "extra_lora": loras["comfyui-r12"]}, 16),  # the extra region alone: 12
        ({"extra_lora": loras["diffusers-r4"], "num_outputs": 2}, 16),  # 8 + 4
        ({"lora_scale": 0}, 0),  # adapter off
        ({"replicate_weights": loras["comfyui-r12"], "extra_lora": loras["xlabs-r1"]}, 32),  # 16 + 1
        ({"lora_scale": 0, "extra_lora": loras["kohya-r16-clip"], "width": 384}, 16),
        ({"extra_lora": loras["kohya-r16-clip"]}, 32),
    ]
    before = graphs()
    outputs = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for request, ranks in requests:
            outputs.append(pixels(run(**{**SIZE, "num_inference_steps": 2, **request})))
            assert runner.loras.ranks_in_use(dev) == ranks, request
    assert graphs() == before, "switching rank buckets compiled a new graph"
    with torch.compiler.set_stance("force_eager"):
        eager = pixels(run(**{**SIZE, "num_inference_steps": 2, **requests[-1][0]}))
    assert np.abs(outputs[-1][0] - eager[0]).max() <= 1


def test_compiled_output_matches_eager_after_swaps(compiled):
    # The compiled blocks read the adapter's current values (no stale constants): force_eager runs the
    # very same modules without the compiled code and must give the same picture.
    run, _, loras = compiled
    request = {**SIZE, "num_inference_steps": 2, "extra_lora": loras["bfl-r8-no-linear1"], "extra_lora_scale": -0.5}
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled_out = pixels(run(**request))
        run(**{**request, "extra_lora": loras["diffusers-r2-attn"]})  # swap away and back
        again = pixels(run(**request))
    with torch.compiler.set_stance("force_eager"):
        eager_out = pixels(run(**request))
    assert (compiled_out[0] == again[0]).all()
    assert np.abs(compiled_out[0] - eager_out[0]).max() <= 1


def test_rank_above_the_extra_region_is_refused_without_touching_the_compiled_model(compiled, tmp_path):
    run, runner, loras = compiled
    too_big = fx.diffusers_peft(runner.models.transformers["dev"], rank=MAX_RANK + 1, seed=18)
    path = too_big.write(Path(loras["diffusers-r4"]).parent / "big.safetensors")  # in LORA_LOCAL_DIR
    before = graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        with pytest.raises(UserError, match="LORA_MAX_RANK"):
            run(**SIZE, num_inference_steps=2, extra_lora=str(path))
        run(**SIZE, num_inference_steps=2, extra_lora=loras["diffusers-r4"])
    assert graphs() == before


def test_the_harness_catches_a_recompile(compiled):
    # Negative control: a change the compiled graphs are guarded on (here: the adapter's weights
    # requiring grad, as PEFT's set_adapter would make them outside inference mode) does raise
    # under error_on_recompile, so the tests above would have caught a swap that recompiled.
    from lora_loader import ADAPTER

    run, runner, _ = compiled
    layers = runner.loras.adapter_layers(runner.models.transformers["dev"]).values()
    runner.loras.apply(runner.models.transformers["dev"], 1.0, None, 1.0)  # adapter on
    try:
        for layer in layers:
            layer.lora_A[ADAPTER].weight.requires_grad_(True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            with pytest.raises(RuntimeError, match="Recompil"):
                run(**SIZE, num_inference_steps=1)
    finally:
        for layer in layers:
            layer.lora_A[ADAPTER].weight.requires_grad_(False)
        runner.loras.reset()


def test_inductor_serves_every_rank_bucket_without_recompiling(tmp_path, monkeypatch, request):
    """The real backend: a tiny transformer's blocks compiled by inductor (as fast_path does, on the
    CPU), warmed up in `compile_states`; then LoRAs of several ranks move between buckets and the
    span's position, computing what the same modules compute uncompiled."""
    import torch.fx.experimental._config as fx_config

    from lora_loader import LoraManager
    from loras.cache import LoraCache
    from scripts.tiny_weights import flux_transformer

    duck = fx_config.use_duck_shape  # put back by setattr (monkeypatch's undo would hide the setting)
    request.addfinalizer(lambda: setattr(fx_config, "use_duck_shape", duck))
    fx_config.use_duck_shape = False
    monkeypatch.setenv("LORA_LOCAL_DIR", str(tmp_path))
    torch._dynamo.reset()
    transformer = flux_transformer(True, 0).requires_grad_(False)
    main = fx.diffusers_peft(transformer, rank=4, seed=1).write(tmp_path / "main.safetensors")
    files = {
        r: str(fx.diffusers_peft(transformer, rank=r, seed=r).write(tmp_path / f"r{r}.safetensors")) for r in (2, 8)
    }
    manager = LoraManager(
        [transformer], None, LoraCache(tmp_path / "cache", 1 << 30), 8, main=main, max_main_rank=8, rank_buckets=(8,)
    )
    assert manager.buckets == (8, 16)
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)  # inductor
    g = torch.Generator().manual_seed(5)
    inputs = {
        "hidden_states": torch.randn(1, 16, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5]),
    }

    def step():
        with torch.no_grad():
            return transformer(**inputs).sample

    try:
        for _ in manager.compile_states(transformer):
            step()
        before = graphs()
        requests = [((1.0, None, 0.0), 8), ((1.0, files[8], 0.5), 16), ((0.0, files[2], 1.0), 8)]
        requests += [((-1.0, files[2], 1.0), 16), ((0.0, None, 0.0), 0), ((0.5, None, 0.0), 8)]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for request, ranks in requests:
                manager.apply(transformer, *request)
                assert manager.ranks_in_use(transformer) == ranks, request
                out = step()
                with torch.compiler.set_stance("force_eager"):
                    torch.testing.assert_close(out, step(), rtol=1e-4, atol=1e-5)
        assert graphs() == before, "a rank bucket switch compiled a new graph"
    finally:
        torch._dynamo.reset()
