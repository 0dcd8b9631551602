"""ldm: latent diffusion over vae_latent, cross-attending to clip_text_tokens."""

from __future__ import annotations

from typing import Any

import torch

from models import ldm
from models.diffusion import Diffusion, row_mask
from training.stage import Stage, latent_scale


class LdmStage(Stage):
    name = "ldm"
    columns = ("vae_latent", "clip_text_tokens")

    def check_store(self) -> None:
        self.diffusion = Diffusion(self.cfg.ldm.diffusion)
        self.latent_scale = latent_scale(self.store, self.cfg.ldm.latent_scale, "ldm.latent_scale")

    def build_model(self) -> torch.nn.Module:
        channels, size, _ = self.store.shape("vae_latent")
        return ldm.build_unet(self.cfg.ldm, channels, size, self.store.shape("clip_text_tokens")[1])

    def loss(self, model: Any, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        x0 = batch["vae_latent"].float() * self.latent_scale
        tokens = batch["clip_text_tokens"].float()
        drop = row_mask(len(x0), self.cfg.ldm.text_drop, generator, x0.device)
        tokens = tokens * (~drop).float()[:, None, None]
        t, noise = self.diffusion.draw(x0, generator)
        return self.diffusion.loss(ldm.predict(model, self.diffusion.q_sample(x0, t, noise), t, tokens), x0, noise, t)

    def extras(self) -> dict[str, Any]:
        return {"latent_scale": self.latent_scale}

    def preview(self, model: torch.nn.Module, count: int = 4) -> list[tuple[str, Any]]:
        """Samples for the first captions of the store, decoded with the store's VAE."""
        from models.imaging import grid, to_pil

        vae = self.store_vae()
        if vae is None:
            return []
        rows = self.preview_rows(["clip_text_tokens"], count)
        tokens = torch.from_numpy(rows["clip_text_tokens"].astype("float32"))
        latents = ldm.sample(model, self.diffusion, tokens, 25, self.cfg.sample.guidance, torch.Generator().manual_seed(0))
        return [("ldm", grid([to_pil(vae.decode(latents / self.latent_scale))]))]
