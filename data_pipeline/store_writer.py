"""Writing the embedding store (the layout is in store.py): parts streamed row group by row group
where they are computed, their sidecars, and the parts index and manifest rebuilt from the
committed parts, in tasks.

A part is written by the task that read its shard, as its chunks come back from the encoders:
no process holds a whole part. The manifest is rebuilt from the sidecars at the end of
`unclip embed` and by `unclip manifest`, which also converts a store of manifest schema 1. The
index is a folder of slices (INDEX_SLICE parts each) written by the tasks that read the
sidecars; a new folder is written beside the old one and the manifest, written last, names it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.exceptions

from data_pipeline import tasks
from data_pipeline.ray_runtime import ray_session
from data_pipeline.store import (
    BASE_COLUMNS,
    ENCODERS_LOCK,
    HOLDOUT_SEED,
    MANIFEST,
    NULL_CAPTION,
    ROW_GROUP,
    SCHEMA_VERSION,
    StoreError,
    arrow_schema,
    column_numpy,
    heldout_mask,
    part_name,
)
from models.base import storage

STALE_AFTER_S = 6 * 3600  # a temporary this old was left by a killed writer, not one still writing
INDEX_SLICE = 4096  # parts per index slice: one task reads their sidecars and writes the slice
READ_THREADS = 16
_SIDECAR = re.compile(r"part-(\d+)\.json")


def stat_axis(name: str) -> int | None | bool:
    """Statistics the trainers need, kept per part as sums so a resumed job never rereads old
    parts: the CLIP image embedding per dimension (the prior normalises with it) and each VAE
    latent overall (the ldm scales latents to unit variance with it). 0: per dimension; None:
    over every element; False: none."""
    return 0 if name == "clip_image_emb" else None if name.startswith("vae_latent") else False


def encode_floats(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values, "<f8").tobytes()).decode()


def decode_floats(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), "<f8")


class _Hashing:
    """A write-only file that hashes and counts what passes through to `sink`."""

    def __init__(self, sink):
        self.sink, self.digest, self.size, self.closed = sink, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        self.sink.write(data)
        self.digest.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.sink.flush()

    def writable(self) -> bool:
        return True


class PartWriter:
    """One part, written row group by row group as rows arrive; `commit` writes its sidecar.

    A part with no rows gets no parquet file, only a sidecar saying so."""

    def __init__(self, store_url: str, part: int, specs: dict[str, dict], holdout_fraction: float, source: str):
        self.store_url, self.part, self.specs = store_url, part, specs
        self.holdout_fraction, self.source = holdout_fraction, source
        self.schema = arrow_schema(specs)
        self.pending: list[pa.Table] = []
        self.pending_rows = self.rows = 0
        self.sums: dict[str, dict[str, Any]] = {}
        self._files = contextlib.ExitStack()
        self._writer: pq.ParquetWriter | None = None
        self._sink: _Hashing | None = None

    def add(self, table: pa.Table) -> None:
        if not len(table):
            return
        for name in table.column_names:
            axis = stat_axis(name)
            if axis is not False:
                values = column_numpy(table, name, [-1]).astype(np.float64)
                entry = self.sums.setdefault(name, {"count": 0, "sum": 0.0, "sumsq": 0.0})
                entry["count"] += len(table) if axis == 0 else values.size
                entry["sum"] = entry["sum"] + values.sum(axis)
                entry["sumsq"] = entry["sumsq"] + (values**2).sum(axis)
        self.pending.append(table)
        self.pending_rows += len(table)
        self.rows += len(table)
        while self.pending_rows >= ROW_GROUP:
            self._write(ROW_GROUP)

    def _write(self, rows: int) -> None:
        if self._writer is None:
            sink = self._files.enter_context(
                storage.atomic_open(storage.join(self.store_url, part_name(self.part) + ".parquet"))
            )
            self._sink = _Hashing(sink)
            self._writer = pq.ParquetWriter(self._sink, self.schema)
        table = pa.concat_tables(self.pending)
        self._writer.write_table(table.slice(0, rows), row_group_size=ROW_GROUP)
        rest = table.slice(rows)
        self.pending, self.pending_rows = ([rest] if len(rest) else []), len(rest)

    def commit(self, counts: dict[str, int]) -> dict[str, Any]:
        """Close and commit the part, then its sidecar; returns what the driver needs (small)."""
        if self.pending_rows:
            self._write(self.pending_rows)
        entry = _part_entry(self.part, self.rows, None, self.holdout_fraction)
        if self._writer is not None:
            assert self._sink is not None, "_write sets the writer and its sink together"
            self._writer.close()
            meta = self._writer.writer.metadata
            self._files.close()  # the part appears, whole
            entry = _part_entry(
                self.part, self.rows, meta, self.holdout_fraction, self._sink.digest.hexdigest(), self._sink.size
            )
        sidecar = {
            **entry,
            "counts": dict(counts),
            "source": self.source,
            "holdout_fraction": self.holdout_fraction,
            "stats": _encoded_stats(self.sums),
        }
        storage.write_json(storage.join(self.store_url, part_name(self.part) + ".json"), sidecar)
        return {"part": self.part, "rows": self.rows, "sha256": entry["sha256"], "counts": dict(counts)}

    def abort(self) -> None:
        """Leave nothing behind: the part's temporary file goes with the error."""
        with contextlib.suppress(BaseException):
            self._files.__exit__(RuntimeError, RuntimeError("part aborted"), None)


def _part_entry(
    part: int, rows: int, meta: pq.FileMetaData | None, fraction: float, sha256: str | None = None, size: int = 0
) -> dict[str, Any]:
    """The sidecar's description of a part's file from its footer (`meta`; None: no file): row
    groups, the training rows of each, bytes per column."""
    if meta is None:
        return {
            "part": part,
            "file": None,
            "rows": rows,
            "row_groups": [],
            "train_rows": [],
            "sha256": None,
            "bytes": 0,
            "column_bytes": {},
        }
    groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
    heldout = heldout_mask(part, rows, fraction)
    bounds = np.cumsum([0] + [g.num_rows for g in groups])
    column_bytes: Counter[str] = Counter()
    for g in groups:
        for c in range(g.num_columns):
            column_bytes[g.column(c).path_in_schema.split(".")[0]] += g.column(c).total_compressed_size
    return {
        "part": part,
        "file": part_name(part) + ".parquet",
        "rows": rows,
        "row_groups": [g.num_rows for g in groups],
        "train_rows": [int((~heldout[a:b]).sum()) for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
        "sha256": sha256,
        "bytes": size,
        "column_bytes": dict(column_bytes),
    }


def _encoded_stats(sums: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        k: {
            "count": v["count"],
            "sum": encode_floats(np.atleast_1d(v["sum"])),
            "sumsq": encode_floats(np.atleast_1d(v["sumsq"])),
        }
        for k, v in sums.items()
    }


def write_part(
    store_url: str,
    part: int,
    table: pa.Table,
    specs: dict[str, dict],
    counts: dict[str, int] | None = None,
    holdout_fraction: float = 0.0,
    source: str = "",
) -> dict[str, Any]:
    """A whole part at once (tests, conversions): the same writer embed streams into."""
    writer = PartWriter(store_url, part, specs, holdout_fraction, source)
    writer.add(table)
    return writer.commit(counts or {"kept": len(table)})


def committed_parts(store_url: str) -> list[int]:
    """Ids of the parts whose sidecar is committed (one listing)."""
    return _committed(storage.listdir(store_url))


def _committed(names: list[str]) -> list[int]:
    return sorted(int(m.group(1)) for n in names if (m := _SIDECAR.fullmatch(n)))


def read_sidecar(store_url: str, part: int) -> dict[str, Any]:
    return storage.read_json(storage.join(store_url, part_name(part) + ".json"))


def write_lock(store_url: str, lock: dict[str, Any]) -> None:
    storage.write_json(storage.join(store_url, ENCODERS_LOCK), lock)


def read_lock(store_url: str) -> dict[str, Any] | None:
    path = storage.join(store_url, ENCODERS_LOCK)
    return storage.read_json(path) if storage.exists(path) else None


def index_slice(
    store_url: str, parts: Sequence[int], folder: str, slice_id: int, columns: Sequence[str]
) -> dict[str, Any]:
    """Task: one slice of the parts index from its parts' sidecars; returns the slice's totals
    and summed statistics (what the manifest adds up), never its rows."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        sidecars = list(pool.map(lambda p: read_sidecar(store_url, p), parts))
    stats_columns = [c for c in columns if stat_axis(c) is not False]
    table = {
        "part": pa.array([s["part"] for s in sidecars], pa.int64()),
        "file": pa.array([s["file"] for s in sidecars], pa.string()),
        "rows": pa.array([s["rows"] for s in sidecars], pa.int64()),
        "row_groups": pa.array([s["row_groups"] for s in sidecars], pa.list_(pa.int32())),
        "train_rows": pa.array([s["train_rows"] for s in sidecars], pa.list_(pa.int32())),
        "sha256": pa.array([s["sha256"] for s in sidecars], pa.string()),
        "bytes": pa.array([s["bytes"] for s in sidecars], pa.int64()),
        "source": pa.array([s.get("source") for s in sidecars], pa.string()),
        **{f"bytes:{c}": pa.array([s["column_bytes"].get(c, 0) for s in sidecars], pa.int64()) for c in columns},
    }
    totals: dict[str, Any] = {"counts": Counter(), "stats": {}}
    for c in stats_columns:
        entries = [s["stats"].get(c) for s in sidecars]
        table[f"count:{c}"] = pa.array([e["count"] if e else 0 for e in entries], pa.int64())
        for moment in ("sum", "sumsq"):
            table[f"{moment}:{c}"] = pa.array(
                [base64.b64decode(e[moment]) if e else None for e in entries], pa.binary()
            )
        present = [e for e in entries if e]
        if present:
            totals["stats"][c] = {
                "count": sum(e["count"] for e in present),
                **{m: encode_floats(np.sum([decode_floats(e[m]) for e in present], axis=0)) for m in ("sum", "sumsq")},
            }
    for s in sidecars:
        totals["counts"].update(s["counts"])
    with storage.atomic_open(storage.join(folder, f"{slice_id:05d}.parquet")) as sink:
        pq.write_table(pa.table(table), sink)
    return {
        "parts": len(sidecars),
        "rows": int(sum(s["rows"] for s in sidecars)),
        "bytes": int(sum(s["bytes"] for s in sidecars)),
        "empty_parts": sum(1 for s in sidecars if not s["rows"]),
        "row_groups": sum(len(s["row_groups"]) for s in sidecars),
        "counts": dict(totals["counts"]),
        "stats": totals["stats"],
        "holdout_fractions": sorted({s.get("holdout_fraction", 0.0) for s in sidecars}),
    }


def build_manifest(
    store_url: str, lock: dict[str, Any], config: dict[str, Any], log: Callable[[str], None] = print
) -> dict[str, Any]:
    """The parts index and manifest of every committed part, read in Ray tasks when Ray is up
    (else here, in threads); the manifest is written last."""
    names = storage.listdir(store_url)  # one listing: the committed parts and the old index folders
    parts = _committed(names)
    specs = lock["specs"]
    columns = [*arrow_schema(specs).names]
    index_name = f"parts-{uuid.uuid4().hex[:8]}"
    folder = storage.join(store_url, index_name)
    slices = [parts[i : i + INDEX_SLICE] for i in range(0, len(parts), INDEX_SLICE)]
    results = _map(index_slice, [(store_url, s, folder, i, columns) for i, s in enumerate(slices)])
    fractions = {f for r in results for f in r["holdout_fractions"]}
    if len(fractions) > 1:
        raise StoreError(
            f"store '{store_url}': parts were written with holdout fractions {sorted(fractions)}; embed into a new root"
        )
    counts: Counter[str] = Counter()
    for r in results:
        counts.update(r["counts"])
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "encoders": lock["encoders"],
        "columns": {**{k: {"dtype": str(t)} for k, t in BASE_COLUMNS.items()}, **specs},
        "totals": {
            "parts": len(parts),
            "empty_parts": sum(r["empty_parts"] for r in results),
            "rows": sum(r["rows"] for r in results),
            "row_groups": sum(r["row_groups"] for r in results),
            "bytes": sum(r["bytes"] for r in results),
            "counts": dict(sorted(counts.items())),
        },
        "holdout": {"fraction": lock.get("holdout_fraction", 0.0), "seed": HOLDOUT_SEED},
        "index": {"folder": index_name, "slices": len(slices), "slice_parts": INDEX_SLICE},
        "config": config,
    }
    for name in [c for c in specs if stat_axis(c) is not False]:
        stats = [r["stats"][name] for r in results if name in r["stats"]]
        count = sum(s["count"] for s in stats)
        if count:
            mean = np.sum([decode_floats(s["sum"]) for s in stats], axis=0) / count
            var = np.sum([decode_floats(s["sumsq"]) for s in stats], axis=0) / count - mean**2
            manifest[f"{name}_mean"] = mean.tolist() if stat_axis(name) == 0 else float(mean[0])
            manifest[f"{name}_std"] = (
                np.sqrt(np.maximum(var, 0.0)).tolist() if stat_axis(name) == 0 else float(np.sqrt(max(var[0], 0.0)))
            )
    if NULL_CAPTION in names:
        manifest["null_caption"] = {
            "file": NULL_CAPTION,
            "sha256": storage.sha256_file(storage.join(store_url, NULL_CAPTION)),
        }
    previous = [n for n in names if re.fullmatch(r"parts-[0-9a-f]{8}", n)]
    storage.write_json(storage.join(store_url, MANIFEST), manifest)
    for old in previous:  # the manifest names the new index: the old ones have no reader left
        storage.remove(storage.join(store_url, old))
    log(f"manifest: {manifest['totals']['rows']:,} rows in {len(parts):,} parts, index in {len(slices)} slices")
    return manifest


def _map(fn: Callable[..., dict], calls: list[tuple]) -> list[dict]:
    """fn over calls: as Ray tasks when this process is connected to Ray, else in threads."""
    if ray.is_initialized():
        task = ray.remote(num_cpus=0.5, max_retries=2)(fn)
        refs = [task.remote(*c) for c in calls]
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as err:
            tasks.raise_cause(err)
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda c: fn(*c), calls))


def rebuild(store_url: str, ray_cfg=None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`unclip manifest`: the index and manifest of a store's committed parts, anew; a store of
    manifest schema 1 is converted in place first (its parts, rows and held-out rows unchanged)."""
    path = storage.join(store_url, MANIFEST)
    try:
        old = storage.read_json(path) if storage.exists(path) else None
    except ValueError:  # truncated: what it held is rebuilt from the parts
        old = None
    with ray_session(ray_cfg) if ray_cfg is not None else contextlib.nullcontext():
        if old and old.get("schema_version") == 1:
            _convert_v1(store_url, old, log)
        lock = read_lock(store_url)
        if lock is None or "specs" not in lock:
            raise StoreError(
                f"store '{store_url}': no record of what it was built with ({ENCODERS_LOCK}); embed into it first"
            )
        return build_manifest(store_url, lock, lock.get("config", {}), log)


def _convert_v1(store_url: str, manifest: dict[str, Any], log: Callable[[str], None]) -> None:
    """Schema 1 -> 2: every sidecar rewritten (row groups and column bytes from its part's footer,
    sums in binary, training rows per row group), parts without rows removed, the lock completed."""
    specs = {k: v for k, v in manifest["columns"].items() if k not in BASE_COLUMNS}
    fraction = manifest.get("holdout", {}).get("fraction", 0.0)
    parts = committed_parts(store_url)
    batches = [parts[i : i + INDEX_SLICE] for i in range(0, len(parts), INDEX_SLICE)]
    _map(_convert_sidecars, [(store_url, batch, fraction) for batch in batches])
    lock = read_lock(store_url) or {}
    write_lock(
        store_url,
        {
            **lock,
            "encoders": manifest["encoders"],
            "columns": sorted(specs),
            "specs": specs,
            "holdout_fraction": fraction,
            "config": manifest.get("config", {}),
        },
    )
    log(f"manifest: {len(parts):,} parts of '{store_url}' converted from manifest schema 1")


def _convert_sidecars(store_url: str, parts: Sequence[int], fraction: float) -> dict[str, Any]:
    for part in parts:
        old = read_sidecar(store_url, part)
        if "train_rows" in old:  # converted by an earlier, interrupted conversion
            continue
        file = storage.join(store_url, part_name(part) + ".parquet")
        entry = _part_entry(part, 0, None, fraction)
        if old["rows"]:
            fs, path = storage.url_to_fs(file)
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
            entry = _part_entry(part, old["rows"], meta, fraction, old["sha256"], old["bytes"])
        else:
            storage.remove(file)  # a file of one 0-row row group: some readers refuse it
        sidecar = {
            **entry,
            "counts": old.get("counts", {"kept": old["rows"]}),
            "source": "",
            "holdout_fraction": fraction,
            "stats": _encoded_stats(old.get("sums", {})),
        }
        storage.write_json(storage.join(store_url, part_name(part) + ".json"), sidecar)
    return {"parts": len(parts)}
