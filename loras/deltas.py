"""Applying what is not low-rank: each layer's update computed in float32 and written into its base
weight in place, with pristine copies of exactly the touched weights to restore them bit for bit.

lora_loader's rank adapter holds s·B·A for a small rank. LyCORIS LoKr (ΔW = kron(W1, W2)), LoHa
(ΔW = (W1a·W1b) ⊙ (W2a·W2b)), full differences (`.diff`, `.diff_b`) and DoRA (a whole weight rescaled
row by row) are generally full-rank, and T5 has no adapter at all (it runs once per request and is not
compiled). These go here instead: for every touched weight W,

    W ← cast(f(W₀ in float32)),  f = the updates of the request in order (main first, then extras),

where W₀ is a pristine copy taken before the first write (in host memory, whatever the model's
device), and a plain update is W + s·ΔW and a DoRA one is m / ‖W + s·ΔW‖ · (W + s·ΔW) per output
row (PEFT's `lora_magnitude_vector` semantics, which kohya/LyCORIS `dora_scale` share at scale 1).
Nothing is ever subtracted: restoring is a copy of W₀, so the base comes back bit for bit. The
tensors keep their storage, so a compiled graph reads the new values without recompiling.

The state is two dicts (`pristine`, `written`) whose meaning holds at every line, so an interruption
anywhere leaves a state the next `apply` or `reset` finishes: a weight without a pristine copy is the
exact base; a weight with one is restored or rewritten from it; `written` lists the weights whose
current contents are known (what they hold), and a weight leaves it before any write to it begins.

Semantics (the oracles in tests/test_lora_oracle.py): `lycoris-lora`'s modules' forward for LoKr,
LoHa and full (alpha/dim once; a LoKr whose W1 and W2 are both whole matrices has scale 1, its stored
alpha ignored), PEFT for DoRA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from errors import UserError

logger = logging.getLogger(__name__)

KINDS = ("lora", "lokr", "loha", "full")


@dataclass(frozen=True)
class Delta:
    """One module's update as the file stores it (float32 factors, small), made into ΔW when applied:
    at FLUX scale the whole matrices of one file would take tens of gigabytes.

    kind "lora": factors (A, B), ΔW = B·A (alpha folded into B); "lokr": (W1 or None, W1a, W1b, W2 or
    None, W2a, W2b), ΔW = scale·kron(W1, W2) with each side whole or a product; "loha": (W1a, W1b,
    W2a, W2b), ΔW = scale·(W1a·W1b) ⊙ (W2a·W2b); "full": (D,), ΔW = D. `rows`: the rows of a fused
    layer's ΔW (BFL's qkv, linear1) that this module gets; `swap`: exchange the two halves of the rows
    (BFL's final modulation is (shift, scale), diffusers' is (scale, shift)).
    """

    kind: str
    factors: tuple[torch.Tensor | None, ...]
    scale: float = 1.0
    rows: tuple[int, int] | None = None
    swap: bool = False
    bias: torch.Tensor | None = None  # a bias difference (`diff_b`), already this module's rows
    magnitude: torch.Tensor | None = None  # DoRA: the target norm of each output row, this module's rows

    def weight(self) -> torch.Tensor | None:
        """ΔW for this module, float32, before the request's scale (None: the weight does not change). The
        factors stay in the file's dtype until here (a full difference in bf16 is half the memory)."""
        factors = [None if t is None else t.to(torch.float32) for t in self.factors]
        if self.kind == "lora":
            down, up = factors
            delta = up @ down
        elif self.kind == "lokr":
            w1, w1a, w1b, w2, w2a, w2b = factors
            delta = torch.kron(w1 if w1 is not None else w1a @ w1b, w2 if w2 is not None else w2a @ w2b)
        elif self.kind == "loha":
            w1a, w1b, w2a, w2b = factors
            delta = (w1a @ w1b) * (w2a @ w2b)
        else:
            (delta,) = factors
            if delta is None:  # a bias difference alone
                return None
        if self.rows is not None:
            delta = delta[self.rows[0] : self.rows[1]]
        if self.swap:
            delta = torch.cat(delta.chunk(2, dim=0)[::-1])
        return delta * self.scale if self.scale != 1.0 else delta

    def apply(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        """The float32 `weight` with this update at `scale` (in place where it can)."""
        delta = self.weight()
        if delta is not None:
            weight.add_(delta.to(weight.device), alpha=scale)
        if self.magnitude is not None:
            norm = torch.linalg.vector_norm(weight, dim=1, keepdim=True)
            weight.mul_(self.magnitude.to(weight.device).reshape(-1, 1) / norm)
        return weight

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (*self.factors, self.bias, self.magnitude) if t is not None]


Plan = list[tuple[torch.nn.Module, list[tuple[str, float, dict[str, Delta]]]]]
# For each model: (the model, [(LoRA digest, scale, module → Delta)] in the order they apply).


def _base_layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    layer = model.get_submodule(name)
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


class WeightDeltas:
    """Keeps the models' touched weights at exactly f(W₀), and every other weight at its base."""

    def __init__(self):
        # (model id, module) → (W₀, bias₀ or None) on the host: exactly the weights that may differ from the base.
        self.pristine: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]] = {}
        # (model id, module) → what its weight holds ((digest, scale), …): the weights whose contents are known.
        self.written: dict[tuple[int, str], tuple[tuple[str, float], ...]] = {}
        self._modules: dict[tuple[int, str], torch.nn.Module] = {}  # the base layer of each key ever touched

    @property
    def pristine_bytes(self) -> int:
        return sum(w.nbytes + (b.nbytes if b is not None else 0) for w, b in self.pristine.values())

    def holds(self, plan: Plan) -> bool:
        """Whether the weights are already exactly what `plan` asks for."""
        wanted = self._signature(plan)
        return self.written == wanted and self.pristine.keys() == wanted.keys()

    @torch.no_grad()
    def apply(self, plan: Plan) -> int:
        """Make the weights exactly what `plan` asks for; returns how many were written or restored.
        Raises UserError (before touching anything) when a model cannot take an update."""
        # 1. What each weight must hold, checked before anything is written.
        parts: dict[tuple[int, str], list[tuple[Delta, float]]] = {}
        for model, loras in plan:
            for _digest, scale, deltas in loras:
                for module, delta in deltas.items():
                    parts.setdefault((id(model), module), []).append((delta, scale))
                    self._modules.setdefault((id(model), module), _base_layer(model, module))
        for key, updates in parts.items():
            _check_layer(self._modules[key], key[1], updates)
        wanted = self._signature(plan)
        # 2. Restore what is no longer wanted, then write what changed.
        changed = 0
        for key in [k for k in self.pristine if k not in wanted]:
            self._restore(key)
            changed += 1
        for key, updates in parts.items():
            if self.written.get(key) != wanted[key] or key not in self.pristine:
                self._write(key, updates, wanted[key])
                changed += 1
        return changed

    @torch.no_grad()
    def reset(self) -> None:
        """Every touched weight back to its pristine copy, bit for bit."""
        for key in list(self.pristine):
            self._restore(key)

    # ---- internals

    @staticmethod
    def _signature(plan: Plan) -> dict[tuple[int, str], tuple[tuple[str, float], ...]]:
        wanted: dict[tuple[int, str], tuple[tuple[str, float], ...]] = {}
        for model, loras in plan:
            for digest, scale, deltas in loras:
                for module in deltas:
                    wanted[id(model), module] = (*wanted.get((id(model), module), ()), (digest, scale))
        return wanted

    def _write(self, key, updates: list[tuple[Delta, float]], holds) -> None:
        layer = self._modules[key]
        if key not in self.pristine:  # the copy is complete before the first write (host memory on a GPU)
            bias = layer.bias.detach().to("cpu", copy=True) if getattr(layer, "bias", None) is not None else None
            self.pristine[key] = (layer.weight.detach().to("cpu", copy=True), bias)
        self.written.pop(key, None)  # unknown from here until the end
        weight0, bias0 = self.pristine[key]
        device = layer.weight.device
        if layer.weight.dtype == torch.float32:  # computed in place: one copy of W₀, one pass per update
            weight = layer.weight
            weight.copy_(weight0)
        else:  # moved in its own dtype (half the bytes of bf16 to a GPU), widened there: a new tensor
            weight = weight0.to(device).to(torch.float32)
        bias = None if bias0 is None else bias0.to(device=device, dtype=torch.float32, copy=True)
        for delta, scale in updates:
            weight = delta.apply(weight, scale)
            if delta.bias is not None:
                bias.add_(delta.bias.to(bias.device), alpha=scale)
        if weight is not layer.weight:
            layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
        self.written[key] = holds

    def _restore(self, key) -> None:
        layer = self._modules[key]
        self.written.pop(key, None)
        weight0, bias0 = self.pristine[key]
        layer.weight.copy_(weight0)
        if bias0 is not None:
            layer.bias.copy_(bias0)
        del self.pristine[key]


def _check_layer(layer: torch.nn.Module, module: str, updates: list[tuple[Delta, float]]) -> None:
    weight = layer.weight
    if type(weight.data) is not torch.Tensor or not weight.dtype.is_floating_point or weight.element_size() < 2:
        raise UserError(
            f"layer {module} is quantized here ({type(weight.data).__name__}); LoKr, LoHa, full and DoRA layers and "
            "T5 parts are written into the weights, which needs them unquantized (run without FLUX_FP8)."
        )
    if any(d.bias is not None for d, _ in updates) and getattr(layer, "bias", None) is None:
        raise UserError(f"layer {module} has no bias in this model, but the LoRA changes its bias.")
