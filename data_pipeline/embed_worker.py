"""What `unclip embed` (data_pipeline/embed.py) runs on a shard: its Ray task, and the pool of encoder actors.

The unit that travels to an encoder is a chunk: up to `embed.batch_size` consecutive samples of
one shard, decoded and cropped for every consumer. Encoders see exactly one chunk per forward
pass, so a shard's outputs do not depend on scheduling, and a rerun reproduces them bit for bit.
The shard's task decodes its chunks, sends each to an encoder actor, and writes what comes back
into the shard's part as it arrives (store_writer.PartWriter): a few chunks are in flight at a
time, so no process ever holds a whole part.
"""

from __future__ import annotations

import io
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from PIL import Image

from data_pipeline import sources, store, store_writer
from models.base import storage

IN_FLIGHT = 2  # chunks of one shard at the encoders at once: the next decodes while one encodes
FLOAT16_MAX = 65504.0


def resize_center_crop(image, side: int):
    scale = side / min(image.size)
    w, h = max(side, round(image.width * scale)), max(side, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def _decode(chunk: dict[str, Any], clip_size: int, latent_sides: dict[str, int], image_columns: list[str]) -> None:
    """Decode once, then one crop per consumer; adds pixel arrays, drops the source bytes."""
    n = len(chunk["key"])
    chunk["clip_pixels"] = np.zeros((n, clip_size, clip_size, 3), np.uint8)
    chunk["vae_pixels"] = {name: np.zeros((n, side, side, 3), np.uint8) for name, side in latent_sides.items()}
    for column in image_columns:
        chunk[column] = [b""] * n
    for i, data in enumerate(chunk.pop("image")):
        if chunk["rejected"][i]:
            continue
        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except Exception:  # any bytes PIL cannot decode: counted, never fatal
            chunk["rejected"][i] = "decode_error"
            continue
        chunk["width"][i] = chunk["width"][i] or image.width
        chunk["height"][i] = chunk["height"][i] or image.height
        chunk["clip_pixels"][i] = np.asarray(resize_center_crop(image, clip_size))
        for name, side in latent_sides.items():
            chunk["vae_pixels"][name][i] = np.asarray(resize_center_crop(image, side))
        for column in image_columns:
            buf = io.BytesIO()
            resize_center_crop(image, int(column.split("_")[1])).save(buf, format="PNG")
            chunk[column][i] = buf.getvalue()


def iter_chunks(
    source: sources.Source,
    shard: int,
    chunk_size: int,
    clip_size: int,
    latent_sides: dict[str, int],
    image_columns: list[str],
) -> Iterator[dict[str, Any]]:
    """One shard's decoded chunks (at least one, so an empty shard completes too), each decoded
    when it is asked for: decoded pixels are large."""
    samples = list(sources.iter_samples(source, shard))
    for start in range(0, max(len(samples), 1), chunk_size):
        part = samples[start : start + chunk_size]
        chunk: dict[str, Any] = {
            "key": [s["key"] for s in part],
            "caption": [s["caption"] for s in part],
            "url": [s["url"] for s in part],
            "width": [int(s["width"]) for s in part],
            "height": [int(s["height"]) for s in part],
            "image": [s["image"] or b"" for s in part],
            "rejected": ["" if s["image"] else "missing_image" for s in part],
        }
        _decode(chunk, clip_size, latent_sides, image_columns)
        yield chunk


def invalid_rows(outputs: dict[str, np.ndarray], specs: dict[str, dict], n: int) -> dict[int, str]:
    """Rows to reject: non-finite values, values float16 cannot hold, or a shape not in the spec."""
    reasons: dict[int, str] = {}
    for name, value in outputs.items():
        spec = specs.get(name)
        if spec is None or spec["dtype"] != "float16":
            continue
        if value.shape != (n, *spec["shape"]):
            return {i: "wrong_shape" for i in range(n)}
        flat = value.reshape(n, -1)
        bad = ~np.isfinite(flat).all(1) | (np.abs(np.nan_to_num(flat)) > FLOAT16_MAX).any(1)
        for i in np.flatnonzero(bad):
            reasons.setdefault(int(i), "non_finite")
    return reasons


def as_stored(value: np.ndarray) -> np.ndarray:
    """An encoder output as the store keeps it: float16, non-finite values zeroed (their rows are
    rejected by `invalid_rows`)."""
    return np.nan_to_num(value, posinf=0.0, neginf=0.0).clip(-FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)


class Encoder:
    """Encoder actor: loads the frozen encoders once, then encodes one chunk per call."""

    def __init__(
        self, encoders, specs: dict[str, dict], device: str, precision: str, threads: int, min_clip_score: float | None
    ):
        # lazy: the decode tasks of this module run without torch; only the encoder actors load it
        import torch

        from models.encoders import FrozenClip, FrozenVae
        from models.imaging import to_minus_one_one, to_zero_one

        torch.set_num_threads(max(1, threads))
        if device == "cuda":  # the same chunk must give the same latents on every rerun
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        self.torch, self.specs, self.min_clip_score = torch, specs, min_clip_score
        self.to_zero_one, self.to_minus_one_one = to_zero_one, to_minus_one_one
        self.clip = FrozenClip(encoders.clip, device, precision)
        self.vae = (
            FrozenVae(encoders.vae, device, precision) if any(k.startswith("vae_latent") for k in specs) else None
        )

    def write_null_caption(self, store_url: str) -> None:
        """Embed the empty caption as every caption is embedded, and write it beside the parts
        (store.NULL_CAPTION; the manifest records its sha256)."""
        from safetensors.numpy import save  # lazy: as torch, only in the encoder actors

        text = self.clip.encode_text([""])
        arrays = {
            "clip_text_emb": as_stored(text["emb"][0].numpy()),
            "clip_text_tokens": as_stored(text["tokens"][0].numpy()),
            "text_mask": text["mask"][0].numpy(),
        }
        storage.write_bytes(storage.join(store_url, store.NULL_CAPTION), save(arrays))

    def encode(self, chunk: dict[str, Any]) -> dict[str, Any]:
        torch = self.torch
        n = len(chunk["key"])
        vae_pixels = chunk.pop("vae_pixels")
        pixels = chunk.pop("clip_pixels")
        if n:
            image_emb = self.clip.encode_images(self.to_zero_one(pixels))
            text = self.clip.encode_text(chunk["caption"])
            chunk["clip_score"] = torch.cosine_similarity(image_emb, text["emb"], dim=-1).numpy().astype(np.float32)
            outputs = {"clip_image_emb": image_emb, "clip_text_emb": text["emb"], "clip_text_tokens": text["tokens"]}
            for name, array in vae_pixels.items():
                assert self.vae is not None, "vae pixels are cropped only for vae_latent columns, which load the VAE"
                outputs[name] = self.vae.encode(self.to_minus_one_one(array))
            outputs = {k: v.numpy() for k, v in outputs.items() if k in self.specs}
            for i, reason in invalid_rows(outputs, self.specs, n).items():
                chunk["rejected"][i] = chunk["rejected"][i] or reason
            for name, value in outputs.items():
                chunk[name] = as_stored(value)
            if "text_mask" in self.specs:
                chunk["text_mask"] = text["mask"].numpy()
            if self.min_clip_score is not None:
                for i in np.flatnonzero(chunk["clip_score"] < self.min_clip_score):
                    chunk["rejected"][i] = chunk["rejected"][i] or "clip_score_below_threshold"
        else:
            chunk["clip_score"] = np.zeros(0, np.float32)
        return chunk


@dataclass(frozen=True)
class ShardJob:
    """What every shard task needs; put in Ray's object store once."""

    source: sources.Source
    store_url: str
    specs: dict[str, dict]
    holdout_fraction: float
    chunk_size: int
    clip_size: int
    latent_sides: dict[str, int]
    image_columns: list[str]


def embed_shard(job: ShardJob, shard: int, encoders: list) -> dict[str, Any]:
    """Task: shard `shard` -> part `shard`, chunk by chunk through the encoder actors.

    Returns what the driver keeps of a part: its id, rows, sha256 and counts."""
    writer = store_writer.PartWriter(job.store_url, shard, job.specs, job.holdout_fraction, job.source.name_of(shard))
    counts: Counter[str] = Counter()
    waiting: deque = deque()
    try:
        chunks = iter_chunks(job.source, shard, job.chunk_size, job.clip_size, job.latent_sides, job.image_columns)
        for i, chunk in enumerate(chunks):
            waiting.append(encoders[(shard + i) % len(encoders)].encode.remote(chunk))
            if len(waiting) > IN_FLIGHT:
                _write(writer, ray.get(waiting.popleft()), job.specs, counts)
        while waiting:
            _write(writer, ray.get(waiting.popleft()), job.specs, counts)
        return writer.commit(dict(counts))
    except BaseException:
        writer.abort()
        raise


def _write(
    writer: store_writer.PartWriter, chunk: dict[str, Any], specs: dict[str, dict], counts: Counter[str]
) -> None:
    """The kept rows of an encoded chunk into its part; rejected ones counted by reason."""
    counts.update(f"rejected_{r}" for r in chunk["rejected"] if r)
    keep = np.array([not r for r in chunk["rejected"]], dtype=bool)
    counts["kept"] += int(keep.sum())
    if keep.any():
        rows = {k: _as_array(chunk[k])[keep] for k in [*store.BASE_COLUMNS, *specs]}
        writer.add(store.to_arrow(rows, specs))


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    array = np.empty(len(values), dtype=object)  # strings and bytes stay Python objects
    array[:] = values
    return array
