"""`unclip embed`: raw shards -> frozen CLIP/VAE outputs -> the embedding store, with Ray Data.

Pipeline: one read task per raw shard (tar + its status parquet) -> CPU tasks decode, resize and
crop for each consumer -> a pool of encoder actors (GPU when there is one) runs the frozen
encoders -> the driver groups rows by raw shard and commits `part-NNNNN` once every row of that
shard came back. A part is the unit of resume: a rerun encodes only raw shards without a part.

Rows that cannot be used (undecodable image, non-finite encoder output) travel to the end with
`rejected` set, so a part is known complete by count; they are counted, never written.
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from data_pipeline import raw, storage, store
from data_pipeline.config import EmbedConfig, RayConfig
from models.config import EncodersConfig

PIXEL_COLUMNS = ("clip_pixels", "vae_pixels")


def _resize_center_crop(image, side: int):
    from PIL import Image

    scale = side / min(image.size)
    w, h = max(side, round(image.width * scale)), max(side, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def raw_rows(item: dict[str, Any]) -> list[dict[str, Any]]:
    """Every kept sample of one raw shard, one row each."""
    shard_id = int(item["shard"])
    return [
        {
            "shard": shard_id,
            "key": m["uid"],
            "caption": m["caption"] or "",
            "url": m["url"],
            "width": int(m["width"] or 0),
            "height": int(m["height"] or 0),
            "image": m["image"] or b"",
            "rejected": "" if m["image"] else "missing_in_tar",
        }
        for m in raw.iter_samples(item["raw_url"], shard_id, set(item["dropped"]))
    ]


def preprocess(batch: dict[str, np.ndarray], clip_size: int, vae_size: int, image_columns: list[str]) -> dict[str, np.ndarray]:
    """CPU stage: decode once, then one crop per consumer (CLIP, VAE, stored image sizes)."""
    from PIL import Image

    n = len(batch["key"])
    clip = np.zeros((n, clip_size, clip_size, 3), np.uint8)
    vae = np.zeros((n, vae_size, vae_size, 3), np.uint8)
    stored = {c: [b""] * n for c in image_columns}
    rejected = batch["rejected"].copy()
    for i in range(n):
        if rejected[i]:
            continue
        try:
            image = Image.open(io.BytesIO(batch["image"][i])).convert("RGB")
        except Exception:  # any undecodable bytes: counted, never fatal
            rejected[i] = "decode_error"
            continue
        clip[i] = np.asarray(_resize_center_crop(image, clip_size))
        vae[i] = np.asarray(_resize_center_crop(image, vae_size))
        for column in image_columns:
            buf = io.BytesIO()
            _resize_center_crop(image, int(column.split("_")[1])).save(buf, format="PNG")
            stored[column][i] = buf.getvalue()
    out = {k: v for k, v in batch.items() if k != "image"}
    out.update(clip_pixels=clip, vae_pixels=vae, rejected=rejected)
    out.update({c: np.array(v, dtype=object) for c, v in stored.items()})
    return out


class Encode:
    """Encoder actor: loads the frozen encoders once, then encodes batches."""

    def __init__(self, encoders: EncodersConfig, columns: list[str], device: str, precision: str, threads: int):
        import torch

        from models.encoders import FrozenClip, FrozenVae

        torch.set_num_threads(max(1, threads))
        self.torch = torch
        self.columns = columns
        self.clip = FrozenClip(encoders.clip, device, precision)
        self.vae = FrozenVae(encoders.vae, device, precision) if "vae_latent" in columns else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        out = {k: v for k, v in batch.items() if k not in PIXEL_COLUMNS}
        pixels = torch.from_numpy(batch["clip_pixels"]).permute(0, 3, 1, 2).float() / 255.0
        image_emb = self.clip.encode_images(pixels)
        text = self.clip.encode_text([str(c) for c in batch["caption"]])
        out["clip_score"] = torch.nn.functional.cosine_similarity(image_emb, text["emb"], dim=-1).numpy().astype(np.float32)
        results = {
            "clip_image_emb": image_emb,
            "clip_text_emb": text["emb"],
            "clip_text_tokens": text["tokens"],
        }
        if self.vae is not None:
            vae_in = torch.from_numpy(batch["vae_pixels"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            results["vae_latent"] = self.vae.encode(vae_in)
        finite = torch.ones(len(pixels), dtype=torch.bool)
        for value in results.values():
            finite &= torch.isfinite(value.flatten(1)).all(1)
            # float16 storage: a value beyond its range would be stored as inf
            finite &= (value.flatten(1).abs() < 65504).all(1)
        rejected = batch["rejected"].copy()
        rejected[(~finite).numpy() & (rejected == "")] = "non_finite"
        for name, value in results.items():
            if name in self.columns:
                out[name] = value.nan_to_num(0.0).clamp(-65504, 65504).numpy().astype(np.float16)
        if "text_mask" in self.columns:
            out["text_mask"] = text["mask"].numpy()
        out["rejected"] = rejected
        return out


def _device(cfg: EmbedConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def encoder_identity(encoders: EncodersConfig, cfg: EmbedConfig) -> tuple[dict[str, Any], dict[str, dict]]:
    """Load the encoders once in the driver: it fails fast on bad weights and yields identities."""
    from models.encoders import FrozenClip, FrozenVae

    clip = FrozenClip(encoders.clip).identity()
    vae = FrozenVae(encoders.vae).identity() if "vae_latent" in cfg.columns else None
    identity = {"clip": clip, "vae": vae, "precision": cfg.precision, "vae_resolution": cfg.vae_resolution}
    return identity, store.column_specs(clip, vae, cfg.columns, cfg.vae_resolution)


def _check_same_encoders(store_url: str, identity: dict[str, Any], columns: list[str]) -> None:
    lock_url = storage.join(store_url, store.ENCODERS_LOCK)
    if not storage.exists(lock_url):
        storage.write_json(lock_url, {"encoders": identity, "columns": columns})
        return
    existing = storage.read_json(lock_url)
    for section in ("clip", "vae"):
        old, new = existing["encoders"].get(section) or {}, identity.get(section) or {}
        for field in sorted(set(old) | set(new)):
            if field != "weights_file" and old.get(field) != new.get(field):
                raise store.StoreError(
                    f"store '{store_url}' was built with other encoders: encoders.{section}.{field} is "
                    f"{old.get(field)!r} there, {new.get(field)!r} now; use a new store (root) or the same encoders"
                )
    for field in ("precision", "vae_resolution"):
        if existing["encoders"].get(field) != identity.get(field):
            raise store.StoreError(
                f"store '{store_url}' was built with embed.{field}={existing['encoders'].get(field)!r}, "
                f"now {identity.get(field)!r}; use a new store (root) or the same setting"
            )
    if existing["columns"] != columns:
        raise store.StoreError(
            f"store '{store_url}' was built with embed.columns={existing['columns']}, now {columns}"
        )


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
    raw.require_complete(raw_url)
    shards = raw.complete_shards(raw_url)
    dropped = raw.read_duplicates(raw_url)
    identity, specs = encoder_identity(encoders, cfg)
    storage.makedirs(store_url)
    storage.remove_stale_temporaries(store_url)
    _check_same_encoders(store_url, identity, cfg.columns)
    parts = store.complete_parts(store_url)
    todo = [s for s in shards if s not in parts]
    expected = {s: raw.kept_count(raw_url, s, dropped.get(s, set())) for s in todo}
    log(f"embed: {len(shards)} raw shards, {len(parts)} already in the store, {len(todo)} to encode")
    counts: Counter[str] = Counter()
    image_columns = [c for c in cfg.columns if c.startswith("image_")]
    device = _device(cfg)

    empty = [s for s in todo if expected[s] == 0]
    for shard_id in empty:
        parts[shard_id] = store.write_part(store_url, shard_id, store.to_arrow(_empty_rows(specs), specs))
    todo = [s for s in todo if expected[s] > 0]
    if todo:
        with ray_session(ray_cfg):
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # our per-part lines say the same, once
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            clip_size = clip_preprocess(encoders.clip).image_size
            ds = (
                ray.data.from_items([{"raw_url": raw_url, "shard": s, "dropped": sorted(dropped.get(s, ()))} for s in todo],
                                    override_num_blocks=len(todo))
                .flat_map(raw_rows)
                .map_batches(preprocess, fn_kwargs={"clip_size": clip_size, "vae_size": cfg.vae_resolution,
                             "image_columns": image_columns}, batch_size=cfg.batch_size, batch_format="numpy")
                .map_batches(
                    Encode,
                    fn_constructor_args=(encoders, cfg.columns, device, cfg.precision, int(cfg.actor_cpus)),
                    batch_size=cfg.batch_size,
                    batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=cfg.encoder_actors),
                    num_cpus=cfg.actor_cpus,
                    num_gpus=1 if device == "cuda" else 0,
                )
            )  # fmt: skip
            buffers: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
            arrived: Counter[int] = Counter()
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for shard_id in np.unique(batch["shard"]):
                    pick = batch["shard"] == shard_id
                    buffers[int(shard_id)].append({k: v[pick] for k, v in batch.items()})
                    arrived[int(shard_id)] += int(pick.sum())
                    if arrived[int(shard_id)] == expected[int(shard_id)]:
                        parts[int(shard_id)] = _commit(store_url, int(shard_id), buffers.pop(int(shard_id)), specs, counts)
                        log(
                            f"embed: part {store.part_name(int(shard_id))} written ({len(parts)}/{len(shards)}), "
                            f"{counts['kept'] / (time.time() - started):.1f} samples/s"
                        )
    unfinished = [s for s in shards if s not in parts]
    if unfinished:
        raise store.StoreError(f"store '{store_url}': raw shards {unfinished} did not complete; rerun `unclip embed`")
    manifest = store.build_manifest(store_url, parts, identity, specs, dict(counts), config)
    log(f"embed: {manifest['totals']['rows']} rows in {len(parts)} parts, {time.time() - started:.1f}s")
    return manifest


def _empty_rows(specs: dict[str, dict]) -> dict[str, Any]:
    rows: dict[str, Any] = {k: [] for k in store.BASE_COLUMNS}
    for name, spec in specs.items():
        rows[name] = [] if spec["dtype"] == "png" else np.zeros((0, *spec["shape"]))
    return rows


def _commit(store_url: str, shard_id: int, chunks: list[dict[str, np.ndarray]], specs: dict, counts: Counter) -> dict:
    rows = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    rejected = rows["rejected"]
    for reason in rejected[rejected != ""]:
        counts[f"rejected_{reason}"] += 1
    keep = rejected == ""
    counts["kept"] += int(keep.sum())
    rows = {k: v[keep] for k, v in rows.items()}
    return store.write_part(store_url, shard_id, store.to_arrow(rows, specs))
