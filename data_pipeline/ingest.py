"""`unclip ingest`: download a URL list into ROOT/raw/ with img2dataset, one Ray task per shard.

We plan and commit shards ourselves instead of calling `img2dataset.download` with its Ray
distributor, because we need what it does not give: keys that are a function of the URL (so
every later stage and every rerun agree), filters and URL dedup over the whole list before any
download, content dedup over the whole data set after, and shards that appear only complete.
Each task still runs img2dataset's own `Downloader`, so downloading, resizing and the
per-sample status are exactly img2dataset's. The layout is in data_pipeline/raw.py.

The driver holds counts and file names only; everything that grows with the list runs in tasks:
planning (data_pipeline/plan.py), downloads (a shard's input is a row range of plan files),
content dedup (data_pipeline/content_dedup.py) and reading earlier shards' stats.
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import os
import posixpath
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import ray

from data_pipeline import content_dedup, fetch_guard, filters, plan, plan_run, raw, ray_wait, tasks, url_list
from data_pipeline.config import IngestConfig, RayConfig
from data_pipeline.ray_runtime import ray_session
from models.base import storage
from models.base.errors import JobFailed, StorageUnavailable

MESSAGES_KEPT = 1000  # distinct error messages the totals keep (they can name hosts: unbounded)
STATS_PER_TASK = 512  # earlier shards' stats files one reading task aggregates


class IngestIncomplete(JobFailed):
    pass


def download_shard(
    shard_id: int, inputs: list[tuple[str, int, int]], raw_url: str, cfg: IngestConfig
) -> dict[str, Any]:
    """One img2dataset Downloader over one shard, written beside the destination, then committed;
    `inputs` are the plan's rows files and row ranges that hold the shard (`plan.Plan.shard_inputs`)."""
    from img2dataset.downloader import (
        Downloader,
    )  # lazy: img2dataset (albumentations, OpenCV) in the download tasks only, not the driver
    from img2dataset.writer import WebDatasetSampleWriter

    rows = plan.read_shard(inputs)
    fetch_guard.install(cfg.allow_networks)  # every request of this process: browser URLs, no blocked network
    name = raw.shard_name(shard_id)
    staging = storage.join(raw_url, raw.STAGING, f"{name}-{uuid.uuid4().hex[:8]}")
    storage.makedirs(staging)
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=filters.make_resizer(
            cfg.image_size, cfg.resize_mode, cfg.encode_format, cfg.encode_quality, cfg.filters
        ),
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
        user_agent_token=cfg.user_agent_token,
        disallowed_header_directives=cfg.disallowed_header_directives or None,
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            input_file = os.path.join(tmp, "input.arrow")
            with pa.OSFile(input_file, "wb") as sink, pa.ipc.new_file(sink, rows.schema) as writer:
                writer.write_table(rows)
            # download_shard raises on failure (Downloader.__call__ would swallow it)
            downloader.download_shard((shard_id, input_file))
        fs, staged = storage.url_to_fs(staging)
        size = sum(int(fs.size(posixpath.join(staged, name + suffix)) or 0) for suffix in (".tar", ".parquet"))
        stats = storage.read_json(storage.join(staging, name + raw.STATS_SUFFIX))
        for suffix in (".tar", ".parquet", raw.STATS_SUFFIX):  # the stats file last: it is the marker
            storage.move(storage.join(staging, name + suffix), raw.shard_file(raw_url, shard_id, suffix))
        return {"shard": shard_id, "bytes": size, **_counted(stats)}
    finally:
        storage.remove(staging)


def _counted(stats: dict[str, Any]) -> dict[str, Any]:
    """The part of img2dataset's stats the totals need."""
    return {k: stats[k] for k in ("count", "successes", "failed_to_download", "status_dict")}


def _download_group(shards: list[tuple[int, list]], raw_url: str, cfg: IngestConfig) -> list[dict[str, Any]]:
    """A Ray task: its shards one after another, or side by side in `processes_per_task` processes."""
    if len(shards) == 1:
        return [download_shard(shards[0][0], shards[0][1], raw_url, cfg)]
    with multiprocessing.get_context("spawn").Pool(len(shards)) as pool:
        return pool.starmap(download_shard, [(i, inputs, raw_url, cfg) for i, inputs in shards])


class Totals:
    """Running counts over complete shards: what the progress file and the summary say."""

    def __init__(self) -> None:
        self.shards = self.attempted = self.successes = self.downloaded = self.bytes = 0
        self.failed: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.filtered: Counter[str] = Counter()
        self.messages: Counter[str] = Counter()

    def add(self, stats: dict[str, Any]) -> None:
        """One shard's stats, as `_counted` gives them, plus its bytes."""
        self.shards += 1
        self.attempted += stats["count"]
        self.successes += stats["successes"]
        self.downloaded += stats["count"] - stats["failed_to_download"]
        self.bytes += stats.get("bytes", 0)
        outcomes = filters.summarize_messages(stats["status_dict"])
        self.failed.update(outcomes.failed)
        self.refused.update(outcomes.refused)
        self.filtered.update(outcomes.filtered)
        self._keep_messages({m: n for m, n in stats["status_dict"].items() if m != "success"})

    def merge(self, other: Totals) -> None:
        for name in ("shards", "attempted", "successes", "downloaded", "bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failed.update(other.failed)
        self.refused.update(other.refused)
        self.filtered.update(other.filtered)
        self._keep_messages(other.messages)

    def _keep_messages(self, messages: dict[str, int]) -> None:
        self.messages.update(messages)
        if len(self.messages) > 2 * MESSAGES_KEPT:  # the most common stay exact enough for a top 10
            self.messages = Counter(dict(self.messages.most_common(MESSAGES_KEPT)))

    def progress(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "attempted": self.attempted,
            "downloaded": self.downloaded,
            "successes": self.successes,
            "bytes": self.bytes,
            "failed_by_reason": dict(self.failed.most_common()),
            "refused_by_reason": dict(self.refused.most_common()),
            "filtered_after_download": dict(self.filtered.most_common()),
        }


def read_stats(raw_url: str, shard_ids: list[int]) -> Totals:
    """A Ray task: the summed stats of some complete shards (each file read once, in parallel)."""
    totals = Totals()
    with ThreadPoolExecutor(tasks.READ_THREADS) as pool:
        for stats in pool.map(lambda i: storage.read_json(raw.shard_file(raw_url, i, raw.STATS_SUFFIX)), shard_ids):
            totals.add(_counted(stats))
    return totals


def plan_settings(cfg: IngestConfig) -> dict[str, Any]:
    """Settings that change what a shard holds; a rerun must keep them."""
    keys = ("shard_size", "image_size", "resize_mode", "encode_format", "encode_quality")
    metadata = {f"filters.{k}": v for k, v in dataclasses.asdict(cfg.filters).items() if k != "dedup_content"}
    return {**{k: getattr(cfg, k) for k in keys}, **metadata}


def crawl_policy(cfg: IngestConfig) -> dict[str, Any]:
    """What this run's downloads honoured and refused, as the summary records it."""
    return {
        "opt_outs": (
            f"honoured: X-Robots-Tag {', '.join(cfg.disallowed_header_directives)} (for all agents and for "
            f"{cfg.user_agent_token!r})"
            if cfg.disallowed_header_directives
            else OPT_OUTS_IGNORED
        ),
        "user_agent_token": cfg.user_agent_token,
        "blocked_networks": "loopback, private, link-local, shared, multicast and reserved addresses",
        "allow_networks": list(cfg.allow_networks),
    }


OPT_OUTS_IGNORED = (
    "IGNORED: ingest.disallowed_header_directives is empty, so pictures whose owners refuse AI use were downloaded"
)
DNS_HINT_SHARE = 0.05  # of attempts failing to resolve their host, above which the summary points at DNS


def dns_hint(attempted: int, dns_failures: int) -> str | None:
    if attempted and dns_failures > DNS_HINT_SHARE * attempted:
        return (
            f"{dns_failures:,} of {attempted:,} attempts ({100 * dns_failures / attempted:.0f}%) failed to resolve "
            "their host: run a caching resolver on every node (infra/README.md, 'DNS')"
        )
    return None


def summarize(
    planned: plan.Plan,
    totals: Totals,
    duplicates: int,
    dedup_content: bool,
    this_run: dict[str, Any],
    crawl: dict[str, Any],
) -> dict[str, Any]:
    """Totals over every complete shard, including those of earlier runs."""
    filtered_after = Counter(totals.filtered)
    if duplicates:
        filtered_after["duplicate_content"] = duplicates
    wall = this_run["wall_s"]
    return {
        "input_rows": planned.input_rows,
        "filtered_before_download": dict(sorted(planned.filtered.items())),
        "shards": totals.shards,
        "attempted": totals.attempted,
        "downloaded": totals.downloaded,
        "failed": sum(totals.failed.values()),
        "failed_by_reason": dict(totals.failed.most_common()),
        "refused": sum(totals.refused.values()),
        "refused_by_reason": dict(totals.refused.most_common()),
        "filtered_after_download": dict(filtered_after.most_common()),
        "kept": totals.successes - duplicates,
        "dedup_content": dedup_content,
        "bytes": totals.bytes,
        "wall_s": round(wall, 2),
        "images_per_s": round(this_run["successes"] / wall, 1) if wall > 0 else None,
        "this_run": this_run,
        "plan": {
            "pieces": len(planned.spec.pieces),
            "url_buckets": planned.spec.buckets,
            "largest_task_rss_mb": round(planned.peak_task_rss / 2**20),
        },
        "top_error_messages": dict(totals.messages.most_common(10)),
        "crawl": crawl,
        "hint": dns_hint(totals.attempted, totals.failed.get("dns", 0)),
    }


def format_table(summary: dict[str, Any]) -> str:
    rows = [("input rows", summary["input_rows"])]
    rows += [(f"  filtered: {k}", v) for k, v in summary["filtered_before_download"].items()]
    rows += [("attempted", summary["attempted"]), ("downloaded", summary["downloaded"])]
    rows += [(f"  failed: {k}", v) for k, v in summary["failed_by_reason"].items()]
    rows += [(f"  refused: {k}", v) for k, v in summary["refused_by_reason"].items()]
    rows += [(f"  filtered: {k}", v) for k, v in summary["filtered_after_download"].items()]
    rows += [("kept", summary["kept"]), ("bytes", summary["bytes"]), ("shards", summary["shards"])]
    rows += [("wall time (s)", summary["wall_s"]), ("images/s (this run)", summary["images_per_s"])]
    width = max(len(k) for k, _ in rows)
    table = "\n".join(
        f"  {k:<{width}}  {v:>12,}" if isinstance(v, int) else f"  {k:<{width}}  {v!s:>12}" for k, v in rows
    )
    notes = [summary["crawl"]["opt_outs"]] if summary["crawl"]["opt_outs"] == OPT_OUTS_IGNORED else []
    notes += [f"hint: {summary['hint']}"] if summary["hint"] else []
    return "\n".join([table, *(f"  {note}" for note in notes)])


def run(cfg: IngestConfig, ray_cfg: RayConfig, raw_url: str, config_yaml: str, log=print) -> dict[str, Any]:
    """Download `cfg.url_list` into `raw_url`; complete shards of an earlier run are kept."""
    started = time.time()
    if not cfg.url_list:
        raise url_list.UrlListError("config key 'ingest.url_list': no URL list given")
    storage.makedirs(raw_url)
    crawl = crawl_policy(cfg)
    if not cfg.disallowed_header_directives:
        log(f"ingest: opt-outs {OPT_OUTS_IGNORED}")
    folder = raw.scan_folder(raw_url)  # the one listing of ROOT/raw/ in this run
    for name in folder.temporaries:
        storage.remove(storage.join(raw_url, name))
    with ray_session(ray_cfg) as dashboard:
        if dashboard:
            log(f"ingest: Ray dashboard {dashboard}")
        spec = plan.prepare(cfg, raw_url, plan_settings(cfg), folder.complete, log)
        storage.remove(storage.join(raw_url, raw.SUMMARY))  # it comes back when this run is complete
        storage.write_text(storage.join(raw_url, raw.CONFIG), config_yaml)
        planned = plan_run.execute(spec, log, cfg.progress_every_s)
        done = [i for i in folder.complete if i < planned.shards]
        log(
            f"ingest: {planned.input_rows:,} URLs, {sum(planned.filtered.values()):,} filtered before download -> "
            f"{planned.shards} shards of <= {cfg.shard_size}; {len(done)} already complete"
        )
        totals = _earlier_totals(raw_url, done, folder.complete_bytes, log, cfg.progress_every_s)
        todo = sorted(set(range(planned.shards)) - set(done))
        this_run: dict[str, Any] = (
            _download(todo, planned, totals, raw_url, cfg, started, log) if todo else {"shards": 0, "successes": 0}
        )
        # Every download task has ended: what staging remains is that of tasks that died with their
        # node (Ray ran them again elsewhere), all under one folder, removed without listing ROOT/raw/.
        storage.remove(storage.join(raw_url, raw.STAGING))
        this_run["wall_s"] = round(time.time() - started, 2)
        duplicates = 0
        if cfg.filters.dedup_content and planned.shards:
            chosen = content_dedup.layout(
                raw_url, planned.shards, planned.kept, cfg.plan_task_rows, cfg.shard_size, cfg.dedup_bucket_rows
            )
            duplicates = content_dedup.run(raw_url, chosen, log, cfg.progress_every_s)["duplicates"]
    summary = summarize(planned, totals, duplicates, cfg.filters.dedup_content, this_run, crawl)
    storage.write_json(storage.join(raw_url, raw.SUMMARY), summary)
    log("ingest: summary\n" + format_table(summary))
    return summary


def _earlier_totals(
    raw_url: str, shard_ids: list[int], complete_bytes: int, log=print, progress_every_s: float = 5.0
) -> Totals:
    """The stats of shards complete before this run, read in tasks of STATS_PER_TASK files."""
    totals = Totals()
    need = ray_wait.Need("stats task", {"CPU": 0.5})
    task = ray.remote(**need.options())(read_stats)
    refs = [task.remote(raw_url, shard_ids[i : i + STATS_PER_TASK]) for i in range(0, len(shard_ids), STATS_PER_TASK)]
    waiter = ray_wait.Waiter(
        "ingest",
        log,
        progress=lambda: f"ingest: stats of {totals.shards}/{len(shard_ids)} earlier shards read",
        kept=lambda: "the complete shards are kept: rerun `unclip ingest` once the cluster can run the tasks",
        progress_every_s=progress_every_s,
    )
    while refs:  # merged as they come: the driver holds one batch's totals at a time
        ready = waiter.wait(refs, need)
        refs = [r for r in refs if r != ready[0]]
        totals.merge(ray.get(ready[0]))
    totals.bytes = complete_bytes  # from the run's one listing; the stats files do not carry it
    return totals


def _download(
    todo: list[int], planned: plan.Plan, totals: Totals, raw_url: str, cfg: IngestConfig, started: float, log
) -> dict[str, Any]:
    need = ray_wait.Need("download task", {"CPU": cfg.processes_per_task})
    task = ray.remote(**need.options(), max_retries=2)(_download_group)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    limit = cfg.max_in_flight or max(1, cpus // cfg.processes_per_task)
    groups = collections.deque(
        todo[i : i + cfg.processes_per_task] for i in range(0, len(todo), cfg.processes_per_task)
    )
    pending: dict[Any, list[int]] = {}
    failed: dict[int, str] = {}
    finished = successes = attempted = 0

    def progress() -> str:
        storage.write_json(storage.join(raw_url, raw.PROGRESS), {"shards_planned": planned.shards, **totals.progress()})
        elapsed = max(time.time() - started, 1e-9)
        return (
            f"ingest: {finished}/{len(todo)} shards, {successes:,}/{attempted:,} kept "
            f"({100 * successes / max(attempted, 1):.0f}% success), {successes / elapsed:,.0f} images/s"
        )

    waiter = ray_wait.Waiter(
        "ingest",
        log,
        progress,
        kept=lambda: (
            f"the {finished} shards complete in this run and those before it are kept: rerun `unclip ingest` once "
            "the cluster can run them"
        ),
        progress_every_s=cfg.progress_every_s,
    )
    while groups or pending:
        while groups and len(pending) < limit:
            group = groups.popleft()
            pending[task.remote([(i, planned.shard_inputs(i)) for i in group], raw_url, cfg)] = group
        ready = waiter.wait(pending, need, queued=len(groups))
        for ref in ready:
            group = pending.pop(ref)
            try:
                results = ray.get(ref)
            except Exception as err:  # one bad shard must not cost the others their work
                cause = getattr(err, "cause", None) or err
                if isinstance(cause, StorageUnavailable):  # every other shard would meet it too: stop now
                    for other in pending:
                        ray.cancel(other, force=True)
                    raise cause from None
                failed.update({i: f"{type(cause).__name__}: {cause}" for i in group})
                log(f"ingest: shards {[raw.shard_name(i) for i in group]} failed: {failed[group[0]]}")
                continue
            for result in results:
                totals.add(result)
            finished += len(results)
            successes += sum(r["successes"] for r in results)
            attempted += sum(r["count"] for r in results)
        if groups or pending:
            waiter.report_if_due()
        else:
            waiter.report()
    if failed:
        raise IngestIncomplete(
            f"ingest: {len(failed)} shards failed ({', '.join(raw.shard_name(i) for i in sorted(failed)[:5])}...): "
            f"{next(iter(failed.values()))}; the {finished} complete shards are kept, rerun to retry the rest"
        )
    return {"shards": finished, "successes": successes}
