"""The NSFW filter for generated images, in two stages (what Replicate's FLUX fine-tunes do).

Stage one, the Stable Diffusion safety checker, looks at the whole batch. Stage two, a ViT
classifier with the labels normal/nsfw, gives a second opinion on the images stage one flags,
to cut stage one's false positives. An image is unsafe only if both say so; if stage two fails,
the images it was asked about are unsafe (fail closed). Unsafe images are dropped, never
blacked out, and a prediction whose every image is unsafe fails with NSFWError.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from errors import UserError

logger = logging.getLogger(__name__)

NSFW_MESSAGE = "NSFW content detected. Try running it again, or try a different prompt."


class NSFWError(UserError):
    """Every image of the batch was unsafe."""

    def __init__(self) -> None:
        super().__init__(NSFW_MESSAGE)


def _not_black_image_warning(record: logging.LogRecord) -> bool:
    """diffusers' checker warns that flagged images come back black; ours are dropped, and we say so."""
    return not record.getMessage().startswith("Potential NSFW content was detected")


class SafetyChecker:
    def __init__(self, checker, checker_processor, detector, detector_processor) -> None:
        self.checker, self.checker_processor = checker, checker_processor
        self.detector, self.detector_processor = detector, detector_processor
        labels = detector.config.label2id
        if "nsfw" not in labels:
            raise ValueError(f"the NSFW detector has no 'nsfw' label (its labels: {sorted(labels)})")
        self.nsfw_label = labels["nsfw"]

    @classmethod
    def load(cls, checker_dir: Path, detector_dir: Path, device: torch.device, dtype: torch.dtype) -> SafetyChecker:
        """Both stages from their local folders (config, weights and preprocessor_config.json).

        The processors are the PIL ones of the models' own classes (CLIP, ViT), named directly:
        AutoImageProcessor would scan its whole table of processors first, warning for each one that
        "requires torchvision", and pick the torchvision backend where that is installed, so the verdict
        would hang on which machine runs it."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessorPil, ViTForImageClassification, ViTImageProcessorPil

        logging.getLogger(StableDiffusionSafetyChecker.__module__).addFilter(_not_black_image_warning)
        checker = StableDiffusionSafetyChecker.from_pretrained(checker_dir, dtype=dtype).to(device).eval()
        # float32: the detector is small and its verdict should not hang on bfloat16 rounding.
        detector = ViTForImageClassification.from_pretrained(detector_dir, dtype=torch.float32)
        return cls(
            checker,
            CLIPImageProcessorPil.from_pretrained(checker_dir),
            detector.to(device).eval(),
            ViTImageProcessorPil.from_pretrained(detector_dir),
        )

    def filter(self, images: list[Image.Image]) -> list[int]:
        """Indices of the images that are safe to return, in order. Logs each dropped index.

        Raises NSFWError when none is safe.
        """
        if not images:
            return []
        unsafe = self._second_opinion(images, self._flagged(images))
        for index in sorted(unsafe):
            logger.warning("NSFW content detected: image %d removed from the output", index)
        safe = [index for index in range(len(images)) if index not in unsafe]
        if not safe:
            raise NSFWError()
        return safe

    @torch.no_grad()
    def _flagged(self, images: list[Image.Image]) -> list[int]:
        """Stage one, one call for the batch: the indices the safety checker flags."""
        pixels = self.checker_processor(images=images, return_tensors="pt")["pixel_values"]
        # The checker blacks out the flagged entries of `images` in place; we drop those images
        # instead, so it gets a throwaway array rather than a copy of the pictures.
        placeholder = np.zeros((len(images), 1, 1, 3), dtype=np.float32)
        _, has_nsfw_concepts = self.checker(
            clip_input=pixels.to(self.checker.device, self.checker.dtype), images=placeholder
        )
        return [index for index, flagged in enumerate(has_nsfw_concepts) if flagged]

    def _second_opinion(self, images: list[Image.Image], flagged: list[int]) -> set[int]:
        """Stage two, one call for the flagged images: those the detector also calls nsfw."""
        if not flagged:
            return set()
        try:
            with torch.no_grad():
                inputs = self.detector_processor(images=[images[i] for i in flagged], return_tensors="pt")
                pixels = inputs["pixel_values"].to(self.detector.device, self.detector.dtype)
                logits = self.detector(pixel_values=pixels).logits.float()
            if not torch.isfinite(logits).all():
                raise ValueError(f"the NSFW detector returned non-finite logits: {logits.tolist()}")
            probabilities = logits.softmax(dim=-1)
        except Exception:
            logger.exception("the NSFW detector failed; treating images %s as unsafe", flagged)
            return set(flagged)
        unsafe = set()
        for index, probs in zip(flagged, probabilities, strict=True):
            nsfw = int(probs.argmax()) == self.nsfw_label
            verdict = "confirms" if nsfw else "overrules"
            p = float(probs[self.nsfw_label])
            logger.info("image %d: the safety checker flags it, the NSFW detector %s (p=%.3f)", index, verdict, p)
            if nsfw:
                unsafe.add(index)
        return unsafe
