"""Settings of the data jobs: Ray, ingest, embed and the embedded synthetic data set."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from data_pipeline import fetch_guard
from models.base.configlib import option
from models.base.storage_s3 import DEFAULT_ATTEMPTS, DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_READ_TIMEOUT_S

# Columns `unclip embed` can write (plus image_<side> for any side); `data_pipeline/store.py`,
# the embedding store contract, defines each one.
STORE_COLUMNS = (
    "clip_image_emb",
    "clip_text_emb",
    "clip_text_tokens",
    "text_mask",
    "vae_latent",
    "image_64",
    "image_256",
)


# img2dataset's default: what artists and sites use to refuse AI training and indexing.
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")


@dataclass
class RayConfig:
    address: str | None = option(None, doc="existing cluster ('auto', 'ray://HOST:10001'); null starts a local Ray")
    num_cpus: int | None = option(None, ge=1, doc="CPUs of the local Ray; null: all")
    dashboard: bool = option(False, doc="start the dashboard with a local Ray")
    forward_env: list[str] = option(
        factory=list,
        doc="variables sent to an existing cluster's workers and jobs, e.g. [AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY]: in the clear, "
        "anyone who can reach the Ray dashboard reads them; prefer the cluster's own identity (infra/README.md)",
    )
    stall_timeout_s: float = option(
        300.0,
        gt=0,
        doc="a data job whose remaining tasks or actors no node can run (the cluster lost the CPUs, GPUs or memory "
        "they need) stops after this long, keeping what it committed; raise it where an autoscaler starts nodes on "
        "demand",
    )


@dataclass
class StorageConfig:
    """How long a job waits out a failing object store (S3; `models/base/storage_s3.py`) before it
    stops, with what it committed kept. A persistent outage stops a job within about
    attempts × (read_timeout_s + 20 s of backoff) per request."""

    attempts: int = option(
        DEFAULT_ATTEMPTS,
        ge=1,
        le=50,
        doc="tries of each request (503 SlowDown, resets, timeouts), botocore's standard retry mode",
    )
    connect_timeout_s: float = option(
        DEFAULT_CONNECT_TIMEOUT_S, gt=0, doc="a connection not made in this long is a failed try"
    )
    read_timeout_s: float = option(
        DEFAULT_READ_TIMEOUT_S, gt=0, doc="a store that stalls this long mid-answer is a failed try"
    )


@dataclass
class Threshold:
    min: float | None = None
    max: float | None = None


@dataclass
class IngestFilters:
    """What to drop, each rule counted by name in ROOT/raw/_summary.json."""

    # before download, from the list's own columns
    drop_empty_caption: bool = option(True, doc="a caption that is missing or only white space")
    min_caption_chars: int = option(0, ge=0)
    max_caption_chars: int | None = option(None, ge=1)
    min_caption_words: int = option(0, ge=0)
    max_caption_words: int | None = option(None, ge=1)
    width_col: str | None = option(None, doc="null: WIDTH or width if the list has one")
    height_col: str | None = option(None, doc="null: HEIGHT or height if the list has one")
    min_width: int = option(0, ge=0)
    min_height: int = option(0, ge=0)
    max_aspect_ratio: float | None = option(None, ge=1, doc="from the listed width/height")
    thresholds: dict[str, Threshold] = option(
        factory=dict, doc="numeric column -> {min, max}; e.g. similarity: {min: 0.28}; a missing value fails"
    )
    blocked_domains: list[str] = option(factory=list, doc="a listed domain blocks its subdomains too")
    optout_list: str | None = option(
        None,
        doc="URLs and domains whose owners refuse AI training (a do-not-train registry's export): a file, folder or "
        "glob of parquet/csv/tsv/jsonl/txt; joined in the planning tasks, counted as opted_out_listed "
        "(data_pipeline/optout.py)",
    )
    # after download, on the decoded image (img2dataset's checks, plus a header check before decoding)
    min_image_size: int = option(0, ge=0, doc="shorter side, in pixels")
    max_image_aspect_ratio: float | None = option(None, ge=1)
    max_image_pixels: int = option(89_478_485, ge=1, doc="decompression-bomb guard, read from the header")
    dedup_content: bool = option(True, doc="drop exact duplicate images (sha256) across the whole data set")


@dataclass
class IngestConfig:
    url_list: str = option("", doc="URL list: a file, a folder or a glob; any fsspec URL")
    input_format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "text"] = "auto"
    url_col: str | None = option(None, doc="null: the first of URL, url")
    caption_col: str | None = option(None, doc="null: the first of TEXT, caption, text")
    shard_size: int = option(256, ge=1, doc="URLs per shard; one shard is one Ray task")
    image_size: int = option(256, ge=8, doc="side of the stored images (img2dataset resizes)")
    resize_mode: Literal["border", "keep_ratio", "center_crop", "no"] = "center_crop"
    encode_format: Literal["jpg", "png", "webp"] = "png"
    encode_quality: int = option(95, ge=1, le=100)
    processes_per_task: int = option(1, ge=1, doc="shards one Ray task downloads at once, a process each")
    threads_per_task: int = option(16, ge=1, doc="download threads per process")
    timeout_s: int = option(10, ge=1)
    retries: int = option(0, ge=0)
    max_in_flight: int | None = option(None, ge=1, doc="Ray tasks at once; null: as many as the CPUs allow")
    progress_every_s: float = option(5.0, gt=0, doc="seconds between progress lines")
    plan_task_rows: int = option(
        1_000_000,
        ge=1,
        doc="list rows one planning task reads (parquet files split by row group); content dedup groups shards alike",
    )
    dedup_bucket_rows: int = option(
        4_000_000, ge=1, doc="keys per dedup task (URL and content dedup): buckets = rows / this"
    )
    user_agent_token: str | None = option(
        "unclip",
        doc="named in every request's User-Agent; X-Robots-Tag directives addressed to it (`unclip: noai`) apply "
        "as well as those to all agents; null: none",
    )
    disallowed_header_directives: list[str] = option(
        factory=lambda: list(OPT_OUT_DIRECTIVES),
        doc="X-Robots-Tag directives that refuse a picture (its owner's opt-out, counted as opted_out); empty: "
        "opt-outs ignored, which the log and the summary say",
    )
    allow_networks: list[str] = option(
        factory=list,
        doc="CIDRs downloads may reach although they are loopback, private, link-local, shared, multicast or "
        "reserved (refused by default, at every redirect: data_pipeline/fetch_guard.py); e.g. [10.20.0.0/16]",
    )
    filters: IngestFilters = option(factory=IngestFilters)

    def validate(self) -> None:
        fetch_guard.parse_networks(self.allow_networks)


@dataclass
class EmbedConfig:
    input: str = option("", doc="webdataset/parquet image shards to embed; empty: ingest's ROOT/raw/")
    input_format: Literal["auto", "webdataset", "parquet"] = "auto"
    shards: str = option(
        "", doc="shard ids to embed, 'first-last' inclusive (empty: all); jobs over disjoint ranges fill one store"
    )
    image_col: str | None = option(None, doc="parquet input: image bytes column (null: jpg, png, webp, image, img)")
    caption_col: str | None = option(None, doc="parquet input: caption column (null: txt, caption, TEXT, text)")
    columns: list[str] = option(factory=lambda: list(STORE_COLUMNS))
    vae_resolution: int = option(64, ge=8, doc="images are centre-cropped to this side for `vae_latent`")
    extra_vae_resolutions: list[int] = option(factory=list, doc="more latents, as columns vae_latent_<side>")
    min_clip_score: float | None = option(None, ge=-1, le=1, doc="drop rows whose image-caption cosine is lower")
    holdout_fraction: float = option(0.05, ge=0, lt=1, doc="rows trainers never see; `unclip eval` scores on them")
    batch_size: int = option(64, ge=1, doc="rows per encoder forward pass (fixed per shard: outputs are reproducible)")
    encoder_actors: int = option(1, ge=1, doc="size of the encoder actor pool")
    actor_cpus: float = option(1.0, gt=0, doc="CPUs reserved by each encoder actor (its torch threads)")
    decode_cpus: float = option(
        1.0, gt=0, doc="CPUs reserved by each shard's task (it decodes the shard and writes its part)"
    )
    decode_memory_gb: float = option(
        0.5,
        gt=0,
        doc="memory reserved by each shard's task: the shard's image bytes, a few chunks and one 1,024-row row group "
        "of output",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    progress_every_s: float = option(30.0, gt=0, doc="seconds between progress lines while no part comes back")

    def validate(self) -> None:
        if self.shards and not re.fullmatch(r"\d+-\d+", self.shards):
            raise ValueError(
                f"config key 'embed.shards': expected 'first-last' (e.g. '0-499') or empty, got {self.shards!r}"
            )
        unknown = [c for c in self.columns if c not in STORE_COLUMNS and not re.fullmatch(r"image_\d+", c)]
        if unknown:
            raise ValueError(
                f"config key 'embed.columns': unknown column {unknown[0]!r} (expected some of "
                f"{', '.join(STORE_COLUMNS)})"
            )
        if self.extra_vae_resolutions and "vae_latent" not in self.columns:
            raise ValueError("config key 'embed.extra_vae_resolutions': needs 'vae_latent' in embed.columns")
        if (
            any(r < 8 for r in self.extra_vae_resolutions)
            or len(set(self.extra_vae_resolutions) | {self.vae_resolution}) != len(self.extra_vae_resolutions) + 1
        ):
            raise ValueError(
                "config key 'embed.extra_vae_resolutions': expected distinct sides >= 8 other than "
                "embed.vae_resolution, "
                f"got {self.extra_vae_resolutions}"
            )

    def latent_columns(self) -> dict[str, int]:
        """Latent column name -> image side it encodes."""
        if "vae_latent" not in self.columns:
            return {}
        return {"vae_latent": self.vae_resolution, **{f"vae_latent_{r}": r for r in self.extra_vae_resolutions}}


@dataclass
class SyntheticConfig:
    count: int = option(512, ge=1, doc="captioned images in the embedded default data set")
    image_size: int = option(256, ge=16)
    broken: bool = option(True, doc="add a 404, a non-image and a truncated file")
    seed: int = 0
