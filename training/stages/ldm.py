"""ldm: latent diffusion over vae_latent, cross-attending to clip_text_tokens."""

from __future__ import annotations

from typing import Any

import torch

from data_pipeline.store import StoreError
from models import ldm
from models.diffusion import Diffusion
from training.stage import Stage


class LdmStage(Stage):
    name = "ldm"
    columns = ("vae_latent", "clip_text_tokens")

    def check_store(self) -> None:
        self.diffusion = Diffusion(self.cfg.ldm.diffusion)
        manifest = self.store.manifest
        if self.cfg.ldm.latent_scale == "store":
            if "vae_latent_std" not in manifest:
                raise StoreError(f"store '{self.store.url}': manifest lacks 'vae_latent_std' (rerun `unclip embed`)")
            self.latent_scale = 1.0 / float(manifest["vae_latent_std"])
        else:
            self.latent_scale = float(manifest["encoders"]["vae"]["scaling_factor"])

    def build_model(self) -> torch.nn.Module:
        channels, size, _ = self.store.shape("vae_latent")
        return ldm.build_unet(self.cfg.ldm, channels, size, self.store.shape("clip_text_tokens")[1])

    def loss(self, model: Any, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        x0 = batch["vae_latent"].float() * self.latent_scale
        tokens = batch["clip_text_tokens"].float()
        drop = torch.rand(len(x0), generator=generator) < self.cfg.ldm.text_drop
        tokens = tokens * (~drop).float()[:, None, None]
        t = self.diffusion.sample_timesteps(len(x0), generator)
        noise = torch.randn(x0.shape, generator=generator)
        return self.diffusion.loss(ldm.predict(model, self.diffusion.q_sample(x0, t, noise), t, tokens), x0, noise, t)

    def extras(self) -> dict[str, Any]:
        return {"latent_scale": self.latent_scale}
