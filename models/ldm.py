"""The latent-diffusion model: a diffusers UNet2DConditionModel over VAE latents.

It cross-attends to CLIP's per-token text states, like Stable Diffusion, and (ldm.text_embedding_token)
to CLIP's pooled text embedding as one more token; no attention mask, so the exported UNet runs in a
plain diffusers pipeline given that sequence as `prompt_embeds`. Dropped text is all zeros, or
(ldm.null_text: empty_caption) the empty caption's states, as Stable Diffusion was trained.
"""

from __future__ import annotations

import torch

from models.config import LdmConfig
from models.diffusion import Diffusion, device_of
from models.normalization import norm_groups


def build_unet(cfg: LdmConfig, latent_channels: int, latent_size: int, text_width: int):
    n = len(cfg.block_channels)
    from diffusers import (
        UNet2DConditionModel,  # pyright: ignore[reportPrivateImportUsage]
    )  # lazy: diffusers (3-4 s) only where a network is built; `unclip train` checks the store without it

    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(cfg.block_channels),
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=text_width,
        attention_head_dim=cfg.heads,  # diffusers' name; it is the number of heads here
        # Cross-attention alone leaves the global attributes (colours) to a few attention layers;
        # pooled text in the timestep embedding reaches every residual block. It reads only
        # encoder_hidden_states, so the exported UNet still runs in a plain diffusers pipeline.
        addition_embed_type="text" if cfg.pooled_text else None,
        addition_embed_type_num_heads=cfg.heads,
        norm_num_groups=norm_groups(cfg.block_channels),
    )


def context(text: dict[str, torch.Tensor], embedding_token: bool) -> torch.Tensor:
    """The sequence the UNet attends to: tokens [B, L, W], then with `embedding_token` the pooled
    embedding emb [B, W] as token L + 1."""
    tokens = text["tokens"].float()
    return torch.cat([tokens, text["emb"].float()[:, None]], 1) if embedding_token else tokens


def predict(unet, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """`unet` is the UNet or an engine wrapping it; inputs are cast to its dtype."""
    dtype = getattr(unet, "module", unet).dtype
    return unet(x_t.to(dtype), t, encoder_hidden_states=context.to(dtype)).sample.float()


def sample(
    unet,
    diffusion: Diffusion,
    context: torch.Tensor,
    steps: int,
    guidance: float,
    generator: torch.Generator,
    null: torch.Tensor | None = None,
) -> torch.Tensor:
    """Text context [B, L, W] (see `context`) -> scaled latents [B, C, h, w]. `null` [1, L, W]:
    the unconditional context (ldm.null_text: the empty caption's), else all zeros."""
    device = device_of(unet)
    context = context.to(device)
    null = torch.zeros_like(context) if null is None else null.to(device).expand_as(context)

    def model_fn(x: torch.Tensor, t: torch.Tensor, conditional: bool) -> torch.Tensor:
        return predict(unet, x, t, context if conditional else null)

    c, size = unet.config.in_channels, unet.config.sample_size
    return diffusion.sample(model_fn, (len(context), c, size, size), steps, guidance, generator, device=device)
