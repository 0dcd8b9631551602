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

import bisect
import io
import itertools
import math
import posixpath
import random
import time
import zlib
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import open_clip
import torch
from diffusers import AutoencoderKL  # pyright: ignore[reportPrivateImportUsage]
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
            picture = (
                Image.open(io.BytesIO(sample["image"])).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
            )
            images.append(np.asarray(picture))
            captions.append(sample["caption"])
    if len(images) < 4:
        raise ValueError(
            f"{source.kind} source {[posixpath.basename(f) for f in source.files[:3]]}: "
            f"{len(images)} usable image-caption pairs; "
            "fitting the encoders needs at least 4"
        )
    return np.stack(images), captions


def is_heldout(caption: str, image: np.ndarray, fraction: float) -> bool:
    """A pair's side of the fit's split: a pure function of its content, so reruns agree."""
    return zlib.crc32(caption.encode() + image.tobytes()[:4096]) % 10_000 < fraction * 10_000


def split(pairs: Pairs, fraction: float) -> tuple[Pairs, Pairs]:
    images, captions = pairs
    held = np.array([is_heldout(c, im, fraction) for c, im in zip(captions, images, strict=True)])
    if held.all() or not held.any():
        held = np.arange(len(captions)) % max(2, round(1 / fraction)) == 0
    pick = lambda mask: (images[mask], [c for c, m in zip(captions, mask, strict=True) if m])  # noqa: E731
    return pick(~held), pick(held)


def _schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_then_decay(s, warmup, steps))


# Words past a text tower's context never reach it (a word is at least one token; CLIP reads 77),
# and each mined word multiplies the deletions a caption is filed under.
MAX_MINED_WORDS = 77


def _word_edits(a: Sequence[str], b: Sequence[str]) -> int:
    """Word-level Levenshtein distance."""
    row = list(range(len(b) + 1))
    for i, word in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, other in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != other))
    return row[-1]


def _filed(distinct: list[tuple[str, ...]], max_edits: int) -> tuple[np.ndarray, np.ndarray]:
    """(key, caption) for each caption of `distinct` with each set of up to max_edits of its words
    deleted, the key a polynomial hash (mod 2^64) of the words left: equal words, equal keys; two
    different sets of words meet on a key about once in 2^64, and then only add a pair to check.
    Computed as array arithmetic over the captions of one length at a time."""
    vocabulary: dict[str, int] = {}
    coded = [[vocabulary.setdefault(w, len(vocabulary)) for w in words] for words in distinct]
    values = np.random.default_rng(0).integers(1, 2**63, len(vocabulary) + 1, dtype=np.uint64)
    base, ring = 0x9E3779B97F4A7C15, 2**64  # odd, so it has an inverse: a run of words moved left by r is * base^-r
    powers = np.array([pow(base, t, ring) for t in range(max(map(len, distinct), default=0) + 1)], np.uint64)
    shifts = np.array([pow(base, -r, ring) for r in range(max_edits + 1)], np.uint64)
    by_length: dict[int, list[int]] = {}
    for d, words in enumerate(distinct):
        by_length.setdefault(len(words), []).append(d)
    keys, ids = [], []
    for length, members in by_length.items():
        for count in range(min(max_edits, length) + 1):
            cuts = list(itertools.combinations(range(length), count))
            cut = np.array(cuts, np.int64).reshape(len(cuts), count)
            starts = np.concatenate([np.zeros((len(cuts), 1), np.int64), cut + 1], axis=1)  # the runs of words kept
            ends = np.concatenate([cut, np.full((len(cuts), 1), length)], axis=1)
            kept = np.uint64((length - count) * 0xD6E8FEB86659FD93 % ring)  # the number of words left, hashed in too
            chunk = max(1, (1 << 22) // (len(cuts) * (count + 1)))  # captions at a time: arrays of 32 MiB at most
            for first in range(0, len(members), chunk):
                rows = np.array(members[first : first + chunk])
                prefix = np.zeros((len(rows), length + 1), np.uint64)
                codes = np.array([coded[d] for d in rows.tolist()], np.int64).reshape(len(rows), length)
                prefix[:, 1:] = np.cumsum(values[codes] * powers[:length], axis=1)
                runs = (prefix[:, ends] - prefix[:, starts]) * shifts[: count + 1]
                keys.append((runs.sum(axis=2, dtype=np.uint64) + kept).ravel())
                ids.append(np.repeat(rows, len(cuts)))
    if not keys:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    return np.concatenate(keys), np.concatenate(ids)


def caption_neighbours(
    captions: list[str], max_edits: int = 2, per_caption: int = 32, crowd: int = 16, seed: int = 0
) -> list[list[int]]:
    """For each caption, the pairs whose caption differs by 1..max_edits words ('a red circle on
    blue' vs 'a red square on blue', or colours swapped). Batches built from these are the hard
    negatives that teach the encoders which word binds to what; random batches almost never
    contain them.

    n log n in the number of captions, not quadratic: two captions max_edits word edits apart
    become the same words once at most max_edits words are deleted from each, so each distinct
    caption is filed under every such deletion of its first MAX_MINED_WORDS words (`_filed`), the
    file is sorted, and only captions filed under one key are compared. A key shared by more than
    `crowd` + 1 captions (the short ones all share the empty caption) has each compared with the
    `crowd` either side of it there only. Each caption lists at most `per_caption` neighbours (a
    seeded draw where it has more): captions of one grammar repeat, and complete lists grow with
    the square of their number. Every listed pair is a neighbour; below both bounds every
    neighbour is listed (tests/test_encoder_fit.py checks both against comparing every pair)."""
    groups: dict[tuple[str, ...], list[int]] = {}  # identical captions are one caption to compare
    for i, caption in enumerate(captions):
        groups.setdefault(tuple(caption.lower().replace(",", " ").split()[:MAX_MINED_WORDS]), []).append(i)
    distinct = list(groups)
    keys, ids = _filed(distinct, max_edits)
    order = np.lexsort((ids, keys))
    keys, ids = keys[order], ids[order]
    once = np.ones(len(keys), bool)  # a caption that repeats a word reaches some deletions twice
    once[1:] = (keys[1:] != keys[:-1]) | (ids[1:] != ids[:-1])
    keys, ids = keys[once], ids[once]
    pairs = []
    for reach in range(1, crowd + 1):  # each filed caption with the one `reach` places on, under the same key
        same = np.flatnonzero(keys[:-reach] == keys[reach:])
        if not len(same):
            break
        pairs.append(ids[same] * len(distinct) + ids[same + reach])
    candidates = np.unique(np.concatenate(pairs)) if pairs else np.zeros(0, np.int64)
    near: list[set[int]] = [set() for _ in distinct]
    for a, b in zip((candidates // len(distinct)).tolist(), (candidates % len(distinct)).tolist(), strict=True):
        if _word_edits(distinct[a], distinct[b]) <= max_edits:  # sharing a key, they may still be 2 x max_edits apart
            near[a].add(b)
            near[b].add(a)
    draw = random.Random(seed)
    neighbours: list[list[int]] = [[] for _ in captions]
    for d, words in enumerate(distinct):
        pool = [groups[distinct[o]] for o in sorted(near[d])]
        ends = list(itertools.accumulate(len(g) for g in pool))
        for i in groups[words]:
            if not ends or ends[-1] <= per_caption:
                neighbours[i] = sorted(j for g in pool for j in g)
                continue
            picks = [(bisect.bisect_right(ends, p), p) for p in draw.sample(range(ends[-1]), per_caption)]
            neighbours[i] = sorted(pool[k][p - ends[k] + len(pool[k])] for k, p in picks)
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
    out = torch.stack([p[:, y : y + side, x : x + side] for p, (y, x) in zip(padded, offsets, strict=True)])
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
    mining = time.time()
    neighbours = caption_neighbours(train[1], seed=fit.seed) if fit.hard_negatives else [[] for _ in train[1]]
    if fit.hard_negatives:
        log(f"encoders fit: hard negatives of {len(train[1])} captions mined in {time.time() - mining:.1f} s")
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
            # as open_clip's training loop does; open_clip's CLIP keeps it as a Parameter
            cast(torch.Tensor, model.logit_scale).clamp_(0, math.log(100))
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == fit.clip_steps:
            log(f"encoders fit: clip step {step + 1}/{fit.clip_steps}  loss {np.mean(losses[-100:]):.4f}")
    weights = clip_weights_file(cfg.clip)
    assert weights is not None  # fitting writes to the configured local-dir model, which names its file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
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
        posterior = vae.encode(x, return_dict=False)[0]
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        # diffusers types z as FloatTensor; any float tensor is what it takes
        reconstruction = vae.decode(z, return_dict=False)[0]  # pyright: ignore[reportArgumentType]
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
    log(f"encoders fit: {scores_line(report)}")
    return report


def scores_line(report: dict[str, Any]) -> str:
    """The held-out figures of a fit's report, in words; a figure that could not be measured says why."""
    retrieval = report["clip"]["heldout_retrieval"]
    clip = (
        f"held-out CLIP retrieval {retrieval['top1']:.1%} (among captions one attribute away)"
        if retrieval["top1"] is not None
        else f"held-out CLIP retrieval not measured: {retrieval['reason']}"
    )
    return f"{clip}, VAE PSNR {report['vae']['heldout_psnr_db']:.1f} dB"
