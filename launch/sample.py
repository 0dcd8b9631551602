"""`unclip sample`: text -> image with the ldm (VAE decode), text -> CLIP image embedding with the prior.

The text encoder must be the one the store was built with: its identity in the store manifest
is compared with the configured encoder before anything is sampled.
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_pipeline import storage
from data_pipeline.store import StoreError, open_store
from launch.config import Config
from launch.configlib import to_yaml
from models import ldm, prior
from models.diffusion import Diffusion
from models.encoders import FrozenClip, FrozenVae, identity_mismatch
from models.imaging import grid, to_pil
from training.checkpoint import load_ema_model, read_latest

def check_identity(section: str, recorded: dict[str, Any], loaded: dict[str, Any]) -> None:
    differs = identity_mismatch(recorded, loaded)
    if differs:
        field, old, new = differs
        raise StoreError(
            f"encoders.{section}.{field} is {new!r}, but the store was embedded with {old!r}; "
            "sample with the encoders the store was built with"
        )


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def _save(image: Image.Image, url: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    storage.write_bytes(url, buf.getvalue())
    return url


def run(cfg: Config, stages: list[str] | None = None, log=print) -> dict[str, Any]:
    s = cfg.sample
    store = open_store(cfg.store_url)
    available = [st for st in ("ldm", "prior") if read_latest(cfg.run_url(st, s.run))]
    stages = stages or available
    missing = [st for st in stages if st not in available]
    if missing or not stages:
        raise FileNotFoundError(f"no checkpoint for stage {missing[0] if missing else 'ldm or prior'} under {cfg.run_url('<stage>', s.run)}")
    clip = FrozenClip(cfg.encoders.clip)
    check_identity("clip", store.manifest["encoders"]["clip"], clip.identity())
    text = clip.encode_text(s.prompts)
    storage.makedirs(s.out)
    storage.write_text(storage.join(s.out, "config.yaml"), to_yaml(cfg))
    result: dict[str, Any] = {"out": s.out}
    if "ldm" in stages:
        result["ldm"] = _sample_ldm(cfg, store, text, log)
    if "prior" in stages:
        result["prior"] = _sample_prior(cfg, store, text, log)
    storage.write_json(storage.join(s.out, "samples.json"), result)
    return result


def _sample_ldm(cfg: Config, store, text: dict[str, torch.Tensor], log) -> dict[str, Any]:
    s = cfg.sample
    per_prompt = s.images_per_prompt
    folder = read_latest(cfg.run_url("ldm", s.run))
    unet, info = load_ema_model(folder)
    vae = FrozenVae(cfg.encoders.vae)
    check_identity("vae", store.manifest["encoders"]["vae"], vae.identity())
    diffusion = Diffusion(cfg.ldm.diffusion)
    generator = torch.Generator().manual_seed(s.seed)
    tokens = text["tokens"].repeat_interleave(per_prompt, 0)
    latents = ldm.sample(unet, diffusion, tokens, s.steps, s.guidance, generator, s.sampler)
    images = to_pil(vae.decode(latents / info["extras"]["latent_scale"]))
    paths, rows = [], []
    for i, prompt in enumerate(s.prompts):
        row = images[i * per_prompt : (i + 1) * per_prompt]
        rows.append(row)
        paths += [_save(im, storage.join(s.out, "ldm", f"{i:02d}-{j}-{slug(prompt)}.png")) for j, im in enumerate(row)]
    grid_path = _save(grid(rows), storage.join(s.out, "ldm_grid.png"))
    log(f"sample: ldm ({folder}) -> {len(paths)} images, grid {grid_path}")
    return {"checkpoint": folder, "images": paths, "grid": grid_path}


def _sample_prior(cfg: Config, store, text: dict[str, torch.Tensor], log) -> dict[str, Any]:
    """Predicted embeddings, each shown as the store image nearest to it in CLIP space."""
    s = cfg.sample
    folder = read_latest(cfg.run_url("prior", s.run))
    model, _ = load_ema_model(folder)
    diffusion = Diffusion(cfg.prior.diffusion)
    generator = torch.Generator().manual_seed(s.seed)
    predicted = prior.sample(model, diffusion, text, s.steps, s.guidance, generator, s.sampler)
    columns = ["key", "caption", "clip_image_emb"] + (["image_64"] if "image_64" in store.manifest["columns"] else [])
    data = store.read(columns)
    bank = torch.nn.functional.normalize(torch.from_numpy(data["clip_image_emb"].astype(np.float32)), dim=-1)
    unit = torch.nn.functional.normalize(predicted, dim=-1)
    nearest = (unit @ bank.T).max(dim=1)
    entries = []
    for i, prompt in enumerate(s.prompts):
        j = int(nearest.indices[i])
        entry = {
            "prompt": prompt,
            "cosine_to_text_embedding": float(torch.cosine_similarity(predicted[i], text["emb"][i], dim=0)),
            "nearest_key": data["key"][j],
            "nearest_caption": data["caption"][j],
            "cosine_to_nearest": float(nearest.values[i]),
        }
        if "image_64" in data:
            image = Image.open(io.BytesIO(data["image_64"][j])).convert("RGB")
            entry["image"] = _save(image, storage.join(s.out, "prior", f"{i:02d}-{slug(prompt)}.png"))
        entries.append(entry)
    storage.write_bytes(storage.join(s.out, "prior_embeddings.npy"), _npy(predicted.numpy()))
    log(f"sample: prior ({folder}) -> {len(entries)} embeddings, nearest store images under {storage.join(s.out, 'prior')}")
    return {"checkpoint": folder, "embeddings": storage.join(s.out, "prior_embeddings.npy"), "results": entries}


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
