"""The embedding store contract: the one module that knows its layout and how to read it.

ROOT/store/
  part-NNNNN.parquet   one row per kept sample of raw shard NNNNN, in the shard's order; no file
                       for a shard where nothing was kept (a 0-row row group trips readers)
  part-NNNNN.json      the part's sidecar, written after the parquet: it marks the part complete
                       (rows, row groups and their training rows, sha256, bytes per column, counts,
                       the statistics' sums as base64 float64)
  parts-XXXXXXXX/NNNNN.parquet  the parts index, in slices of 4,096 parts: a row per part, the
                       sidecars' fields as columns (statistics' sums as binary)
  manifest.json        written last: schema version, encoders, columns, totals, statistics, the
                       holdout, and which index folder is current

Arrays are fixed-size lists of float16 (bool for the mask), flattened; the manifest gives each
column's shape. Readers load the manifest and, when they need parts, the index as arrays: never
every part's footer. Trainers read through `open_store`, which checks the manifest against what
the trainer expects and names the field that differs. Writing lives in store_writer.py.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from safetensors.numpy import load as load_arrays

from models.base import storage
from models.base.errors import UserError

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
LAYOUT_COLUMNS = ["part", "rows", "row_groups", "train_rows"]  # what a reader of the layout loads
ENCODERS_LOCK = "_encoders.json"
# The empty caption's text columns, embedded as every caption is: the unconditional input of a
# stage that drops text to it (ldm.null_text=empty_caption), as Stable Diffusion drops captions.
NULL_CAPTION = "null_caption.safetensors"  # what a store is being built with: encoders, columns, settings
BASE_COLUMNS = {
    "key": pa.string(),
    "caption": pa.string(),
    "url": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "clip_score": pa.float32(),
}
ROW_GROUP = 1024  # rows per row group of a part
HOLDOUT_SEED = 20221126  # fixed: the held-out rows of a part never change
_PART_FILE = re.compile(r"part-(\d+)\.parquet$")


class StoreError(UserError):
    pass


def part_name(shard_id: int) -> str:
    return f"part-{shard_id:05d}"


def column_specs(
    clip: dict[str, Any], vae: dict[str, Any] | None, columns: Sequence[str], latent_columns: dict[str, int]
) -> dict[str, dict]:
    """dtype and per-row shape of every array/bytes column, from the encoders' identities.

    `latent_columns` maps each VAE latent column (vae_latent, vae_latent_<side>) to its image side.
    """
    d, length, width = clip["embed_dim"], clip["context_length"], clip["text_width"]
    specs: dict[str, dict] = {}
    for name in [c for c in columns if c != "vae_latent"] + list(latent_columns):
        if name in ("clip_image_emb", "clip_text_emb"):
            specs[name] = {"dtype": "float16", "shape": [d]}
        elif name == "clip_text_tokens":
            specs[name] = {"dtype": "float16", "shape": [length, width]}
        elif name == "text_mask":
            specs[name] = {"dtype": "bool", "shape": [length]}
        elif name in latent_columns:
            if vae is None:
                raise StoreError(f"column {name!r} needs a VAE (encoders.vae)")
            if latent_columns[name] % vae["downsample"]:
                raise StoreError(
                    f"column {name!r}: side {latent_columns[name]} is not a multiple of "
                    f"the VAE's downsampling {vae['downsample']}"
                )
            side = latent_columns[name] // vae["downsample"]
            specs[name] = {
                "dtype": "float16",
                "shape": [vae["latent_channels"], side, side],
                "image_side": latent_columns[name],
            }
        elif name.startswith("image_"):
            specs[name] = {"dtype": "png", "shape": [int(name.split("_")[1])] * 2 + [3]}
        else:
            raise StoreError(f"unknown store column {name!r}")
    return specs


def arrow_schema(specs: dict[str, dict]) -> pa.Schema:
    fields = [pa.field(k, t) for k, t in BASE_COLUMNS.items()]
    for name, spec in specs.items():
        if spec["dtype"] == "png":
            fields.append(pa.field(name, pa.binary()))
        else:
            element = pa.float16() if spec["dtype"] == "float16" else pa.bool_()
            fields.append(pa.field(name, pa.list_(element, int(np.prod(spec["shape"])))))
    return pa.schema(fields)


def to_arrow(rows: dict[str, Any], specs: dict[str, dict]) -> pa.Table:
    """Columns as numpy arrays ([N, *shape] for arrays) -> a table with the store schema."""
    schema = arrow_schema(specs)
    arrays = []
    for field in schema:
        value = rows[field.name]
        if pa.types.is_fixed_size_list(field.type):
            width = field.type.list_size
            flat = np.ascontiguousarray(value).reshape(len(value), width)
            element = np.float16 if field.type.value_type == pa.float16() else np.bool_
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(element).ravel()), width))
        else:
            arrays.append(pa.array(list(value) if isinstance(value, np.ndarray) else value, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def heldout_mask(part_id: int, rows: int, fraction: float) -> np.ndarray:
    """Which rows of part `part_id` are held out from training (for `unclip eval`).

    A function of the part and row position only, so every trainer and the evaluator agree
    without reading a single key."""
    if fraction <= 0:
        return np.zeros(rows, bool)
    return np.random.default_rng([HOLDOUT_SEED, part_id]).random(rows) < fraction


def part_id(file: str) -> int:
    found = _PART_FILE.search(file)
    if found is None:
        raise StoreError(f"'{file}' is not a store part (part-NNNNN.parquet)")
    return int(found.group(1))


def column_numpy(table: pa.Table, name: str, shape: Sequence[int]) -> np.ndarray:
    """A fixed-size-list column as an array of shape [rows, *shape]."""
    column = table[name].combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).reshape(len(table), *shape)


@dataclass(frozen=True)
class PartsIndex:
    """The parts index's layout as arrays (one entry per part; row groups flattened, part p's
    from `group_start[p]`): what a reader of a store of 10^6 parts holds, about 30 bytes a part."""

    part: np.ndarray  # int64 ids
    rows: np.ndarray  # int64
    group_start: np.ndarray  # int64, len(part) + 1
    group_rows: np.ndarray  # int32, one per row group
    group_train_rows: np.ndarray  # int32: rows of the group that are not held out

    @classmethod
    def from_table(cls, table: pa.Table) -> PartsIndex:
        lengths = pc.list_value_length(table["row_groups"]).to_numpy(zero_copy_only=False)
        start = np.zeros(len(table) + 1, np.int64)
        np.cumsum(lengths, out=start[1:])
        flat = lambda name: pc.list_flatten(table[name]).to_numpy(zero_copy_only=False).astype(np.int32)  # noqa: E731
        return cls(
            table["part"].to_numpy().copy(),
            table["rows"].to_numpy().copy(),
            start,
            flat("row_groups"),
            flat("train_rows"),
        )

    def file_of(self, i: int) -> str:
        return part_name(int(self.part[i])) + ".parquet"


class PartFiles(Sequence[str]):
    """URLs of a store's non-empty parts, as a sequence that holds one int64 per part."""

    def __init__(self, url: str, index: PartsIndex):
        # not `self.index`: that would hide Sequence.index, the position of a value
        self.url, self.parts_index, self.positions = url, index, np.flatnonzero(index.rows > 0)

    def __len__(self) -> int:
        return len(self.positions)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return storage.join(self.url, self.parts_index.file_of(int(self.positions[i])))


def read_index(store_url: str, manifest: dict[str, Any], columns: Sequence[str] | None = LAYOUT_COLUMNS) -> pa.Table:
    """The parts index (its chosen columns), every slice read in parallel."""
    folder = storage.join(store_url, manifest["index"]["folder"])

    def one(i: int) -> pa.Table:
        url = storage.join(folder, f"{i:05d}.parquet")
        if storage.is_local(url):  # pyarrow's own reader: no Python file object in between
            return pq.read_table(storage.local_path(url), columns=columns, use_threads=False)
        fs, path = storage.url_to_fs(url)
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns, use_threads=False)

    with ThreadPoolExecutor(4 if storage.is_local(folder) else 16) as pool:  # object stores want requests in flight
        slices = list(pool.map(one, range(manifest["index"]["slices"])))
    return pa.concat_tables(slices) if slices else pa.table({c: [] for c in (columns or LAYOUT_COLUMNS)})


def read_manifest(store_url: str) -> dict[str, Any]:
    path = storage.join(store_url, MANIFEST)
    if not storage.exists(path):
        raise StoreError(f"store '{store_url}': no {MANIFEST} (run `unclip embed` first, or it did not finish)")
    try:
        manifest = storage.read_json(path)
    except ValueError as err:  # truncated or overwritten: a reader must not guess what it held
        raise StoreError(
            f"store '{store_url}': {MANIFEST} is not valid JSON ({err}); rebuild it with `unclip manifest {store_url}`"
        ) from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version == 1:
        raise StoreError(
            f"store '{store_url}' was written by an earlier unclip (manifest schema 1, a JSON entry per part); "
            f"convert it in place with `unclip manifest {store_url}`"
        )
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"store '{store_url}': manifest field 'schema_version' is {version!r}, expected {SCHEMA_VERSION}"
        )
    return manifest


@dataclass
class Store:
    url: str
    manifest: dict[str, Any]

    @functools.cached_property
    def index(self) -> PartsIndex:
        index = PartsIndex.from_table(read_index(self.url, self.manifest))
        pa.default_memory_pool().release_unused()  # the table is gone: hand its pages back
        return index

    @functools.cached_property
    def files(self) -> PartFiles:
        """The parts that have rows, in part order (names made on access, not held)."""
        return PartFiles(self.url, self.index)

    def shape(self, column: str) -> list[int]:
        return list(self.manifest["columns"][column].get("shape", []))

    @property
    def holdout_fraction(self) -> float:
        return float(self.manifest.get("holdout", {}).get("fraction", 0.0))

    def heldout(self, file: str, rows: int) -> np.ndarray:
        return heldout_mask(part_id(file), rows, self.holdout_fraction)

    def require(self, columns: Iterable[str], expect: dict[str, Any] | None = None) -> None:
        """Refuse a store that lacks `columns` or whose manifest differs from `expect`.

        `expect` maps dotted manifest fields ('columns.clip_image_emb.shape') to values.
        """
        missing = [c for c in columns if c not in self.manifest["columns"]]
        if missing:
            raise StoreError(
                f"store '{self.url}': manifest field 'columns' lacks {missing[0]!r} "
                f"(has {', '.join(self.manifest['columns'])}); add it to embed.columns and rerun `unclip embed`"
            )
        for dotted, want in (expect or {}).items():
            node: Any = self.manifest
            for part in dotted.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node != want:
                raise StoreError(f"store '{self.url}': manifest field '{dotted}' is {node!r}, expected {want!r}")

    def null_caption(self) -> dict[str, np.ndarray]:
        """The empty caption's clip_text_emb [D], clip_text_tokens [L, W] and text_mask [L]."""
        recorded = self.manifest.get("null_caption")
        if recorded is None:
            raise StoreError(
                f"store '{self.url}': manifest lacks 'null_caption' (embedded before it was recorded); "
                "rerun `unclip embed`, which adds it and keeps every part"
            )
        url = storage.join(self.url, recorded["file"])
        data = storage.read_bytes(url)
        if hashlib.sha256(data).hexdigest() != recorded["sha256"]:
            raise StoreError(
                f"store '{self.url}': {recorded['file']} does not match the manifest's sha256 "
                f"(rerun `unclip manifest {self.url}`)"
            )
        return load_arrays(data)

    def read(
        self, columns: Sequence[str], files: Sequence[str] | None = None, split: str = "all", limit: int | None = None
    ) -> dict[str, np.ndarray]:
        """Chosen columns of chosen parts as arrays ([N, *shape]; bytes and strings as object arrays).

        split: "all", "train" (without the held-out rows) or "heldout". limit: the first `limit`
        rows, reading parts in order only until there are that many (a store's held-out rows can
        be read without reading every part)."""
        if split not in ("all", "train", "heldout"):
            raise ValueError(f"split: expected 'all', 'train' or 'heldout', got {split!r}")
        tables: list[pa.Table] = []
        rows = 0
        for file in files or self.files:
            if tables and limit is not None and rows >= limit:
                break
            fs, path = storage.url_to_fs(file)
            with fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=list(columns))
            if split != "all":
                mask = self.heldout(file, len(table))
                table = table.filter(pa.array(mask if split == "heldout" else ~mask))
            tables.append(table)
            rows += len(table)
        table = pa.concat_tables(tables) if tables else arrow_schema({}).empty_table()
        if limit is not None:
            table = table.slice(0, limit)
        out = {}
        for name in columns:
            if pa.types.is_fixed_size_list(table.schema.field(name).type):
                out[name] = column_numpy(table, name, self.shape(name))
            else:
                out[name] = np.array(table[name].to_pylist(), dtype=object)
        return out


def open_store(store_url: str) -> Store:
    return Store(storage.normalize(store_url), read_manifest(store_url))


def tensors(store: Store, columns: Sequence[str], files: Sequence[str] | None = None) -> dict[str, Any]:
    """Chosen array columns as torch tensors (float16 stays float16; bool stays bool)."""
    import torch  # lazy: readers of numpy columns (DuckDB users, inspect) need no torch

    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in store.read(columns, files).items()}


def column_bytes(store: Store) -> dict[str, float]:
    """Stored (compressed) bytes per sample of every column, from the parts index."""
    names = [f"bytes:{c}" for c in store.manifest["columns"]]
    table = read_index(store.url, store.manifest, names)
    rows = max(int(store.manifest["totals"]["rows"]), 1)
    return {name[len("bytes:") :]: (pc.sum(table[name]).as_py() or 0) / rows for name in names}


def describe(store: Store, sample_rows: int = 3) -> str:
    """What `unclip inspect` prints: manifest summary, columns, a few rows."""
    m = store.manifest
    clip, vae = m["encoders"]["clip"], m["encoders"].get("vae") or {}
    totals = m["totals"]
    lines = [
        f"store        {store.url}",
        f"schema       v{m['schema_version']}, created {m['created']}",
        f"rows         {totals['rows']:,} in {totals['parts']:,} parts ({totals['empty_parts']:,} empty), "
        f"{totals['bytes']:,} bytes",
        "counts       " + ", ".join(f"{k}={v:,}" for k, v in totals["counts"].items()),
        f"clip         {clip.get('model')} pretrained={clip.get('pretrained')} "
        f"sha256={str(clip.get('weights_sha256'))[:16]}…",
    ]
    if vae:
        lines.append(
            f"vae          {vae.get('path')} scaling_factor={vae.get('scaling_factor')} "
            f"sha256={str(vae.get('weights_sha256'))[:16]}…"
        )
    sizes = column_bytes(store)
    lines.append("")
    lines.append(f"{'column':<20} {'dtype':<8} {'shape':<16} {'bytes/sample':>12}")
    for name, spec in m["columns"].items():
        shape = "x".join(str(d) for d in spec.get("shape", [])) or "-"
        lines.append(f"{name:<20} {spec['dtype']:<8} {shape:<16} {sizes.get(name, 0):>12,.1f}")
    if totals["rows"] and sample_rows:
        arrays = [c for c in ("clip_image_emb", "clip_text_emb") if c in m["columns"]]
        data = store.read(["key", "caption", "clip_score", *arrays], store.files[:1])
        lines.append("")
        for i in range(min(sample_rows, len(data["key"]))):
            preview = "  ".join(f"{c}[:3]={np.round(data[c][i][:3].astype(float), 3).tolist()}" for c in arrays)
            lines.append(
                f"{data['key'][i]}  clip_score={float(data['clip_score'][i]):.3f}  {data['caption'][i]!r}  {preview}"
            )
    return "\n".join(lines)
