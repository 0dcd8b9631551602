"""Do the store's readers and writers stay flat as the store grows?

Two inputs:
  - generated parts indexes standing for stores of 10M, 100M and 1B rows (parts of 1,000 rows,
    one row group each, 5% held out, statistics at --stats-dim; the layout needs no data files).
    For each, in a fresh process: the index's bytes and the time to load its layout columns, and a
    training loader's per-rank layout (rank 0 of 8): its memory and start-up time;
  - a real small `unclip embed` (tiny encoders, the embedded generator's images) at two part
    sizes: the bytes per part the embed driver receives.

Targets: layout <= 256 MB and <= 10 s per rank at 1B rows; index load <= 2 s at 1M parts; the
driver receives <= 4 KB per part, the same at both part sizes.

    python benchmarks/store_scale.py                   # 10M, 100M, 1B rows; parts of 8 and 32 images
    python benchmarks/store_scale.py --rows 10,100 --json out.json
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import children
from benchmarks.children import peak_rss, save_report, scratch

MB = 2**20


def generate_index(store_url: str, parts: int, rows_per_part: int, stats_dim: int, seed: int = 0) -> None:
    """A parts index and manifest as `unclip embed` writes them, for `parts` parts."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipeline import dedup, store
    from data_pipeline.store_writer import INDEX_SLICE
    from models.base import storage

    rng = np.random.default_rng(seed)
    specs = {
        "clip_image_emb": {"dtype": "float16", "shape": [stats_dim]},
        "vae_latent": {"dtype": "float16", "shape": [4, 32, 32]},
    }
    folder = storage.join(store_url, "parts-0000beef")
    slices = -(-parts // INDEX_SLICE)

    def one(values: np.ndarray) -> pa.ListArray:
        """A list column with the one value of each row in its list."""
        n = len(values)
        return pa.ListArray.from_arrays(np.arange(n + 1, dtype=np.int32), pa.array(values, pa.int32()))

    def blobs(n: int, width: int) -> pa.BinaryArray:
        """`n` random binary values of `width` bytes each."""
        return pa.BinaryArray.from_buffers(
            pa.binary(),
            n,
            [
                None,
                pa.py_buffer(np.arange(0, (n + 1) * width, width, dtype=np.int32)),
                pa.py_buffer(rng.random(n * width // 8).tobytes()),
            ],
        )

    for s in range(slices):
        ids = np.arange(s * INDEX_SLICE, min((s + 1) * INDEX_SLICE, parts))
        n = len(ids)
        table = {
            "part": pa.array(ids),
            "file": pa.array([f"part-{i:05d}.parquet" for i in ids]),
            "rows": pa.array(np.full(n, rows_per_part)),
            "row_groups": one(np.full(n, rows_per_part)),
            "train_rows": one(rng.binomial(rows_per_part, 0.95, n)),
            "sha256": dedup.to_hex(rng.integers(0, 256, (n, 32), dtype=np.uint8), 32),
            "bytes": pa.array(np.full(n, 9_000_000)),
            "source": pa.array([f"{i:05d}.tar" for i in ids]),
            **{f"bytes:{c}": pa.array(rng.integers(1000, 100_000, n)) for c in [*store.BASE_COLUMNS, *specs]},
            "count:clip_image_emb": pa.array(np.full(n, rows_per_part)),
            "sum:clip_image_emb": blobs(n, 8 * stats_dim),
            "sumsq:clip_image_emb": blobs(n, 8 * stats_dim),
            "count:vae_latent": pa.array(np.full(n, rows_per_part * 4096)),
            "sum:vae_latent": blobs(n, 8),
            "sumsq:vae_latent": blobs(n, 8),
        }
        with storage.atomic_open(storage.join(folder, f"{s:05d}.parquet")) as sink:
            pq.write_table(pa.table(table), sink)
    storage.write_json(
        storage.join(store_url, store.MANIFEST),
        {
            "schema_version": store.SCHEMA_VERSION,
            "created": "generated",
            "encoders": {},
            "columns": specs,
            "totals": {
                "parts": parts,
                "empty_parts": 0,
                "rows": parts * rows_per_part,
                "row_groups": parts,
                "bytes": parts * 9_000_000,
                "counts": {},
            },
            "holdout": {"fraction": 0.05, "seed": store.HOLDOUT_SEED},
            "index": {"folder": "parts-0000beef", "slices": slices, "slice_parts": INDEX_SLICE},
        },
    )


def child_layout(store_url: str) -> dict:
    import psutil

    from data_pipeline import store
    from models.base import storage
    from training.data import StoreLoader

    base = psutil.Process().memory_info().rss
    started = time.time()
    opened = store.open_store(store_url)
    _ = opened.index  # the layout columns of every slice, as arrays
    index_s = time.time() - started
    loader = StoreLoader(opened, ["clip_image_emb"], batch_size=64, seed=0, rank=0, world_size=8)
    startup_s = time.time() - started  # the index included: what a rank waits before its first read
    folder = storage.join(store_url, opened.manifest["index"]["folder"])
    index_bytes = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
    return {
        "rows": loader.rows,
        "groups": len(loader.sizes),
        "index_s": index_s,
        "startup_s": startup_s,
        "index_bytes": index_bytes,
        "layout_bytes": peak_rss() - base,
        "steps_in_epoch": loader.steps_in_epoch,
    }


def child_embed(workdir: str, shard_size: int) -> dict:
    from data_pipeline import embed, synthetic
    from data_pipeline.config import SyntheticConfig
    from launch import config
    from models.base.configlib import to_dict
    from models.encoders import write_tiny_encoders

    site, wds = os.path.join(workdir, "site"), os.path.join(workdir, f"wds-{shard_size}")
    records = [r for r in synthetic.generate(site, SyntheticConfig(count=96, seed=1)) if r["broken"] is None]
    synthetic.write_shards(records, site, wds, shard_size)
    cfg = config.load(
        None,
        [
            f"root={workdir}/root-{shard_size}",
            f"embed.input={wds}",
            "embed.batch_size=8",
            "ray.num_cpus=2",
            f"encoders.clip.model=local-dir:{workdir}/encoders/clip",
            f"encoders.vae.path={workdir}/encoders/vae",
        ],
    )
    write_tiny_encoders(cfg.encoders)
    lines: list[str] = []
    manifest = embed.run(cfg.encoders, cfg.embed, cfg.ray, cfg.raw_url, cfg.store_url, to_dict(cfg), log=lines.append)
    received = next(
        float(m.group(1)) for line in lines if (m := re.search(r"driver received (\d+) bytes a part", line))
    )
    return {"parts": manifest["totals"]["parts"], "rows": manifest["totals"]["rows"], "bytes_per_part": received}


def _child(*args: str) -> dict:
    return children.run_child(os.path.abspath(__file__), *args)


def main() -> None:
    parser = children.parser(__doc__)
    parser.add_argument("--rows", default="10,100,1000", help="store sizes, millions of rows")
    parser.add_argument("--rows-per-part", type=int, default=1000)
    parser.add_argument(
        "--stats-dim", type=int, default=256, help="the CLIP embedding's width, for the statistics' size"
    )
    parser.add_argument("--part-sizes", default="8,32", help="images per part of the real embed")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = {
            "index": lambda: generate_index(rest[0], int(rest[1]), int(rest[2]), int(rest[3])) or {},
            "layout": lambda: child_layout(rest[0]),
            "embed": lambda: child_embed(rest[0], int(rest[1])),
        }[kind]()
        from models.base import storage

        print(storage.strict_json(result))
        return

    report: dict = {"layout": {}, "embed": {}}
    with scratch(args.workdir, "store-scale-") as workdir:
        for millions in [float(r) for r in args.rows.split(",")]:
            parts = int(millions * 1e6) // args.rows_per_part
            url = os.path.join(workdir, f"index-{millions:g}M")
            _child("index", url, str(parts), str(args.rows_per_part), str(args.stats_dim))
            r = report["layout"][f"{millions:g}M"] = _child("layout", url)
            shutil.rmtree(url, ignore_errors=True)
            print(
                f"{millions:>6g}M rows ({parts:,} parts): index {r['index_bytes'] / MB:,.0f} MB, "
                f"layout columns loaded in {r['index_s']:.2f} s; "
                f"loader rank 0 of 8: layout {r['layout_bytes'] / MB:.0f} MB, start-up {r['startup_s']:.2f} s",
                flush=True,
            )
        for size in [int(s) for s in args.part_sizes.split(",")]:
            r = report["embed"][size] = _child("embed", workdir, str(size))
            print(
                f"embed, parts of {size} images: {r['parts']} parts, "
                f"the driver received {r['bytes_per_part']:.0f} bytes a part",
                flush=True,
            )
        largest = report["layout"][max(report["layout"], key=lambda k: float(k[:-1]))]
        sizes = [r["bytes_per_part"] for r in report["embed"].values()]
        print(
            f"largest store: layout {largest['layout_bytes'] / MB:.0f} MB (target <= 256), "
            f"start-up {largest['startup_s']:.2f} s (target <= 10), "
            f"index load {largest['index_s']:.2f} s (target <= 2); "
            f"driver {max(sizes):.0f} bytes a part (target <= 4096), "
            f"{max(sizes) / min(sizes):.2f}x across part sizes"
        )
        save_report(args.json, report)


if __name__ == "__main__":
    main()
