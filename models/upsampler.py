"""Super-resolution (64 -> 256, 256 -> 1024): a diffusers UNet2DModel on [noisy high-res, low-res].

The low-resolution image, upsampled bicubically, is concatenated to the noisy input. In training
it is degraded (Gaussian blur, then Gaussian noise), as unCLIP's upsamplers are, so the model
learns to fix what a decoder's output gets wrong instead of copying it; and the model trains on
random crops, which a fully convolutional UNet then applies to whole images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from models.config import UpsamplerConfig
from models.diffusion import Diffusion, device_of
from models.normalization import norm_groups


def build_upsampler(cfg: UpsamplerConfig):
    n = len(cfg.block_channels)
    from diffusers import (
        UNet2DModel,  # pyright: ignore[reportPrivateImportUsage]
    )  # lazy: diffusers (3-4 s) only where a network is built; `unclip train` checks the store without it

    return UNet2DModel(
        sample_size=cfg.high,
        in_channels=6,
        out_channels=3,
        block_out_channels=tuple(cfg.block_channels),
        # Convolutions only, as unCLIP's upsamplers: trained on crops, run on whole images, where
        # attention (even diffusers' default one in the mid block) would cost (side/2^(n-1))^4.
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        add_attention=False,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=norm_groups(cfg.block_channels),
    )


def upsample(low: torch.Tensor, size: int, resize: str = "bicubic_clamped") -> torch.Tensor:
    """The low resolution at the UNet's side (upsampler.resize): bicubic clipped to [-1, 1], or
    antialiased bicubic unclipped, as diffusers' UnCLIPPipeline enlarges for Karlo's upsampler
    (antialiasing changes the kernel even when enlarging)."""
    if resize == "bicubic_antialias":
        return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    if resize != "bicubic_clamped":
        raise ValueError(f"upsampler.resize {resize!r}: expected bicubic_clamped or bicubic_antialias")
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, largest: float | None = None) -> torch.Tensor:
    """Per-image Gaussian blur ([B, C, H, W], one sigma per host tensor's entry; sigma 0 leaves it
    alone), applied where the images are. `largest`: the largest sigma there can be, which sizes
    the kernels without reading `sigmas` (default: their maximum)."""
    radius = max(1, int(math.ceil(3 * (largest if largest is not None else float(sigmas.max())))))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernels = torch.exp(-(offsets[None, :] ** 2) / (2 * sigmas.clamp(min=1e-3)[:, None] ** 2))
    kernels = torch.where(sigmas[:, None] > 0, kernels, (offsets == 0).to(images.dtype)[None, :])
    kernels = (kernels / kernels.sum(1, keepdim=True)).to(images.device)
    b, c, h, w = images.shape
    x = images.reshape(1, b * c, h, w)
    k = kernels.repeat_interleave(c, 0)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def degrade(low: torch.Tensor, cfg: UpsamplerConfig, generator: torch.Generator) -> torch.Tensor:
    """Blur, then noise, drawn on the host (the same on any device) and applied where `low` is."""
    n = len(low)
    lo, hi = cfg.blur_sigma
    sigmas = lo + (hi - lo) * torch.rand(n, generator=generator)
    blurred = gaussian_blur(low, sigmas, largest=hi)
    levels = cfg.noise_aug * torch.rand(n, generator=generator)
    noise = levels[:, None, None, None] * torch.randn(low.shape, generator=generator)
    return (blurred + noise.to(low)).clamp(-1, 1)


def random_crops(
    high: np.ndarray, low: np.ndarray, crop: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Aligned crops of high-res [B, H, W, 3] and low-res [B, h, w, 3] uint8 images."""
    if not crop:
        return high, low
    factor = high.shape[1] // low.shape[1]
    small = crop // factor
    hs, ls = [], []
    for hi_img, lo_img in zip(high, low, strict=True):
        y, x = rng.integers(0, lo_img.shape[0] - small + 1), rng.integers(0, lo_img.shape[1] - small + 1)
        ls.append(lo_img[y : y + small, x : x + small])
        hs.append(hi_img[y * factor : (y + small) * factor, x * factor : (x + small) * factor])
    return np.stack(hs), np.stack(ls)


def predict(model, x_t: torch.Tensor, t: torch.Tensor, low_up: torch.Tensor) -> torch.Tensor:
    dtype = getattr(model, "module", model).dtype
    # [:, :3]: a public upsampler with a learned variance (Karlo's) predicts it in channels 3-5
    return model(torch.cat([x_t, low_up], 1).to(dtype), t).sample[:, :3].float()


def sample(
    model,
    diffusion: Diffusion,
    low: torch.Tensor,
    factor: int,
    steps: int,
    generator: torch.Generator,
    resize: str = "bicubic_clamped",
) -> torch.Tensor:
    """Low-res images in [-1, 1] -> `factor` times larger images in [-1, 1] (no guidance: nothing
    is dropped in training). `resize`: how it was trained to see the low resolution (upsampler.resize)."""
    size = low.shape[-1] * factor
    device = device_of(model)
    low_up = upsample(low.to(device), size, resize)

    def model_fn(x, t, conditional):
        return predict(model, x, t, low_up)

    return diffusion.sample(model_fn, (len(low_up), 3, size, size), steps, 1.0, generator, device=device).clamp(-1, 1)
