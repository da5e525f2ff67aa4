"""Applying LoRAs to the FLUX transformers (and CLIP) without touching base weights.

At construction, ONE fixed PEFT LoRA adapter is injected into every Linear layer of each
transformer and of CLIP, its ranks split into two regions: "main" (exactly as many ranks as the
deployment's main LoRA, rounded up to a multiple of 8) and "extra" (`max_rank`, the LORA_MAX_RANK
limit for extra LoRAs). Stacking the two LoRAs' ranks in one adapter computes
s₁·B₁·A₁·x + s₂·B₂·A₂·x as one [B₁ B₂]·[A₁; A₂]·x: one pair of small matmuls and one add per
layer instead of two, and no ranks spent on padding the main LoRA up to the extra limit. A
request copies its LoRAs into their regions in place (A padded with zero rows, s·B with zero
columns), so the effect is s·B·A·x once, base weights are never modified, and a model with no
LoRA in effect has its adapter disabled: exactly the base. File formats are loras/formats.py's
concern.

A request pays only for the ranks it uses. The main region fills from its end down, the extra
region from its start up, so the live ranks of both are always one contiguous span around the
boundary; PEFT's layers are shown only a span of the adapter holding them (a view of the full
weights: no copy), its length one of a few rank buckets (`RANK_BUCKETS`). A compiled model has one
graph per bucket (warmed up in `compile_states`) and never recompiles on a swap within one. The
adapter's product is added into each layer's output in place (`_add_into_output`).

What is not low-rank (LyCORIS LoKr and LoHa, full differences, DoRA) and every T5 part (T5 has no
adapter) is written into the touched base weights instead, from pristine copies that restore them bit
for bit: loras/deltas.py. A request may mix both kinds.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import torch

from errors import UserError
from loras.cache import LoraCache, UserTokens
from loras.deltas import Plan, WeightDeltas
from loras.files import autov3
from loras.formats import ParsedLora, file_digest, parse_lora
from loras.sources import public_label, split_sources
from net.fetch import Limits

logger = logging.getLogger(__name__)

ADAPTER = "loras"  # the one PEFT adapter holding both regions
REGIONS = ("main", "extra")
RANK_ALIGN = 8  # the main region is rounded up to this (matmul-friendly sizes)
# The lengths of the adapter's span PEFT's layers are shown (the adapter's full rank is always the
# last): a compiled transformer has one graph per bucket. 160 is the common main LoRA (rank ≤ 32)
# plus one extra at the largest rank Replicate's trainer makes (128). LORA_RANK_BUCKETS overrides.
RANK_BUCKETS = (16, 32, 64, 128, 160, 256)

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
            layer.lora_A[ADAPTER].to_empty(device=base.device).to(base.dtype).weight.zero_()
            # B [out, rank] is stored column-major (a transposed [rank, out] tensor): a LoRA's ranks
            # are then one contiguous block, so a switch writes B like A, one plain copy, instead of
            # `out` short strided rows. The matmul reads it as a transposed operand (no copy).
            up = layer.lora_B[ADAPTER]
            column_major = torch.zeros(rank, up.out_features, dtype=base.dtype, device=base.device).t()
            up.weight = torch.nn.Parameter(column_major, requires_grad=False)
            if layer.scaling[ADAPTER] != 1.0:
                raise RuntimeError(f"PEFT scales the adapter by {layer.scaling[ADAPTER]}, expected 1")
            layer.lora_variant[ADAPTER] = _add_into_output()
            layer.set_adapter([ADAPTER], inference_mode=True)
            layer.enable_adapters(False)
    return layers


@functools.cache
def _add_into_output():
    """PEFT's forward for our adapter (a LoRA "variant", PEFT's own plug for DoRA and the like):
    the base layer's output += (x·Aᵀ)·Bᵀ, in place, one `addmm_`. PEFT's plain path computes
    `result + lora_B(lora_A(x)) * scaling`: with our scaling of 1 that is a multiply and an add
    over the whole output beside the two small matmuls, measured at FLUX width (3072 → 12288, 768
    tokens, rank 16, one thread): +10 % on the layer against +1 % for this. PEFT calls variants
    private ("prone to change"): tests/test_lora_apply.py checks the layer's output against its
    effective weight. Can go when PEFT's own forward adds in place."""
    from peft.tuners.lora.layer import LoraVariant

    class AddIntoOutput(LoraVariant):
        @staticmethod
        def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
            down = module.lora_A[active_adapter].weight
            up = module.lora_B[active_adapter].weight
            low = x.reshape(-1, x.shape[-1]) @ down.t()
            if not result.is_contiguous():  # a base layer of another kind: no in-place view of its output
                return result + (low @ up.t()).view(result.shape)
            result.view(-1, result.shape[-1]).addmm_(low, up.t())
            return result

    return AddIntoOutput()


def _linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """name → (out, in) of every Linear layer, the layers that get the adapter."""
    linears = (item for item in model.named_modules() if isinstance(item[1], torch.nn.Linear))
    return {name: (m.out_features, m.in_features) for name, m in linears}


@dataclass
class _Region:
    """What one region of one model's adapter holds: the ONE piece of state the manager keeps.

    clean: `loras` is () and every rank is zero. loaded: `loras` lists (digest, scale) of what the
    ranks hold, in rank order. dirty: `loras` is None: a write began and did not finish, so the
    ranks hold something unknown. `written` is, per layer, an upper bound on the leading ranks
    that may be non-zero (beyond it, the region is zero): raised before a write, lowered after a
    zeroing, so it holds at every line and a dirty region can always be zeroed exactly.

    Ranks are counted from the region's start, or from its end when `descending` (the main region,
    so that its live ranks and the extra region's meet at the boundary): `ranks` maps them.
    """

    span: range
    descending: bool = False
    loras: tuple[tuple[str, float], ...] | None = ()
    labels: tuple[str, ...] = ()
    written: dict[str, int] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "dirty" if self.loras is None else "loaded" if self.loras else "clean"

    def ranks(self, begin: int, end: int) -> tuple[int, int]:
        """The adapter's ranks [lo, hi) holding the region's ranks [begin, end) (a LoRA's rank order
        kept; empty when end <= begin)."""
        if self.descending:
            return self.span.stop - end, self.span.stop - begin
        return self.span.start + begin, self.span.start + end


@dataclass
class _Target:
    """One model with the adapter: its LoRA layers, its regions, and whether the adapter is on
    (None while being switched)."""

    model: torch.nn.Module
    component: str  # "transformer" | "text_encoder": which part of a LoRA file applies to it
    layers: dict[str, torch.nn.Module]
    regions: dict[str, _Region]
    enabled: bool | None = False
    # name → the adapter's full (A [rank, in], B [out, rank]) weights of that layer, looked up once.
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(init=False)
    # The adapter's ranks PEFT's layers are shown (None while being switched).
    shown: range | None = field(init=False)

    def __post_init__(self):
        self.weights = {n: (m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight) for n, m in self.layers.items()}
        first = next(iter(self.weights.values()), None)
        self.shown = range(first[0].shape[0] if first is not None else 0)


@dataclass(frozen=True)
class AppliedLora:
    """One LoRA a request applied, as that request's generation data names it."""

    label: str  # the request's own name for it (loras.sources.public_label), never another request's
    scale: float
    autov3: str  # CivitAI's hash of its file (loras.files.autov3)


@dataclass(frozen=True)
class Applied:
    """What one apply() did: the LoRAs in effect (main first, then the extras in order), and its time."""

    loras: tuple[AppliedLora, ...]
    prepare_s: float  # fetching, parsing and checking the files
    write_s: float = 0.0  # writing them into the adapter (0: the previous request's set was kept)


@dataclass(frozen=True)
class RegionView:
    """The public view of a region, for logs and tests: its status and the (label, scale) it holds."""

    status: str
    loras: tuple[tuple[str, float], ...]


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
        max_main_rank: int | None = None,
        main_label: str | None = None,
        rank_buckets: tuple[int, ...] = RANK_BUCKETS,
        t5: torch.nn.Module | None = None,
    ):
        """`t5`: FLUX's T5 encoder, for LoRAs with T5 parts (None: such parts are refused).
        `main`: the deployment's own fine-tune, a local file (None: plain FLUX).
        `max_rank`: the ranks the extra LoRAs of one request share (LORA_MAX_RANK), the extra region.
        `max_main_rank`: the largest per-request fine-tune (`replicate_weights`) served
        (LORA_MAX_MAIN_RANK, default `max_rank`; 0: none). The main region holds the larger of it
        and the deployment's own LoRA's rank, rounded up to a multiple of 8.
        `rank_buckets`: the lengths of the span of ranks a step multiplies through (RANK_BUCKETS; the
        adapter's full rank is added)."""
        start = time.monotonic()
        self.transformers = list(transformers)
        self.text_encoder = text_encoder
        self.cache = cache
        self.max_rank = int(max_rank)
        self.memory_bytes = int(memory_bytes)
        self.shapes: dict[str, dict[str, tuple[int, int]]] = {"transformer": {}, "text_encoder": {}}
        for model in self.transformers:
            for name, shape in _linear_shapes(model).items():
                if self.shapes["transformer"].setdefault(name, shape) != shape:
                    raise RuntimeError(f"the transformers differ in layer {name}; they must share one architecture")
        if text_encoder is not None:
            self.shapes["text_encoder"] = _linear_shapes(text_encoder)
        self.t5 = t5
        if t5 is not None:
            self.shapes["t5"] = _linear_shapes(t5)
        self.deltas = WeightDeltas()  # what is written into base weights (loras/deltas.py)
        # The main LoRA is parsed first: its rank, rounded up, is the main region's size.
        main_label = main_label or (Path(main).name if main is not None else "")
        self.main = None if main is None else parse_lora(Path(main), main_label, self.shapes, math.inf)
        self._autov3 = {} if main is None else {self.main.digest: autov3(Path(main))}  # file digest → AutoV3
        self.max_main_rank = self.max_rank if max_main_rank is None else int(max_main_rank)
        main_ranks = max(self.main.rank if self.main else 0, self.max_main_rank)
        main_ranks = -(-main_ranks // RANK_ALIGN) * RANK_ALIGN
        self.regions = {"main": range(0, main_ranks), "extra": range(main_ranks, main_ranks + self.max_rank)}
        self.buckets = tuple(sorted({b for b in map(int, rank_buckets) if 0 < b < self.rank} | {self.rank}))
        models = [(m, "transformer") for m in self.transformers]
        models += [(text_encoder, "text_encoder")] if text_encoder is not None else []
        self._targets = [
            _Target(
                model,
                component,
                _inject_adapter(model, self.rank),
                {r: _Region(self.regions[r], descending=r == "main") for r in REGIONS},
            )
            for model, component in models
        ]
        self._memory: OrderedDict[str, ParsedLora] = OrderedDict()  # parsed LoRAs by content (sha256)
        self._digests: dict[tuple, str] = {}  # file identity → its sha256
        logger.info(
            "LoRA adapter of rank %d (main %d + extra %d; rank buckets %s) in %d layers of %d model(s) in %.2f s",
            self.rank,
            len(self.regions["main"]),
            len(self.regions["extra"]),
            "/".join(map(str, self.buckets)),
            sum(len(t.layers) for t in self._targets),
            len(self._targets),
            time.monotonic() - start,
        )
        if self.main:
            logger.info(
                "LoRA main %s: %d layers, rank %d, %s bytes",
                self.main.label,
                len(self.main.pairs),
                self.main.rank,
                f"{self.main.nbytes:,}",
            )

    @property
    def rank(self) -> int:
        """The adapter's rank: the main region's ranks plus the extra region's."""
        return self.regions["extra"].stop

    @property
    def adapter_shape(self) -> str:
        """What a compiled graph depends on in the adapter (for the compile cache's key)."""
        buckets = "/".join(map(str, self.buckets))
        return f"LoRA adapter rank {self.rank} (main {len(self.regions['main'])}), rank buckets {buckets}"

    @classmethod
    def from_env(
        cls,
        transformers,
        text_encoder,
        cache: LoraCache,
        main: Path | None = None,
        main_label: str | None = None,
        t5: torch.nn.Module | None = None,
    ) -> LoraManager:
        """LORA_MAX_RANK (default 128), LORA_MAX_MAIN_RANK (default LORA_MAX_RANK),
        LORA_MEMORY_MAX_BYTES (parsed LoRAs kept in RAM, default 8 GiB) and LORA_RANK_BUCKETS
        (comma-separated, default RANK_BUCKETS: fewer buckets, fewer graphs to compile in setup)."""
        buckets = os.environ.get("LORA_RANK_BUCKETS", "").strip()
        return cls(
            transformers,
            text_encoder,
            cache,
            max_rank=int(os.environ.get("LORA_MAX_RANK", "128")),
            memory_bytes=int(os.environ.get("LORA_MEMORY_MAX_BYTES", str(8 << 30))),
            main=main,
            main_label=main_label,
            t5=t5,
            max_main_rank=int(os.environ["LORA_MAX_MAIN_RANK"]) if os.environ.get("LORA_MAX_MAIN_RANK") else None,
            rank_buckets=tuple(int(b) for b in buckets.split(",") if b.strip()) if buckets else RANK_BUCKETS,
        )

    # ---- what the predictor calls

    def apply(
        self,
        transformer: torch.nn.Module,
        lora_scale: float,
        extra_lora: str | None = None,
        extra_lora_scale: float = 1.0,
        *,
        main: str | None = None,
        tokens: UserTokens | None = None,
    ) -> Applied:
        """Make `transformer` (+ CLIP) exactly base + lora_scale·ΔW_main + Σ sᵢ·ΔWᵢ; returns what was
        applied, named as this request named it.

        `main`: a per-request fine-tune replacing the deployment's own (`replicate_weights`);
        `extra_lora`: one source or a list (loras.sources.split_sources), each at its own scale or
        `extra_lora_scale`. Everything that can fail (fetching, parsing, checking) happens before
        any tensor is touched, so a UserError leaves the models as they were; an interruption
        while writing (a cancel) is undone to the exact base."""
        target = self._target(transformer)
        lora_scale, extra_lora_scale = float(lora_scale), float(extra_lora_scale)
        if not (math.isfinite(lora_scale) and math.isfinite(extra_lora_scale)):
            raise UserError("lora_scale and extra_lora_scale must be finite numbers.")
        start = time.monotonic()
        deadline = start + Limits.from_env().total_timeout  # one for all of this request's downloads
        live = {x.digest for x in self._memory.values()} | ({self.main.digest} if self.main else set())
        self._autov3 = {d: h for d, h in self._autov3.items() if d in live}  # before this request's parses
        # 1. What each region must hold (a LoRA at scale 0 is as if absent); the budget of ranks is
        # checked after each file, so a request never holds more than it could use plus one file.
        wanted: dict[str, list[tuple[ParsedLora, float]]] = {"main": [], "extra": []}
        chosen = self.main
        if main is not None and main.strip():
            if not self.max_main_rank:
                raise UserError("replicate_weights is switched off on this server (LORA_MAX_MAIN_RANK=0).")
            chosen = self._parsed(main, tokens, deadline)
            _check_rank([chosen], len(self.regions["main"]), "replicate_weights", "LORA_MAX_MAIN_RANK")
        if chosen is not None and lora_scale != 0:
            wanted["main"].append((chosen, lora_scale))
        for source, scale in split_sources(extra_lora, extra_lora_scale):
            if scale == 0:
                continue
            extra = self._parsed(source, tokens, deadline)
            if wanted["main"] and extra.digest == chosen.digest:
                logger.info("LoRA extra %s is the main LoRA; applying it once, at lora_scale", extra.label)
                continue
            wanted["extra"].append((extra, scale))
            _check_rank([lora for lora, _ in wanted["extra"]], self.max_rank, "extra_lora", "LORA_MAX_RANK")
        _check_rank([lora for lora, _ in wanted["extra"]], self.max_rank, "extra_lora", "LORA_MAX_RANK")
        empty: dict[str, list[tuple[ParsedLora, float]]] = {r: [] for r in REGIONS}
        plan = [(t, wanted if t is target or t.component == "text_encoder" else empty) for t in self._targets]
        applied = tuple(AppliedLora(lora.label, s, self._autov3[lora.digest]) for r in REGIONS for lora, s in wanted[r])
        weights = self._weight_plan(plan, wanted)
        if self.deltas.holds(weights) and all(
            t.enabled == _on(want)
            and all(_holds(t.regions[r], want[r]) for r in REGIONS)
            and (not _on(want) or t.shown == self._live(want))
            for t, want in plan
        ):
            for t, want in plan:  # the same files: the labels are still this request's own
                for region in REGIONS:
                    t.regions[region].labels = tuple(lora.label for lora, _ in want[region])
            logger.info("LoRA: same set as the previous request, nothing to do")
            return Applied(applied, time.monotonic() - start)
        # 2. Write, undoing everything on any interruption (the weights first: a model that cannot take
        # them says so before anything is touched).
        changed, writing = 0, time.monotonic()
        try:
            changed += self.deltas.apply(weights)
            for t, want in plan:
                for region in REGIONS:
                    changed += self._fill(t, region, want[region])
                if _on(want):
                    self._show(t, self._live(want))
                self._enable(t, _on(want))
        except BaseException:
            self.reset()
            raise
        done = time.monotonic()
        logger.info(
            "LoRA applied in %.1f ms (%d layers rewritten in %.1f ms; %d ranks per step; %d weights written, %s "
            "bytes of pristine copies): %s",
            (done - start) * 1000,
            changed,
            (done - writing) * 1000,
            self.ranks_in_use(transformer),
            len(self.deltas.pristine),
            f"{self.deltas.pristine_bytes:,}",
            self._describe(target, wanted),
        )
        return Applied(applied, writing - start, done - writing)

    def compile_states(self, transformer: torch.nn.Module):
        """Put `transformer` in each state a torch.compile graph is specialised on, yielding in each:
        adapter on with a span of each rank bucket's length, then off. What the adapter holds and
        where the span starts do not matter (the graph reads its weights as tensors of a given
        shape), so this works with no main LoRA too. Ends at the exact base model."""
        target = self._target(transformer)
        try:
            for length in self.buckets:
                self._show(target, range(self.rank - length, self.rank))
                self._enable(target, True)
                yield
            self._enable(target, False)
            yield
        finally:
            self.reset()

    def reset(self) -> None:
        """Back to the exact base model: every region zeroed, every adapter off (and showing all of
        its ranks, as PEFT made it), every written weight restored."""
        self.deltas.reset()
        for target in self._targets:
            for region in REGIONS:
                self._fill(target, region, [])
            self._enable(target, False)
            self._show(target, range(self.rank))

    # ---- the public view (logs, tests)

    def state(self, model: torch.nn.Module) -> dict[str, RegionView]:
        target = self._target(model)
        views = {}
        for name, region in target.regions.items():
            loras = () if region.loras is None else tuple(zip(region.labels, (s for _, s in region.loras), strict=True))
            views[name] = RegionView(region.status, loras)
        return views

    def ranks_in_use(self, model: torch.nn.Module) -> int:
        """The ranks every LoRA layer of `model` multiplies through per step: 0 while its adapter is off."""
        target = self._target(model)
        return len(target.shown) if target.enabled and target.shown is not None else 0

    def adapter_layers(self, model: torch.nn.Module) -> Mapping[str, torch.nn.Module]:
        """name → PEFT LoRA layer of `model` (read-only: for tests and benchmarks)."""
        return MappingProxyType(self._target(model).layers)

    @property
    def in_memory(self) -> list[str]:
        """Labels of the parsed LoRAs kept in memory, oldest first."""
        return [lora.label for lora in self._memory.values()]

    # ---- internals

    def _target(self, model: torch.nn.Module) -> _Target:
        for target in self._targets:
            if target.model is model:
                return target
        raise RuntimeError("this LoraManager does not manage that model")

    def _parsed(self, source: str, tokens: UserTokens | None, deadline: float | None = None) -> ParsedLora:
        path = self.cache.fetch(source, tokens, deadline=deadline)
        label = public_label(source)
        try:
            stat = path.stat()
        except OSError:  # evicted by another process between fetch and here
            raise UserError(f"LoRA {label}: the cached file vanished; try again.") from None
        # Parsed LoRAs are kept by content: the same file from another URL (a signed URL whose signature
        # changed) is parsed once. A file is hashed once per identity (an edited file is read again).
        key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        digest = self._digests.get(key) or file_digest(path)
        self._digests[key] = digest
        if digest in self._memory:
            self._memory.move_to_end(digest)
            logger.info("LoRA %s: parsed tensors from memory", label)
            # The same tensors under this request's name: whoever loaded the file first named it for
            # themselves (a private repo's path), and labels reach logs, errors and generation data.
            lora = self._memory[digest]
            return lora if lora.label == label else replace(lora, label=label)
        start = time.monotonic()
        lora = parse_lora(path, label, self.shapes, math.inf, digest=digest)  # ranks: checked against their region
        self._memory[digest] = lora
        while sum(x.nbytes for x in self._memory.values()) > self.memory_bytes and len(self._memory) > 1:
            self._memory.popitem(last=False)
        self._autov3.setdefault(lora.digest, autov3(path))  # once per parsed file, for generation data
        self._digests = {k: d for k, d in self._digests.items() if d in self._memory}
        logger.info(
            "LoRA %s: parsed %d layers (%s, rank %d) in %.2f s%s",
            lora.label,
            len(lora.pairs) + len(lora.deltas),
            "+".join(lora.kinds),
            lora.rank,
            time.monotonic() - start,
            f"; {len(lora.unmatched)} of its layers match nothing here" if lora.unmatched else "",
        )
        return lora

    def _weight_plan(self, plan, wanted: dict[str, list[tuple[ParsedLora, float]]]) -> Plan:
        """What loras/deltas.py writes into each model's weights: the LoRAs' non-low-rank layers (every
        region's, main first) on the request's transformer and CLIP, and their T5 layers."""
        models = [(t.model, t.component, [x for r in REGIONS for x in want[r]]) for t, want in plan]
        if self.t5 is not None:
            models.append((self.t5, "t5", [x for r in REGIONS for x in wanted[r]]))
        return [
            (model, [(lora.digest, s, lora.delta_components[c]) for lora, s in loras if lora.delta_components[c]])
            for model, c, loras in models
        ]

    @torch.no_grad()
    def _fill(self, target: _Target, name: str, loras: list[tuple[ParsedLora, float]]) -> int:
        """Make region `name` of `target` hold exactly `loras` (stacked in rank order, each A and
        scale·B), zero everywhere else. Returns the layers written."""
        region = target.regions[name]
        if _holds(region, loras):
            return 0
        pieces: dict[str, list[tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
        offset = 0
        for lora, scale in loras:
            for layer, (down, up) in lora.components[target.component].items():
                if layer in target.layers:
                    pieces.setdefault(layer, []).append((offset, down, up, scale))
            offset += lora.rank
        if offset > len(region.span):
            raise RuntimeError(f"{offset} ranks do not fit the {name} region's {len(region.span)}")
        written = region.written  # all in the region's own rank order (_Region.ranks maps them)
        region.loras = None  # dirty from here until the end
        stale = [layer for layer in written if layer not in pieces]
        for layer in stale:
            _zero(*target.weights[layer], *region.ranks(0, written[layer]))
            del written[layer]
        for layer, parts in pieces.items():
            old = written.get(layer, 0)  # ranks [0, old) may be non-zero
            written[layer] = max(old, parts[-1][0] + parts[-1][1].shape[0])
            a, b = target.weights[layer]
            cursor = 0
            for at, down, up, scale in parts:
                _zero(a, b, *region.ranks(cursor, min(at, old)))
                cursor = at + down.shape[0]
                lo, hi = region.ranks(at, cursor)
                a[lo:hi].copy_(down)
                # The one place the scale is applied (one rounding), in the same pass as the copy:
                # no temporary (which, with the worker's 1 MiB mmap threshold, costs a fresh mapping).
                torch.mul(up, scale, out=b[:, lo:hi])
            _zero(a, b, *region.ranks(cursor, old))
            written[layer] = cursor
        region.loras = tuple((lora.digest, scale) for lora, scale in loras)
        region.labels = tuple(lora.label for lora, _ in loras)
        return len(stale) + len(pieces)

    def _live(self, wanted: dict[str, list[tuple[ParsedLora, float]]]) -> range:
        """The adapter's ranks to show for `wanted`: a span of the shortest rank bucket holding the
        main region's live ranks (rounded up to RANK_ALIGN, at the region's end) and the extra
        region's (at its start), which meet at the regions' boundary."""
        main = -(-sum(lora.rank for lora, _ in wanted["main"]) // RANK_ALIGN) * RANK_ALIGN
        length = next(b for b in self.buckets if b >= main + sum(lora.rank for lora, _ in wanted["extra"]))
        start = min(self.regions["main"].stop - main, self.rank - length)
        return range(start, start + length)

    def _show(self, target: _Target, ranks: range) -> None:
        """Make PEFT's layers of `target` compute with the adapter's `ranks` only: their weights
        become views of that span of the full weights (no copy; the rest must be zero or unused)."""
        if target.shown == ranks:
            return
        target.shown = None  # unknown until every layer is switched
        with torch.no_grad():
            for name, layer in target.layers.items():
                a, b = target.weights[name]
                down, up = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
                down.weight = torch.nn.Parameter(a[ranks.start : ranks.stop], requires_grad=False)
                up.weight = torch.nn.Parameter(b[:, ranks.start : ranks.stop], requires_grad=False)
                down.out_features = up.in_features = len(ranks)
        target.shown = ranks

    def _enable(self, target: _Target, enabled: bool) -> None:
        if target.enabled == enabled:
            return
        target.enabled = None  # unknown until every layer is switched
        for layer in target.layers.values():
            layer.enable_adapters(enabled)
            if enabled:
                layer.set_adapter([ADAPTER], inference_mode=True)
        target.enabled = enabled

    def _describe(self, target: _Target, wanted: dict[str, list[tuple[ParsedLora, float]]]) -> str:
        index = next(i for i, t in enumerate(self.transformers) if t is target.model)
        parts = []
        for region, loras in wanted.items():
            for lora, scale in loras:
                modules = [*lora.components["transformer"], *lora.delta_components["transformer"]]
                hit = sum(1 for m in modules if m in target.layers)
                te = len(lora.components["text_encoder"]) + len(lora.delta_components["text_encoder"])
                te = te if self.text_encoder is not None else 0
                t5 = len(lora.delta_components["t5"])
                parts.append(
                    f"{region} {lora.label} ({'+'.join(lora.kinds)}) at {scale:g} on {hit} of {len(modules)} "
                    "transformer layers"
                    + (f" + {te} CLIP layers" if te else "")
                    + (f" + {t5} T5 layers" if t5 else "")
                    + (f" ({len(lora.unmatched)} unmatched)" if lora.unmatched else "")
                )
        return f"transformer {index}: " + ("; ".join(parts) or "no LoRA (base model)")


def _check_rank(together: list[ParsedLora], limit: int, field: str, setting: str) -> None:
    """The LoRAs of one region must fit its ranks together; a clear error says how much was asked."""
    for lora in together:
        if lora.rank > limit:
            raise UserError(
                f"LoRA {lora.label}: its rank is {lora.rank}, over this server's limit of {limit} ({setting})."
            )
    total = sum(x.rank for x in together)
    if total > limit:
        parts = ", ".join(f"{x.label} rank {x.rank}" for x in together)
        raise UserError(
            f"{field}: the LoRAs need {total} ranks together ({parts}), over the {limit} this server holds "
            f"({setting}): use fewer or smaller ones."
        )


def _holds(region: _Region, loras: list[tuple[ParsedLora, float]]) -> bool:
    return region.loras == tuple((lora.digest, scale) for lora, scale in loras)


def _on(plan: dict[str, list]) -> bool:
    """The adapter is on exactly when some region holds a LoRA."""
    return any(plan[r] for r in REGIONS)


def _zero(a: torch.Tensor, b: torch.Tensor, begin: int, end: int) -> None:
    """Zero the adapter's ranks [begin, end) of one layer, A's rows and B's columns (nothing if empty)."""
    if end > begin:
        a[begin:end].zero_()
        b[:, begin:end].zero_()
