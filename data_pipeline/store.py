"""The embedding store contract (DESIGN.md): the one module that knows its layout.

ROOT/store/
  part-NNNNN.parquet   one row per kept sample; NNNNN is the raw shard it came from
  part-NNNNN.json      rows, sha256 and embedding sums of that part; written after the parquet,
                       it marks the part complete
  manifest.json        written last, when every raw shard has its part

Arrays are fixed-size lists of float16 (bool for the mask), flattened; the manifest gives each
column's shape. Trainers read through `open_store`, which checks the manifest against what the
trainer expects and names the field that differs.
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import storage

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ENCODERS_LOCK = "_encoders.json"  # identity of the encoders a store is being built with
BASE_COLUMNS = {"key": pa.string(), "caption": pa.string(), "url": pa.string(), "width": pa.int32(),
                "height": pa.int32(), "clip_score": pa.float32()}  # fmt: skip
_PART = re.compile(r"part-(\d+)\.json")


class StoreError(ValueError):
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
                raise StoreError(f"column {name!r}: side {latent_columns[name]} is not a multiple of the VAE's downsampling {vae['downsample']}")
            side = latent_columns[name] // vae["downsample"]
            specs[name] = {"dtype": "float16", "shape": [vae["latent_channels"], side, side], "image_side": latent_columns[name]}
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


def empty_columns(specs: dict[str, dict]) -> dict[str, Any]:
    """Columns of a part with no rows (a shard where nothing was kept still gets its part)."""
    rows: dict[str, Any] = {k: [] for k in BASE_COLUMNS}
    for name, spec in specs.items():
        rows[name] = [] if spec["dtype"] == "png" else np.zeros((0, *spec["shape"]))
    return rows


def write_part(store_url: str, shard_id: int, table: pa.Table, counts: dict[str, int] | None = None) -> dict[str, Any]:
    """Commit one part: the parquet (atomic), then its sidecar, which marks it complete.

    `counts` (kept, rejected_<reason>) is kept in the sidecar so the manifest's totals include
    parts written by earlier, interrupted runs."""
    table = table.sort_by("key")
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=1024)
    data = buf.getvalue()
    name = part_name(shard_id)
    storage.write_bytes(storage.join(store_url, name + ".parquet"), data)
    meta = pq.read_metadata(io.BytesIO(data))
    entry: dict[str, Any] = {"file": name + ".parquet", "rows": len(table), "bytes": len(data), "sha256": _sha256(data),
                             # so trainers lay out the row groups from the manifest, not from every file's footer
                             "row_groups": [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]}  # fmt: skip
    entry["sums"] = _sums(table)
    entry["counts"] = dict(counts or {"kept": len(table)})
    storage.write_json(storage.join(store_url, name + ".json"), entry)
    return entry


# Statistics the trainers need, kept per part as sums so a resumed job never rereads old parts:
# the CLIP image embedding per dimension (the prior normalises with it) and each VAE latent
# overall (the ldm scales latents to unit variance with it).
def _stat_axis(name: str) -> int | None | bool:
    """0: per dimension; None: over every element; False: no statistics."""
    return 0 if name == "clip_image_emb" else None if name.startswith("vae_latent") else False


def _sums(table: pa.Table) -> dict[str, dict[str, Any]]:
    sums = {}
    for name in table.column_names:
        axis = _stat_axis(name)
        if axis is not False and len(table):
            values = column_numpy(table, name, [-1]).astype(np.float64)
            sums[name] = {
                "count": len(table) if axis == 0 else values.size,
                "sum": values.sum(axis).tolist(),
                "sumsq": (values**2).sum(axis).tolist(),
            }
    return sums


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def complete_parts(store_url: str) -> dict[int, dict]:
    """Sidecars of every committed part, by raw shard id."""
    found = {}
    for name in storage.listdir(store_url):
        match = _PART.fullmatch(name)
        if match:
            found[int(match.group(1))] = storage.read_json(storage.join(store_url, name))
    return found


HOLDOUT_SEED = 20221126  # fixed: the held-out rows of a part never change


def heldout_mask(part_id: int, rows: int, fraction: float) -> np.ndarray:
    """Which rows of part `part_id` are held out from training (for `unclip eval`).

    A function of the part and row position only, so every trainer and the evaluator agree
    without reading a single key."""
    if fraction <= 0:
        return np.zeros(rows, bool)
    return np.random.default_rng([HOLDOUT_SEED, part_id]).random(rows) < fraction


def part_id(file: str) -> int:
    return int(re.search(r"part-(\d+)\.parquet$", file).group(1))


def build_manifest(
    store_url: str,
    parts: dict[int, dict],
    encoders: dict[str, Any],
    specs: dict[str, dict],
    counts: dict[str, int],
    config: dict[str, Any],
    holdout_fraction: float = 0.0,
) -> dict[str, Any]:
    rows = sum(p["rows"] for p in parts.values())
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "encoders": encoders,
        "columns": {**{k: {"dtype": str(t)} for k, t in BASE_COLUMNS.items()}, **specs},
        "shards": [{k: v for k, v in p.items() if k not in ("sums", "counts")} for _, p in sorted(parts.items())],
        "totals": {"rows": rows, "bytes": sum(p["bytes"] for p in parts.values()), **counts},
        "holdout": {"fraction": holdout_fraction, "seed": HOLDOUT_SEED},
        "config": config,
    }
    for name in [c for c in specs if _stat_axis(c) is not False]:
        stats = [p["sums"][name] for p in parts.values() if name in p.get("sums", {})]
        count = sum(s["count"] for s in stats)
        if count:
            mean = np.sum([s["sum"] for s in stats], axis=0) / count
            var = np.sum([s["sumsq"] for s in stats], axis=0) / count - mean**2
            manifest[f"{name}_mean"] = mean.tolist()
            manifest[f"{name}_std"] = np.sqrt(np.maximum(var, 0.0)).tolist()
    storage.write_json(storage.join(store_url, MANIFEST), manifest)
    return manifest


def read_manifest(store_url: str) -> dict[str, Any]:
    path = storage.join(store_url, MANIFEST)
    if not storage.exists(path):
        raise StoreError(f"store '{store_url}': no {MANIFEST} (run `unclip embed` first, or it did not finish)")
    manifest = storage.read_json(path)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"store '{store_url}': manifest field 'schema_version' is {manifest.get('schema_version')!r}, "
            f"expected {SCHEMA_VERSION}"
        )
    return manifest


def column_numpy(table: pa.Table, name: str, shape: Sequence[int]) -> np.ndarray:
    """A fixed-size-list column as an array of shape [rows, *shape]."""
    column = table[name].combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).reshape(len(table), *shape)


@dataclass
class Store:
    url: str
    manifest: dict[str, Any]

    @property
    def files(self) -> list[str]:
        return [storage.join(self.url, s["file"]) for s in self.manifest["shards"]]

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

    def read(self, columns: Sequence[str], files: Sequence[str] | None = None, split: str = "all",
             limit: int | None = None) -> dict[str, np.ndarray]:  # fmt: skip
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
    import torch

    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in store.read(columns, files).items()}


def column_bytes(store: Store) -> dict[str, float]:
    """Stored (compressed) bytes per sample of every column, from the parquet footers."""
    totals: dict[str, int] = {}
    rows = 0
    for file in store.files:
        fs, path = storage.url_to_fs(file)
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        rows += meta.num_rows
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                chunk = group.column(c)
                name = chunk.path_in_schema.split(".")[0]
                totals[name] = totals.get(name, 0) + chunk.total_compressed_size
    return {name: size / max(rows, 1) for name, size in totals.items()}


def describe(store: Store, sample_rows: int = 3) -> str:
    """What `unclip inspect` prints: manifest summary, columns, a few rows."""
    m = store.manifest
    clip, vae = m["encoders"]["clip"], m["encoders"].get("vae") or {}
    lines = [
        f"store        {store.url}",
        f"schema       v{m['schema_version']}, created {m['created']}",
        f"rows         {m['totals']['rows']:,} in {len(m['shards'])} parts, {m['totals']['bytes']:,} bytes",
        f"counts       " + ", ".join(f"{k}={v:,}" for k, v in m["totals"].items() if k not in ("rows", "bytes")),
        f"clip         {clip['model']} pretrained={clip.get('pretrained')} sha256={str(clip.get('weights_sha256'))[:16]}…",
    ]
    if vae:
        lines.append(f"vae          {vae['path']} scaling_factor={vae['scaling_factor']} sha256={str(vae.get('weights_sha256'))[:16]}…")
    sizes = column_bytes(store)
    lines.append("")
    lines.append(f"{'column':<20} {'dtype':<8} {'shape':<16} {'bytes/sample':>12}")
    for name, spec in m["columns"].items():
        shape = "x".join(str(d) for d in spec.get("shape", [])) or "-"
        lines.append(f"{name:<20} {spec['dtype']:<8} {shape:<16} {sizes.get(name, 0):>12,.1f}")
    if m["totals"]["rows"] and sample_rows:
        first = store.files[next(i for i, s in enumerate(m["shards"]) if s["rows"])]
        arrays = [c for c in ("clip_image_emb", "clip_text_emb") if c in m["columns"]]
        data = store.read(["key", "caption", "clip_score", *arrays], [first])
        lines.append("")
        for i in range(min(sample_rows, len(data["key"]))):
            preview = "  ".join(f"{c}[:3]={np.round(data[c][i][:3].astype(float), 3).tolist()}" for c in arrays)
            lines.append(f"{data['key'][i]}  clip_score={float(data['clip_score'][i]):.3f}  {data['caption'][i]!r}  {preview}")
    return "\n".join(lines)
