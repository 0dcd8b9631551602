"""`unclip sample`: prompts -> images, by the ldm chain (text -> UNet -> VAE decode) and the unCLIP
chain (text -> CLIP text encoder -> prior -> decoder -> upsamplers), plus image variations and
interpolations in CLIP image-embedding space, as in the unCLIP paper.

The text encoder must be the one the store was embedded with; its identity in the manifest is
compared with the configured encoder before anything is sampled.
"""

from __future__ import annotations

import io
import re
import urllib.request
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_pipeline.embed_worker import resize_center_crop
from data_pipeline.store import open_store
from launch.config import Config
from launch.trained import Trained, available_stages, in_batches, load_trained
from models import chains
from models.base import storage
from models.base.configlib import to_yaml
from models.imaging import grid, to_pil, to_zero_one

CHAIN_STAGES = {"ldm": ["ldm"], "unclip": ["prior", "decoder", "upsampler"]}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def save_png(image: Image.Image, url: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    storage.write_bytes(url, buf.getvalue())
    return url


def needed_stages(cfg: Config) -> list[str]:
    stages = {s for chain in cfg.sample.chains for s in CHAIN_STAGES[chain]}
    if cfg.sample.variations:
        stages |= {"decoder", "upsampler"}
    if cfg.sample.interpolate:
        stages |= {"prior", "decoder", "upsampler"}
    if not cfg.sample.upsampler_runs:
        stages.discard("upsampler")
    return sorted(stages)


def run(cfg: Config, log=print) -> dict[str, Any]:
    s = cfg.sample
    store = open_store(cfg.store_url)
    stages = needed_stages(cfg)
    missing = [st for st in stages if st not in available_stages(cfg)]
    if missing:
        raise FileNotFoundError(
            f"sample: no checkpoint for stage {missing[0]} (runs: {s.run}, upsamplers: {s.upsampler_runs}); train it, "
            "or leave it out with sample.chains / sample.upsampler_runs=[]"
        )
    trained = load_trained(cfg, store, stages)
    storage.makedirs(s.out)
    storage.write_text(storage.join(s.out, "config.yaml"), to_yaml(cfg))
    text = trained.encode_text(s.prompts)
    result: dict[str, Any] = {"out": s.out, "checkpoints": trained.checkpoints}
    for chain in s.chains:
        result[chain] = _text_to_image(trained, chain, text, log)
    if s.variations:
        result["variations"] = _variations(trained, log)
    if s.interpolate:
        result["interpolation"] = _interpolation(trained, log)
    storage.write_json(storage.join(s.out, "samples.json"), result)
    return result


def _repeat(text: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {k: v.repeat_interleave(n, 0) for k, v in text.items()}


def _text_to_image(trained: Trained, chain: str, text: dict[str, torch.Tensor], log) -> dict[str, Any]:
    s = trained.cfg.sample
    n = s.images_per_prompt
    repeated = _repeat(text, n)
    if chain == "ldm":
        images = trained.generate(chain, repeated, s.steps, s.scales(chain), s.seed, s.batch_size)
        extra: dict[str, Any] = {}
    else:
        embeddings, levels = trained.unclip(repeated, s.steps, s.scales(chain), s.seed, s.batch_size, s.upsampler_steps)
        images = levels[-1]
        buf = io.BytesIO()
        np.save(buf, embeddings.numpy())
        storage.write_bytes(storage.join(s.out, "unclip_image_embeddings.npy"), buf.getvalue())
        extra = {"resolutions": [lvl.shape[-1] for lvl in levels]}
    pictures = to_pil(images)
    rows, paths = [], []
    for i, prompt in enumerate(s.prompts):
        row = pictures[i * n : (i + 1) * n]
        rows.append(row)
        paths += [
            save_png(im, storage.join(s.out, chain, f"{i:02d}-{j}-{slug(prompt)}.png")) for j, im in enumerate(row)
        ]
    grid_path = save_png(grid(rows), storage.join(s.out, f"{chain}_grid.png"))
    log(f"sample: {chain} -> {len(paths)} images ({pictures[0].width} px), grid {grid_path}")
    return {"images": paths, "grid": grid_path, **extra}


def _load_image(url: str) -> Image.Image:
    if url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=30) as r:
            return Image.open(io.BytesIO(r.read())).convert("RGB")
    return Image.open(io.BytesIO(storage.read_bytes(url))).convert("RGB")


def _variations(trained: Trained, log) -> dict[str, Any]:
    """Image -> CLIP image embedding -> decoder (no caption): images that keep what CLIP saw."""
    s = trained.cfg.sample
    clip = trained.clip
    sources = [_load_image(u) for u in s.variations]
    pixels = np.stack([np.asarray(resize_center_crop(im, clip.image_size)) for im in sources])
    embeddings = clip.encode_images(to_zero_one(pixels))
    n = s.images_per_prompt
    conditioning = {"image_emb": embeddings, **trained.no_caption(len(sources))}
    empty = trained.empty_caption("decoder")
    levels = in_batches(
        _repeat(conditioning, n),
        s.seed,
        s.batch_size,
        lambda part, g: chains.decode_embeddings(
            trained.nets["decoder"],
            trained.upsamplers,
            part["image_emb"],
            part,
            s.steps,
            s.decoder_guidance,
            g,
            s.upsampler_steps,
            empty,
        ),
    )
    pictures = to_pil(levels[-1])
    side = pictures[0].width
    rows = [[src.resize((side, side))] + pictures[i * n : (i + 1) * n] for i, src in enumerate(sources)]
    path = save_png(grid(rows), storage.join(s.out, "variations_grid.png"))
    log(f"sample: variations of {len(sources)} images -> {path}")
    return {"grid": path}


def _interpolation(trained: Trained, log) -> dict[str, Any]:
    """Two prompts -> prior -> slerp between their image embeddings -> decoder (no caption)."""
    s = trained.cfg.sample
    text = trained.encode_text(s.interpolate)
    ends = trained.image_embeddings(text, s.steps, s.prior_guidance, s.seed, batch_size=len(s.interpolate))
    weights = np.linspace(0, 1, s.interpolation_steps)
    no_text, empty = trained.no_caption(1), trained.empty_caption("decoder")
    row = []
    for w in weights:  # the same noise at every point, so only the embedding changes along the row
        embedding = chains.slerp(ends[0], ends[1], float(w))[None]
        levels = chains.decode_embeddings(
            trained.nets["decoder"],
            trained.upsamplers,
            embedding,
            no_text,
            s.steps,
            s.decoder_guidance,
            torch.Generator().manual_seed(s.seed),
            s.upsampler_steps,
            empty,
        )
        row += to_pil(levels[-1])
    path = save_png(grid([row]), storage.join(s.out, "interpolation.png"))
    log(f"sample: interpolation '{s.interpolate[0]}' -> '{s.interpolate[1]}' in {len(weights)} steps -> {path}")
    return {"grid": path, "weights": weights.tolist()}
