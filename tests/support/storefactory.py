"""Small embedding stores written through the store contract, for tests that need no Ray."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from data_pipeline import store, store_writer

DIM, TOKENS, LATENT = 16, 8, (4, 8, 8)


def specs(
    columns=("clip_image_emb", "clip_text_emb", "clip_text_tokens", "text_mask", "vae_latent", "image_64", "image_256"),
    latent=LATENT,
) -> dict[str, dict]:
    every = {
        "clip_image_emb": {"dtype": "float16", "shape": [DIM]},
        "clip_text_emb": {"dtype": "float16", "shape": [DIM]},
        "clip_text_tokens": {"dtype": "float16", "shape": [TOKENS, DIM]},
        "text_mask": {"dtype": "bool", "shape": [TOKENS]},
        "vae_latent": {"dtype": "float16", "shape": list(latent), "image_side": latent[-1] * 4},
        "image_64": {"dtype": "png", "shape": [64, 64, 3]},
        "image_256": {"dtype": "png", "shape": [256, 256, 3]},
    }
    return {c: every[c] for c in columns}


def make_store(
    root: str,
    rows_per_part=(20, 17, 13),
    columns=None,
    seed: int = 0,
    latent=LATENT,
    holdout: float = 0.0,
    vae: dict | None = None,
) -> store.Store:
    """Rows numbered 0..N-1: `clip_image_emb[:, 0]` holds the row number, so tests can track order.
    Text embeddings carry a signal the image embedding depends on, so the prior can learn. `vae`: the
    identity of a real VAE (models.encoders.vae_identity) to record, so its latents' pictures can be drawn."""
    s = specs(columns, latent) if columns else specs(latent=latent)
    rng = np.random.default_rng(seed)
    index = 0
    for shard_id, n in enumerate(rows_per_part):
        ids = np.arange(index, index + n)
        index += n
        text = rng.standard_normal((n, DIM)).astype(np.float32)
        image = text * 0.8 + 0.2 * rng.standard_normal((n, DIM))
        image[:, 0] = ids
        rows = {
            "key": [f"k{i:05d}" for i in ids],
            "caption": [f"caption {i}" for i in ids],
            "url": [f"u{i}" for i in ids],
            "width": [32] * n,
            "height": [32] * n,
            "clip_score": np.zeros(n, np.float32),
            "clip_image_emb": image,
            "clip_text_emb": text,
            "clip_text_tokens": np.repeat(text[:, None, :], TOKENS, 1) * np.linspace(1, 0.5, TOKENS)[None, :, None],
            "text_mask": np.arange(TOKENS)[None, :] < rng.integers(2, TOKENS, (n, 1)),
            "vae_latent": (rng.standard_normal((n, *latent)) + text[:, : latent[0], None, None]) * 5,
        }
        pictures = [_picture(rng) for _ in range(n)] if {"image_64", "image_256"} & set(s) else []
        rows.update(
            {
                f"image_{side}": [_png(p.resize((side, side))) for p in pictures]
                for side in (64, 256)
                if f"image_{side}" in s
            }
        )
        rows = {k: v for k, v in rows.items() if k in store.BASE_COLUMNS or k in s}
        store_writer.write_part(root, shard_id, store.to_arrow(rows, s), s, holdout_fraction=holdout)
    identity = {
        "clip": {"embed_dim": DIM, "text_width": DIM, "context_length": TOKENS, "weights_sha256": "0" * 64},
        "vae": vae
        or {"scaling_factor": 0.18215, "latent_channels": latent[0], "downsample": 4, "weights_sha256": "1" * 64},
    }
    lock = {"encoders": identity, "columns": sorted(s), "specs": s, "holdout_fraction": holdout}
    store_writer.write_lock(root, lock)
    store_writer.build_manifest(root, lock, {"note": "made by tests/support/storefactory.py"}, log=lambda _m: None)
    return store.open_store(root)


def _picture(rng: np.random.Generator) -> Image.Image:
    """A smooth random picture (so downscaled copies are consistent views of it)."""
    return Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((256, 256), Image.Resampling.BICUBIC)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
