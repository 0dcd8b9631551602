"""Quality figures of the embedded default, each a function of known inputs (tested so) plus a
thin wrapper that runs the frozen encoders exactly as `unclip embed` loads them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data_pipeline.synthetic import CAPTION_TEMPLATES, attributes_from_caption, one_attribute_away
from models.config import ClipConfig, VaeConfig


def psnr(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (mean squared error over everything)."""
    mse = float(np.mean((reference.astype(np.float64) - reconstruction.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def top1(image_emb: np.ndarray, candidate_embs: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of images whose most similar candidate (cosine) is the true one.
    image_emb [N, D]; candidate_embs [N, K, D]; truth [N] indices into K."""
    a = image_emb / np.linalg.norm(image_emb, axis=-1, keepdims=True)
    b = candidate_embs / np.linalg.norm(candidate_embs, axis=-1, keepdims=True)
    return float(np.mean(np.einsum("nd,nkd->nk", a, b).argmax(-1) == truth))


def canonical_caption(shape: str, color: str, background: str) -> str:
    return CAPTION_TEMPLATES[0].format(shape=shape, color=color, background=background)


def clip_retrieval(clip_cfg: ClipConfig, pairs: tuple[np.ndarray, list[str]]) -> dict[str, Any]:
    """Top-1 retrieval of each image's caption among captions that differ in one attribute."""
    from models.encoders import FrozenClip

    images, captions = pairs
    known = [(i, attributes_from_caption(c)) for i, c in enumerate(captions)]
    known = [(i, truth) for i, truth in known if truth]
    if not known:
        return {"top1": float("nan"), "count": 0}
    clip = FrozenClip(clip_cfg)
    pictures = torch.from_numpy(images[[i for i, _ in known]]).permute(0, 3, 1, 2).float() / 255.0
    pictures = torch.nn.functional.interpolate(pictures, size=clip.image_size, mode="bicubic", antialias=True).clamp(0, 1)
    image_emb = clip.encode_images(pictures).numpy()
    candidates = [[canonical_caption(*truth)] + [canonical_caption(*other) for other in one_attribute_away(*truth)] for _, truth in known]
    texts = clip.encode_text([c for group in candidates for c in group])["emb"].numpy()
    score = top1(image_emb, texts.reshape(len(known), len(candidates[0]), -1), np.zeros(len(known), dtype=int))
    return {"top1": score, "count": len(known), "candidates": len(candidates[0])}


def vae_psnr(vae_cfg: VaeConfig, images: np.ndarray, side: int) -> float:
    """Mean PSNR of encode (posterior mean) -> decode of uint8 images at side x side."""
    from models.encoders import FrozenVae

    vae = FrozenVae(vae_cfg)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-1] != side:
        x = torch.nn.functional.interpolate(x, size=side, mode="bicubic", antialias=True).clamp(-1, 1)
    scores = []
    for start in range(0, len(x), 64):
        batch = x[start : start + 64]
        back = vae.decode(vae.encode(batch))
        scores += [psnr(((a + 1) / 2).numpy(), ((b + 1) / 2).numpy()) for a, b in zip(batch, back)]
    return float(np.mean(scores))


def guidance_gain(off: dict[str, Any], on: dict[str, Any]) -> dict[str, Any]:
    """Off -> on of one chain's eval.json scores (guidance 1, then the configured scales): mean prompt
    following, CLIP score and Fréchet distance. Guidance beats unguided when following and the CLIP
    score both rise; the distance is reported, not judged (see benchmarks/quality.py)."""
    follow = [float(np.mean(list(scores["prompt_following"].values()))) for scores in (off, on)]
    clip_score = [off["clip_score"], on["clip_score"]]
    distance = [off["frechet_distance_clip"], on["frechet_distance_clip"]]
    return {"prompt_following_mean": follow, "clip_score": clip_score, "frechet_distance_clip": distance,
            "beats_unguided": follow[1] > follow[0] and clip_score[1] > clip_score[0]}  # fmt: skip
