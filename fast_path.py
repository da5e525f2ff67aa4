"""GPU fast path for the FLUX pipelines: attention backend, regional torch.compile, optional fp8,
and a compile cache kept across restarts.

Called from the predictor's setup() on CUDA only; importing this module does nothing (torch is
imported, torchao is not). Measured at real scale on an H100 by bench/gpu_bench.py: bench/GPU.md.

Call order in setup() (Predictor.compile → pipelines.FluxModels.optimize):

    LoraManager(transformers, ...)               # 1. before compiling: a fixed-rank PEFT LoRA adapter
                                                 #    in every Linear (lora_loader.py), so the compiled
                                                 #    graphs already contain every LoRA layer
    with compile_cache(dir, key):                # 2. if given a directory: load the graphs a previous
                                                 #    start saved; on exit save them (FluxModels.optimize)
        for each transformer (dev, schnell):
            optimize_pipeline(pipe, fp8=...)     # 3. attention backend, fp8, compile (lazy)
            for _ in loras.compile_states(transformer):   # adapter on in each rank bucket, then off
                warmup(pipe, sizes)              # 4. compiles now, not on the first request

Per request, `LoraManager.apply` copies A and scale·B into the adapter's weights in place, and
shows PEFT's layers the span of ranks in use, one of a few lengths (rank buckets, 16 to 256 by
default: `lora_loader.RANK_BUCKETS`): a request with a rank-16 LoRA multiplies through 16 ranks,
not the adapter's 256. A parameter's shape is part of what a graph is specialised on, so each
bucket is a graph of its own, compiled in the warm-up; the span's position and the values are not
(tests/test_no_recompile.py checks that no request recompiles, on the eager and inductor backends).
What does recompile a compiled transformer (each time its state changes; measured): switching the
PEFT adapters on or off (a graph per state, hence a warm-up in each of `compile_states`);
`set_adapters(...)` (it turns PEFT's scales into Python floats the graph is specialised on) and
`joint_attention_kwargs={"scale": 0}`, neither of which LoraManager uses (the scale is multiplied
into B); flipping `requires_grad` on parameters (hence `requires_grad_(False)` before compiling);
calling the pipeline under torch.inference_mode in one place and not in another. Image sizes and
prompt lengths do not recompile (dynamic shapes; measured).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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

# torch.compile's graphs per compiled code object (torch's default: 8; past it a fullgraph compile
# fails). The repeated blocks need one per LoRA rank bucket and one with the adapter off, each at
# batch 1 and batch ≥ 2 (dev and schnell share them): 14 with the default 6 buckets.
RECOMPILE_LIMIT = 64

# fp8 needs Ada/Hopper or newer (hardware float8 matrix units).
FP8_MIN_CAPABILITY = (8, 9)

# The transformer's repeated blocks; fp8 quantizes only the Linear layers inside them.
_BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


def optimize_pipeline(pipe, *, fp8: bool = False) -> None:
    """Speed up a bf16 FluxPipeline on CUDA in place (setup() calls it on CUDA only).

    Lossless by default: the fastest attention kernel available, and torch.compile of the
    transformer's repeated blocks and of the (channels_last) VAE decoder. `fp8=True` also
    quantizes the blocks' Linear weights and activations to float8 (torchao, compute capability
    >= 8.9); that changes the images slightly and is opt-in only. Compilation itself happens on the
    first call of the pipeline: run `warmup` right after this.
    """
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

    # Give every dynamic size its own symbol. By default equal sizes seen at the first compile
    # share one ("duck shaping"): a square warm-up then specialises the VAE to square images, and
    # every other aspect ratio recompiles it. (Process-wide, and only set when compiling.)
    import torch.fx.experimental._config as fx_config

    fx_config.use_duck_shape = False
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
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


# ---------------------------------------------------------------- compile cache across restarts


def compile_cache_key(
    device: torch.device | str,
    fp8: bool,
    *,
    warmup_sizes: list[tuple[int, int]] = (),
    transformers: dict[str, torch.nn.Module] | None = None,
    adapter: str = "",
) -> str:
    """A file name (no extension) for the compile cache of this software, GPU and configuration: the
    one place its key is built.

    Readable head (torch version, `sm90` or `cpu`, `fp8`/`bf16`) and a hash of everything that
    shapes the compiled graphs: torch, CUDA, triton, diffusers, peft and torchao versions, the
    GPU's name and compute capability, this module's compile settings, the warm-up sizes, the
    transformers' architectures (their configs) and `adapter` (the LoRA adapter's shape,
    `LoraManager.adapter_shape`). Torch keys each cached graph by its own content as well, so a
    stale entry is a cache miss, never a wrong graph; the key keeps one file per configuration so
    that configurations do not overwrite each other's graphs.
    """
    # The architecture only: diffusers' own config entries ("_name_or_path", ...) start with "_".
    configs = {
        name: {k: v for k, v in transformer.config.items() if not k.startswith("_")}
        for name, transformer in (transformers or {}).items()
    }
    extra = "\n".join(
        [
            adapter,
            f"warmup_sizes={list(warmup_sizes)}",
            f"transformers={json.dumps(configs, sort_keys=True, default=str)}",
        ]
    )
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        hardware = f"sm{major}{minor}"
        details = [torch.cuda.get_device_name(device), f"capability {major}.{minor}", f"cuda {torch.version.cuda}"]
    else:
        hardware, details = device.type, []
    versions = [f"{name} {_version(name)}" for name in ("triton", "diffusers", "peft", "torchao")]
    settings = [f"dynamic={DYNAMIC_SHAPES}", f"vae_decoder={COMPILE_VAE_DECODER}", f"attention={ATTENTION_BACKENDS}"]
    everything = "\n".join([f"torch {torch.__version__}", *details, f"fp8={bool(fp8)}", *versions, *settings, extra])
    digest = hashlib.sha256(everything.encode()).hexdigest()[:16]
    head = f"torch{torch.__version__}-{hardware}-{'fp8' if fp8 else 'bf16'}"
    return f"{re.sub(r'[^A-Za-z0-9._]+', '-', head)}-{digest}"


@contextmanager
def compile_cache(directory: Path | str, key: str) -> Iterator[None]:
    """Keep what torch.compile builds inside the block in `<directory>/<key>.bin` across restarts.

    On entry, loads that file if there is one (PyTorch's "Mega-Cache",
    `torch.compiler.load_cache_artifacts`): it fills inductor's and AOTAutograd's local caches, so
    the compilations in the block find their graphs (and on CUDA the Triton kernels) instead of
    building them. Dynamo still traces the code: a restart saves the code generation and kernel
    compiles, not the tracing. A file that cannot be read is logged as a warning and ignored: the
    block then compiles from scratch. On a normal exit, saves everything torch.compile has built
    or found in this process (`torch.compiler.save_cache_artifacts`) to the file, atomically (a
    temporary file in the same directory, then os.replace), unless all of it came from the file
    already; a directory that cannot be written is a warning. After an exception nothing is
    saved. What was loaded and saved is logged.

    `pipelines.FluxModels.optimize(cache_dir=...)` puts its compile and warm-up in this; the
    predictor wires it (a directory in the weights tree, switched off by FLUX_COMPILE_CACHE=0).
    """
    path = Path(directory) / f"{key}.bin"
    loaded = _load_cache(path)
    yield
    _save_cache(path, loaded)


def _load_cache(path: Path) -> set[tuple[str, str]]:
    """Load `path` into torch's caches; returns the (kind, key) of each artifact loaded."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        logger.info("compile cache: no %s yet; compiling from scratch", path)
        return set()
    except OSError as error:
        logger.warning("compile cache: cannot read %s (%s); compiling from scratch", path, error)
        return set()
    try:
        info = torch.compiler.load_cache_artifacts(data)  # None when the bytes do not deserialize
    except Exception as error:  # noqa: BLE001 - a bad cache must never fail setup
        logger.warning("compile cache: %s not loaded (%r); compiling from scratch", path, error)
        return set()
    if info is None:
        logger.warning("compile cache: %s is not a readable cache file; compiling from scratch", path)
        return set()
    logger.info(
        "compile cache: loaded %s from %s (%.1f MB)",
        ", ".join(f"{len(keys)} {kind}" for kind, keys in info.artifacts.items()) or "nothing",
        path,
        len(data) / 1e6,
    )
    return _artifact_keys(info)


def _save_cache(path: Path, loaded: set[tuple[str, str]]) -> None:
    try:
        saved = torch.compiler.save_cache_artifacts()  # (bytes, CacheInfo), None if nothing was compiled
    except Exception as error:  # noqa: BLE001 - the cache must never fail setup
        logger.warning("compile cache: nothing saved (%r); going on without it", error)
        return
    if saved is None:
        logger.info("compile cache: nothing compiled, nothing to save")
        return
    data, info = saved
    if _artifact_keys(info) <= loaded:  # every graph came from the file: rewriting it would change nothing
        logger.info("compile cache: %s is up to date", path)
        return
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
            temporary = Path(f.name)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as error:
        logger.warning("compile cache: cannot save %s (%s); going on without it", path, error)
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        return
    logger.info(
        "compile cache: saved %s (%.1f MB) to %s",
        ", ".join(f"{len(keys)} {kind}" for kind, keys in info.artifacts.items()),
        len(data) / 1e6,
        path,
    )


def _artifact_keys(info) -> set[tuple[str, str]]:
    """(kind, key) of each artifact a torch.compiler CacheInfo lists."""
    return {(kind, key) for kind, keys in info.artifacts.items() for key in keys}


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _compiled_graph_count() -> int:
    """Graphs torch.compile has produced in this process (a growing count means recompiles)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _backend_importable(name: str) -> bool:
    if name == "_flash_3":
        return importlib.util.find_spec("flash_attn_interface") is not None
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
    """Linear layers of the repeated blocks, but never LoRA adapter weights (kept bf16, rewritten per request)."""
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
