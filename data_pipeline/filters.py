"""Ingest filters: metadata rules before download, image guards and content dedup after.

Before download every rule is a vectorised pass over the whole list (pyarrow compute), and a row
is counted under the first rule it fails, so the counts add up to the rows dropped. After
download, img2dataset's resizer checks size and aspect ratio; `GuardedResizer` adds a header
check so a decompression bomb is refused before it is decoded, and `find_duplicates` drops
repeated image bytes across the whole data set with a rule that does not depend on which shard
finished first: the earliest sample in list order is kept.
"""

from __future__ import annotations

import io
import re
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.config import IngestFilters
from data_pipeline.url_list import NON_UTF8, UrlListError

WIDTH_COLUMNS = ("WIDTH", "list_width")
HEIGHT_COLUMNS = ("HEIGHT", "list_height")
_URL = r"^https?://(?:[^@/?#\s]*@)?(?P<host>[A-Za-z0-9.\-\[\]:]*[A-Za-z0-9\]])(?::\d+)?(?:[/?#]\S*)?$"

# Messages img2dataset's resizer (and ours) return, as the filter rule they stand for.
IMAGE_RULES = {
    "image too small": "image_too_small",
    "aspect ratio too large": "image_aspect_ratio",
    "image area too large": "image_too_large",
}


def _column(table: pa.Table, wanted: str | None, candidates: tuple[str, ...], key: str, needed: bool) -> str | None:
    if wanted is not None:
        if wanted not in table.column_names:
            raise UrlListError(f"config key 'ingest.filters.{key}': the URL list has no column '{wanted}'")
        return wanted
    found = next((c for c in candidates if c in table.column_names), None)
    if found is None and needed:
        raise UrlListError(
            f"config key 'ingest.filters.{key}': the URL list has no such column (looked for "
            f"{', '.join(candidates)}); set it"
        )
    return found


def _numeric(table: pa.Table, name: str, key: str) -> pa.ChunkedArray:
    column = table[name]
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_null(column.type)):
        raise UrlListError(f"config key '{key}': column '{name}' is {column.type}, expected numbers")
    return pc.cast(column, pa.float64())


def _fill_false(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(mask, False), dtype=bool)


def _blocked(urls: pa.ChunkedArray, domains: list[str]) -> np.ndarray:
    hosts = pc.utf8_lower(pc.struct_field(pc.extract_regex(pc.fill_null(urls, ""), _URL), "host"))
    blocked = {d.lower().strip(".") for d in domains}

    def is_blocked(host: str | None) -> bool:
        parts = (host or "").split(".")
        return any(".".join(parts[i:]) in blocked for i in range(len(parts)))

    unique = pc.unique(hosts).to_pylist()  # far fewer hosts than rows
    hits = pa.array([h for h in unique if is_blocked(h)], pa.string())
    return _fill_false(pc.is_in(hosts, value_set=hits))


def metadata_rules(table: pa.Table, f: IngestFilters) -> list[tuple[str, Callable[[], np.ndarray]]]:
    """(rule name, mask of rows failing it), in the order rows are counted."""
    url = table["url"]
    caption = pc.fill_null(table["caption"], "")
    rules: list[tuple[str, Callable[[], np.ndarray]]] = [
        ("missing_url", lambda: ~_fill_false(pc.greater(pc.utf8_length(pc.fill_null(url, "")), 0))),
        ("malformed_url", lambda: ~_fill_false(pc.match_substring_regex(pc.fill_null(url, ""), _URL))),
        ("duplicate_url", lambda: _repeats(url)),
    ]
    if f.blocked_domains:
        rules.append(("blocked_domain", lambda: _blocked(url, f.blocked_domains)))
    if NON_UTF8 in table.column_names:
        rules.append(("non_utf8_caption", lambda: _fill_false(table[NON_UTF8])))
    if f.drop_empty_caption:
        rules.append(("empty_caption", lambda: ~_fill_false(pc.match_substring_regex(caption, r"\S"))))
    chars = pc.utf8_length(caption)
    words = pc.count_substring_regex(caption, r"\S+")
    if f.min_caption_chars:
        rules.append(("caption_too_short", lambda: _fill_false(pc.less(chars, f.min_caption_chars))))
    if f.max_caption_chars:
        rules.append(("caption_too_long", lambda: _fill_false(pc.greater(chars, f.max_caption_chars))))
    if f.min_caption_words:
        rules.append(("caption_too_few_words", lambda: _fill_false(pc.less(words, f.min_caption_words))))
    if f.max_caption_words:
        rules.append(("caption_too_many_words", lambda: _fill_false(pc.greater(words, f.max_caption_words))))
    need_size = bool(f.min_width or f.min_height or f.max_aspect_ratio)
    width_col = _column(table, f.width_col, WIDTH_COLUMNS, "width_col", need_size)
    height_col = _column(table, f.height_col, HEIGHT_COLUMNS, "height_col", need_size)
    if need_size:
        width = _numeric(table, width_col, "ingest.filters.width_col")
        height = _numeric(table, height_col, "ingest.filters.height_col")
        if f.min_width:
            rules.append(("width_too_small", lambda: ~_fill_false(pc.greater_equal(width, f.min_width))))
        if f.min_height:
            rules.append(("height_too_small", lambda: ~_fill_false(pc.greater_equal(height, f.min_height))))
        if f.max_aspect_ratio:
            ratio = pc.divide(pc.max_element_wise(width, height), pc.min_element_wise(width, height))
            rules.append(("aspect_ratio", lambda: ~_fill_false(pc.less_equal(ratio, f.max_aspect_ratio))))
    for name, bound in f.thresholds.items():
        if name not in table.column_names:
            raise UrlListError(f"config key 'ingest.filters.thresholds.{name}': the URL list has no column '{name}'")
        values = _numeric(table, name, f"ingest.filters.thresholds.{name}")
        ok = pa.array(np.ones(len(table), bool))
        if bound.min is not None:
            ok = pc.and_kleene(ok, pc.greater_equal(values, bound.min))
        if bound.max is not None:
            ok = pc.and_kleene(ok, pc.less_equal(values, bound.max))
        rules.append((f"threshold:{name}", lambda ok=ok: ~_fill_false(ok)))
    return rules


def _repeats(column: pa.ChunkedArray) -> np.ndarray:
    """True for every row whose value appeared in an earlier row."""
    indexed = pa.table({"value": column, "row": pa.array(np.arange(len(column)))})
    first = indexed.group_by("value", use_threads=False).aggregate([("row", "min")])["row_min"]
    repeat = np.ones(len(column), bool)
    repeat[np.asarray(first)] = False
    return repeat


def apply_metadata_filters(table: pa.Table, f: IngestFilters) -> tuple[pa.Table, dict[str, int]]:
    """The rows that pass every rule, in list order, and how many each rule dropped."""
    alive = np.ones(len(table), bool)
    counts: dict[str, int] = {}
    for name, failing in metadata_rules(table, f):
        dropped = failing() & alive
        if dropped.any():
            counts[name] = int(dropped.sum())
        alive &= ~dropped
    kept = table.filter(pa.array(alive))
    if NON_UTF8 in kept.column_names:
        kept = kept.drop_columns([NON_UTF8])
    return kept, counts


def make_resizer(image_size: int, resize_mode: str, encode_format: str, encode_quality: int, f: IngestFilters):
    """img2dataset's Resizer, behind a header check that refuses bombs before decoding them."""
    from img2dataset.resizer import Resizer
    from PIL import Image

    class GuardedResizer(Resizer):
        def __call__(self, img_stream, blurring_bbox_list=None):
            data = img_stream.getbuffer()
            if len(data) == 0:
                return None, None, None, None, None, "empty body"
            Image.MAX_IMAGE_PIXELS = None  # we apply our own limit below, without PIL's warning
            try:
                with Image.open(io.BytesIO(data)) as header:  # reads the header, decodes nothing
                    width, height = header.size
            except Exception:  # not a format PIL knows: let OpenCV decide
                width = height = 0
            if width * height > f.max_image_pixels:
                return None, None, None, None, None, "image area too large"
            img_stream.seek(0)
            return super().__call__(img_stream, blurring_bbox_list)

    return GuardedResizer(
        image_size=image_size,
        resize_mode=resize_mode,
        resize_only_if_bigger=False,
        encode_format=encode_format,
        encode_quality=encode_quality if encode_format != "png" else 9,  # png: compression level
        min_image_size=f.min_image_size,
        max_image_area=f.max_image_pixels,
        max_aspect_ratio=f.max_image_aspect_ratio or float("inf"),
    )


def find_duplicates(status: pa.Table) -> pa.Table:
    """Downloaded samples whose image bytes repeat an earlier one (in (shard, row) order).

    `status` has shard, row, uid, sha256 for every downloaded sample; returns shard, uid and
    duplicate_of (the kept sample's uid).
    """
    if len(status) == 0:
        return pa.table({"shard": pa.array([], pa.int64()), "uid": pa.array([], pa.string()), "duplicate_of": pa.array([], pa.string())})
    ordered = status.sort_by([("shard", "ascending"), ("row", "ascending")])
    ordered = ordered.append_column("order", pa.array(np.arange(len(ordered))))
    first = ordered.group_by("sha256", use_threads=False).aggregate([("order", "min")])
    keeper_order = pc.take(
        first["order_min"], pc.index_in(ordered["sha256"], value_set=first["sha256"])
    )
    is_dup = pc.not_equal(keeper_order, ordered["order"])
    dups = ordered.filter(is_dup)
    keeper_uid = pc.take(ordered["uid"], pc.take(keeper_order, pc.indices_nonzero(is_dup)))
    return pa.table({"shard": dups["shard"], "uid": dups["uid"], "duplicate_of": keeper_uid})


def summarize_messages(status_dict: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """img2dataset's per-sample messages -> (failures by reason, image filters by rule)."""
    failures: dict[str, int] = {}
    filtered: dict[str, int] = {}
    for message, n in status_dict.items():
        if message == "success":
            continue
        rule = IMAGE_RULES.get(message)
        target, name = (filtered, rule) if rule else (failures, failure_reason(message))
        target[name] = target.get(name, 0) + n
    return failures, filtered


_REASONS = (
    (re.compile(r"HTTP Error 3\d\d|redirect", re.I), "redirect_loop"),
    (re.compile(r"HTTP Error 4\d\d"), "http_4xx"),
    (re.compile(r"HTTP Error 5\d\d"), "http_5xx"),
    (re.compile(r"timed out|timeout", re.I), "timeout"),
    (re.compile(r"empty body|buf\.empty\(\)", re.I), "empty_body"),
    (re.compile(r"cannot identify image|truncated|broken data|decod|not a|image file is|unsupported", re.I), "decode_error"),
    (re.compile(r"urlopen error|Connection|Name or service|unknown url type|no host|Remote end closed", re.I), "connection_error"),
)


def failure_reason(message: str) -> str:
    """A stable class for one of img2dataset's per-sample error messages."""
    return next((reason for pattern, reason in _REASONS if pattern.search(message)), "other")


def filter_settings(f: IngestFilters) -> dict[str, Any]:
    """The post-download settings that change which samples a shard keeps (part of its plan)."""
    return {k: getattr(f, k) for k in ("min_image_size", "max_image_aspect_ratio", "max_image_pixels")}
