"""Pure evaluation metrics: arrays (or score dicts) in, numbers out."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from scipy import linalg


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of matching rows."""
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return float((a * b).sum(-1).mean())


def frechet_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)): the Fréchet distance of two Gaussians."""
    # scipy infers a (root, error) pair too, which only disp=False returns
    covmean = cast(np.ndarray, linalg.sqrtm(sigma1 @ sigma2))
    if np.iscomplexobj(covmean):  # numerical noise of a nearly singular product
        covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two sets of embeddings (FID, in CLIP space)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return frechet_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


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


def guidance_gain(off: dict[str, Any], on: dict[str, Any]) -> dict[str, Any]:
    """Off -> on of one chain's eval.json scores (guidance 1, then the configured scales): mean prompt
    following, CLIP score and Fréchet distance. Guidance beats unguided when following and the CLIP
    score both rise; the distance is reported, not judged (see benchmarks/quality.py)."""
    follow = [float(np.mean(list(scores["prompt_following"].values()))) for scores in (off, on)]
    clip_score = [off["clip_score"], on["clip_score"]]
    distance = [off["frechet_distance_clip"], on["frechet_distance_clip"]]
    return {
        "prompt_following_mean": follow,
        "clip_score": clip_score,
        "frechet_distance_clip": distance,
        "beats_unguided": follow[1] > follow[0] and clip_score[1] > clip_score[0],
    }
