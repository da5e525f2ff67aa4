"""Build a tiny random-weight weights tree, in exactly the layout of the real one.

    python scripts/tiny_weights.py DIR        (or: make tiny-weights DIR=...)

The tree is what tests, CI and `make demo` run on. It is loaded by the very same code as the
real FLUX weights (pipelines.py); nothing in the product knows it is tiny. Everything is built
in code with no network: configs, random weights, a CLIP BPE vocabulary and a T5 sentencepiece
model trained here on a few sentences.

    DIR/FLUX.1-dev/        diffusers FluxPipeline folder (guidance-distilled transformer)
    DIR/FLUX.1-schnell/    transformer/ (no guidance embedding) and scheduler/
    DIR/safety-checker/    StableDiffusionSafetyChecker + CLIPImageProcessor
    DIR/nsfw-detector/     ViTForImageClassification (normal/nsfw) + ViTImageProcessor
    DIR/lora.safetensors   a rank-4 LoRA for the tiny transformer (diffusers/PEFT keys)
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Sizes of the tiny models (FACTS.md: these configs work; keep their constraints).
HIDDEN = 32  # CLIP hidden size, T5 d_model, joint_attention_dim and pooled projection
HEADS, HEAD_DIM = 2, 16  # transformer: rope axes [4, 4, 8] must sum to HEAD_DIM
LATENT_CHANNELS = 16  # transformer in_channels = 4 × latent channels (2×2 packing)
LORA_RANK = 4
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v")

SENTENCES = [
    "an ascii art portrait of a cat made of characters",
    "a photo of a mountain lake at sunrise, in ascii art style",
    "a cyberpunk city street at night with neon signs",
    "the quick brown fox jumps over the lazy dog",
    "a bowl of fruit on a wooden table, oil painting",
    "a robot reading a book in a library, digital art",
]


def flux_transformer(guidance_embeds: bool, seed: int, heads: int = HEADS):
    """The tiny FLUX transformer; another `heads` gives the same layer names at another width."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=heads,
        joint_attention_dim=HIDDEN,
        pooled_projection_dim=HIDDEN,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    return model.eval()


def flux_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 8, 8],
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    return vae.eval()


def flux_scheduler(dynamic_shifting: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler

    # The real FLUX.1-dev / FLUX.1-schnell scheduler configs.
    if dynamic_shifting:
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def clip_tokenizer(workdir: Path):
    """A byte-level CLIP BPE with no merges: every word is spelled out in characters."""
    from transformers import CLIPTokenizer

    # GPT-2's byte-to-unicode table: the 256 symbols a byte-level BPE spells text with.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer(workdir: Path):
    """A T5 tokenizer from a sentencepiece unigram model trained here on a few sentences."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4),
        model_prefix=str(workdir / "spiece"),
        vocab_size=64,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    model = spm.SentencePieceProcessor(model_file=str(workdir / "spiece.model"))
    vocab = [(model.id_to_piece(i), model.get_score(i)) for i in range(model.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def text_encoders(workdir: Path):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = clip_tokenizer(workdir)
    torch.manual_seed(2)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=HIDDEN,
            max_position_embeddings=77,
            bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        )
    ).eval()
    tokenizer_2 = t5_tokenizer(workdir)
    torch.manual_seed(3)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=HIDDEN,
            d_ff=37,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
        )
    ).eval()
    return clip, tokenizer, t5, tokenizer_2


def safety_checker(out: Path) -> None:
    """Stage one: the Stable Diffusion safety checker, tiny, and set to flag nothing.

    Its concept thresholds are 1.0 (cosine similarity never exceeds them); tests that need
    a flagging checker rig the thresholds in their own copy of the tree.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(4)
    config = CLIPConfig(
        text_config={
            "hidden_size": HIDDEN,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 1,
            "vocab_size": 99,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": HIDDEN,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 1,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=HIDDEN,
    )
    model = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        model.concept_embeds_weights.fill_(1.0)
        model.special_care_embeds_weights.fill_(1.0)
    model.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)


def nsfw_detector(out: Path) -> None:
    """Stage two: a ViT classifier with the labels of Falconsai/nsfw_image_detection."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(5)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():  # a clear "normal" verdict by default; tests rig it the other way
        model.classifier.bias.copy_(torch.tensor([5.0, -5.0]))
    model.save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)


def lora_state_dict(transformer, rank: int = LORA_RANK, seed: int = 6, std: float = 0.5) -> dict:
    """A LoRA for `transformer` in diffusers/PEFT keys (what Replicate's trainer writes)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS):
            down = torch.randn(rank, module.in_features, generator=generator) * std
            up = torch.randn(module.out_features, rank, generator=generator) * std
            state[f"transformer.{name}.lora_A.weight"] = down
            state[f"transformer.{name}.lora_B.weight"] = up
    return state


def build(root: Path) -> Path:
    """Write the whole tiny tree under `root` and return it."""
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        clip, tokenizer, t5, tokenizer_2 = text_encoders(Path(tmp))
        dev = FluxPipeline(
            scheduler=flux_scheduler(dynamic_shifting=True),
            vae=flux_vae(),
            text_encoder=clip,
            tokenizer=tokenizer,
            text_encoder_2=t5,
            tokenizer_2=tokenizer_2,
            transformer=flux_transformer(guidance_embeds=True, seed=0),
        )
        dev.save_pretrained(root / "FLUX.1-dev")
    schnell = root / "FLUX.1-schnell"
    flux_transformer(guidance_embeds=False, seed=7).save_pretrained(schnell / "transformer")
    flux_scheduler(dynamic_shifting=False).save_pretrained(schnell / "scheduler")
    safety_checker(root / "safety-checker")
    nsfw_detector(root / "nsfw-detector")
    save_file(lora_state_dict(dev.transformer), root / "lora.safetensors")
    logger.info("tiny weights written to %s", root)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="where to write the weights tree")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import workarounds

    workarounds.configure_logging("INFO")  # our lines only: no library warnings, no progress bars
    build(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
