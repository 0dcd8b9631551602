"""`unclip embed`: image shards -> frozen CLIP/VAE outputs -> the embedding store, with Ray Data.

Pipeline (stages in data_pipeline/embed_stages.py):
  one CPU task per shard reads it, cuts it into chunks of `embed.batch_size` and decodes, resizes
  and crops each chunk for every consumer -> a pool of encoder actors (a GPU each when there is
  one) runs the frozen encoders, one chunk per forward pass -> the driver gathers each shard's
  chunks and commits `part-NNNNN` once the last one arrived (data_pipeline/store.py).

A part is the unit of resume: a rerun encodes only shards without a committed part, and, since
chunks are fixed per shard, reproduces the values an uninterrupted run would have written.
Rows that cannot be used travel to the end with `rejected` set, so a shard is known complete;
they are counted by reason in the manifest, never written.

The driver receives every output row; one driver writes at disk/network speed, which is ample for
one node's encoders. Across many nodes, run one embed per range of shards (`embed.input` globs).
"""

from __future__ import annotations

import logging
import pickle
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from data_pipeline import sources, storage, store
from data_pipeline.config import EmbedConfig, RayConfig
from data_pipeline.embed_stages import EncodeChunks, load_chunks
from models.config import EncodersConfig
from models.encoders import identity_mismatch

SOURCES = "_sources.json"  # the shard list a store was started from; a rerun must present the same


def _device(cfg: EmbedConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def encoder_identity(encoders: EncodersConfig, cfg: EmbedConfig) -> tuple[dict[str, Any], dict[str, dict]]:
    """The encoders' identities and the store's columns, from configs and weight files: the driver
    (often a small head node) never loads a model."""
    from models.encoders import clip_identity, vae_identity

    clip = clip_identity(encoders.clip)
    vae = vae_identity(encoders.vae) if "vae_latent" in cfg.columns else None
    identity = {"clip": clip, "vae": vae, "precision": cfg.precision, "vae_resolution": cfg.vae_resolution}
    return identity, store.column_specs(clip, vae, cfg.columns, cfg.latent_columns())


def check_same_encoders(store_url: str, identity: dict[str, Any], specs: dict[str, dict], cfg: EmbedConfig) -> None:
    """Record what the store is built with, or refuse to mix in other encoders or settings."""
    lock_url = storage.join(store_url, store.ENCODERS_LOCK)
    current = {"encoders": identity, "columns": sorted(specs), "min_clip_score": cfg.min_clip_score}
    if not storage.exists(lock_url):
        storage.write_json(lock_url, current)
        return
    existing = storage.read_json(lock_url)
    for section in ("clip", "vae"):
        differs = identity_mismatch(existing["encoders"].get(section) or {}, identity.get(section) or {})
        if differs:
            field, old, new = differs
            raise store.StoreError(
                f"store '{store_url}' was built with other encoders: encoders.{section}.{field} is "
                f"{old!r} there, {new!r} now; embed into a new root or use the same encoders"
            )
    for key, old, new in (
        ("embed.precision", existing["encoders"].get("precision"), identity["precision"]),
        ("embed.vae_resolution", existing["encoders"].get("vae_resolution"), identity["vae_resolution"]),
        ("embed.columns", existing["columns"], current["columns"]),
        ("embed.min_clip_score", existing.get("min_clip_score"), cfg.min_clip_score),
    ):
        if old != new:
            raise store.StoreError(f"store '{store_url}' was built with {key}={old!r}, now {new!r}; embed into a new root")


def _check_same_sources(store_url: str, source: sources.Source, done: set[int]) -> None:
    path = storage.join(store_url, SOURCES)
    described = source.describe()
    if storage.exists(path) and done:
        recorded = storage.read_json(path)
        for shard_id in sorted(done):
            old = recorded["files"][shard_id] if shard_id < len(recorded["files"]) else None
            new = described["files"][shard_id] if shard_id < len(described["files"]) else None
            if old != new or recorded["kind"] != described["kind"]:
                raise store.StoreError(
                    f"store '{store_url}': part {shard_id} was embedded from {old!r}, the input now has {new!r} "
                    "there; embed into a new root to change the input"
                )
    storage.write_json(path, described)


def run(
    encoders: EncodersConfig,
    cfg: EmbedConfig,
    ray_cfg: RayConfig,
    raw_url: str,
    store_url: str,
    config: dict[str, Any],
    log=print,
) -> dict[str, Any]:
    import ray

    from data_pipeline.ray_runtime import ray_session
    from models.encoders import clip_preprocess

    started = time.time()
    source = sources.open_source(cfg.input, raw_url, cfg.input_format, cfg.image_col, cfg.caption_col)
    identity, specs = encoder_identity(encoders, cfg)
    storage.makedirs(store_url)
    check_same_encoders(store_url, identity, specs, cfg)
    parts = store.complete_parts(store_url)
    _check_same_sources(store_url, source, set(parts))
    storage.remove_stale_temporaries(store_url)
    storage.remove(storage.join(store_url, store.MANIFEST))  # it comes back when every part is in
    shard_ids = list(range(len(source.files)))
    todo = [s for s in shard_ids if s not in parts]
    log(f"embed: {len(shard_ids)} {source.kind} shards, {len(parts)} already in the store, {len(todo)} to encode")
    counts: Counter[str] = Counter(_earlier_counts(parts))
    if todo:
        device = _device(cfg)
        with ray_session(ray_cfg):
            ray.data.DataContext.get_current().enable_progress_bars = False  # our per-part lines say it once
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            load_kwargs = {
                "source": source,
                "chunk_size": cfg.batch_size,
                "clip_size": clip_preprocess(encoders.clip).image_size,
                "latent_sides": cfg.latent_columns(),
                "image_columns": [c for c in specs if c.startswith("image_")],
            }
            ds = (
                ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
                # Declaring the memory a decode task holds also keeps Ray Data from fusing decoding
                # into the encoder actors, which it does whenever both stages ask for identical
                # resources (as on a CPU-only node).
                .flat_map(load_chunks, fn_kwargs=load_kwargs, num_cpus=cfg.decode_cpus, memory=cfg.decode_memory_gb * 2**30)
                .map_batches(
                    EncodeChunks,
                    fn_constructor_args=(encoders, specs, device, cfg.precision, int(cfg.actor_cpus), cfg.min_clip_score),
                    batch_size=1,
                    batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=cfg.encoder_actors),
                    num_cpus=cfg.actor_cpus,
                    num_gpus=1 if device == "cuda" else 0,
                )
            )  # fmt: skip
            _collect(ds, store_url, specs, parts, counts, len(shard_ids), started, log)
    unfinished = [s for s in shard_ids if s not in parts]
    if unfinished:
        raise store.StoreError(f"store '{store_url}': shards {unfinished[:5]} did not complete; rerun `unclip embed`")
    manifest = store.build_manifest(store_url, parts, identity, specs, dict(counts), config, cfg.holdout_fraction)
    log(f"embed: {manifest['totals']['rows']} rows in {len(parts)} parts, {time.time() - started:.1f}s")
    return manifest


def _earlier_counts(parts: dict[int, dict]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for part in parts.values():
        counts.update(part.get("counts", {}))
    return counts


def _collect(ds, store_url: str, specs: dict, parts: dict, counts: Counter, total: int, started: float, log) -> None:
    """Gather chunks by shard; commit a part (on a writer thread) once its last chunk is in."""
    chunks: dict[int, dict[int, dict]] = defaultdict(dict)
    writes: dict[int, Future] = {}
    with ThreadPoolExecutor(2) as writer:
        for row in ds.iter_rows():
            shard = int(row["shard"])
            chunks[shard][int(row["chunk"])] = pickle.loads(row["payload"])
            if len(chunks[shard]) == int(row["chunks"]):
                arrived = chunks.pop(shard)
                ordered = [arrived[i] for i in range(int(row["chunks"]))]
                writes[shard] = writer.submit(_commit, store_url, shard, ordered, specs)
            for done in [s for s, f in writes.items() if f.done()]:
                parts[done] = writes.pop(done).result()
                counts.update(parts[done]["counts"])
                log(f"embed: part {store.part_name(done)} written ({len(parts)}/{total}), "
                    f"{counts['kept'] / (time.time() - started):.1f} samples/s")  # fmt: skip
        for shard, future in writes.items():
            parts[shard] = future.result()
            counts.update(parts[shard]["counts"])


def _commit(store_url: str, shard_id: int, chunks: list[dict[str, Any]], specs: dict) -> dict:
    chunks = [c for c in chunks if len(c["key"])]
    rejected = [r for c in chunks for r in c["rejected"]]
    counts: Counter[str] = Counter(f"rejected_{r}" for r in rejected if r)
    keep = np.array([not r for r in rejected], dtype=bool)
    counts["kept"] = int(keep.sum())
    if chunks:
        rows = {k: np.concatenate([_as_array(c[k]) for c in chunks])[keep] for k in [*store.BASE_COLUMNS, *specs]}
    else:
        rows = store.empty_columns(specs)
    return store.write_part(store_url, shard_id, store.to_arrow(rows, specs), dict(counts))


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    array = np.empty(len(values), dtype=object)  # strings and bytes stay Python objects
    array[:] = values
    return array
