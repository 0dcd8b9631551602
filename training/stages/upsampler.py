"""upsampler: p(high-res image | low-res image), trained on image_<low> and image_<high>."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data_pipeline.store import Store, StoreError
from models import upsampler
from models.config import UpsamplerConfig
from models.imaging import decode, grid, to_minus_one_one, to_pil
from training.stage import Check, Preview, Stage


class UpsamplerStage(Stage):
    name = "upsampler"
    section: UpsamplerConfig
    low_col: str
    """The store column of the low-resolution pictures (image_<upsampler.low>)."""
    high_col: str
    """The store column of the high-resolution pictures (image_<upsampler.high>)."""

    def __init__(self, section: UpsamplerConfig, store: Store, preview: Preview | None = None) -> None:
        super().__init__(section, store, preview, (f"image_{section.low}", f"image_{section.high}"))
        self.low_col, self.high_col = self.columns

    def check_store(self) -> None:
        for column, side in zip(self.columns, (self.section.low, self.section.high), strict=True):
            if self.store.shape(column)[0] != side:
                raise StoreError(
                    f"store '{self.store.url}': manifest field 'columns.{column}.shape' is not {side} pixels"
                )

    def build_model(self) -> torch.nn.Module:
        return upsampler.build_upsampler(self.section)

    def public_checks(self, configs: dict[str, dict[str, Any]]) -> list[Check]:
        m = configs["model"]
        outputs = m.get("out_channels")
        return [
            (
                "super_res/config.json in_channels",
                m.get("in_channels"),
                "the noisy picture and the upsampled low resolution (3 + 3)",
                6,
            ),
            # a learned variance (Karlo's) doubles the output; training reads the first half
            (
                "super_res/config.json out_channels",
                3 if outputs == 6 else outputs,
                "RGB (3, or 6 with a learned variance)",
                3,
            ),
            ("super_res/config.json sample_size", m.get("sample_size"), "upsampler.high", self.section.high),
        ]

    def prepare(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        high, low = upsampler.random_crops(
            decode(batch[self.high_col]), decode(batch[self.low_col]), self.section.crop, rng
        )
        return {"high": high, "low": low}

    def loss(self, model: Any, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        x0 = to_minus_one_one(batch["high"])
        low = upsampler.degrade(to_minus_one_one(batch["low"]), self.section, generator)
        low_up = upsampler.upsample(low, x0.shape[-1], self.section.resize)
        t, noise = self.diffusion.draw(x0, generator)
        return self.diffusion.loss(
            upsampler.predict(model, self.diffusion.q_sample(x0, t, noise), t, low_up), x0, noise, t
        )

    def extras(self) -> dict[str, Any]:
        return {"low": self.section.low, "high": self.section.high, "resize": self.section.resize}

    def preview(self, model: torch.nn.Module, count: int = 4) -> list[tuple[str, Any]]:
        """Per row: bicubic upsampling, the model's upsampling, the true high-res image."""
        rows = self.preview_rows([self.low_col, self.high_col], count)
        low = to_minus_one_one(decode(rows[self.low_col]))
        factor = self.section.high // self.section.low
        steps = self.preview_settings.steps  # as `unclip sample` draws it
        sampled = upsampler.sample(
            model, self.diffusion, low, factor, steps, torch.Generator().manual_seed(0), self.section.resize
        )
        columns = [
            to_pil(upsampler.upsample(low, sampled.shape[-1])),
            to_pil(sampled),
            to_pil(to_minus_one_one(decode(rows[self.high_col]))),
        ]
        return [("upsampler_bicubic_sampled_true", grid([list(row) for row in zip(*columns, strict=True)]))]
