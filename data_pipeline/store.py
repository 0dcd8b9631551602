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


def column_specs(clip: dict[str, Any], vae: dict[str, Any] | None, columns: Sequence[str], vae_resolution: int) -> dict[str, dict]:
    """dtype and per-row shape of every array/bytes column, from the encoders' identities."""
    d, length, width = clip["embed_dim"], clip["context_length"], clip["text_width"]
    specs: dict[str, dict] = {}
    for name in columns:
        if name in ("clip_image_emb", "clip_text_emb"):
            specs[name] = {"dtype": "float16", "shape": [d]}
        elif name == "clip_text_tokens":
            specs[name] = {"dtype": "float16", "shape": [length, width]}
        elif name == "text_mask":
            specs[name] = {"dtype": "bool", "shape": [length]}
        elif name == "vae_latent":
            if vae is None:
                raise StoreError("column 'vae_latent' needs a VAE (encoders.vae)")
            side = vae_resolution // vae["downsample"]
            specs[name] = {"dtype": "float16", "shape": [vae["latent_channels"], side, side]}
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


def write_part(store_url: str, shard_id: int, table: pa.Table) -> dict[str, Any]:
    """Commit one part: the parquet (atomic), then its sidecar, which marks it complete."""
    table = table.sort_by("key")
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=1024)
    data = buf.getvalue()
    name = part_name(shard_id)
    storage.write_bytes(storage.join(store_url, name + ".parquet"), data)
    entry: dict[str, Any] = {"file": name + ".parquet", "rows": len(table), "bytes": len(data), "sha256": _sha256(data)}
    entry["sums"] = _sums(table)
    storage.write_json(storage.join(store_url, name + ".json"), entry)
    return entry


# Statistics the trainers need, kept per part as sums so a resumed job never rereads old parts:
# the CLIP image embedding per dimension (the prior normalises with it) and the VAE latent
# overall (the ldm scales latents to unit variance with it).
STAT_COLUMNS = {"clip_image_emb": 0, "vae_latent": None}  # reduction axis; None: every element


def _sums(table: pa.Table) -> dict[str, dict[str, Any]]:
    sums = {}
    for name, axis in STAT_COLUMNS.items():
        if name in table.column_names and len(table):
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


def build_manifest(
    store_url: str,
    parts: dict[int, dict],
    encoders: dict[str, Any],
    specs: dict[str, dict],
    counts: dict[str, int],
    config: dict[str, Any],
) -> dict[str, Any]:
    rows = sum(p["rows"] for p in parts.values())
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "encoders": encoders,
        "columns": {**{k: {"dtype": str(t)} for k, t in BASE_COLUMNS.items()}, **specs},
        "shards": [{k: v for k, v in p.items() if k != "sums"} for _, p in sorted(parts.items())],
        "totals": {"rows": rows, "bytes": sum(p["bytes"] for p in parts.values()), **counts},
        "config": config,
    }
    for name in STAT_COLUMNS:
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

    def read(self, columns: Sequence[str], files: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Chosen columns of chosen parts as arrays ([N, *shape]; bytes and strings as object arrays)."""
        tables = []
        for file in files or self.files:
            fs, path = storage.url_to_fs(file)
            with fs.open(path, "rb") as f:
                tables.append(pq.read_table(f, columns=list(columns)))
        table = pa.concat_tables(tables) if tables else arrow_schema({}).empty_table()
        out = {}
        for name in columns:
            if pa.types.is_fixed_size_list(table.schema.field(name).type):
                out[name] = column_numpy(table, name, self.shape(name))
            else:
                out[name] = np.array(table[name].to_pylist(), dtype=object)
        return out


def open_store(store_url: str) -> Store:
    return Store(storage.normalize(store_url), read_manifest(store_url))
