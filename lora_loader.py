"""LoRA formats, and applying LoRAs to the FLUX transformers (and CLIP) without touching base weights.

Every file format is normalised to ONE canonical form: for each target module of the diffusers
FluxTransformer2DModel / CLIPTextModel, a pair (A [r, in], B [out, r]) in float32 with the
format's alpha folded into B, so that the module's change is exactly ΔW = B @ A.

  * diffusers/PEFT (`transformer.` keys, alpha keys or adapter metadata; also what ai-toolkit
    writes today) and XLabs files go through diffusers' own `FluxLoraLoaderMixin.lora_state_dict`;
  * kohya-style files go through `convert_bfl_family` here: BFL module names (sd-scripts
    `lora_unet_double_blocks_…`, ComfyUI's `diffusion_model.…`, BFL-native `…qkv.lora_A.weight`),
    CLIP keys (`lora_te1_…`, `text_encoders.clip_l.…`) and ai-toolkit's older `lora_transformer_…`.
    diffusers hard-codes FLUX's 3072 width when splitting `linear1`, loads nothing from BFL-native
    lora_A/lora_B names, ignores `final_layer` alphas and maps `lora_transformer_…ff…` layers to
    whole blocks; here fused layers are split by the widths of the model at hand, and kohya's
    underscored names are mapped back through the model's own module names.

Application: at construction, ONE fixed PEFT LoRA adapter is injected into every Linear layer
of each transformer and of CLIP, its ranks split into two regions: "main" (exactly as many ranks
as the deployment's main LoRA, rounded up to a multiple of 8) and "extra" (`max_rank`, the
LORA_MAX_RANK limit for extra LoRAs). Stacking the two LoRAs' ranks in one adapter computes
s₁·B₁·A₁·x + s₂·B₂·A₂·x as one [B₁ B₂]·[A₁; A₂]·x: one pair of small matmuls and one add per
layer instead of two, and no ranks spent on padding the main LoRA up to the extra limit. A
request copies its LoRAs into their regions in place (A padded with zero rows, s·B with zero
columns), so the effect is s·B·A·x once, shapes never change (a compiled model never recompiles
on a swap), base weights are never modified, and a model with no LoRA in effect has its adapter
disabled: exactly the base.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from lora_sources import LoraCache, parse_source

logger = logging.getLogger(__name__)

ADAPTER = "loras"  # the one PEFT adapter holding both regions
REGIONS = ("main", "extra")
RANK_ALIGN = 8  # the main region is rounded up to this (matmul-friendly sizes)
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
                raise ValueError(f"layer {module} has {' and '.join(sorted(parts))} but not both lora_A and lora_B")
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
            raise ValueError(
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
        raise ValueError(f"its layout is not one we can read ({type(e).__name__}: {str(e)[:160]})") from e
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
            raise ValueError(f"layer {module} has only {next(iter(parts))}")
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
    """Read, convert and fully validate a LoRA file against the model's shapes. ValueError on failure."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state_dict = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"LoRA {label}: cannot read it as safetensors ({e}).") from e
    digest = _file_digest(path)
    try:
        pairs, rest, unmatched = convert_bfl_family(state_dict, shapes)
        if rest:
            more, ignored = convert_diffusers_family(rest, metadata, shapes)
            pairs.update(more)
            unmatched += ignored
        lora = _validate(label, digest, pairs, unmatched, shapes, max_rank)
    except ValueError as e:
        raise ValueError(f"LoRA {label}: {e}.") from e
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
            raise ValueError(f"layer {name} is not a linear LoRA (shapes {tuple(down.shape)}, {tuple(up.shape)})")
        if (up.shape[0], down.shape[1]) != expected:
            raise ValueError(
                f"layer {name} is {expected[0]}×{expected[1]} in this model but "
                f"{up.shape[0]}×{down.shape[1]} in the LoRA (a LoRA for another model or size?)"
            )
        if down.shape[0] > max_rank:
            raise ValueError(f"its rank is {down.shape[0]}, over this server's limit of {max_rank} (LORA_MAX_RANK)")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise ValueError(f"layer {name} holds NaN or infinite values")
        rank = max(rank, down.shape[0])
        applied[name] = (down, up)
    if not applied:
        examples = ", ".join(sorted(unmatched)[:3]) or "no LoRA layers at all"
        raise ValueError(f"it matches no layer of this FLUX model (is it a LoRA for another model? it has {examples})")
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for p in applied.values() for t in p}
    return ParsedLora(label, digest, applied, sorted(set(unmatched)), rank, sum(storages.values()))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- the adapter in the models


def _inject_adapter(model: torch.nn.Module, rank: int) -> dict[str, torch.nn.Module]:
    """Give every Linear layer of `model` the fixed LoRA adapter, zero and disabled; returns name → LoRA layer.

    The adapter is created empty (`low_cpu_mem_usage`: no random init of ~1.4 G parameters at
    FLUX scale) and materialised as zeros on each base layer's device and dtype.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    targets = list(_linear_shapes(model))
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER, low_cpu_mem_usage=True)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        for layer in layers.values():
            base = layer.get_base_layer().weight
            for module in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
                module.to_empty(device=base.device).to(base.dtype).weight.zero_()
            if layer.scaling[ADAPTER] != 1.0:
                raise RuntimeError(f"PEFT scales the adapter by {layer.scaling[ADAPTER]}, expected 1")
            layer.set_adapter([ADAPTER], inference_mode=True)
            layer.enable_adapters(False)
    return layers


def _linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """name → (out, in) of every Linear layer, the layers that get the adapter."""
    linears = (item for item in model.named_modules() if isinstance(item[1], torch.nn.Linear))
    return {name: (m.out_features, m.in_features) for name, m in linears}


class LoraManager:
    """Keeps the models at exactly base + lora_scale·ΔW_main + extra_lora_scale·ΔW_extra."""

    def __init__(
        self,
        transformers: list[torch.nn.Module],
        text_encoder: torch.nn.Module | None,
        cache: LoraCache,
        max_rank: int = 128,
        memory_bytes: int = 8 << 30,
        main: Path | None = None,
    ):
        """`main`: the deployment's trained LoRA (None: plain FLUX); its rank sizes the main region.
        `max_rank`: the largest extra LoRA rank served (LORA_MAX_RANK), the extra region's size."""
        self.transformers = list(transformers)
        self.text_encoder = text_encoder
        self.cache = cache
        self.max_rank = int(max_rank)
        self.memory_bytes = int(memory_bytes)
        start = time.monotonic()
        self._models = [*self.transformers, *([text_encoder] if text_encoder is not None else [])]
        self.shapes: dict[str, dict[str, tuple[int, int]]] = {"transformer": {}, "text_encoder": {}}
        for model in self.transformers:
            for name, shape in _linear_shapes(model).items():
                if self.shapes["transformer"].setdefault(name, shape) != shape:
                    raise ValueError(f"the transformers differ in layer {name}; they must share one architecture")
        if text_encoder is not None:
            self.shapes["text_encoder"] = _linear_shapes(text_encoder)
        # The main LoRA is parsed first: its rank, rounded up, is the main region's size.
        self._main = None if main is None else parse_lora(Path(main), Path(main).name, self.shapes, math.inf)
        main_ranks = -(-self._main.rank // RANK_ALIGN) * RANK_ALIGN if self._main else 0
        self.regions = {"main": range(0, main_ranks), "extra": range(main_ranks, main_ranks + self.max_rank)}
        self._layers = {id(m): _inject_adapter(m, self.rank) for m in self._models}
        self._loaded: dict[tuple[int, str], tuple[str, float] | None] = {}
        self._dirty: dict[tuple[int, str], set[str]] = {}
        self._ranks: dict[tuple[int, str], dict[str, int]] = {}
        self._enabled: dict[int, bool] = dict.fromkeys(map(id, self._models), False)
        self._memory: OrderedDict[tuple, ParsedLora] = OrderedDict()
        self._last: tuple | None = None
        logger.info(
            "LoRA adapter of rank %d (main %d + extra %d) in %d layers of %d model(s) in %.2f s",
            self.rank,
            len(self.regions["main"]),
            len(self.regions["extra"]),
            sum(len(v) for v in self._layers.values()),
            len(self._models),
            time.monotonic() - start,
        )
        self._log_main()

    @property
    def rank(self) -> int:
        """The adapter's rank: the main region's ranks plus the extra region's."""
        return self.regions["extra"].stop

    @classmethod
    def from_env(cls, transformers, text_encoder, cache: LoraCache, main: Path | None = None) -> LoraManager:
        """LORA_MAX_RANK (default 128) and LORA_MEMORY_MAX_BYTES (parsed LoRAs kept in RAM, default 8 GiB)."""
        return cls(
            transformers,
            text_encoder,
            cache,
            max_rank=int(os.environ.get("LORA_MAX_RANK", "128")),
            memory_bytes=int(os.environ.get("LORA_MEMORY_MAX_BYTES", str(8 << 30))),
            main=main,
        )

    # ---- what the predictor calls

    def set_main(self, path: Path | None) -> None:
        """Replace the main LoRA (None: plain FLUX); it must fit the main region sized at construction."""
        main = None if path is None else parse_lora(Path(path), Path(path).name, self.shapes, math.inf)
        if main is not None and main.rank > len(self.regions["main"]):
            raise ValueError(
                f"LoRA {main.label}: its rank {main.rank} does not fit the main LoRA's {len(self.regions['main'])} "
                "ranks set up at construction; pass it as `main` when creating the LoraManager"
            )
        self._main = main
        self._last = None
        self._log_main()

    def _log_main(self) -> None:
        if self._main:
            logger.info(
                "LoRA main %s: %d layers, rank %d, %s bytes",
                self._main.label,
                len(self._main.pairs),
                self._main.rank,
                f"{self._main.nbytes:,}",
            )

    def apply(
        self, transformer: torch.nn.Module, lora_scale: float, extra_lora: str | None, extra_lora_scale: float
    ) -> None:
        """Make `transformer` (+ CLIP) base + the requested LoRAs; ValueError leaves the models as they were."""
        if not any(transformer is t for t in self.transformers):
            raise ValueError("apply() was given a transformer this LoraManager does not manage")
        lora_scale, extra_lora_scale = float(lora_scale), float(extra_lora_scale)
        if not (math.isfinite(lora_scale) and math.isfinite(extra_lora_scale)):
            raise ValueError("lora_scale and extra_lora_scale must be finite numbers")
        extra_lora = (extra_lora or "").strip() or None
        main = self._main if self._main is not None and lora_scale != 0 else None
        want_extra = extra_lora if extra_lora is not None and extra_lora_scale != 0 else None
        request = (id(transformer), main and main.digest, lora_scale, want_extra, extra_lora_scale)
        if request == self._last:
            logger.info("LoRA: same set as the previous request, nothing to do")
            return
        start = time.monotonic()
        extra = None
        if want_extra is not None:
            extra = self._parsed(want_extra)  # everything that can fail happens before any tensor is touched
            if main is not None and extra.digest == main.digest:
                logger.info("LoRA extra %s is the main LoRA; applying it once", extra.label)
                extra = None
        try:
            changed = self._set(transformer, main, lora_scale, extra, extra_lora_scale)
        except BaseException:
            self.reset()
            raise
        self._last = request
        logger.info(
            "LoRA applied in %.1f ms (%d layers rewritten): %s",
            (time.monotonic() - start) * 1000,
            changed,
            self._describe(transformer, main, lora_scale, extra, extra_lora_scale),
        )

    def compile_states(self, transformer: torch.nn.Module):
        """Put `transformer` in each state a torch.compile graph is specialised on, yielding in each:
        adapter on, then off. What the adapter holds does not matter (the graph reads its weights as
        tensors), so this works with no main LoRA too. Ends at the exact base model."""
        try:
            for enabled in (True, False):
                self._enable(transformer, enabled)
                yield
        finally:
            self.reset()

    def reset(self) -> None:
        """Back to the exact base model (after a cancelled or failed request)."""
        for model in self._models:
            for region in REGIONS:
                self._fill(model, region, None, 0.0)
            self._enable(model, False)
        self._last = None

    # ---- internals

    def _parsed(self, source: str) -> ParsedLora:
        path = self.cache.fetch(source)
        try:
            stat = path.stat()
        except OSError as e:  # evicted by another process between fetch and here
            raise ValueError(f"LoRA {parse_source(source).label}: the cached file vanished; try again.") from e
        key = (str(path.resolve()), stat.st_ino, stat.st_size)
        label = parse_source(source).label
        if key in self._memory:
            self._memory.move_to_end(key)
            logger.info("LoRA %s: parsed tensors from memory", label)
            return self._memory[key]
        start = time.monotonic()
        lora = parse_lora(path, label, self.shapes, self.max_rank)
        self._memory[key] = lora
        while sum(x.nbytes for x in self._memory.values()) > self.memory_bytes and len(self._memory) > 1:
            self._memory.popitem(last=False)
        logger.info(
            "LoRA %s: parsed %d layers (rank %d) in %.2f s%s",
            lora.label,
            len(lora.pairs),
            lora.rank,
            time.monotonic() - start,
            f"; {len(lora.unmatched)} of its layers match nothing here" if lora.unmatched else "",
        )
        return lora

    def _set(self, transformer, main, lora_scale, extra, extra_scale) -> int:
        changed = 0
        for model in self._models:
            used = model is transformer or model is self.text_encoder
            changed += self._fill(model, "main", main if used else None, lora_scale)
            changed += self._fill(model, "extra", extra if used else None, extra_scale)
            self._enable(model, any(self._loaded.get((id(model), r)) for r in REGIONS))
        return changed

    @torch.no_grad()
    def _fill(self, model, region: str, lora: ParsedLora | None, scale: float) -> int:
        """Copy `lora` at `scale` into `region` of `model`'s layers; zero what it leaves. Returns layers written."""
        key = (id(model), region)
        start, size = self.regions[region].start, len(self.regions[region])
        layers = self._layers[id(model)]
        pairs = lora.components["text_encoder" if model is self.text_encoder else "transformer"] if lora else {}
        pairs = {name: pair for name, pair in pairs.items() if name in layers}
        want = (lora.digest, scale) if pairs and scale != 0 else None
        if self._loaded.get(key) == want:
            return 0
        if want is None:
            pairs = {}
        # Before writing anything: a cancel half-way must still be undone by reset().
        dirty = self._dirty.get(key, set())
        self._dirty[key] = dirty | pairs.keys()
        self._loaded.pop(key, None)
        ranks = self._ranks.setdefault(key, {})  # layer → how many leading ranks of the region may be non-zero
        for name in dirty - pairs.keys():
            used = ranks.pop(name, size)
            layers[name].lora_A[ADAPTER].weight[start : start + used].zero_()
            layers[name].lora_B[ADAPTER].weight[:, start : start + used].zero_()
        for name, (down, up) in pairs.items():
            a = layers[name].lora_A[ADAPTER].weight[start : start + size]
            b = layers[name].lora_B[ADAPTER].weight[:, start : start + size]
            r, used = down.shape[0], ranks.get(name, size)
            ranks[name] = max(r, used)
            a[:r].copy_(down)
            b[:, :r].copy_(up).mul_(scale)  # the one place the scale is applied
            if used > r:  # only the ranks an earlier LoRA wrote need zeroing, not all the padding
                a[r:used].zero_()
                b[:, r:used].zero_()
            ranks[name] = r
        self._dirty[key] = set(pairs)
        self._loaded[key] = want
        return len(dirty | pairs.keys())

    def _enable(self, model, enabled: bool) -> None:
        if self._enabled[id(model)] == enabled:
            return
        for layer in self._layers[id(model)].values():
            layer.enable_adapters(enabled)
            if enabled:
                layer.set_adapter([ADAPTER], inference_mode=True)
        self._enabled[id(model)] = enabled

    def _describe(self, transformer, main, lora_scale, extra, extra_scale) -> str:
        index = next(i for i, t in enumerate(self.transformers) if t is transformer)
        layers = self._layers[id(transformer)]
        parts = []
        for name, lora, scale in (("main", main, lora_scale), ("extra", extra, extra_scale)):
            if lora is None:
                continue
            total = len(lora.components["transformer"])
            hit = sum(1 for m in lora.components["transformer"] if m in layers)
            te = len(lora.components["text_encoder"]) if self.text_encoder is not None else 0
            parts.append(
                f"{name} {lora.label} at {scale:g} on {hit} of {total} transformer layers"
                + (f" + {te} CLIP layers" if te else "")
                + (f" ({len(lora.unmatched)} unmatched)" if lora.unmatched else "")
            )
        return f"transformer {index}: " + ("; ".join(parts) or "no LoRA (base model)")
