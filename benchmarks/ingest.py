"""`unclip ingest` versus bare `img2dataset.download`: the same list, the same settings, one run.

Serves N synthetic images on 127.0.0.1, then alternates the two (A B A B ...) so drift in a noisy
machine hits both alike, and prints images/s of each and the wall-time ratio (target <= 1.15).

Ray is started once before timing, as on a cluster where the job finds Ray running; the time a
local Ray takes to start is printed on its own line.

    python benchmarks/ingest.py --images 2400 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bare_img2dataset(url_list: str, out: str, args: argparse.Namespace) -> int:
    import img2dataset

    img2dataset.download(
        url_list=url_list,
        input_format="parquet",
        url_col="URL",
        caption_col="TEXT",
        output_folder=out,
        output_format="webdataset",
        image_size=args.image_size,
        resize_mode="center_crop",
        encode_format="jpg",
        encode_quality=95,
        processes_count=args.cpus,
        thread_count=args.threads,
        number_sample_per_shard=args.shard_size,
        timeout=10,
        extract_exif=False,
        compute_hash="sha256",
        distributor="multiprocessing",
        save_additional_columns=None,
    )
    return sum(json.load(open(os.path.join(out, f)))["successes"] for f in os.listdir(out) if f.endswith("_stats.json"))


def unclip_ingest(url_list: str, out: str, args: argparse.Namespace) -> int:
    from data_pipeline import ingest
    from data_pipeline.config import IngestConfig, IngestFilters, RayConfig

    cfg = IngestConfig(
        url_list=url_list,
        shard_size=args.shard_size,
        image_size=args.image_size,
        resize_mode="center_crop",
        encode_format="jpg",
        encode_quality=95,
        threads_per_task=args.threads,
        timeout_s=10,
        filters=IngestFilters(drop_empty_caption=False),
        allow_networks=["127.0.0.1"],  # the benchmark's server
    )
    return ingest.run(cfg, RayConfig(num_cpus=args.cpus), out, "benchmark: true\n", log=lambda _: None)["kept"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=300)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--source-size", type=int, default=160, help="side of the served images")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    from data_pipeline import synthetic
    from data_pipeline.config import RayConfig, SyntheticConfig
    from data_pipeline.ray_runtime import ray_session

    work = tempfile.mkdtemp(prefix="unclip-bench-ingest-")
    records = synthetic.generate(
        os.path.join(work, "site"), SyntheticConfig(count=args.images, image_size=args.source_size, broken=False)
    )
    times: dict[str, list[float]] = {"img2dataset": [], "unclip ingest": []}
    kept: dict[str, int] = {}
    ray_start = time.time()
    with ray_session(RayConfig(num_cpus=args.cpus)), synthetic.serve_directory(os.path.join(work, "site")) as base:
        ray_start = time.time() - ray_start
        url_list = synthetic.write_url_list(records, base, os.path.join(work, "urls.parquet"))
        for round_ in range(args.rounds):
            for name, fn in (("img2dataset", bare_img2dataset), ("unclip ingest", unclip_ingest)):
                out = os.path.join(work, f"{name.replace(' ', '-')}-{round_}")
                started = time.time()
                kept[name] = fn(url_list, out, args)
                times[name].append(time.time() - started)
                shutil.rmtree(out)
                print(
                    f"round {round_ + 1}: {name:<14} {times[name][-1]:6.1f}s  "
                    f"{kept[name] / times[name][-1]:7.0f} images/s",
                    flush=True,
                )
    shutil.rmtree(work, ignore_errors=True)

    wall = {name: statistics.median(t) for name, t in times.items()}
    ratio = wall["unclip ingest"] / wall["img2dataset"]
    result = {
        "images": args.images,
        "cpus": args.cpus,
        "rounds": args.rounds,
        "wall_s": wall,
        "images_per_s": {name: kept[name] / wall[name] for name in wall},
        "kept": kept,
        "wall_ratio_unclip_over_img2dataset": ratio,
        "local_ray_start_s": ray_start,
        "wall_ratio_with_local_ray_start": (wall["unclip ingest"] + ray_start) / wall["img2dataset"],
    }
    print(f"\n{'':<14} {'wall s':>8} {'images/s':>9}")
    for name in wall:
        print(f"{name:<14} {wall[name]:8.1f} {result['images_per_s'][name]:9.0f}")
    print(f"wall-time ratio unclip/img2dataset: {ratio:.3f} (target <= 1.15)")
    print(
        f"with a local Ray started for the job ({ray_start:.1f}s, none on a cluster): "
        f"{result['wall_ratio_with_local_ray_start']:.3f}"
    )
    if args.json:
        from models.base import storage

        storage.write_json(args.json, result)


if __name__ == "__main__":
    main()
