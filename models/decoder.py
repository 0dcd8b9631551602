"""The unCLIP decoder: 64 px images from a CLIP image embedding (and the caption's tokens).

As in Ramesh et al. 2022 (and diffusers' UnCLIP pipeline), `UnCLIPTextProjModel` projects the
image embedding into the UNet's timestep embedding and into extra context tokens placed before
the text tokens; the UNet is a diffusers `UNet2DConditionModel` whose class embedding is that
additive timestep term. A dropped image embedding is the learned null embedding the projection
model carries; a dropped caption is all-zero tokens and text embedding.
"""

from __future__ import annotations

import math

import torch

from models.config import DecoderConfig
from models.diffusion import Diffusion


def text_proj_class():
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    return UnCLIPTextProjModel


class UnclipDecoder(torch.nn.Module):
    """The two networks trained together; `forward` predicts the diffusion target."""

    def __init__(self, unet, text_proj):
        super().__init__()
        self.unet, self.text_proj = unet, text_proj

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, x_t, t, image_emb, text_emb, tokens, image_dropped):
        null = self.text_proj.learned_classifier_free_guidance_embeddings.to(image_emb.dtype)
        image_emb = torch.where(image_dropped[:, None], null.expand_as(image_emb), image_emb)
        context, time_extra = self.text_proj(
            image_embeddings=image_emb, prompt_embeds=text_emb, text_encoder_hidden_states=tokens, do_classifier_free_guidance=False
        )
        return self.unet(x_t, t, encoder_hidden_states=context, class_labels=time_extra).sample


def build_decoder(cfg: DecoderConfig, embed_dim: int, text_width: int, image_size: int) -> UnclipDecoder:
    from diffusers import UNet2DConditionModel

    n = len(cfg.block_channels)
    time_embed_dim = cfg.block_channels[0] * 4
    unet = UNet2DConditionModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(cfg.block_channels),
        # attention only at the lowest resolution: at 64 px it would cost more than everything else
        down_block_types=("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=text_width,
        attention_head_dim=cfg.heads,  # diffusers' name; it is the number of heads here
        class_embed_type="identity",  # the image embedding's projection, added to the time embedding
        norm_num_groups=min(32, math.gcd(*cfg.block_channels)),
    )
    text_proj = text_proj_class()(
        clip_extra_context_tokens=cfg.context_tokens,
        clip_embeddings_dim=embed_dim,
        time_embed_dim=time_embed_dim,
        cross_attention_dim=text_width,
    )
    return UnclipDecoder(unet, text_proj)


def predict(model, x_t, t, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """`model` is an UnclipDecoder or an engine wrapping one; inputs are cast to its dtype."""
    dtype = getattr(model, "module", model).dtype
    return model(
        x_t.to(dtype), t, cond["image_emb"].to(dtype), cond["text_emb"].to(dtype), cond["tokens"].to(dtype), cond["image_dropped"]
    ).float()


def drop(cond: dict[str, torch.Tensor], drop_image: torch.Tensor, drop_text: torch.Tensor) -> dict[str, torch.Tensor]:
    keep_text = (~drop_text).float()
    return {
        **cond,
        "image_dropped": cond["image_dropped"] | drop_image,
        "text_emb": cond["text_emb"] * keep_text[:, None],
        "tokens": cond["tokens"] * keep_text[:, None, None],
    }


def conditioning(image_emb: torch.Tensor, text_emb: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"image_emb": image_emb, "text_emb": text_emb, "tokens": tokens, "image_dropped": torch.zeros(len(image_emb), dtype=torch.bool, device=image_emb.device)}


def sample(model, diffusion: Diffusion, cond: dict[str, torch.Tensor], steps: int, guidance: float,
           generator: torch.Generator, sampler: str = "ddim") -> torch.Tensor:  # fmt: skip
    """CLIP image embeddings (+ caption) -> images in [-1, 1]; guidance against the fully
    unconditional model (null image embedding, no caption), as in unCLIP."""
    n = len(cond["image_emb"])
    everything = torch.ones(n, dtype=torch.bool)
    null = drop(cond, everything, everything)

    def model_fn(x, t, conditional):
        return predict(model, x, t, cond if conditional else null)

    size = model.unet.config.sample_size
    return diffusion.sample(model_fn, (n, 3, size, size), steps, guidance, generator, sampler).clamp(-1, 1)
