"""Opt-out lists (`ingest.filters.optout_list`): URLs and domains whose owners refuse AI training,
joined against the URL list while it is planned, without any process holding either list.

An opt-out list is a file, folder or glob of parquet/csv/tsv/jsonl files with a column `url`,
`URL`, `domain` or `entry` (the first found; else the first column), or of text files with one entry
a line (blank lines and `#` comments skipped), as a do-not-train registry exports them. An entry
with `://` is a URL, matched exactly as listed; any other entry is a domain (`example.com`,
`*.example.com` alike), which refuses its subdomains too. An entry that is neither is ignored and
counted.

The join is the URL dedup's (data_pipeline/plan_run.py, dedup.py): every entry becomes a 32-byte key
(a URL's is the sha256 the list's URLs get; a domain's the sha256 of `domain:` and the name), put
in the same hash buckets, and every row of the list offers its URL key and one key per domain of
its host (`a.b.example.com`: `a.b.example.com`, `b.example.com`, `example.com`). The URL-dedup task
of bucket b reads bucket b of both and writes the orders of the rows that match; the shard-input
task of each piece leaves them out, counted as `opted_out_listed`.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline import dedup, fetch_guard, url_list
from data_pipeline.url_list import UrlListError

ENTRY_COLUMNS = ("url", "URL", "domain", "entry")
_IPV4 = re.compile(r"[0-9.]+")
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)+")  # at least two labels: a top-level domain alone is no entry


def entry_column(names: list[str], file: str) -> str:
    if not names:
        raise UrlListError(f"opt-out list '{file}': no columns")
    return next((c for c in ENTRY_COLUMNS if c in names), names[0])


def normalize_host(host: str) -> str | None:
    """A host name as the join compares it: lower case, IDNA-encoded, no port, no leading `*.`."""
    host = host.strip().lower().removeprefix("*.").strip(".")
    host = host.rsplit("@", 1)[-1]
    if host.startswith("["):
        return None  # an IPv6 literal has no domains
    host = host.split(":", 1)[0]
    try:
        host = fetch_guard.ascii_host(host)
    except fetch_guard.InvalidUrl:
        return None
    return host if _HOST_NAME.fullmatch(host) else None


def domain_digest(domain: str) -> bytes:
    return hashlib.sha256(b"domain:" + domain.encode("ascii")).digest()


def entry_digests(entries: list[str | None]) -> tuple[np.ndarray, dict[str, int]]:
    """(n, 32) keys of the entries that are a URL or a domain, and how many of each kind."""
    keys: list[bytes] = []
    counts = {"urls": 0, "domains": 0, "ignored": 0}
    for entry in entries:
        entry = (entry or "").strip()
        if "://" in entry:
            keys.append(hashlib.sha256(entry.encode("utf-8")).digest())
            counts["urls"] += 1
        elif entry and (domain := normalize_host(entry)) is not None:
            keys.append(domain_digest(domain))
            counts["domains"] += 1
        else:
            counts["ignored"] += 1
    flat = np.frombuffer(b"".join(keys), np.uint8)
    return flat.reshape(-1, 32), counts


def _suffixes(host: str | None) -> list[bytes]:
    """The domain keys of one listed host: itself and every parent of two labels or more."""
    name = normalize_host(host) if host else None
    if name is None:
        return []
    if _IPV4.fullmatch(name):  # an address has no parent domains
        return [domain_digest(name)]
    labels = name.split(".")
    return [domain_digest(".".join(labels[i:])) for i in range(len(labels) - 1)]


def host_keys(hosts: pa.ChunkedArray | pa.Array, orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The domain keys of rows with these hosts, with each key's row order. The work per distinct
    host is done once (a list has far fewer hosts than rows); rows gather theirs without a loop."""
    encoded = pc.dictionary_encode(hosts.combine_chunks() if isinstance(hosts, pa.ChunkedArray) else hosts)
    codes = np.asarray(pc.fill_null(encoded.indices, -1), np.int64)
    per_host = [_suffixes(h) for h in encoded.dictionary.to_pylist()]
    counts = np.array([len(k) for k in per_host] + [0], np.int64)  # the last: rows without a host
    flat = np.frombuffer(b"".join(b"".join(k) for k in per_host), np.uint8).reshape(-1, 32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    codes[codes < 0] = len(per_host)
    per_row = counts[codes]
    row = np.repeat(np.arange(len(codes)), per_row)
    within = np.arange(len(row)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    return flat[starts[codes][row] + within], orders[row]


def read_entries(table: pa.Table, file: str) -> list[str | None]:
    column = entry_column(table.column_names, file)
    values = table[column]
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        values = pc.cast(values, pa.string())
    return values.to_pylist()


def write_keys(url: str, fmt: str, row_groups: list[int] | None, out_url: str, buckets: int) -> dict[str, int]:
    """Part of a task: one piece of an opt-out list file as keys in the list's buckets."""
    parts: list[np.ndarray] = []
    counts = {"urls": 0, "domains": 0, "ignored": 0}
    for table in url_list.iter_raw(url, fmt, None, row_groups, None):
        digests, found = entry_digests(read_entries(table, url))
        parts.append(digests)
        counts = {k: counts[k] + found[k] for k in counts}
    keys = np.concatenate(parts) if parts else np.zeros((0, 32), np.uint8)
    dedup.write_keys(out_url, keys, np.zeros(len(keys), np.int64), {}, buckets)
    return counts
