"""Test helpers for LoRAs: a writer per file format with the ΔW each layer should get, the effective
weight of an adapted layer, and a local HTTP server imitating Replicate, Hugging Face and CivitAI.

The writers use their own table of BFL → diffusers module names (not lora_loader's), so a
mistake in the loader's table shows up as a wrong ΔW instead of being copied into the test.
"""

from __future__ import annotations

import io
import json
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
    trickle: float = 0.0  # seconds between 1 KiB pieces of the body
    require_auth: str | None = None  # "Bearer <token>" this path needs, else 401
    truncate: int | None = None  # send only this many bytes of the body (Content-Length stays full)


class RouteServer:
    """Stands in for Replicate, Hugging Face, CivitAI and file hosts: a threaded HTTP server on
    127.0.0.1 that routes by path (query ignored) and records every request."""

    def __init__(self):
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

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
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

    def hf_repo(self, repo: str, files: dict[str, bytes], revision: str = "main", token: str | None = None):
        """The tree API huggingface_hub calls, and resolve URLs redirecting to a CDN path."""
        auth = f"Bearer {token}" if token else None
        listing = [{"type": "file", "path": p, "size": len(b), "oid": str(i)} for i, (p, b) in enumerate(files.items())]
        folders = {p.rsplit("/", 1)[0] for p in files if "/" in p}
        listing += [{"type": "directory", "path": f, "oid": "d"} for f in sorted(folders)]
        self.add(
            f"/api/models/{repo}/tree/{revision}",
            json.dumps(listing).encode(),
            require_auth=auth,
            headers={"Content-Type": "application/json"},
        )
        for folder in folders:
            inside = [e for e in listing if e["path"].startswith(folder + "/")]
            self.add(
                f"/api/models/{repo}/tree/{revision}/{folder.replace('/', '%2F')}",
                json.dumps(inside).encode(),
                require_auth=auth,
                headers={"Content-Type": "application/json"},
            )
        for path, data in files.items():
            cdn = f"/cdn/{repo}/{revision}/{path}"
            self.add(cdn, data)
            self.redirect(f"/{repo}/resolve/{revision}/{path}", f"{self.url}{cdn}", require_auth=auth)

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
            for i in range(0, len(body), 1024):
                try:
                    handler.wfile.write(body[i : i + 1024])
                    handler.wfile.flush()
                except OSError:
                    return
                time.sleep(route.trickle)
            return
        handler.wfile.write(body)


HTML_ERROR = b"<!DOCTYPE html><html><head><title>Error</title></head><body>Something went wrong</body></html>"
