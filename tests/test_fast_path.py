"""fast_path: what can be checked without a GPU, on a tiny FLUX pipeline built in code.

The real-scale numbers (H100) come from bench/gpu_bench.py and are in bench/GPU.md; the GPU tests
at the bottom run only where CUDA is available.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fast_path

ROOT = Path(__file__).resolve().parent.parent
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v")


def tiny_pipe(device="cpu", dtype=torch.float32):
    """The tiny FLUX of scripts/tiny_weights.py (1 double + 1 single block), without text encoders."""
    from diffusers import FluxPipeline

    from scripts.tiny_weights import flux_scheduler, flux_transformer, flux_vae

    transformer, vae = flux_transformer(guidance_embeds=True, seed=0), flux_vae()
    pipe = FluxPipeline(
        transformer=transformer,
        vae=vae,
        scheduler=flux_scheduler(dynamic_shifting=True),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def random_lora(transformer, rank: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in transformer.named_modules():
        if not name.endswith(LORA_TARGETS) or ".lora_" in name or ".base_layer" in name:
            continue
        base = getattr(module, "base_layer", module)
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, base.in_features, generator=generator)
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(base.out_features, rank, generator=generator)
    return state


def test_import_has_no_side_effects():
    # A fresh interpreter: torchao is not imported, torch's compile settings are untouched, and
    # nothing is printed or logged.
    code = (
        "import sys, logging, torch\n"
        "duck = torch.fx.experimental._config.use_duck_shape\n"
        "handlers = list(logging.getLogger().handlers)\n"
        "import fast_path\n"
        "assert 'torchao' not in sys.modules, 'torchao imported'\n"
        "assert torch.fx.experimental._config.use_duck_shape == duck\n"
        "assert logging.getLogger().handlers == handlers\n"
        "assert logging.getLogger('fast_path').level == logging.NOTSET\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_warmup_runs_without_text_encoders(caplog):
    # The benchmark's pipelines have no text encoders: warmup makes random embeddings of the
    # transformer's shapes. (On CPU nothing is compiled; this checks the calls are right.)
    pipe = tiny_pipe()
    with caplog.at_level(logging.INFO, logger="fast_path"):
        fast_path.warmup(pipe, [(64, 48), (48, 64)], steps=1)
    assert caplog.text.count("warm-up") == 4  # each size at batch 1 and 2
    assert "64x48 ×1" in caplog.text and "48x64 ×2" in caplog.text
    fast_path.warmup(pipe, [])  # nothing to do


def test_fp8_filter_takes_block_linears_but_never_lora_or_embedders():
    pipe = tiny_pipe()
    pipe.load_lora_weights(random_lora(pipe.transformer, 4, seed=1), adapter_name="style")
    chosen = [fqn for fqn, module in pipe.transformer.named_modules() if fast_path._is_block_linear(module, fqn)]
    assert "transformer_blocks.0.attn.to_q.base_layer" in chosen
    assert "single_transformer_blocks.0.proj_out" in chosen
    assert not [fqn for fqn in chosen if ".lora_" in fqn]
    assert not [fqn for fqn in chosen if not fqn.startswith(("transformer_blocks.", "single_"))]
    assert "x_embedder" not in chosen and "proj_out" not in chosen


def test_fp8_is_refused_off_cuda():
    assert "not CUDA" in fast_path._fp8_unavailable_reason(torch.device("cpu"))


def test_attention_backend_falls_back_to_native():
    # flash-attention 3 is not installed here, so the first usable preference is PyTorch's SDPA.
    pipe = tiny_pipe()
    assert fast_path._set_attention_backend(pipe.transformer) == "native"


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_compiled_pipeline_serves_sizes_without_recompiling():
    pipe = tiny_pipe("cuda", torch.bfloat16)
    pipe.load_lora_weights(random_lora(pipe.transformer, 4, seed=1), adapter_name="style")
    fast_path.optimize_pipeline(pipe)
    fast_path.warmup(pipe, [(96, 96)], steps=2)
    graphs = fast_path._compiled_graph_count()
    fast_path.warmup(pipe, [(160, 96), (96, 160)], steps=2)
    fast_path.warmup(pipe, [(96, 96)], steps=2)
    assert fast_path._compiled_graph_count() == graphs


def test_the_compile_settings_hold_a_graph_for_every_lora_state(tmp_path, request):
    # Setup warms up the repeated blocks in every LoRA rank bucket and with the adapter off, at
    # batch 1 and 2: with torch's default limit of 8 graphs per code, the default buckets' warm-up
    # would fail (fullgraph) on a GPU. optimize_pipeline raises the limit (process-wide).
    import torch.fx.experimental._config as fx_config

    from lora_loader import LoraManager
    from loras.cache import LoraCache
    from scripts.tiny_weights import flux_transformer

    # optimize_pipeline sets both process-wide: put them back afterwards, by setattr (monkeypatch's
    # undo leaves a torch config module's setting hidden: "does not exist" for the next test).
    duck, limit = fx_config.use_duck_shape, torch._dynamo.config.recompile_limit
    request.addfinalizer(lambda: setattr(fx_config, "use_duck_shape", duck))
    request.addfinalizer(lambda: setattr(torch._dynamo.config, "recompile_limit", limit))
    torch._dynamo.config.recompile_limit = 8
    manager = LoraManager([flux_transformer(True, 0)], None, LoraCache(tmp_path, 0))  # the defaults
    states = sum(1 for _ in manager.compile_states(manager.transformers[0]))
    assert states == len(manager.buckets) + 1 and manager.buckets[-1] == 256
    pipe = tiny_pipe()
    fast_path.optimize_pipeline(pipe)  # on the CPU too: compiles lazily, nothing runs here
    assert torch._dynamo.config.recompile_limit >= 2 * states  # batch 1 and batch ≥ 2 in each
