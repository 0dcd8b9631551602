"""decoder: p(picture | CLIP image embedding, caption), trained on the CLIP columns and image_64
(pixel space) or vae_latent (latent space)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from data_pipeline.store import Store, StoreError
from models import chains, decoder
from models.config import DecoderConfig
from models.diffusion import device_of, row_mask
from models.imaging import decode, grid, to_minus_one_one, to_pil
from training.stage import Check, Preview, Stage, empty_caption, latent_scale

CONDITIONS = ("clip_image_emb", "clip_text_emb", "clip_text_tokens")


class DecoderStage(Stage):
    name = "decoder"
    section: DecoderConfig
    latent: bool
    """decoder.space=latent: pictures are the store's vae_latent, else its image_64 pixels."""
    conditions: tuple[str, ...]
    """The store columns the decoder is conditioned on (its columns but the pictures)."""
    latent_scale: float
    """What multiplies vae_latent to unit scale (1.0 in pixel space, where it is unused)."""
    empty_caption: dict[str, torch.Tensor] | None
    """Dropped text with decoder.null_text=empty_caption, as one row; None: all zeros."""

    def __init__(self, section: DecoderConfig, store: Store, preview: Preview | None = None) -> None:
        latent = section.space == "latent"
        conditions = CONDITIONS + (("text_mask",) if section.text_mask else ())
        super().__init__(section, store, preview, ("vae_latent" if latent else "image_64",) + conditions)
        self.latent, self.conditions = latent, conditions
        self.empty_caption = empty_caption(store) if section.null_text == "empty_caption" else None
        self.latent_scale = latent_scale(store, section.latent_scale, "decoder.latent_scale") if latent else 1.0

    def check_store(self) -> None:
        dim = self.store.shape("clip_image_emb")[0]
        width = self.store.shape("clip_text_tokens")[1]
        if width != dim:
            raise StoreError(
                f"store '{self.store.url}': manifest field 'columns.clip_text_tokens.shape' has width {width}, but the "
                f"decoder's text projection needs it equal to the embedding size {dim}"
            )

    def build_model(self) -> torch.nn.Module:
        dim, width = self.store.shape("clip_image_emb")[0], self.store.shape("clip_text_tokens")[1]
        if self.latent:
            channels, size, _ = self.store.shape("vae_latent")
            return decoder.build_decoder(self.section, dim, width, size, latent_channels=channels)
        return decoder.build_decoder(self.section, dim, width, self.store.shape("image_64")[0])

    def public_checks(self, configs: dict[str, dict[str, Any]]) -> list[Check]:
        unet, proj = configs["unet"], configs["text_proj"]
        channels, side = (self.store.shape("vae_latent")[:2]) if self.latent else (3, self.store.shape("image_64")[0])
        pictures = (
            "the store's vae_latent (columns.vae_latent.shape)"
            if self.latent
            else "the store's image_64 (columns.image_64.shape)"
        )
        inputs = unet.get("in_channels", 0)
        patch = math.isqrt(inputs // channels)
        folds = channels * patch**2 == inputs and patch > 0  # pictures folded p x p into channels
        return [
            (
                "text_proj/config.json clip_embeddings_dim",
                proj.get("clip_embeddings_dim"),
                "the store's embedding size (columns.clip_image_emb.shape)",
                self.store.shape("clip_image_emb")[0],
            ),
            (
                "decoder/config.json class_embed_type",
                unet.get("class_embed_type"),
                "how the decoder adds the image embedding",
                "identity",
            ),
            (
                "decoder/config.json cross_attention_dim",
                unet.get("cross_attention_dim"),
                "text_proj/config.json cross_attention_dim",
                proj.get("cross_attention_dim"),
            ),
            (
                "decoder/config.json in_channels",
                inputs,
                f"decoder.space={self.section.space} on {pictures} (its channels, folded p x p)",
                inputs if folds else f"{channels} x p^2",
            ),
            # a learned variance (Karlo's decoder) doubles the output; training reads the first half
            (
                "decoder/config.json out_channels",
                unet.get("out_channels") if unet.get("out_channels") != 2 * inputs else inputs,
                "its in_channels (or twice them)",
                inputs,
            ),
            (
                "decoder/config.json sample_size x p",
                (unet.get("sample_size") or 0) * patch,
                f"the side of {pictures}",
                side,
            ),
        ]

    def from_public_modules(self, modules: dict[str, torch.nn.Module]) -> torch.nn.Module:
        return decoder.UnclipDecoder(
            modules["unet"], modules["text_proj"], self.store.shape("vae_latent")[0] if self.latent else None
        )

    def prepare(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if self.latent:
            return batch
        return {**{k: v for k, v in batch.items() if k != "image_64"}, "image": decode(batch["image_64"])}

    def loss(self, model: Any, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        x0 = batch["vae_latent"].float() * self.latent_scale if self.latent else to_minus_one_one(batch["image"])
        cond = self.conditioning(batch)
        n = len(x0)
        s = self.section
        drop_image = row_mask(n, s.image_drop, generator, x0.device)
        empty = None if self.empty_caption is None else {k: v.to(x0.device) for k, v in self.empty_caption.items()}
        cond = decoder.drop(cond, drop_image, row_mask(n, s.text_drop, generator, x0.device), empty)
        t, noise = self.diffusion.draw(x0, generator)
        prediction = decoder.predict(model, self.diffusion.q_sample(x0, t, noise), t, cond)
        return self.diffusion.loss(prediction, x0, noise, t)

    def conditioning(self, rows: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The decoder's conditioning from store rows (tensors or arrays) of self.conditions."""
        as_tensor = lambda v: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))  # noqa: E731
        mask = as_tensor(rows["text_mask"]) if self.section.text_mask else None
        image_emb, text_emb, tokens = (as_tensor(rows[c]).float() for c in CONDITIONS)
        return decoder.conditioning(image_emb, text_emb, tokens, mask)

    def extras(self) -> dict[str, Any]:
        text = {"null_text": self.section.null_text, "text_mask": self.section.text_mask}
        if not self.latent:
            return text
        return {**text, "latent_channels": self.store.shape("vae_latent")[0], "latent_scale": self.latent_scale}

    def preview(self, model: torch.nn.Module, count: int = 4) -> list[tuple[str, Any]]:
        """Per row: the true image (where the store keeps image_64), then the decoder's from its CLIP
        embedding and caption."""
        vae = self.store_vae(device_of(model)) if self.latent else None
        if self.latent and vae is None:
            return []
        truth = ["image_64"] if "image_64" in self.store.manifest["columns"] else []
        rows = self.preview_rows([*truth, *self.conditions], count)
        cond = self.conditioning(rows)
        net = chains.Net(model, self.diffusion, self.extras(), vae)
        sampled = to_pil(
            chains.decoder_images(
                net,
                cond,
                self.preview_settings.steps,
                self.preview_settings.guidance,
                torch.Generator().manual_seed(0),
                self.empty_caption,
            )
        )
        pairs = (
            zip(to_pil(to_minus_one_one(decode(rows["image_64"]))), sampled, strict=True)
            if truth
            else ((s,) for s in sampled)
        )
        return [("decoder_true_vs_sampled", grid([list(p) for p in pairs]))]
