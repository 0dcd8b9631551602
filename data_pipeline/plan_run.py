"""Running a plan (data_pipeline/plan.py): its steps as Ray tasks, each committing its output.

  0. optout  per piece of the opt-out list, if there is one: its entries' keys, bucketed
             (data_pipeline/optout.py).
  1. scan    per piece: read the URL, caption and filter columns; decide every rule a row decides
             alone; write the sha256 of each URL (and, against an opt-out list of domains, a key
             per domain of its host), bucketed (data_pipeline/dedup.py).
  2. urldup  per bucket: the repeated URLs; the first occurrence in list order is kept; and the
             rows an opt-out entry names.
  3. rows    per piece: read the piece again, every column; write its kept rows with their
             uid: these are the shard inputs.

A rerun runs only the tasks without a committed output (data_pipeline/tasks.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from data_pipeline import dedup, filters, optout, tasks, url_list
from data_pipeline.plan import Plan, Spec
from data_pipeline.url_list import NON_UTF8, UrlListError
from models.base import storage

MIN_ROW_GROUP = 4096  # rows files: row groups of max(shard_size, this) rows
KEPT = "kept"  # the counts' name for rows no rule drops
HOST_KEY = 254  # the code of a row's domain key in the scan's key files (rule codes are below it)


def execute(spec: Spec, log, progress_every_s: float = 5.0) -> Plan:
    """Run (or finish) the three steps; returns the counts and the kept rows of every piece."""
    ref = ray.put(spec)
    pieces, buckets = len(spec.pieces), spec.buckets
    listed = tasks.run_stage(
        "plan: opt-out list",
        spec.folder("optout-keys"),
        scan_optout_piece,
        lambda i: (ref, i),
        len(spec.optout_pieces),
        log,
        progress_every_s,
    )
    with_hosts = any(r["domains"] for r in listed.values())  # only domains need a row's host keys
    scanned = tasks.run_stage(
        "plan: scan", spec.folder("scan"), scan_piece, lambda i: (ref, i, with_hosts), pieces, log, progress_every_s
    )
    key_files = ray.put([spec.key_file(i, run) for i in range(pieces) for run in range(len(scanned[i]["run_starts"]))])
    optout_keys = ray.put([spec.file("optout-keys", i) for i in range(len(spec.optout_pieces))])
    repeated = tasks.run_stage(
        "plan: URL dedup",
        spec.folder("urldup"),
        dedup_bucket,
        lambda b: (ref, b, key_files, optout_keys),
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
    opted_out = sum(written[i].get("opted_out", 0) for i in range(pieces))  # a kept row an entry names
    counts[KEPT] -= opted_out
    counts["opted_out_listed"] += opted_out
    if counts.pop(KEPT, 0) != kept.sum():
        raise RuntimeError(
            f"plan '{spec.plan_url}': the shard inputs hold {kept.sum()} rows, the scan kept another number"
        )
    peak = max(tasks.peak_rss(s) for s in (listed, scanned, repeated, written))
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


def scan_optout_piece(spec: Spec, index: int) -> dict[str, Any]:
    """Task: piece `index` of the opt-out list as keys, bucketed as the list's URL keys."""
    piece = spec.optout_pieces[index]
    file = spec.optout[piece.file]
    groups = list(piece.row_groups) if piece.row_groups is not None else None
    return optout.write_keys(file.url, file.format, groups, spec.file("optout-keys", index), spec.buckets)


def scan_piece(spec: Spec, index: int, with_hosts: bool = False) -> dict[str, Any]:
    """Task: rule codes of every row; the URL keys of the rows that have a URL (and their hosts'
    domain keys, coded HOST_KEY, `with_hosts`), bucketed.

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
        urls, orders = table["url"].take(pa.array(with_url)), dedup.order_of(index, rows + with_url)
        run.append((url_list.url_digests(urls), orders, code[with_url]))
        if with_hosts:
            digests, host_orders = optout.host_keys(filters.url_hosts(urls), orders)
            run.append((digests, host_orders, np.full(len(digests), HOST_KEY, np.uint8)))
        rows += len(table)
        if rows - run_start >= spec.task_rows:
            flush()
            run_start = rows
    if run or not starts:
        flush()
    return {"rows": rows, "rules": _by_name(found, names), "run_starts": starts}


def dedup_bucket(spec: Spec, bucket: int, key_files: list[str], optout_keys: list[str]) -> dict[str, Any]:
    """Task: the repeated URLs of one bucket, and the rule each would have been counted under; with
    an opt-out list, the rows whose URL or domain key one of its entries has."""
    keys = dedup.read_bucket(key_files, bucket)
    is_host = pc.equal(keys["code"], HOST_KEY)
    repeats = dedup.reduce_bucket(keys.filter(pc.invert(is_host)), spec.file("urldup", bucket))
    found = np.bincount(np.asarray(repeats["code"]), minlength=256)
    if optout_keys:
        entries = dedup.read_bucket(optout_keys, bucket)["key"].combine_chunks()
        named = np.unique(np.asarray(keys.filter(pc.is_in(keys["key"], value_set=entries))["order"]))
        with storage.atomic_open(spec.file("optout", bucket)) as sink:
            pq.write_table(pa.table({"order": pa.array(named, pa.int64())}), sink, row_group_size=dedup.DROP_ROW_GROUP)
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
    start, stop = int(dedup.order_of(index, 0)), int(dedup.order_of(index + 1, 0))
    named = (
        np.asarray(dedup.read_repeats([spec.file("optout", b) for b in range(spec.buckets)], start, stop, [])["order"])
        if spec.optout_pieces
        else np.zeros(0, np.int64)
    )
    opted_out = 0

    def kept_of_run(run: int) -> tuple[np.ndarray, pa.Array]:
        nonlocal opted_out
        keys = pq.read_table(spec.key_file(index, run), columns=["key", "order", "code"])
        order = np.asarray(keys["order"])
        candidates = np.flatnonzero((np.asarray(keys["code"]) == filters.KEPT) & ~np.isin(order, repeated))
        listed = np.isin(order[candidates], named)
        opted_out += int(listed.sum())
        candidates = candidates[~listed]
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
    return {"kept": kept, "opted_out": opted_out}


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with every column of `schema`, in its order and types (missing ones null), as
    one table of the whole list would have had them."""
    return (
        pa.concat_tables([schema.empty_table(), table], promote_options="permissive").select(schema.names).cast(schema)
    )


def _by_name(found: np.ndarray, names: list[str]) -> dict[str, int]:
    out = {names[c]: int(found[c]) for c in np.flatnonzero(found[: filters.KEPT])}
    out[KEPT] = int(found[filters.KEPT])
    return out
