"""`unclip ingest`: download a URL list into ROOT/raw/ with img2dataset, one Ray task per shard.

We split the list and commit shards ourselves instead of calling `img2dataset.download` with its
Ray distributor, because we need what it does not give: keys that are a function of the URL (so
every later stage and every rerun agree), exact URL dedup across the whole list, and shards that
appear only complete. Each task still runs img2dataset's own `Downloader`, so downloading,
resizing and per-sample status are exactly img2dataset's.

ROOT/raw/ holds, per shard NNNNN: `NNNNN.tar` (webdataset), `NNNNN.parquet` (one row per URL
with `status`/`error_message`), and `NNNNN_stats.json`, which is written last and marks the
shard complete. `_summary.json` and `_config.yaml` describe the whole run.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from data_pipeline import storage, url_list
from data_pipeline.config import IngestConfig, RayConfig

SHARD_DIGITS = 5  # img2dataset's oom_shard_count: names are 00000.tar, 00000.parquet, ...
STATS_SUFFIX = "_stats.json"
SUMMARY = "_summary.json"
PLAN = "_plan.json"  # which URLs each shard holds, so a rerun cannot mix two different lists


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def complete_shards(raw_url: str) -> list[int]:
    """Ids of the shards whose stats file, the commit marker, exists."""
    names = storage.listdir(raw_url)
    return sorted(int(n[: -len(STATS_SUFFIX)]) for n in names if re.fullmatch(rf"\d+{STATS_SUFFIX}", n))


_REASONS = (
    (re.compile(r"HTTP Error 4\d\d"), "http_4xx"),
    (re.compile(r"HTTP Error 5\d\d"), "http_5xx"),
    (re.compile(r"timed out|timeout", re.I), "timeout"),
    (re.compile(r"redirect", re.I), "redirect"),
    (re.compile(r"cannot identify image|truncated|broken data|decod|not a|image file is", re.I), "decode_error"),
    (re.compile(r"image too small|aspect ratio too large|image area too large"), "filtered_by_size"),
    (re.compile(r"urlopen error|Connection|Name or service|unknown url type|no host", re.I), "connection_error"),
)


def failure_reason(message: str) -> str:
    """A stable class for one of img2dataset's per-sample error messages."""
    return next((reason for pattern, reason in _REASONS if pattern.search(message)), "other")


@dataclass
class ShardResult:
    shard_id: int
    stats: dict[str, Any]


def _download_shard(shard_id: int, rows: pa.Table, raw_url: str, cfg: IngestConfig) -> ShardResult:
    """Runs inside a Ray task: one img2dataset Downloader over one shard, then the commit."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    staging = storage.join(raw_url, f"{storage.TMP_PREFIX}{shard_name(shard_id)}-{uuid.uuid4().hex[:8]}")
    storage.makedirs(staging)
    extra_columns = [c for c in rows.column_names if c not in ("url", "caption")]
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=Resizer(
            image_size=cfg.image_size,
            resize_mode=cfg.resize_mode,
            resize_only_if_bigger=False,
            encode_format=cfg.encode_format,
            encode_quality=cfg.encode_quality if cfg.encode_format != "png" else 9,
        ),
        thread_count=cfg.threads_per_task,
        save_caption=True,
        extract_exif=False,
        output_folder=staging,
        column_list=extra_columns + ["caption", "url"],
        timeout=cfg.timeout_s,
        number_sample_per_shard=max(cfg.shard_size, 2),
        oom_shard_count=SHARD_DIGITS,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format=cfg.encode_format,
        retries=cfg.retries,
        user_agent_token=None,
        disallowed_header_directives=None,
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            input_file = os.path.join(tmp, "input.arrow")
            with pa.OSFile(input_file, "wb") as sink, pa.ipc.new_file(sink, rows.schema) as writer:
                writer.write_table(rows)
            # Raises on failure (the callable wrapper would swallow it); the file is consumed.
            downloader.download_shard((shard_id, input_file))
        name = shard_name(shard_id)
        for suffix in (".tar", ".parquet", STATS_SUFFIX):  # the stats file last: it is the marker
            storage.move(storage.join(staging, name + suffix), storage.join(raw_url, name + suffix))
        return ShardResult(shard_id, storage.read_json(storage.join(raw_url, name + STATS_SUFFIX)))
    finally:
        storage.remove(staging)


def plan_shards(table: pa.Table, shard_size: int) -> tuple[list[pa.Table], dict[str, int]]:
    """Drop rows that cannot be downloaded or repeat a URL, then cut into shards (list order)."""
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    keep = []
    for i, url in enumerate(table["url"].to_pylist()):
        if not url or not isinstance(url, str):
            counts["missing_url"] += 1
        elif url in seen:
            counts["duplicate_url"] += 1
        else:
            seen.add(url)
            keep.append(i)
    table = table.take(pa.array(keep, pa.int64()))
    shards = [table.slice(start, shard_size) for start in range(0, len(table), shard_size)]
    return shards, dict(counts)


def _fingerprint(shard: pa.Table) -> str:
    import hashlib

    return hashlib.sha256("\n".join(shard["uid"].to_pylist()).encode()).hexdigest()


def check_plan(raw_url: str, shards: list[pa.Table], done: set[int]) -> None:
    """Record the shard plan, or refuse a rerun whose list would put other URLs in a done shard."""
    plan = [_fingerprint(s) for s in shards]
    path = storage.join(raw_url, PLAN)
    if storage.exists(path):
        recorded = storage.read_json(path)["shards"]
        for shard_id in sorted(done):
            if shard_id >= len(plan) or shard_id >= len(recorded) or recorded[shard_id] != plan[shard_id]:
                raise url_list.UrlListError(
                    f"'{raw_url}' holds shard {shard_name(shard_id)} of another URL list or shard size; "
                    "ingest into a new root (or remove it) to start over"
                )
    storage.write_json(path, {"shards": plan})


def summarize(raw_url: str, input_rows: int, prefiltered: dict[str, int], wall_s: float) -> dict[str, Any]:
    """Totals over every complete shard in `raw_url`, including those of earlier runs."""
    totals: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    shards = complete_shards(raw_url)
    for shard_id in shards:
        stats = storage.read_json(storage.join(raw_url, shard_name(shard_id) + STATS_SUFFIX))
        totals["attempted"] += stats["count"]
        totals["kept"] += stats["successes"]
        totals["failed_to_download"] += stats["failed_to_download"]
        totals["failed_to_decode"] += stats["failed_to_resize"]
        for message, n in stats["status_dict"].items():
            if message != "success":
                by_reason[failure_reason(message)] += n
                messages[message] += n
    return {
        "input_rows": input_rows,
        "shards": len(shards),
        "attempted": totals["attempted"],
        "kept": totals["kept"],
        "failed": totals["failed_to_download"] + totals["failed_to_decode"],
        "failed_by_reason": dict(by_reason.most_common()),
        "filtered_before_download": prefiltered,
        "top_error_messages": dict(messages.most_common(10)),
        "wall_s": round(wall_s, 2),
        "images_per_s": round(totals["kept"] / wall_s, 2) if wall_s > 0 else None,
    }


def run(cfg: IngestConfig, ray_cfg: RayConfig, raw_url: str, config_yaml: str, log=print) -> dict[str, Any]:
    """Download `cfg.url_list` into `raw_url`; complete shards of an earlier run are kept."""
    import ray

    from data_pipeline.ray_runtime import ray_session

    started = time.time()
    if not cfg.url_list:
        raise url_list.UrlListError("config key 'ingest.url_list': no URL list given")
    table = url_list.read(cfg.url_list, cfg.input_format, cfg.url_col, cfg.caption_col)
    shards, prefiltered = plan_shards(table, cfg.shard_size)
    storage.makedirs(raw_url)
    storage.remove_stale_temporaries(raw_url)
    storage.write_text(storage.join(raw_url, "_config.yaml"), config_yaml)
    done = set(complete_shards(raw_url))
    check_plan(raw_url, shards, done)
    todo = [i for i in range(len(shards)) if i not in done]
    log(f"ingest: {len(table)} URLs -> {len(shards)} shards of <= {cfg.shard_size}; {len(done)} already complete")

    if todo:
        with ray_session(ray_cfg) as dashboard:
            if dashboard:
                log(f"ingest: Ray dashboard {dashboard}")
            task = ray.remote(num_cpus=1, max_retries=2)(_download_shard)
            limit = cfg.max_in_flight or max(1, int(ray.cluster_resources().get("CPU", 1)))
            pending: list = []
            queue = list(todo)
            finished = kept = attempted = 0
            while queue or pending:
                while queue and len(pending) < limit:
                    shard_id = queue.pop(0)
                    pending.append(task.remote(shard_id, shards[shard_id], raw_url, cfg))
                ready, pending = ray.wait(pending, num_returns=1)
                result: ShardResult = ray.get(ready[0])
                finished += 1
                kept += result.stats["successes"]
                attempted += result.stats["count"]
                rate = kept / max(time.time() - started, 1e-9)
                log(
                    f"ingest: shard {shard_name(result.shard_id)} done ({finished}/{len(todo)}); "
                    f"kept {kept}/{attempted} ({100 * kept / max(attempted, 1):.0f}%), {rate:.1f} images/s"
                )
    summary = summarize(raw_url, len(table), prefiltered, time.time() - started)
    storage.write_json(storage.join(raw_url, SUMMARY), summary)
    return summary
