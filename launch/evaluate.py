"""`unclip eval`: score what was trained on the store's held-out rows (never seen in training).

- prior: cosine between predicted and true CLIP image embeddings, beside the baseline of using the
  caption's text embedding itself;
- each chain (ldm; unCLIP = prior -> decoder -> upsamplers), from `eval.images_per_prompt` images
  of every held-out prompt (each its own noise): CLIP score of the generated images
  (cosine of their CLIP image embedding with the caption's text embedding; the real images' score
  beside it), and the Fréchet distance in CLIP image space to `eval.reference_rows` training
  images, of one image per prompt (the mean over the copies), beside the held-out real images'
  own: about what a perfect chain would read at this sample size;
  at the configured guidance (`sample.guidance` for the ldm, `sample.decoder_guidance` and
  `sample.prior_guidance` for the unCLIP chain) and, with `eval.unguided_baseline`, with all
  guidance off (scales 1);
- prompt following, when the captions are the embedded generator's: each image read back by
  data_pipeline/synthetic_reader.py and scored per attribute (shape, colour, background).
Writes eval.json, a grid (real image, then each chain's) and reading_grid.png to `eval.out`.
"""

from __future__ import annotations

import textwrap
import time
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from data_pipeline.store import Store, StoreError, open_store
from data_pipeline.synthetic_reader import prompt_following
from launch.config import Config
from launch.sample import save_png
from launch.trained import Trained, available_stages, load_trained
from models.base import storage
from models.base.configlib import to_yaml
from models.encoders import TEXT_COLUMNS, text_conditioning
from models.imaging import decode, grid, to_minus_one_one, to_pil
from models.metrics import frechet_distance, mean_cosine


def clip_embed(trained: Trained, images: torch.Tensor) -> np.ndarray:
    """CLIP image embeddings of images in [-1, 1], resized to the encoder's input."""
    size = trained.clip.image_size
    pixels = torch.nn.functional.interpolate((images + 1) / 2, size=(size, size), mode="bicubic", align_corners=False)
    return trained.clip.encode_images(pixels.clamp(0, 1)).cpu().numpy()


def reading_grid(
    captions: list[str], generated: dict[str, torch.Tensor], readings: dict[str, list], rows: int = 8
) -> Image.Image:
    """Prompts down the side; each chain's sample with what data_pipeline/synthetic_reader.py saw in it."""
    cell, label, caption_w = 128, 14, 260
    rows = min(rows, len(captions))
    canvas = Image.new("RGB", (caption_w + len(generated) * cell, rows * (cell + label)), "white")
    pen = ImageDraw.Draw(canvas)
    for c, (chain, images) in enumerate(generated.items()):
        pen.text((caption_w + c * cell + 2, 0), chain, fill="black")
        for r, (picture, seen) in enumerate(zip(to_pil(images[:rows]), readings[chain], strict=False)):
            x, y = caption_w + c * cell, r * (cell + label) + label
            canvas.paste(picture.resize((cell, cell)), (x, y))
            pen.text(
                (x + 2, y + cell - label),
                f"{seen.color} {seen.shape} / {seen.background}",
                fill="white",
                stroke_width=1,
                stroke_fill="black",
            )
    for r in range(rows):  # PIL's default font fits about 42 characters in caption_w
        lines = "\n".join(textwrap.wrap(captions[r], 42)[:8])
        pen.multiline_text((4, r * (cell + label) + label + cell // 2), lines, fill="black", anchor="lm")
    return canvas


def reference_embeddings(store: Store, rows: int) -> np.ndarray:
    """CLIP image embeddings of `rows` training rows (never the held-out ones; all of them when
    fewer), from every stride-th part first, so that they spread over a large store without
    reading all of it: the real distribution the Fréchet distance measures against."""
    parts = store.files  # the parts that have rows
    train_rows_per_part = max(1.0, store.manifest["totals"]["rows"] * (1 - store.holdout_fraction) / max(len(parts), 1))
    stride = max(1, int(len(parts) * train_rows_per_part // rows))
    files = [parts[i] for offset in range(stride) for i in range(offset, len(parts), stride)]
    found = store.read(["clip_image_emb"], files=files, split="train", limit=rows)["clip_image_emb"].astype(np.float32)
    if len(found) < 2:
        raise StoreError(
            f"store '{store.url}': {len(found)} training rows to measure the Fréchet distance against; "
            "set eval.reference_rows=0 to measure against the held-out rows"
        )
    return found


def generate_per_prompt(
    trained: Trained, chain: str, text: dict[str, torch.Tensor], scales: tuple[float, float], cfg: Config
) -> torch.Tensor:
    """`eval.images_per_prompt` images of every prompt: copy j of prompt i at row j * n + i. Copy j's
    batches draw from seeds after copy j - 1's, so copy 0 is what a one-image eval generates."""
    s, batches = cfg.sample, -(-len(text["emb"]) // cfg.eval.batch_size)
    return torch.cat(
        [
            trained.generate(chain, text, s.steps, scales, s.seed + j * batches, cfg.eval.batch_size, s.upsampler_steps)
            for j in range(cfg.eval.images_per_prompt)
        ]
    )


def run(cfg: Config, log=print) -> dict[str, Any]:
    started = time.time()
    store = open_store(cfg.store_url)
    if store.holdout_fraction <= 0:
        raise StoreError(
            f"store '{store.url}': manifest field 'holdout.fraction' is 0: no held-out rows to score on "
            "(set embed.holdout_fraction)"
        )
    stages = available_stages(cfg)
    chains_ready = {"ldm": "ldm" in stages, "unclip": {"prior", "decoder"} <= set(stages)}
    if not stages:
        raise FileNotFoundError(f"eval: no trained stage under {cfg.root}/runs (run {cfg.sample.run})")
    if not cfg.sample.upsampler_runs:
        stages = [s for s in stages if s != "upsampler"]
    columns = ["caption", "clip_image_emb", *TEXT_COLUMNS] + (
        ["image_64"] if "image_64" in store.manifest["columns"] else []
    )
    held = store.read(columns, split="heldout", limit=cfg.eval.samples)
    n = len(held["caption"])
    if n < 2:
        raise StoreError(f"store '{store.url}': {n} held-out rows; eval needs at least 2 (embed.holdout_fraction)")
    real = held["clip_image_emb"].astype(np.float32)
    reference = reference_embeddings(store, cfg.eval.reference_rows) if cfg.eval.reference_rows else real
    trained = load_trained(cfg, store, stages)
    text = text_conditioning(held)
    text_emb = text["emb"].numpy()
    copies = cfg.eval.images_per_prompt
    s = cfg.sample
    results: dict[str, Any] = {
        "heldout_rows": n,
        "steps": s.steps,
        "upsampler_steps": s.upsampler_steps,
        "guidance": s.guidance,
        "decoder_guidance": s.decoder_guidance,
        "prior_guidance": s.prior_guidance,
        "images_per_prompt": cfg.eval.images_per_prompt,
        "checkpoints": trained.checkpoints,
    }
    results["real_images_clip_score"] = mean_cosine(real, text_emb)
    if (
        cfg.eval.reference_rows
    ):  # what real images of these prompts read against the reference: the floor a chain can reach
        results["real_images_frechet_distance_clip"] = frechet_distance(real, reference)
    results["frechet_reference"] = {"split": "train" if cfg.eval.reference_rows else "heldout", "rows": len(reference)}
    generated: dict[str, torch.Tensor] = {}

    if "prior" in trained.nets:
        predicted = trained.image_embeddings(text, s.steps, s.prior_guidance, s.seed, cfg.eval.batch_size).numpy()
        results["prior"] = {
            "cosine_predicted_vs_true": mean_cosine(predicted, real),
            "cosine_text_embedding_baseline": mean_cosine(text_emb, real),
        }
        log(
            f"eval: prior cosine {results['prior']['cosine_predicted_vs_true']:.3f} "
            f"(text-embedding baseline {results['prior']['cosine_text_embedding_baseline']:.3f})"
        )

    readings: dict[str, list] = {}
    captions = [str(c) for c in held["caption"]]
    for chain, ready in chains_ready.items():
        if not ready:
            continue
        configured = s.scales(chain)
        settings = [configured] + ([(1.0, 1.0)] if cfg.eval.unguided_baseline and configured != (1.0, 1.0) else [])
        for guidance, prior_guidance in settings:
            images = generate_per_prompt(trained, chain, text, (guidance, prior_guidance), cfg)
            embeddings = clip_embed(trained, images)
            scores = {
                "images": len(images),
                "clip_score": mean_cosine(embeddings, np.tile(text_emb, (copies, 1))),
                # per copy (one image per prompt), so the set is as large as the real one it is compared with:
                # the estimate's bias grows as the set shrinks
                "frechet_distance_clip": float(
                    np.mean([frechet_distance(embeddings[j * n : (j + 1) * n], reference) for j in range(copies)])
                ),
            }
            following = prompt_following(to_pil(images), captions * copies)
            if following:
                scores["prompt_following"] = following[0]
            if (guidance, prior_guidance) == configured:
                results[chain] = {**scores, "resolution": int(images.shape[-1])}
                generated[chain] = images[:n]  # the grids show each prompt's first image
                readings[chain] = following[1][:n] if following else []
            else:
                results[chain]["guidance_1"] = scores
            scales = (
                f"guidance {guidance:g}"
                if chain == "ldm"
                else f"decoder guidance {guidance:g}, prior {prior_guidance:g}"
            )
            log(
                f"eval: {chain}, {scales}: CLIP score {scores['clip_score']:.3f} (real "
                f"{results['real_images_clip_score']:.3f}), Fréchet distance in CLIP space "
                f"{scores['frechet_distance_clip']:.3f}"
                + (f" (real {results['real_images_frechet_distance_clip']:.3f})" if cfg.eval.reference_rows else "")
                + (
                    ", prompt following " + " / ".join(f"{k} {v:.0%}" for k, v in following[0].items())
                    if following
                    else ""
                )
            )

    storage.makedirs(cfg.eval.out)
    storage.write_text(storage.join(cfg.eval.out, "config.yaml"), to_yaml(cfg))
    if generated:
        rows = min(n, 8)
        side = max(g.shape[-1] for g in generated.values())
        columns_ = [to_pil(to_minus_one_one(decode(held["image_64"][:rows])))] if "image_64" in held else []
        columns_ += [to_pil(g[:rows]) for g in generated.values()]
        picture = grid(
            [[im.resize((side, side), Image.Resampling.NEAREST) for im in row] for row in zip(*columns_, strict=False)]
        )
        results["grid"] = save_png(picture, storage.join(cfg.eval.out, "eval_grid.png"))
        results["grid_columns"] = (["real"] if "image_64" in held else []) + list(generated)
        results["grid_captions"] = captions[:rows]
        if all(readings.values()):
            results["reading_grid"] = save_png(
                reading_grid(captions, generated, readings), storage.join(cfg.eval.out, "reading_grid.png")
            )
    results["wall_s"] = round(time.time() - started, 2)
    storage.write_json(storage.join(cfg.eval.out, "eval.json"), results)
    log(f"eval: {storage.join(cfg.eval.out, 'eval.json')}")
    return results
