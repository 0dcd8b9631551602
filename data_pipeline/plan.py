"""Planning an ingest in Ray tasks: the URL list -> shard inputs, filtered and URL-deduplicated.

No process reads the whole list. The driver lists the list's files and reads parquet footers;
every row is read by tasks, a piece (a file, or a run of its row groups) each:

  1. scan    per piece: read the URL, caption and filter columns; decide every rule a row decides
             alone; write the sha256 of each URL, bucketed (data_pipeline/dedup.py).
  2. urldup  per bucket: the repeated URLs; the first occurrence in list order is kept.
  3. rows    per piece: read the piece again, every column; write its kept rows with their
             uid: these are the shard inputs.

Shard s holds kept rows [s * shard_size, (s + 1) * shard_size) in list order, as it did when
one process planned everything; `Plan.shard_inputs` says which row range of which rows file
holds them, so a download task receives file names, never a table.

Under ROOT/raw/_plan/ (each task's marker, NNNNN.json, is written after its data file):
  plan.json                  the list's files, the settings, the pieces, the bucket count
  scan/NNNNN-RRRR.parquet    piece N's URL keys (sha256, order, rule code) in runs R of about
                             `ingest.plan_task_rows` rows; row group b = bucket b
  urldup/NNNNN.parquet       bucket N's repeated URLs: order, the rule code they had
  rows/NNNNN.parquet         piece N's kept rows, in list order: the shard inputs
A rerun with the same list and settings reuses plan.json and every committed task; another
list or other settings are refused once a shard is complete, and replanned before that.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.exceptions

from data_pipeline import dedup, filters, raw, tasks, url_list
from data_pipeline.config import IngestConfig, IngestFilters
from data_pipeline.url_list import NON_UTF8, UrlListError
from models.base import storage

PLAN_DIR = "_plan"
VERSION = 1
MIN_ROW_GROUP = 4096  # rows files: row groups of max(shard_size, this) rows
KEPT = "kept"  # the counts' name for rows no rule drops


@dataclasses.dataclass(frozen=True)
class ListFile:
    url: str
    format: str
    rows: int
    url_col: str
    caption_col: str | None


@dataclasses.dataclass(frozen=True)
class Piece:
    file: int
    row_groups: tuple[int, ...] | None  # parquet: the row groups it reads; None: the whole file


@dataclasses.dataclass(frozen=True)
class Spec:
    """What every planning task needs; put in Ray's object store once."""

    plan_url: str
    files: tuple[ListFile, ...]
    pieces: tuple[Piece, ...]
    buckets: int
    schema: pa.Schema  # the shard inputs': url, caption, uid, then the list's other columns
    filters: IngestFilters  # resolved against the list's columns
    shard_size: int
    task_rows: int  # rows a planning task holds at once

    def folder(self, step: str) -> str:
        return storage.join(self.plan_url, step)

    def file(self, step: str, index: int) -> str:
        return storage.join(self.plan_url, step, f"{index:05d}.parquet")

    def key_file(self, piece: int, run: int) -> str:
        return storage.join(self.plan_url, "scan", f"{piece:05d}-{run:04d}.parquet")


@dataclasses.dataclass
class Plan:
    spec: Spec
    input_rows: int = 0
    filtered: dict[str, int] = dataclasses.field(default_factory=dict)
    kept_per_piece: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    peak_task_rss: int = 0

    @property
    def kept(self) -> int:
        return int(self.kept_per_piece.sum())

    @property
    def shards(self) -> int:
        return -(-self.kept // self.spec.shard_size)

    @functools.cached_property
    def _piece_ends(self) -> np.ndarray:
        return np.cumsum(self.kept_per_piece)

    def shard_inputs(self, shard: int) -> list[tuple[str, int, int]]:
        """(rows file, first row, end row) of each piece holding shard `shard`'s rows, in order."""
        size = self.spec.shard_size
        start, stop = shard * size, min((shard + 1) * size, self.kept)
        ends = self._piece_ends
        begins = ends - self.kept_per_piece
        first, last = np.searchsorted(ends, start, side="right"), np.searchsorted(begins, stop, side="left")
        return [
            (self.spec.file("rows", int(p)), int(max(start - begins[p], 0)), int(min(stop, ends[p]) - begins[p]))
            for p in range(first, last)
            if self.kept_per_piece[p]
        ]


def identity(cfg: IngestConfig, settings: dict[str, Any]) -> dict[str, Any]:
    """What a plan was made from: the settings and each list file's name, size and version."""
    files = url_list.list_files(cfg.url_list, cfg.input_format)

    def described(url: str) -> dict[str, Any]:
        fs, path = storage.url_to_fs(url)
        info = fs.info(path)
        stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("updated")
        return {"url": url, "size": info.get("size"), "stamp": str(stamp)}

    with ThreadPoolExecutor(tasks.READ_THREADS) as pool:
        listed = list(pool.map(described, files))
    columns = {"input_format": cfg.input_format, "url_col": cfg.url_col, "caption_col": cfg.caption_col}
    return {"settings": {**settings, **columns}, "files": listed}


def prepare(cfg: IngestConfig, raw_url: str, settings: dict[str, Any], complete: list[int], log) -> Spec:
    """The plan of `cfg.url_list`: reused when an earlier run made it from the same list and
    settings; refused when it did not and shards are complete; else made anew (no row read yet)."""
    plan_url = storage.join(raw_url, PLAN_DIR)
    header_url = storage.join(plan_url, "plan.json")
    wanted = identity(cfg, settings)
    recorded = storage.read_json(header_url) if storage.exists(header_url) else None
    if recorded and recorded["version"] == VERSION and recorded["identity"] == wanted:
        spec = _from_header(recorded, plan_url, cfg)
        log(
            f"ingest: plan of {len(spec.files)} list files reused "
            f"({len(spec.pieces)} pieces, {spec.buckets} URL buckets)"
        )
        return spec
    if complete:
        _refuse(raw_url, recorded, wanted, complete)
    for stale in (plan_url, storage.join(raw_url, raw.DEDUP_DIR)):
        storage.remove(stale)
    spec = _new_spec(cfg, wanted, plan_url)
    storage.write_json(header_url, _header(spec, wanted, cfg))
    return spec


def _refuse(raw_url: str, recorded: dict | None, wanted: dict, complete: list[int]) -> None:
    shards = f"{len(complete)} complete shards ({raw.shard_name(complete[0])}, ...)"
    if recorded is None or recorded.get("version") != VERSION:
        raise UrlListError(
            f"'{raw_url}' holds {shards} planned by another version of unclip ingest; ingest into a new root"
        )
    old, new = recorded["identity"]["settings"], wanted["settings"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise UrlListError(
                f"'{raw_url}' was ingested with ingest.{key}={old.get(key)!r}, now {new.get(key)!r}; "
                "ingest into a new root (or remove it) to change it"
            )
    before = {f["url"]: f for f in recorded["identity"]["files"]}
    now = {f["url"]: f for f in wanted["files"]}
    differences = [f"{u} is new" for u in now if u not in before] + [f"{u} is gone" for u in before if u not in now]
    differences += [
        f"{u} changed (size {before[u]['size']} -> {now[u]['size']}, version {before[u]['stamp']} -> {now[u]['stamp']})"
        for u in now
        if u in before and now[u] != before[u]
    ]
    changed = differences[0] if differences else "its files changed"
    raise UrlListError(
        f"'{raw_url}' holds {shards} of another URL list ({changed}); "
        "ingest into a new root (or remove it) to start over"
    )


def _new_spec(cfg: IngestConfig, wanted: dict[str, Any], plan_url: str) -> Spec:
    """Files, columns and pieces, from parquet footers (text files: a task parses each)."""
    urls = [f["url"] for f in wanted["files"]]
    described = _describe_files(urls, cfg)
    total = sum(rows for _, rows, _, _ in described)
    if total == 0:
        raise UrlListError(f"URL list '{cfg.url_list}': no rows")
    schema = pa.unify_schemas([s for *_, s in described], promote_options="permissive")
    resolved = filters.resolve(cfg.filters, schema)
    files, pieces = [], []
    for index, (url, rows, groups, normalized) in enumerate(described):
        url_col, caption_col = _columns_of(normalized)
        files.append(ListFile(url, url_list.format_of(url, cfg.input_format), rows, url_col, caption_col))
        pieces += (
            [Piece(index, g) for g in _split(groups, cfg.plan_task_rows)]
            if groups is not None
            else [Piece(index, None)]
            if rows
            else []
        )
    return Spec(
        plan_url,
        tuple(files),
        tuple(pieces),
        dedup.bucket_count(total, cfg.dedup_bucket_rows),
        shard_schema(schema),
        resolved,
        cfg.shard_size,
        cfg.plan_task_rows,
    )


def _describe_files(urls: list[str], cfg: IngestConfig) -> list[tuple[str, int, list[int] | None, pa.Schema]]:
    """(url, rows, parquet row-group sizes or None, normalized schema with the source columns in
    its metadata) of each file, in list order."""

    def parquet(url: str):
        groups, schema = url_list.parquet_row_groups(url)
        return url, sum(groups), groups, _normalized_schema(schema.empty_table(), url, cfg)

    text = [u for u in urls if url_list.format_of(u, cfg.input_format) != "parquet"]
    refs = {u: ray.remote(num_cpus=1)(_describe_text).remote(u, cfg) for u in text}
    with ThreadPoolExecutor(tasks.READ_THREADS) as pool:
        footers = dict(
            zip(
                [u for u in urls if u not in refs],
                pool.map(parquet, [u for u in urls if u not in refs]),
                strict=True,
            )
        )
    out = []
    for url in urls:
        if url in refs:
            try:
                rows, schema = ray.get(refs[url])
            except ray.exceptions.RayTaskError as err:
                tasks.raise_cause(err)
            out.append((url, rows, None, schema))
        else:
            out.append(footers[url])
    return out


def _describe_text(url: str, cfg: IngestConfig) -> tuple[int, pa.Schema]:
    table = url_list.read_file(url, cfg.input_format, cfg.caption_col)
    return len(table), _normalized_schema(table.slice(0, 0), url, cfg)


def _normalized_schema(empty: pa.Table, url: str, cfg: IngestConfig) -> pa.Schema:
    src_url, src_caption = url_list.source_columns(empty.column_names, url, cfg.url_col, cfg.caption_col)
    schema = url_list.normalize(empty, url, src_url, src_caption).schema
    return schema.with_metadata({b"url_col": src_url.encode(), b"caption_col": (src_caption or "").encode()})


def _columns_of(schema: pa.Schema) -> tuple[str, str | None]:
    meta = schema.metadata
    return meta[b"url_col"].decode(), meta[b"caption_col"].decode() or None


def shard_schema(unified: pa.Schema) -> pa.Schema:
    fields = [f for f in unified.remove_metadata() if f.name != NON_UTF8]
    return pa.schema([*fields[:2], pa.field("uid", pa.string()), *fields[2:]])


def _split(groups: list[int], task_rows: int) -> list[tuple[int, ...]]:
    """Consecutive row groups, as pieces of at most `task_rows` rows (a larger group alone)."""
    pieces: list[list[int]] = []
    rows = 0
    for g, n in enumerate(groups):
        if not pieces or rows + n > task_rows:
            pieces.append([])
            rows = 0
        pieces[-1].append(g)
        rows += n
    return [tuple(p) for p in pieces if sum(groups[g] for g in p) > 0]


def _header(spec: Spec, wanted: dict[str, Any], cfg: IngestConfig) -> dict[str, Any]:
    return {
        "version": VERSION,
        "identity": wanted,
        "files": [dataclasses.asdict(f) for f in spec.files],
        "pieces": [[p.file, list(p.row_groups) if p.row_groups is not None else None] for p in spec.pieces],
        "buckets": spec.buckets,
        "schema": base64.b64encode(spec.schema.serialize().to_pybytes()).decode(),
        "layout": {"plan_task_rows": cfg.plan_task_rows, "dedup_bucket_rows": cfg.dedup_bucket_rows},
    }


def _from_header(header: dict[str, Any], plan_url: str, cfg: IngestConfig) -> Spec:
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(header["schema"])))
    pieces = tuple(Piece(f, tuple(g) if g is not None else None) for f, g in header["pieces"])
    # the filters resolve against the list's columns as they did when the plan was made
    unified = pa.schema([f for f in schema if f.name != "uid"])
    files = tuple(ListFile(**f) for f in header["files"])
    return Spec(
        plan_url,
        files,
        pieces,
        header["buckets"],
        schema,
        filters.resolve(cfg.filters, unified),
        cfg.shard_size,
        header["layout"]["plan_task_rows"],
    )


def execute(spec: Spec, log, progress_every_s: float = 5.0) -> Plan:
    """Run (or finish) the three steps; returns the counts and the kept rows of every piece."""
    ref = ray.put(spec)
    pieces, buckets = len(spec.pieces), spec.buckets
    scanned = tasks.run_stage(
        "plan: scan", spec.folder("scan"), scan_piece, lambda i: (ref, i), pieces, log, progress_every_s
    )
    key_files = ray.put([spec.key_file(i, run) for i in range(pieces) for run in range(len(scanned[i]["run_starts"]))])
    repeated = tasks.run_stage(
        "plan: URL dedup",
        spec.folder("urldup"),
        dedup_bucket,
        lambda b: (ref, b, key_files),
        buckets,
        log,
        progress_every_s,
    )
    written = tasks.run_stage(
        "plan: shard inputs",
        spec.folder("rows"),
        write_rows,
        lambda i: (ref, i, scanned[i]),
        pieces,
        log,
        progress_every_s,
    )

    counts: Counter[str] = Counter()
    for result in scanned.values():
        counts.update(result["rules"])
    for result in repeated.values():  # a repeated URL counts as one, whatever rule came after
        counts.subtract(result["rules"])
        counts["duplicate_url"] += result["repeats"]
    kept = np.array([written[i]["kept"] for i in range(pieces)], np.int64)
    if counts.pop(KEPT, 0) != kept.sum():
        raise RuntimeError(
            f"plan '{spec.plan_url}': the shard inputs hold {kept.sum()} rows, the scan kept another number"
        )
    peak = max(tasks.peak_rss(scanned), tasks.peak_rss(repeated), tasks.peak_rss(written))
    return Plan(spec, sum(r["rows"] for r in scanned.values()), {k: v for k, v in counts.items() if v}, kept, peak)


def read_piece(spec: Spec, index: int, columns: list[str] | None) -> Iterator[pa.Table]:
    """Piece `index` in batches, normalized; `columns`: the stored names wanted (None: all)."""
    piece = spec.pieces[index]
    file = spec.files[piece.file]
    wanted = (
        None
        if columns is None
        else [c for c in (file.url_col, file.caption_col, *map(url_list.listed_name, columns)) if c]
    )
    groups = list(piece.row_groups) if piece.row_groups is not None else None
    batch = min(url_list.BATCH_ROWS, spec.task_rows)
    for table in url_list.iter_raw(file.url, file.format, file.caption_col, groups, wanted, batch_rows=batch):
        yield url_list.normalize(table, file.url, file.url_col, file.caption_col)


def scan_piece(spec: Spec, index: int) -> dict[str, Any]:
    """Task: rule codes of every row; the URL keys of the rows that have a URL, bucketed.

    Keys go out in runs of about `task_rows` rows, a key file each, so that a piece larger than
    that (one big row group) costs no more memory than any other."""
    f = spec.filters
    names = filters.rule_names(f)
    before = [names.index(n) for n in filters.BEFORE_DEDUP]
    found = np.zeros(256, np.int64)
    run: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    starts: list[int] = []
    rows = run_start = 0

    def flush() -> None:
        digests, orders, codes = (
            (np.concatenate(parts) for parts in zip(*run, strict=True))
            if run
            else (np.zeros((0, 32), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.uint8))
        )
        dedup.write_keys(
            spec.key_file(index, len(starts)), digests, orders, {"code": pa.array(codes, pa.uint8())}, spec.buckets
        )
        starts.append(run_start)
        run.clear()

    for table in read_piece(spec, index, filters.columns_read(f)):
        code = filters.first_failing(table, f)
        found += np.bincount(code, minlength=256)
        with_url = np.flatnonzero(~np.isin(code, before))
        run.append(
            (
                url_list.url_digests(table["url"].take(pa.array(with_url))),
                dedup.order_of(index, rows + with_url),
                code[with_url],
            )
        )
        rows += len(table)
        if rows - run_start >= spec.task_rows:
            flush()
            run_start = rows
    if run or not starts:
        flush()
    return {"rows": rows, "rules": _by_name(found, names), "run_starts": starts}


def dedup_bucket(spec: Spec, bucket: int, key_files: list[str]) -> dict[str, Any]:
    """Task: the repeated URLs of one bucket, and the rule each would have been counted under."""
    repeats = dedup.reduce_bucket(dedup.read_bucket(key_files, bucket), spec.file("urldup", bucket))
    found = np.bincount(np.asarray(repeats["code"]), minlength=256)
    return {"repeats": len(repeats), "rules": _by_name(found, filters.rule_names(spec.filters))}


def write_rows(spec: Spec, index: int, scanned: dict[str, Any]) -> dict[str, Any]:
    """Task: piece `index`'s kept rows, every column, in list order, with their uid. Which rows
    and their URL hashes come from the scan's key files, one run at a time: no rule or hash is
    computed twice."""
    repeats = dedup.read_repeats(
        [spec.file("urldup", b) for b in range(spec.buckets)],
        int(dedup.order_of(index, 0)),
        int(dedup.order_of(index + 1, 0)),
        [],
    )
    repeated = np.asarray(repeats["order"])

    def kept_of_run(run: int) -> tuple[np.ndarray, pa.Array]:
        keys = pq.read_table(spec.key_file(index, run), columns=["key", "order", "code"])
        order = np.asarray(keys["order"])
        candidates = np.flatnonzero((np.asarray(keys["code"]) == filters.KEPT) & ~np.isin(order, repeated))
        ranked = candidates[np.argsort(order[candidates], kind="stable")]
        return order[ranked] & ((1 << dedup.ROW_BITS) - 1), dedup.to_hex(
            dedup.digest_matrix(keys["key"].take(pa.array(ranked))), 12
        )

    starts = scanned["run_starts"]
    kept_rows, uids = np.zeros(0, np.int64), pa.array([], pa.string())
    loaded = kept = rows = 0
    with storage.atomic_open(spec.file("rows", index)) as sink, pq.ParquetWriter(sink, spec.schema) as writer:
        for table in read_piece(spec, index, None):
            end = rows + len(table)
            while loaded < len(starts) and starts[loaded] < end:  # the runs this batch reaches into
                more_rows, more_uids = kept_of_run(loaded)
                kept_rows, uids = np.concatenate([kept_rows, more_rows]), pa.concat_arrays([uids, more_uids])
                loaded += 1
            last = int(np.searchsorted(kept_rows, end))
            chosen = table.take(pa.array(kept_rows[:last] - rows)).drop_columns([NON_UTF8])
            chosen = chosen.add_column(2, "uid", uids.slice(0, last))
            writer.write_table(conform(chosen, spec.schema), row_group_size=max(spec.shard_size, MIN_ROW_GROUP))
            kept_rows, uids = kept_rows[last:], uids.slice(last)
            kept += last
            rows = end
    if rows != scanned["rows"]:
        raise UrlListError(
            f"URL list '{spec.files[spec.pieces[index].file].url}' changed while it was planned "
            f"({rows} rows now, {scanned['rows']} when scanned); rerun `unclip ingest` into a new root"
        )
    return {"kept": kept}


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with every column of `schema`, in its order and types (missing ones null), as
    one table of the whole list would have had them."""
    return (
        pa.concat_tables([schema.empty_table(), table], promote_options="permissive").select(schema.names).cast(schema)
    )


def read_shard(inputs: list[tuple[str, int, int]], schema: pa.Schema | None = None) -> pa.Table:
    """A shard's rows from its inputs (`Plan.shard_inputs`): only the row groups that hold them."""
    parts = []
    for url, start, stop in inputs:
        fs, path = storage.url_to_fs(url)
        with fs.open(path, "rb", block_size=1 << 22) as f:
            parquet = pq.ParquetFile(f)
            sizes = np.array([parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
            ends = np.cumsum(sizes)
            groups = [g for g in range(len(sizes)) if ends[g] > start and ends[g] - sizes[g] < stop]
            table = parquet.read_row_groups(groups)
            parts.append(table.slice(start - int(ends[groups[0]] - sizes[groups[0]]), stop - start))
    if parts:
        return pa.concat_tables(parts)
    if schema is None:
        raise ValueError("read_shard: no inputs, and no schema to make the empty table of")
    return schema.empty_table()


def _by_name(found: np.ndarray, names: list[str]) -> dict[str, int]:
    out = {names[c]: int(found[c]) for c in np.flatnonzero(found[: filters.KEPT])}
    out[KEPT] = int(found[filters.KEPT])
    return out
