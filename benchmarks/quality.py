"""The embedded default's quality end to end: do the samples show what their prompts ask for?

Runs `unclip demo` into --workdir (or reads a finished one with --reuse), then, on the store's
held-out rows (never trained on):
  - VAE reconstruction PSNR at 64 px;
  - CLIP top-1 retrieval of each image's caption among the captions one attribute away;
  - the prior's cosine to the true image embeddings beside the text-embedding baseline (`unclip eval`);
  - prompt following (`unclip eval`): images generated from the held-out prompts by the ldm and the
    unCLIP chain, with guidance off and at the configured scales, read back by
    data_pipeline/synthetic_reader.py, scored per attribute; its grid shows what the reader saw;
  - what guidance adds: mean prompt following, CLIP score and Fréchet distance, off -> on. It beats
    unguided when prompt following and the CLIP score both rise. The distance (against the
    training images, beside the real held-out images' own) is reported, not judged: guidance
    trades diversity for alignment;
  - wall time of each phase.
Prints one table and writes quality.json.

    python benchmarks/quality.py --workdir quality-run                       # the whole demo, then the table
    python benchmarks/quality.py --workdir demo-run --reuse [--rescore]      # score an existing `make demo`
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGETS = {"vae_psnr_db": 25.0, "clip_top1": 0.90, "color": 0.90, "background": 0.90, "shape": 0.70}


def held_out_pairs(store) -> tuple[np.ndarray, list[str]]:
    from models.imaging import decode

    held = store.read(["caption", "image_64"], split="heldout")
    return decode(held["image_64"]), [str(c) for c in held["caption"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workdir", default="quality-run")
    parser.add_argument("--reuse", action="store_true", help="score the demo already in --workdir")
    parser.add_argument("--rescore", action="store_true", help="with --reuse: run `unclip eval` again first")
    parser.add_argument("overrides", nargs="*", help="config overrides for the demo run")
    args = parser.parse_args()
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    from data_pipeline.store import open_store
    from data_pipeline.synthetic_quality import clip_retrieval, vae_psnr
    from launch import config as config_mod
    from launch import demo, evaluate
    from models.base import storage
    from models.base.configlib import read_yaml
    from models.metrics import guidance_gain

    workdir = os.path.abspath(args.workdir)
    if not args.reuse:
        cfg = config_mod.load(None, demo.demo_overrides(workdir) + args.overrides)
        demo.run(cfg, workdir, log=log)
    report = json.load(open(os.path.join(workdir, "report.json")))
    cfg = config_mod.from_dict(read_yaml(os.path.join(workdir, "config.yaml")))
    if args.reuse and args.rescore:
        report["phases"]["eval"]["wall_s"] = evaluate.run(cfg, log=log)["wall_s"]
    store = open_store(cfg.store_url)
    images, captions = held_out_pairs(store)
    result = {
        "workdir": workdir,
        "heldout_rows": len(captions),
        "phases_wall_s": {k: v["wall_s"] for k, v in report["phases"].items()},
    }
    result["vae_psnr_db"] = vae_psnr(cfg.encoders.vae, images, 64)
    result["clip_top1"] = clip_retrieval(cfg.encoders.clip, (images, captions))["top1"]
    evaluation = json.load(open(os.path.join(cfg.eval.out, "eval.json")))
    result["prior_cosine"] = evaluation["prior"]["cosine_predicted_vs_true"]
    result["prior_text_baseline"] = evaluation["prior"]["cosine_text_embedding_baseline"]
    result["prompts"], result["prompt_following"] = evaluation["heldout_rows"], {}
    result["phases_wall_s"]["eval (prompt following inside)"] = result["phases_wall_s"].pop("eval")
    result["guidance_off_vs_on"] = {}
    for chain in ("ldm", "unclip"):
        on, off = evaluation[chain], evaluation[chain].get("guidance_1", {})
        guidance, prior_guidance = cfg.sample.scales(chain)
        scale = f"{guidance:g}" if chain == "ldm" else f"{guidance:g} (prior {prior_guidance:g})"
        for key, scores in ((f"{chain}@{scale}", on), (f"{chain}@1", off)):
            if "prompt_following" not in scores:
                raise SystemExit(
                    f"{workdir}: eval.json has no prompt following for {key} "
                    "(eval.unguided_baseline off, or captions not the generator's)"
                )
            result["prompt_following"][key] = scores["prompt_following"]
        result["guidance_off_vs_on"][chain] = guidance_gain(off, on)
    result["grid"] = evaluation["reading_grid"]
    # against eval.reference_rows training images; eval.json from before reference_rows measured
    # against the held-out rows
    result["frechet_reference"] = evaluation.get(
        "frechet_reference", {"split": "heldout", "rows": evaluation["heldout_rows"]}
    )
    real_distance = result["real_images_frechet_distance_clip"] = evaluation.get("real_images_frechet_distance_clip")

    print(f"\n{'figure':50s} {'result':>10s} {'target':>8s}")
    print(f"{'VAE PSNR on held-out images (dB)':50s} {result['vae_psnr_db']:10.1f} {'>= 25':>8s}")
    print(f"{'CLIP top-1 among one-attribute-away captions':50s} {result['clip_top1']:10.1%} {'>= 90%':>8s}")
    print(
        f"{'prior cosine (text-embedding baseline)':50s} {result['prior_cosine']:6.3f} "
        f"({result['prior_text_baseline']:.3f})"
    )
    for key, hits in result["prompt_following"].items():
        print(
            f"{'following ' + key + ': shape / colour / bg':50s} "
            f"{hits['shape']:.0%} / {hits['color']:.0%} / {hits['background']:.0%}"
        )
    for chain, gain in result["guidance_off_vs_on"].items():
        follow, clip_score, distance = gain["prompt_following_mean"], gain["clip_score"], gain["frechet_distance_clip"]
        print(
            f"guidance off -> on, {chain}: following {follow[0]:.0%} -> {follow[1]:.0%}, "
            f"CLIP score {clip_score[0]:.3f} -> {clip_score[1]:.3f}, "
            f"Fréchet distance {distance[0]:.1f} -> {distance[1]:.1f}: "
            + ("beats unguided" if gain["beats_unguided"] else "does NOT beat unguided")
        )
    reference = result["frechet_reference"]
    print(
        f"Fréchet distances against {reference['rows']} {reference['split']} rows"
        + (f"; the real held-out images read {real_distance:.1f}" if real_distance is not None else "")
    )
    print("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["phases_wall_s"].items()))
    storage.write_json(os.path.join(workdir, "quality.json"), result)
    print(f"quality.json and {result['grid']}")


if __name__ == "__main__":
    main()
