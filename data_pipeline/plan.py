"""Planning an ingest in Ray tasks: the URL list -> shard inputs, filtered and URL-deduplicated.

No process reads the whole list. The driver lists the list's files and reads parquet footers;
every row is read by tasks, a piece (a file, or a run of its row groups) each, in the steps
data_pipeline/plan_run.py runs: the opt-out list's keys, the scan, URL dedup with the opt-out
join, and the shard inputs. This module is what a plan is: its files, pieces and settings, where
its outputs go, and which rows a shard holds.

Shard s holds kept rows [s * shard_size, (s + 1) * shard_size) in list order, as it did when
one process planned everything; `Plan.shard_inputs` says which row range of which rows file
holds them, so a download task receives file names, never a table.

Under ROOT/raw/_plan/ (each task's marker, NNNNN.json, is written after its data file):
  plan.json                  the list's files, the settings, the pieces, the bucket count
  scan/NNNNN-RRRR.parquet    piece N's URL keys (sha256, order, rule code) in runs R of about
                             `ingest.plan_task_rows` rows; row group b = bucket b
  urldup/NNNNN.parquet       bucket N's repeated URLs: order, the rule code they had
  optout-keys/NNNNN.parquet  opt-out list piece N's keys; row group b = bucket b
  optout/NNNNN.parquet       bucket N's rows an opt-out entry names: order
  rows/NNNNN.parquet         piece N's kept rows, in list order: the shard inputs
A rerun with the same list and settings reuses plan.json and every committed task; another
list or other settings are refused once a shard is complete, and replanned before that.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
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
HOST_KEYS_PER_ROW = 3
TEXT_ENTRY_BYTES = 40  # about, per opt-out entry of a text file


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
    optout: tuple[ListFile, ...] = ()  # the opt-out list's files (url_col: the entry column)
    optout_pieces: tuple[Piece, ...] = ()

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
    out: dict[str, Any] = {"settings": {**settings, **columns}, "files": listed}
    if cfg.filters.optout_list:
        with ThreadPoolExecutor(tasks.READ_THREADS) as pool:
            out["optout_files"] = list(pool.map(described, url_list.list_files(cfg.filters.optout_list)))
    return out


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

    def files(identity: dict) -> dict[str, dict]:  # the URL list's files, then the opt-out list's
        return {f["url"]: f for f in [*identity["files"], *identity.get("optout_files", [])]}

    before, now = files(recorded["identity"]), files(wanted)
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
    optout_files, optout_pieces = _optout_pieces(wanted.get("optout_files", []), cfg)
    # A bucket task holds its share of every key: with an opt-out list, the entries' and the rows'
    # domain keys too (HOST_KEYS_PER_ROW a row, as for img.cdn.example.com).
    keys = total * (1 + HOST_KEYS_PER_ROW) + sum(f.rows for f in optout_files) if optout_files else total
    return Spec(
        plan_url,
        tuple(files),
        tuple(pieces),
        dedup.bucket_count(keys, cfg.dedup_bucket_rows),
        shard_schema(schema),
        resolved,
        cfg.shard_size,
        cfg.plan_task_rows,
        optout_files,
        optout_pieces,
    )


def _optout_pieces(
    described: list[dict[str, Any]], cfg: IngestConfig
) -> tuple[tuple[ListFile, ...], tuple[Piece, ...]]:
    """The opt-out list's files (rows: from the footer, or guessed from a text file's size) and
    pieces: parquet by row groups, other formats a file each."""
    files, pieces = [], []
    for index, file in enumerate(described):
        url = file["url"]
        fmt = url_list.format_of(url)
        groups = url_list.parquet_row_groups(url)[0] if fmt == "parquet" else None
        rows = sum(groups) if groups is not None else (file["size"] or 0) // TEXT_ENTRY_BYTES
        files.append(ListFile(url, fmt, rows, "", None))
        pieces += [Piece(index, g) for g in _split(groups, cfg.plan_task_rows)] if groups else [Piece(index, None)]
    return tuple(files), tuple(pieces)


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
        "optout": [dataclasses.asdict(f) for f in spec.optout],
        "optout_pieces": [
            [p.file, list(p.row_groups) if p.row_groups is not None else None] for p in spec.optout_pieces
        ],
    }


def _from_header(header: dict[str, Any], plan_url: str, cfg: IngestConfig) -> Spec:
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(header["schema"])))
    pieces = tuple(Piece(f, tuple(g) if g is not None else None) for f, g in header["pieces"])
    optout_pieces = tuple(Piece(f, tuple(g) if g is not None else None) for f, g in header.get("optout_pieces", []))
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
        tuple(ListFile(**f) for f in header.get("optout", [])),
        optout_pieces,
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
