"""`unclip embed`: image shards -> frozen CLIP/VAE outputs -> the embedding store, in Ray tasks.

Pipeline (data_pipeline/embed_worker.py): one task per shard reads it, cuts it into chunks of
`embed.batch_size`, decodes and crops each chunk for every consumer and sends it to a pool of
encoder actors (a GPU each when there is one), one chunk per forward pass; what comes back is
written into part-NNNNN by the same task as it arrives, and the part is committed with its
sidecar. The driver receives only each part's id, rows, sha256 and counts (a few hundred bytes),
then rebuilds the parts index and manifest from the committed sidecars (store_writer.py).

Why tasks and actors of our own rather than Ray Data: a part is one file written in order,
so a shard's chunks must meet in one writer. Ray Data sends each block to whichever actor is
free and would need a shuffle (the whole part in one place) to bring them together; here the
shard's task keeps them together by construction and holds only the chunks in flight.

A part is the unit of resume: a rerun encodes only shards without a committed part, and, since
chunks are fixed per shard, reproduces the values an uninterrupted run would have written.
Rows that cannot be used are counted by reason in the sidecar, never written. Part N comes from
shard N whichever job embeds it, so jobs over disjoint `embed.shards` ranges fill one store.
"""

from __future__ import annotations

import collections
import hashlib
import pickle
import time
from collections import Counter
from typing import Any

import ray
import ray.exceptions
import torch

from data_pipeline import ray_wait, sources, store, store_writer, tasks
from data_pipeline.config import EmbedConfig, RayConfig
from data_pipeline.embed_worker import Encoder, ShardJob, embed_shard
from data_pipeline.ray_runtime import ray_session
from models.base import storage
from models.base.errors import StorageUnavailable
from models.config import EncodersConfig
from models.encoders import clip_identity, clip_preprocess, identity_mismatch, vae_identity

SOURCES = "_sources"  # per job: the shard files it was given; a rerun must present the same ones


def _device(cfg: EmbedConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def encoder_identity(encoders: EncodersConfig, cfg: EmbedConfig) -> tuple[dict[str, Any], dict[str, dict]]:
    """The encoders' identities and the store's columns, from configs and weight files: the driver
    (often a small head node) never loads a model."""
    clip = clip_identity(encoders.clip)
    vae = vae_identity(encoders.vae) if "vae_latent" in cfg.columns else None
    identity = {"clip": clip, "vae": vae, "precision": cfg.precision, "vae_resolution": cfg.vae_resolution}
    return identity, store.column_specs(clip, vae, cfg.columns, cfg.latent_columns())


def check_same_encoders(
    store_url: str, identity: dict[str, Any], specs: dict[str, dict], cfg: EmbedConfig, config: dict[str, Any]
) -> dict[str, Any]:
    """Record what the store is built with, or refuse to mix in other encoders or settings;
    returns the record (what a manifest is rebuilt from)."""
    current = {
        "encoders": identity,
        "columns": sorted(specs),
        "specs": specs,
        "min_clip_score": cfg.min_clip_score,
        "holdout_fraction": cfg.holdout_fraction,
        "config": config,
    }
    existing = store_writer.read_lock(store_url)
    if existing is None:
        store_writer.write_lock(store_url, current)
        return current
    if "specs" not in existing:
        raise store.StoreError(
            f"store '{store_url}' was started by an earlier unclip; convert it with `unclip manifest {store_url}`"
        )
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
        ("embed.holdout_fraction", existing.get("holdout_fraction"), cfg.holdout_fraction),
    ):
        if old != new:
            raise store.StoreError(
                f"store '{store_url}' was built with {key}={old!r}, now {new!r}; embed into a new root"
            )
    return {**existing, "config": config}


def _check_same_sources(store_url: str, source: sources.Source, done: set[int]) -> None:
    """Each job records which file each of its shards is; a part already made from another file
    (or another kind of input) under the same id is refused before any work."""
    folder = storage.join(store_url, SOURCES)
    mine = {"kind": source.kind, "shards": {str(i): source.name_of(i) for i in source.ids}}
    for name in storage.listdir(folder):
        recorded = storage.read_json(storage.join(folder, name))
        for shard_id in sorted(done & {int(i) for i in recorded["shards"]} & set(source.ids)):
            old, new = recorded["shards"][str(shard_id)], mine["shards"][str(shard_id)]
            if old != new or recorded["kind"] != source.kind:
                raise store.StoreError(
                    f"store '{store_url}': part {shard_id} was embedded from {recorded['kind']} {old!r}, "
                    f"the input now has {source.kind} {new!r} there; embed into a new root to change the input"
                )
    digest = hashlib.sha256(storage.strict_json(mine, sort_keys=True).encode()).hexdigest()[:16]
    storage.write_json(storage.join(folder, f"{digest}.json"), mine)


def run(
    encoders: EncodersConfig,
    cfg: EmbedConfig,
    ray_cfg: RayConfig,
    raw_url: str,
    store_url: str,
    config: dict[str, Any],
    log=print,
) -> dict[str, Any]:

    started = time.time()
    source = sources.open_source(cfg.input, raw_url, cfg.input_format, cfg.image_col, cfg.caption_col).select(
        cfg.shards
    )
    identity, specs = encoder_identity(encoders, cfg)
    storage.makedirs(store_url)
    lock = check_same_encoders(store_url, identity, specs, cfg, config)
    done = set(store_writer.committed_parts(store_url))
    _check_same_sources(store_url, source, done)
    storage.remove_stale_temporaries(store_url, older_than_s=store_writer.STALE_AFTER_S)
    storage.remove(storage.join(store_url, store.MANIFEST))  # it comes back when every part is in
    todo = [s for s in source.ids if s not in done]
    log(
        f"embed: {len(source.ids)} {source.kind} shards, {len(source.ids) - len(todo)} already in the store, "
        f"{len(todo)} to encode"
    )
    job = ShardJob(
        source,
        store_url,
        specs,
        cfg.holdout_fraction,
        cfg.batch_size,
        clip_preprocess(encoders.clip).image_size,
        cfg.latent_columns(),
        [c for c in specs if c.startswith("image_")],
    )
    null_missing = "clip_text_tokens" in specs and not storage.exists(storage.join(store_url, store.NULL_CAPTION))
    if not todo and not null_missing:
        return store_writer.build_manifest(store_url, lock, config, log)
    with ray_session(ray_cfg):
        failed = _encode(todo, job, encoders, cfg, started, log, null_missing)
        if failed:
            raise store.StoreError(
                f"store '{store_url}': shards {sorted(failed)[:5]} did not complete ({next(iter(failed.values()))}); "
                "rerun `unclip embed`, which keeps the committed parts"
            )
        manifest = store_writer.build_manifest(store_url, lock, config, log)
    log(
        f"embed: {manifest['totals']['rows']} rows in {manifest['totals']['parts']} parts, {time.time() - started:.1f}s"
    )
    return manifest


def _encode(
    todo: list[int],
    job: ShardJob,
    encoders: EncodersConfig,
    cfg: EmbedConfig,
    started: float,
    log,
    null_caption: bool = False,
) -> dict[int, str]:
    """Run the shard tasks, a bounded number at once; returns the shards that failed, with why.
    `null_caption`: an encoder also embeds the empty caption (the driver loads no model)."""
    device = _device(cfg)
    actor_need = ray_wait.Need("encoder actor", {"CPU": cfg.actor_cpus, "GPU": 1 if device == "cuda" else 0})
    actor = ray.remote(Encoder).options(**actor_need.options(), max_restarts=2, max_task_retries=2)
    pool: list[Any] = [  # actor handles (Ray types them as proxies of the class)
        actor.remote(encoders, job.specs, device, cfg.precision, int(cfg.actor_cpus), cfg.min_clip_score)
        for _ in range(cfg.encoder_actors)
    ]
    free = ray.cluster_resources().get("CPU", 1) - cfg.encoder_actors * cfg.actor_cpus
    if free < cfg.decode_cpus:
        raise store.StoreError(
            f"embed: {cfg.encoder_actors} encoder actors x embed.actor_cpus={cfg.actor_cpus} reserve every CPU of "
            "the cluster; "
            f"leave embed.decode_cpus={cfg.decode_cpus} for the shard tasks"
        )
    task_need = ray_wait.Need("shard task", {"CPU": cfg.decode_cpus, "memory": cfg.decode_memory_gb * 2**30})
    task = ray.remote(**task_need.options(), max_retries=2)(embed_shard)
    null_ref = pool[0].write_null_caption.remote(job.store_url) if null_caption else None
    job_ref = ray.put(job)
    waiting = collections.deque(todo)
    pending: dict[Any, int] = {}
    failed: dict[int, str] = {}
    counts: Counter[str] = Counter()
    written = received = 0
    waiter = ray_wait.Waiter(
        "embed",
        log,
        progress=lambda: f"embed: {written}/{len(todo)} parts written",
        kept=lambda: (
            f"the {written} parts written in this run and those before it are kept: rerun `unclip embed` once "
            "the cluster can run them"
        ),
        progress_every_s=cfg.progress_every_s,
        actors=[(actor_need, cfg.encoder_actors)],
    )
    # Twice the tasks the free CPUs hold: a task waiting on an encoder gives its CPU back to Ray
    # (ray.get releases it), so the next shard starts decoding before the last one's chunks are back.
    limit = 2 * max(1, int(free // cfg.decode_cpus))
    try:
        while waiting or pending:
            while waiting and len(pending) < limit:
                shard = waiting.popleft()
                pending[task.remote(job_ref, shard, pool)] = shard
            ready = waiter.wait(pending, task_need, queued=len(waiting))
            shard = pending.pop(ready[0])
            try:
                part = ray.get(ready[0])
            except Exception as err:  # one shard's failure must not cost the others their work
                cause = getattr(err, "cause", None) or err
                # bad input, or a store that stays down: one line, at once (every other shard would meet it too)
                if isinstance(cause, (sources.SourceError, store.StoreError, StorageUnavailable)):
                    tasks.raise_cause(err)
                failed[shard] = f"{type(cause).__name__}: {cause}"
                log(f"embed: shard {shard} failed: {failed[shard]}")
                continue
            written += 1
            received += len(pickle.dumps(part))
            counts.update(part["counts"])
            log(
                f"embed: {store.part_name(shard)} written ({written}/{len(todo)}), "
                f"{counts['kept'] / (time.time() - started):.1f} samples/s"
            )
        if null_ref is not None:
            try:
                waiter.wait([null_ref], None)
                ray.get(null_ref)
            except ray.exceptions.RayTaskError as err:  # a store that stays down: its one line
                tasks.raise_cause(err)
    finally:  # stopped early: a driver that goes on (a notebook, a retrying job) gets the CPUs back
        for ref in pending:
            ray.cancel(ref, force=True)
        for encoder in pool:
            ray.kill(encoder)
    if written:
        log(
            f"embed: the driver received {received / written:.0f} bytes a part "
            f"({counts['kept'] / written:.0f} rows a part)"
        )
    return failed
