"""Exact deduplication over data sets too large for one process: keys hash-partitioned into buckets.

Used twice by ingest: URL dedup over the list (the key is sha256 of the URL) and content dedup
over the downloads (sha256 of the image bytes). Both keep the first occurrence in list order, so
every row carries an `order`: an int64 that sorts as the list does (`order_of(major, row)`).

Three steps, each a set of Ray tasks that commit files (data_pipeline/tasks.py runs them):
  map     every producer writes one key file: its rows sorted by bucket, row group b = bucket b
          (empty row groups included), so a bucket task reads exactly its slice of each file;
  reduce  one task per bucket reads row group b of every key file, keeps the first occurrence
          of each key and writes the repeats, sorted by order, in small row groups;
  deliver each consumer (a range of orders: one list piece, or a group of shards) reads its
          repeats from every bucket file, row groups outside its range skipped by their statistics.

Why bucket files of our own rather than Ray Data's groupby: each step's output is a committed
file, so a killed job redoes only the tasks without one (Ray Data's shuffle lives in the object
store and starts over); the keep-first rule is a sort inside a bucket, not an aggregation per
key (a Python call per group); and a bucket's memory is fixed by the bucket count we choose
from the row count, not by how a shuffle happened to split blocks.

Keys are 32 raw bytes (`pa.binary(32)`), never hex strings: a sort over four uint64 columns,
with no 2 GiB string table anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.base import storage

KEY = pa.binary(32)
ROW_BITS = 32  # order = major << ROW_BITS | row: a piece or shard holds fewer than 2**32 rows
DROP_ROW_GROUP = 4096  # repeats per row group in a bucket's output: a consumer reads few rows it skips
READ_THREADS = 16  # a bucket task's concurrent reads (one per producer file): object stores reward it
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
_NIBBLE = np.full(256, 255, np.uint8)
_NIBBLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_NIBBLE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def order_of(major: int | np.ndarray, row: int | np.ndarray) -> np.ndarray:
    return (np.asarray(major, np.int64) << ROW_BITS) | np.asarray(row, np.int64)


def bucket_count(rows: int, rows_per_bucket: int) -> int:
    return max(1, -(-int(rows) // rows_per_bucket))


def digest_matrix(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Keys as an (n, 32) uint8 array (one copy at most)."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks() if keys.num_chunks != 1 else keys.chunk(0)
    if len(keys) == 0:
        return np.zeros((0, 32), np.uint8)
    data = np.frombuffer(keys.buffers()[1], np.uint8)
    return data[keys.offset * 32 : (keys.offset + len(keys)) * 32].reshape(-1, 32)


def key_array(digests: np.ndarray) -> pa.Array:
    digests = np.ascontiguousarray(digests, np.uint8)
    return pa.FixedSizeBinaryArray.from_buffers(KEY, len(digests), [None, pa.py_buffer(digests)])


def from_hex(hex_strings: pa.Array | pa.ChunkedArray, chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """(n, 32) digests of 64-character hex strings, and a mask of the values that are one."""
    strings = pa.chunked_array([hex_strings]) if isinstance(hex_strings, pa.Array) else hex_strings
    strings = strings.cast(pa.large_string()).combine_chunks()
    n = len(strings)
    out = np.zeros((n, 32), np.uint8)
    valid = np.zeros(n, bool)
    if n == 0 or strings.buffers()[2] is None:
        return out, valid
    offsets = np.frombuffer(strings.buffers()[1], np.int64)[strings.offset : strings.offset + n + 1]
    data = np.frombuffer(strings.buffers()[2], np.uint8)
    present = np.asarray(strings.is_valid())
    for start in range(0, n, chunk):  # bounded temporaries: an index of 64 int64s per row
        rows = start + np.flatnonzero(
            (np.diff(offsets[start : start + chunk + 1]) == 64) & present[start : start + chunk]
        )
        nibbles = _NIBBLE[data[offsets[rows][:, None] + np.arange(64)]]
        good = (nibbles != 255).all(axis=1)
        out[rows[good]] = (nibbles[good, 0::2] << 4) | nibbles[good, 1::2]
        valid[rows[good]] = True
    return out, valid


def to_hex(digests: np.ndarray, nbytes: int) -> pa.Array:
    """The first `nbytes` bytes of each digest as lowercase hex strings, without a Python loop."""
    head = np.ascontiguousarray(digests[:, :nbytes])
    chars = np.empty((len(head), 2 * nbytes), np.uint8)
    chars[:, 0::2] = _HEX[head >> 4]
    chars[:, 1::2] = _HEX[head & 15]
    offsets = np.arange(0, 2 * nbytes * (len(head) + 1), 2 * nbytes, dtype=np.int32)
    return pa.StringArray.from_buffers(len(head), pa.py_buffer(offsets.tobytes()), pa.py_buffer(chars.tobytes()))


def bucket_of(digests: np.ndarray, buckets: int) -> np.ndarray:
    head = np.ascontiguousarray(digests[:, :8]).view(">u8").reshape(-1)
    return (head % np.uint64(buckets)).astype(np.int64)


def repeats(digests: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows that repeat an earlier key, the row each repeats), earliest `order` kept; indices."""
    n = len(digests)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    words = np.ascontiguousarray(digests).view(">u8").reshape(n, 4)
    ranked = np.lexsort((order, words[:, 3], words[:, 2], words[:, 1], words[:, 0]))
    w = words[ranked]
    same = np.zeros(n, bool)
    same[1:] = (w[1:] == w[:-1]).all(axis=1)
    run_start = np.maximum.accumulate(np.where(same, 0, np.arange(n)))
    return ranked[same], ranked[run_start[same]]


def write_keys(url: str, digests: np.ndarray, order: np.ndarray, payload: dict[str, pa.Array], buckets: int) -> None:
    """One producer's key file: row group b holds its keys of bucket b, every bucket present."""
    bucket = bucket_of(digests, buckets)
    ranked = np.argsort(bucket, kind="stable")
    table = pa.table(
        {
            "key": key_array(digests[ranked]),
            "order": pa.array(order[ranked], pa.int64()),
            **{name: column.take(pa.array(ranked)) for name, column in payload.items()},
        }
    )
    bounds = np.searchsorted(bucket[ranked], np.arange(buckets + 1))
    with storage.atomic_open(url) as sink, pq.ParquetWriter(sink, table.schema) as writer:
        for b in range(buckets):
            writer.write_table(table.slice(bounds[b], bounds[b + 1] - bounds[b]))


def read_bucket(key_urls: Iterable[str], bucket: int) -> pa.Table:
    """Row group `bucket` of every key file, concatenated in the order of `key_urls`."""

    def one(url: str) -> pa.Table:
        fs, path = storage.url_to_fs(url)
        with fs.open(path, "rb", block_size=1 << 20) as f:
            return pq.ParquetFile(f).read_row_group(bucket)

    with ThreadPoolExecutor(READ_THREADS) as pool:
        tables = list(pool.map(one, key_urls))
    return pa.concat_tables(tables)


def reduce_bucket(keys: pa.Table, out_url: str, keeper_columns: Iterable[str] = ()) -> pa.Table:
    """Write the repeats of one bucket, sorted by order: every payload column, plus
    `<name>_of_first` for each of `keeper_columns` (the kept row's value). Returns them."""
    dup, first = repeats(digest_matrix(keys["key"]), np.asarray(keys["order"]))
    ranked = np.argsort(np.asarray(keys["order"])[dup], kind="stable")
    dup, first = pa.array(dup[ranked]), pa.array(first[ranked])
    out = keys.drop_columns(["key"]).take(dup)
    for name in keeper_columns:
        out = out.append_column(f"{name}_of_first", keys[name].take(first))
    with storage.atomic_open(out_url) as sink:
        pq.write_table(out, sink, row_group_size=DROP_ROW_GROUP)
    return out


def read_repeats(drop_urls: Iterable[str], start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
    """The repeats with `start <= order < stop` from every bucket's output, sorted by order."""

    wanted_columns = None if columns is None else ["order", *columns]

    def one(url: str) -> pa.Table:
        fs, path = storage.url_to_fs(url)
        with fs.open(path, "rb", block_size=1 << 16) as f:
            parquet = pq.ParquetFile(f)
            column = parquet.schema_arrow.get_field_index("order")
            groups = [
                g
                for g in range(parquet.num_row_groups)
                if _overlaps(parquet.metadata.row_group(g), column, start, stop)
            ]
            table = parquet.read_row_groups(groups, columns=wanted_columns)
        order = table["order"]
        return table.filter(pc.and_(pc.greater_equal(order, start), pc.less(order, stop)))

    with ThreadPoolExecutor(READ_THREADS) as pool:
        tables = list(pool.map(one, drop_urls))
    table = pa.concat_tables(tables)
    return table.take(pa.array(np.argsort(np.asarray(table["order"]), kind="stable")))


def _overlaps(row_group: pq.RowGroupMetaData, column: int, start: int, stop: int) -> bool:
    if row_group.num_rows == 0:
        return False
    stats = row_group.column(column).statistics
    if stats is None or not stats.has_min_max:
        return True
    return stats.min < stop and stats.max >= start
