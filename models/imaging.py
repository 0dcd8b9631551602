"""Tensors to pictures, and pictures to grids."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images."""
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def grid(rows: list[list[Image.Image]]) -> Image.Image:
    h, w = rows[0][0].height, rows[0][0].width
    canvas = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            canvas.paste(image.resize((w, h)), (j * w, i * h))
    return canvas


def decode(blobs) -> np.ndarray:
    """Encoded images -> uint8 [B, H, W, 3]."""
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])


def to_zero_one(pixels) -> torch.Tensor:
    """uint8 [B, H, W, 3] (numpy or torch) -> float [B, 3, H, W] in [0, 1]: what CLIP's
    preprocessing takes."""
    return torch.as_tensor(pixels).permute(0, 3, 1, 2).float() / 255.0


def to_minus_one_one(pixels) -> torch.Tensor:
    """uint8 [B, H, W, 3] (numpy or torch) -> float [B, 3, H, W] in [-1, 1]: what the VAE and the
    pixel-space diffusion models take."""
    return torch.as_tensor(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
