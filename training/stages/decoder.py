"""decoder: p(64 px image | CLIP image embedding, caption), trained on image_64 and the CLIP columns."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data_pipeline.store import StoreError
from models import decoder
from models.diffusion import Diffusion, row_mask
from models.imaging import decode, grid, to_pil, to_unit
from training.stage import Stage


class DecoderStage(Stage):
    name = "decoder"
    columns = ("image_64", "clip_image_emb", "clip_text_emb", "clip_text_tokens")

    def check_store(self) -> None:
        dim = self.store.shape("clip_image_emb")[0]
        width = self.store.shape("clip_text_tokens")[1]
        if width != dim:
            raise StoreError(
                f"store '{self.store.url}': manifest field 'columns.clip_text_tokens.shape' has width {width}, but the "
                f"decoder's text projection needs it equal to the embedding size {dim}"
            )
        self.diffusion = Diffusion(self.cfg.decoder.diffusion)

    def build_model(self) -> torch.nn.Module:
        dim, width = self.store.shape("clip_image_emb")[0], self.store.shape("clip_text_tokens")[1]
        return decoder.build_decoder(self.cfg.decoder, dim, width, self.store.shape("image_64")[0])

    def prepare(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {**{k: v for k, v in batch.items() if k != "image_64"}, "image": decode(batch["image_64"])}

    def loss(self, model: Any, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        x0 = to_unit(batch["image"])
        cond = decoder.conditioning(batch["clip_image_emb"].float(), batch["clip_text_emb"].float(), batch["clip_text_tokens"].float())
        n = len(x0)
        cfg = self.cfg.decoder
        drop_image = row_mask(n, cfg.image_drop, generator, x0.device)
        cond = decoder.drop(cond, drop_image, row_mask(n, cfg.text_drop, generator, x0.device))
        t, noise = self.diffusion.draw(x0, generator)
        prediction = decoder.predict(model, self.diffusion.q_sample(x0, t, noise), t, cond)
        return self.diffusion.loss(prediction, x0, noise, t)

    def preview(self, model: torch.nn.Module, count: int = 4) -> list[tuple[str, Any]]:
        """Per row: the true image, then the decoder's image from its CLIP embedding and caption."""
        rows = self.preview_rows(list(self.columns), count)
        cond = decoder.conditioning(*(torch.from_numpy(rows[c].astype(np.float32)) for c in self.columns[1:]))
        images = decoder.sample(model, self.diffusion, cond, 25, self.cfg.sample.guidance, torch.Generator().manual_seed(0))
        truth = to_pil(to_unit(decode(rows["image_64"])))
        return [("decoder_true_vs_sampled", grid([[a, b] for a, b in zip(truth, to_pil(images))]))]
