"""Every kind of update a training tool writes, over real HTTP (issue 22): LyCORIS LoKr (both sides whole, as
SimpleTuner's FLUX config makes it, and decomposed), LoHa and full differences written by lycoris-lora, a PEFT
DoRA, and T5 parts in kohya's and OneTrainer's names, served as Replicate models (`someone/<kind>`), as
extras and as per-request fine-tunes, mixed with a plain LoRA. tests/test_lora_oracle.py checks each is exact
against its own library; here each one is served, changes the picture, and goes away bit for bit."""

from __future__ import annotations

import lora_fixtures as fx
import pytest

from tests.cog_server import CogServer, decode_data_uri
from tests.receivers import Receiver

SMALL = {"prompt": "an ascii art fox", "seed": 5, "aspect_ratio": "custom", "width": 256, "height": 256}
SMALL = {**SMALL, "num_inference_steps": 2, "output_format": "png", "disable_safety_checker": True}
KINDS = [*sorted(fx.LYCORIS_KINDS), "peft-dora", "t5-kohya", "t5-onetrainer"]


@pytest.fixture(scope="module")
def rx(tiny_weights, tmp_path_factory):
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_weights / "FLUX.1-dev" / "transformer")
    t5 = T5EncoderModel.from_pretrained(tiny_weights / "FLUX.1-dev" / "text_encoder_2")
    folder = tmp_path_factory.mktemp("kinds")
    with Receiver() as receiver:
        for seed, kind in enumerate(sorted(fx.LYCORIS_KINDS)):
            path = fx.lycoris_file(transformer, kind, folder / f"{kind}.safetensors", seed=50 + seed)
            receiver.serve(f"someone/{kind}/_weights", path.read_bytes())
        receiver.serve("someone/peft-dora/_weights", fx.peft_dora(transformer, seed=60).to_bytes())
        for style in ("kohya", "onetrainer"):
            receiver.serve(f"someone/t5-{style}/_weights", fx.t5_lora(t5, style, seed=61).to_bytes())
        receiver.serve("someone/lora/_weights", fx.bfl_family(transformer, style="kohya", rank=4, seed=62).to_bytes())
        yield receiver


@pytest.fixture(scope="module")
def server(tiny_weights, rx, tmp_path_factory):
    env = {"REPLICATE_ENDPOINT": rx.url + "/files", "LORA_CACHE_DIR": str(tmp_path_factory.mktemp("lora-cache"))}
    with CogServer(tiny_weights, env=env) as cog:
        cog.wait_for("READY")
        yield cog


def picture(server, **inputs) -> bytes:
    body = server.predict({**SMALL, **inputs}).json()
    assert body["status"] == "succeeded", body
    return decode_data_uri(body["output"][0])[1]


def test_every_kind_is_served_changes_the_picture_and_goes_away_bit_for_bit(server):
    base = picture(server, lora_scale=0)
    seen = {base}
    for kind in KINDS:
        extra = picture(server, lora_scale=0, extra_lora=f"someone/{kind}")
        assert extra not in seen, f"{kind}: the picture did not change"
        seen.add(extra)
        assert picture(server, lora_scale=0, extra_lora=f"someone/{kind}") == extra, kind
        assert picture(server, lora_scale=0) == base, f"{kind}: the base did not come back bit for bit"
    logs = server.logs()
    for kind in ("lokr", "loha", "full", "dora"):
        assert f"({kind})" in logs, kind


def test_a_lokr_fine_tune_with_a_lora_extra_and_a_t5_part(server):
    """replicate_weights a LoKr (written into the weights) + a LoRA (on the adapter) + a T5 part (in T5)."""
    lokr = picture(server, replicate_weights="someone/lokr-full-w2")
    mixed = picture(server, replicate_weights="someone/lokr-full-w2", extra_lora="someone/lora:0.7, someone/t5-kohya")
    assert mixed != lokr
    again = picture(server, replicate_weights="someone/lokr-full-w2", extra_lora="someone/lora:0.7, someone/t5-kohya")
    assert again == mixed
    assert picture(server, replicate_weights="someone/lokr-full-w2") == lokr
