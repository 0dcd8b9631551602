"""Reading URL lists (parquet, csv, tsv, jsonl; a file, a folder or a glob; any fsspec URL).

Everything here runs before the first download, so a list that cannot be used stops the job
with an error naming the file and what is missing.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterator
from typing import IO, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import csv
from pyarrow import json as pa_json

from models.base import storage
from models.base.errors import UserError

URL_COLUMNS = ("URL", "url")
CAPTION_COLUMNS = ("TEXT", "caption", "text")
FORMATS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".txt": "text",  # one URL a line, no caption (opt-out lists are often this)
}
# img2dataset writes these itself; input columns with these names would be overwritten.
RESERVED = {
    "key",
    "caption",
    "url",
    "uid",
    "width",
    "height",
    "original_width",
    "original_height",
    "status",
    "error_message",
    "exif",
    "md5",
    "sha256",
    "sha512",
}


NON_UTF8 = "_non_utf8_caption"  # set by `normalize` for captions whose bytes are not UTF-8
BATCH_ROWS = 65_536  # rows a reader holds decoded at once


class UrlListError(UserError):
    pass


def stable_key(url: str) -> str:
    """The sample key used from ingest to training: a function of the URL only."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:24]


def list_files(url: str, input_format: str = "auto") -> list[str]:
    fs, path = storage.url_to_fs(url)
    files: list[str]
    # fsspec is unannotated: pyright infers glob/find's detail=True dict too; without detail they list paths
    if any(ch in path for ch in "*?["):
        files = sorted(cast(list[str], fs.glob(path)))
    elif fs.isdir(path):
        found = cast(list[str], fs.find(path))
        files = sorted(p for p in found if not posixpath.basename(p).startswith((".", "_")))
    elif fs.exists(path):
        files = [path]
    else:
        raise UrlListError(f"URL list '{url}': not found")
    if input_format != "auto":
        files = [f for f in files if _format_of(f) == input_format] if len(files) > 1 else files
    else:
        files = [f for f in files if _format_of(f)] if len(files) > 1 else files
    if not files:
        raise UrlListError(
            f"URL list '{url}': no {input_format if input_format != 'auto' else 'parquet/csv/tsv/jsonl/txt'} files"
        )
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return [f if storage.is_local(url) else f"{protocol}://{f}" for f in files]


def _format_of(path: str) -> str | None:
    name = path.lower().removesuffix(".gz")
    return next((fmt for ext, fmt in FORMATS.items() if name.endswith(ext)), None)


def parquet_row_groups(url: str) -> tuple[list[int], pa.Schema]:
    """Rows of each row group and the schema of a parquet list file, from its footer alone."""
    fs, path = storage.url_to_fs(url)
    try:
        with fs.open(path, "rb", block_size=1 << 20) as f:
            parquet = pq.ParquetFile(f)
            meta = parquet.metadata
            return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)], parquet.schema_arrow
    except (pa.ArrowInvalid, OSError) as err:
        raise UrlListError(f"URL list '{url}': cannot read it as parquet ({str(err).splitlines()[0]})") from None


def read_file(url: str, input_format: str = "auto", caption_col: str | None = None) -> pa.Table:
    """One list file as a table. Text columns that are not valid UTF-8 come back as binary
    (CSV/TSV) or with their bad bytes escaped (JSONL), so one bad caption cannot fail the file."""
    return pa.concat_tables(iter_raw(url, input_format, caption_col, batch_rows=None))


def iter_raw(
    url: str,
    input_format: str = "auto",
    caption_col: str | None = None,
    row_groups: list[int] | None = None,
    columns: list[str] | None = None,
    batch_rows: int | None = BATCH_ROWS,
) -> Iterator[pa.Table]:
    """A list file (or some of its row groups) in batches of `batch_rows`, as stored.

    Parquet streams page by page and reads only `columns` (those the file has); the text
    formats cannot be split or projected, so they are parsed whole and then cut."""
    fmt = format_of(url, input_format)
    fs, path = storage.url_to_fs(url)
    try:
        if fmt == "parquet":
            with fs.open(path, "rb", block_size=1 << 22) as f:
                parquet = pq.ParquetFile(f)
                names = parquet.schema_arrow.names
                wanted = None if columns is None else [c for c in names if c in set(columns)]
                if batch_rows is None:
                    groups = range(parquet.num_row_groups) if row_groups is None else row_groups
                    yield parquet.read_row_groups(list(groups), columns=wanted)
                    return
                empty = True
                for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=row_groups, columns=wanted):
                    empty = False
                    yield pa.Table.from_batches([batch])
                if empty:
                    yield parquet.schema_arrow.empty_table().select(wanted if wanted is not None else names)
            return
        # fsspec is unannotated: pyright infers open's text-mode wrapper too; "rb" gives a binary file
        with cast(IO[bytes], fs.open(path, "rb", compression="infer")) as f:
            data = f.read()
        if fmt in ("csv", "tsv"):
            parse = csv.ParseOptions(delimiter="," if fmt == "csv" else "\t", newlines_in_values=True)
            captions = [caption_col] if caption_col else list(CAPTION_COLUMNS)
            convert = csv.ConvertOptions(column_types={c: pa.binary() for c in captions})
            table = csv.read_csv(pa.BufferReader(data), parse_options=parse, convert_options=convert)
        elif fmt == "text":
            lines = (line.strip() for line in data.decode("utf-8", errors="replace").splitlines())
            table = pa.table({"url": pa.array([x for x in lines if x and not x.startswith("#")], pa.string())})
        else:
            table = _read_jsonl(data)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError, ValueError) as err:
        raise UrlListError(f"URL list '{url}': cannot read it as {fmt} ({str(err).splitlines()[0]})") from None
    del data
    step = batch_rows or max(len(table), 1)
    for start in range(0, max(len(table), 1), step):
        yield table.slice(start, step)


def format_of(url: str, input_format: str = "auto") -> str:
    fmt = _format_of(url) if input_format == "auto" else input_format
    if fmt is None:
        raise UrlListError(f"URL list '{url}': cannot tell its format; set ingest.input_format")
    return fmt


def _read_jsonl(data: bytes) -> pa.Table:
    try:
        return pa_json.read_json(pa.BufferReader(data))
    except pa.ArrowInvalid:
        pass  # most often a line that is not UTF-8: parse line by line, keeping the good ones whole
    rows = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line.decode("utf-8")))
        except UnicodeDecodeError:
            row = json.loads(line.decode("utf-8", errors="surrogateescape"))
            rows.append({k: v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v for k, v in row.items()})
    return pa.Table.from_pylist(rows)


def _as_text(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, pa.Array]:
    """(strings, mask of values that were not UTF-8); bad values become null.

    Readers do not all check UTF-8 (pyarrow's JSON reader passes bad bytes through), so string
    columns are validated too: one fast full validation, and a per-value pass only on failure.
    """
    no_bad = pa.array(np.zeros(len(column), bool))
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            for chunk in column.chunks:
                chunk.validate(full=True)
            return pc.cast(column, pa.string()), no_bad
        except pa.ArrowInvalid:
            column = pc.cast(column, pa.binary(), safe=False)
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        return pc.cast(column, pa.string()), no_bad
    try:  # a checked cast validates UTF-8 in C++; only a column with a bad value goes value by value
        return pc.cast(column, pa.string()), no_bad
    except pa.ArrowInvalid:
        pass
    texts, bad = [], []
    for value in column.to_pylist():
        try:
            texts.append(None if value is None else value.decode("utf-8"))
            bad.append(False)
        except UnicodeDecodeError:
            texts.append(None)
            bad.append(True)
    return pa.chunked_array([pa.array(texts, pa.string())]), pa.array(bad)


def _pick(names: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, file: str) -> str | None:
    if wanted is not None:
        if wanted not in names:
            raise UrlListError(f"URL list '{file}': no {what} column '{wanted}' (columns: {', '.join(names)})")
        return wanted
    return next((c for c in candidates if c in names), None)


def source_columns(names: list[str], file: str, url_col: str | None, caption_col: str | None) -> tuple[str, str | None]:
    """The file's URL and caption columns; a file without a URL column is refused by name."""
    src_url = _pick(names, url_col, URL_COLUMNS, "URL", file)
    if src_url is None:
        raise UrlListError(
            f"URL list '{file}': no URL column (looked for {', '.join(URL_COLUMNS)}; "
            f"columns: {', '.join(names)}); set ingest.url_col"
        )
    return src_url, _pick(names, caption_col, CAPTION_COLUMNS, "caption", file)


def stored_name(name: str) -> str:
    """The name a list column is carried under: img2dataset writes columns of the reserved
    names itself, so the list's own are kept as `list_<name>`."""
    return f"list_{name}" if name in RESERVED else name


def listed_name(name: str) -> str:
    """The inverse of `stored_name`: the column a normalized name comes from."""
    return name[5:] if name.startswith("list_") and name[5:] in RESERVED else name


def normalize(
    table: pa.Table, file: str, url_col: str | None, caption_col: str | None, names: list[str] | None = None
) -> pa.Table:
    """`url`, `caption`, NON_UTF8, then the other columns under their stored names. `names`:
    the whole file's columns when `table` holds only some of them (for the messages)."""
    src_url, src_caption = source_columns(names or table.column_names, file, url_col, caption_col)
    urls, _ = _as_text(table[src_url])
    if src_caption and src_caption in table.column_names:
        captions, non_utf8 = _as_text(table[src_caption])
    else:
        captions, non_utf8 = pa.nulls(len(table), pa.string()), pa.array(np.zeros(len(table), bool))
    columns = {"url": urls, "caption": captions, NON_UTF8: non_utf8}
    for name in table.column_names:
        if name not in (src_url, src_caption):
            columns[stored_name(name)] = table[name]
    return pa.table(columns)


def url_digests(urls: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """sha256 of each URL (no nulls) as an (n, 32) uint8 array: the key's source."""
    joined = b"".join(hashlib.sha256(u.encode("utf-8")).digest() for u in urls.to_pylist())
    return np.frombuffer(joined, np.uint8).reshape(-1, 32)


def read(
    url: str,
    input_format: str = "auto",
    url_col: str | None = None,
    caption_col: str | None = None,
) -> pa.Table:
    """All rows of the list as one table, in one process: `url`, `caption`, `uid`, NON_UTF8, then
    the list's other columns. For small lists and as the reference the planner is tested
    against; `unclip ingest` reads a list in tasks (data_pipeline/plan.py)."""
    parts = [
        normalize(read_file(f, input_format, caption_col), f, url_col, caption_col)
        for f in list_files(url, input_format)
    ]
    table = pa.concat_tables(parts, promote_options="permissive")
    if len(table) == 0:
        raise UrlListError(f"URL list '{url}': no rows")
    uids = [stable_key(u) if u is not None else None for u in table["url"].to_pylist()]
    return table.add_column(2, "uid", pa.array(uids, pa.string()))
