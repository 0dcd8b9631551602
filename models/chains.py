"""The two text-to-image chains, and what unCLIP's image-embedding space adds (variations,
interpolation). Plain functions over networks already loaded; no I/O here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from models import decoder, ldm, prior, upsampler
from models.diffusion import Diffusion


@dataclass
class Net:
    """One trained stage: its EMA network, its diffusion, and what stage.json says besides."""

    model: torch.nn.Module
    diffusion: Diffusion
    extras: dict[str, Any]
    vae: Any = None  # of a stage that draws VAE latents: the frozen VAE (models.encoders.FrozenVae) they decode with


def latent_pictures(net: Net, latents: torch.Tensor) -> torch.Tensor:
    """A latent stage's samples as pictures in [-1, 1], by its VAE at the scale it trained with."""
    if net.vae is None:
        raise ValueError(
            "this stage draws VAE latents (the ldm, or decoder.space: latent): load it with the store's VAE"
        )
    return net.vae.decode(latents / net.extras["latent_scale"])


def null_text(net: Net, empty_caption: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """What `net` takes for dropped text: None (zeros) or, for a stage trained with
    null_text=empty_caption, `empty_caption` (the text conditioning of "")."""
    if net.extras.get("null_text", "zeros") != "empty_caption":
        return None
    if empty_caption is None:
        raise ValueError(
            "this stage was trained with null_text=empty_caption: sample it with the empty caption's text conditioning"
        )
    return empty_caption


def decoder_images(
    dec: Net,
    cond: dict[str, torch.Tensor],
    steps: int,
    guidance: float,
    generator: torch.Generator,
    empty_caption: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The decoder's pictures in [-1, 1]: its samples, or a latent decoder's samples decoded by its VAE."""
    out = decoder.sample(dec.model, dec.diffusion, cond, steps, guidance, generator, null_text(dec, empty_caption))
    return latent_pictures(dec, out) if dec.model.latent else out


def upsample_all(
    images: torch.Tensor, upsamplers: list[Net], steps: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Each upsampler in turn; returns every resolution, the input first."""
    out = [images]
    for net in upsamplers:
        if out[-1].shape[-1] != net.extras["low"]:
            raise ValueError(
                f"an upsampler trained from {net.extras['low']} px (upsampler.low) was given {out[-1].shape[-1]} px "
                "pictures: list sample.upsampler_runs in order from the decoder's resolution up"
            )
        factor = net.extras["high"] // net.extras["low"]
        # an upsampler trained before upsampler.resize existed saw bicubic_clamped
        out.append(
            upsampler.sample(
                net.model, net.diffusion, out[-1], factor, steps, generator, net.extras.get("resize", "bicubic_clamped")
            )
        )
    return out


def decode_embeddings(
    dec: Net,
    upsamplers: list[Net],
    image_emb: torch.Tensor,
    text: dict[str, torch.Tensor],
    steps: int,
    guidance: float,
    generator: torch.Generator,
    upsampler_steps: int | None = None,
    empty_caption: dict[str, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """`upsampler_steps` (default: `steps`) for the upsamplers, which start from a picture already
    there. `empty_caption`: the text conditioning of "", for stages trained with null_text=empty_caption."""
    cond = decoder.conditioning(
        image_emb, text["emb"], text["tokens"], text["mask"] if dec.extras.get("text_mask") else None
    )
    images = decoder_images(dec, cond, steps, guidance, generator, empty_caption)
    return upsample_all(images, upsamplers, upsampler_steps or steps, generator)


def unclip(
    pri: Net,
    dec: Net,
    upsamplers: list[Net],
    text: dict[str, torch.Tensor],
    steps: int,
    guidance: float,
    prior_guidance: float,
    generator: torch.Generator,
    upsampler_steps: int | None = None,
    empty_caption: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """text -> prior -> CLIP image embedding -> decoder -> upsamplers; (embeddings, images per resolution).
    `prior_guidance` scales the prior's guidance, `guidance` the decoder's."""
    image_emb = prior.sample(
        pri.model, pri.diffusion, text, steps, prior_guidance, generator, null_text(pri, empty_caption)
    )
    return image_emb, decode_embeddings(
        dec, upsamplers, image_emb, text, steps, guidance, generator, upsampler_steps, empty_caption
    )


def latent_diffusion(
    net: Net,
    text: dict[str, torch.Tensor],
    steps: int,
    guidance: float,
    generator: torch.Generator,
    empty_caption: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """text (tokens, emb) -> latents -> VAE decode; images in [-1, 1]. `empty_caption`: the text
    conditioning of "", the unconditional input of an ldm trained with ldm.null_text=empty_caption."""
    # An ldm trained before ldm.text_embedding_token existed has no such key: it saw tokens only.
    embedding_token = net.extras.get("text_embedding_token", False)
    empty = null_text(net, empty_caption)
    null = None if empty is None else ldm.context(empty, embedding_token)
    context = ldm.context(text, embedding_token)
    return latent_pictures(net, ldm.sample(net.model, net.diffusion, context, steps, guidance, generator, null))


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between embeddings (their norms interpolated linearly)."""
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na, b / nb
    omega = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / torch.sin(omega)
    return direction * ((1 - t) * na + t * nb)
