"""The unCLIP prior: a diffusers PriorTransformer that predicts a CLIP image embedding from text.

Inputs are [text tokens, text embedding, timestep, noised image embedding] and a learned
query token, as in Ramesh et al. 2022; it predicts the clean (normalised) image embedding.
Dropped text (for classifier-free guidance) is all-zero tokens and embedding with a full mask, or
(prior.null_text: empty_caption) the empty caption's, as Karlo's prior was trained.
"""

from __future__ import annotations

import torch

from models.config import PriorConfig
from models.diffusion import Diffusion, device_of


def build_prior(cfg: PriorConfig, embed_dim: int, context_length: int, mean: list[float], std: list[float]):
    from diffusers import (
        PriorTransformer,  # pyright: ignore[reportPrivateImportUsage]
    )  # lazy: diffusers (3-4 s) only where a network is built; `unclip train` checks the store without it

    model = PriorTransformer(
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.head_dim,
        num_layers=cfg.layers,
        embedding_dim=embed_dim,
        num_embeddings=context_length,
        additional_embeddings=4,
        norm_in_type="layer",
        embedding_proj_norm_type="layer",
    )
    # The store's statistics, kept in the model so an exported prior un-normalises by itself.
    with torch.no_grad():
        model.clip_mean.copy_(torch.tensor(mean).view(1, -1))
        model.clip_std.copy_(torch.tensor(std).view(1, -1))
    return hold_statistics(model)


def hold_statistics(model):
    """The CLIP statistics a prior normalises with are data, not weights to train."""
    model.clip_mean.requires_grad_(False)
    model.clip_std.requires_grad_(False)
    return model


def drop_text(
    text: dict[str, torch.Tensor], drop: torch.Tensor, empty_caption: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Replace the text of rows where `drop` is true by the null condition: zeros with a full mask,
    or `empty_caption` (emb [1, D], tokens [1, L, W], mask [1, L]: the text conditioning of "")."""
    if empty_caption is not None:
        return {k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), empty_caption[k].to(v), v) for k, v in text.items()}
    keep = (~drop).float()
    return {
        "emb": text["emb"] * keep[:, None],
        "tokens": text["tokens"] * keep[:, None, None],
        "mask": text["mask"] | drop[:, None],
    }


def predict(model, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
    """`model` is the PriorTransformer or an engine wrapping it; inputs are cast to its dtype."""
    dtype = getattr(model, "module", model).dtype
    return model(
        hidden_states=x_t.to(dtype),
        timestep=t,
        proj_embedding=text["emb"].to(dtype),
        encoder_hidden_states=text["tokens"].to(dtype),
        attention_mask=text["mask"],
    ).predicted_image_embedding.float()


def sample(
    model,
    diffusion: Diffusion,
    text: dict[str, torch.Tensor],
    steps: int,
    guidance: float,
    generator: torch.Generator,
    empty_caption: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Text conditioning -> CLIP image embeddings (un-normalised, in the store's space).
    `empty_caption`: the unconditional input of a prior trained with prior.null_text=empty_caption."""
    n = len(text["emb"])
    device = device_of(model)
    text = {k: v.to(device) for k, v in text.items()}
    empty = {k: v.to(device) for k, v in empty_caption.items()} if empty_caption is not None else None
    null = drop_text(text, torch.ones(n, dtype=torch.bool, device=device), empty)

    def model_fn(x: torch.Tensor, t: torch.Tensor, conditional: bool) -> torch.Tensor:
        return predict(model, x, t, text if conditional else null)

    dim = model.clip_mean.shape[-1]
    x0 = diffusion.sample(model_fn, (n, dim), steps, guidance, generator, device=device)
    return model.post_process_latents(x0)
