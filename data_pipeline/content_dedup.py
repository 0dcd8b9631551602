"""Content dedup over a whole ingest, in Ray tasks: repeated image bytes (sha256) are dropped, the
earliest sample in list order kept, whichever shard or download finished first (a sample's place is
its shard and its place in the shard's input, read from img2dataset's key: `raw.list_positions`).

It runs once every shard is complete, in the three steps of data_pipeline/dedup.py, over groups
of consecutive shards (about `ingest.plan_task_rows` samples each):
  keys     per group: every downloaded sample's sha256 (32 bytes), order (shard, place) and uid
  buckets  per bucket: the repeats, with the uid each repeats
  deliver  per group: each shard's own list, ROOT/raw/NNNNN_duplicates.parquet (uid,
           duplicate_of), written only for shards that have a repeat
Under ROOT/raw/_dedup/: layout.json (fixed by the run that started it), keys/, buckets/ and
deliver/ (the markers). A reader of one shard opens only that shard's list.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import dedup, raw, tasks
from models.base import storage


def layout(
    raw_url: str, shards: int, samples_hint: int, plan_task_rows: int, shard_size: int, bucket_rows: int
) -> dict[str, int]:
    """Shards per group and buckets: recorded by the first run, so a resumed one agrees."""
    path = storage.join(raw_url, raw.DEDUP_DIR, "layout.json")
    if storage.exists(path):
        recorded = storage.read_json(path)
        if recorded["shards"] == shards:
            return recorded
        storage.remove(storage.join(raw_url, raw.DEDUP_DIR))
    chosen = {
        "shards": shards,
        "group_shards": max(1, plan_task_rows // shard_size),
        "buckets": dedup.bucket_count(samples_hint, bucket_rows),
    }
    storage.write_json(path, chosen)
    return chosen


def run(raw_url: str, chosen: dict[str, int], log, progress_every_s: float = 5.0) -> dict[str, int]:
    """Write every shard's duplicate list; returns the count and the largest task's memory."""
    folder = storage.join(raw_url, raw.DEDUP_DIR)
    groups = -(-chosen["shards"] // chosen["group_shards"])
    buckets = chosen["buckets"]
    args = (raw_url, chosen)
    tasks.run_stage(
        "content dedup: keys",
        storage.join(folder, "keys"),
        write_group_keys,
        lambda g: (*args, g),
        groups,
        log,
        progress_every_s,
    )
    reduced = tasks.run_stage(
        "content dedup: buckets",
        storage.join(folder, "buckets"),
        reduce_content_bucket,
        lambda b: (*args, b),
        buckets,
        log,
        progress_every_s,
    )
    delivered = tasks.run_stage(
        "content dedup: shard lists",
        storage.join(folder, "deliver"),
        deliver_group,
        lambda g: (*args, g),
        groups,
        log,
        progress_every_s,
    )
    repeats = sum(r["repeats"] for r in delivered.values())
    if repeats != sum(r["repeats"] for r in reduced.values()):
        raise RuntimeError(f"content dedup under '{folder}': the shard lists do not add up to the buckets' repeats")
    return {"duplicates": repeats, "peak_task_rss": max(tasks.peak_rss(reduced), tasks.peak_rss(delivered))}


def _group_shards(chosen: dict[str, int], group: int) -> range:
    size = chosen["group_shards"]
    return range(group * size, min((group + 1) * size, chosen["shards"]))


def _file(raw_url: str, step: str, index: int) -> str:
    return storage.join(raw_url, raw.DEDUP_DIR, step, f"{index:05d}.parquet")


def write_group_keys(raw_url: str, chosen: dict[str, int], group: int) -> dict[str, Any]:
    """Task: the content keys of a group's downloaded samples (a sample without a hash has none)."""
    digests, orders, uids = [], [], []
    for shard in _group_shards(chosen, group):
        status = raw.read_status(raw_url, shard, ["key", "uid", "sha256", "status"])
        digest, valid = dedup.from_hex(status["sha256"])
        rows = np.flatnonzero(valid & np.asarray(status["status"].to_numpy(zero_copy_only=False) == "success"))
        digests.append(digest[rows])
        orders.append(dedup.order_of(shard, raw.list_positions(status["key"])[rows]))
        uids.append(status["uid"].take(pa.array(rows)))
    keys = np.concatenate(digests) if digests else np.zeros((0, 32), np.uint8)
    uid = pa.concat_arrays([u.combine_chunks() for u in uids]) if uids else pa.array([], pa.string())
    dedup.write_keys(
        _file(raw_url, "keys", group),
        keys,
        np.concatenate(orders) if orders else np.zeros(0, np.int64),
        {"uid": uid},
        chosen["buckets"],
    )
    return {"samples": len(keys)}


def reduce_content_bucket(raw_url: str, chosen: dict[str, int], bucket: int) -> dict[str, Any]:
    groups = -(-chosen["shards"] // chosen["group_shards"])
    keys = dedup.read_bucket([_file(raw_url, "keys", g) for g in range(groups)], bucket)
    return {"repeats": len(dedup.reduce_bucket(keys, _file(raw_url, "buckets", bucket), keeper_columns=["uid"]))}


def deliver_group(raw_url: str, chosen: dict[str, int], group: int) -> dict[str, Any]:
    """Task: each shard of the group gets its own list of the samples it drops."""
    shards = _group_shards(chosen, group)
    repeats = dedup.read_repeats(
        [_file(raw_url, "buckets", b) for b in range(chosen["buckets"])],
        int(dedup.order_of(shards.start, 0)),
        int(dedup.order_of(shards.stop, 0)),
        ["uid", "uid_of_first"],
    )
    shard_of = np.asarray(repeats["order"]) >> dedup.ROW_BITS
    bounds = np.searchsorted(shard_of, [*shards, shards.stop])
    for i, shard in enumerate(shards):
        if bounds[i + 1] > bounds[i]:
            part = repeats.slice(bounds[i], bounds[i + 1] - bounds[i])
            table = pa.table({"uid": part["uid"], "duplicate_of": part["uid_of_first"]})
            buf = io.BytesIO()
            pq.write_table(table, buf)
            storage.write_bytes(raw.shard_file(raw_url, shard, raw.DUPLICATES_SUFFIX), buf.getvalue())
    return {"repeats": len(repeats)}
