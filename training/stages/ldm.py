"""ldm: latent diffusion over vae_latent, cross-attending to clip_text_tokens (and clip_text_emb)."""

from __future__ import annotations

from typing import Any

import torch

from data_pipeline.store import Store, StoreError
from models import ldm
from models.config import LdmConfig
from models.diffusion import device_of, row_mask
from models.encoders import text_conditioning
from models.imaging import grid, to_pil
from training.stage import Check, Preview, Stage, empty_caption, latent_scale


class LdmStage(Stage):
    name = "ldm"
    section: LdmConfig
    embedding_token: bool
    """ldm.text_embedding_token: clip_text_emb is appended to the tokens as one more."""
    text_columns: tuple[str, ...]
    """The store columns the text conditioning is read from."""
    latent_scale: float
    """What multiplies vae_latent to unit scale."""
    null: torch.Tensor | None
    """The context dropped text becomes (ldm.null_text=empty_caption), as one row; None: all zeros."""

    def __init__(self, section: LdmConfig, store: Store, preview: Preview | None = None) -> None:
        embedding_token = section.text_embedding_token
        text_columns = ("clip_text_tokens",) + (("clip_text_emb",) if embedding_token else ())
        super().__init__(section, store, preview, ("vae_latent",) + text_columns)
        self.embedding_token, self.text_columns = embedding_token, text_columns
        self.latent_scale = latent_scale(store, section.latent_scale, "ldm.latent_scale")
        self.null = None
        if section.null_text == "empty_caption":
            self.null = ldm.context(empty_caption(store), embedding_token)

    def check_store(self) -> None:
        if not self.section.text_embedding_token:
            return
        width, dim = self.store.shape("clip_text_tokens")[1], self.store.shape("clip_text_emb")[0]
        if width != dim:
            raise StoreError(
                f"store '{self.store.url}': manifest field 'columns.clip_text_emb.shape' has size {dim}, but "
                f"ldm.text_embedding_token appends it to tokens of width {width} (columns.clip_text_tokens.shape): "
                "set ldm.text_embedding_token=false"
            )

    def build_model(self) -> torch.nn.Module:
        channels, size, _ = self.store.shape("vae_latent")
        return ldm.build_unet(self.section, channels, size, self.store.shape("clip_text_tokens")[1])

    def public_checks(self, configs: dict[str, dict[str, Any]]) -> list[Check]:
        unet = configs["model"]
        channels, size, _ = self.store.shape("vae_latent")
        latents, tokens = (
            "the store's latents (columns.vae_latent.shape)",
            "the store's clip_text_tokens (columns.clip_text_tokens.shape)",
        )
        return [
            (
                "unet/config.json cross_attention_dim",
                unet.get("cross_attention_dim"),
                f"the width of {tokens}",
                self.store.shape("clip_text_tokens")[1],
            ),
            ("unet/config.json in_channels", unet.get("in_channels"), f"the channels of {latents}", channels),
            ("unet/config.json out_channels", unet.get("out_channels"), f"the channels of {latents}", channels),
            ("unet/config.json sample_size", unet.get("sample_size"), f"the side of {latents}", size),
            # conditioning the ldm does not give (SDXL's micro-conditioning, class labels)
            ("unet/config.json class_embed_type", unet.get("class_embed_type"), "what the ldm conditions on", None),
            (
                "unet/config.json addition_embed_type",
                unet.get("addition_embed_type") if unet.get("addition_embed_type") != "text" else None,
                "what the ldm conditions on (text only)",
                None,
            ),
        ]

    def loss(self, model: Any, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        x0 = batch["vae_latent"].float() * self.latent_scale
        drop = row_mask(len(x0), self.section.text_drop, generator, x0.device)
        context = ldm.context(text_conditioning(batch, self.text_columns), self.embedding_token)
        null = torch.zeros_like(context) if self.null is None else self.null.to(context.device).expand_as(context)
        context = torch.where(drop[:, None, None], null, context)
        t, noise = self.diffusion.draw(x0, generator)
        return self.diffusion.loss(ldm.predict(model, self.diffusion.q_sample(x0, t, noise), t, context), x0, noise, t)

    def extras(self) -> dict[str, Any]:
        return {
            "latent_scale": self.latent_scale,
            "text_embedding_token": self.embedding_token,
            "null_text": self.section.null_text,
        }

    def preview(self, model: torch.nn.Module, count: int = 4) -> list[tuple[str, Any]]:
        """Samples for the first captions of the store, decoded with the store's VAE."""
        vae = self.store_vae(device_of(model))
        if vae is None:
            return []
        rows = self.preview_rows(list(self.text_columns), count)
        context = ldm.context(text_conditioning(rows, self.text_columns), self.embedding_token)
        latents = ldm.sample(
            model,
            self.diffusion,
            context,
            self.preview_settings.steps,
            self.preview_settings.guidance,
            torch.Generator().manual_seed(0),
            self.null,
        )
        return [("ldm", grid([to_pil(vae.decode(latents / self.latent_scale))]))]
