"""The embedded default's quality end to end: do the samples show what their prompts ask for?

Runs `unclip demo` into --workdir (or reads a finished one with --reuse), then, on the store's
held-out rows (never trained on):
  - VAE reconstruction PSNR at 64 px;
  - CLIP top-1 retrieval of each image's caption among the captions one attribute away;
  - the prior's cosine to the true image embeddings beside the text-embedding baseline (`unclip eval`);
  - prompt following: images generated from held-out prompts by the ldm and the unCLIP chain, with
    guidance 1 (off) and the configured scale, read back by data_pipeline/synthetic_reader.py,
    scored per attribute;
  - wall time of each phase.
Prints one table, writes quality.json and a grid (prompt, ldm and unCLIP samples, what the reader saw).

    python benchmarks/quality.py --workdir quality-run            # about 20 minutes on 2 cores
    python benchmarks/quality.py --workdir demo-run --reuse        # score an existing `make demo`
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGETS = {"vae_psnr_db": 25.0, "clip_top1": 0.90, "color": 0.90, "background": 0.90, "shape": 0.70}


def held_out_pairs(store, count: int) -> tuple[np.ndarray, list[str]]:
    from PIL import Image

    held = store.read(["caption", "image_64"], split="heldout")
    images = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in held["image_64"][:count]])
    return images, [str(c) for c in held["caption"][:count]]


def prompt_following(cfg, store, prompts: list[str], guidance: float, log) -> dict:
    """Per chain: the fraction of images whose shape, colour and background the reader finds as asked."""
    import torch

    from data_pipeline.synthetic import attributes_from_caption
    from data_pipeline.synthetic_reader import read
    from launch.trained import available_stages, load_trained
    from models import chains
    from models.imaging import to_pil

    stages = [s for s in available_stages(cfg) if s != "upsampler" or cfg.sample.upsampler_runs]
    trained = load_trained(cfg, store, stages)
    truths = [attributes_from_caption(p) for p in prompts]
    text = trained.encode_text(prompts)
    steps, out = cfg.sample.steps, {}
    for chain in ("ldm", "unclip"):
        started, images = time.time(), []
        for start in range(0, len(prompts), 16):
            part = {k: v[start : start + 16] for k, v in text.items()}
            generator = torch.Generator().manual_seed(cfg.sample.seed + start)
            if chain == "ldm":
                images.append(chains.latent_diffusion(trained.nets["ldm"], trained.vae, part["tokens"], steps, guidance, generator))
            else:
                images.append(chains.unclip(trained.nets["prior"], trained.nets["decoder"], trained.upsamplers, part, steps, guidance, generator)[1][-1])
        pictures = to_pil(torch.cat(images))
        readings = [read(p) for p in pictures]
        hits = {key: float(np.mean([getattr(r, key) == t[i] for r, t in zip(readings, truths)])) for i, key in enumerate(("shape", "color", "background"))}
        out[chain] = {**hits, "wall_s": round(time.time() - started, 1), "pictures": pictures, "readings": readings}
        log(f"quality: {chain}, guidance {guidance}: shape {hits['shape']:.0%}, colour {hits['color']:.0%}, background {hits['background']:.0%}")
    return out


def reading_grid(prompts: list[str], following: dict, path: str, rows: int = 8) -> None:
    """Prompts down the side; the ldm and unCLIP samples, each with what the reader saw under it."""
    from PIL import Image, ImageDraw

    cell, label, caption_w = 128, 14, 260
    canvas = Image.new("RGB", (caption_w + 2 * cell, rows * (cell + label)), "white")
    pen = ImageDraw.Draw(canvas)
    for r in range(min(rows, len(prompts))):
        y = r * (cell + label)
        pen.text((4, y + cell // 2), prompts[r][:42], fill="black")
        for c, chain in enumerate(("ldm", "unclip")):
            x = caption_w + c * cell
            canvas.paste(following[chain]["pictures"][r].resize((cell, cell)), (x, y))
            seen = following[chain]["readings"][r]
            pen.text((x + 2, y + cell), f"{seen.color} {seen.shape} / {seen.background}", fill="black")
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="quality-run")
    parser.add_argument("--reuse", action="store_true", help="score the demo already in --workdir")
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts to generate from")
    parser.add_argument("overrides", nargs="*", help="config overrides for the demo run")
    args = parser.parse_args()
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    from data_pipeline.store import open_store
    from data_pipeline.synthetic import attributes_from_caption
    from launch import config as config_mod
    from launch import demo
    from launch.configlib import read_yaml
    from models.quality import clip_retrieval, vae_psnr

    workdir = os.path.abspath(args.workdir)
    if not args.reuse:
        cfg = config_mod.load(None, demo.demo_overrides(workdir) + args.overrides)
        demo.run(cfg, workdir, log=log)
    report = json.load(open(os.path.join(workdir, "report.json")))
    cfg = config_mod.from_dict(read_yaml(os.path.join(workdir, "config.yaml")))
    store = open_store(cfg.store_url)
    images, captions = held_out_pairs(store, 10_000)
    result = {"workdir": workdir, "heldout_rows": len(captions), "phases_wall_s": {k: v["wall_s"] for k, v in report["phases"].items()}}
    result["vae_psnr_db"] = vae_psnr(cfg.encoders.vae, images, 64)
    result["clip_top1"] = clip_retrieval(cfg.encoders.clip, (images, captions))["top1"]
    evaluation = json.load(open(os.path.join(cfg.eval.out, "eval.json")))
    result["prior_cosine"] = evaluation["prior"]["cosine_predicted_vs_true"]
    result["prior_text_baseline"] = evaluation["prior"]["cosine_text_embedding_baseline"]
    prompts = [c for c in captions if attributes_from_caption(c)][: args.prompts]
    started = time.time()
    following = {g: prompt_following(cfg, store, prompts, g, log) for g in (1.0, cfg.sample.guidance)}
    result["phases_wall_s"]["prompt_following"] = round(time.time() - started, 1)
    reading_grid(prompts, following[cfg.sample.guidance], os.path.join(workdir, "quality_grid.png"))
    result["prompt_following"] = {
        f"{chain}@{g:g}": {k: following[g][chain][k] for k in ("shape", "color", "background")} for g in following for chain in following[g]
    }  # fmt: skip
    result["grid"] = os.path.join(workdir, "quality_grid.png")

    print(f"\n{'figure':44s} {'result':>10s} {'target':>8s}")
    print(f"{'VAE PSNR on held-out images (dB)':44s} {result['vae_psnr_db']:10.1f} {'>= 25':>8s}")
    print(f"{'CLIP top-1 among one-attribute-away captions':44s} {result['clip_top1']:10.1%} {'>= 90%':>8s}")
    print(f"{'prior cosine (text-embedding baseline)':44s} {result['prior_cosine']:6.3f} ({result['prior_text_baseline']:.3f})")
    for key, hits in result["prompt_following"].items():
        print(f"{'following ' + key + ': shape / colour / bg':44s} {hits['shape']:.0%} / {hits['color']:.0%} / {hits['background']:.0%}")
    print("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["phases_wall_s"].items()))
    with open(os.path.join(workdir, "quality.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"quality.json and {result['grid']}")


if __name__ == "__main__":
    main()
