"""`unclip embed` versus the bare encoders' forward passes on the same decoded batches, one run.

The pipeline gets one encoder actor with `--threads` torch threads (as a GPU node gives each
encoder actor one GPU) and decodes on the remaining CPUs; the bare loop runs the same encoders
with the same thread count over batches decoded beforehand, in this process. Alternating rounds;
prints samples/s of each, their ratio (target >= 0.85) and stored bytes per sample per column.

    python benchmarks/embed.py --images 1536 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Encoders big enough that their forward passes, not bookkeeping, set the pace (as on a GPU).
ENCODERS = [
    "encoders.tiny.image_size=128",
    "encoders.tiny.patch_size=16",
    "encoders.tiny.vision_width=256",
    "encoders.tiny.vision_layers=4",
    "encoders.tiny.embed_dim=256",
    "encoders.tiny.text_layers=4",
    "encoders.tiny.heads=8",
    "encoders.tiny.context_length=32",
    "encoders.tiny.vae_channels=[32, 64, 64]",
]


def bare_encoders(cfg, batches, threads: int) -> float:
    """Seconds for the forward passes alone."""
    import torch

    from models.encoders import FrozenClip, FrozenVae
    from models.imaging import to_minus_one_one, to_zero_one

    torch.set_num_threads(threads)
    clip, vae = FrozenClip(cfg.encoders.clip), FrozenVae(cfg.encoders.vae)
    started = time.time()
    for clip_pixels, vae_pixels, captions in batches:
        clip.encode_images(to_zero_one(clip_pixels))
        clip.encode_text(captions)
        vae.encode(to_minus_one_one(vae_pixels))
    return time.time() - started


def decoded_batches(cfg, records, site: str):
    import numpy as np
    from PIL import Image

    from data_pipeline.embed_worker import resize_center_crop
    from models.encoders import clip_preprocess

    clip_size = clip_preprocess(cfg.encoders.clip).image_size
    batches = []
    for start in range(0, len(records), cfg.embed.batch_size):
        rows = records[start : start + cfg.embed.batch_size]
        images = [Image.open(os.path.join(site, r["path"])).convert("RGB") for r in rows]
        batches.append(
            (
                np.stack([np.asarray(resize_center_crop(im, clip_size)) for im in images]),
                np.stack([np.asarray(resize_center_crop(im, cfg.embed.vae_resolution)) for im in images]),
                [r["caption"] for r in rows],
            )
        )
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--images", type=int, default=1536)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the encoder (actor and bare)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    from data_pipeline import embed, store, synthetic
    from data_pipeline.config import SyntheticConfig
    from data_pipeline.ray_runtime import ray_session
    from launch import config
    from models.base.configlib import to_dict
    from models.encoders import write_tiny_encoders

    work = tempfile.mkdtemp(prefix="unclip-bench-embed-")
    site = os.path.join(work, "site")
    records = synthetic.generate(site, SyntheticConfig(count=args.images, image_size=128, broken=False))
    synthetic.write_shards(records, site, os.path.join(work, "wds"), 256)
    base = [
        f"embed.input={work}/wds",
        f"embed.batch_size={args.batch_size}",
        "embed.vae_resolution=128",
        f"embed.actor_cpus={args.threads}",
        "embed.columns=[clip_image_emb, clip_text_emb, clip_text_tokens, text_mask, vae_latent]",
        f"encoders.clip.model=local-dir:{work}/encoders/clip",
        f"encoders.vae.path={work}/encoders/vae",
        *ENCODERS,
    ]
    cfg = config.load(None, [f"root={work}/run", *base])
    write_tiny_encoders(cfg.encoders)
    batches = decoded_batches(cfg, records, site)

    seconds: dict[str, list[float]] = {"unclip embed": [], "bare encoders": []}
    bytes_per_sample: dict[str, float] = {}
    with ray_session(cfg.ray):
        for round_ in range(args.rounds):
            run_cfg = config.load(None, [f"root={work}/run-{round_}", *base])
            started = time.time()
            manifest = embed.run(
                run_cfg.encoders,
                run_cfg.embed,
                run_cfg.ray,
                run_cfg.raw_url,
                run_cfg.store_url,
                to_dict(run_cfg),
                log=lambda _: None,
            )
            seconds["unclip embed"].append(time.time() - started)
            assert manifest["totals"]["rows"] == args.images
            bytes_per_sample = store.column_bytes(store.open_store(run_cfg.store_url))
            shutil.rmtree(f"{work}/run-{round_}")
            seconds["bare encoders"].append(bare_encoders(cfg, batches, args.threads))
            for name, t in seconds.items():
                print(f"round {round_ + 1}: {name:<14} {t[-1]:6.1f}s  {args.images / t[-1]:7.1f} samples/s", flush=True)
    shutil.rmtree(work, ignore_errors=True)

    rate = {name: args.images / statistics.median(t) for name, t in seconds.items()}
    ratio = rate["unclip embed"] / rate["bare encoders"]
    print(f"\n{'':<14} {'samples/s':>10}")
    for name, r in rate.items():
        print(f"{name:<14} {r:10.1f}")
    print(f"pipeline / bare encoders: {ratio:.3f} (target >= 0.85)")
    print("\nstored bytes per sample:")
    for name, b in sorted(bytes_per_sample.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<18} {b:10.1f}")
    if args.json:
        from models.base import storage

        storage.write_json(
            args.json,
            {"samples_per_s": rate, "ratio": ratio, "bytes_per_sample": bytes_per_sample, "images": args.images},
        )


if __name__ == "__main__":
    main()
