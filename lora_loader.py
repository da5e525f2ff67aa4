"""Applying LoRAs to the FLUX transformers (and CLIP) without touching base weights.

At construction, ONE fixed PEFT LoRA adapter is injected into every Linear layer of each
transformer and of CLIP, its ranks split into two regions: "main" (exactly as many ranks as the
deployment's main LoRA, rounded up to a multiple of 8) and "extra" (`max_rank`, the LORA_MAX_RANK
limit for extra LoRAs). Stacking the two LoRAs' ranks in one adapter computes
s₁·B₁·A₁·x + s₂·B₂·A₂·x as one [B₁ B₂]·[A₁; A₂]·x: one pair of small matmuls and one add per
layer instead of two, and no ranks spent on padding the main LoRA up to the extra limit. A
request copies its LoRAs into their regions in place (A padded with zero rows, s·B with zero
columns), so the effect is s·B·A·x once, shapes never change (a compiled model never recompiles
on a swap), base weights are never modified, and a model with no LoRA in effect has its adapter
disabled: exactly the base. File formats are loras/formats.py's concern.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from pathlib import Path

import torch

from errors import UserError
from lora_sources import LoraCache, parse_source
from loras.formats import ParsedLora, parse_lora

logger = logging.getLogger(__name__)

ADAPTER = "loras"  # the one PEFT adapter holding both regions
REGIONS = ("main", "extra")
RANK_ALIGN = 8  # the main region is rounded up to this (matmul-friendly sizes)

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
                    raise RuntimeError(f"the transformers differ in layer {name}; they must share one architecture")
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
            raise UserError(
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
        """Make `transformer` (+ CLIP) base + the requested LoRAs; UserError leaves the models as they were."""
        if not any(transformer is t for t in self.transformers):
            raise RuntimeError("apply() was given a transformer this LoraManager does not manage")
        lora_scale, extra_lora_scale = float(lora_scale), float(extra_lora_scale)
        if not (math.isfinite(lora_scale) and math.isfinite(extra_lora_scale)):
            raise UserError("lora_scale and extra_lora_scale must be finite numbers")
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
            raise UserError(f"LoRA {parse_source(source).label}: the cached file vanished; try again.") from e
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
