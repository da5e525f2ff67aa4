"""Applying LoRAs: exactly base + s·ΔW once, signed and linear, main + extra, exact restore after every
failure, and no download or reload for a LoRA already in use or in the caches. Image-level checks run
a real FluxPipeline on the tiny weights tree."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lora_fixtures as fx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

import lora_loader
from errors import UserError
from lora_loader import LoraManager
from loras.cache import LoraCache
from loras.formats import parse_lora

MAX_RANK = 8


@pytest.fixture(scope="module")
def tree(tiny_weights):
    """The tiny weights tree (conftest builds it once per session)."""
    return Path(tiny_weights)


@pytest.fixture(scope="module")
def hub():
    server = fx.RouteServer()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_ALLOW_PRIVATE_URLS", "1")
        mp.setenv("LORA_DOWNLOAD_TIMEOUT", "0.5")
        for name in ("HF_ENDPOINT", "REPLICATE_ENDPOINT", "CIVITAI_ENDPOINT"):
            mp.setenv(name, server.url)
        yield server
    server.close()


@pytest.fixture(scope="module")
def setup(tree, hub, tmp_path_factory):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    pipe = FluxPipeline.from_pretrained(tree / "FLUX.1-dev")
    reference = FluxPipeline.from_pretrained(tree / "FLUX.1-dev")  # never gets adapters
    schnell = FluxTransformer2DModel.from_pretrained(tree / "FLUX.1-schnell" / "transformer")
    base = {
        "dev": {
            n: m.weight.double().clone() for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)
        },
        "schnell": {n: m.weight.double().clone() for n, m in schnell.named_modules() if isinstance(m, torch.nn.Linear)},
        "clip": {
            n: m.weight.double().clone() for n, m in pipe.text_encoder.named_modules() if isinstance(m, torch.nn.Linear)
        },
    }
    cache = LoraCache(tmp_path_factory.mktemp("cache"), 1 << 30)
    manager = LoraManager(
        [pipe.transformer, schnell], pipe.text_encoder, cache, max_rank=MAX_RANK, main=tree / "lora.safetensors"
    )
    main = load_file(tree / "lora.safetensors")
    main_delta = {
        k.removeprefix("transformer.").removesuffix(".lora_A.weight"): main[k.replace("lora_A", "lora_B")].double()
        @ main[k].double()
        for k in main
        if k.endswith("lora_A.weight")
    }
    files = tmp_path_factory.mktemp("loras")
    local_dir = pytest.MonkeyPatch()
    local_dir.setenv("LORA_LOCAL_DIR", str(files))  # local paths in requests are read from here only
    extra = fx.bfl_family(pipe.transformer, style="kohya", clip=pipe.text_encoder, seed=3)
    hub.add("/extra/kohya.safetensors", extra.to_bytes())
    other = fx.diffusers_peft(pipe.transformer, seed=4)
    hub.add("/extra/other.safetensors", other.to_bytes())
    yield {
        "pipe": pipe,
        "reference": reference,
        "schnell": schnell,
        "base": base,
        "manager": manager,
        "cache": cache,
        "main_delta": main_delta,
        "extra": extra,
        "extra_url": f"{hub.url}/extra/kohya.safetensors",
        "other_url": f"{hub.url}/extra/other.safetensors",
        "files": files,
        "tree": tree,
    }
    manager.reset()
    local_dir.undo()


def image(pipe, prompt="a cat", seed=0) -> np.ndarray:
    return pipe(
        prompt,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images[0]


def check(model, base, deltas: list[tuple[float, dict]], component: str = "transformer"):
    """Every layer of `model` computes base + Σ s·ΔW (float tolerance)."""
    for name, weight in fx.effective_weights(model).items():
        expected = base[name].clone()
        for scale, delta in deltas:
            d = delta.get(name, delta.get(f"{component}.{name}"))
            if d is not None:
                expected += scale * d
        torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def adapter_snapshot(manager) -> dict:
    """Every adapter weight and on/off flag of every model the manager holds."""
    state = {}
    adapter = lora_loader.ADAPTER
    for index, model in enumerate([*manager.transformers, manager.text_encoder]):
        if model is None:
            continue
        for name, layer in manager.adapter_layers(model).items():
            state[(index, name, adapter)] = (layer.lora_A[adapter].weight.clone(), layer.lora_B[adapter].weight.clone())
            state[(index, name, "enabled")] = not layer.disable_adapters
    return state


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (x == y) if isinstance(x, bool) else (torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]))
        for x, y in ((a[k], b[k]) for k in a)
    )


# ---------------------------------------------------------------- exactness


def test_scale_zero_and_no_lora_give_the_base_image_bit_for_bit(setup):
    s = setup
    expected = image(s["reference"])
    s["manager"].apply(s["pipe"].transformer, 0.0, None, 0.0)
    assert np.array_equal(image(s["pipe"]), expected)
    s["manager"].apply(s["pipe"].transformer, 0.0, s["extra_url"], 0.0)
    assert np.array_equal(image(s["pipe"]), expected)
    s["manager"].apply(s["pipe"].transformer, 1.0, None, 0.0)
    assert not np.array_equal(image(s["pipe"]), expected)
    s["manager"].reset()
    assert np.array_equal(image(s["pipe"]), expected)


def test_scale_is_applied_once_linear_and_signed(setup):
    s = setup
    for scale in (1.0, 0.5, -1.0, 2.5, -0.3):
        s["manager"].apply(s["pipe"].transformer, scale, None, 0.0)
        check(s["pipe"].transformer, s["base"]["dev"], [(scale, s["main_delta"])])
    # and the transformer's output moves linearly with the scale
    t = s["pipe"].transformer
    inputs = dict(
        hidden_states=torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(1)),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(2)),
        pooled_projections=torch.randn(1, 32, generator=torch.Generator().manual_seed(3)),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([3.5]),
    )
    outputs = {}
    with torch.no_grad():
        for scale in (0.0, 1.0, -1.0):
            s["manager"].apply(t, scale, None, 0.0)
            outputs[scale] = t(**inputs).sample
    assert not torch.equal(outputs[1.0], outputs[0.0])
    assert not torch.allclose(outputs[1.0], outputs[-1.0])
    s["manager"].reset()


def test_main_and_extra_add_both_deltas_including_clip(setup):
    s = setup
    m = s["manager"]
    m.apply(s["pipe"].transformer, 0.8, s["extra_url"], -0.6)
    check(s["pipe"].transformer, s["base"]["dev"], [(0.8, s["main_delta"]), (-0.6, s["extra"].deltas)])
    check(s["pipe"].text_encoder, s["base"]["clip"], [(-0.6, s["extra"].deltas)], component="text_encoder")
    check(s["schnell"], s["base"]["schnell"], [])  # the other transformer gets nothing
    m.reset()


def test_main_and_a_full_rank_extra_share_one_adapter_without_overlap(setup, hub):
    """One adapter per layer: the main LoRA's ranks (4, rounded up to 8) then LORA_MAX_RANK for the
    extra. An extra at the full limit fills its region; both deltas still add exactly."""
    s = setup
    m = s["manager"]
    assert m.rank == 8 + MAX_RANK and len(m.regions["main"]) == 8
    layer = next(iter(m.adapter_layers(s["pipe"].transformer).values()))
    assert layer.lora_A[lora_loader.ADAPTER].weight.shape[0] == m.rank and list(layer.lora_A) == [lora_loader.ADAPTER]
    full = fx.diffusers_peft(s["pipe"].transformer, rank=MAX_RANK, seed=11)
    hub.add("/extra/full.safetensors", full.to_bytes())
    m.apply(s["pipe"].transformer, 0.5, f"{hub.url}/extra/full.safetensors", 1.5)
    check(s["pipe"].transformer, s["base"]["dev"], [(0.5, s["main_delta"]), (1.5, full.deltas)])
    m.apply(s["pipe"].transformer, 0.5, s["extra_url"], 1.0)  # a lower-rank extra: the rest of the region is zeroed
    check(s["pipe"].transformer, s["base"]["dev"], [(0.5, s["main_delta"]), (1.0, s["extra"].deltas)])
    m.reset()


def test_main_lora_applies_to_schnell_too(setup):
    s = setup
    s["manager"].apply(s["schnell"], 1.0, None, 0.0)
    check(s["schnell"], s["base"]["schnell"], [(1.0, s["main_delta"])])
    check(s["pipe"].transformer, s["base"]["dev"], [])
    assert all(layer.disable_adapters for layer in s["manager"].adapter_layers(s["pipe"].transformer).values())
    assert {r: v.status for r, v in s["manager"].state(s["pipe"].transformer).items()} == {
        "main": "clean",
        "extra": "clean",
    }
    s["manager"].reset()


def test_an_extra_identical_to_the_main_is_applied_once(setup):
    s = setup
    copy = s["files"] / "same_as_main.safetensors"
    shutil.copy(s["tree"] / "lora.safetensors", copy)
    s["manager"].apply(s["pipe"].transformer, 0.7, str(copy), 1.0)
    check(s["pipe"].transformer, s["base"]["dev"], [(0.7, s["main_delta"])])
    s["manager"].reset()


def test_without_a_main_lora(setup):
    s = setup
    m = LoraManager([fx_transformer()], None, s["cache"], max_rank=MAX_RANK, max_main_rank=0)
    assert m.rank == MAX_RANK  # no ranks spent on a main region when there is no main LoRA to hold
    t = m.transformers[0]
    base = {n: w.double() for n, w in _base_weights(t).items()}
    m.apply(t, 1.0, s["other_url"], 0.5)
    other = load_file(s["cache"].fetch(s["other_url"]))
    delta = {
        k.removeprefix("transformer.").removesuffix(".lora_A.weight"): other[k.replace("lora_A", "lora_B")].double()
        @ other[k].double()
        for k in other
        if k.endswith("lora_A.weight")
    }
    check(t, base, [(0.5, delta)])


def fx_transformer():
    from scripts import tiny_weights as tw

    return tw.flux_transformer(True, 0)


def _base_weights(model):
    return {
        n: m.get_base_layer().weight
        for n, m in model.named_modules()
        if hasattr(m, "get_base_layer")
        and isinstance(m.get_base_layer(), torch.nn.Linear)
        and n
        and not n.endswith("base_layer")
    }


# ---------------------------------------------------------------- failures leave the model exact


def test_a_failing_extra_lora_leaves_the_model_bit_for_bit(setup, hub):
    s = setup
    m = s["manager"]
    wrong_arch = fx.diffusers_peft(_other_width_transformer())
    hub.add("/bad/arch.safetensors", wrong_arch.to_bytes())
    hub.add("/bad/html.safetensors", fx.HTML_ERROR)
    hub.add("/bad/slow.safetensors", b"", delay=1.0)
    big_rank = fx.diffusers_peft(s["pipe"].transformer, rank=MAX_RANK * 2)
    hub.add("/bad/rank.safetensors", big_rank.to_bytes())
    nothing = {
        "lora_unet_down_blocks_0_proj_in.lora_down.weight": torch.zeros(2, 3),
        "lora_unet_down_blocks_0_proj_in.lora_up.weight": torch.zeros(3, 2),
    }
    from safetensors.torch import save

    hub.add("/bad/sd15.safetensors", save(nothing))
    failures = {
        f"{hub.url}/bad/missing.safetensors": "404",
        f"{hub.url}/bad/html.safetensors": "HTML page",
        f"{hub.url}/bad/slow.safetensors": "timed out",
        f"{hub.url}/bad/arch.safetensors": "another model or size",
        f"{hub.url}/bad/rank.safetensors": "LORA_MAX_RANK",
        f"{hub.url}/bad/sd15.safetensors": "matches no layer",
        "not a lora source": "Unsupported LoRA source",
    }
    m.apply(s["pipe"].transformer, 0.8, s["extra_url"], 0.5)
    before_image = image(s["pipe"])
    before = adapter_snapshot(m)
    for source, message in failures.items():
        with pytest.raises(UserError, match=message):
            m.apply(s["pipe"].transformer, 0.8, source, 0.5)
        assert same_state(adapter_snapshot(m), before), source
    assert np.array_equal(image(s["pipe"]), before_image)
    # and from the base model too
    m.reset()
    base_image = image(s["reference"])
    with pytest.raises(UserError):
        m.apply(s["pipe"].transformer, 1.0, f"{hub.url}/bad/missing.safetensors", 1.0)
    assert np.array_equal(image(s["pipe"]), base_image)


class Cancelled(BaseException):
    """What coglet raises on a cancel is a BaseException too, and it can land at any line."""


class CancelAtWrite(TorchFunctionMode):
    """Raises Cancelled at the k-th in-place write (copy_ or zero_) to any tensor: a cancel landing
    in the middle of the manager's writes. With k=None it only counts them."""

    def __init__(self, k: int | None = None):
        super().__init__()
        self.k, self.writes = k, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.copy_, torch.Tensor.zero_):
            self.writes += 1
            if self.writes == self.k:
                raise Cancelled
        return func(*args, **(kwargs or {}))


def _outputs(transformer) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 16, 64, generator=g),
            encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
            pooled_projections=torch.randn(1, 32, generator=g),
            timestep=torch.tensor([0.5]),
            img_ids=torch.zeros(16, 3),
            txt_ids=torch.zeros(8, 3),
            guidance=torch.tensor([3.5]),
        ).sample


@pytest.fixture(scope="module")
def twin(setup, tree):
    """A second pipeline with a manager of its own that is never interrupted: the reference."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tree / "FLUX.1-dev")
    manager = LoraManager(
        [pipe.transformer], pipe.text_encoder, setup["cache"], max_rank=MAX_RANK, main=tree / "lora.safetensors"
    )
    return pipe, manager


def test_an_interrupted_apply_leaves_a_state_every_later_request_undoes(setup, twin):
    """A cancel after the k-th write of a switch (main 1.0 + extra A → main 0.5 + extra B), in the
    main region and in the extra one; then main-only, extra-only and scale-0 requests must each be
    what a manager that was never interrupted computes, bit for bit (adapter weights and outputs)."""
    s = setup
    m, t = s["manager"], s["pipe"].transformer
    twin_pipe, twin_manager = twin
    before, switch = (1.0, s["extra_url"], 1.0), (0.5, s["other_url"], 0.7)
    m.apply(t, *before)
    with CancelAtWrite() as counter:
        m.apply(t, *switch)
    main_layers = len(s["main_delta"])  # the main region is written first: 2 writes a layer
    total = counter.writes
    assert total > 2 * main_layers + 2
    later = [(1.0, None, 0.0), (0.0, s["extra_url"], 0.6), (0.0, None, 0.0), (0.5, s["other_url"], 0.7)]
    for k in sorted(
        {1, 2, main_layers, 2 * main_layers - 1, 2 * main_layers + 1, (total + 2 * main_layers) // 2, total - 1}
    ):
        m.apply(t, *before)
        with pytest.raises(Cancelled), CancelAtWrite(k):
            m.apply(t, *switch)
        for request in later:
            m.apply(t, *request)
            twin_manager.apply(twin_pipe.transformer, *request)
            for name, layer in m.adapter_layers(t).items():
                other = twin_manager.adapter_layers(twin_pipe.transformer)[name]
                for part in ("lora_A", "lora_B"):
                    assert torch.equal(
                        getattr(layer, part)[lora_loader.ADAPTER].weight,
                        getattr(other, part)[lora_loader.ADAPTER].weight,
                    ), (k, request, name, part)
                assert layer.disable_adapters == other.disable_adapters, (k, request, name)
            assert torch.equal(_outputs(t), _outputs(twin_pipe.transformer)), (k, request)
    m.reset()
    assert all(v.status == "clean" for v in m.state(t).values())


def test_a_cancel_at_any_write_is_undone_to_the_exact_base(setup):
    s = setup
    m, t = s["manager"], s["pipe"].transformer
    m.reset()
    with CancelAtWrite() as counter:
        m.apply(t, 1.0, s["extra_url"], 1.0)
    for k in (1, counter.writes // 2, counter.writes):
        m.reset()
        with pytest.raises(Cancelled), CancelAtWrite(k):
            m.apply(t, 1.0, s["extra_url"], 1.0)
        check(t, s["base"]["dev"], [])
        check(s["pipe"].text_encoder, s["base"]["clip"], [], component="text_encoder")
    assert np.array_equal(image(s["pipe"]), image(s["reference"]))
    m.apply(t, 1.0, s["extra_url"], 1.0)  # and the next request is whole
    check(t, s["base"]["dev"], [(1.0, s["main_delta"]), (1.0, s["extra"].deltas)])
    m.reset()


def test_the_scale_is_rounded_once_in_bf16(setup, hub):
    """s·B computed in float32 and rounded to the adapter's dtype once, not rounded, scaled, rounded."""
    from diffusers import FluxTransformer2DModel

    s = setup
    bf16 = FluxTransformer2DModel.from_pretrained(s["tree"] / "FLUX.1-schnell" / "transformer", dtype=torch.bfloat16)
    m = LoraManager([bf16], None, s["cache"], max_rank=MAX_RANK)
    m.apply(bf16, 0.0, s["other_url"], 0.37)
    pairs = parse_lora(s["cache"].fetch(s["other_url"]), "other", m.shapes, MAX_RANK).components["transformer"]
    for name, (_, up) in pairs.items():
        start = m.regions["extra"].start
        b = m.adapter_layers(bf16)[name].lora_B[lora_loader.ADAPTER].weight[:, start : start + up.shape[1]]
        assert torch.equal(b, (up * 0.37).to(torch.bfloat16)), name


def _other_width_transformer():
    from scripts.tiny_weights import flux_transformer

    return flux_transformer(guidance_embeds=False, seed=0, heads=3)


# ---------------------------------------------------------------- reuse costs nothing


def test_reuse_does_no_download_no_parse_and_no_write(setup, hub, caplog):
    s = setup
    m, cache = s["manager"], s["cache"]
    m.reset()
    t = s["pipe"].transformer
    caplog.set_level("INFO", logger="lora_loader")
    m.apply(t, 1.0, s["other_url"], 0.7)
    hits = hub.hits("/extra/other.safetensors")
    with CancelAtWrite() as counter:
        m.apply(t, 1.0, s["other_url"], 0.7)  # the same set: nothing at all
    assert counter.writes == 0 and hub.hits("/extra/other.safetensors") == hits
    caplog.clear()
    m.apply(t, 1.0, s["extra_url"], 0.7)
    m.apply(t, 1.0, s["other_url"], 0.7)  # back to a LoRA in the caches: no download, no parse
    assert hub.hits("/extra/other.safetensors") == hits
    assert not [r for r in caplog.records if "parsed" in r.getMessage() and "from memory" not in r.getMessage()]
    check(t, s["base"]["dev"], [(1.0, s["main_delta"]), (0.7, _deltas(cache.fetch(s["other_url"])))])
    m.reset()


def test_an_edited_file_is_read_again(setup, monkeypatch, tmp_path):
    """The in-memory parsed LoRA is keyed by the file's identity including its mtime."""
    s = setup
    monkeypatch.setenv("LORA_LOCAL_DIR", str(tmp_path))
    path = tmp_path / "edited.safetensors"
    t = s["pipe"].transformer
    first = fx.diffusers_peft(t, seed=21)
    first.write(path)
    s["manager"].apply(t, 0.0, str(path), 1.0)
    check(t, s["base"]["dev"], [(1.0, first.deltas)])
    second = fx.diffusers_peft(t, seed=22)
    second.write(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    s["manager"].apply(t, 0.0, str(path), 1.0)
    check(t, s["base"]["dev"], [(1.0, second.deltas)])
    s["manager"].reset()


def _deltas(path):
    sd = load_file(path)
    return {
        k.removeprefix("transformer.").removesuffix(".lora_A.weight"): sd[k.replace("lora_A", "lora_B")].double()
        @ sd[k].double()
        for k in sd
        if k.endswith("lora_A.weight")
    }


def test_parsed_loras_in_memory_are_bounded(setup):
    s = setup
    m = LoraManager([fx_transformer()], None, s["cache"], max_rank=MAX_RANK, memory_bytes=1)
    t = m.transformers[0]
    m.apply(t, 0.0, s["other_url"], 1.0)
    m.apply(t, 0.0, s["extra_url"], 1.0)
    assert len(m.in_memory) == 1 and m.in_memory[0].endswith(
        "kohya.safetensors"
    )  # the newest stays, older ones go once over the bound


def test_every_source_kind_applies_the_same_delta(setup, hub):
    """One LoRA served as Replicate, Hugging Face, CivitAI, a URL and a local file: same ΔW, same image."""
    s = setup
    data = s["extra"].to_bytes()
    local = s["files"] / "local_kohya.safetensors"
    local.write_bytes(data)
    hub.replicate_model("someone/style", data)
    hub.hf_repo("someone/style", {"README.md": b"#", "lora.safetensors": data})
    hub.civitai_model(77, [(770, data)])
    sources = [
        "someone/style",
        "https://huggingface.co/someone/style",
        "https://civitai.com/models/77/style",
        s["extra_url"],
        str(local),
    ]
    images = []
    for source in sources:
        s["manager"].apply(s["pipe"].transformer, 0.0, source, 0.9)
        check(s["pipe"].transformer, s["base"]["dev"], [(0.9, s["extra"].deltas)])
        check(s["pipe"].text_encoder, s["base"]["clip"], [(0.9, s["extra"].deltas)], component="text_encoder")
        images.append(image(s["pipe"]))
    assert all(np.array_equal(images[0], other) for other in images[1:])
    assert not np.array_equal(images[0], image(s["reference"]))
    s["manager"].reset()


def test_compile_states_cover_adapters_on_and_off_without_a_main_lora(setup):
    """setup()'s GPU warm-up walks these states; with no main LoRA, "on" must still be reached, or
    the first request with an extra LoRA would compile on the user's time."""
    from diffusers import FluxPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    s = setup
    pipe = FluxPipeline.from_pretrained(s["tree"] / "FLUX.1-dev")
    manager = LoraManager([pipe.transformer], pipe.text_encoder, s["cache"], max_rank=MAX_RANK)
    expected = image(s["reference"])
    active = []
    for _ in manager.compile_states(pipe.transformer):
        layers = [m for m in pipe.transformer.modules() if isinstance(m, BaseTunerLayer)]
        active.append({not layer.disable_adapters for layer in layers})
        assert np.array_equal(image(pipe), expected)  # the adapter is empty: the base model either way
    assert active == [{True}, {False}]
    assert np.array_equal(image(pipe), expected)


# ---------------------------------------------------------------- many fine-tunes: replicate_weights, lists


def test_several_extras_add_exactly_in_any_order(setup, hub):
    s = setup
    m, t = s["manager"], s["pipe"].transformer
    second, third = (fx.diffusers_peft(t, rank=2, seed=seed) for seed in (30, 31))
    hub.add("/extra/second.safetensors", second.to_bytes())
    hub.add("/extra/third.safetensors", third.to_bytes())
    second_url, third_url = f"{hub.url}/extra/second.safetensors", f"{hub.url}/extra/third.safetensors"
    listing = f"{s['extra_url']}:0.5, {second_url}:-0.3\n{third_url}"  # kohya + CLIP, and two diffusers files
    m.apply(t, 1.0, listing, 0.8)
    deltas = [(1.0, s["main_delta"]), (0.5, s["extra"].deltas), (-0.3, second.deltas), (0.8, third.deltas)]
    check(t, s["base"]["dev"], deltas)
    check(s["pipe"].text_encoder, s["base"]["clip"], [(0.5, s["extra"].deltas)], component="text_encoder")
    assert [scale for _, scale in m.state(t)["extra"].loras] == [0.5, -0.3, 0.8]
    forward = image(s["pipe"])
    m.apply(t, 1.0, f"{third_url}, {second_url}:-0.3, {s['extra_url']}:0.5", 0.8)  # reordered
    assert np.abs(image(s["pipe"]) - forward).max() < 1e-5
    m.reset()


def test_an_entry_at_scale_zero_is_absent_and_an_entry_scale_equals_extra_lora_scale(setup):
    s = setup
    m, t = s["manager"], s["pipe"].transformer
    m.apply(t, 1.0, s["other_url"], 0.6)
    alone, weights = image(s["pipe"]), adapter_snapshot(m)
    m.apply(t, 1.0, f"{s['extra_url']}:0, {s['other_url']}", 0.6)
    assert np.array_equal(image(s["pipe"]), alone) and same_state(adapter_snapshot(m), weights)
    m.apply(t, 1.0, f"{s['other_url']}:0.6", 0.1)
    assert np.array_equal(image(s["pipe"]), alone) and same_state(adapter_snapshot(m), weights)
    m.reset()


def test_extras_share_the_extra_region_and_more_is_refused_whole(setup, hub):
    s = setup
    m, t = s["manager"], s["pipe"].transformer
    half = fx.diffusers_peft(t, rank=MAX_RANK // 2 + 1, seed=32)
    hub.add("/extra/half.safetensors", half.to_bytes())
    url = f"{hub.url}/extra/half.safetensors"
    m.apply(t, 1.0, s["extra_url"], 1.0)
    before = adapter_snapshot(m)
    with pytest.raises(UserError, match=rf"need {2 * (MAX_RANK // 2 + 1)} ranks together .* over the {MAX_RANK}"):
        m.apply(t, 1.0, f"{url}, {url}:0.5", 1.0)
    assert same_state(adapter_snapshot(m), before)
    with pytest.raises(UserError, match="no/such"):  # a failing entry names itself; nothing is touched
        m.apply(t, 1.0, f"{s['other_url']}, {hub.url}/no/such.safetensors", 1.0)
    assert same_state(adapter_snapshot(m), before)
    m.reset()


def test_a_per_request_fine_tune_replaces_the_main_lora_and_back_bit_for_bit(setup, hub):
    s = setup
    m, t = s["manager"], s["pipe"].transformer
    tune = fx.diffusers_peft(t, rank=MAX_RANK, seed=33)  # as large as the main region holds
    hub.add("/tunes/a.safetensors", tune.to_bytes())
    m.apply(t, 0.9, s["other_url"], 0.5)
    own, weights = image(s["pipe"]), adapter_snapshot(m)
    m.apply(t, 0.9, s["other_url"], 0.5, main=f"{hub.url}/tunes/a.safetensors")
    other = _deltas(s["cache"].fetch(s["other_url"]))
    check(t, s["base"]["dev"], [(0.9, tune.deltas), (0.5, other)])
    assert m.state(t)["main"].loras[0][0].endswith("a.safetensors")
    m.apply(t, 0.9, s["other_url"], 0.5)  # without it: the deployment's own main LoRA again
    assert np.array_equal(image(s["pipe"]), own) and same_state(adapter_snapshot(m), weights)
    too_big = fx.diffusers_peft(t, rank=MAX_RANK + 1, seed=34)
    hub.add("/tunes/big.safetensors", too_big.to_bytes())
    with pytest.raises(
        UserError, match=rf"rank is {MAX_RANK + 1}, over this server's limit of 8 \(LORA_MAX_MAIN_RANK\)"
    ):
        m.apply(t, 0.9, None, 0.0, main=f"{hub.url}/tunes/big.safetensors")
    assert same_state(adapter_snapshot(m), weights)
    m.reset()


# ---------------------------------------------------------------- a step pays for the ranks in use


def bucketed_manager(setup, rank_buckets=(8, 16, 24)):
    """A manager with a main region of 16, an extra one of 16 and `rank_buckets` (+ the full 32)."""
    main = setup["tree"] / "lora.safetensors"
    t = fx_transformer()
    return LoraManager([t], None, setup["cache"], 16, main=main, max_main_rank=16, rank_buckets=rank_buckets), t


def test_a_step_multiplies_through_the_live_ranks_only_and_computes_the_same(setup, hub):
    s = setup
    m, t = bucketed_manager(s)
    full, full_t = bucketed_manager(s, rank_buckets=())  # always all 32 ranks: the reference
    assert m.buckets == (8, 16, 24, 32) and full.buckets == (32,) and m.ranks_in_use(t) == 0
    r12 = fx.diffusers_peft(t, rank=12, seed=40)
    hub.add("/extra/r12.safetensors", r12.to_bytes())
    r12_url = f"{hub.url}/extra/r12.safetensors"
    other = _deltas(s["cache"].fetch(s["other_url"]))  # rank 4
    base = {n: w.double() for n, w in _base_weights(t).items()}
    storage = {n: layer.lora_A[lora_loader.ADAPTER].weight.data_ptr() for n, layer in m.adapter_layers(t).items()}
    # (lora_scale, extra, extra_lora_scale) → ranks per step: the main LoRA's 4 count as 8 (RANK_ALIGN).
    requests = [
        ((1.0, None, 0.0), 8, [(1.0, s["main_delta"])]),
        ((1.0, r12_url, 0.5), 24, [(1.0, s["main_delta"]), (0.5, r12.deltas)]),
        ((0.0, s["other_url"], -1.0), 8, [(-1.0, other)]),
        ((0.7, f"{r12_url}, {s['other_url']}", 1.0), 24, [(0.7, s["main_delta"]), (1.0, r12.deltas), (1.0, other)]),
        ((0.0, None, 0.0), 0, []),
        ((1.0, None, 0.0), 8, [(1.0, s["main_delta"])]),
    ]
    for request, ranks, deltas in requests:
        m.apply(t, *request)
        full.apply(full_t, *request)
        assert m.ranks_in_use(t) == ranks, request
        check(t, base, deltas)
        torch.testing.assert_close(_outputs(t), _outputs(full_t), rtol=1e-5, atol=1e-6)
        for name, layer in m.adapter_layers(t).items():
            a, b = layer.lora_A[lora_loader.ADAPTER].weight, layer.lora_B[lora_loader.ADAPTER].weight
            if ranks:  # PEFT's layers see a span of the bucket's length, a view of the adapter's weights
                assert a.shape[0] == b.shape[1] == ranks, name
            assert a.untyped_storage().data_ptr() == storage[name]  # never a copy
    m.reset()
    assert m.ranks_in_use(t) == 0
    check(t, base, [])


class CancelAtView(TorchFunctionMode):
    """Raises Cancelled at the k-th tensor indexing (every slice of the adapter's weights, as
    written and as shown to PEFT's layers); with k=None it only counts them."""

    def __init__(self, k: int | None = None):
        super().__init__()
        self.k, self.views = k, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__:
            self.views += 1
            if self.views == self.k:
                raise Cancelled
        return func(*args, **(kwargs or {}))


def test_a_cancel_while_switching_rank_buckets_is_undone(setup, hub):
    """A cancel at any slicing of a switch that changes the bucket (main only, 8 ranks → main + a
    rank-12 extra, 24): the next requests are exactly what an uninterrupted manager computes."""
    s = setup
    (m, t), (twin, twin_t) = bucketed_manager(s), bucketed_manager(s)
    r12 = fx.diffusers_peft(t, rank=12, seed=40)
    hub.add("/extra/r12.safetensors", r12.to_bytes())
    switch = (1.0, f"{hub.url}/extra/r12.safetensors", 0.5)
    m.apply(t, 1.0, None, 0.0)
    with CancelAtView() as counter:
        m.apply(t, *switch)
    shown = 2 * len(m.adapter_layers(t))  # the last slices: A and B of every layer shown
    for k in sorted({1, counter.views - shown - 1, counter.views - shown + 1, counter.views - 1, counter.views}):
        m.apply(t, 1.0, None, 0.0)
        with pytest.raises(Cancelled), CancelAtView(k):
            m.apply(t, *switch)
        assert m.ranks_in_use(t) == 0  # undone to the base model
        for request in (switch, (1.0, None, 0.0), switch):
            m.apply(t, *request)
            twin.apply(twin_t, *request)
            assert m.ranks_in_use(t) == twin.ranks_in_use(twin_t), (k, request)
            assert torch.equal(_outputs(t), _outputs(twin_t)), (k, request)
    m.reset()


def test_rank_buckets_come_from_the_environment(setup, monkeypatch):
    monkeypatch.setenv("LORA_MAX_RANK", "16")
    monkeypatch.setenv("LORA_RANK_BUCKETS", "24, 8")
    m = LoraManager.from_env([fx_transformer()], None, setup["cache"], main=setup["tree"] / "lora.safetensors")
    assert m.buckets == (8, 24, 32) and "rank buckets 8/24/32" in m.adapter_shape  # the compile cache's key
    monkeypatch.delenv("LORA_RANK_BUCKETS")
    m = LoraManager.from_env([fx_transformer()], None, setup["cache"], main=setup["tree"] / "lora.safetensors")
    assert m.buckets == (16, 32)  # the defaults up to the adapter's rank


def test_every_adapted_layer_computes_its_effective_weight(setup, hub):
    # The adapter's forward (lora_loader._add_into_output: the base output += (x·Aᵀ)·Bᵀ in place, on a
    # span of the ranks) is exactly x·(W + Σ s·B·A)ᵀ + b, for 2-D and 3-D inputs, in every bucket.
    s = setup
    m, t = bucketed_manager(s)
    r12 = fx.diffusers_peft(t, rank=12, seed=40)
    hub.add("/extra/r12.safetensors", r12.to_bytes())
    g = torch.Generator().manual_seed(7)
    for request in ((1.0, None, 0.0), (-0.5, f"{hub.url}/extra/r12.safetensors", 0.8)):
        m.apply(t, *request)
        for layer in m.adapter_layers(t).values():
            x = torch.randn(2, 3, layer.in_features, generator=g)
            weight = fx.effective_weight(layer).float()
            with torch.no_grad():
                torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, weight, layer.base_layer.bias))
                torch.testing.assert_close(layer(x[0]), torch.nn.functional.linear(x[0], weight, layer.base_layer.bias))
    m.reset()


def test_the_adapter_forward_adds_into_a_strided_output_too(setup):
    # A base layer whose output is not contiguous gets the sum as a new tensor, not a lost in-place write.
    m, t = bucketed_manager(setup)
    m.apply(t, 1.0, None, 0.0)
    name, layer = next((n, x) for n, x in m.adapter_layers(t).items() if n in setup["main_delta"])
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(8))
    base = torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    strided = base.t().contiguous().t()
    assert not strided.is_contiguous()
    with torch.no_grad():
        out = lora_loader._add_into_output().forward(layer, lora_loader.ADAPTER, x, strided)
    torch.testing.assert_close(
        out, torch.nn.functional.linear(x, fx.effective_weight(layer).float(), layer.base_layer.bias)
    )
    m.reset()


# ---------------------------------------------------------------- issue 22: what is written into the weights
#
# LoKr, LoHa, full differences, DoRA and T5 parts are written into the touched base weights from pristine
# copies (loras/deltas.py). Here: a LyCORIS LoKr as the deployment's main LoRA (written by lycoris-lora on
# the tiny transformer), mixed with plain LoRA extras, a LoHa extra and a T5 part; every switch is exact,
# the base comes back bit for bit, and a cancel at any write leaves a state the next request undoes.


def _bits(pipe) -> dict[tuple[str, str], torch.Tensor]:
    """Every tensor of the transformer, CLIP and T5 (adapter weights included), as stored."""
    models = {"transformer": pipe.transformer, "clip": pipe.text_encoder, "t5": pipe.text_encoder_2}
    return {(c, n): t.detach().clone() for c, m in models.items() for n, t in m.state_dict().items()}


def _base_bits(pipe) -> dict[tuple[str, str], torch.Tensor]:
    """The models' own tensors (not the adapter's), named as before the adapter was injected."""
    return {
        (c, n.replace(".base_layer", "")): t
        for (c, n), t in _bits(pipe).items()
        if ".lora_A." not in n and ".lora_B." not in n
    }


def _differing(a: dict, b: dict) -> list:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def written(setup, tree):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tree / "FLUX.1-dev")
    files = setup["files"]
    lokr = fx.lycoris_file(pipe.transformer, "lokr-decomposed", files / "lokr.safetensors", seed=1)
    fx.lycoris_file(pipe.transformer, "loha", files / "loha.safetensors", seed=2)
    t5 = fx.t5_lora(pipe.text_encoder_2, "kohya", seed=3)
    t5.tensors |= fx.bfl_family(pipe.transformer, style="kohya", seed=4).tensors  # sd-scripts' train_t5xxl
    t5.write(files / "t5.safetensors")
    base = _base_bits(pipe)
    manager = LoraManager(
        [pipe.transformer], pipe.text_encoder, setup["cache"], max_rank=MAX_RANK, main=lokr, t5=pipe.text_encoder_2
    )
    yield {
        "pipe": pipe,
        "manager": manager,
        "base": base,
        "t5": t5,
        "t5_path": str(files / "t5.safetensors"),
        "loha_path": str(files / "loha.safetensors"),
    }
    manager.reset()


def test_a_lokr_main_mixes_with_lora_extras_and_t5_parts_and_the_base_comes_back_bit_for_bit(setup, written):
    pipe, m, base = written["pipe"], written["manager"], written["base"]
    t = pipe.transformer
    assert m.main.kinds == ["lokr"] and not m.main.pairs
    lokr = {name: d.weight().double() for name, d in m.main.delta_components["transformer"].items()}
    base_dev = {n.removesuffix(".weight"): w.double() for (c, n), w in base.items() if c == "transformer"}
    base_t5 = {n.removesuffix(".weight"): w.double() for (c, n), w in base.items() if c == "t5"}

    # 1. the LoKr main (in the weights) + a kohya LoRA extra (on the adapter), each at its scale
    m.apply(t, 0.8, setup["extra_url"], 0.6)
    check(t, base_dev, [(0.8, lokr), (0.6, setup["extra"].deltas)])
    assert [v.loras for v in m.state(t).values()] == [(("lokr.safetensors", 0.8),), ((setup["extra_url"], 0.6),)]
    # 2. + a T5 part: T5's weights change by exactly scale·ΔW (float32 rounding of the merge)
    m.apply(t, 0.8, written["t5_path"], 0.5)
    for name, delta in written["t5"].deltas.items():
        weight = pipe.text_encoder_2.get_submodule(name.removeprefix("t5.")).weight.double()
        torch.testing.assert_close(weight, base_t5[name.removeprefix("t5.")] + 0.5 * delta, rtol=1e-6, atol=1e-6)
    # 3. the main off, a LoHa extra: the LoKr's and T5's weights are back bit for bit
    m.apply(t, 0.0, written["loha_path"], 0.5)
    loha = m._parsed(written["loha_path"], None)
    touched = {f"{n}.weight" for n in loha.delta_components["transformer"]}
    assert {n for c, n in _differing(_base_bits(pipe), base)} == touched
    # 4. back to the base: every tensor of every model, bit for bit
    m.reset()
    assert not _differing(_base_bits(pipe), base)
    assert not m.deltas.pristine


def test_a_cancel_at_any_write_of_a_weight_switch_is_undone_by_the_next_request(setup, written):
    """A cancel after the k-th write of a switch (LoKr main + T5 part → LoHa + LoRA extras), then each
    later request gives, bit for bit, what it gives on a manager that was never interrupted."""
    pipe, m = written["pipe"], written["manager"]
    t = pipe.transformer
    before = (1.0, written["t5_path"], 1.0)
    switch = (0.5, f"{written['loha_path']}:0.7, {setup['extra_url']}:0.3", 1.0)
    later = [(1.0, None, 0.0), (0.0, written["t5_path"], 0.6), (0.0, None, 0.0), switch]
    expected = []
    m.reset()
    for request in later:  # what each later request gives, never interrupted
        m.apply(t, *request)
        expected.append(_bits(pipe))
    m.apply(t, *before)
    with CancelAtWrite() as counter:
        m.apply(t, *switch)
    total = counter.writes
    for k in sorted({1, 2, total // 3, total // 2, 2 * total // 3, total - 1}):
        m.apply(t, *before)
        with pytest.raises(Cancelled), CancelAtWrite(k):
            m.apply(t, *switch)
        for request, bits in zip(later, expected, strict=True):
            m.apply(t, *request)
            assert not _differing(_bits(pipe), bits), (k, request)
    m.reset()
    assert not _differing(_base_bits(pipe), written["base"])


def test_a_quantized_weight_refuses_a_lokr_before_anything_is_written(setup, written):
    """A weight the delta path cannot write (float8, as FLUX_FP8=1 makes the blocks' weights) is found before
    anything changes: the request fails in one line and the models are as they were."""
    pipe, m = written["pipe"], written["manager"]
    m.reset()
    name = next(iter(m.main.delta_components["transformer"]))
    layer = pipe.transformer.get_submodule(name).get_base_layer()
    original = layer.weight.data
    layer.weight.data = original.to(torch.float8_e4m3fn)
    try:
        before = _bits(pipe)
        with pytest.raises(UserError, match=rf"^layer {name} is quantized here .* \(run without FLUX_FP8\)\.$"):
            m.apply(pipe.transformer, 1.0, setup["extra_url"], 1.0)
        assert not _differing(_bits(pipe), before)
    finally:
        layer.weight.data = original


def test_the_same_file_behind_another_signed_url_is_parsed_once(setup, hub, caplog):
    """A signed URL's signature changes while its file does not: it is downloaded again (another URL) but
    parsed once (parsed LoRAs are kept by content), and the request shows the URL it was given."""
    s = setup
    m, t = s["manager"], s["pipe"].transformer
    data = fx.bfl_family(t, style="kohya", seed=31).to_bytes()
    hub.add("/signed/style.safetensors", data)
    first, second = (f"{hub.url}/signed/style.safetensors?X-Amz-Signature={sig}" for sig in ("aaa", "bbb"))
    caplog.set_level("INFO", logger="lora_loader")
    m.apply(t, 0.0, first, 1.0)
    m.apply(t, 0.0, second, 1.0)
    parsed = [r.getMessage() for r in caplog.records if "parsed" in r.getMessage()]
    assert len(parsed) == 2 and "from memory" in parsed[1] and "from memory" not in parsed[0]
    assert hub.hits("/signed/style.safetensors") == 2
    assert m.state(t)["extra"].loras == ((f"{hub.url}/signed/style.safetensors?…", 1.0),)
    m.reset()
