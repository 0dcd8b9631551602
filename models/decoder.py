"""The unCLIP decoder: pictures from a CLIP image embedding (and the caption's tokens).

As in Ramesh et al. 2022 (and diffusers' UnCLIP pipeline), `UnCLIPTextProjModel` projects the
image embedding into the UNet's timestep embedding and into extra context tokens placed before
the text tokens; the UNet is a diffusers `UNet2DConditionModel` whose class embedding is that
additive timestep term. A dropped image embedding is the learned null embedding the projection
model carries; a dropped caption is all-zero tokens and text embedding, or (decoder.null_text:
empty_caption) the empty caption's. With decoder.text_mask the caption's padding is masked out of
the cross-attention (the image's context tokens always attend), as Karlo's decoder does.

With `patch` p > 1 the UNet sees the image with each p x p block of pixels folded into channels
(`pixel_unshuffle`, as Hoogeboom et al. 2023 "simple diffusion" do for high-resolution pixel
diffusion): it runs at 64/p px with 3 p^2 channels, so its convolutions and attention see the
whole picture's layout at the cost of a latent model. The UNet's `in_channels` (3 p^2) records p.

A latent decoder (`space: latent`) is the same network over the store's VAE latents (C channels,
no folding); its samples become pictures through the frozen VAE (models/chains.py).
"""

from __future__ import annotations

import math

import torch

from models.config import DecoderConfig
from models.diffusion import Diffusion, device_of
from models.normalization import norm_groups


def text_proj_class():
    from diffusers.pipelines.deprecated.unclip.text_proj import (
        UnCLIPTextProjModel,
    )  # lazy: diffusers' pipelines package loads transformers; only the decoder needs this one class

    return UnCLIPTextProjModel


class UnclipDecoder(torch.nn.Module):
    """The two networks trained together; `forward` predicts the diffusion target."""

    def __init__(self, unet, text_proj, latent_channels: int | None = None):
        super().__init__()
        self.unet, self.text_proj = unet, text_proj
        self.latent = latent_channels is not None  # draws VAE latents, not pixels
        self.channels = latent_channels or 3
        self.patch = math.isqrt(unet.config.in_channels // self.channels)
        # a public decoder with a learned variance (Karlo's) gives twice the channels: the
        # prediction is the first half, which is what our diffusion trains with
        self.learned_variance = unet.config.out_channels == 2 * unet.config.in_channels

    @property
    def image_size(self) -> int:
        """Side of what it draws (pixels, or latents)."""
        return self.unet.config.sample_size * self.patch

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, x_t, t, image_emb, text_emb, tokens, image_dropped, text_mask=None, with_variance: bool = False):
        """`text_mask` [B, L]: the caption's tokens to attend to (None: all). `with_variance`: a
        learned-variance decoder's variance channels too, after the prediction's."""
        null = self.text_proj.learned_classifier_free_guidance_embeddings.to(image_emb.dtype)
        image_emb = torch.where(image_dropped[:, None], null.expand_as(image_emb), image_emb)
        context, time_extra = self.text_proj(
            image_embeddings=image_emb,
            prompt_embeds=text_emb,
            text_encoder_hidden_states=tokens,
            do_classifier_free_guidance=False,
        )
        mask = None
        if text_mask is not None:  # the context tokens text_proj puts before the caption's always attend
            mask = torch.nn.functional.pad(text_mask, (self.text_proj.clip_extra_context_tokens, 0), value=True)
        folded = torch.nn.functional.pixel_unshuffle(x_t, self.patch)
        out = self.unet(
            folded, t, encoder_hidden_states=context, class_labels=time_extra, encoder_attention_mask=mask
        ).sample
        channels = folded.shape[1]
        prediction = torch.nn.functional.pixel_shuffle(out[:, :channels], self.patch)
        if not with_variance:
            return prediction
        return torch.cat([prediction, torch.nn.functional.pixel_shuffle(out[:, channels:], self.patch)], 1)


def build_decoder(
    cfg: DecoderConfig, embed_dim: int, text_width: int, image_size: int, latent_channels: int | None = None
) -> UnclipDecoder:
    """`image_size`: of the pictures, or (space: latent) of the VAE latents of `latent_channels`."""
    n = len(cfg.block_channels)
    if (cfg.space == "latent") != (latent_channels is not None):
        raise ValueError(
            f"config key 'decoder.space' is {cfg.space!r}, "
            f"but the decoder was built with latent_channels={latent_channels}"
        )
    patch = cfg.patch if cfg.space == "pixel" else 1
    if image_size % (patch * 2 ** (n - 1)):
        key = "decoder.patch" if cfg.space == "pixel" else "decoder.block_channels"
        raise ValueError(
            f"config key '{key}': a {cfg.space} input {image_size} wide needs patch x 2**(levels - 1) to divide it; "
            f"got patch {patch} and {n} levels"
        )
    channels = latent_channels or 3
    side = image_size // patch
    # attention where it is cheap: at 64 px (patch 1) it would cost more than everything else
    attends = [side // 2**level <= cfg.attention_side or level == n - 1 for level in range(n)]
    time_embed_dim = cfg.block_channels[0] * 4
    from diffusers import (
        UNet2DConditionModel,  # pyright: ignore[reportPrivateImportUsage]
    )  # lazy: diffusers (3-4 s) only where a network is built; `unclip train` checks the store without it

    unet = UNet2DConditionModel(
        sample_size=side,
        in_channels=channels * patch**2,
        out_channels=channels * patch**2,
        block_out_channels=tuple(cfg.block_channels),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=text_width,
        attention_head_dim=cfg.heads,  # diffusers' name; it is the number of heads here
        class_embed_type="identity",  # the image embedding's projection, added to the time embedding
        norm_num_groups=norm_groups(cfg.block_channels),
    )
    text_proj = text_proj_class()(
        clip_extra_context_tokens=cfg.context_tokens,
        clip_embeddings_dim=embed_dim,
        time_embed_dim=time_embed_dim,
        cross_attention_dim=text_width,
    )
    return UnclipDecoder(unet, text_proj, latent_channels)


def predict(model, x_t, t, cond: dict[str, torch.Tensor], with_variance: bool = False) -> torch.Tensor:
    """`model` is an UnclipDecoder or an engine wrapping one; inputs are cast to its dtype."""
    dtype = getattr(model, "module", model).dtype
    return model(
        x_t.to(dtype),
        t,
        cond["image_emb"].to(dtype),
        cond["text_emb"].to(dtype),
        cond["tokens"].to(dtype),
        cond["image_dropped"],
        cond.get("mask"),
        with_variance,
    ).float()


def drop(
    cond: dict[str, torch.Tensor],
    drop_image: torch.Tensor,
    drop_text: torch.Tensor,
    empty_caption: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Dropped text becomes zeros (attending to every token), or `empty_caption`'s (emb [1, D],
    tokens [1, L, W], mask [1, L])."""
    rows = drop_text[:, None]
    dropped = {"image_dropped": cond["image_dropped"] | drop_image}
    if empty_caption is not None:
        dropped["text_emb"] = torch.where(rows, empty_caption["emb"].to(cond["text_emb"]), cond["text_emb"])
        dropped["tokens"] = torch.where(rows[:, :, None], empty_caption["tokens"].to(cond["tokens"]), cond["tokens"])
        if "mask" in cond:
            dropped["mask"] = torch.where(rows, empty_caption["mask"].to(cond["mask"]), cond["mask"])
    else:
        keep_text = (~drop_text).float()
        dropped["text_emb"], dropped["tokens"] = (
            cond["text_emb"] * keep_text[:, None],
            cond["tokens"] * keep_text[:, None, None],
        )
        if "mask" in cond:
            dropped["mask"] = cond["mask"] | rows
    return {**cond, **dropped}


def conditioning(
    image_emb: torch.Tensor, text_emb: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """`mask` [B, L]: for a decoder trained with decoder.text_mask, the caption's tokens to attend to."""
    cond = {
        "image_emb": image_emb,
        "text_emb": text_emb,
        "tokens": tokens,
        "image_dropped": torch.zeros(len(image_emb), dtype=torch.bool, device=image_emb.device),
    }
    return cond if mask is None else {**cond, "mask": mask.to(torch.bool)}


def sample(
    model,
    diffusion: Diffusion,
    cond: dict[str, torch.Tensor],
    steps: int,
    guidance: float,
    generator: torch.Generator,
    empty_caption: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """CLIP image embeddings (+ caption) -> images in [-1, 1] (or latents, for a latent decoder);
    guidance against the fully unconditional model (null image embedding, no caption: zeros, or
    `empty_caption` for a decoder trained with decoder.null_text=empty_caption), as in unCLIP."""
    n = len(cond["image_emb"])
    device = device_of(model)
    cond = {k: v.to(device) for k, v in cond.items()}
    everything = torch.ones(n, dtype=torch.bool, device=device)
    empty = {k: v.to(device) for k, v in empty_caption.items()} if empty_caption is not None else None
    null = drop(cond, everything, everything, empty)
    # the unclip sampler reads a learned variance; the others sample with their own
    with_variance = model.learned_variance and diffusion.sampler == "unclip"

    def model_fn(x, t, conditional):
        return predict(model, x, t, cond if conditional else null, with_variance)

    size, channels = model.image_size, model.channels
    out = diffusion.sample(
        model_fn, (n, channels, size, size), steps, guidance, generator, device=device, learned_variance=with_variance
    )
    return out if model.latent else out.clamp(-1, 1)
