"""How well the frozen encoders tell the embedded default's pictures apart: CLIP retrieval among
captions one attribute away, and the VAE's reconstruction PSNR. Each runs the encoders exactly as
`unclip embed` loads them; the metrics themselves are models/metrics.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data_pipeline.synthetic import CAPTION_TEMPLATES, attributes_from_caption, one_attribute_away
from models.config import ClipConfig, VaeConfig
from models.encoders import FrozenClip, FrozenVae
from models.imaging import to_minus_one_one, to_zero_one
from models.metrics import psnr, top1


def canonical_caption(shape: str, color: str, background: str) -> str:
    return CAPTION_TEMPLATES[0].format(shape=shape, color=color, background=background)


def clip_retrieval(clip_cfg: ClipConfig, pairs: tuple[np.ndarray, list[str]]) -> dict[str, Any]:
    """Top-1 retrieval of each image's caption among captions that differ in one attribute.
    Only captions in the embedded default's grammar can be scored: with none (real data), `top1`
    is None and `reason` says why."""
    images, captions = pairs
    known = [(i, attributes_from_caption(c)) for i, c in enumerate(captions)]
    known = [(i, truth) for i, truth in known if truth]
    if not known:
        return {
            "top1": None,
            "count": 0,
            "reason": f"none of the {len(captions)} captions names one shape and two colours as the embedded "
            "default's captions do, so none has captions one attribute away to be told apart from",
        }
    clip = FrozenClip(clip_cfg)
    pictures = to_zero_one(images[[i for i, _ in known]])
    pictures = torch.nn.functional.interpolate(pictures, size=clip.image_size, mode="bicubic", antialias=True).clamp(
        0, 1
    )
    image_emb = clip.encode_images(pictures).numpy()
    candidates = [
        [canonical_caption(*truth)] + [canonical_caption(*other) for other in one_attribute_away(*truth)]
        for _, truth in known
    ]
    texts = clip.encode_text([c for group in candidates for c in group])["emb"].numpy()
    score = top1(image_emb, texts.reshape(len(known), len(candidates[0]), -1), np.zeros(len(known), dtype=int))
    return {"top1": score, "count": len(known), "candidates": len(candidates[0])}


def vae_psnr(vae_cfg: VaeConfig, images: np.ndarray, side: int) -> float:
    """Mean PSNR of encode (posterior mean) -> decode of uint8 images at side x side."""
    vae = FrozenVae(vae_cfg)
    x = to_minus_one_one(images)
    if x.shape[-1] != side:
        x = torch.nn.functional.interpolate(x, size=side, mode="bicubic", antialias=True).clamp(-1, 1)
    scores = []
    for start in range(0, len(x), 64):
        batch = x[start : start + 64]
        back = vae.decode(vae.encode(batch))
        scores += [psnr(((a + 1) / 2).numpy(), ((b + 1) / 2).numpy()) for a, b in zip(batch, back, strict=True)]
    return float(np.mean(scores))
