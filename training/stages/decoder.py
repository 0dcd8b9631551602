"""decoder: p(picture | CLIP image embedding, caption), trained on the CLIP columns and image_64
(pixel space) or vae_latent (latent space)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data_pipeline.store import Store, StoreError
from models import chains
from models import decoder
from models.config import DecoderConfig
from models.diffusion import Diffusion, device_of, row_mask
from models.imaging import decode, grid, to_pil, to_minus_one_one
from training.stage import Preview, Stage, latent_scale

CONDITIONS = ("clip_image_emb", "clip_text_emb", "clip_text_tokens")


class DecoderStage(Stage):
    name = "decoder"

    def __init__(self, section: DecoderConfig, store: Store, preview: Preview = Preview()):
        self.latent = section.space == "latent"
        self.columns = ("vae_latent" if self.latent else "image_64",) + CONDITIONS
        super().__init__(section, store, preview)

    def check_store(self) -> None:
        dim = self.store.shape("clip_image_emb")[0]
        width = self.store.shape("clip_text_tokens")[1]
        if width != dim:
            raise StoreError(
                f"store '{self.store.url}': manifest field 'columns.clip_text_tokens.shape' has width {width}, but the "
                f"decoder's text projection needs it equal to the embedding size {dim}"
            )
        self.diffusion = Diffusion(self.section.diffusion)
        if self.latent:
            self.latent_scale = latent_scale(self.store, self.section.latent_scale, "decoder.latent_scale")

    def build_model(self) -> torch.nn.Module:
        dim, width = self.store.shape("clip_image_emb")[0], self.store.shape("clip_text_tokens")[1]
        if self.latent:
            channels, size, _ = self.store.shape("vae_latent")
            return decoder.build_decoder(self.section, dim, width, size, latent_channels=channels)
        return decoder.build_decoder(self.section, dim, width, self.store.shape("image_64")[0])

    def prepare(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if self.latent:
            return batch
        return {**{k: v for k, v in batch.items() if k != "image_64"}, "image": decode(batch["image_64"])}

    def loss(self, model: Any, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        x0 = batch["vae_latent"].float() * self.latent_scale if self.latent else to_minus_one_one(batch["image"])
        cond = decoder.conditioning(*(batch[c].float() for c in CONDITIONS))
        n = len(x0)
        s = self.section
        drop_image = row_mask(n, s.image_drop, generator, x0.device)
        cond = decoder.drop(cond, drop_image, row_mask(n, s.text_drop, generator, x0.device))
        t, noise = self.diffusion.draw(x0, generator)
        prediction = decoder.predict(model, self.diffusion.q_sample(x0, t, noise), t, cond)
        return self.diffusion.loss(prediction, x0, noise, t)

    def extras(self) -> dict[str, Any]:
        if not self.latent:
            return {}
        return {"latent_channels": self.store.shape("vae_latent")[0], "latent_scale": self.latent_scale}

    def preview(self, model: torch.nn.Module, count: int = 4) -> list[tuple[str, Any]]:
        """Per row: the true image (where the store keeps image_64), then the decoder's from its CLIP
        embedding and caption."""
        vae = self.store_vae(device_of(model)) if self.latent else None
        if self.latent and vae is None:
            return []
        truth = ["image_64"] if "image_64" in self.store.manifest["columns"] else []
        rows = self.preview_rows([*truth, *CONDITIONS], count)
        cond = decoder.conditioning(*(torch.from_numpy(rows[c].astype(np.float32)) for c in CONDITIONS))
        net = chains.Net(model, self.diffusion, self.extras(), vae)
        sampled = to_pil(chains.decoder_images(net, cond, self.preview_settings.steps, self.preview_settings.guidance, torch.Generator().manual_seed(0)))
        pairs = zip(to_pil(to_minus_one_one(decode(rows["image_64"]))), sampled) if truth else ((s,) for s in sampled)
        return [("decoder_true_vs_sampled", grid([list(p) for p in pairs]))]
