"""LoRA file formats: read a safetensors LoRA and normalise it to one canonical form.

For each target module of the diffusers FluxTransformer2DModel / CLIPTextModel, a pair
(A [r, in], B [out, r]) in float32 with the format's alpha folded into B, so that the module's
change is exactly ΔW = B @ A.

  * diffusers/PEFT (`transformer.` keys, alpha keys or adapter metadata; also what ai-toolkit
    writes today) and XLabs files go through diffusers' own `FluxLoraLoaderMixin.lora_state_dict`;
  * kohya-style files go through `convert_bfl_family` here: BFL module names (sd-scripts
    `lora_unet_double_blocks_…`, ComfyUI's `diffusion_model.…`, BFL-native `…qkv.lora_A.weight`),
    CLIP keys (`lora_te1_…`, `text_encoders.clip_l.…`) and ai-toolkit's older `lora_transformer_…`.
    diffusers hard-codes FLUX's 3072 width when splitting `linear1`, loads nothing from BFL-native
    lora_A/lora_B names, ignores `final_layer` alphas and maps `lora_transformer_…ff…` layers to
    whole blocks; here fused layers are split by the widths of the model at hand, and kohya's
    underscored names are mapped back through the model's own module names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from errors import UserError

logger = logging.getLogger(__name__)

Pair = tuple[torch.Tensor, torch.Tensor]  # (A [r, in], B [out, r]), ΔW = B @ A

# ---------------------------------------------------------------- BFL module names → diffusers

# BFL (and kohya, ComfyUI) module names inside one block → the diffusers modules their output
# rows are split into, in order.
_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # BFL (shift, scale) vs diffusers (scale, shift)
}
_SWAP_HALVES = {"norm_out.linear"}
_BFL_TOPS = ("double_blocks.", "single_blocks.", *(f"{name}." for name in _TOP))
_SUFFIX = re.compile(r"^(?P<module>.+?)\.(?:(?P<part>lora_A|lora_B|lora_down|lora_up)\.weight|(?P<alpha>alpha))$")


def bfl_module_map(num_double: int, num_single: int) -> dict[str, tuple[str, ...]]:
    """BFL module name → the diffusers transformer modules it covers (fused layers split in order)."""
    table: dict[str, tuple[str, ...]] = {k: (v,) for k, v in _TOP.items()}
    for i in range(num_double):
        for k, targets in _DOUBLE.items():
            table[f"double_blocks.{i}.{k}"] = tuple(f"transformer_blocks.{i}.{t}" for t in targets)
    for i in range(num_single):
        for k, targets in _SINGLE.items():
            table[f"single_blocks.{i}.{k}"] = tuple(f"single_transformer_blocks.{i}.{t}" for t in targets)
    return table


def _block_counts(transformer_shapes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    def count(prefix: str) -> int:
        indices = [int(m[1]) for n in transformer_shapes if (m := re.match(rf"^{prefix}\.(\d+)\.", n))]
        return max(indices, default=-1) + 1

    return count("transformer_blocks"), count("single_transformer_blocks")


def _family_name(module: str, maps: dict[str, dict[str, str]]) -> tuple[str, str] | None:
    """(naming, module) for a key of the BFL family, else None (the key is left to diffusers).

    naming is "bfl" (BFL module names), "transformer" (diffusers names written kohya-style, as
    ai-toolkit once did), "clip" (CLIPTextModel names) or "t5" (never applied: FLUX's T5 is frozen).
    """
    for prefix, naming in (
        ("lora_unet_", "bfl"),
        ("lora_transformer_", "transformer"),
        ("lora_te1_", "clip"),
        ("lora_te_", "clip"),
    ):
        if module.startswith(prefix):
            rest = module.removeprefix(prefix)
            return naming, maps[naming].get(rest, rest)
    if module.startswith(("lora_te2_", "text_encoders.t5xxl.")):
        return "t5", module
    if module.startswith("text_encoders.clip_l.transformer."):
        return "clip", module.removeprefix("text_encoders.clip_l.transformer.")
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        module = module.removeprefix(prefix)
    if module.startswith(_BFL_TOPS) or module in _TOP:
        return "bfl", module
    return None


def convert_bfl_family(
    state_dict: dict[str, torch.Tensor], shapes: dict[str, dict[str, tuple[int, int]]]
) -> tuple[dict[str, Pair], dict[str, torch.Tensor], list[str]]:
    """Split `state_dict` into the BFL family (converted here) and the rest (for diffusers).

    Returns (canonical pairs keyed "transformer.<module>"/"text_encoder.<module>", the rest, the
    names of modules we recognised as LoRA layers but that this model does not have).
    """
    transformer = shapes.get("transformer", {})
    clip = shapes.get("text_encoder", {})
    table = bfl_module_map(*_block_counts(transformer))
    maps = {  # kohya writes module names with "_" for "."; map them back through the known names
        "bfl": {name.replace(".", "_"): name for name in table},
        "transformer": {name.replace(".", "_"): name for name in transformer},
        "clip": {name.replace(".", "_"): name for name in clip},
    }
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        m = _SUFFIX.match(key)
        family = m and _family_name(m["module"], maps)
        if not family:
            rest[key] = tensor
            continue
        part = "alpha" if m["alpha"] else {"lora_down": "lora_A", "lora_up": "lora_B"}.get(m["part"], m["part"])
        groups.setdefault(family, {})[part] = tensor

    pairs: dict[str, Pair] = {}
    unmatched: list[str] = []
    for (naming, module), parts in groups.items():
        if "lora_A" not in parts or "lora_B" not in parts:
            if set(parts) != {"alpha"}:
                raise UserError(f"layer {module} has {' and '.join(sorted(parts))} but not both lora_A and lora_B")
            continue
        down, up = _fold_alpha(parts["lora_A"], parts["lora_B"], parts.get("alpha"))
        if naming in ("clip", "transformer"):
            component = "text_encoder" if naming == "clip" else "transformer"
            if module in shapes.get(component, {}):
                pairs[f"{component}.{module}"] = (down, up)
            else:
                unmatched.append(module)
            continue
        targets = table.get(module) if naming == "bfl" else None
        if not targets or not all(t in transformer for t in targets):
            unmatched.append(module)
            continue
        widths = [transformer[t][0] for t in targets]  # split fused layers by this model's widths
        if up.ndim != 2 or up.shape[0] != sum(widths):
            raise UserError(
                f"layer {module} has {up.shape[0] if up.ndim else '?'} outputs in the LoRA but "
                f"{sum(widths)} in this model (a LoRA for another model or size?)"
            )
        for target, piece in zip(targets, torch.split(up, widths, dim=0), strict=True):
            if target in _SWAP_HALVES:
                piece = torch.cat(piece.chunk(2, dim=0)[::-1])
            pairs[f"transformer.{target}"] = (down, piece.contiguous())
    return pairs, rest, unmatched


def _fold_alpha(down: torch.Tensor, up: torch.Tensor, alpha, rslora: bool = False) -> Pair:
    down = down.to(torch.float32)
    up = up.to(torch.float32)
    rank = down.shape[0] if down.ndim else 0
    if alpha is None or rank == 0:
        return down, up
    alpha = float(alpha.item() if torch.is_tensor(alpha) else alpha)
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    return down, up * scale if scale != 1.0 else up


# ---------------------------------------------------------------- diffusers-named formats


_DIFFUSERS_PAIR = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|"
    r"lora_linear_layer\.down|lora_linear_layer\.up)(?:\.default)?\.weight$"
)


def convert_diffusers_family(
    state_dict: dict[str, torch.Tensor], metadata: dict[str, str], shapes: dict[str, dict[str, tuple[int, int]]]
) -> tuple[dict[str, Pair], list[str]]:
    """diffusers/PEFT, ai-toolkit and XLabs files, through diffusers' own converters."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    try:
        converted, alphas = FluxLoraLoaderMixin.lora_state_dict(dict(state_dict), return_alphas=True)
    except Exception as e:  # the converters raise all sorts (KeyError, AssertionError, ValueError)
        raise UserError(f"its layout is not one we can read ({type(e).__name__}: {str(e)[:160]})") from e
    alphas = {k.removesuffix(".alpha"): v for k, v in (alphas or {}).items()}
    adapter = _adapter_metadata(metadata)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    ignored: list[str] = []
    for key, tensor in converted.items():
        m = _DIFFUSERS_PAIR.match(key)
        if not m:
            ignored.append(key)
            continue
        part = "lora_A" if m["part"] in ("lora_A", "lora_down", "lora.down", "lora_linear_layer.down") else "lora_B"
        groups.setdefault(m["module"], {})[part] = tensor
    pairs: dict[str, Pair] = {}
    for module, parts in groups.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise UserError(f"layer {module} has only {next(iter(parts))}")
        name = _component_name(module, shapes)
        component = name.split(".", 1)[0]
        alpha = alphas.get(module)
        if alpha is None:
            alpha = _metadata_alpha(adapter, component, name.split(".", 1)[1])
        rslora = bool(adapter.get(f"{component}.use_rslora", adapter.get("use_rslora", False)))
        pairs[name] = _fold_alpha(parts["lora_A"], parts["lora_B"], alpha, rslora)
    return pairs, ignored


def _component_name(module: str, shapes: dict[str, dict[str, tuple[int, int]]]) -> str:
    for component in ("transformer", "text_encoder"):
        if module.startswith(f"{component}."):
            return module
    for prefix in ("base_model.model.", "unet."):  # PEFT's wrapper prefix
        module = module.removeprefix(prefix)
    if module in shapes.get("text_encoder", {}) and module not in shapes.get("transformer", {}):
        return f"text_encoder.{module}"
    return f"transformer.{module}"  # a transformer saved without its prefix (save_lora_adapter)


def _adapter_metadata(metadata: dict[str, str]) -> dict:
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        logger.warning("LoRA adapter metadata is not JSON; ignoring it")
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _metadata_alpha(adapter: dict, component: str, module: str):
    """PEFT's alpha for `module` from adapter metadata (prefixed by component, or flat), or None."""
    for prefix in (f"{component}.", ""):
        patterns = adapter.get(f"{prefix}alpha_pattern") or {}
        for pattern, value in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        if f"{prefix}lora_alpha" in adapter:
            return adapter[f"{prefix}lora_alpha"]
    return None


# ---------------------------------------------------------------- one parsed LoRA


@dataclass
class ParsedLora:
    label: str
    digest: str  # sha256 of the file: the same LoRA from two places is one LoRA
    pairs: dict[str, Pair]  # "transformer.<module>" / "text_encoder.<module>" → (A, B)
    unmatched: list[str] = field(default_factory=list)
    rank: int = 0
    nbytes: int = 0

    @cached_property
    def components(self) -> dict[str, dict[str, Pair]]:
        """{"transformer": {module: pair}, "text_encoder": {module: pair}}."""
        split: dict[str, dict[str, Pair]] = {"transformer": {}, "text_encoder": {}}
        for key, pair in self.pairs.items():
            component, module = key.split(".", 1)
            split[component][module] = pair
        return split


def parse_lora(path: Path, label: str, shapes: dict[str, dict[str, tuple[int, int]]], max_rank: int) -> ParsedLora:
    """Read, convert and fully validate a LoRA file against the model's shapes. UserError on failure."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state_dict = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"LoRA {label}: cannot read it as safetensors ({e}).") from e
    digest = _file_digest(path)
    try:
        pairs, rest, unmatched = convert_bfl_family(state_dict, shapes)
        if rest:
            more, ignored = convert_diffusers_family(rest, metadata, shapes)
            pairs.update(more)
            unmatched += ignored
        lora = _validate(label, digest, pairs, unmatched, shapes, max_rank)
    except UserError as e:
        raise UserError(f"LoRA {label}: {e}.") from e
    return lora


def _validate(label, digest, pairs, unmatched, shapes, max_rank) -> ParsedLora:
    applied: dict[str, Pair] = {}
    rank = 0
    for name, (down, up) in pairs.items():
        component, module = name.split(".", 1)
        expected = shapes.get(component, {}).get(module)
        if expected is None:
            unmatched.append(name)
            continue
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise UserError(f"layer {name} is not a linear LoRA (shapes {tuple(down.shape)}, {tuple(up.shape)})")
        if (up.shape[0], down.shape[1]) != expected:
            raise UserError(
                f"layer {name} is {expected[0]}×{expected[1]} in this model but "
                f"{up.shape[0]}×{down.shape[1]} in the LoRA (a LoRA for another model or size?)"
            )
        if down.shape[0] > max_rank:
            raise UserError(f"its rank is {down.shape[0]}, over this server's limit of {max_rank} (LORA_MAX_RANK)")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise UserError(f"layer {name} holds NaN or infinite values")
        rank = max(rank, down.shape[0])
        applied[name] = (down, up)
    if not applied:
        examples = ", ".join(sorted(unmatched)[:3]) or "no LoRA layers at all"
        raise UserError(f"it matches no layer of this FLUX model (is it a LoRA for another model? it has {examples})")
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for p in applied.values() for t in p}
    return ParsedLora(label, digest, applied, sorted(set(unmatched)), rank, sum(storages.values()))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
