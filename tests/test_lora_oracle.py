"""diffusers as the oracle: LoRA files laid out as real tools write them, applied by our LoraManager and by
diffusers' `load_lora_weights` + `set_adapters` on the same pipeline, give the same picture.

The pipeline has a transformer of FLUX's real width (24 heads × 128 = 3072) with one double and one single
block, and the tiny VAE and text encoders of scripts/tiny_weights.py; 64×64, 2 steps. Each layout
(tests/lora_fixtures.py REAL_LAYOUTS, each citing the tool code or posted file it follows) is checked
three ways: layer by layer, our ΔW equals diffusers' and the builder's own; the picture is within one
8-bit level of diffusers'; and it clearly differs from the base. Where diffusers cannot read a layout
(it crashes, loads nothing, drops layers or ignores alphas: `test_diffusers_cannot_read_these_itself`
pins down which), the oracle is the same LoRA converted to diffusers' own keys by the test.

The layouts, and where each comes from (the builders in tests/lora_fixtures.py say it in full):

  kohya                    kohya-ss/sd-scripts networks/lora_flux.py (lora_unet_/lora_te1_, bf16 + bf16 alphas)
  kohya-split-qkv          the same with network_args split_qkv (block-diagonal fused qkv/linear1, fp16)
  kohya-extract            sd-scripts networks/flux_extract_lora.py (every Linear, img_in … final_layer)  *
  kohya-final-layer-alpha  final_layer with alphas, huggingface/diffusers#13998                            *
  comfyui                  ComfyUI comfy_extras/nodes_lora_extract.py LoraSave (diffusion_model., fp16, CLIP)  *
  ai-toolkit               ostris/ai-toolkit toolkit/network_mixins.py peft_format (fp16, no alpha)
  diffusers-dreambooth     diffusers examples/dreambooth/train_dreambooth_lora_flux.py (bf16 + fp32 CLIP, metadata)
  onetrainer-legacy        Nerogar/OneTrainer convert_to_mixture (lora_transformer_ + lora_te1_ + alphas)  *
  onetrainer-diffusers     OneTrainer convert_to_diffusers (alpha folded; CLIP without text_model.)
  onetrainer-original      OneTrainer _save_original (BFL names, lora_A/lora_B, alphas)                     *
  xlabs                    XLabs-AI/x-flux DoubleStream/SingleStreamBlockLoraProcessor
  thelastben-alpha         TheLastBen/Jon_Snow_Flux_LoRA, per diffusers' test_with_alpha_in_state_dict
  peft                     huggingface/peft PeftModel.save_pretrained (base_model.model.)                   *
  simpletuner-peft         SimpleTuner's transformer.base_model.model., posted in comfyanonymous/ComfyUI#4347  *
  fal-kontext              fal's Kontext trainer, per diffusers' _convert_fal_kontext_lora_to_diffusers     *

  * diffusers cannot read the file itself (fx.DIFFUSERS_CANNOT_READ): the oracle is the converted LoRA.

diffusers' own adapters are loaded and unloaded first, for every layout, before our LoraManager
injects its adapter into the same modules: `unload_lora_weights` removes every PEFT layer it finds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lora_fixtures as fx
import numpy as np
import pytest
import torch

SCALE = 0.8
LAYOUTS = sorted(fx.REAL_LAYOUTS)


def _image(pipe, steps: int = 2) -> np.ndarray:
    """The picture as 8-bit levels (int16, to subtract)."""
    out = pipe(
        "a photo of a cat",
        height=64,
        width=64,
        num_inference_steps=steps,
        guidance_scale=3.5,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    return np.round(out * 255).astype(np.int16)


def _adapter_factors(pipe, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What diffusers' adapter adds to each layer, as (A, scaling·B), keyed like our pairs."""
    from peft.tuners.lora import LoraLayer

    factors = {}
    for component in ("transformer", "text_encoder"):
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A and adapter in module.active_adapters:
                a = module.lora_A[adapter].weight.detach().double().clone()
                b = module.lora_B[adapter].weight.detach().double() * module.scaling[adapter]
                factors[f"{component}.{name}"] = (a, b)
    return factors


def _probe(factors, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """ΔW·X for a fixed random X per layer: equal products give equal probes, without forming ΔW.
    Keyed by CLIP's names without "text_model." whatever the transformers version."""
    probes = {}
    for name, (a, b) in factors.items():
        if not (torch.count_nonzero(a) and torch.count_nonzero(b)):
            continue  # an all-zero layer changes nothing
        x = torch.randn(a.shape[1], 3, generator=torch.Generator().manual_seed(a.shape[1]), dtype=torch.float64)
        probes[name.replace("text_encoder.text_model.", "text_encoder.", 1)] = scale * (b.double() @ (a.double() @ x))
    return probes


def _same_delta(ours, theirs, rtol: float, what: str) -> None:
    only_ours, only_theirs = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    assert not (only_ours or only_theirs), f"{what}: layers only in ours {only_ours}, only in theirs {only_theirs}"
    for name in ours:
        error = ((ours[name] - theirs[name]).norm() / theirs[name].norm()).item()
        assert error < rtol, f"{what}: layer {name} differs by {error:.2e} (relative)"


def _pipeline():
    from diffusers import FluxPipeline

    from scripts import tiny_weights

    with tempfile.TemporaryDirectory() as tmp:
        clip, tokenizer, t5, tokenizer_2 = tiny_weights.text_encoders(Path(tmp))
    pipe = FluxPipeline(
        scheduler=tiny_weights.flux_scheduler(dynamic_shifting=True),
        vae=tiny_weights.flux_vae(),
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=fx.flux_width_transformer(seed=0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """The pipeline, every layout's file, diffusers' results for each, and then our LoraManager on it."""
    from lora_loader import LoraManager
    from loras.cache import LoraCache

    folder = tmp_path_factory.mktemp("real-loras")
    pipe = _pipeline()
    files, oracle, direct = {}, {}, {}
    for seed, name in enumerate(LAYOUTS):
        lora = fx.REAL_LAYOUTS[name](pipe.transformer, pipe.text_encoder, seed=seed)
        files[name] = (lora, lora.write(folder / f"{name}.safetensors"))
        pipe.load_lora_weights(lora.oracle if lora.oracle is not None else str(files[name][1]), adapter_name="oracle")
        pipe.set_adapters(["oracle"], [SCALE])
        oracle[name] = (_image(pipe), _probe(_adapter_factors(pipe, "oracle")))
        pipe.unload_lora_weights()
        if lora.oracle is not None:  # what diffusers makes of the file itself
            try:
                pipe.load_lora_weights(str(files[name][1]), adapter_name="file")
                pipe.set_adapters(["file"], [SCALE])
                direct[name] = _probe(_adapter_factors(pipe, "file"))
            except Exception as e:  # noqa: BLE001 - what it raises is the finding
                direct[name] = e
            finally:
                pipe.unload_lora_weights()
    base = _image(pipe)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_LOCAL_DIR", str(folder))
        manager = LoraManager(
            [pipe.transformer], pipe.text_encoder, LoraCache(tmp_path_factory.mktemp("cache"), 1 << 30), max_rank=16
        )
        yield {"pipe": pipe, "files": files, "oracle": oracle, "direct": direct, "base": base, "manager": manager}
        manager.reset()


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_applies_exactly_as_diffusers_does(flux, name):
    from loras.formats import parse_lora

    lora, path = flux["files"][name]
    expected_image, expected = flux["oracle"][name]
    pipe, manager = flux["pipe"], flux["manager"]

    # layer by layer: ours = the builder's ΔW = diffusers' (diffusers rounds kohya's fp16 alpha scale: 1e-3)
    parsed = parse_lora(path, name, manager.shapes, 16)
    ours = _probe(parsed.pairs, SCALE)
    _same_delta(ours, _probe(lora.factors, SCALE), 1e-5, f"{name}: ours vs the file's own ΔW")
    _same_delta(ours, expected, 1e-3, f"{name}: ours vs diffusers")
    components = {k.split(".", 1)[0] for k in lora.factors}
    assert set(parsed.applied) == components, f"{name}: tensors applied per component {parsed.applied}"

    # the picture
    manager.apply(pipe.transformer, 0.0, str(path), SCALE)
    try:
        image = _image(pipe)
    finally:
        manager.reset()
    worst = int(np.abs(image - expected_image).max())
    assert worst <= 1, f"{name}: {worst} levels from diffusers' picture ({lora.source})"
    changed = float(np.abs(image - flux["base"]).mean())
    assert changed > 2, f"{name}: only {changed:.1f} levels from the base on average: the LoRA hardly shows"


@pytest.mark.parametrize("name", sorted(fx.DIFFUSERS_CANNOT_READ))
def test_diffusers_cannot_read_these_itself(flux, name):
    """Why a layout's oracle is converted by the test: diffusers reading the file itself goes wrong
    (fx.DIFFUSERS_CANNOT_READ says how). If a diffusers upgrade fixes one, this fails: that layout can
    then be its own oracle."""
    direct = flux["direct"][name]
    if isinstance(direct, Exception):
        return  # it crashes
    _, expected = flux["oracle"][name]
    with pytest.raises(AssertionError):
        _same_delta(direct, expected, 1e-3, name)  # loads nothing, drops layers, or scales them wrongly


def test_converted_oracles_are_the_layouts_diffusers_cannot_read(flux):
    converted = {name for name, (lora, _) in flux["files"].items() if lora.oracle is not None}
    assert converted == set(fx.DIFFUSERS_CANNOT_READ) == set(flux["direct"])


# ------------------------------------------------------- what is not low-rank: lycoris-lora and PEFT as oracles
#
# LoKr (both sides whole, as SimpleTuner's FLUX config makes it; and W2 decomposed, with a factor), LoHa,
# full differences and a DoRA LoKr are written by lycoris-lora 4.1.3 itself and applied by its own modules'
# forward (not `merge_to()`, which applies alpha/dim twice for a decomposed LoKr and for LoHa); a PEFT DoRA
# is applied by diffusers/PEFT at SCALE (LyCORIS and ComfyUI disagree with PEFT at scales other than 1; we
# follow PEFT, the format's owner, so the LyCORIS DoRA is compared at scale 1). T5 parts (kohya's and
# OneTrainer's names, and ComfyUI's) are compared with T5 with the delta merged in float32.

WEIGHT_KINDS = [*sorted(fx.LYCORIS_KINDS), "peft-dora"]


def _scale(kind: str) -> float:
    return 1.0 if kind == "lokr-dora" else SCALE


def _layer_probes(model) -> dict[str, torch.Tensor]:
    """Each Linear layer's output for a fixed random input (whatever wraps it: LyCORIS, PEFT, our adapter)."""
    probes = {}
    with torch.no_grad():
        for name, (_, width) in fx.linear_shapes(model).items():
            x = torch.randn(3, width, generator=torch.Generator().manual_seed(width))
            probes[name] = model.get_submodule(name)(x).double()
    return probes


def _changed_layers(probes, base) -> dict[str, torch.Tensor]:
    return {name: probe - base[name] for name, probe in probes.items() if not torch.equal(probe, base[name])}


def _bits(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def weights_flux(tmp_path_factory):
    """The pipeline, a file of each kind, what its own library makes of it, then our LoraManager (with T5)."""
    folder = tmp_path_factory.mktemp("weight-loras")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LYCORIS_KERNEL_BACKEND", "torch")  # on a CPU, lycoris-lora would torch.compile each op first
        mp.setenv("LORA_LOCAL_DIR", str(folder))
        yield from _weights_flux(folder, tmp_path_factory)


def _weights_flux(folder: Path, tmp_path_factory):
    from lycoris import create_lycoris_from_weights

    from lora_loader import LoraManager
    from loras.cache import LoraCache

    pipe = _pipeline()
    base_probes, base_image, base_bits = _layer_probes(pipe.transformer), _image(pipe, steps=1), _bits(pipe.transformer)
    files, oracle = {}, {}
    for seed, kind in enumerate(sorted(fx.LYCORIS_KINDS)):
        files[kind] = fx.lycoris_file(pipe.transformer, kind, folder / f"{kind}.safetensors", seed=seed)
        network, _ = create_lycoris_from_weights(_scale(kind), str(files[kind]), pipe.transformer)
        network.apply_to()
        try:
            oracle[kind] = (_image(pipe, steps=1), _changed_layers(_layer_probes(pipe.transformer), base_probes))
        finally:
            network.restore()
    files["peft-dora"] = fx.peft_dora(pipe.transformer).write(folder / "peft-dora.safetensors")
    pipe.load_lora_weights(str(files["peft-dora"]), adapter_name="oracle")
    pipe.set_adapters(["oracle"], [SCALE])
    oracle["peft-dora"] = (_image(pipe, steps=1), _changed_layers(_layer_probes(pipe.transformer), base_probes))
    pipe.unload_lora_weights()
    assert all(torch.equal(t, base_bits[n]) for n, t in _bits(pipe.transformer).items()), "an oracle left a trace"
    manager = LoraManager(
        [pipe.transformer],
        pipe.text_encoder,
        LoraCache(tmp_path_factory.mktemp("cache"), 1 << 30),
        max_rank=16,
        t5=pipe.text_encoder_2,
    )
    yield {
        "pipe": pipe,
        "files": files,
        "folder": folder,
        "oracle": oracle,
        "base": (base_image, _layer_probes(pipe.transformer), base_bits),
        "manager": manager,
    }
    manager.reset()


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_weight_kind_applies_exactly_as_its_library_does(weights_flux, kind):
    pipe, manager = weights_flux["pipe"], weights_flux["manager"]
    base_image, base_probes, base_bits = weights_flux["base"]
    expected_image, expected = weights_flux["oracle"][kind]
    assert expected, f"{kind}: the oracle changes nothing"

    manager.apply(pipe.transformer, 0.0, str(weights_flux["files"][kind]), _scale(kind))
    try:
        ours = _changed_layers(_layer_probes(pipe.transformer), base_probes)
        image = _image(pipe, steps=1)
    finally:
        manager.reset()

    # layer by layer (LyCORIS forms W + ΔW − W in float32: its own rounding is ~1e-5 of a small ΔW)
    _same_delta(ours, expected, 1e-3, f"{kind}: ours vs its library")
    # the picture
    worst = int(np.abs(image - expected_image).max())
    assert worst <= 1, f"{kind}: {worst} levels from its library's picture"
    changed = float(np.abs(image - base_image).mean())
    assert changed > 2, f"{kind}: only {changed:.1f} levels from the base on average: the LoRA hardly shows"
    # and the base is back, bit for bit
    assert all(torch.equal(t, base_bits[n]) for n, t in _bits(pipe.transformer).items() if n in base_bits)


@pytest.mark.parametrize("style", sorted(fx.T5_STYLES))
def test_t5_parts_apply_as_t5_with_the_delta_merged(weights_flux, style, tmp_path):
    """kohya's (lora_te3_), OneTrainer's (lora_te2_) and ComfyUI's (text_encoders.t5xxl.transformer.) T5 names,
    with a kohya transformer part beside them, as sd-scripts' train_t5xxl writes it: T5 computes what T5 with
    scale·ΔW merged in float32 computes, the picture changes, and T5 is back bit for bit afterwards."""
    import copy

    pipe, manager = weights_flux["pipe"], weights_flux["manager"]
    t5 = pipe.text_encoder_2
    lora = fx.t5_lora(t5, style)
    lora.tensors |= fx.REAL_LAYOUTS["kohya"](pipe.transformer, None, seed=3).tensors
    path = lora.write(weights_flux["folder"] / f"t5-{style}.safetensors")
    merged = copy.deepcopy(t5)
    with torch.no_grad():
        for name, delta in lora.deltas.items():
            layer = merged.get_submodule(name.removeprefix("t5."))
            layer.weight.copy_(layer.weight.double() + SCALE * delta)
    ids = pipe.tokenizer_2(["a photo of a cat"], return_tensors="pt").input_ids
    base_bits = _bits(t5)
    with torch.no_grad():
        base = t5(ids).last_hidden_state
        expected = merged(ids).last_hidden_state

    manager.apply(pipe.transformer, 0.0, str(path), SCALE)
    try:
        with torch.no_grad():
            ours = t5(ids).last_hidden_state
    finally:
        manager.reset()

    assert not torch.allclose(expected, base, rtol=1e-2), f"{style}: the T5 part hardly changes T5"
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(t, base_bits[n]) for n, t in _bits(t5).items())
