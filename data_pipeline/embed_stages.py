"""The stages of the embed pipeline, as Ray Data runs them (see data_pipeline/embed.py).

The unit that flows is a chunk: up to `embed.batch_size` consecutive samples of one shard.
Encoders see exactly one chunk per forward pass, so a shard's outputs do not depend on how Ray
happened to batch rows, and a rerun reproduces them bit for bit. A chunk travels as one pickled
payload because its columns are ragged (image bytes, strings, arrays of several shapes), which
Ray Data's tensor columns cannot carry.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Iterator

import numpy as np

from data_pipeline import sources

FLOAT16_MAX = 65504.0


def _resize_center_crop(image, side: int):
    from PIL import Image

    scale = side / min(image.size)
    w, h = max(side, round(image.width * scale)), max(side, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def _decode(chunk: dict[str, Any], clip_size: int, latent_sides: dict[str, int], image_columns: list[str]) -> None:
    """Decode once, then one crop per consumer; adds pixel arrays, drops the source bytes."""
    from PIL import Image

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
        chunk["clip_pixels"][i] = np.asarray(_resize_center_crop(image, clip_size))
        for name, side in latent_sides.items():
            chunk["vae_pixels"][name][i] = np.asarray(_resize_center_crop(image, side))
        for column in image_columns:
            buf = io.BytesIO()
            _resize_center_crop(image, int(column.split("_")[1])).save(buf, format="PNG")
            chunk[column][i] = buf.getvalue()


def load_chunks(item: dict[str, Any], source: sources.Source, chunk_size: int, clip_size: int,
                latent_sides: dict[str, int], image_columns: list[str]) -> Iterator[dict[str, Any]]:  # fmt: skip
    """CPU task: one shard -> its decoded chunks (at least one, so an empty shard completes too).

    A generator: decoded pixels are large, so chunks leave the task as they are made."""
    shard = int(item["shard"])
    samples = list(sources.iter_samples(source, shard))
    starts = range(0, max(len(samples), 1), chunk_size)
    for index, start in enumerate(starts):
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
        yield {"shard": shard, "chunk": index, "chunks": len(starts), "payload": pickle.dumps(chunk, protocol=5)}


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


class EncodeChunks:
    """Encoder actor: loads the frozen encoders once, then encodes one chunk per call."""

    def __init__(self, encoders, specs: dict[str, dict], device: str, precision: str, threads: int, min_clip_score: float | None):
        import torch

        from models.encoders import FrozenClip, FrozenVae

        torch.set_num_threads(max(1, threads))
        if device == "cuda":  # the same chunk must give the same latents on every rerun
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        self.torch, self.specs, self.min_clip_score = torch, specs, min_clip_score
        self.clip = FrozenClip(encoders.clip, device, precision)
        self.vae = FrozenVae(encoders.vae, device, precision) if any(k.startswith("vae_latent") for k in specs) else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        payloads = [self._encode(pickle.loads(p)) for p in batch["payload"]]
        return {**{k: v for k, v in batch.items() if k != "payload"}, "payload": np.array(payloads, dtype=object)}

    def _encode(self, chunk: dict[str, Any]) -> bytes:
        torch = self.torch
        n = len(chunk["key"])
        vae_pixels = chunk.pop("vae_pixels")
        pixels = chunk.pop("clip_pixels")
        if n:
            image_emb = self.clip.encode_images(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0)
            text = self.clip.encode_text(chunk["caption"])
            chunk["clip_score"] = torch.cosine_similarity(image_emb, text["emb"], dim=-1).numpy().astype(np.float32)
            outputs = {"clip_image_emb": image_emb, "clip_text_emb": text["emb"], "clip_text_tokens": text["tokens"]}
            for name, array in vae_pixels.items():
                outputs[name] = self.vae.encode(torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
            outputs = {k: v.numpy() for k, v in outputs.items() if k in self.specs}
            for i, reason in invalid_rows(outputs, self.specs, n).items():
                chunk["rejected"][i] = chunk["rejected"][i] or reason
            for name, value in outputs.items():
                chunk[name] = np.nan_to_num(value, posinf=0.0, neginf=0.0).clip(-FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)
            if "text_mask" in self.specs:
                chunk["text_mask"] = text["mask"].numpy()
            if self.min_clip_score is not None:
                for i in np.flatnonzero(chunk["clip_score"] < self.min_clip_score):
                    chunk["rejected"][i] = chunk["rejected"][i] or "clip_score_below_threshold"
        else:
            chunk["clip_score"] = np.zeros(0, np.float32)
        return pickle.dumps(chunk, protocol=5)
