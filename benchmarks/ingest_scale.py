"""Does ingest's planning and dedup keep its cost per row and its memory as the list grows?

Generates LAION-like URL lists (URL, TEXT, WIDTH, HEIGHT, similarity, punsafe, pwatermark; ~1% of
rows repeat an earlier URL, often in another file) of 1M, 4M and 16M rows over `--files` parquet
files, each with an opt-out list (`--optout` million entries at the largest size, in proportion
below it: URLs of the list, URLs it lacks, 50 of its hosts as domains), and runs the real planning,
URL dedup and opt-out join (data_pipeline/plan.py) on a local Ray over each, every size in a fresh
driver process. Then content dedup (data_pipeline/content_dedup.py) over
`--hashes` million generated sha256 values laid out as img2dataset's status files, where
downloads would have written them; a sample of its buckets is checked against a direct
reference (a Python dict over those buckets' rows, in list order).

Prints per size: seconds per million rows, the driver's peak RSS, the largest task's peak RSS,
and the largest/smallest ratio of each. Targets: driver RSS and s/M rows at the largest size
<= 1.2x the smallest; no task above 2 GB; the content dedup equal to the reference.

    python benchmarks/ingest_scale.py                      # 1M, 4M, 16M rows; 40M hashes
    python benchmarks/ingest_scale.py --sizes 1,4 --hashes 4 --json out.json
"""

from __future__ import annotations

import os
import shutil
import sys
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import children
from benchmarks.children import peak_rss, save_report, scratch

GB = 2**30
WORDS = "a the photo of red blue green dog cat house tree car on in with at beach city night portrait vintage".split()


def generate_list(folder: str, rows: int, files: int, row_group: int, seed: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 2**62, rows, dtype=np.int64)
    repeat = np.flatnonzero(rng.random(rows) < 0.01)
    ids[repeat] = ids[(rng.random(len(repeat)) * repeat).astype(np.int64)]  # an earlier row's URL, any file
    per_file = -(-rows // files)
    vocab = pa.array(WORDS)
    os.makedirs(folder, exist_ok=True)
    for f in range(files):
        part = slice(f * per_file, min((f + 1) * per_file, rows))
        n = part.stop - part.start
        host = pc.cast(pa.array(ids[part] % 5000), pa.string())
        path = pc.cast(pa.array(ids[part]), pa.string())
        url = pc.binary_join_element_wise("https://img", host, ".cdn.example.com/images/", path, "/full.jpg", "")
        words = [vocab.take(pa.array(rng.integers(0, len(WORDS), n))) for _ in range(8)]
        table = pa.table(
            {
                "URL": url,
                "TEXT": pc.binary_join_element_wise(*words, " "),
                "WIDTH": rng.integers(64, 2048, n),
                "HEIGHT": rng.integers(64, 2048, n),
                "similarity": rng.random(n) * 0.4,
                "punsafe": rng.random(n),
                "pwatermark": rng.random(n),
            }
        )
        pq.write_table(table, os.path.join(folder, f"part-{f:05d}.parquet"), row_group_size=row_group)


def generate_optout(folder: str, list_rows: int, entries: int, files: int, row_group: int, seed: int) -> None:
    """A do-not-train export of `entries` rows: half of them URLs of the list (`generate_list`'s,
    same seed), half URLs it lacks, and 50 of its 5,000 hosts as domains (1% of its rows)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ids = np.random.default_rng(seed).integers(0, 2**62, list_rows, dtype=np.int64)  # the list's first draw
    rng = np.random.default_rng(seed + 1)
    chosen = np.concatenate([ids[rng.integers(0, list_rows, entries // 2)], rng.integers(0, 2**62, entries // 2)])
    host = pc.cast(pa.array(chosen % 5000), pa.string())
    urls = pc.binary_join_element_wise(
        "https://img", host, ".cdn.example.com/images/", pc.cast(pa.array(chosen), pa.string()), "/full.jpg", ""
    )
    domains = pa.array([f"img{h}.cdn.example.com" for h in rng.choice(5000, 50, replace=False)])
    column = pa.concat_arrays([urls, domains])
    os.makedirs(folder, exist_ok=True)
    per_file = -(-len(column) // files)
    for f in range(files):
        part = column.slice(f * per_file, per_file)
        pq.write_table(
            pa.table({"url": part}), os.path.join(folder, f"optout-{f:05d}.parquet"), row_group_size=row_group
        )


def generate_hashes(raw_url: str, millions: float, shard_size: int, seed: int) -> int:
    """img2dataset-like status files (key, uid, sha256 hex, status) of `millions` M rows; ~3% of the
    downloads repeat an earlier image, ~10% failed. Returns the shard count."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from data_pipeline import dedup, raw

    rows = int(millions * 1e6)
    shards = -(-rows // shard_size)
    rng = np.random.default_rng(seed)
    digests = rng.integers(0, 256, (rows, 32), dtype=np.uint8)
    repeat = np.flatnonzero(rng.random(rows) < 0.03)
    digests[repeat] = digests[(rng.random(len(repeat)) * repeat).astype(np.int64)]
    os.makedirs(raw_url, exist_ok=True)
    for shard in range(shards):
        part = slice(shard * shard_size, min((shard + 1) * shard_size, rows))
        n = part.stop - part.start
        ok = rng.random(n) > 0.1
        sha = dedup.to_hex(digests[part], 32)
        table = pa.table(
            {
                "key": pa.array(np.char.zfill((shard * 10**7 + np.arange(n)).astype(str), 12)),  # img2dataset's
                "uid": dedup.to_hex(rng.integers(0, 256, (n, 12), dtype=np.uint8), 12),
                "sha256": pc.if_else(pa.array(ok), sha, pa.scalar(None, pa.string())),
                "status": pa.array(np.where(ok, "success", "failed_to_download")),
            }
        )
        pq.write_table(table, raw.shard_file(raw_url, shard, ".parquet"))
    return shards


def child_plan(list_dir: str, raw_url: str, optout_dir: str = "") -> dict:
    from data_pipeline import plan, plan_run
    from data_pipeline.config import IngestConfig, IngestFilters, RayConfig
    from data_pipeline.ray_runtime import ray_session

    cfg = IngestConfig(url_list=list_dir, shard_size=10_000, filters=IngestFilters(optout_list=optout_dir or None))
    with ray_session(RayConfig()):  # started before the clock, as on a cluster that is up
        started = time.time()
        spec = plan.prepare(cfg, raw_url, {}, [], lambda _m: None)
        planned = plan_run.execute(spec, lambda _m: None)
        seconds = time.time() - started
    return {
        "rows": planned.input_rows,
        "seconds": seconds,
        "driver_rss": peak_rss(),
        "task_rss": planned.peak_task_rss,
        "pieces": len(spec.pieces),
        "buckets": spec.buckets,
        "shards": planned.shards,
        "kept": planned.kept,
        "duplicate_url": planned.filtered.get("duplicate_url", 0),
        "opted_out_listed": planned.filtered.get("opted_out_listed", 0),
    }


def child_content(raw_url: str, shards: int, shard_size: int) -> dict:
    from data_pipeline import content_dedup
    from data_pipeline.config import IngestConfig, RayConfig
    from data_pipeline.ray_runtime import ray_session

    cfg = IngestConfig(shard_size=shard_size)
    with ray_session(RayConfig()):
        started = time.time()
        chosen = content_dedup.layout(
            raw_url, shards, shards * shard_size, cfg.plan_task_rows, shard_size, cfg.dedup_bucket_rows
        )
        result = content_dedup.run(raw_url, chosen, lambda _m: None)
        seconds = time.time() - started
    return {
        **chosen,
        "seconds": seconds,
        "duplicates": result["duplicates"],
        "driver_rss": peak_rss(),
        "task_rss": result["peak_task_rss"],
    }


def check_content(raw_url: str, shards: int, buckets: int, sample: int) -> dict:
    """The repeats of `sample` buckets, found directly (first copy in (shard, row) order kept),
    against the per-shard duplicate lists content dedup wrote."""
    import numpy as np
    import pyarrow.parquet as pq

    from data_pipeline import dedup, raw
    from models.base import storage

    chosen = set(np.random.default_rng(0).choice(buckets, size=min(sample, buckets), replace=False).tolist())
    first: dict[bytes, str] = {}
    expected: dict[str, str] = {}
    in_sample: set[str] = set()
    for shard in range(shards):
        table = raw.read_status(raw_url, shard, ["uid", "sha256", "status"])
        digests, valid = dedup.from_hex(table["sha256"])
        ok = valid & (np.asarray(table["status"].to_numpy(zero_copy_only=False)) == "success")
        uids = table["uid"].to_pylist()
        for row in np.flatnonzero(ok & np.isin(dedup.bucket_of(digests, buckets), list(chosen))):
            key, uid = digests[row].tobytes(), uids[row]
            in_sample.add(uid)
            if key in first:
                expected[uid] = first[key]
            else:
                first[key] = uid
    found: dict[str, str] = {}
    for shard in range(shards):
        path = raw.shard_file(raw_url, shard, raw.DUPLICATES_SUFFIX)
        if storage.exists(path):
            t = pq.read_table(path)
            found.update(
                (u, d)
                for u, d in zip(t["uid"].to_pylist(), t["duplicate_of"].to_pylist(), strict=True)
                if u in in_sample
            )
    return {
        "buckets_checked": len(chosen),
        "rows_checked": len(in_sample),
        "repeats_checked": len(expected),
        "equal": found == expected,
    }


def _child(*args: str) -> dict:
    return children.run_child(os.path.abspath(__file__), *args)


def main() -> None:
    parser = children.parser(__doc__)
    parser.add_argument("--sizes", default="1,4,16", help="list sizes, millions of rows")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--row-group", type=int, default=131_072, help="rows per row group of the generated files")
    parser.add_argument(
        "--hashes", type=float, default=40, help="millions of sha256 values for content dedup (0: skip)"
    )
    parser.add_argument(
        "--optout",
        type=float,
        default=10,
        help="millions of opt-out entries at the largest size (smaller sizes in proportion; 0: none)",
    )
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = {
            "plan": lambda: child_plan(*rest),
            "content": lambda: child_content(rest[0], int(rest[1]), int(rest[2])),
            "generate-list": lambda: generate_list(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), 0) or {},
            "generate-optout": lambda: (
                generate_optout(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), int(rest[4]), 0) or {}
            ),
            "generate-hashes": lambda: {"shards": generate_hashes(rest[0], float(rest[1]), int(rest[2]), 0)},
            "check": lambda: check_content(rest[0], int(rest[1]), int(rest[2]), 4),
        }[kind]()
        from models.base import storage

        print(storage.strict_json(result))
        return

    sizes = [float(s) for s in args.sizes.split(",")]
    rows = {}
    with scratch(args.workdir, "ingest-scale-") as workdir:
        for size in sizes:
            folder = os.path.join(workdir, f"list-{size:g}M")
            _child("generate-list", folder, str(int(size * 1e6)), str(args.files), str(args.row_group))
            optout = os.path.join(workdir, f"optout-{size:g}M") if args.optout else ""
            if optout:
                entries = int(args.optout * 1e6 * size / max(sizes))
                _child("generate-optout", optout, str(int(size * 1e6)), str(entries), "4", str(args.row_group))
            rows[size] = _child("plan", folder, os.path.join(workdir, f"raw-{size:g}M"), optout)
            shutil.rmtree(os.path.join(workdir, f"raw-{size:g}M"), ignore_errors=True)
            shutil.rmtree(folder, ignore_errors=True)
            if optout:
                shutil.rmtree(optout, ignore_errors=True)
            r = rows[size]
            print(
                f"{size:>6g}M rows  {r['seconds'] / size:6.2f} s/M rows  driver {r['driver_rss'] / 2**20:6.0f} MB  "
                f"largest task {r['task_rss'] / 2**20:6.0f} MB  ({r['pieces']} pieces, {r['buckets']} URL buckets, "
                f"{r['duplicate_url']:,} repeated URLs, {r['opted_out_listed']:,} opted out, {r['shards']} shards)",
                flush=True,
            )
        small, large = rows[sizes[0]], rows[sizes[-1]]
        per_row = (large["seconds"] / sizes[-1]) / (small["seconds"] / sizes[0])
        driver = large["driver_rss"] / small["driver_rss"]
        largest_task = max(r["task_rss"] for r in rows.values())
        print(
            f"{sizes[-1]:g}M/{sizes[0]:g}M: s/M rows {per_row:.2f} (target <= 1.2), "
            f"driver RSS {driver:.2f} (target <= 1.2), "
            f"largest task {largest_task / GB:.2f} GB (target <= 2)"
        )
        report = {"sizes": rows, "per_row_ratio": per_row, "driver_rss_ratio": driver, "largest_task_rss": largest_task}
        if args.hashes:
            raw_url = os.path.join(workdir, "content")
            shard_size = 10_000
            shards = _child("generate-hashes", raw_url, str(args.hashes), str(shard_size))["shards"]
            content = _child("content", raw_url, str(shards), str(shard_size))
            check = _child("check", raw_url, str(shards), str(content["buckets"]))
            print(
                f"content dedup {args.hashes:g}M hashes: {content['seconds'] / args.hashes:.2f} s/M, "
                f"{content['duplicates']:,} repeats, "
                f"driver {content['driver_rss'] / 2**20:.0f} MB, largest task {content['task_rss'] / 2**20:.0f} MB; "
                f"{check['buckets_checked']} of {content['buckets']} buckets ({check['rows_checked']:,} rows, "
                f"{check['repeats_checked']:,} repeats) {'equal to' if check['equal'] else 'DIFFER FROM'} the reference"
            )
            report["content"] = {**content, **check}
        save_report(args.json, report)


if __name__ == "__main__":
    main()
