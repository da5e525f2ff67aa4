"""LoRA file formats: read a safetensors LoRA and normalise it to one canonical form.

For each target module of the diffusers FluxTransformer2DModel / CLIPTextModel, a pair
(A [r, in], B [out, r]) in float32 with the format's alpha folded into B (B stored column-major, as
lora_loader's adapter holds it, so applying it is one contiguous copy), so that the module's
change is exactly ΔW = B @ A.

Every tensor of a file is accounted for: it goes into a pair that is applied, or it belongs to a
layer this model does not have (tolerated and logged: a LoRA for a bigger model, `guidance_in` on
schnell), or the file is refused with one line naming the kind of tensor we cannot apply (DoRA,
LoKr, LoHa, biases, full weight differences, …). A LoRA is never applied partially in silence.

Key layouts read here, by the tools that write them (a key is <prefix><module><suffix>):

  * diffusers / PEFT: `transformer.<diffusers module>.lora_A.weight` (DreamBooth and SimpleTuner
    via `save_lora_weights`, ai-toolkit, OneTrainer's DIFFUSERS format, Replicate's trainers),
    unprefixed (`save_lora_adapter`), `base_model.model.` (PEFT's `PeftModel.save_pretrained`;
    fal's Kontext trainer with BFL names), PEFT adapter names (`lora_A.default.weight`); alphas as
    `<module>.alpha`, `<module>.lora_A.weight.alpha` (TheLastBen's files, cited by diffusers'
    `test_with_alpha_in_state_dict`) or `lora_adapter_metadata` (diffusers ≥ 0.34);
  * kohya sd-scripts `networks/lora_flux.py`: `lora_unet_<BFL module, "_" for ".">.lora_down.weight`
    + `.alpha`, CLIP as `lora_te1_text_model_encoder_layers_…`, T5 as `lora_te3_…` (OneTrainer's
    KOHYA format: `lora_te2_…`); `split_qkv` files store block-diagonal fused weights;
  * OneTrainer's LEGACY format: `lora_transformer_<diffusers module, "_" for ".">` + `lora_te1_…`;
    its ORIGINAL / COMFY formats: BFL names with lora_A/lora_B and `.alpha`;
  * ComfyUI (LoraSave, the training node): `diffusion_model.<BFL module>.lora_up.weight`, CLIP as
    `text_encoders.clip_l.transformer.text_model.…`, T5 as `text_encoders.t5xxl.transformer.…`;
  * XLabs x-flux: `double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight` and
    `single_blocks.N.processor.{qkv,proj}_lora.…`.

CLIP layers are matched by what the file says, with or without the `text_model.` level: CLIPTextModel
has it under transformers 4 and not under 5, and files from both eras exist; the names are mapped to
whatever the loaded model calls its modules. Fused BFL layers (`qkv`, `linear1`) are split by the
widths of the model at hand (diffusers hard-codes FLUX's 3072). diffusers itself is not used here:
its loader drops what it does not understand with a warning (see tests/test_lora_oracle.py, which
uses it as the oracle for what a file means).
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
Shapes = dict[str, dict[str, tuple[int, int]]]  # component → module → (out, in)

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
_BFL_TOPS = ("double_blocks.", "single_blocks.", *(f"{name}." for name in _TOP))
# XLabs' attention-processor LoRAs, as BFL layers (x-flux src/flux/modules/layers.py). The single
# blocks' qkv_lora adds to linear1's q, k and v rows only; proj_lora is linear2 (input 3072 + 12288).
_XLABS = re.compile(
    r"^(?:diffusion_model\.)?(?P<kind>double|single)_blocks\.(?P<i>\d+)\.processor\."
    r"(?P<proc>qkv_lora1|proj_lora1|qkv_lora2|proj_lora2|qkv_lora|proj_lora)\.(?P<part>down|up)\.weight$"
)
_XLABS_DOUBLE = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv"}
_XLABS_DOUBLE["proj_lora2"] = "txt_attn.proj"


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


# ---------------------------------------------------------------- what each key is

# A LoRA pair's halves. PEFT may keep the adapter's name (`lora_A.default.weight`); diffusers' old
# text-encoder format says `lora_linear_layer.down`; kohya says lora_down / lora_up.
_PAIR = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|lora_linear_layer\.down|"
    r"lora_linear_layer\.up)(?:\.[A-Za-z0-9_-]+)?\.weight$"
)
_DOWN = {"lora_A", "lora_down", "lora.down", "lora_linear_layer.down"}
# kohya, ComfyUI, OneTrainer: `<module>.alpha`; TheLastBen's files: `<module>.lora_A.weight.alpha`.
_ALPHA = re.compile(r"^(?P<module>.+?)(?:\.(?:lora_A|lora_down)(?:\.[A-Za-z0-9_-]+)?\.weight)?\.alpha$")

# Tensors of kinds we cannot apply: (pattern on the key, what to call them, harmless when all zero).
# The adapter in lora_loader is a plain LoRA (B·A added to a frozen base weight), so a DoRA magnitude
# (which rescales the whole weight), a bias, a full-weight difference or a Kronecker/Hadamard product
# cannot be represented; an all-zero difference or bias changes nothing, so it is tolerated.
_ADAPTER = r"(?:\.[A-Za-z0-9_-]+)?"  # PEFT's adapter name in a key, if any
_UNSUPPORTED = [
    (
        rf"\.(?P<name>lora_magnitude_vector|dora_scale|magnitude){_ADAPTER}(?:\.weight)?$",
        "DoRA magnitude vectors",
        False,
    ),
    (rf"\.(?P<name>(?:lora_B|lora_up){_ADAPTER}\.bias)$", "LoRA biases", True),
    (r"\.(?P<name>diff|diff_b|w_norm|b_norm|set_weight)$", "full weight or bias differences", True),
    (r"\.(?P<name>hada_w[12]_[ab]|hada_t[12])$", "LoHa layers", False),
    (r"\.(?P<name>lokr_w[12](?:_[ab])?|lokr_t[12])$", "LoKr layers", False),
    (r"\.(?P<name>lora_mid)\.weight$", "LoCon/Tucker middle layers", False),
    (r"\.(?P<name>oft_blocks|oft_R|oft_r|oft_diag|scaled_oft|rescale)(?:\.weight)?$", "OFT/BOFT layers", False),
    (r"\.(?P<name>a1|a2|b1|b2)\.weight$", "GLoRA layers", False),
    (rf"\.(?P<name>ia3_l){_ADAPTER}(?:\.weight)?$", "IA³ vectors", False),
    (
        r"(?P<name>(?:query|key)_norm\.scale|norm_(?:added_)?[qk]\.weight)$",
        "normalisation-layer weights (of a FLUX Control LoRA?)",
        False,
    ),
    (r"^(?P<name>bundle_emb|emb_params|string_to_param)\b", "bundled text embeddings", False),
]
_UNSUPPORTED_RE = [(re.compile(p), what, zero_ok) for p, what, zero_ok in _UNSUPPORTED]

# T5 parts. FLUX's T5 encoder gets no adapter here (lora_loader adapts the transformers and CLIP
# only, and no common FLUX trainer trains T5 by default: kohya's `train_t5xxl` and OneTrainer's
# text_encoder_2 are opt-in). Applying the rest of such a LoRA without its T5 part would serve a
# different LoRA than the one trained, so a T5 part that changes anything is refused; an all-zero
# one (ComfyUI writes those) changes nothing and is tolerated with a log line. diffusers drops
# both kinds with an info message.
_T5_PREFIXES = ("lora_te2_", "lora_te3_", "text_encoders.t5xxl.", "text_encoder_2.")
_CLIP_UNDERSCORED = ("lora_te1_", "lora_te_")
_CLIP_DOTTED = ("text_encoders.clip_l.transformer.", "text_encoders.clip_l.", "text_encoder.")
_WRAPPERS = ("base_model.model.", "model.diffusion_model.", "diffusion_model.")


@dataclass
class _Layer:
    """One layer of the file: its tensors and where they go."""

    name: str  # the module as the file names it (for messages)
    component: str  # "transformer", "text_encoder", "t5" or "clip_embedding"
    targets: tuple[str, ...] | None  # this model's modules its rows split into; None: a layer we lack
    bfl: bool = False  # named as BFL's model names its modules (kohya, ComfyUI, XLabs, BFL itself)
    swap: bool = False  # BFL's final modulation: (shift, scale) rows where diffusers has (scale, shift)
    keys: dict[str, str] = field(default_factory=dict)  # "lora_A" / "lora_B" / "alpha" → file key


class _Names:
    """This model's module names, and every spelling of them the formats use."""

    def __init__(self, shapes: Shapes):
        self.transformer = shapes.get("transformer", {})
        self.clip = shapes.get("text_encoder", {})
        self.bfl = bfl_module_map(*_block_counts(self.transformer))
        self.bfl_underscored = {name.replace(".", "_"): name for name in self.bfl}
        self.transformer_underscored = {name.replace(".", "_"): name for name in self.transformer}
        # CLIP: the file may say `text_model.encoder…` or `encoder…`, whatever the model calls it.
        self.clip_canonical = {name.removeprefix("text_model."): name for name in self.clip}
        self.clip_underscored = {}
        for canonical, name in self.clip_canonical.items():
            underscored = canonical.replace(".", "_")
            self.clip_underscored[underscored] = name
            self.clip_underscored[f"text_model_{underscored}"] = name

    def layer(self, module: str) -> _Layer:
        """Where the LoRA layer the file calls `module` goes (not checking shapes yet)."""
        if module.startswith(_T5_PREFIXES):
            return _Layer(module, "t5", None)
        for prefix in _CLIP_UNDERSCORED:
            if module.startswith(prefix):
                return self._clip(module, self.clip_underscored.get(module.removeprefix(prefix)))
        for prefix in _CLIP_DOTTED:
            if module.startswith(prefix):
                return self._clip(module, self._clip_dotted(module.removeprefix(prefix)))
        if module.startswith("lora_unet_"):
            rest = module.removeprefix("lora_unet_")
            if rest in self.bfl_underscored:
                return self._bfl(module, self.bfl_underscored[rest])
            if rest in self.transformer_underscored:
                return self._transformer(module, self.transformer_underscored[rest])
            return _Layer(module, "transformer", None, bfl=rest.startswith(("double_blocks_", "single_blocks_")))
        if module.startswith("lora_transformer_"):
            return self._transformer(module, self.transformer_underscored.get(module.removeprefix("lora_transformer_")))
        rest, previous = module, None
        while rest != previous:  # e.g. SimpleTuner's "transformer.base_model.model."
            previous = rest
            for prefix in (*_WRAPPERS, "transformer."):
                rest = rest.removeprefix(prefix)
        if rest.startswith(_BFL_TOPS) or rest in _TOP:
            return self._bfl(module, rest)
        if rest in self.transformer:
            return _Layer(module, "transformer", (rest,))
        clip = self._clip_dotted(rest)
        if clip is not None:
            return self._clip(module, clip)
        if rest.startswith(("text_model.", "encoder.layers.")):
            return _Layer(module, "text_encoder", None)
        return _Layer(module, "transformer", None)  # a layer of some other transformer (or model)

    def _clip_dotted(self, rest: str) -> str | None:
        return self.clip_canonical.get(rest.removeprefix("text_model."))

    def _clip(self, module: str, name: str | None) -> _Layer:
        if name is None and re.search(r"(^|[._])embeddings([._]|$)", module):
            return _Layer(module, "clip_embedding", None)
        return _Layer(module, "text_encoder", (name,) if name else None)

    def _bfl(self, module: str, bfl: str) -> _Layer:
        targets = self.bfl.get(bfl)
        if targets is None or not all(t in self.transformer for t in targets):
            targets = None
        return _Layer(module, "transformer", targets, bfl=True, swap=bfl == "final_layer.adaLN_modulation.1")

    def _transformer(self, module: str, name: str | None) -> _Layer:
        return _Layer(module, "transformer", (name,) if name else None)

    def xlabs(self, m: re.Match) -> _Layer:
        module = m.string[: m.start("part") - 1]
        i = m["i"]
        if m["kind"] == "double":
            return self._bfl(module, f"double_blocks.{i}.{_XLABS_DOUBLE[m['proc']]}")
        if m["proc"] == "proj_lora":
            return self._bfl(module, f"single_blocks.{i}.linear2")
        targets = tuple(f"single_transformer_blocks.{i}.attn.{t}" for t in ("to_q", "to_k", "to_v"))
        return _Layer(module, "transformer", targets if all(t in self.transformer for t in targets) else None, bfl=True)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _is_zero(tensor: torch.Tensor) -> bool:
    return not bool(torch.count_nonzero(tensor))


def _key_part(key: str, names: _Names) -> tuple[_Layer, str] | None:
    """(the layer, "lora_A" / "lora_B" / "alpha") for a key of a LoRA pair, else None."""
    if m := _XLABS.match(key):
        return names.xlabs(m), "lora_A" if m["part"] == "down" else "lora_B"
    if m := _PAIR.match(key):
        return names.layer(m["module"]), "lora_A" if m["part"] in _DOWN else "lora_B"
    if m := _ALPHA.match(key):
        return names.layer(m["module"]), "alpha"
    return None


def _read_layers(state_dict: dict[str, torch.Tensor], names: _Names) -> tuple[dict[str, _Layer], list[str]]:
    """Group the file's keys by layer. Raises UserError for tensors of a kind we cannot apply.

    Returns (layers by the file's module name, keys tolerated because they are all zero)."""
    layers: dict[str, _Layer] = {}
    unsupported: dict[str, dict[str, str]] = {}  # what → {key: the kind's name in it}
    tolerated: list[str] = []
    for key, tensor in state_dict.items():
        if found := _key_part(key, names):
            layer, part = found
        else:
            for pattern, what, zero_ok in _UNSUPPORTED_RE:
                if found := pattern.search(key):
                    if zero_ok and _is_zero(tensor):
                        tolerated.append(key)
                    else:
                        unsupported.setdefault(what, {})[key] = found["name"]
                    break
            else:
                unsupported.setdefault("tensors of an unknown kind", {})[key] = ""
            continue
        layer = layers.setdefault(layer.name, layer)
        if part in layer.keys:
            raise UserError(f"layer {layer.name} has two {part} tensors ({layer.keys[part]} and {key})")
        layer.keys[part] = key
    if unsupported:
        what, keys = next(iter(unsupported.items()))
        kinds = ", ".join(dict.fromkeys(name for name in keys.values() if name))
        what += f" ({kinds})" if kinds else ""
        more = f"; and {len(unsupported) - 1} other kind(s) of tensor" if len(unsupported) > 1 else ""
        raise UserError(f"{what} are not supported ({_count(len(keys), 'tensor')}, e.g. {next(iter(keys))}){more}")
    return layers, tolerated


# ---------------------------------------------------------------- alphas


def _alpha_value(key: str, tensor: torch.Tensor) -> float:
    if tensor.numel() != 1:
        raise UserError(f"alpha {key} holds {tensor.numel()} values instead of one")
    value = float(tensor.reshape(()).to(torch.float64))
    if not math.isfinite(value):
        raise UserError(f"alpha {key} is {value}")
    return value


def _fold_alpha(down: torch.Tensor, up: torch.Tensor, alpha: float | None, rslora: bool = False) -> Pair:
    """float32 (A, B·scale). alpha None or 0 means alpha = rank, as kohya's LoRAModule reads it."""
    down = down.to(torch.float32)
    up = up.to(torch.float32)
    rank = down.shape[0] if down.ndim else 0
    if not alpha or rank == 0:
        return down, up
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    return down, up * scale if scale != 1.0 else up


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
        for pattern, value in patterns.items():  # peft.utils.other.get_pattern_key's rule, either CLIP spelling
            if any(re.match(rf"(.*\.)?({pattern})$", name) for name in (module, f"text_model.{module}")):
                return value
        if f"{prefix}lora_alpha" in adapter:
            return adapter[f"{prefix}lora_alpha"]
    return None


# ---------------------------------------------------------------- fused layers


def _split_rows(down: torch.Tensor, up: torch.Tensor, widths: list[int]) -> list[Pair]:
    """A fused layer's pair → one pair per target. kohya's `split_qkv` (and its own conversion of
    diffusers LoRAs) stores a block-diagonal B with the ranks concatenated: each target then gets
    its own rank block instead of the whole (n× larger) rank."""
    n, rank = len(widths), down.shape[0]
    pieces = torch.split(up, widths, dim=0)
    if n > 1 and rank % n == 0:
        r = rank // n
        blocks = [piece[:, j * r : (j + 1) * r] for j, piece in enumerate(pieces)]
        if all(_is_zero(torch.cat([piece[:, : j * r], piece[:, (j + 1) * r :]], 1)) for j, piece in enumerate(pieces)):
            return [(down[j * r : (j + 1) * r], block) for j, block in enumerate(blocks)]
    return [(down, piece) for piece in pieces]


# ---------------------------------------------------------------- one parsed LoRA


@dataclass
class ParsedLora:
    label: str
    digest: str  # sha256 of the file: the same LoRA from two places is one LoRA
    pairs: dict[str, Pair]  # "transformer.<module>" / "text_encoder.<module>" → (A, B)
    unmatched: list[str] = field(default_factory=list)  # the file's layers this model does not have
    rank: int = 0
    nbytes: int = 0
    applied: dict[str, int] = field(default_factory=dict)  # component → how many of the file's tensors apply

    @cached_property
    def components(self) -> dict[str, dict[str, Pair]]:
        """{"transformer": {module: pair}, "text_encoder": {module: pair}}."""
        split: dict[str, dict[str, Pair]] = {"transformer": {}, "text_encoder": {}}
        for key, pair in self.pairs.items():
            component, module = key.split(".", 1)
            split[component][module] = pair
        return split


def parse_lora(path: Path, label: str, shapes: Shapes, max_rank: int) -> ParsedLora:
    """Read, convert and fully validate a LoRA file against the model's shapes. UserError on failure."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from loras.files import check_safetensors

    try:
        check_safetensors(path)  # the header alone first: dtypes, offsets, size (also for the operator's main)
    except UserError as e:
        raise UserError(f"LoRA {label}: {e}.") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state_dict = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"LoRA {label}: cannot read it as safetensors ({e}).") from e
    digest = _file_digest(path)
    try:
        lora = _parse(label, digest, state_dict, metadata, shapes, max_rank)
    except UserError as e:
        raise UserError(f"LoRA {label}: {e}.") from e
    return lora


def _parse(label, digest, state_dict, metadata, shapes: Shapes, max_rank) -> ParsedLora:
    for key, tensor in state_dict.items():
        # An integer alpha is a number like any other: kohya's flux_extract_lora.py stores torch.tensor(rank),
        # int64, unless --save_precision is given. Any other tensor must be floating point.
        integer_alpha = key.endswith(".alpha") and tensor.numel() == 1 and not tensor.is_complex()
        if not tensor.is_floating_point() and not (integer_alpha and tensor.dtype != torch.bool):
            raise UserError(f"tensor {key} is {str(tensor.dtype).removeprefix('torch.')}, not floating point")
    names = _Names(shapes)
    layers, tolerated = _read_layers(state_dict, names)
    adapter = _adapter_metadata(metadata)
    pairs: dict[str, Pair] = {}
    sources: dict[str, str] = {}  # pair name → the file's layer it came from
    applied: dict[str, int] = {}
    unmatched: list[str] = []
    targeted: dict[str, list[str]] = {}  # component → the file's layers aimed at it
    refused: list[_Layer] = []  # T5 and CLIP-embedding layers that would change something
    for layer in layers.values():
        parts = layer.keys
        if "lora_A" not in parts or "lora_B" not in parts:
            if set(parts) != {"alpha"}:
                raise UserError(f"layer {layer.name} has {' and '.join(sorted(parts))} but not both lora_A and lora_B")
            logger.debug("LoRA %s: alpha %s has no weights beside it; it changes nothing", label, parts["alpha"])
            continue
        down, up = state_dict[parts["lora_A"]], state_dict[parts["lora_B"]]
        if layer.component in ("t5", "clip_embedding"):
            if _is_zero(down) or _is_zero(up):
                tolerated += parts.values()
            else:
                refused.append(layer)  # after the checks below: a LoRA for another model is told so first
            continue
        targeted.setdefault(layer.component, []).append(layer.name)
        if layer.targets is None:
            unmatched.append(layer.name)
            continue
        alpha = _alpha_value(parts["alpha"], state_dict[parts["alpha"]]) if "alpha" in parts else None
        component = layer.component
        if alpha is None and adapter:
            alpha = _metadata_alpha(adapter, component, layer.targets[0])
        rslora = bool(adapter.get(f"{component}.use_rslora", adapter.get("use_rslora", False)))
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise UserError(f"layer {layer.name} is not a linear LoRA (shapes {tuple(down.shape)}, {tuple(up.shape)})")
        down, up = _fold_alpha(down, up, alpha, rslora)
        model = shapes[component]
        widths = [model[t][0] for t in layer.targets]
        if up.shape[0] != sum(widths):
            raise UserError(
                f"layer {layer.name} has {up.shape[0]} outputs in the LoRA but {sum(widths)} in this model "
                "(a LoRA for another model or size?)"
            )
        for target, (a, b) in zip(layer.targets, _split_rows(down, up, widths), strict=True):
            if layer.swap:
                b = torch.cat(b.chunk(2, dim=0)[::-1])
            name = f"{component}.{target}"
            if name in pairs:
                raise UserError(f"layer {target} appears twice in the file (as {sources[name]} and {layer.name})")
            pairs[name] = (a.contiguous(), b.t().contiguous().t())  # B column-major, as the adapter holds it
            sources[name] = layer.name
        applied[component] = applied.get(component, 0) + len(parts)
    if tolerated:
        logger.info("LoRA %s: %d all-zero tensors change nothing (e.g. %s)", label, len(tolerated), tolerated[0])
    if refused and not pairs:
        _refuse(refused)
    lora = _validate(label, digest, pairs, unmatched, shapes, max_rank)
    lora.applied = applied
    _check_components(label, lora, targeted, shapes)
    if refused:
        _refuse(refused)
    return lora


def _refuse(layers: list[_Layer]) -> None:
    first = layers[0]
    if first.component == "t5":
        raise UserError(
            f"T5 text-encoder layers are not supported ({_count(len(layers), 'layer')}, e.g. {first.name}; "
            "FLUX's T5 encoder is frozen here)"
        )
    raise UserError(f"LoRA on CLIP's embeddings is not supported ({first.name}; only CLIP's linear layers are)")


def _check_components(label: str, lora: ParsedLora, targeted: dict[str, list[str]], shapes: Shapes) -> None:
    """A component the file clearly aims at must get something; log the layers it does not."""
    if targeted.get("transformer") and not lora.applied.get("transformer"):
        examples = ", ".join(sorted(targeted["transformer"])[:3])
        raise UserError(f"it matches no layer of this FLUX model (is it a LoRA for another model? it has {examples})")
    clip = targeted.get("text_encoder", [])
    if clip and not lora.applied.get("text_encoder"):
        if not shapes.get("text_encoder"):
            logger.warning("LoRA %s: its %d CLIP layers are not applied (no CLIP adapter here)", label, len(clip))
        else:
            raise UserError(
                f"its CLIP text-encoder part ({_count(len(clip), 'layer')}, e.g. {clip[0]}) matches no layer of this "
                "model's CLIP text encoder"
            )
    if lora.unmatched:
        logger.info(
            "LoRA %s: %d of its layers are not in this model and are skipped (e.g. %s)",
            label,
            len(lora.unmatched),
            ", ".join(lora.unmatched[:3]),
        )


def _validate(label, digest, pairs, unmatched, shapes, max_rank) -> ParsedLora:
    applied: dict[str, Pair] = {}
    rank = 0
    for name, (down, up) in pairs.items():
        component, module = name.split(".", 1)
        expected = shapes[component][module]
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
