"""Test helpers for LoRAs: a writer per file format with the ΔW each layer should get, the effective
weight of an adapted layer, and a local HTTP server imitating Replicate, Hugging Face and CivitAI.

The writers use their own table of BFL → diffusers module names (not lora_loader's), so a
mistake in the loader's table shows up as a wrong ΔW instead of being copied into the test.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from safetensors.torch import save, save_file

# ---------------------------------------------------------------- models and shapes


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """name → (out, in) of every Linear layer, whether or not LoRA slots were injected."""
    from peft.tuners.lora import LoraLayer

    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            shapes[name] = (m.out_features, m.in_features)
        elif isinstance(m, torch.nn.Linear) and not name.endswith("base_layer") and ".lora_" not in name:
            shapes[name] = (m.out_features, m.in_features)
    return shapes


def effective_weight(layer: torch.nn.Module) -> torch.Tensor:
    """What the layer computes, as one matrix: base weight + Σ active adapters' scaling·B·A."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(layer, LoraLayer):
        return layer.weight.detach().clone()
    weight = layer.get_base_layer().weight.detach().to(torch.float64).clone()
    if layer.disable_adapters:
        return weight
    for name in layer.active_adapters:
        a = layer.lora_A[name].weight.detach().to(torch.float64)
        b = layer.lora_B[name].weight.detach().to(torch.float64)
        weight += (b @ a) * layer.scaling[name]
    return weight


def effective_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return {n: effective_weight(m) for n, m in model.named_modules() if isinstance(m, LoraLayer)}


# ---------------------------------------------------------------- format writers


@dataclass
class LoraFile:
    """A LoRA in some format, and the ΔW (float64) it means for each diffusers module."""

    tensors: dict[str, torch.Tensor]
    deltas: dict[str, torch.Tensor]  # "transformer.<module>" / "text_encoder.<module>" → ΔW
    metadata: dict[str, str] = field(default_factory=dict)
    # For a layout diffusers cannot load: the same LoRA in diffusers' own keys (its oracle); None: the file itself.
    oracle: dict[str, torch.Tensor] | None = None
    source: str = ""  # where the layout comes from (the tool's code, a posted file)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # ΔW as (A, B), ΔW = B @ A

    def write(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors, str(path), metadata=self.metadata or None)
        return path

    def to_bytes(self) -> bytes:
        return save(self.tensors, metadata=self.metadata or None)


# BFL names inside block i → diffusers modules (rows split in order), written independently of lora_loader.
FIXTURE_DOUBLE = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "img_attn.proj": ["attn.to_out.0"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "img_mod.lin": ["norm1.linear"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "txt_attn.proj": ["attn.to_add_out"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
    "txt_mod.lin": ["norm1_context.linear"],
}
FIXTURE_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}
FIXTURE_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
CLIP_TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1")


def _rand(gen: torch.Generator, *shape: int, std: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def _bfl_layers(shapes: dict[str, tuple[int, int]], single_linear1: bool = True, top: bool = True):
    """[(bfl name, [diffusers targets])] for the blocks of a transformer with these shapes."""
    doubles = {int(n.split(".")[1]) for n in shapes if n.startswith("transformer_blocks.")}
    singles = {int(n.split(".")[1]) for n in shapes if n.startswith("single_transformer_blocks.")}
    layers = []
    for i in sorted(doubles):
        layers += [
            (f"double_blocks.{i}.{k}", [f"transformer_blocks.{i}.{t}" for t in v]) for k, v in FIXTURE_DOUBLE.items()
        ]
    for i in sorted(singles):
        for k, v in FIXTURE_SINGLE.items():
            if k != "linear1" or single_linear1:
                layers.append((f"single_blocks.{i}.{k}", [f"single_transformer_blocks.{i}.{t}" for t in v]))
    if top:
        layers += [(k, [v]) for k, v in FIXTURE_TOP.items() if v in shapes]
    return layers


def _split_delta(up: torch.Tensor, down: torch.Tensor, targets, shapes, scale: float) -> dict[str, torch.Tensor]:
    widths = [shapes[t][0] for t in targets]
    deltas = {}
    for target, piece in zip(targets, torch.split(up, widths), strict=True):
        delta = piece.double() @ down.double() * scale
        if target == "norm_out.linear":  # BFL's final modulation is (shift, scale); diffusers' (scale, shift)
            delta = torch.cat(delta.chunk(2)[::-1])
        deltas[f"transformer.{target}"] = delta
    return deltas


def bfl_family(
    transformer,
    *,
    style: str,
    rank: int = 4,
    alpha: float | None = 2.0,
    seed: int = 0,
    clip=None,
    single_linear1: bool = True,
) -> LoraFile:
    """kohya (`lora_unet_…_linear1`), comfyui (`diffusion_model.…lora_down`) or bfl (`…qkv.lora_A`)."""
    shapes = linear_shapes(transformer)
    gen = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for bfl, targets in _bfl_layers(shapes, single_linear1):
        out = sum(shapes[t][0] for t in targets)
        down, up = _rand(gen, rank, shapes[targets[0]][1]), _rand(gen, out, rank)
        if style == "kohya":
            base, names = "lora_unet_" + bfl.replace(".", "_"), ("lora_down", "lora_up")
        elif style == "comfyui":
            base, names = "diffusion_model." + bfl, ("lora_down", "lora_up")
        elif style == "bfl":
            base, names = bfl, ("lora_A", "lora_B")
        else:
            raise ValueError(style)
        tensors[f"{base}.{names[0]}.weight"] = down
        tensors[f"{base}.{names[1]}.weight"] = up
        scale = 1.0
        if alpha is not None and style != "bfl":
            tensors[f"{base}.alpha"] = torch.tensor(alpha)
            scale = alpha / rank
        deltas.update(_split_delta(up, down, targets, shapes, scale))
    if clip is not None:
        clip_shapes = linear_shapes(clip)
        for name in [n for n in clip_shapes if n.endswith(CLIP_TARGETS)]:
            out, inp = clip_shapes[name]
            down, up = _rand(gen, rank, inp), _rand(gen, out, rank)
            if style == "kohya":
                base = "lora_te1_" + name.replace(".", "_")
            else:
                base = "text_encoders.clip_l.transformer." + name
            tensors[f"{base}.lora_down.weight"] = down
            tensors[f"{base}.lora_up.weight"] = up
            scale = 1.0
            if alpha is not None:
                tensors[f"{base}.alpha"] = torch.tensor(alpha)
                scale = alpha / rank
            deltas[f"text_encoder.{name}"] = up.double() @ down.double() * scale
    return LoraFile(tensors, deltas)


DIFFUSERS_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
    "norm1.linear",
    "norm.linear",
)


def diffusers_peft(
    transformer,
    *,
    rank: int = 4,
    alpha: str = "none",  # none | keys | metadata
    seed: int = 0,
    clip=None,
    prefix: str = "transformer.",
    targets=DIFFUSERS_TARGETS,
) -> LoraFile:
    """diffusers/PEFT keys (what Replicate's and ai-toolkit's trainers write), optionally with alphas."""
    shapes = linear_shapes(transformer)
    gen = torch.Generator().manual_seed(seed)
    tensors, deltas, metadata = {}, {}, {}
    pattern_module = None
    modules = [n for n in shapes if n.endswith(targets) and n.startswith(("transformer_blocks", "single"))]
    for i, name in enumerate(modules):
        out, inp = shapes[name]
        down, up = _rand(gen, rank, inp), _rand(gen, out, rank)
        tensors[f"{prefix}{name}.lora_A.weight"] = down
        tensors[f"{prefix}{name}.lora_B.weight"] = up
        scale = 1.0
        if alpha == "keys":
            value = float(rank * (1 + i % 3)) / 2
            tensors[f"{prefix}{name}.alpha"] = torch.tensor(value)
            scale = value / rank
        elif alpha == "metadata":
            scale = 8.0 / rank
            if pattern_module is None:
                pattern_module, scale = name, 2.0 / rank
        deltas[f"transformer.{name}"] = up.double() @ down.double() * scale
    if alpha == "metadata":
        adapter = {
            "transformer.r": rank,
            "transformer.lora_alpha": 8,
            "transformer.alpha_pattern": {pattern_module: 2},
            "transformer.target_modules": list(targets),
        }
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter)}
    if clip is not None:
        clip_shapes = linear_shapes(clip)
        for name in [n for n in clip_shapes if n.endswith(CLIP_TARGETS)]:
            out, inp = clip_shapes[name]
            down, up = _rand(gen, rank, inp), _rand(gen, out, rank)
            tensors[f"text_encoder.{name}.lora_A.weight"] = down
            tensors[f"text_encoder.{name}.lora_B.weight"] = up
            deltas[f"text_encoder.{name}"] = up.double() @ down.double()
    return LoraFile(tensors, deltas, metadata)


def ai_toolkit_legacy(transformer, *, rank: int = 4, alpha: float = 8.0, seed: int = 0) -> LoraFile:
    """ai-toolkit's kohya-style naming of diffusers modules: `lora_transformer_…` + `.alpha`."""
    shapes = linear_shapes(transformer)
    gen = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for name in [n for n in shapes if n.endswith(DIFFUSERS_TARGETS) and n.startswith(("transformer_b", "single"))]:
        out, inp = shapes[name]
        down, up = _rand(gen, rank, inp), _rand(gen, out, rank)
        base = "lora_transformer_" + name.replace(".", "_")
        tensors[f"{base}.lora_down.weight"] = down
        tensors[f"{base}.lora_up.weight"] = up
        tensors[f"{base}.alpha"] = torch.tensor(alpha)
        deltas[f"transformer.{name}"] = up.double() @ down.double() * (alpha / rank)
    return LoraFile(tensors, deltas)


def xlabs(transformer, *, rank: int = 4, seed: int = 0) -> LoraFile:
    """XLabs' attention-processor LoRAs on the double blocks (what their released LoRAs hold)."""
    shapes = linear_shapes(transformer)
    gen = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    doubles = sorted({int(n.split(".")[1]) for n in shapes if n.startswith("transformer_blocks.")})
    parts = {
        "qkv_lora1": ["attn.to_q", "attn.to_k", "attn.to_v"],
        "proj_lora1": ["attn.to_out.0"],
        "qkv_lora2": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
        "proj_lora2": ["attn.to_add_out"],
    }
    for i in doubles:
        for part, names in parts.items():
            targets = [f"transformer_blocks.{i}.{t}" for t in names]
            out = sum(shapes[t][0] for t in targets)
            down, up = _rand(gen, rank, shapes[targets[0]][1]), _rand(gen, out, rank)
            tensors[f"double_blocks.{i}.processor.{part}.down.weight"] = down
            tensors[f"double_blocks.{i}.processor.{part}.up.weight"] = up
            deltas.update(_split_delta(up, down, targets, shapes, 1.0))
    return LoraFile(tensors, deltas)


FORMATS = {
    "diffusers": lambda t, **kw: diffusers_peft(t, **kw),
    "diffusers-alpha-keys": lambda t, **kw: diffusers_peft(t, alpha="keys", **kw),
    "diffusers-metadata": lambda t, **kw: diffusers_peft(t, alpha="metadata", **kw),
    "diffusers-unprefixed": lambda t, **kw: diffusers_peft(t, prefix="", **kw),
    "ai-toolkit": lambda t, **kw: diffusers_peft(t, targets=(*DIFFUSERS_TARGETS, "norm1_context.linear"), **kw),
    "ai-toolkit-legacy": lambda t, **kw: ai_toolkit_legacy(t, **kw),
    "kohya": lambda t, **kw: bfl_family(t, style="kohya", **kw),
    "comfyui": lambda t, **kw: bfl_family(t, style="comfyui", **kw),
    "bfl-native": lambda t, **kw: bfl_family(t, style="bfl", alpha=None, **kw),
    "xlabs": lambda t, **kw: xlabs(t, **kw),
}


# ---------------------------------------------------------------- real layouts at FLUX width
#
# LoRA files laid out exactly as the tools write them (key names, dtypes, alphas, fused or split layers),
# for a transformer of FLUX's real width: tests/test_lora_oracle.py loads each one into diffusers (the
# oracle) and into ours. Each layout's names follow the tool's own naming code, cited beside it; the
# BFL → diffusers correspondence is the tables above, not loras/formats.py's. The ΔW each module should
# get is kept as factors (B @ A, float64): at FLUX width the full matrices would take gigabytes.

FLUX_WIDTH = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=128,
    num_attention_heads=24,  # FLUX.1's real width: 24 × 128 = 3072
    joint_attention_dim=32,  # the tiny T5 and CLIP of scripts/tiny_weights.py
    pooled_projection_dim=32,
    axes_dims_rope=[16, 56, 56],
    guidance_embeds=True,
)
BFL_TOP_ALL = {  # every Linear outside the blocks (kohya's flux_extract_lora.py and ComfyUI's LoraSave take them all)
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
CLIP_ALL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
BLOCK_LINEARS = (  # every Linear of FluxTransformerBlock / FluxSingleTransformerBlock
    *("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj"),
    *("attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj"),
    *("ff_context.net.2", "norm1.linear", "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear"),
)


def flux_width_transformer(seed: int = 0):
    """FLUX.1's transformer at its real width with one double and one single block."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**FLUX_WIDTH).eval()


def model_shapes(transformer, clip=None) -> dict[str, tuple[int, int]]:
    """(out, in) of each Linear, keyed "transformer.<module>" / "text_encoder.<module>" (CLIP without "text_model.")."""
    shapes = {f"transformer.{n}": s for n, s in linear_shapes(transformer).items()}
    if clip is not None:
        shapes |= {f"text_encoder.{n.removeprefix('text_model.')}": s for n, s in linear_shapes(clip).items()}
    return shapes


@dataclass
class Layer:
    """One LoRA layer as a tool names it: its key stem, and the modules its output rows split into."""

    stem: str
    targets: list[str]  # "transformer.<module>" / "text_encoder.<module>"
    swap: bool = False  # BFL's final modulation is (shift, scale); diffusers' norm_out.linear is (scale, shift)


def _block_indices(shapes, kind: str) -> list[int]:
    return sorted({int(n.split(".")[2]) for n in shapes if n.startswith(f"transformer.{kind}.")})


def bfl_layers(shapes, stem, top=()) -> list[Layer]:
    """Every Linear of the double and single blocks by its BFL name (+ the top-level ones in `top`)."""
    layers = []
    for i in _block_indices(shapes, "transformer_blocks"):
        for bfl, targets in FIXTURE_DOUBLE.items():
            modules = [f"transformer.transformer_blocks.{i}.{t}" for t in targets]
            layers.append(Layer(stem(f"double_blocks.{i}.{bfl}"), modules))
    for i in _block_indices(shapes, "single_transformer_blocks"):
        for bfl, targets in FIXTURE_SINGLE.items():
            modules = [f"transformer.single_transformer_blocks.{i}.{t}" for t in targets]
            layers.append(Layer(stem(f"single_blocks.{i}.{bfl}"), modules))
    for bfl in top:
        module = f"transformer.{BFL_TOP_ALL[bfl]}"
        if module in shapes:
            layers.append(Layer(stem(bfl), [module], swap=bfl == "final_layer.adaLN_modulation.1"))
    return layers


def diffusers_layers(shapes, stem, targets=BLOCK_LINEARS) -> list[Layer]:
    """The blocks' Linear modules ending with one of `targets`, by their diffusers names."""
    blocks = ("transformer.transformer_blocks.", "transformer.single_transformer_blocks.")
    names = [n.removeprefix("transformer.") for n in shapes if n.startswith(blocks) and n.endswith(targets)]
    return [Layer(stem(n), [f"transformer.{n}"]) for n in names]


def clip_layers(shapes, stem, targets=CLIP_ALL) -> list[Layer]:
    names = [n.removeprefix("text_encoder.") for n in shapes if n.startswith("text_encoder.") and n.endswith(targets)]
    return [Layer(stem(n), [f"text_encoder.{n}"]) for n in names]


def write_layers(
    layers: list[Layer],
    shapes: dict[str, tuple[int, int]],
    *,
    rank: int = 4,
    down: str = "lora_down",
    up: str = "lora_up",
    dtype: torch.dtype = torch.bfloat16,
    alpha=None,
    alpha_key: str | None = "{stem}.alpha",
    alpha_dtype: torch.dtype | None = None,
    sparse: bool = False,
    fold: bool = False,
    seed: int = 0,
    rel: float = 3.0,
) -> LoraFile:
    """Random LoRA tensors for `layers` under the tool's key names, and the ΔW each target gets.

    alpha: None (nothing stored: alpha = rank), a number, or a function of the layer's index.
    alpha_key: where it is stored ("{stem}.alpha", "{stem}.{down}.weight.alpha"), None for nowhere
    (given by metadata instead). fold: alpha/rank multiplied into B and not stored. sparse: kohya's
    split_qkv, a fused layer of n parts has rank n × `rank` and a block-diagonal B. rel: each ΔW's
    entries are about `rel` × the spread of the base weight's (big enough to change the picture)."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for index, layer in enumerate(layers):
        widths = [shapes[t][0] for t in layer.targets]
        inp = shapes[layer.targets[0]][1]
        parts = len(widths) if sparse else 1
        total = rank * parts
        value = alpha(index) if callable(alpha) else alpha
        stored = None
        if value is not None:
            stored = torch.tensor(value, dtype=alpha_dtype or dtype)
            value = float(stored)
        scale = value / total if value else 1.0
        a = torch.randn(total, inp, generator=gen) / math.sqrt(inp)
        b = torch.randn(sum(widths), total, generator=gen) * (rel / (scale * math.sqrt(3 * rank)))
        if parts > 1:  # block-diagonal: part j's rows only see ranks j·rank … (j+1)·rank
            mask, row = torch.zeros_like(b), 0
            for j, width in enumerate(widths):
                mask[row : row + width, j * rank : (j + 1) * rank] = 1
                row += width
            b = b * mask
        if fold:
            b, scale = b * scale, 1.0
        a, b = a.to(dtype), b.to(dtype)
        tensors[f"{layer.stem}.{down}.weight"] = a
        tensors[f"{layer.stem}.{up}.weight"] = b
        if stored is not None and alpha_key is not None and not fold:
            tensors[alpha_key.format(stem=layer.stem, down=down)] = stored
        row = 0
        for target, width in zip(layer.targets, widths, strict=True):
            piece = b[row : row + width].double() * scale
            row += width
            if layer.swap:
                piece = torch.cat(piece.chunk(2)[::-1])
            factors[target] = (a.double(), piece)
    return LoraFile(tensors, {}, factors=factors)


def diffusers_keys(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The same LoRA in diffusers' own keys (PEFT names, alpha folded): the oracle for what diffusers cannot read."""
    state = {}
    for target, (a, b) in factors.items():
        # CLIP as transformers 4 names it: diffusers drops the "text_model." a transformers-5 CLIP lacks
        target = target.replace("text_encoder.", "text_encoder.text_model.", 1)
        state[f"{target}.lora_A.weight"] = a.float()
        state[f"{target}.lora_B.weight"] = b.float()
    return state


def _kohya(name: str) -> str:
    return name.replace(".", "_")


def kohya_lora_flux(transformer, clip, seed=0) -> LoraFile:
    lora = write_layers(
        bfl_layers(shapes := model_shapes(transformer, clip), lambda n: "lora_unet_" + _kohya(n))
        + clip_layers(shapes, lambda n: "lora_te1_text_model_" + _kohya(n)),
        shapes,
        dtype=torch.bfloat16,
        alpha=2.0,  # --network_alpha 2 with --network_dim 4
        seed=seed,
    )
    lora.source = (
        "kohya-ss/sd-scripts networks/lora_flux.py LoRANetwork: LORA_PREFIX_FLUX 'lora_unet' + the BFL module name "
        "('.' → '_') for every Linear of DoubleStreamBlock/SingleStreamBlock, LORA_PREFIX_TEXT_ENCODER_CLIP "
        "'lora_te1' + CLIPAttention/CLIPMLP children (transformers-4 names, text_model.), lora_down/lora_up and "
        "an alpha buffer, all cast to --save_precision (bf16) by save_weights"
    )
    return lora


def kohya_split_qkv(transformer, clip, seed=0) -> LoraFile:
    lora = write_layers(
        bfl_layers(shapes := model_shapes(transformer), lambda n: "lora_unet_" + _kohya(n)),
        shapes,
        dtype=torch.float16,
        alpha=4.0,
        sparse=True,
        seed=seed,
    )
    lora.source = (
        "kohya-ss/sd-scripts networks/lora_flux.py with --network_args split_qkv=True: LoRANetwork.state_dict "
        "merges the split q/k/v(/mlp) modules into one lora_down (ranks concatenated) and a block-diagonal "
        "lora_up, alpha unchanged; --save_precision fp16"
    )
    return lora


def kohya_extract(transformer, clip, seed=0) -> LoraFile:
    shapes = model_shapes(transformer)
    lora = write_layers(
        bfl_layers(shapes, lambda n: "lora_unet_" + _kohya(n), top=BFL_TOP_ALL),
        shapes,
        dtype=torch.bfloat16,
        alpha=4,
        seed=seed,
    )
    lora.oracle = diffusers_keys(lora.factors)  # diffusers drops the top-level layers (no "transformer." prefix)
    lora.source = (
        "kohya-ss/sd-scripts networks/flux_extract_lora.py: every Linear weight of the BFL model (img_in … "
        "final_layer), lora_name = 'lora_unet_' + key ('.' → '_'), alpha = torch.tensor(rank), all cast by "
        "save_to_file to --save_precision bf16 (without it the alphas stay int64)"
    )
    return lora


def kohya_final_layer_alpha(transformer, clip, seed=0) -> LoraFile:
    shapes = model_shapes(transformer)
    lora = write_layers(
        bfl_layers(shapes, lambda n: "lora_unet_" + _kohya(n), top=BFL_TOP_ALL),
        shapes,
        dtype=torch.bfloat16,
        alpha=8.0,
        seed=seed,
    )
    lora.oracle = diffusers_keys(lora.factors)  # diffusers applies final_layer's lora unscaled (its TODO: alphas)
    lora.source = (
        "kohya LoRAs with final_layer and alphas, huggingface/diffusers#13998 (final_layer.linear / "
        "adaLN_modulation.1 with .alpha); diffusers' _convert_sd_scripts_to_ai_toolkit pops but ignores those alphas"
    )
    return lora


def comfyui_lorasave(transformer, clip, seed=0) -> LoraFile:
    shapes = model_shapes(transformer, clip)
    lora = write_layers(
        bfl_layers(shapes, lambda n: "diffusion_model." + n, top=BFL_TOP_ALL)
        + clip_layers(shapes, lambda n: "text_encoders.clip_l.transformer.text_model." + n),
        shapes,
        dtype=torch.float16,
        seed=seed,
    )
    # LoraSave extracts every 2-D weight, CLIP's embeddings too: an unchanged one is all zeros.
    stem = "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding"
    lora.tensors[f"{stem}.lora_up.weight"] = torch.zeros(77, 4, dtype=torch.float16)
    lora.tensors[f"{stem}.lora_down.weight"] = torch.randn(4, 32).half()
    lora.oracle = diffusers_keys(lora.factors)  # diffusers drops the top-level layers (no "transformer." prefix)
    lora.source = (
        "ComfyUI comfy_extras/nodes_lora_extract.py LoraSave: '{}.lora_up.weight' / lora_down for every 2-D "
        "weight of the model ('diffusion_model.' + BFL name) and of CLIP ('text_encoders.' + "
        "'clip_l.transformer.text_model.…'), .half(), no alpha (bias_diff off)"
    )
    return lora


def ai_toolkit(transformer, clip, seed=0) -> LoraFile:
    shapes = model_shapes(transformer)
    lora = write_layers(
        diffusers_layers(shapes, lambda n: "transformer." + n),
        shapes,
        down="lora_A",
        up="lora_B",
        dtype=torch.float16,
        seed=seed,
    )
    lora.source = (
        "ostris/ai-toolkit toolkit/network_mixins.py get_state_dict with peft_format (always on for FLUX, "
        "toolkit/lora_special.py): 'transformer.' + diffusers names, lora_down → lora_A, lora_up → lora_B, "
        ".alpha keys dropped (alpha = rank), saved as float16 (config/examples/train_lora_flux_24gb.yaml: "
        "save dtype float16); keys as posted in ostris/ai-toolkit#67"
    )
    return lora


def dreambooth_flux(transformer, clip, seed=0) -> LoraFile:
    """Written by diffusers' own FluxPipeline.save_lora_weights, as the script calls it."""
    import tempfile

    from diffusers import FluxPipeline
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import load_file

    shapes = model_shapes(transformer, clip)
    targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj")
    targets += ("attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj")
    targets += ("ff_context.net.2",)
    te_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    lora = write_layers(
        diffusers_layers(shapes, lambda n: n, targets), shapes, down="lora_A", up="lora_B", alpha=8, alpha_key=None
    )
    text = write_layers(
        clip_layers(shapes, lambda n: "text_model." + n, te_targets),
        shapes,
        down="lora_A",
        up="lora_B",
        dtype=torch.float32,
        alpha=8,
        alpha_key=None,
        seed=seed + 1,
    )
    config = {"r": 4, "lora_alpha": 8, "init_lora_weights": "gaussian"}
    with tempfile.TemporaryDirectory() as tmp:
        FluxPipeline.save_lora_weights(
            tmp,
            transformer_lora_layers=lora.tensors,
            text_encoder_lora_layers=text.tensors,
            transformer_lora_adapter_metadata=LoraConfig(**config, target_modules=list(targets)).to_dict(),
            text_encoder_lora_adapter_metadata=LoraConfig(**config, target_modules=list(te_targets)).to_dict(),
        )
        path = Path(tmp) / "pytorch_lora_weights.safetensors"
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(path))
    lora = LoraFile(tensors, {}, metadata, factors={**lora.factors, **text.factors})
    lora.source = (
        "huggingface/diffusers examples/dreambooth/train_dreambooth_lora_flux.py: FluxPipeline.save_lora_weights "
        "of get_peft_model_state_dict(transformer) in weight_dtype (bf16) and of the text encoder in float32 "
        "(transformers-4 names, text_model.), the LoraConfigs (lora_alpha) in 'lora_adapter_metadata'"
    )
    return lora


def onetrainer_legacy(transformer, clip, seed=0) -> LoraFile:
    shapes = model_shapes(transformer, clip)
    lora = write_layers(
        diffusers_layers(shapes, lambda n: "lora_transformer_" + _kohya(n))
        + clip_layers(shapes, lambda n: "lora_te1_text_model_" + _kohya(n)),
        shapes,
        dtype=torch.bfloat16,
        alpha=1.0,  # OneTrainer's default lora_alpha
        seed=seed,
    )
    lora.oracle = diffusers_keys(lora.factors)  # diffusers' mixture converter handles attention layers only
    lora.source = (
        "Nerogar/OneTrainer modules/util/convert_lora_util.py convert_to_mixture (FluxLoRASaver's LEGACY format): "
        "'transformer' → 'lora_transformer', 'text_encoder' → 'lora_te1', module path flattened ('.' → '_'), "
        "lora_down/lora_up + .alpha; the mixture diffusers' _convert_mixture_state_dict_to_diffusers reads"
    )
    return lora


def onetrainer_diffusers(transformer, clip, seed=0) -> LoraFile:
    shapes = model_shapes(transformer, clip)
    lora = write_layers(
        diffusers_layers(shapes, lambda n: "transformer." + n)
        + clip_layers(shapes, lambda n: "text_encoder." + n),  # transformers-5 names: no text_model.
        shapes,
        down="lora_A",
        up="lora_B",
        dtype=torch.float16,
        alpha=2.0,
        fold=True,
        seed=seed,
    )
    lora.source = (
        "Nerogar/OneTrainer convert_lora_util.py convert_to_diffusers: diffusers names, lora_down → lora_A, "
        "alpha folded into lora_B and the .alpha key dropped (lora_fold_alpha); CLIP under 'text_encoder.' with "
        "the live CLIPTextModel's names (transformers 5: no text_model.)"
    )
    return lora


def xlabs_flux(transformer, clip, seed=0) -> LoraFile:
    shapes = model_shapes(transformer)
    layers = []
    for i in _block_indices(shapes, "transformer_blocks"):
        block = f"transformer.transformer_blocks.{i}.attn"
        layers += [
            Layer(f"double_blocks.{i}.processor.qkv_lora1", [f"{block}.to_q", f"{block}.to_k", f"{block}.to_v"]),
            Layer(f"double_blocks.{i}.processor.proj_lora1", [f"{block}.to_out.0"]),
            Layer(f"double_blocks.{i}.processor.qkv_lora2", [f"{block}.add_{x}_proj" for x in "qkv"]),
            Layer(f"double_blocks.{i}.processor.proj_lora2", [f"{block}.to_add_out"]),
        ]
    for i in _block_indices(shapes, "single_transformer_blocks"):
        block = f"transformer.single_transformer_blocks.{i}"
        layers += [
            Layer(f"single_blocks.{i}.processor.qkv_lora", [f"{block}.attn.to_{x}" for x in "qkv"]),
            Layer(f"single_blocks.{i}.processor.proj_lora", [f"{block}.proj_out"]),
        ]
    lora = write_layers(layers, shapes, down="down", up="up", dtype=torch.bfloat16, rel=6.0, seed=seed)
    lora.source = (
        "XLabs-AI/x-flux src/flux/modules/layers.py DoubleStreamBlockLoraProcessor (qkv_lora1, proj_lora1, "
        "qkv_lora2, proj_lora2) and SingleStreamBlockLoraProcessor (qkv_lora on linear1's q/k/v, proj_lora on "
        "linear2), LoRALinearLayer .down/.up; train_flux_lora_deepspeed.py saves the '_lora' keys, no alpha"
    )
    return lora


def thelastben(transformer, clip, seed=0) -> LoraFile:
    shapes = model_shapes(transformer)
    lora = write_layers(
        diffusers_layers(shapes, lambda n: "transformer." + n),
        shapes,
        down="lora_A",
        up="lora_B",
        dtype=torch.bfloat16,
        alpha=lambda i: (2.0, 8.0, 16.0)[i % 3],
        alpha_key="{stem}.{down}.weight.alpha",
        alpha_dtype=torch.float32,
        seed=seed,
    )
    lora.source = (
        "TheLastBen/Jon_Snow_Flux_LoRA jon_snow.safetensors, as diffusers' tests/lora/test_lora_layers_flux.py "
        "test_with_alpha_in_state_dict rebuilds it: PEFT names with '<module>.lora_A.weight.alpha' per module"
    )
    return lora


def peft_save_pretrained(transformer, clip, seed=0) -> LoraFile:
    shapes = model_shapes(transformer)
    lora = write_layers(
        diffusers_layers(shapes, lambda n: "base_model.model." + n, ("attn.to_q", "attn.to_k", "proj_mlp", "ff.net.2")),
        shapes,
        down="lora_A",
        up="lora_B",
        dtype=torch.float32,
        rel=8.0,  # only a few attention layers: a stronger LoRA, to show
        seed=seed,
    )
    lora.oracle = diffusers_keys(lora.factors)  # diffusers sends any 'base_model' key to its fal-Kontext converter
    lora.source = (
        "huggingface/peft PeftModel.save_pretrained → adapter_model.safetensors: get_peft_model_state_dict keys "
        "under the PeftModel's 'base_model.model.' (adapter name removed); alpha stays in adapter_config.json"
    )
    return lora


SIMPLETUNER_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj")
SIMPLETUNER_ATTN += ("attn.add_v_proj", "attn.to_add_out")  # the layers in the keys posted in ComfyUI#4347


def simpletuner_peft(transformer, clip, seed=0) -> LoraFile:
    shapes = model_shapes(transformer)
    lora = write_layers(
        diffusers_layers(shapes, lambda n: "transformer.base_model.model." + n, SIMPLETUNER_ATTN),
        shapes,
        down="lora_A",
        up="lora_B",
        dtype=torch.bfloat16,
        rel=8.0,  # only a few attention layers: a stronger LoRA, to show
        seed=seed,
    )
    lora.oracle = diffusers_keys(lora.factors)
    lora.source = (
        "SimpleTuner FLUX LoRAs posted in comfyanonymous/ComfyUI#4347: "
        "'transformer.base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight'"
    )
    return lora


def onetrainer_original(transformer, clip, seed=0) -> LoraFile:
    shapes = model_shapes(transformer)
    lora = write_layers(
        bfl_layers(shapes, lambda n: n, top=("img_in", "txt_in", "final_layer.adaLN_modulation.1")),
        shapes,
        down="lora_A",
        up="lora_B",
        dtype=torch.bfloat16,
        alpha=1.0,
        seed=seed,
    )
    lora.oracle = diffusers_keys(lora.factors)  # diffusers loads nothing from BFL names with lora_A/lora_B
    lora.source = (
        "Nerogar/OneTrainer LoRASaverMixin._save_original (ORIGINAL format): FluxModel.diffusers_to_original's "
        "BFL names (img_attn.qkv, linear1, …) unprefixed, convert_lora_suffix_ab(peft_convention=False): "
        "lora_A/lora_B with .alpha kept"
    )
    return lora


def fal_kontext(transformer, clip, seed=0) -> LoraFile:
    shapes = model_shapes(transformer)
    lora = write_layers(
        bfl_layers(shapes, lambda n: "base_model.model." + n, top=("img_in", "txt_in", "final_layer.linear")),
        shapes,
        down="lora_A",
        up="lora_B",
        dtype=torch.bfloat16,
        seed=seed,
    )
    lora.oracle = diffusers_keys(lora.factors)  # diffusers' converter needs all 19 + 38 blocks
    lora.source = (
        "fal's FLUX Kontext trainer, as diffusers' _convert_fal_kontext_lora_to_diffusers reads it: "
        "'base_model.model.' + BFL names (double_blocks.N.img_attn.qkv, single_blocks.N.linear1, …), lora_A/lora_B"
    )
    return lora


# name → builder(transformer, clip, seed) at any width; each LoraFile says its source, and has `oracle`
# when diffusers cannot read the file itself (DIFFUSERS_CANNOT_READ says why, as of diffusers 0.42).
REAL_LAYOUTS = {
    "kohya": kohya_lora_flux,
    "kohya-split-qkv": kohya_split_qkv,
    "kohya-extract": kohya_extract,
    "kohya-final-layer-alpha": kohya_final_layer_alpha,
    "comfyui": comfyui_lorasave,
    "ai-toolkit": ai_toolkit,
    "diffusers-dreambooth": dreambooth_flux,
    "onetrainer-legacy": onetrainer_legacy,
    "onetrainer-diffusers": onetrainer_diffusers,
    "xlabs": xlabs_flux,
    "thelastben-alpha": thelastben,
    "peft": peft_save_pretrained,
    "simpletuner-peft": simpletuner_peft,
    "onetrainer-original": onetrainer_original,
    "fal-kontext": fal_kontext,
}
DIFFUSERS_CANNOT_READ = {
    "kohya-extract": "its kohya converter writes img_in … final_layer without 'transformer.': dropped in silence",
    "kohya-final-layer-alpha": "the same, and it ignores final_layer's alphas ('# TODO: alphas')",
    "comfyui": "'diffusion_model.' goes through the kohya converter: the top-level layers are dropped",
    "onetrainer-legacy": "_convert_mixture_state_dict_to_diffusers handles attention layers only (KeyError)",
    "peft": "any key with 'base_model' goes to _convert_fal_kontext_lora_to_diffusers, which needs 19 + 38 blocks",
    "simpletuner-peft": "the same 'base_model' routing",
    "fal-kontext": "its converter hard-codes FLUX's 19 double and 38 single blocks",
    "onetrainer-original": "BFL names with lora_A/lora_B match nothing: a warning, then set_adapters fails",
}


# ---------------------------------------------------------------- what is not low-rank: written by the tools' own code
#
# LyCORIS files are written by `lycoris-lora` itself (what SimpleTuner trains and saves FLUX LyCORIS with:
# keys `lycoris_` + the diffusers module path with "_"), on the FLUX-width transformer, with random factors
# (the library initialises one side to zero). tests/test_lora_oracle.py applies them with the library's own
# modules' forward (`create_lycoris_from_weights`), not its `merge_to()` (issue 22: it applies alpha/dim
# twice for a decomposed LoKr and for LoHa).

LYCORIS_MODULES = ["FluxAttention", "FeedForward"]  # SimpleTuner's FLUX preset ("Attention", "FeedForward")
# Full differences are whole matrices (FLUX width: 36 MiB per attention projection in float32): a few layers.
LYCORIS_FULL_NAMES = [
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.to_add_out",
    "single_transformer_blocks.0.attn.to_v",
]
LYCORIS_KINDS = {  # name: (create_lycoris arguments, std of the random factors)
    # SimpleTuner's FLUX LoKr config (its documented lycoris_config.json): linear_dim 10000 makes both
    # sides whole matrices; the stored alpha (10000, 9984 in bf16) is then no scale and is ignored.
    "lokr-full-w2": ({"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 16}, 0.15),
    # a small linear_dim: W2 = W2a·W2b, scale alpha/dim = 0.5
    "lokr-decomposed": ({"algo": "lokr", "linear_dim": 4, "linear_alpha": 2, "factor": 8}, 0.3),
    "loha": ({"algo": "loha", "linear_dim": 4, "linear_alpha": 2}, 0.3),
    "full": ({"algo": "full"}, 0.25),
    # DoRA on a LoKr (dora_wd): a magnitude per output row (`dora_scale`, [out, 1])
    "lokr-dora": ({"algo": "lokr", "linear_dim": 4, "linear_alpha": 2, "factor": 8, "dora_wd": True}, 0.4),
}


def lycoris_network(transformer, kind: str, seed: int = 0):
    """A LyCORIS network of `kind` on `transformer` (applied), with random factors; call `.restore()` after."""
    from lycoris import LycorisNetwork, create_lycoris

    arguments, std = LYCORIS_KINDS[kind]
    full = arguments["algo"] == "full"
    LycorisNetwork.apply_preset(
        {
            "target_module": [] if full else LYCORIS_MODULES,
            "target_name": LYCORIS_FULL_NAMES if full else [],
            "module_algo_map": {},
            "name_algo_map": {},
        }
    )
    network = create_lycoris(transformer, 1.0, **arguments)
    network.apply_to()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if name.endswith("dora_scale"):  # the base norm per row, made 2 to 3 times larger
                parameter.mul_(2.5 + 0.5 * (torch.rand(parameter.shape, generator=gen) * 2 - 1))
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=gen) * std)
    return network


def lycoris_file(transformer, kind: str, path: Path, seed: int = 0) -> Path:
    """The LyCORIS file lycoris-lora saves for a random network of `kind` (bf16, as SimpleTuner saves)."""
    network = lycoris_network(transformer, kind, seed)
    try:
        network.save_weights(str(path), torch.bfloat16, None)
    finally:
        network.restore()
    return path


def peft_dora(transformer, *, rank: int = 4, seed: int = 0) -> LoraFile:
    """A DoRA as PEFT saves it and diffusers' `save_lora_weights` writes it (`transformer.` + PEFT's keys:
    lora_A, lora_B, lora_magnitude_vector [out]; no alpha: alpha = rank), on the attention projections of
    every block. The magnitude is the norm of each row of W + B·A (PEFT's initial value) changed by up to ±20 %."""
    shapes = linear_shapes(transformer)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    targets = [n for n in shapes if n.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "proj_out"))]
    for name in targets:
        out, inp = shapes[name]
        down, up = _rand(gen, rank, inp, std=0.05), _rand(gen, out, rank, std=0.05)
        weight = transformer.get_submodule(name).weight.detach().double() + up.double() @ down.double()
        magnitude = weight.norm(dim=1) * (1 + 0.2 * (torch.rand(out, generator=gen, dtype=torch.float64) * 2 - 1))
        tensors[f"transformer.{name}.lora_A.weight"] = down
        tensors[f"transformer.{name}.lora_B.weight"] = up
        tensors[f"transformer.{name}.lora_magnitude_vector"] = magnitude.float()
    return LoraFile(tensors, {}, source="huggingface/peft DoRA, diffusers save_lora_weights")


T5_TARGETS = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o", "DenseReluDense.wi_0",
              "DenseReluDense.wi_1", "DenseReluDense.wo")  # fmt: skip
T5_STYLES = {  # how each tool names T5-XXL's modules (ComfyUI's model_lora_keys_clip maps all of them)
    "kohya": lambda name: "lora_te3_" + name.replace(".", "_"),  # sd-scripts lora_flux.py, train_t5xxl
    "onetrainer": lambda name: "lora_te2_" + name.replace(".", "_"),  # OneTrainer's KOHYA format
    "comfyui": lambda name: "text_encoders.t5xxl.transformer." + name,
}


def t5_lora(t5, style: str, *, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> LoraFile:
    """A T5 part (lora_down/lora_up/alpha, fp16) on every attention and feed-forward Linear of T5, named as
    `style`; `deltas` holds each module's ΔW (float64)."""
    shapes = linear_shapes(t5)
    gen = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for name in [n for n in shapes if n.endswith(T5_TARGETS)]:
        out, inp = shapes[name]
        down, up = _rand(gen, rank, inp, std=0.5), _rand(gen, out, rank, std=0.5)
        stem = T5_STYLES[style](name)
        tensors[f"{stem}.lora_down.weight"] = down.half()
        tensors[f"{stem}.lora_up.weight"] = up.half()
        tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
        deltas[f"t5.{name}"] = up.half().double() @ down.half().double() * (alpha / rank)
    return LoraFile(tensors, deltas, source=f"{style} T5 names")


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# ---------------------------------------------------------------- the fake hub


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before the status line
    trickle: float = 0.0  # seconds between pieces of the body
    piece: int = 1024  # bytes per trickled piece
    head_trickle: float = 0.0  # seconds between bytes of the status line and headers
    require_auth: str | None = None  # "Bearer <token>" this path needs, else 401
    truncate: int | None = None  # send only this many bytes of the body (Content-Length stays full)


class RouteServer:
    """Stands in for Replicate, Hugging Face, CivitAI and file hosts: a threaded HTTP server on
    127.0.0.1 (or another loopback `host`; https with `tls`, a server-side SSLContext) that routes
    by path (query ignored) and records every request."""

    def __init__(self, host: str = "127.0.0.1", tls=None):
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                hub._serve(self)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # clients hanging up early is part of the tests
                pass

        self.server = Server((host, 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls is not None else 'http'}://{host}:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    # ---- setting up

    def add(self, path: str, body: bytes = b"", **kw) -> Route:
        route = Route(body=body, **kw)
        self.routes[path] = route
        return route

    def redirect(self, path: str, location: str, status: int = 302, **kw) -> Route:
        return self.add(path, status=status, headers={"Location": location}, **kw)

    def hits(self, path: str) -> int:
        with self.lock:
            return sum(1 for p, _ in self.requests if p.split("?")[0] == path)

    def headers_for(self, path: str) -> list[dict[str, str]]:
        with self.lock:
            return [h for p, h in self.requests if p.split("?")[0] == path]

    # ---- imitations of the three services (their URL layouts)

    def replicate_model(self, owner_model: str, lora: bytes, version: str | None = None, inner: str = "output/lora"):
        """`/_weights` → 302 → a tar on the file host holding one .safetensors in a subfolder."""
        tar = tar_bytes({f"{inner}/lora.safetensors": lora, f"{inner}/config.yaml": b"rank: 4\n"})
        suffix = f"/versions/{version}/_weights" if version else "/_weights"
        blob = f"/delivery/{owner_model.replace('/', '-')}-{version or 'latest'}/trained_model.tar"
        self.add(blob, tar, headers={"Content-Type": "application/x-tar"})
        self.redirect(f"/{owner_model}{suffix}", f"{self.url}{blob}")
        return blob

    def hf_repo(self, repo: str, files: dict[str, bytes], revision: str = "main", token: str | None = None) -> str:
        """The revision API (the branch → its commit), the tree API huggingface_hub calls, and resolve URLs
        redirecting to a CDN path, at the branch and at its commit. Called again with other files, the
        branch moves to a new commit. Returns the commit."""
        auth = f"Bearer {token}" if token else None
        commit = hashlib.sha1(
            b"".join(p.encode() + b"\0" + hashlib.sha1(d).digest() for p, d in files.items())
        ).hexdigest()
        self.add(
            f"/api/models/{repo}/revision/{revision}",
            json.dumps({"id": repo, "sha": commit}).encode(),
            require_auth=auth,
            headers={"Content-Type": "application/json"},
        )
        listing = [{"type": "file", "path": p, "size": len(b), "oid": str(i)} for i, (p, b) in enumerate(files.items())]
        folders = {p.rsplit("/", 1)[0] for p in files if "/" in p}
        listing += [{"type": "directory", "path": f, "oid": "d"} for f in sorted(folders)]
        for rev in (revision, commit):
            self.add(
                f"/api/models/{repo}/tree/{rev}",
                json.dumps(listing).encode(),
                require_auth=auth,
                headers={"Content-Type": "application/json"},
            )
            for folder in folders:
                inside = [e for e in listing if e["path"].startswith(folder + "/")]
                self.add(
                    f"/api/models/{repo}/tree/{rev}/{folder.replace('/', '%2F')}",
                    json.dumps(inside).encode(),
                    require_auth=auth,
                    headers={"Content-Type": "application/json"},
                )
            for path, data in files.items():
                cdn = f"/cdn/{repo}/{rev}/{path}"
                self.add(cdn, data)
                self.redirect(f"/{repo}/resolve/{rev}/{path}", f"{self.url}{cdn}", require_auth=auth)
        return commit

    def civitai_model(self, model_id: int, versions: list[tuple[int, bytes]], token: str | None = None):
        """`/api/v1/models/<id>` (newest version first) and `/api/download/models/<v>` → 307 → signed URL."""
        auth = f"Bearer {token}" if token else None
        entries = []
        for version_id, data in versions:
            entries.append(
                {
                    "id": version_id,
                    "baseModel": "Flux.1 D",
                    "files": [
                        {
                            "name": f"v{version_id}.pt",
                            "type": "Model",
                            "metadata": {"format": "PickleTensor"},
                            "downloadUrl": f"https://civitai.com/api/download/models/{version_id}?type=Model&format=PickleTensor",
                        },
                        {
                            "name": f"v{version_id}.safetensors",
                            "type": "Model",
                            "primary": True,
                            "metadata": {"format": "SafeTensor"},
                            "downloadUrl": f"https://civitai.com/api/download/models/{version_id}",
                        },
                    ],
                }
            )
            signed = f"/r2/model-{version_id}.safetensors"
            self.add(signed, data)
            self.redirect(
                f"/api/download/models/{version_id}",
                f"{self.url}{signed}?X-Amz-Signature=abc&X-Amz-Expires=60",
                status=307,
                require_auth=auth,
            )
        body = {"id": model_id, "type": "LORA", "modelVersions": entries}
        self.add(
            f"/api/v1/models/{model_id}",
            json.dumps(body).encode(),
            require_auth=auth,
            headers={"Content-Type": "application/json"},
        )

    # ---- serving

    def _serve(self, handler: BaseHTTPRequestHandler):
        path = handler.path
        with self.lock:
            self.requests.append((path, {k.lower(): v for k, v in handler.headers.items()}))
        route = self.routes.get(path.split("?")[0])
        if route is None:
            route = Route(status=404, body=b'{"error": "not found"}')
        if route.delay:
            time.sleep(route.delay)
        if route.require_auth and handler.headers.get("Authorization") != route.require_auth:
            route = Route(status=401, body=b'{"error": "Unauthorized"}')
        body = route.body
        if route.head_trickle:
            head = f"HTTP/1.1 {route.status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            for i in range(len(head)):
                try:
                    handler.wfile.write(head[i : i + 1])
                    handler.wfile.flush()
                except OSError:
                    return
                time.sleep(route.head_trickle)
            handler.close_connection = True
            return
        handler.send_response(route.status)
        for k, v in route.headers.items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if route.truncate is not None:
            handler.wfile.write(body[: route.truncate])
            handler.wfile.flush()
            handler.close_connection = True
            return
        if route.trickle:
            for i in range(0, len(body), route.piece):
                try:
                    handler.wfile.write(body[i : i + route.piece])
                    handler.wfile.flush()
                except OSError:
                    return
                time.sleep(route.trickle)
            return
        handler.wfile.write(body)


HTML_ERROR = b"<!DOCTYPE html><html><head><title>Error</title></head><body>Something went wrong</body></html>"
