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
from loras.deltas import Delta
from untrusted import printable

logger = logging.getLogger(__name__)

ERROR_CHARS = 1_000  # an error about a file: its own tensor names, escaped, never cut short of the point

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

# Parts of layers that are not a plain LoRA pair (loras/deltas.py applies them by writing the weights):
# LyCORIS LoKr and LoHa (`lycoris-lora` modules/lokr.py, loha.py), full differences (`diff`, `diff_b`:
# LyCORIS "full", ComfyUI's model diff) and DoRA magnitudes (kohya/LyCORIS `dora_scale`, PEFT's
# `lora_magnitude_vector`, with or without an adapter name).
_WEIGHT_PARTS = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a|lokr_w2_b|hada_w1_a|hada_w1_b|"
    r"hada_w2_a|hada_w2_b|diff|diff_b|dora_scale)$"
)
_MAGNITUDE = re.compile(r"^(?P<module>.+?)\.lora_magnitude_vector(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$")
# Which parts make which kind of layer (see loras.deltas.Delta).
_KINDS = {
    "lora": ({"lora_A", "lora_B"}, set()),
    "lokr": (set(), {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}),
    "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, set()),
    "full": ({"diff"}, {"diff_b"}),
}
_OPTIONAL = {"alpha", "magnitude"}

# Tensors of kinds we cannot apply: (pattern on the key, what to call them, harmless when all zero).
# A LoRA bias, LyCORIS' Tucker cores (convolutions only) and OFT-like rotations have no meaning for
# the update kinds above; an all-zero bias or norm difference changes nothing, so it is tolerated.
_ADAPTER = r"(?:\.[A-Za-z0-9_-]+)?"  # PEFT's adapter name in a key, if any
_UNSUPPORTED = [
    (rf"\.(?P<name>magnitude){_ADAPTER}(?:\.weight)?$", "DoRA magnitude vectors of an unknown layout", False),
    (rf"\.(?P<name>(?:lora_B|lora_up){_ADAPTER}\.bias)$", "LoRA biases", True),
    (r"\.(?P<name>w_norm|b_norm|set_weight)$", "normalisation-layer weight differences", True),
    (r"\.(?P<name>hada_t[12]|lokr_t[12])$", "LoHa/LoKr Tucker cores (convolution layers)", False),
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

# T5-XXL parts (ComfyUI's model_lora_keys_clip maps the same three spellings): kohya sd-scripts'
# `train_t5xxl` writes `lora_te3_`, OneTrainer's KOHYA format `lora_te2_`, ComfyUI
# `text_encoders.t5xxl.transformer.`; diffusers' own is `text_encoder_2.`. T5 has no adapter: its
# parts are written into its weights (loras/deltas.py). All-zero parts (ComfyUI writes those) are
# skipped; a server built without T5 refuses a T5 part that changes something.
_T5_UNDERSCORED = ("lora_te3_", "lora_te2_")
_T5_DOTTED = ("text_encoders.t5xxl.transformer.", "text_encoders.t5xxl.", "text_encoder_2.")
_T5_PREFIXES = (*_T5_UNDERSCORED, *_T5_DOTTED)
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
        self.t5 = shapes.get("t5", {})
        self.t5_underscored = {name.replace(".", "_"): name for name in self.t5}
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
        for prefix in _T5_UNDERSCORED:
            if module.startswith(prefix):
                return self._t5(module, self.t5_underscored.get(module.removeprefix(prefix)))
        for prefix in _T5_DOTTED:
            if module.startswith(prefix):
                rest = module.removeprefix(prefix)
                return self._t5(module, rest if rest in self.t5 else None)
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
        if module.startswith("lycoris_"):  # LyCORIS (SimpleTuner): the diffusers module path, "_" for "."
            rest = module.removeprefix("lycoris_")
            if rest in self.bfl_underscored:
                return self._bfl(module, self.bfl_underscored[rest])
            return self._transformer(module, self.transformer_underscored.get(rest))
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

    def _t5(self, module: str, name: str | None) -> _Layer:
        return _Layer(module, "t5", (name,) if name else None)

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
    """(the layer, which part: "lora_A", "lora_B", "alpha", "lokr_w1", …, "diff", "magnitude") for a key of a
    layer we can apply, else None."""
    if m := _XLABS.match(key):
        return names.xlabs(m), "lora_A" if m["part"] == "down" else "lora_B"
    if m := _PAIR.match(key):
        return names.layer(m["module"]), "lora_A" if m["part"] in _DOWN else "lora_B"
    if m := _WEIGHT_PARTS.match(key):
        return names.layer(m["module"]), "magnitude" if m["part"] == "dora_scale" else m["part"]
    if m := _MAGNITUDE.match(key):
        return names.layer(m["module"]), "magnitude"
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
    pairs: dict[str, Pair]  # "transformer.<module>" / "text_encoder.<module>" → (A, B): the rank adapter's part
    unmatched: list[str] = field(default_factory=list)  # the file's layers this model does not have
    rank: int = 0  # of the pairs (0: none)
    nbytes: int = 0
    applied: dict[str, int] = field(default_factory=dict)  # component → how many of the file's tensors apply
    # "<component>.<module>" → the update written into that weight (LoKr, LoHa, full, DoRA, every T5 part).
    deltas: dict[str, Delta] = field(default_factory=dict)

    @cached_property
    def components(self) -> dict[str, dict[str, Pair]]:
        """{"transformer": {module: pair}, "text_encoder": {module: pair}}."""
        return _by_component(self.pairs, ("transformer", "text_encoder"))

    @cached_property
    def delta_components(self) -> dict[str, dict[str, Delta]]:
        """{"transformer": {module: delta}, "text_encoder": {…}, "t5": {…}}."""
        return _by_component(self.deltas, ("transformer", "text_encoder", "t5"))

    @property
    def kinds(self) -> list[str]:
        """The kinds of update in the file ("lora", "lokr", "loha", "full", "dora"), for logs."""
        kinds = {"lora"} if self.pairs else set()
        kinds |= {"dora" if d.magnitude is not None else d.kind for d in self.deltas.values()}
        return sorted(kinds)


def _by_component(items: dict, components: tuple[str, ...]) -> dict[str, dict]:
    split: dict[str, dict] = {c: {} for c in components}
    for key, item in items.items():
        component, module = key.split(".", 1)
        split[component][module] = item
    return split


def parse_lora(path: Path, label: str, shapes: Shapes, max_rank: int, digest: str | None = None) -> ParsedLora:
    """Read, convert and fully validate a LoRA file against the model's shapes. UserError on failure.
    `digest`: the file's sha256 if the caller has it (`file_digest`)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from loras.files import check_safetensors

    # Errors quote the file's own tensor names: printable() keeps each one line (no forged log lines).
    try:
        check_safetensors(path)  # the header alone first: dtypes, offsets, size (also for the operator's main)
    except UserError as e:
        raise UserError(f"LoRA {label}: {printable(e, ERROR_CHARS)}.") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state_dict = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"LoRA {label}: cannot read it as safetensors ({printable(e, ERROR_CHARS)}).") from e
    digest = digest or file_digest(path)
    try:
        lora = _parse(label, digest, state_dict, metadata, shapes, max_rank)
    except UserError as e:
        raise UserError(f"LoRA {label}: {printable(e, ERROR_CHARS)}.") from e
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
    deltas: dict[str, Delta] = {}
    sources: dict[str, str] = {}  # "<component>.<module>" → the file's layer it came from
    applied: dict[str, int] = {}
    unmatched: list[str] = []
    targeted: dict[str, list[str]] = {}  # component → the file's layers aimed at it
    refused: list[_Layer] = []  # T5 (on a server without it) and CLIP-embedding layers that would change something
    for layer in layers.values():
        kind = _layer_kind(layer)
        if kind is None:
            logger.debug("LoRA %s: alpha %s has no weights beside it; it changes nothing", label, layer.keys["alpha"])
            continue
        tensors = {part: state_dict[key] for part, key in layer.keys.items()}
        if kind == "lora" and "diff_b" in tensors and _is_zero(tensors["diff_b"]):
            tolerated.append(layer.keys["diff_b"])
            del tensors["diff_b"]
        zero = kind == "lora" and (_is_zero(tensors["lora_A"]) or _is_zero(tensors["lora_B"]))
        if zero and "magnitude" not in tensors and layer.component in ("t5", "clip_embedding"):
            tolerated += layer.keys.values()  # changes nothing; ComfyUI writes such T5 parts
            continue
        if kind == "full" and all(_is_zero(t) for t in tensors.values()):
            tolerated += layer.keys.values()  # a zero difference changes nothing (ComfyUI's model diffs have some)
            continue
        if layer.component == "clip_embedding" or (layer.component == "t5" and not names.t5):
            refused.append(layer)  # after the checks below: a LoRA for another model is told so first
            continue
        targeted.setdefault(layer.component, []).append(layer.name)
        if layer.targets is None and kind == "full":
            raise UserError(
                f"full weight differences are supported on linear layers only (e.g. not on {layer.name}, which is "
                "not a linear layer of this model)"
            )
        if layer.targets is None:
            unmatched.append(layer.name)
            continue
        component = layer.component
        alpha = _alpha_value(layer.keys["alpha"], tensors["alpha"]) if "alpha" in tensors else None
        if alpha is None and adapter and kind == "lora":
            alpha = _metadata_alpha(adapter, component, layer.targets[0])
        model = shapes[component]
        widths = [model[t][0] for t in layer.targets]
        if kind == "lora" and not {"magnitude", "diff_b"} & set(tensors) and component != "t5":
            rslora = bool(adapter.get(f"{component}.use_rslora", adapter.get("use_rslora", False)))
            found = _pairs(layer, tensors, alpha, rslora, widths)
        else:
            found = _deltas(layer, kind, tensors, alpha, widths, model[layer.targets[0]][1])
        for target, item in zip(layer.targets, found, strict=True):
            name = f"{component}.{target}"
            if name in sources:
                raise UserError(f"layer {target} appears twice in the file (as {sources[name]} and {layer.name})")
            (pairs if isinstance(item, tuple) else deltas)[name] = item
            sources[name] = layer.name
        applied[component] = applied.get(component, 0) + len(tensors)
    if tolerated:
        logger.info("LoRA %s: %d all-zero tensors change nothing (e.g. %s)", label, len(tolerated), tolerated[0])
    if refused and not (pairs or deltas):
        _refuse(refused)
    lora = _validate(label, digest, pairs, deltas, unmatched, shapes, max_rank)
    lora.applied = applied
    _check_components(label, lora, targeted, shapes)
    if refused:
        _refuse(refused)
    return lora


def _layer_kind(layer: _Layer) -> str | None:
    """Which kind of update a layer's parts make ("lora", "lokr", "loha", "full"; None: only an alpha)."""
    parts = set(layer.keys) - _OPTIONAL
    if not parts and set(layer.keys) == {"alpha"}:
        return None
    if parts - {"diff_b"} == {"lora_A", "lora_B"}:  # ComfyUI's LoraSave with bias_diff adds a diff_b
        return "lora"
    if parts in ({"diff"}, {"diff", "diff_b"}, {"diff_b"}):
        return "full"
    if parts == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}:
        return "loha"
    whole = [{f"lokr_w{i}"} for i in (1, 2)]
    factored = [{f"lokr_w{i}_a", f"lokr_w{i}_b"} for i in (1, 2)]
    sides = [parts & (whole[i] | factored[i]) for i in (0, 1)]
    if sides[0] | sides[1] == parts and all(sides[i] in (whole[i], factored[i]) for i in (0, 1)):
        return "lokr"
    raise UserError(
        f"layer {layer.name} has {', '.join(sorted(layer.keys))}: not a complete LoRA, LoKr, LoHa or full-difference "
        "layer"
    )


def _pairs(layer: _Layer, tensors: dict[str, torch.Tensor], alpha, rslora: bool, widths: list[int]) -> list[Pair]:
    """A plain LoRA layer → one (A, B) pair per target module, for the rank adapter."""
    down, up = tensors["lora_A"], tensors["lora_B"]
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise UserError(f"layer {layer.name} is not a linear LoRA (shapes {tuple(down.shape)}, {tuple(up.shape)})")
    down, up = _fold_alpha(down, up, alpha, rslora)
    if up.shape[0] != sum(widths):
        raise UserError(
            f"layer {layer.name} has {up.shape[0]} outputs in the LoRA but {sum(widths)} in this model "
            "(a LoRA for another model or size?)"
        )
    found = []
    for a, b in _split_rows(down, up, widths):
        if layer.swap:
            b = torch.cat(b.chunk(2, dim=0)[::-1])
        found.append((a.contiguous(), b.t().contiguous().t()))  # B column-major, as the adapter holds it
    return found


def _deltas(layer: _Layer, kind: str, tensors: dict[str, torch.Tensor], alpha, widths: list[int], width_in: int):
    """A layer that is not a plain LoRA pair (LoKr, LoHa, full, DoRA, or any T5 layer) → one Delta per target.

    The scales are the forward's of lycoris-lora 4.1.3 (modules/lokr.py, loha.py, full.py): alpha/dim
    once, dim the rank of the factored side; a LoKr with both sides whole has scale 1 (its stored alpha,
    often 10000, is ignored, as the library does); a full difference has none."""
    t = {part: tensor for part, tensor in tensors.items() if part not in _OPTIONAL}
    for part, tensor in t.items():
        if tensor.ndim != (1 if part == "diff_b" else 2):
            raise UserError(f"layer {layer.name} is not a linear layer ({part} has shape {tuple(tensor.shape)})")
    out = sum(widths)
    scale = 1.0
    if kind == "lora":
        factors = _fold_alpha(t["lora_A"], t["lora_B"], alpha)
        if factors[1].shape[1] != factors[0].shape[0]:
            raise UserError(f"layer {layer.name}: lora_A and lora_B do not fit ({tuple(t['lora_A'].shape)})")
        shape = (factors[1].shape[0], factors[0].shape[1])
    elif kind == "lokr":
        names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
        w1, w1a, w1b, w2, w2a, w2b = (t.get(n) for n in names)
        side1 = w1.shape if w1 is not None else (w1a.shape[0], w1b.shape[1])
        side2 = w2.shape if w2 is not None else (w2a.shape[0], w2b.shape[1])
        for a, b in ((w1a, w1b), (w2a, w2b)):
            if a is not None and a.shape[1] != b.shape[0]:
                raise UserError(f"layer {layer.name}: its LoKr factors do not fit ({tuple(a.shape)}, {tuple(b.shape)})")
        dim = w1a.shape[1] if w1a is not None else w2a.shape[1] if w2a is not None else None
        scale = 1.0 if dim is None else (alpha or dim) / dim
        factors = (w1, w1a, w1b, w2, w2a, w2b)
        shape = (side1[0] * side2[0], side1[1] * side2[1])
    elif kind == "loha":
        w1a, w1b, w2a, w2b = (t[n] for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        shape = (w1a.shape[0], w1b.shape[1])
        if w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0] or (w2a.shape[0], w2b.shape[1]) != shape:
            raise UserError(f"layer {layer.name}: its LoHa factors do not fit ({tuple(w1a.shape)}, {tuple(w2b.shape)})")
        dim = w1b.shape[0]
        scale = (alpha or dim) / dim
        factors = (w1a, w1b, w2a, w2b)
    else:
        factors = (t.get("diff"),)
        shape = tuple(t["diff"].shape) if "diff" in t else (out, width_in)
        if "diff_b" in t and t["diff_b"].shape[0] != out:
            raise UserError(f"layer {layer.name}: its bias difference has {t['diff_b'].shape[0]} values, not {out}")
    if shape != (out, width_in):
        raise UserError(
            f"layer {layer.name} is {out}×{width_in} in this model but {shape[0]}×{shape[1]} in the LoRA "
            "(a LoRA for another model or size?)"
        )
    magnitude = tensors.get("magnitude")
    if magnitude is not None:
        if tuple(magnitude.shape) not in ((out,), (out, 1)):  # PEFT's [out]; LyCORIS' wd_on_out [out, 1]
            raise UserError(
                f"layer {layer.name}: its DoRA magnitude has shape {tuple(magnitude.shape)}; only one value per "
                f"output row ({out}) is supported"
            )
        magnitude = magnitude.reshape(-1)
    found, start = [], 0
    for width in widths:
        rows = (start, start + width)
        pieces = [_rows(v, rows, layer.swap) if v is not None else None for v in (t.get("diff_b"), magnitude)]
        fused = len(widths) > 1
        if kind == "lora" and (fused or layer.swap):  # the pair's own rows: no need to form the fused ΔW
            down, up = factors
            up = _rows(up, rows, layer.swap)
            found.append(Delta("lora", (down, up), 1.0, None, False, *pieces))
        else:
            found.append(Delta(kind, factors, scale, rows if fused else None, layer.swap, *pieces))
        start += width
    return found


def _rows(tensor: torch.Tensor, rows: tuple[int, int], swap: bool) -> torch.Tensor:
    """Rows [begin, end) of a fused layer's tensor, halves exchanged for BFL's final modulation."""
    piece = tensor[rows[0] : rows[1]]
    if swap:
        piece = torch.cat(piece.chunk(2, dim=0)[::-1])
    return piece.contiguous()


def _refuse(layers: list[_Layer]) -> None:
    first = layers[0]
    if first.component == "t5":
        raise UserError(
            f"T5 text-encoder layers are not supported here ({_count(len(layers), 'layer')}, e.g. {first.name}; "
            "this server was set up without FLUX's T5 encoder)"
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
    t5 = targeted.get("t5", [])
    if t5 and not lora.applied.get("t5"):
        raise UserError(
            f"its T5 text-encoder part ({_count(len(t5), 'layer')}, e.g. {t5[0]}) matches no layer of this model's T5 "
            "encoder"
        )
    if lora.unmatched:
        logger.info(
            "LoRA %s: %d of its layers are not in this model and are skipped (e.g. %s)",
            label,
            len(lora.unmatched),
            ", ".join(lora.unmatched[:3]),
        )


def _validate(label, digest, pairs, deltas: dict[str, Delta], unmatched, shapes, max_rank) -> ParsedLora:
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
    for name, delta in deltas.items():
        if not all(torch.isfinite(t).all() for t in delta.tensors):
            raise UserError(f"layer {name} holds NaN or infinite values")
    if not (applied or deltas):
        examples = ", ".join(sorted(unmatched)[:3]) or "no LoRA layers at all"
        raise UserError(f"it matches no layer of this FLUX model (is it a LoRA for another model? it has {examples})")
    tensors = [t for p in applied.values() for t in p] + [t for d in deltas.values() for t in d.tensors]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return ParsedLora(label, digest, applied, sorted(set(unmatched)), rank, sum(storages.values()), deltas=deltas)


def file_digest(path: Path) -> str:
    """The sha256 of a file: what identifies a LoRA whatever its source."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
