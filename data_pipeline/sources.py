"""Where `unclip embed` reads images from: ingest's ROOT/raw/, or any webdataset/parquet shards.

A source is a list of shard files, each with an id: ingest's own shard id for raw data, the first
run of digits in the file's name for outside data (`00042.tar`, `shard-00042.tar`,
`train-00042-of-00100.parquet` are shard 42). Shard N becomes store part N, whichever job embeds
it, so separate jobs over disjoint shards fill one store. Every sample gets a stable key: the
URL hash for raw data (the key ingest gave it), or a hash of the sample's URL, else of file name
+ in-file key, for outside data.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, cast

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import raw
from data_pipeline.url_list import stable_key
from models.base import storage
from models.base.errors import UserError

IMAGE_COLUMNS = ("jpg", "png", "webp", "image", "img")
CAPTION_COLUMNS = ("txt", "caption", "TEXT", "text")


class SourceError(UserError):
    pass


@dataclass(frozen=True)
class Source:
    """kind: 'raw' (ingest output), 'webdataset' or 'parquet'; files: one per shard, in the order
    of `ids`, the shards' ids."""

    kind: str
    files: tuple[str, ...]
    ids: tuple[int, ...]
    raw_url: str | None = None
    drop_duplicates: bool = True  # raw: skip the samples content dedup listed for each shard
    image_col: str | None = None
    caption_col: str | None = None

    @functools.cached_property
    def _by_id(self) -> dict[int, str]:
        return dict(zip(self.ids, self.files, strict=True))

    def file_of(self, shard_id: int) -> str:
        return self._by_id[shard_id]

    def name_of(self, shard_id: int) -> str:
        return posixpath.basename(self.file_of(shard_id))

    def select(self, shards: str) -> Source:
        """The shards whose ids fall in `shards` ('first-last', inclusive; empty: all)."""
        if not shards:
            return self
        first, last = (int(x) for x in shards.split("-"))
        chosen = [(i, f) for i, f in zip(self.ids, self.files, strict=True) if first <= i <= last]
        if not chosen:
            raise SourceError(
                f"config key 'embed.shards': no {self.kind} shard has an id in {first}-{last} "
                f"(ids {self.ids[0]}-{self.ids[-1]})"
            )
        return dataclasses.replace(self, ids=tuple(i for i, _ in chosen), files=tuple(f for _, f in chosen))


def open_source(
    input_url: str, raw_url: str, input_format: str, image_col: str | None, caption_col: str | None
) -> Source:
    """The source to embed: `input_url` when given, else ingest's output under `raw_url`."""
    if not input_url:
        summary = raw.require_complete(raw_url)
        ids = raw.complete_shards(raw_url)
        files = tuple(raw.shard_file(raw_url, i, ".tar") for i in ids)
        return Source("raw", files, tuple(ids), raw_url=raw_url, drop_duplicates=summary.get("dedup_content", True))
    fs, path = storage.url_to_fs(input_url)
    found: list[str]
    # fsspec is unannotated: pyright infers glob/find's detail=True dict too; without detail they list paths
    if any(ch in path for ch in "*?["):
        found = cast(list[str], fs.glob(path))
    elif fs.isdir(path):
        found = cast(list[str], fs.find(path))
    elif fs.exists(path):
        found = [path]
    else:
        raise SourceError(f"embed input '{input_url}': not found")
    kinds = {"webdataset": (".tar",), "parquet": (".parquet",), "auto": (".tar", ".parquet")}[input_format]
    files = sorted(f for f in found if f.endswith(kinds) and not posixpath.basename(f).startswith((".", "_")))
    if not files:
        raise SourceError(f"embed input '{input_url}': no {' or '.join(kinds)} files")
    suffixes = {posixpath.splitext(f)[1] for f in files}
    if len(suffixes) > 1:
        raise SourceError(
            f"embed input '{input_url}': mixes {' and '.join(sorted(suffixes))} files; set embed.input_format"
        )
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    files = [f if storage.is_local(input_url) else f"{protocol}://{f}" for f in files]
    kind = "webdataset" if suffixes == {".tar"} else "parquet"
    ids = [_shard_id(f, input_url) for f in files]
    seen: dict[int, str] = {}
    for shard_id, file in zip(ids, files, strict=True):
        if shard_id in seen:
            raise SourceError(
                f"embed input '{input_url}': {posixpath.basename(seen[shard_id])} and {posixpath.basename(file)} "
                f"are both shard {shard_id} (the first number in a name is its shard id); rename one"
            )
        seen[shard_id] = file
    ordered = sorted(zip(ids, files, strict=True))
    return Source(
        kind, tuple(f for _, f in ordered), tuple(i for i, _ in ordered), image_col=image_col, caption_col=caption_col
    )


def _shard_id(file: str, input_url: str) -> int:
    found = re.search(r"\d+", posixpath.basename(file))
    if not found:
        raise SourceError(
            f"embed input '{input_url}': {posixpath.basename(file)} has no number in its name to be its shard id"
        )
    return int(found.group())


def iter_samples(source: Source, shard_id: int) -> Iterator[dict[str, Any]]:
    """Samples of one shard: key, caption, url, width, height, image (bytes or None). For raw
    data, the shard's duplicate list is read here, by whoever reads the shard."""
    file = source.file_of(shard_id)
    try:
        if source.kind == "raw":
            assert source.raw_url is not None, "open_source gives every raw source its raw_url"
            dropped = raw.shard_duplicates(source.raw_url, shard_id) if source.drop_duplicates else set()
            for m in raw.iter_samples(source.raw_url, shard_id, dropped):
                yield {
                    "key": m["uid"],
                    "caption": m["caption"] or "",
                    "url": m["url"],
                    "width": m["width"] or 0,
                    "height": m["height"] or 0,
                    "image": m["image"],
                }
        elif source.kind == "webdataset":
            yield from _webdataset_samples(file)
        else:
            yield from _parquet_samples(file, source.image_col, source.caption_col)
    except (
        tarfile.TarError,
        EOFError,
        pa.ArrowInvalid,
        OSError,
    ) as err:  # a shard that cannot be read is bad input, named
        if isinstance(err, FileNotFoundError):
            raise
        raise SourceError(
            f"embed input '{file}': cannot read it as a {source.kind} shard "
            f"({str(err).splitlines()[0] or type(err).__name__})"
        ) from None


def _webdataset_samples(file: str) -> Iterator[dict[str, Any]]:
    groups: dict[str, dict[str, bytes]] = {}
    fs, path = storage.url_to_fs(file)
    # fsspec is unannotated: pyright infers open's text-mode wrapper too; "rb" gives a binary file
    with cast(IO[bytes], fs.open(path, "rb")) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            data = tar.extractfile(member) if member.isfile() else None
            if data is not None:
                stem, _, ext = member.name.partition(".")
                groups.setdefault(stem, {})[ext.lower()] = data.read()
    name = posixpath.basename(file)
    for stem, parts in groups.items():
        meta = json.loads(parts["json"]) if "json" in parts else {}
        image = next((parts[e] for e in raw.IMAGE_EXTENSIONS if e in parts), None)
        caption = parts["txt"].decode("utf-8", "replace") if "txt" in parts else str(meta.get("caption") or "")
        url = meta.get("url") or f"{name}#{stem}"
        yield {
            "key": stable_key(url),
            "caption": caption,
            "url": url,
            "width": int(meta.get("width") or 0),
            "height": int(meta.get("height") or 0),
            "image": image,
        }


def _parquet_samples(file: str, image_col: str | None, caption_col: str | None) -> Iterator[dict[str, Any]]:
    fs, path = storage.url_to_fs(file)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    names = table.column_names
    image_col = image_col or next((c for c in IMAGE_COLUMNS if c in names), None)
    caption_col = caption_col or next((c for c in CAPTION_COLUMNS if c in names), None)
    if image_col not in names or caption_col not in names:
        raise SourceError(
            f"embed input '{file}': needs an image column (embed.image_col; looked for {', '.join(IMAGE_COLUMNS)}) "
            f"and a caption column (embed.caption_col; looked for {', '.join(CAPTION_COLUMNS)}); "
            f"columns: {', '.join(names)}"
        )
    name = posixpath.basename(file)
    urls = table["url"].to_pylist() if "url" in names else [None] * len(table)
    keys = table["key"].to_pylist() if "key" in names else list(range(len(table)))
    for image, caption, url, key in zip(
        table[image_col].to_pylist(), table[caption_col].to_pylist(), urls, keys, strict=True
    ):
        if isinstance(image, dict):  # HF-style struct {"bytes": ..., "path": ...}
            image = image.get("bytes")
        url = url or f"{name}#{key}"
        yield {"key": stable_key(url), "caption": caption or "", "url": url, "width": 0, "height": 0, "image": image}
