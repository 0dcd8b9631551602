"""`unclip ingest`: download a URL list into ROOT/raw/ with img2dataset, one Ray task per shard.

We plan and commit shards ourselves instead of calling `img2dataset.download` with its Ray
distributor, because we need what it does not give: keys that are a function of the URL (so
every later stage and every rerun agree), filters and URL dedup over the whole list before any
download, content dedup over the whole data set after, and shards that appear only complete.
Each task still runs img2dataset's own `Downloader`, so downloading, resizing and the
per-sample status are exactly img2dataset's. The layout is in data_pipeline/raw.py.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline import filters, raw, storage, url_list
from data_pipeline.config import IngestConfig, RayConfig


class IngestIncomplete(RuntimeError):
    pass


def download_shard(shard_id: int, rows: pa.Table, raw_url: str, cfg: IngestConfig) -> dict[str, Any]:
    """One img2dataset Downloader over one shard, written beside the destination, then committed."""
    from img2dataset.downloader import Downloader
    from img2dataset.writer import WebDatasetSampleWriter

    name = raw.shard_name(shard_id)
    staging = storage.join(raw_url, f"{storage.TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
    storage.makedirs(staging)
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=filters.make_resizer(cfg.image_size, cfg.resize_mode, cfg.encode_format, cfg.encode_quality, cfg.filters),
        thread_count=cfg.threads_per_task,
        save_caption=True,
        extract_exif=False,
        output_folder=staging,
        column_list=[c for c in rows.column_names if c not in ("url", "caption")] + ["caption", "url"],
        timeout=cfg.timeout_s,
        number_sample_per_shard=max(cfg.shard_size, 2),
        oom_shard_count=raw.SHARD_DIGITS,
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
            # download_shard raises on failure (Downloader.__call__ would swallow it)
            downloader.download_shard((shard_id, input_file))
        for suffix in (".tar", ".parquet", raw.STATS_SUFFIX):  # the stats file last: it is the marker
            storage.move(storage.join(staging, name + suffix), raw.shard_file(raw_url, shard_id, suffix))
        return {"shard": shard_id, **storage.read_json(raw.shard_file(raw_url, shard_id, raw.STATS_SUFFIX))}
    finally:
        storage.remove(staging)


def _download_group(shards: list[tuple[int, pa.Table]], raw_url: str, cfg: IngestConfig) -> list[dict[str, Any]]:
    """A Ray task: its shards one after another, or side by side in `processes_per_task` processes."""
    if len(shards) == 1:
        return [download_shard(shards[0][0], shards[0][1], raw_url, cfg)]
    with multiprocessing.get_context("spawn").Pool(len(shards)) as pool:
        return pool.starmap(download_shard, [(i, rows, raw_url, cfg) for i, rows in shards])


def _fingerprint(shard: pa.Table) -> str:
    return hashlib.sha256("\n".join(shard["uid"].to_pylist()).encode()).hexdigest()


def check_plan(raw_url: str, shards: list[pa.Table], done: set[int], settings: dict[str, Any]) -> None:
    """Record the plan, or refuse a rerun that would mix other URLs or settings into done shards."""
    plan = {"settings": settings, "shards": [_fingerprint(s) for s in shards]}
    path = storage.join(raw_url, raw.PLAN)
    if storage.exists(path) and done:
        recorded = storage.read_json(path)
        for key, value in settings.items():
            if recorded["settings"].get(key) != value:
                raise url_list.UrlListError(
                    f"'{raw_url}' was ingested with ingest.{key}={recorded['settings'].get(key)!r}, now {value!r}; "
                    "ingest into a new root (or remove it) to change it"
                )
        for shard_id in sorted(done):
            if shard_id >= len(plan["shards"]) or shard_id >= len(recorded["shards"]) or recorded["shards"][shard_id] != plan["shards"][shard_id]:
                raise url_list.UrlListError(
                    f"'{raw_url}' holds shard {raw.shard_name(shard_id)} of another URL list, shard size or filter set; "
                    "ingest into a new root (or remove it) to start over"
                )
    storage.write_json(path, plan)


def plan_settings(cfg: IngestConfig) -> dict[str, Any]:
    """Settings that change what a shard holds; a rerun must keep them."""
    keys = ("shard_size", "image_size", "resize_mode", "encode_format", "encode_quality")
    return {**{k: getattr(cfg, k) for k in keys}, **filters.filter_settings(cfg.filters)}


def deduplicate(raw_url: str, shard_ids: list[int]) -> pa.Table:
    """Write _duplicates.parquet for the whole data set; returns it."""

    def downloaded(shard_id: int) -> pa.Table:
        t = raw.read_status(raw_url, shard_id, ["uid", "sha256", "status"])
        t = t.append_column("row", pa.array(range(len(t)), pa.int64()))
        t = t.filter(pc.equal(t["status"], "success"))
        return t.append_column("shard", pa.array([shard_id] * len(t), pa.int64())).drop_columns(["status"])

    with ThreadPoolExecutor(8) as pool:
        tables = list(pool.map(downloaded, shard_ids))
    duplicates = filters.find_duplicates(pa.concat_tables(tables) if tables else pa.table({}))
    buf = io.BytesIO()
    pq.write_table(duplicates, buf)
    storage.write_bytes(storage.join(raw_url, raw.DUPLICATES), buf.getvalue())
    return duplicates


def summarize(raw_url: str, input_rows: int, prefiltered: dict[str, int], duplicates: int, this_run: dict[str, Any]) -> dict[str, Any]:
    """Totals over every complete shard, including those of earlier runs."""
    totals: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    filtered_after: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    shards = raw.complete_shards(raw_url)
    for shard_id in shards:
        stats = storage.read_json(raw.shard_file(raw_url, shard_id, raw.STATS_SUFFIX))
        totals["attempted"] += stats["count"]
        totals["successes"] += stats["successes"]
        totals["downloaded"] += stats["count"] - stats["failed_to_download"]
        reasons, rules = filters.summarize_messages(stats["status_dict"])
        failed.update(reasons)
        filtered_after.update(rules)
        messages.update({m: n for m, n in stats["status_dict"].items() if m != "success"})
    if duplicates:
        filtered_after["duplicate_content"] = duplicates
    fs, path = storage.url_to_fs(raw_url)
    sizes = [e["size"] for e in fs.ls(path, detail=True) if e["name"].endswith((".tar", ".parquet")) and e["type"] == "file"]
    wall = this_run["wall_s"]
    return {
        "input_rows": input_rows,
        "filtered_before_download": dict(sorted(prefiltered.items())),
        "shards": len(shards),
        "attempted": totals["attempted"],
        "downloaded": totals["downloaded"],
        "failed": sum(failed.values()),
        "failed_by_reason": dict(failed.most_common()),
        "filtered_after_download": dict(filtered_after.most_common()),
        "kept": totals["successes"] - duplicates,
        "bytes": sum(sizes),
        "wall_s": round(wall, 2),
        "images_per_s": round(this_run["successes"] / wall, 1) if wall > 0 else None,
        "this_run": this_run,
        "top_error_messages": dict(messages.most_common(10)),
    }


def format_table(summary: dict[str, Any]) -> str:
    rows = [("input rows", summary["input_rows"])]
    rows += [(f"  filtered: {k}", v) for k, v in summary["filtered_before_download"].items()]
    rows += [("attempted", summary["attempted"]), ("downloaded", summary["downloaded"])]
    rows += [(f"  failed: {k}", v) for k, v in summary["failed_by_reason"].items()]
    rows += [(f"  filtered: {k}", v) for k, v in summary["filtered_after_download"].items()]
    rows += [("kept", summary["kept"]), ("bytes", summary["bytes"]), ("shards", summary["shards"])]
    rows += [("wall time (s)", summary["wall_s"]), ("images/s (this run)", summary["images_per_s"])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v:>12,}" if isinstance(v, int) else f"  {k:<{width}}  {v!s:>12}" for k, v in rows)


def run(cfg: IngestConfig, ray_cfg: RayConfig, raw_url: str, config_yaml: str, log=print) -> dict[str, Any]:
    """Download `cfg.url_list` into `raw_url`; complete shards of an earlier run are kept."""
    started = time.time()
    if not cfg.url_list:
        raise url_list.UrlListError("config key 'ingest.url_list': no URL list given")
    table = url_list.read(cfg.url_list, cfg.input_format, cfg.url_col, cfg.caption_col)
    table, prefiltered = filters.apply_metadata_filters(table, cfg.filters)
    shards = [table.slice(start, cfg.shard_size) for start in range(0, len(table), cfg.shard_size)]
    input_rows = len(table) + sum(prefiltered.values())

    storage.makedirs(raw_url)
    storage.remove_stale_temporaries(raw_url)
    storage.remove(storage.join(raw_url, raw.SUMMARY))  # it comes back when this run is complete
    storage.write_text(storage.join(raw_url, raw.CONFIG), config_yaml)
    done = set(raw.complete_shards(raw_url))
    check_plan(raw_url, shards, done, plan_settings(cfg))
    todo = [i for i in range(len(shards)) if i not in done]
    log(f"ingest: {input_rows:,} URLs, {sum(prefiltered.values()):,} filtered before download -> "
        f"{len(shards)} shards of <= {cfg.shard_size}; {len(done)} already complete")  # fmt: skip
    this_run = _download(todo, shards, raw_url, cfg, ray_cfg, started, log) if todo else {"shards": 0, "successes": 0}
    this_run["wall_s"] = round(time.time() - started, 2)

    shard_ids = raw.complete_shards(raw_url)
    duplicates = len(deduplicate(raw_url, shard_ids)) if cfg.filters.dedup_content else 0
    summary = summarize(raw_url, input_rows, prefiltered, duplicates, this_run)
    storage.write_json(storage.join(raw_url, raw.SUMMARY), summary)
    log("ingest: summary\n" + format_table(summary))
    return summary


def _download(
    todo: list[int], shards: list[pa.Table], raw_url: str, cfg: IngestConfig, ray_cfg: RayConfig, started: float, log
) -> dict[str, Any]:
    import ray

    from data_pipeline.ray_runtime import ray_session

    with ray_session(ray_cfg) as dashboard:
        if dashboard:
            log(f"ingest: Ray dashboard {dashboard}")
        task = ray.remote(num_cpus=cfg.processes_per_task, max_retries=2)(_download_group)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        limit = cfg.max_in_flight or max(1, cpus // cfg.processes_per_task)
        groups = [todo[i : i + cfg.processes_per_task] for i in range(0, len(todo), cfg.processes_per_task)]
        pending: dict[Any, list[int]] = {}
        failed: dict[int, str] = {}
        finished = successes = attempted = 0
        last_report = time.time()
        while groups or pending:
            while groups and len(pending) < limit:
                group = groups.pop(0)
                pending[task.remote([(i, shards[i]) for i in group], raw_url, cfg)] = group
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=cfg.progress_every_s)
            for ref in ready:
                group = pending.pop(ref)
                try:
                    results = ray.get(ref)
                except Exception as err:  # one bad shard must not cost the others their work
                    cause = getattr(err, "cause", None) or err
                    failed.update({i: f"{type(cause).__name__}: {cause}" for i in group})
                    log(f"ingest: shards {[raw.shard_name(i) for i in group]} failed: {failed[group[0]]}")
                    continue
                finished += len(results)
                successes += sum(r["successes"] for r in results)
                attempted += sum(r["count"] for r in results)
            if time.time() - last_report >= cfg.progress_every_s or not (groups or pending):
                elapsed = max(time.time() - started, 1e-9)
                log(f"ingest: {finished}/{len(todo)} shards, {successes:,}/{attempted:,} kept "
                    f"({100 * successes / max(attempted, 1):.0f}% success), {successes / elapsed:,.0f} images/s")  # fmt: skip
                last_report = time.time()
    if failed:
        raise IngestIncomplete(
            f"ingest: {len(failed)} shards failed ({', '.join(raw.shard_name(i) for i in sorted(failed)[:5])}...): "
            f"{next(iter(failed.values()))}; the {finished} complete shards are kept, rerun to retry the rest"
        )
    return {"shards": finished, "successes": successes}
