"""The raw-data contract: what `unclip ingest` writes under ROOT/raw/ and `unclip embed` reads.

Per shard NNNNN (img2dataset's own layout):
  NNNNN.tar          webdataset: KEY.<jpg|png|webp>, KEY.txt (caption), KEY.json (metadata)
  NNNNN.parquet      one row per URL of the shard: key, uid, status, error_message, sha256, ...
  NNNNN_stats.json   img2dataset's counts; written last, it marks the shard complete
  NNNNN_duplicates.parquet  uid, duplicate_of: the shard's samples whose image bytes repeat an
                     earlier sample's (only where there is one; see data_pipeline/content_dedup.py)
For the whole data set:
  _plan/             the planned shard inputs and their bookkeeping (data_pipeline/plan.py)
  _dedup/            content dedup's bookkeeping
  _config.yaml       the resolved configuration
  _progress.json     running totals, rewritten as the run goes
  _summary.json      written last: present means every shard is complete and deduplicated
  .tmp-staging/      download tasks' shards before they are committed (removed once all have ended)

`uid` (a hash of the URL) is the sample key from here on; img2dataset's `key` only names the
files inside one shard.
"""

from __future__ import annotations

import dataclasses
import io
import posixpath
import re
import tarfile
from collections.abc import Iterator
from typing import IO, Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.base import storage

SHARD_DIGITS = 5  # img2dataset's oom_shard_count
STATS_SUFFIX = "_stats.json"
DUPLICATES_SUFFIX = "_duplicates.parquet"
SUMMARY = "_summary.json"
PROGRESS = "_progress.json"
DEDUP_DIR = "_dedup"
STAGING = f"{storage.TMP_PREFIX}staging"  # download tasks write here first, a folder per attempt
CONFIG = "_config.yaml"
LEGACY_DUPLICATES = "_duplicates.parquet"  # one list for the whole data set, before per-shard lists
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the order a reader picks one in


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def shard_file(raw_url: str, shard_id: int, suffix: str) -> str:
    return storage.join(raw_url, shard_name(shard_id) + suffix)


def complete_shards(raw_url: str) -> list[int]:
    """Ids of the shards whose stats file, the commit marker, exists."""
    return scan_folder(raw_url).complete


@dataclasses.dataclass
class Folder:
    """What one listing of ROOT/raw/ says: the complete shards, their bytes, leftover temporaries."""

    complete: list[int]
    complete_bytes: int
    temporaries: list[str]


def scan_folder(raw_url: str) -> Folder:
    fs, path = storage.url_to_fs(raw_url)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        entries = []
    names = {posixpath.basename(e["name"].rstrip("/")): e for e in entries}
    complete = sorted(int(n[: -len(STATS_SUFFIX)]) for n in names if re.fullmatch(rf"\d+{STATS_SUFFIX}", n))
    data = (names.get(shard_name(i) + suffix) for i in complete for suffix in (".tar", ".parquet"))
    return Folder(
        complete,
        sum(e.get("size") or 0 for e in data if e),
        sorted(n for n in names if n.startswith(storage.TMP_PREFIX)),
    )


def read_status(raw_url: str, shard_id: int, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.url_to_fs(shard_file(raw_url, shard_id, ".parquet"))
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def list_positions(keys: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Each row's place in its shard's input (list order), from img2dataset's keys.

    img2dataset writes a shard's status rows as downloads finish, so a row's place in the file says
    when it finished; its key, shard * 10^k + place, says where the URL stood. The shard's file
    holds every input row, so the rank of a key among the file's keys is its place."""
    values = np.asarray(pc.cast(keys, pa.int64()))
    ranks = np.empty(len(values), np.int64)
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    return ranks


def shard_duplicates(raw_url: str, shard_id: int) -> set[str]:
    """uids of a shard dropped as duplicate content: its own list (or, for raw data written
    before per-shard lists, its rows of the data set's one list)."""
    path = shard_file(raw_url, shard_id, DUPLICATES_SUFFIX)
    legacy = storage.join(raw_url, LEGACY_DUPLICATES)
    if storage.exists(path):
        table = pq.read_table(io.BytesIO(storage.read_bytes(path)), columns=["uid"])
    elif storage.exists(legacy):
        table = pq.read_table(
            io.BytesIO(storage.read_bytes(legacy)), columns=["uid"], filters=[("shard", "==", shard_id)]
        )
    else:
        return set()
    return set(table["uid"].to_pylist())


def require_complete(raw_url: str) -> dict[str, Any]:
    """The ingest summary; refuses raw data whose ingest has not finished."""
    path = storage.join(raw_url, SUMMARY)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"raw data '{raw_url}': no {SUMMARY}, so ingest has not finished (rerun `unclip ingest`; it resumes)"
        )
    return storage.read_json(path)


def iter_samples(raw_url: str, shard_id: int, dropped: set[str]) -> Iterator[dict[str, Any]]:
    """Every kept sample of a shard, in the shard's row order; `image` is None if the tar lacks it."""
    meta = read_status(raw_url, shard_id, ["key", "uid", "caption", "url", "width", "height", "status"]).to_pylist()
    images: dict[str, bytes] = {}
    fs, path = storage.url_to_fs(shard_file(raw_url, shard_id, ".tar"))
    # fsspec is unannotated: pyright infers open's text-mode wrapper too; "rb" gives a binary file
    with cast(IO[bytes], fs.open(path, "rb")) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            stem, _, ext = member.name.rpartition(".")
            if ext in IMAGE_EXTENSIONS:
                data = tar.extractfile(member)
                assert data is not None, f"{member.name}: img2dataset's tars hold regular files only"
                images[stem] = data.read()
    for m in meta:
        if m["status"] == "success" and m["uid"] not in dropped:
            yield {**m, "image": images.get(m["key"])}
