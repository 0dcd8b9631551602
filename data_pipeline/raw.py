"""The raw-data contract: what `unclip ingest` writes under ROOT/raw/ and `unclip embed` reads.

Per shard NNNNN (img2dataset's own layout):
  NNNNN.tar          webdataset: KEY.<jpg|png|webp>, KEY.txt (caption), KEY.json (metadata)
  NNNNN.parquet      one row per URL of the shard: key, uid, status, error_message, sha256, ...
  NNNNN_stats.json   img2dataset's counts; written last, it marks the shard complete
For the whole data set:
  _plan.json         a fingerprint of each shard's URLs (a rerun may not mix lists)
  _duplicates.parquet  downloaded samples whose image bytes repeat an earlier sample's
  _config.yaml       the resolved configuration
  _summary.json      written last: present means every shard is complete and deduplicated

`uid` (a hash of the URL) is the sample key from here on; img2dataset's `key` only names the
files inside one shard.
"""

from __future__ import annotations

import re
import tarfile
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import storage

SHARD_DIGITS = 5  # img2dataset's oom_shard_count
STATS_SUFFIX = "_stats.json"
SUMMARY = "_summary.json"
PLAN = "_plan.json"
DUPLICATES = "_duplicates.parquet"
CONFIG = "_config.yaml"
IMAGE_EXTENSIONS = ("jpg", "png", "webp", "jpeg")


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def shard_file(raw_url: str, shard_id: int, suffix: str) -> str:
    return storage.join(raw_url, shard_name(shard_id) + suffix)


def complete_shards(raw_url: str) -> list[int]:
    """Ids of the shards whose stats file, the commit marker, exists."""
    names = storage.listdir(raw_url)
    return sorted(int(n[: -len(STATS_SUFFIX)]) for n in names if re.fullmatch(rf"\d+{STATS_SUFFIX}", n))


def read_status(raw_url: str, shard_id: int, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.url_to_fs(shard_file(raw_url, shard_id, ".parquet"))
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def read_duplicates(raw_url: str) -> dict[int, set[str]]:
    """uids dropped as duplicate content, by shard."""
    path = storage.join(raw_url, DUPLICATES)
    if not storage.exists(path):
        return {}
    fs, p = storage.url_to_fs(path)
    with fs.open(p, "rb") as f:
        table = pq.read_table(f, columns=["shard", "uid"])
    out: dict[int, set[str]] = {}
    for shard, uid in zip(table["shard"].to_pylist(), table["uid"].to_pylist()):
        out.setdefault(shard, set()).add(uid)
    return out


def require_complete(raw_url: str) -> dict[str, Any]:
    """The ingest summary; refuses raw data whose ingest has not finished."""
    path = storage.join(raw_url, SUMMARY)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"raw data '{raw_url}': no {SUMMARY}, so ingest has not finished (rerun `unclip ingest`; it resumes)"
        )
    return storage.read_json(path)


def kept_count(raw_url: str, shard_id: int, dropped: set[str]) -> int:
    table = read_status(raw_url, shard_id, ["uid", "status"])
    return sum(s == "success" and u not in dropped for u, s in zip(table["uid"].to_pylist(), table["status"].to_pylist()))


def iter_samples(raw_url: str, shard_id: int, dropped: set[str]) -> Iterator[dict[str, Any]]:
    """Every kept sample of a shard, in the shard's row order; `image` is None if the tar lacks it."""
    meta = read_status(raw_url, shard_id, ["key", "uid", "caption", "url", "width", "height", "status"]).to_pylist()
    images: dict[str, bytes] = {}
    fs, path = storage.url_to_fs(shard_file(raw_url, shard_id, ".tar"))
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            stem, _, ext = member.name.rpartition(".")
            if ext in IMAGE_EXTENSIONS:
                images[stem] = tar.extractfile(member).read()
    for m in meta:
        if m["status"] == "success" and m["uid"] not in dropped:
            yield {**m, "image": images.get(m["key"])}
