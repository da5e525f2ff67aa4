"""Real-scale GPU benchmark of the FLUX fast path (fast_path.py), with random weights.

No download happens: every model is built in code at FLUX.1's real size, straight on the GPU in
bf16 (transformer 11.9 B parameters: 19 double + 38 single blocks, 24 heads x 128; the 16-channel
VAE). Text encoding uses random prompt embeddings of the real shapes (T5-XXL 512 tokens for dev,
256 for schnell; CLIP-L pooled 768); a random full-size T5-XXL and CLIP-L are timed separately.
Random weights do the same arithmetic as real ones, so timings carry over; pictures do not.

Cases at 1024x1024 (dev 28 steps, schnell 4): (a) diffusers eager bf16, (b) fast_path bf16
(attention backend + regional compile, lossless), (c) fast_path with fp8. LoRAs go through the
product's own code, as predict.py runs it: before compiling, `lora_loader.LoraManager` injects ONE
fixed-rank PEFT adapter into every Linear layer, its ranks split into a "main" region (the
deployment's rank-16 LoRA, rounded up to 8) and an "extra" region of `--max-rank` (LORA_MAX_RANK);
each request's `LoraManager.apply` copies A and scale·B into the regions in place. The LoRAs are
random, on the attention projections, written as diffusers/PEFT safetensors files to a temporary
folder (the main one is passed as `main=`, the extras as local-path sources). The fast cases warm
up like `pipelines.FluxModels.optimize` (`fast_path.warmup` in each of `compile_states`: adapter
on, then off) and then serve requests with extra LoRAs of rank 8 and `--max-rank`, lora_scale
changes and no LoRA at all, counting the torch.compile graphs each one adds (all should be 0).
Every case records seconds per image with the main LoRA only (the headline), main + extra, and the
adapter off: `apply(transformer, 0.0, None, ...)` disables the adapter, and a disabled PEFT layer
calls its base Linear and nothing else, so that state computes exactly the base model (eager (a)
off = FLUX with no adapter, give or take PEFT's Python wrapper per layer; a second 12 B copy
without the adapter would not fit the budget of one GPU).

    python bench/gpu_bench.py --out $OUT/gpu_bench.json          # on the GPU machine (bench/GPU.md)
    python bench/gpu_bench.py --tiny --device cpu --size 96 --other-sizes 160x96 --sections \
        --warmup-batches 1 --out /tmp/b.json                     # CPU self-test of the script
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fast_path  # noqa: E402

logger = logging.getLogger("gpu_bench")

# FLUX.1 real configs (transformer/config.json and vae/config.json of black-forest-labs/FLUX.1-dev).
FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    axes_dims_rope=[16, 56, 56],
)
FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256)
SCHNELL_SCHEDULER = dict(shift=1.0, use_dynamic_shifting=False)
# --tiny: the same code on a model small enough for a CPU (FACTS.md's tiny FLUX).
TINY_TRANSFORMER = dict(
    FLUX_TRANSFORMER,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=[4, 4, 8],
)
TINY_VAE = dict(FLUX_VAE, block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4)

# LoRA targets: the attention projections of both block kinds.
LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.tiny = args.tiny
        self.start = time.perf_counter()
        self.results = {"args": vars(args), "env": {}, "cases": [], "skipped": []}
        self.out = Path(args.out)
        self.size = args.size
        self.text_len = {"dev": 77 if self.tiny else 512, "schnell": 40 if self.tiny else 256}
        self.steps = {"dev": args.dev_steps, "schnell": args.schnell_steps}

    # ---------------------------------------------------------------- helpers
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=2, default=str))

    def time_left(self, need_s: float, what: str) -> bool:
        if self.elapsed() + need_s > self.args.budget_s:
            logger.warning("skipping %s: time budget (%.0f s used)", what, self.elapsed())
            self.results["skipped"].append(f"{what}: time budget ({self.elapsed():.0f} s used)")
            self.save()
            return False
        return True

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def peak_gb(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def build(self, cls, **config):
        """A model built directly on the device in bf16 (no fp32 copy: 24 GB, not 48, for FLUX)."""
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with self.device:
                model = cls(**config)
        finally:
            torch.set_default_dtype(previous)
        return model.eval().requires_grad_(False)

    def gpu_timer(self, fn, iters: int) -> float:
        """Median milliseconds of fn() over iters calls, after two warm-up calls."""
        fn()
        fn()
        times = []
        for _ in range(iters):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t0) * 1000)
        return statistics.median(times)

    # ---------------------------------------------------------------- sections
    def env(self) -> None:
        import diffusers
        import peft

        env = {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "peft": peft.__version__,
            "cuda": torch.version.cuda,
        }
        try:
            import torchao

            env["torchao"] = torchao.__version__
        except Exception as error:  # noqa: BLE001 - report whatever stops it importing
            env["torchao"] = f"unavailable: {error}"
        if self.cuda:
            env["gpu"] = torch.cuda.get_device_name()
            env["capability"] = torch.cuda.get_device_capability()
            env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            env["cudnn"] = torch.backends.cudnn.version()
        self.results["env"] = env
        logger.info("env: %s", env)
        self.save()

    def attention(self) -> None:
        """One attention call of FLUX at the benchmark size, per backend, eager and compiled."""
        from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

        heads, dim = (2, 16) if self.tiny else (24, 128)
        seq = (self.size // 16) ** 2 + self.text_len["dev"]
        q, k, v = (torch.randn(1, seq, heads, dim, device=self.device, dtype=torch.bfloat16) for _ in range(3))
        reference = dispatch_attention_fn(q, k, v, backend=AttentionBackendName("_native_math")).float()
        flops = 4 * seq * seq * dim * heads
        table = {}
        for name in ("native", "_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3"):
            if not fast_path._backend_importable(name):
                table[name] = "not installed"
                continue
            backend = AttentionBackendName(name)
            try:

                def call(b=backend):
                    return dispatch_attention_fn(q, k, v, backend=b)

                error = (call().float() - reference).norm() / reference.norm()
                eager_ms = self.gpu_timer(call, 10)
                compiled = torch.compile(call, fullgraph=True, dynamic=True)
                compiled_ms = self.gpu_timer(compiled, 10)
                table[name] = {
                    "eager_ms": round(eager_ms, 3),
                    "compiled_ms": round(compiled_ms, 3),
                    "tflops": round(flops / eager_ms / 1e9, 1),
                    "rel_err_vs_math": float(error),
                }
            except Exception as error:  # noqa: BLE001 - a backend that fails is a result
                table[name] = f"failed: {type(error).__name__}: {str(error)[:200]}"
            logger.info("attention %s: %s", name, table[name])
        self.results["attention"] = {"seq": seq, "heads": heads, "head_dim": dim, "backends": table}
        usable = [
            n
            for n in fast_path.ATTENTION_BACKENDS
            if isinstance(table.get(n), dict) and table[n]["rel_err_vs_math"] < 2e-2
        ]
        if self.args.pick_attention and usable:
            best = min(usable, key=lambda n: table[n]["compiled_ms"])
            fast_path.ATTENTION_BACKENDS = (best,)
            self.results["attention"]["picked"] = best
            logger.info("attention backend for the compiled cases: %s", best)
        self.save()

    def vae(self) -> None:
        """The VAE decode of one 1024x1024 image: eager, channels_last, channels_last + compile."""
        from diffusers import AutoencoderKL

        vae = self.build(AutoencoderKL, **(TINY_VAE if self.tiny else FLUX_VAE))
        latents = torch.randn(1, 16, self.size // 8, self.size // 8, device=self.device, dtype=torch.bfloat16)
        out = {}
        with torch.no_grad():
            out["eager_ms"] = round(self.gpu_timer(lambda: vae.decode(latents).sample, 5), 2)
            vae.to(memory_format=torch.channels_last)
            out["channels_last_ms"] = round(self.gpu_timer(lambda: vae.decode(latents).sample, 5), 2)
            t0 = time.perf_counter()
            vae.decoder.compile(dynamic=fast_path.DYNAMIC_SHAPES)
            vae.decode(latents)
            self.sync()
            out["compile_s"] = round(time.perf_counter() - t0, 1)
            out["channels_last_compiled_ms"] = round(self.gpu_timer(lambda: vae.decode(latents).sample, 5), 2)
        self.results["vae"] = out
        logger.info("vae decode %dx%d: %s", self.size, self.size, out)
        vae = None  # free it (a del would confuse the closures above for linters)
        self.free()
        self.save()

    def text_encoders(self) -> None:
        """Random full-size T5-XXL (512 tokens) and CLIP-L (77 tokens): build and encode times."""
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        out = {}
        t5_config = T5Config(
            vocab_size=32128,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=24,
            num_heads=64,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
            tie_word_embeddings=False,
        )
        clip_config = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            max_position_embeddings=77,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
        for name, cls, config, length in (
            ("t5_xxl", T5EncoderModel, t5_config, 512),
            ("clip_l", CLIPTextModel, clip_config, 77),
        ):
            t0 = time.perf_counter()
            model = self.build(cls, config=config)
            self.sync()
            build_s = time.perf_counter() - t0
            ids = torch.randint(0, config.vocab_size, (1, length), device=self.device)
            with torch.inference_mode():
                ms = self.gpu_timer(lambda m=model, i=ids: m(input_ids=i)[0], 10)
            params = sum(p.numel() for p in model.parameters())
            out[name] = {"params_b": round(params / 1e9, 3), "build_s": round(build_s, 1), "encode_ms": round(ms, 2)}
            logger.info("%s: %s", name, out[name])
            del model
            self.free()
        self.results["text_encoders"] = out
        self.save()

    # ---------------------------------------------------------------- pipelines
    def make_pipe(self, kind: str):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        t0 = time.perf_counter()
        config = dict(TINY_TRANSFORMER if self.tiny else FLUX_TRANSFORMER, guidance_embeds=kind == "dev")
        transformer = self.build(FluxTransformer2DModel, **config)
        vae = self.build(AutoencoderKL, **(TINY_VAE if self.tiny else FLUX_VAE))
        scheduler = FlowMatchEulerDiscreteScheduler(**(DEV_SCHEDULER if kind == "dev" else SCHNELL_SCHEDULER))
        pipe = FluxPipeline(
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
        )
        pipe.set_progress_bar_config(disable=True)
        self.sync()
        params = sum(p.numel() for p in transformer.parameters())
        info = {"build_s": round(time.perf_counter() - t0, 1), "transformer_params_b": round(params / 1e9, 3)}
        logger.info("%s pipeline built: %s", kind, info)
        return pipe, info

    def lora(self, transformer, rank: int, seed: int) -> dict[str, torch.Tensor]:
        """A random LoRA in diffusers/PEFT keys on the attention projections."""
        generator = torch.Generator(self.device).manual_seed(seed)
        state = {}
        for name, module in transformer.named_modules():
            if not name.endswith(LORA_TARGETS) or ".lora_" in name or ".base_layer" in name:
                continue
            base = getattr(module, "base_layer", module)
            if not isinstance(base, torch.nn.Linear):
                continue
            kw = dict(generator=generator, device=self.device, dtype=torch.bfloat16)
            a = torch.randn(rank, base.in_features, **kw) / base.in_features**0.5
            b = torch.randn(base.out_features, rank, **kw) * 0.02
            state[f"transformer.{name}.lora_A.weight"] = a
            state[f"transformer.{name}.lora_B.weight"] = b
        return state

    def embeds(self, pipe, kind: str):
        config = pipe.transformer.config
        generator = torch.Generator(self.device).manual_seed(1)
        kw = dict(generator=generator, device=self.device, dtype=torch.bfloat16)
        prompt = torch.randn(1, self.text_len[kind], config.joint_attention_dim, **kw) * 0.2
        pooled = torch.randn(1, config.pooled_projection_dim, **kw)
        return prompt, pooled

    def generate(self, pipe, kind: str, width: int | None = None, height: int | None = None, **kwargs):
        prompt, pooled = self.embeds(pipe, kind)
        self.sync()
        t0 = time.perf_counter()
        # Called like the predictor calls it: the pipeline runs under torch.no_grad() by itself.
        # (Not torch.inference_mode(): the warm-up does not use it either, and a compiled block
        # recompiles when the "inference tensor" flag of an input changes.)
        image = pipe(
            prompt_embeds=prompt,
            pooled_prompt_embeds=pooled,
            width=width or self.size,
            height=height or self.size,
            num_inference_steps=self.steps[kind],
            guidance_scale=3.5 if kind == "dev" else 0.0,
            generator=torch.Generator(self.device).manual_seed(42),
            output_type="pil",
            **kwargs,
        ).images[0]
        self.sync()
        return time.perf_counter() - t0, image

    def one_step_latents(self, pipe, kind: str) -> torch.Tensor:
        """Packed latents after one denoising step: the numerical check of compile and fp8."""
        prompt, pooled = self.embeds(pipe, kind)
        latents = pipe(
            prompt_embeds=prompt,
            pooled_prompt_embeds=pooled,
            width=self.size,
            height=self.size,
            num_inference_steps=1,
            guidance_scale=3.5 if kind == "dev" else 0.0,
            generator=torch.Generator(self.device).manual_seed(42),
            output_type="latent",
        ).images
        return latents.float()

    @staticmethod
    def image_diff(a, b) -> dict:
        import numpy as np

        x = np.asarray(a, dtype=np.int16)
        y = np.asarray(b, dtype=np.int16)
        d = np.abs(x - y)
        return {"mean_abs_levels": round(float(d.mean()), 3), "max_abs_levels": int(d.max())}

    def timed_runs(self, pipe, kind: str, runs: int, **kwargs) -> tuple[list[float], object]:
        times, image = [], None
        for _ in range(runs):
            seconds, image = self.generate(pipe, kind, **kwargs)
            times.append(round(seconds, 4))
        return times, image

    def write_lora(self, directory: Path, name: str, transformer, rank: int, seed: int) -> Path:
        """A random LoRA (diffusers/PEFT keys) written as a safetensors file, as a user would supply it."""
        from safetensors.torch import save_file

        path = directory / f"{name}.safetensors"
        state = self.lora(transformer, rank, seed)
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(path))
        return path

    def apply(self, manager, pipe, lora_scale: float, extra: Path | None, extra_scale: float = 1.0) -> float:
        """One request's `LoraManager.apply`, exactly as predict.py calls it; returns its seconds."""
        self.sync()
        t0 = time.perf_counter()
        manager.apply(pipe.transformer, lora_scale, None if extra is None else str(extra), extra_scale)
        self.sync()
        return round(time.perf_counter() - t0, 4)

    def run_model(self, kind: str) -> None:
        import tempfile

        from lora_loader import ADAPTER, RANK_BUCKETS, LoraManager
        from loras.cache import LoraCache

        args = self.args
        graphs = fast_path._compiled_graph_count
        if not self.time_left(60, f"{kind} (all cases)"):
            return
        pipe, info = self.make_pipe(kind)
        with tempfile.TemporaryDirectory(prefix="gpu_bench_loras_") as tmp:
            directory = Path(tmp)
            os.environ["LORA_LOCAL_DIR"] = str(directory)  # the extras are named by path, as a user's would be
            # The deployment's main LoRA (rank 16) and two extra LoRAs, as files like a user's.
            t0 = time.perf_counter()
            main = self.write_lora(directory, "main_r16", pipe.transformer, 16, seed=1)
            small = min(8, args.max_rank)
            extras = {
                "small": self.write_lora(directory, f"extra_r{small}", pipe.transformer, small, seed=2),
                "big": self.write_lora(directory, f"extra_r{args.max_rank}", pipe.transformer, args.max_rank, seed=3),
            }
            info["lora_files_s"] = round(time.perf_counter() - t0, 2)
            # Before compiling, as predict.py's setup(): one adapter (main region + extra region)
            # injected into every Linear layer of the transformer.
            self.sync()
            t0 = time.perf_counter()
            cache = LoraCache(directory, 1 << 40)
            buckets = RANK_BUCKETS if args.rank_buckets is None else tuple(args.rank_buckets)
            manager = LoraManager([pipe.transformer], None, cache, args.max_rank, main=main, rank_buckets=buckets)
            if args.peft_forward:  # the design before: PEFT's own forward, not lora_loader's in-place add
                for layer in manager.adapter_layers(pipe.transformer).values():
                    layer.lora_variant.pop(ADAPTER)
            self.sync()
            adapter_params = sum(p.numel() for n, p in pipe.transformer.named_parameters() if ".lora_" in n)
            info.update(
                lora_manager_s=round(time.perf_counter() - t0, 2),
                adapter_rank=manager.rank,
                adapter_regions={r: len(manager.regions[r]) for r in manager.regions},
                rank_buckets=list(manager.buckets),
                peft_forward=args.peft_forward,
                adapter_layers=sum(1 for n, _ in pipe.transformer.named_modules() if n.endswith(".lora_A")),
                adapter_params_m=round(adapter_params / 1e6, 1),
            )
            logger.info("LoRA adapter: %s", info)
            self.run_cases(kind, pipe, manager, extras, info, graphs)
            manager = None
        pipe = None
        self.free()

    def run_cases(self, kind, pipe, manager, extras, info, graphs) -> None:
        args = self.args
        steps = self.steps[kind]
        big = extras["big"]

        # (a) eager bf16, the same adapter: main LoRA only (the reference), main + extra, adapter off
        self.reset_peak()
        main_apply_s = self.apply(manager, pipe, 1.0, None)
        self.generate(pipe, kind)  # warm-up: cuBLAS/cuDNN handles, allocator
        times, eager_image = self.timed_runs(pipe, kind, args.eager_runs)
        reference = self.one_step_latents(pipe, kind)
        eager = {"main_apply_s": main_apply_s, "ranks_per_step": {"main": manager.ranks_in_use(pipe.transformer)}}
        eager["main_extra_apply_s"] = self.apply(manager, pipe, 1.0, big)  # includes reading the file
        eager["ranks_per_step"]["main_extra"] = manager.ranks_in_use(pipe.transformer)
        eager["main_extra_runs_s"], _ = self.timed_runs(pipe, kind, args.lora_runs)
        eager["off_apply_s"] = self.apply(manager, pipe, 0.0, None)
        eager["off_runs_s"], _ = self.timed_runs(pipe, kind, args.lora_runs)
        self.add_case(
            kind,
            "a_eager_bf16",
            steps,
            times,
            info=info,
            adapter_rank=manager.rank,
            lora=eager,
            lora_s=self.lora_summary(times, eager["main_extra_runs_s"], eager["off_runs_s"]),
            peak_gb=self.peak_gb(),
        )
        self.free()

        variants = [("b_fast_bf16", False)]
        if not args.no_fp8:
            variants.append(("c_fast_fp8", True))
        for name, fp8 in variants:
            if f"{kind}:{name}" in args.skip:
                self.results["skipped"].append(f"{kind}:{name}: --skip")
                continue
            if not self.time_left(args.case_budget_s, f"{kind} {name}"):
                break
            try:
                self.fast_case(pipe, kind, name, fp8, eager_image, reference, manager, extras, graphs)
            except Exception as error:  # noqa: BLE001 - record it, then go on with the next case
                logger.exception("%s %s failed", kind, name)
                manager.reset()
                self.add_case(kind, name, steps, [], error=f"{type(error).__name__}: {str(error)[:500]}")

    @staticmethod
    def lora_summary(main_runs, main_extra_runs, off_runs) -> dict:
        """Mean seconds per generation: main LoRA only, main + extra LoRA, adapter off (= the base model)."""

        def mean(runs):
            return round(statistics.mean(runs), 4) if runs else None

        return {"main": mean(main_runs), "main_extra": mean(main_extra_runs), "off": mean(off_runs)}

    def fast_case(self, pipe, kind, name, fp8, eager_image, reference, manager, extras, graphs) -> None:
        args = self.args
        steps = self.steps[kind]
        torch._dynamo.reset()  # a clean compile per case (inductor's on-disk cache stays warm)
        manager.reset()
        self.reset_peak()
        t0 = time.perf_counter()
        fast_path.optimize_pipeline(pipe, fp8=fp8)
        optimize_s = time.perf_counter() - t0
        # Warm-up as pipelines.FluxModels.optimize does it: once per adapter state (on, then off).
        g0 = graphs()
        warmups = []
        for _ in manager.compile_states(pipe.transformer):
            t_state, g_state = time.perf_counter(), graphs()
            fast_path.warmup(pipe, [(self.size, self.size)], steps=2, batch_sizes=tuple(args.warmup_batches))
            warmups.append({"s": round(time.perf_counter() - t_state, 1), "new_graphs": graphs() - g_state})
        cold_s = time.perf_counter() - t0
        graphs_first = graphs() - g0

        # The first request's state: the main LoRA at its own scale (as the eager reference).
        main_apply_s = self.apply(manager, pipe, 1.0, None)

        # other sizes and the other text length: should need no new graphs (dynamic shapes)
        g1 = graphs()
        t1 = time.perf_counter()
        other_sizes = [(s[0], s[1]) for s in args.other_sizes]
        for width, height in other_sizes:
            self.generate(pipe, kind, width=width, height=height)
        other_s = time.perf_counter() - t1
        recompiles_sizes = graphs() - g1

        g2 = graphs()
        self.generate(pipe, kind)  # one more warm run at the timed size
        times, image = self.timed_runs(pipe, kind, args.runs)
        rel_err = float((self.one_step_latents(pipe, kind) - reference).norm() / reference.norm())
        recompiles_timed = graphs() - g2
        peak = self.peak_gb()

        # Requests changing the LoRAs, as predict.py applies them: extra LoRAs of other ranks, a
        # lora_scale change, no LoRA at all (adapter off) and back. None may compile a new graph.
        small, big = extras["small"], extras["big"]
        plan = [  # (label, lora_scale, extra LoRA file, extra_lora_scale); "main+extra" marks the big one at 1.0
            ("main+extra small", 1.0, small, 1.0),
            ("main+extra", 1.0, big, 1.0),
            ("main 0.7, extra 0.8", 0.7, big, 0.8),
            ("main, extra small 0.8", 1.0, small, 0.8),
            ("off", 0.0, None, 1.0),  # lora_scale 0 and no extra: adapter disabled, the base model
            ("main+extra", 1.0, big, 1.0),
            ("main", 1.0, None, 1.0),
        ]
        requests = []
        for label, lora_scale, extra, extra_scale in plan:
            g = graphs()
            apply_s = self.apply(manager, pipe, lora_scale, extra, extra_scale)
            runs, _ = self.timed_runs(pipe, kind, args.lora_runs)
            requests.append(
                {
                    "request": label,
                    "lora_scale": lora_scale,
                    "extra": None if extra is None else extra.name,
                    "extra_scale": extra_scale,
                    "apply_s": apply_s,
                    "ranks_per_step": manager.ranks_in_use(pipe.transformer),
                    "runs_s": runs,
                    "new_graphs": graphs() - g,
                }
            )
        main_extra = [t for r in requests if r["request"] == "main+extra" for t in r["runs_s"]]
        off = [t for r in requests if r["request"] == "off" for t in r["runs_s"]]
        self.add_case(
            kind,
            name,
            steps,
            times,
            adapter_rank=manager.rank,
            lora_s=self.lora_summary(times, main_extra, off),
            optimize_s=round(optimize_s, 1),
            cold_start_s=round(cold_s, 1),
            warmup_states=warmups,
            graphs_first_warmup=graphs_first,
            main_apply_s=main_apply_s,
            other_sizes=other_sizes,
            other_sizes_s=round(other_s, 1),
            recompiles_other_sizes=recompiles_sizes,
            recompiles_timed=recompiles_timed,
            requests=requests,
            recompiles_requests=sum(r["new_graphs"] for r in requests),
            rel_err_1step_latents_vs_eager=rel_err,
            image_vs_eager=self.image_diff(image, eager_image),
            peak_gb=peak,
            attention=fast_path.ATTENTION_BACKENDS,
        )

    def add_case(self, kind, name, steps, times, **extra) -> None:
        case = {"model": kind, "variant": name, "steps": steps, "size": self.size, "runs_s": times}
        if times:
            case["mean_s"] = round(statistics.mean(times), 4)
        case.update(extra)
        self.results["cases"].append(case)
        logger.info("case %s", json.dumps(case, default=str))
        self.save()

    def table(self) -> str:
        lines = [
            "| model | variant | steps | adapter rank | mean s (main LoRA) | main+extra s | adapter off s "
            "| cold start s | new graphs (sizes/timed/LoRA requests) | peak GB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in self.results["cases"]:
            rec = "-"
            if "recompiles_timed" in c:
                rec = f"{c['recompiles_other_sizes']}/{c['recompiles_timed']}/{c['recompiles_requests']}"
            mean = c.get("mean_s", c.get("error", "?"))
            lora = c.get("lora_s", {})
            lines.append(
                f"| {c['model']} | {c['variant']} | {c['steps']} | {c.get('adapter_rank', '-')} | {mean} "
                f"| {lora.get('main_extra', '-')} | {lora.get('off', '-')} | {c.get('cold_start_s', '-')} "
                f"| {rec} | {c.get('peak_gb')} |"
            )
        return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON results path (use $OUT on the GPU machine)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models: a CPU self-test of this script")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--dev-steps", type=int, default=28)
    parser.add_argument("--schnell-steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per fast case")
    parser.add_argument("--eager-runs", type=int, default=2, help="timed runs of the eager baseline")
    parser.add_argument(
        "--max-rank",
        type=int,
        default=128,
        help="LoraManager max_rank: the extra region's ranks (the product's LORA_MAX_RANK, default 128); "
        "the adapter's rank is this + 16 (the main LoRA's region)",
    )
    parser.add_argument(
        "--rank-buckets",
        type=int,
        nargs="*",
        default=None,
        help="LoraManager rank_buckets (default lora_loader.RANK_BUCKETS; none given: every step through the "
        "adapter's full rank, the design before buckets)",
    )
    parser.add_argument(
        "--peft-forward", action="store_true", help="PEFT's own LoRA forward (the design before lora_loader's)"
    )
    parser.add_argument(
        "--lora-runs", type=int, default=1, help="timed runs per LoRA request (main+extra, off, ...) of every case"
    )
    parser.add_argument(
        "--warmup-batches",
        type=int,
        nargs="+",
        default=[1, 2],
        help="batch sizes of the warm-up in each adapter state (the predictor's: 1 2)",
    )
    parser.add_argument(
        "--other-sizes",
        type=lambda s: tuple(int(x) for x in s.split("x")),
        nargs="*",
        default=[(1344, 768)],
        help="WxH sizes run after warm-up to count recompiles",
    )
    parser.add_argument("--models", nargs="+", default=["dev", "schnell"], choices=["dev", "schnell"])
    parser.add_argument(
        "--sections", nargs="*", default=["attention", "vae", "text"], choices=["attention", "vae", "text"]
    )
    parser.add_argument("--no-fp8", action="store_true")
    parser.add_argument("--skip", nargs="*", default=[], help="MODEL:VARIANT cases to skip, e.g. schnell:b_fast_bf16")
    parser.add_argument("--pick-attention", action="store_true", help="use the fastest measured backend")
    parser.add_argument("--budget-s", type=float, default=560, help="stop starting new work after this")
    parser.add_argument("--case-budget-s", type=float, default=90, help="time a fast case needs at least")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    args = parse_args(argv)
    bench = Bench(args)
    if not bench.cuda:
        fast_path.ATTENTION_BACKENDS = ("native",)  # the fused kernels are CUDA-only
    bench.env()
    steps = [("attention", bench.attention, 0), ("vae", bench.vae, 60)]
    steps = [step for step in steps if step[0] in args.sections]
    steps += [(kind, lambda k=kind: bench.run_model(k), 0) for kind in args.models]
    if "text" in args.sections:
        steps.append(("text", bench.text_encoders, 40))
    for name, step, need_s in steps:
        if not bench.time_left(need_s, name):
            continue
        try:
            step()
        except Exception as error:  # noqa: BLE001 - keep what was measured, record what broke
            logger.exception("%s failed", name)
            bench.results.setdefault("errors", {})[name] = f"{type(error).__name__}: {str(error)[:500]}"
            bench.free()
    bench.results["total_s"] = round(bench.elapsed(), 1)
    bench.save()
    logger.info("results:\n%s", bench.table())
    print(json.dumps(bench.results.get("attention", {}), default=str))  # noqa: T201
    print(bench.table())  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
