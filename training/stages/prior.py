"""prior: p(CLIP image embedding | text), trained on clip_text_* -> clip_image_emb."""

from __future__ import annotations

import io
from itertools import islice
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_pipeline.store import Store, StoreError
from models import prior
from models.config import PriorConfig
from models.diffusion import row_mask
from models.encoders import TEXT_COLUMNS, text_conditioning
from models.imaging import grid
from models.public import PublicWeightsError
from training.stage import Check, Preview, Stage, empty_caption


class PriorStage(Stage):
    name = "prior"
    section: PriorConfig
    empty_caption: dict[str, torch.Tensor] | None
    """Dropped text with prior.null_text=empty_caption, as one row; None: all zeros."""

    def __init__(self, section: PriorConfig, store: Store, preview: Preview | None = None) -> None:
        super().__init__(section, store, preview, (*TEXT_COLUMNS, "clip_image_emb"))
        self.empty_caption = empty_caption(store) if section.null_text == "empty_caption" else None
        # read once, lazily (see `statistics` and `preview`)
        self._statistics: tuple[torch.Tensor, torch.Tensor] | None = None
        self._bank: tuple[torch.Tensor, np.ndarray] | None = None

    def check_store(self) -> None:
        dim = self.store.shape("clip_image_emb")[0]
        _, width = self.store.shape("clip_text_tokens")
        if width != dim:
            raise StoreError(
                f"store '{self.store.url}': manifest field 'columns.clip_text_tokens.shape' has width {width}, "
                f"but the prior needs it equal to the embedding size {dim} (PriorTransformer projects both alike)"
            )
        if "clip_image_emb_mean" not in self.store.manifest:
            raise StoreError(f"store '{self.store.url}': manifest lacks 'clip_image_emb_mean' (rerun `unclip embed`)")

    def build_model(self) -> torch.nn.Module:
        m = self.store.manifest
        dim, length = self.store.shape("clip_image_emb")[0], self.store.shape("clip_text_tokens")[0]
        return prior.build_prior(self.section, dim, length, m["clip_image_emb_mean"], m["clip_image_emb_std"])

    def hold_fixed(self, model: torch.nn.Module) -> torch.nn.Module:
        return prior.hold_statistics(model)

    def from_public_modules(self, modules: dict[str, torch.nn.Module]) -> torch.nn.Module:
        model = modules["model"]
        if not bool((model.get_parameter("clip_std") > 0).all()):
            raise PublicWeightsError(
                "--init-from: the prior's clip_std has entries <= 0: it carries no CLIP statistics to normalise with"
            )
        return model

    def public_checks(self, configs: dict[str, dict[str, Any]]) -> list[Check]:
        # A public prior keeps the CLIP statistics it was trained with (clip_mean, clip_std): its
        # targets are normalised with them, not with the store's.
        p = configs["model"]
        dim, text_dim = self.store.shape("clip_image_emb")[0], self.store.shape("clip_text_emb")[0]
        length, width = self.store.shape("clip_text_tokens")
        embedding = p.get("embedding_dim")
        token_width = (
            embedding
            if p.get("encoder_hid_proj_type", "linear") == "linear"
            else p.get("num_attention_heads", 0) * p.get("attention_head_dim", 0)
        )
        tokens = "the store's clip_text_tokens (columns.clip_text_tokens.shape)"
        return [
            (
                "prior/config.json clip_embed_dim",
                p.get("clip_embed_dim") or embedding,
                "the store's image embedding size (columns.clip_image_emb.shape)",
                dim,
            ),
            (
                "prior/config.json embedding_proj_dim",
                p.get("embedding_proj_dim") or embedding,
                "the store's text embedding size (columns.clip_text_emb.shape)",
                text_dim,
            ),
            ("prior/config.json num_embeddings", p.get("num_embeddings"), f"the length of {tokens}", length),
            ("prior/config.json text-token width", token_width, f"the width of {tokens}", width),
            # the inputs the prior is fed: text embedding, timestep, noisy image embedding, query
            (
                "prior/config.json additional_embeddings",
                p.get("additional_embeddings", 4),
                "the prior's inputs besides the tokens",
                4,
            ),
        ]

    def statistics(self, module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The CLIP statistics the prior normalises its targets with, read once: they are held
        fixed, and under ZeRO-3 they are partitioned like every parameter, so that read gathers
        them (every rank, at its first step). Read at the first step, not when the network is
        built, so that a resumed run has its checkpoint's."""
        if self._statistics is None:
            import deepspeed  # lazy: as every DeepSpeed import in a rank

            mean, std = module.get_parameter("clip_mean"), module.get_parameter("clip_std")
            with deepspeed.zero.GatheredParameters([mean, std]):
                self._statistics = (mean.detach().clone(), std.detach().clone())
        return self._statistics

    def loss(self, model: Any, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        mean, std = self.statistics(getattr(model, "module", model))
        x0 = (batch["clip_image_emb"].float() - mean) / std
        empty = None if self.empty_caption is None else {k: v.to(x0.device) for k, v in self.empty_caption.items()}
        text = prior.drop_text(
            text_conditioning(batch), row_mask(len(x0), self.section.text_drop, generator, x0.device), empty
        )
        t, noise = self.diffusion.draw(x0, generator)
        prediction = prior.predict(model, self.diffusion.q_sample(x0, t, noise), t, text)
        return self.diffusion.loss(prediction, x0, noise, t)

    def extras(self) -> dict[str, Any]:
        return {"null_text": self.section.null_text}

    def preview(self, model: torch.nn.Module, count: int = 4) -> list[tuple[str, Any]]:
        """Per caption: the true image, then the store image nearest to the predicted embedding."""
        if "image_64" not in self.store.manifest["columns"]:
            return []
        if self._bank is None:
            data = self.store.read(["clip_image_emb", "image_64"], list(islice(self.store.files, 4)))
            bank = torch.nn.functional.normalize(torch.from_numpy(data["clip_image_emb"].astype(np.float32)), dim=-1)
            self._bank = (bank, data["image_64"])
        bank, pictures = self._bank
        rows = self.preview_rows([*TEXT_COLUMNS, "image_64"], count)
        predicted = prior.sample(
            model,
            self.diffusion,
            text_conditioning(rows),
            self.preview_settings.steps,
            self.preview_settings.guidance,
            torch.Generator().manual_seed(0),
            self.empty_caption,
        )
        nearest = (torch.nn.functional.normalize(predicted.cpu(), dim=-1) @ bank.T).argmax(1)
        decode = lambda data: Image.open(io.BytesIO(data)).convert("RGB")  # noqa: E731
        pairs = [[decode(rows["image_64"][i]), decode(pictures[int(j)])] for i, j in enumerate(nearest)]
        return [("prior_true_vs_nearest", grid(pairs))]
