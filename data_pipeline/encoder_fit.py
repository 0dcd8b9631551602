"""`unclip encoders fit`: train the small encoders of the embedded default on ROOT/raw/.

Random frozen encoders make the pipeline run but give the stages nothing to learn: a random VAE
decoder cannot turn latents back into pictures, and a random CLIP's embeddings do not say what a
picture shows. This step fits both on the ingested image-caption pairs, with the losses they were
designed for (open_clip's contrastive `ClipLoss`; reconstruction + KL for `AutoencoderKL`), and
saves them in the formats public weights come in (an open_clip folder: config + safetensors; a
diffusers `save_pretrained` folder), where `unclip embed` then loads them through exactly the
code that loads public weights. A user with real weights skips this step.
"""

from __future__ import annotations

import io
import math
import posixpath
import time
import zlib
from typing import Any

import numpy as np
import open_clip
import torch
from diffusers import AutoencoderKL
from open_clip.loss import ClipLoss
from PIL import Image
from safetensors.torch import save_file

from data_pipeline.sources import Source, iter_samples
from data_pipeline.synthetic_quality import clip_retrieval, vae_psnr
from models.base import storage
from models.config import EncodersConfig
from models.encoders import clip_preprocess, clip_weights_file, write_tiny_encoders
from models.imaging import to_minus_one_one, to_zero_one
from models.schedules import warmup_then_decay

Pairs = tuple[np.ndarray, list[str]]  # uint8 images [N, S, S, 3], captions


def load_pairs(source: Source, side: int) -> Pairs:
    """Every kept image-caption pair of the source `unclip embed` reads, resized to side x side."""
    images, captions = [], []
    for shard in source.ids:
        for sample in iter_samples(source, shard):
            if sample["image"] is None or not sample["caption"]:
                continue
            picture = Image.open(io.BytesIO(sample["image"])).convert("RGB").resize((side, side), Image.BICUBIC)
            images.append(np.asarray(picture))
            captions.append(sample["caption"])
    if len(images) < 4:
        raise ValueError(
            f"{source.kind} source {[posixpath.basename(f) for f in source.files[:3]]}: {len(images)} usable image-caption pairs; "
            "fitting the encoders needs at least 4"
        )
    return np.stack(images), captions


def is_heldout(caption: str, image: np.ndarray, fraction: float) -> bool:
    """A pair's side of the fit's split: a pure function of its content, so reruns agree."""
    return zlib.crc32(caption.encode() + image.tobytes()[:4096]) % 10_000 < fraction * 10_000


def split(pairs: Pairs, fraction: float) -> tuple[Pairs, Pairs]:
    images, captions = pairs
    held = np.array([is_heldout(c, im, fraction) for c, im in zip(captions, images)])
    if held.all() or not held.any():
        held = np.arange(len(captions)) % max(2, round(1 / fraction)) == 0
    pick = lambda mask: (images[mask], [c for c, m in zip(captions, mask) if m])  # noqa: E731
    return pick(~held), pick(held)


def _schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_then_decay(s, warmup, steps))


def _word_edits(a: list[str], b: list[str]) -> int:
    """Word-level Levenshtein distance."""
    row = list(range(len(b) + 1))
    for i, word in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, other in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != other))
    return row[-1]


def caption_neighbours(captions: list[str], max_edits: int = 2, limit: int = 20_000) -> list[list[int]]:
    """For each caption, the pairs whose caption differs by 1..max_edits words ('a red circle on
    blue' vs 'a red square on blue', or colours swapped). Batches built from these are the hard
    negatives that teach the encoders which word binds to what; random batches almost never
    contain them. Quadratic, so only for small sets (empty lists beyond `limit`)."""
    if len(captions) > limit:
        return [[] for _ in captions]
    words = [c.lower().replace(",", " ").split() for c in captions]
    neighbours: list[list[int]] = [[] for _ in captions]
    for i in range(len(words)):
        for j in range(i + 1, len(words)):
            if abs(len(words[i]) - len(words[j])) <= max_edits and 0 < _word_edits(words[i], words[j]) <= max_edits:
                neighbours[i].append(j)
                neighbours[j].append(i)
    return neighbours


def hard_negative_batch(neighbours: list[list[int]], size: int, generator: torch.Generator) -> torch.Tensor:
    """Half the batch at random, each joined by one of its neighbours where it has any."""
    anchors = torch.randperm(len(neighbours), generator=generator)[: (size + 1) // 2].tolist()
    batch = list(anchors)
    for a in anchors:
        options = [n for n in neighbours[a] if n not in batch]
        if options and len(batch) < size:
            batch.append(options[int(torch.randint(len(options), (1,), generator=generator))])
    return torch.tensor(batch)


def augment(images: torch.Tensor, generator: torch.Generator, shift: float = 0.1) -> torch.Tensor:
    """Random shifts (edges repeated, so a plain background stays plain) and horizontal flips:
    a few hundred pictures are too few for a vision tower trained from scratch without them."""
    side = images.shape[-1]
    margin = max(1, int(side * shift))
    padded = torch.nn.functional.pad(images, (margin,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * margin + 1, (len(images), 2), generator=generator).tolist()
    out = torch.stack([p[:, y : y + side, x : x + side] for p, (y, x) in zip(padded, offsets)])
    flip = torch.rand(len(images), generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def fit_clip(cfg: EncodersConfig, train: Pairs, log=print) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Contrastive training of the open_clip model the config points at (loaded from its folder)."""
    fit = cfg.fit
    generator = torch.Generator().manual_seed(fit.seed)
    model = open_clip.create_model(cfg.clip.model).train()
    tokenizer = open_clip.get_tokenizer(cfg.clip.model)
    pre = clip_preprocess(cfg.clip)
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    images = (
        torch.nn.functional.interpolate(to_zero_one(train[0]), size=pre.image_size, mode="bicubic", antialias=True)
        - mean
    ) / std
    tokens = tokenizer(train[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=fit.clip_lr, weight_decay=0.1)
    scheduler = _schedule(optimizer, fit.clip_steps)
    neighbours = caption_neighbours(train[1]) if fit.hard_negatives else [[] for _ in train[1]]
    loss_fn, losses, started = ClipLoss(), [], time.time()
    for step in range(fit.clip_steps):
        batch = hard_negative_batch(neighbours, fit.clip_batch_size, generator)
        image_features, text_features, logit_scale = model(augment(images[batch], generator), tokens[batch])[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip's training loop does
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == fit.clip_steps:
            log(f"encoders fit: clip step {step + 1}/{fit.clip_steps}  loss {np.mean(losses[-100:]):.4f}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, clip_weights_file(cfg.clip))
    return model.eval(), {
        "steps": fit.clip_steps,
        "first_loss": losses[0] if losses else None,
        "last_loss": float(np.mean(losses[-20:])) if losses else None,
        "wall_s": round(time.time() - started, 1),
    }


def fit_vae(cfg: EncodersConfig, train: Pairs, log=print) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Reconstruction (MSE) + KL training of the AutoencoderKL the config points at."""
    fit = cfg.fit
    generator = torch.Generator().manual_seed(fit.seed + 1)
    vae = AutoencoderKL.from_pretrained(cfg.vae.path, subfolder=cfg.vae.subfolder).train()
    images = to_minus_one_one(train[0])
    if images.shape[-1] != fit.vae_resolution:
        images = torch.nn.functional.interpolate(images, size=fit.vae_resolution, mode="bicubic", antialias=True).clamp(
            -1, 1
        )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=fit.vae_lr, weight_decay=0.0)
    scheduler = _schedule(optimizer, fit.vae_steps)
    losses, started = [], time.time()
    for step in range(fit.vae_steps):
        x = images[torch.randperm(len(images), generator=generator)[: fit.vae_batch_size]]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(reconstruction, x) + fit.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == fit.vae_steps:
            log(f"encoders fit: vae step {step + 1}/{fit.vae_steps}  loss {np.mean(losses[-100:]):.5f}")
    vae.eval().save_pretrained(storage.join(cfg.vae.path, cfg.vae.subfolder) if cfg.vae.subfolder else cfg.vae.path)
    return vae, {
        "steps": fit.vae_steps,
        "first_loss": losses[0] if losses else None,
        "last_loss": float(np.mean(losses[-20:])) if losses else None,
        "wall_s": round(time.time() - started, 1),
    }


def fit(cfg: EncodersConfig, source: Source, log=print) -> dict[str, Any]:
    """Write the small encoders' configs (random init), fit both on the pairs `unclip embed` will
    read, score them on held-out pairs through the frozen loaders `unclip embed` uses."""
    torch.manual_seed(cfg.fit.seed)
    pairs = load_pairs(source, max(cfg.tiny.image_size, cfg.fit.vae_resolution))
    train, held = split(pairs, cfg.fit.holdout_fraction)
    log(f"encoders fit: {len(train[1])} pairs to fit on, {len(held[1])} held out ({source.kind} source)")
    locations = write_tiny_encoders(cfg)
    report: dict[str, Any] = {"locations": locations, "pairs": len(train[1]), "heldout_pairs": len(held[1])}
    report["clip"] = fit_clip(cfg, train, log)[1]
    report["vae"] = fit_vae(cfg, train, log)[1]
    report["clip"]["heldout_retrieval"] = clip_retrieval(cfg.clip, held)
    report["vae"]["heldout_psnr_db"] = vae_psnr(cfg.vae, held[0], cfg.fit.vae_resolution)
    log(
        f"encoders fit: held-out CLIP retrieval {report['clip']['heldout_retrieval']['top1']:.1%} "
        f"(among captions one attribute away), VAE PSNR {report['vae']['heldout_psnr_db']:.1f} dB"
    )
    return report
