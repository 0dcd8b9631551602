"""Reading URL lists (parquet, csv, tsv, jsonl; a file, a folder or a glob; any fsspec URL).

Everything here runs before the first download, so a list that cannot be used stops the job
with an error naming the file and what is missing.
"""

from __future__ import annotations

import hashlib
import posixpath

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


def read_file(url: str, input_format: str = "auto") -> pa.Table:
    fmt = _format_of(url) if input_format == "auto" else input_format
    if fmt is None:
        raise UrlListError(f"URL list '{url}': cannot tell its format; set ingest.input_format")
    fs, path = storage.url_to_fs(url)
    try:
        with fs.open(path, "rb", compression="infer") as f:
            if fmt == "parquet":
                import pyarrow.parquet as pq

                return pq.read_table(f)
            if fmt in ("csv", "tsv"):
                from pyarrow import csv

                parse = csv.ParseOptions(delimiter="," if fmt == "csv" else "\t", newlines_in_values=True)
                return csv.read_csv(f, parse_options=parse)
            from pyarrow import json as pa_json

            return pa_json.read_json(f)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as err:
        raise UrlListError(f"URL list '{url}': cannot read it as {fmt} ({str(err).splitlines()[0]})") from None


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
    """All rows of the list as one table: `url`, `caption`, `uid`, then the metadata columns."""
    parts = []
    for file in list_files(url, input_format):
        table = read_file(file, input_format)
        src_url = _pick(table, url_col, URL_COLUMNS, "URL", file)
        if src_url is None:
            raise UrlListError(
                f"URL list '{file}': no URL column (looked for {', '.join(URL_COLUMNS)}; "
                f"columns: {', '.join(table.column_names)}); set ingest.url_col"
            )
        src_caption = _pick(table, caption_col, CAPTION_COLUMNS, "caption", file)
        urls = pc.cast(table[src_url], pa.string())
        captions = pc.cast(table[src_caption], pa.string()) if src_caption else pa.nulls(len(table), pa.string())
        columns = {"url": urls, "caption": captions}
        for name in table.column_names:
            if name not in (src_url, src_caption) and name not in RESERVED:
                columns[name] = table[name]
        parts.append(pa.table(columns))
    table = pa.concat_tables(parts, promote_options="default")
    if len(table) == 0:
        raise UrlListError(f"URL list '{url}': no rows")
    uids = [stable_key(u) if u is not None else None for u in table["url"].to_pylist()]
    return table.add_column(2, "uid", pa.array(uids, pa.string()))
