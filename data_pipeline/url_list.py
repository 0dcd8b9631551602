"""Reading URL lists (parquet, csv, tsv, jsonl; a file, a folder or a glob; any fsspec URL).

Everything here runs before the first download, so a list that cannot be used stops the job
with an error naming the file and what is missing.
"""

from __future__ import annotations

import hashlib
import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline import storage

URL_COLUMNS = ("URL", "url")
CAPTION_COLUMNS = ("TEXT", "caption", "text")
FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
# img2dataset writes these itself; input columns with these names would be overwritten.
RESERVED = {
    "key", "caption", "url", "uid", "width", "height", "original_width", "original_height",
    "status", "error_message", "exif", "md5", "sha256", "sha512",
}  # fmt: skip


NON_UTF8 = "_non_utf8_caption"  # set by `read` for captions whose bytes are not UTF-8


class UrlListError(ValueError):
    pass


def stable_key(url: str) -> str:
    """The sample key used from ingest to training: a function of the URL only."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:24]


def list_files(url: str, input_format: str = "auto") -> list[str]:
    fs, path = storage.url_to_fs(url)
    if any(ch in path for ch in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(p for p in fs.find(path) if not posixpath.basename(p).startswith((".", "_")))
    elif fs.exists(path):
        files = [path]
    else:
        raise UrlListError(f"URL list '{url}': not found")
    if input_format != "auto":
        files = [f for f in files if _format_of(f) == input_format] if len(files) > 1 else files
    else:
        files = [f for f in files if _format_of(f)] if len(files) > 1 else files
    if not files:
        raise UrlListError(f"URL list '{url}': no {input_format if input_format != 'auto' else 'parquet/csv/tsv/jsonl'} files")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return [f if storage.is_local(url) else f"{protocol}://{f}" for f in files]


def _format_of(path: str) -> str | None:
    name = path.lower().removesuffix(".gz")
    return next((fmt for ext, fmt in FORMATS.items() if name.endswith(ext)), None)


def read_file(url: str, input_format: str = "auto", caption_col: str | None = None) -> pa.Table:
    """One list file as a table. Text columns that are not valid UTF-8 come back as binary
    (CSV/TSV) or with their bad bytes escaped (JSONL), so one bad caption cannot fail the file."""
    fmt = _format_of(url) if input_format == "auto" else input_format
    if fmt is None:
        raise UrlListError(f"URL list '{url}': cannot tell its format; set ingest.input_format")
    fs, path = storage.url_to_fs(url)
    try:
        with fs.open(path, "rb", compression="infer") as f:
            if fmt == "parquet":
                import pyarrow.parquet as pq

                return pq.read_table(f)
            data = f.read()
        if fmt in ("csv", "tsv"):
            from pyarrow import csv

            parse = csv.ParseOptions(delimiter="," if fmt == "csv" else "\t", newlines_in_values=True)
            captions = [caption_col] if caption_col else list(CAPTION_COLUMNS)
            convert = csv.ConvertOptions(column_types={c: pa.binary() for c in captions})
            return csv.read_csv(pa.BufferReader(data), parse_options=parse, convert_options=convert)
        return _read_jsonl(data)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError, ValueError) as err:
        raise UrlListError(f"URL list '{url}': cannot read it as {fmt} ({str(err).splitlines()[0]})") from None


def _read_jsonl(data: bytes) -> pa.Table:
    from pyarrow import json as pa_json

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


def _as_text(column: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """(strings, mask of values that were not UTF-8); bad values become null.

    Readers do not all check UTF-8 (pyarrow's JSON reader passes bad bytes through), so string
    columns are validated too: one fast full validation, and a per-value pass only on failure.
    """
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            for chunk in column.chunks:
                chunk.validate(full=True)
            return pc.cast(column, pa.string()), pa.array(np.zeros(len(column), bool))
        except pa.ArrowInvalid:
            column = pc.cast(column, pa.binary(), safe=False)
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        return pc.cast(column, pa.string()), pa.array(np.zeros(len(column), bool))
    texts, bad = [], []
    for value in column.to_pylist():
        try:
            texts.append(None if value is None else value.decode("utf-8"))
            bad.append(False)
        except UnicodeDecodeError:
            texts.append(None)
            bad.append(True)
    return pa.array(texts, pa.string()), pa.array(bad)


def _pick(table: pa.Table, wanted: str | None, candidates: tuple[str, ...], what: str, file: str) -> str | None:
    if wanted is not None:
        if wanted not in table.column_names:
            raise UrlListError(
                f"URL list '{file}': no {what} column '{wanted}' (columns: {', '.join(table.column_names)})"
            )
        return wanted
    return next((c for c in candidates if c in table.column_names), None)


def read(
    url: str,
    input_format: str = "auto",
    url_col: str | None = None,
    caption_col: str | None = None,
) -> pa.Table:
    """All rows of the list as one table: `url`, `caption`, `uid`, NON_UTF8, then the list's
    other columns (renamed `list_<name>` where img2dataset reserves the name)."""
    parts = []
    for file in list_files(url, input_format):
        table = read_file(file, input_format, caption_col)
        src_url = _pick(table, url_col, URL_COLUMNS, "URL", file)
        if src_url is None:
            raise UrlListError(
                f"URL list '{file}': no URL column (looked for {', '.join(URL_COLUMNS)}; "
                f"columns: {', '.join(table.column_names)}); set ingest.url_col"
            )
        src_caption = _pick(table, caption_col, CAPTION_COLUMNS, "caption", file)
        urls, _ = _as_text(table[src_url])
        captions, non_utf8 = _as_text(table[src_caption]) if src_caption else (pa.nulls(len(table), pa.string()), pa.array([False] * len(table)))
        columns = {"url": urls, "caption": captions, NON_UTF8: non_utf8}
        for name in table.column_names:
            if name not in (src_url, src_caption):
                # img2dataset writes columns of these names itself; keep the list's under another
                columns[f"list_{name}" if name in RESERVED else name] = table[name]
        parts.append(pa.table(columns))
    table = pa.concat_tables(parts, promote_options="permissive")
    if len(table) == 0:
        raise UrlListError(f"URL list '{url}': no rows")
    uids = [stable_key(u) if u is not None else None for u in table["url"].to_pylist()]
    return table.add_column(2, "uid", pa.array(uids, pa.string()))
