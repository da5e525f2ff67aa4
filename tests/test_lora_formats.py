"""Every LoRA format loads to the ΔW it means, layer by layer, on the tiny FLUX transformer and CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import lora_fixtures as fx
import pytest
import torch

from errors import UserError
from lora_loader import LoraManager
from lora_sources import LoraCache
from loras.formats import parse_lora
from scripts import tiny_weights

SCALE = 0.75


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A manager over fresh copies of the models (adapter injected), with their base weights."""
    dev = tiny_weights.flux_transformer(True, 0)
    schnell = tiny_weights.flux_transformer(False, 7)
    clip = _clip()
    base = {
        "transformer": {n: w.double() for n, w in _linear_weights(dev).items()},
        "text_encoder": {n: w.double() for n, w in _linear_weights(clip).items()},
    }
    cache = LoraCache(tmp_path_factory.mktemp("cache"), 1 << 30)
    manager = LoraManager([dev, schnell], clip, cache, max_rank=8)
    return manager, dev, schnell, clip, base


def _clip():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        clip, _, _, _ = tiny_weights.text_encoders(Path(tmp))
    return clip


def _linear_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _check_effective(manager, model, component, base, deltas, scale):
    """Every layer of `model` is base + scale·ΔW (ΔW = 0 for layers the LoRA does not target)."""
    effective = fx.effective_weights(model)
    assert effective, "no LoRA adapter in the model"
    targeted = 0
    for name, weight in effective.items():
        delta = deltas.get(f"{component}.{name}")
        expected = base[component][name] + (scale * delta if delta is not None else 0)
        torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        targeted += delta is not None
    return targeted


@pytest.mark.parametrize("fmt", sorted(fx.FORMATS))
def test_each_format_applies_exactly_its_delta(tiny, tmp_path, fmt):
    manager, dev, schnell, clip, base = tiny
    with_clip = fmt in ("kohya", "comfyui", "diffusers")
    lora = fx.FORMATS[fmt](dev, clip=clip) if with_clip else fx.FORMATS[fmt](dev)
    path = lora.write(tmp_path / f"{fmt}.safetensors")

    manager.apply(dev, 0.0, str(path), SCALE)
    n = _check_effective(manager, dev, "transformer", base, lora.deltas, SCALE)
    assert n == sum(k.startswith("transformer.") for k in lora.deltas) > 0
    if with_clip:
        assert _check_effective(manager, clip, "text_encoder", base, lora.deltas, SCALE) > 0
    # the other transformer gets nothing
    for name, weight in fx.effective_weights(schnell).items():
        assert torch.equal(weight, schnell.get_submodule(name).get_base_layer().weight.double())
    manager.reset()


def test_kohya_linear1_splits_by_the_models_width(tiny, tmp_path):
    """diffusers' converter hard-codes FLUX's 3072 width for linear1; ours reads the model's widths."""
    manager, dev, *_ = tiny
    lora = fx.bfl_family(dev, style="kohya")
    parsed = parse_lora(lora.write(tmp_path / "k.safetensors"), "k", manager.shapes, 8)
    for target in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
        down, up = parsed.pairs[f"transformer.single_transformer_blocks.0.{target}"]
        torch.testing.assert_close(
            (up.double() @ down.double()), lora.deltas[f"transformer.single_transformer_blocks.0.{target}"]
        )

    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    with pytest.raises(AssertionError):  # the library falls short here: why convert_bfl_family exists
        _convert_kohya_flux_lora_to_diffusers(dict(lora.tensors))


def test_our_bfl_converter_agrees_with_diffusers_where_diffusers_works(tiny):
    """Without linear1, diffusers' kohya converter works at any width: both must give the same ΔW.

    alpha = rank here: diffusers ignores the alphas of `final_layer` (a TODO in its converter),
    while ours scales that layer like every other (checked against the fixture's ΔW above).
    """
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from loras.formats import convert_bfl_family

    manager, dev, *_ = tiny
    lora = fx.bfl_family(dev, style="kohya", single_linear1=False, alpha=4.0)
    ours, rest, _ = convert_bfl_family(dict(lora.tensors), manager.shapes)
    assert not rest
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(lora.tensors))
    names = {k.rsplit(".lora_", 1)[0] for k in theirs}
    names = {n if n.startswith("transformer.") else f"transformer.{n}" for n in names}
    assert names == set(ours)
    for name, (down, up) in ours.items():
        key = name if f"{name}.lora_A.weight" in theirs else name.removeprefix("transformer.")
        expected = theirs[f"{key}.lora_B.weight"].double() @ theirs[f"{key}.lora_A.weight"].double()
        torch.testing.assert_close(up.double() @ down.double(), expected)


def test_bfl_native_with_diffusion_model_prefix(tiny, tmp_path):
    manager, dev, *_ = tiny
    lora = fx.bfl_family(dev, style="bfl", alpha=None)
    lora.tensors = {f"diffusion_model.{k}": v for k, v in lora.tensors.items()}
    parsed = parse_lora(lora.write(tmp_path / "b.safetensors"), "b", manager.shapes, 8)
    assert set(parsed.pairs) == set(lora.deltas)


def test_partial_match_reports_how_many_layers(tiny, tmp_path, caplog):
    manager, dev, *_ = tiny
    lora = fx.diffusers_peft(dev)
    lora.tensors["transformer.not_a_layer.lora_A.weight"] = torch.zeros(4, 8)
    lora.tensors["transformer.not_a_layer.lora_B.weight"] = torch.zeros(8, 4)
    lora.tensors["lora_unet_double_blocks_7_img_attn_proj.lora_down.weight"] = torch.zeros(4, 32)
    lora.tensors["lora_unet_double_blocks_7_img_attn_proj.lora_up.weight"] = torch.zeros(32, 4)
    path = lora.write(tmp_path / "partial.safetensors")
    parsed = parse_lora(path, "partial", manager.shapes, 8)
    assert len(parsed.pairs) == len(lora.deltas)
    assert parsed.unmatched == ["double_blocks_7_img_attn_proj", "transformer.not_a_layer"]
    with caplog.at_level("INFO", logger="lora_loader"):
        manager.apply(dev, 0.0, str(path), 1.0)
    assert "2 of its layers match nothing here" in caplog.text
    assert f"on {len(lora.deltas)} of {len(lora.deltas)} transformer layers" in caplog.text
    manager.reset()


def test_lora_for_another_model_matches_nothing(tiny, tmp_path):
    manager, *_ = tiny
    from safetensors.torch import save_file

    sd15 = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
    }
    save_file(sd15, tmp_path / "sd15.safetensors")
    with pytest.raises(UserError, match="matches no layer of this FLUX model"):
        parse_lora(tmp_path / "sd15.safetensors", "sd15", manager.shapes, 8)


def test_wrong_width_is_an_error(tiny, tmp_path):
    manager, *_ = tiny
    # a LoRA for a transformer of another width: same names, other shapes
    from scripts.tiny_weights import flux_transformer

    other = flux_transformer(guidance_embeds=False, seed=0, heads=3)
    for fmt in ("diffusers", "kohya"):
        path = fx.FORMATS[fmt](other).write(tmp_path / f"{fmt}.safetensors")
        with pytest.raises(UserError, match="another model or size"):
            parse_lora(path, fmt, manager.shapes, 8)


def test_rank_over_the_limit_names_it(tiny, tmp_path):
    manager, dev, *_ = tiny
    path = fx.diffusers_peft(dev, rank=16).write(tmp_path / "r16.safetensors")
    with pytest.raises(UserError, match=r"rank is 16, over this server's limit of 8 \(LORA_MAX_RANK\)"):
        parse_lora(path, "r16", manager.shapes, 8)


def test_nan_and_half_pairs_are_errors(tiny, tmp_path):
    manager, dev, *_ = tiny
    lora = fx.diffusers_peft(dev)
    key = next(iter(lora.tensors))
    lora.tensors[key] = lora.tensors[key].clone().fill_(float("nan"))
    with pytest.raises(UserError, match="NaN"):
        parse_lora(lora.write(tmp_path / "nan.safetensors"), "nan", manager.shapes, 8)
    lora = fx.bfl_family(dev, style="kohya")
    del lora.tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    with pytest.raises(UserError, match="not both lora_A and lora_B"):
        parse_lora(lora.write(tmp_path / "half.safetensors"), "half", manager.shapes, 8)


def test_metadata_alpha_is_folded_once(tiny, tmp_path):
    manager, dev, *_ = tiny
    lora = fx.diffusers_peft(dev, alpha="metadata")
    meta = json.loads(lora.metadata["lora_adapter_metadata"])
    assert meta["transformer.lora_alpha"] == 8
    parsed = parse_lora(lora.write(tmp_path / "m.safetensors"), "m", manager.shapes, 8)
    for name, (down, up) in parsed.pairs.items():
        torch.testing.assert_close(up.double() @ down.double(), lora.deltas[name])
