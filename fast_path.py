"""GPU fast path for the FLUX pipelines: attention backend, regional torch.compile, optional fp8.

Called from the predictor's setup() on CUDA only; importing this module does nothing (torch is
imported, torchao is not). Measured at real scale on an H100 by bench/gpu_bench.py: bench/GPU.md.

Call order in setup() (the LoRA rules come from how torch.compile guards the PEFT layers):

    pipe = ... .to("cuda")                       # bf16 FluxPipeline
    prepare_lora_hotswap(pipe, max_rank=R)       # 1. before the first LoRA is loaded
    pipe.load_lora_weights(first, adapter_name=NAME)
                                                 # 2. before compiling: the compiled blocks must
                                                 #    already contain every LoRA layer a later
                                                 #    LoRA will use (a placeholder is fine)
    optimize_pipeline(pipe, fp8=...)             # 3. attention backend, fp8, compile (lazy)
    warmup(pipe, [(1024, 1024)])                 # 4. compiles now, not on the first request

Per request: `pipe.load_lora_weights(sd, adapter_name=NAME, hotswap=True)` (measured: no
recompile), and the strength either as `joint_attention_kwargs={"scale": s}` (s != 0; one scale
for all adapters) or per adapter by writing PEFT's scaling tensors in place,
`layer.scaling[NAME].fill_(s * base)` for every LoRA layer, `base` being the layer's value right
after the (hot)swap (checked on CPU: equal to `set_adapters` to 1e-7, s = 0 and s < 0 included,
no recompile). What does recompile a compiled transformer (each time its state changes):
`set_adapters(...)` (turns the scales back into floats), `disable_lora()`/`enable_lora()`,
`joint_attention_kwargs={"scale": 0}`, loading an adapter without `hotswap=True`, calling the
pipeline under torch.inference_mode in one place and not in another; a hotswapped LoRA that
targets a module the first one did not fails outright. Image sizes and prompt lengths do not
recompile (dynamic shapes; measured).
"""

from __future__ import annotations

import importlib.util
import logging
import time

import torch

logger = logging.getLogger(__name__)

# Attention backends to try, best first (diffusers `set_attention_backend` names). On an H100
# with torch 2.11 PyTorch's own SDPA choice ("native") measured fastest for FLUX's attention
# (1x24x4608x128 bf16: 0.46 ms, 568 TFLOP/s) ahead of diffusers' "_native_cudnn" (0.55 ms) and
# torch's built-in flash-attention-2 kernel ("_native_flash", 0.86 ms): bench/GPU.md. The
# flash-attn 2 package ("flash") is therefore not tried. Flash-attention 3 ("_flash_3") is used
# when its package is importable (not installed on the benchmark machine: not measured).
ATTENTION_BACKENDS: tuple[str, ...] = ("_flash_3", "native")

# Compile with symbolic shapes: one graph per block kind for every image size and prompt length.
# With static shapes each new aspect ratio recompiles both block kinds at request time.
DYNAMIC_SHAPES = True

# Compile the VAE decoder too, in channels_last (1024x1024 decode on an H100: 91 ms eager, 48 ms
# compiled channels_last; channels_last without compile is slower, 142 ms, so it goes with compile).
COMPILE_VAE_DECODER = True

# fp8 needs Ada/Hopper or newer (hardware float8 matrix units).
FP8_MIN_CAPABILITY = (8, 9)

# The transformer's repeated blocks; fp8 quantizes only the Linear layers inside them.
_BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


def prepare_lora_hotswap(pipe, max_rank: int) -> None:
    """Let LoRAs of any rank <= max_rank be swapped in later without recompiling.

    Must run before the first `load_lora_weights` (and therefore before `optimize_pipeline`):
    the first adapter's layers are then padded to `max_rank` and its scales kept as tensors.
    Every adapter runs at `max_rank` afterwards, so keep it as low as the LoRAs you serve allow.
    """
    pipe.enable_lora_hotswap(target_rank=int(max_rank))
    logger.info("LoRA hotswap enabled (max rank %d)", max_rank)


def optimize_pipeline(pipe, *, fp8: bool = False, compile: bool = True) -> None:
    """Speed up a bf16 FluxPipeline on CUDA in place; a logged no-op anywhere else.

    Lossless by default: the fastest attention kernel available, and torch.compile of the
    transformer's repeated blocks and of the (channels_last) VAE decoder. `fp8=True` also
    quantizes the blocks' Linear weights and activations to float8 (torchao, compute capability
    >= 8.9); that changes the images slightly and is opt-in only. Compilation itself happens on the first call
    of the pipeline: run `warmup` right after this.
    """
    device = next(pipe.transformer.parameters()).device
    if device.type != "cuda":
        logger.info("fast path skipped: transformer is on %s, not CUDA", device)
        return
    _optimize(pipe, fp8=fp8, compile=compile)


def _optimize(pipe, *, fp8: bool, compile: bool) -> None:
    """optimize_pipeline without the CUDA check (the benchmark's CPU self-test calls it)."""
    transformer = pipe.transformer
    device = next(transformer.parameters()).device
    enabled = []
    # Inference only. Parameters that require grad are guarded by torch.compile: flipping the flag
    # later (as PEFT does for an adapter it activates) would recompile.
    transformer.requires_grad_(False)
    pipe.vae.requires_grad_(False)

    backend = _set_attention_backend(transformer)
    enabled.append(f"attention={backend}")

    if fp8:
        reason = _fp8_unavailable_reason(device)
        if reason is None:
            count = _quantize_fp8(transformer)
            enabled.append(f"fp8 ({count} linear layers)")
        else:
            logger.warning("fp8 requested but not enabled: %s", reason)

    if compile:
        # Give every dynamic size its own symbol. By default equal sizes seen at the first compile
        # share one ("duck shaping"): a square warm-up then specialises the VAE to square images,
        # and every other aspect ratio recompiles it. (Process-wide, and only set when compiling.)
        import torch.fx.experimental._config as fx_config

        fx_config.use_duck_shape = False
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=DYNAMIC_SHAPES)
        enabled.append(f"compiled repeated blocks (dynamic={DYNAMIC_SHAPES})")
        if COMPILE_VAE_DECODER:
            pipe.vae.to(memory_format=torch.channels_last)
            pipe.vae.decoder.compile(dynamic=DYNAMIC_SHAPES)
            enabled.append("compiled channels_last vae decoder")

    logger.info("fast path: %s", ", ".join(enabled))


def warmup(pipe, sizes: list[tuple[int, int]], steps: int = 2, batch_sizes: tuple[int, ...] = (1, 2)) -> None:
    """Run tiny generations at each (width, height) so compilation happens now, in setup.

    Each size runs at every batch size given: torch.compile specialises a dimension of size 1,
    so a batch of 1 alone would leave `num_outputs` 2–4 to compile on a user's request (measured
    on an H100: 77 s). A batch of 2 compiles the graph with a symbolic batch that serves 2–4.

    With dynamic shapes the first size compiles graphs that serve every size and prompt length;
    the others only check that (each new compiled graph is logged). Call the pipeline in predict
    the way this does, plainly: under torch.inference_mode the compiled graphs would not match.
    """
    if not sizes:
        return
    transformer = pipe.transformer
    device = next(transformer.parameters()).device
    dtype = transformer.dtype
    config = transformer.config
    for (width, height), batch in ((size, batch) for size in sizes for batch in batch_sizes):
        start = time.perf_counter()
        graphs_before = _compiled_graph_count()
        kwargs = {}
        if getattr(pipe, "text_encoder_2", None) is None or getattr(pipe, "tokenizer_2", None) is None:
            # A pipeline without text encoders (benchmarks): random embeddings of the real shapes.
            generator = torch.Generator(device).manual_seed(0)
            kwargs["prompt_embeds"] = torch.randn(
                1, 512, config.joint_attention_dim, generator=generator, device=device, dtype=dtype
            )
            kwargs["pooled_prompt_embeds"] = torch.randn(
                1, config.pooled_projection_dim, generator=generator, device=device, dtype=dtype
            )
        else:
            kwargs["prompt"] = "warm-up"
        # Plain call, as in predict (the pipeline applies torch.no_grad itself). Not under
        # torch.inference_mode: that flag is part of what a compiled graph is specialised on.
        pipe(
            **kwargs,
            width=width,
            height=height,
            num_images_per_prompt=batch,
            num_inference_steps=steps,
            generator=torch.Generator(device).manual_seed(0),
            output_type="pil",
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        logger.info(
            "warm-up %dx%d ×%d, %d steps: %.1f s, %d new compiled graphs",
            width,
            height,
            batch,
            steps,
            time.perf_counter() - start,
            _compiled_graph_count() - graphs_before,
        )


def _compiled_graph_count() -> int:
    """Graphs torch.compile has produced in this process (a growing count means recompiles)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _backend_importable(name: str) -> bool:
    if name == "_flash_3":
        return importlib.util.find_spec("flash_attn_interface") is not None
    if name == "flash":
        return importlib.util.find_spec("flash_attn") is not None
    return True


def _set_attention_backend(transformer) -> str:
    for name in ATTENTION_BACKENDS:
        if not _backend_importable(name):
            continue
        try:
            transformer.set_attention_backend(name)
        except (RuntimeError, ValueError) as error:  # package too old, unknown name
            logger.info("attention backend %s unavailable: %s", name, error)
            continue
        return name
    return "default"


def _fp8_unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"device is {device.type}, not CUDA"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        return f"compute capability {capability} < {FP8_MIN_CAPABILITY}"
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed"
    return None


def _is_block_linear(module: torch.nn.Module, fqn: str) -> bool:
    """Linear layers of the repeated blocks, but never LoRA adapter weights (kept bf16, hotswapped)."""
    return isinstance(module, torch.nn.Linear) and fqn.startswith(_BLOCK_PREFIXES) and ".lora_" not in fqn


def _quantize_fp8(transformer) -> int:
    """Dynamic float8 (per-row scales) for the blocks' Linear layers; returns how many."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    count = sum(1 for fqn, module in transformer.named_modules() if _is_block_linear(module, fqn))
    # set_inductor_config=False: torchao would otherwise switch on process-wide inductor tuning
    # (coordinate descent) that made each compiled block take about 100 s to build on an H100.
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(transformer, config, filter_fn=_is_block_linear)
    return count
