"""Ingest filters: metadata rules before download, image guards after.

Before download every rule is a vectorised pass over a batch of the list (pyarrow compute), and
a row is counted under the first rule it fails, so the counts add up to the rows dropped. Every
rule but `duplicate_url` is decided by the row alone; that one needs the whole list, and the
planner (data_pipeline/plan_run.py) decides it in buckets. After download, img2dataset's resizer
checks size and aspect ratio; `GuardedResizer` adds a header check so a decompression bomb is
refused before it is decoded. Repeated image bytes are dropped by data_pipeline/content_dedup.py.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline import dedup, fetch_guard, url_list
from data_pipeline.config import IngestFilters
from data_pipeline.url_list import NON_UTF8, UrlListError

WIDTH_COLUMNS = ("WIDTH", "list_width")
HEIGHT_COLUMNS = ("HEIGHT", "list_height")
# A host of letters in any script (IDNA-encoded before the request: data_pipeline/fetch_guard.py); a
# path of anything but leading or trailing white space (a browser percent-encodes what it must).
_URL = (
    r"^https?://(?:[^@/?#\s]*@)?(?P<host>[A-Za-z0-9.\-\[\]:\x{80}-\x{10FFFF}]*[A-Za-z0-9\]\x{80}-\x{10FFFF}])"
    r"(?::\d+)?(?:[/?#](?:.*\S)?)?$"
)

# Messages img2dataset's resizer (and ours) return, as the filter rule they stand for.
IMAGE_RULES = {
    "image too small": "image_too_small",
    "aspect ratio too large": "image_aspect_ratio",
    "image area too large": "image_too_large",
}


def resolve(f: IngestFilters, schema: pa.Schema) -> IngestFilters:
    """The filters with their columns named for this list (the union of its files' columns);
    a filter on a column the list lacks, or holds no numbers in, is refused here, before any work."""
    need_size = bool(f.min_width or f.min_height or f.max_aspect_ratio)
    width = _column(schema.names, f.width_col, WIDTH_COLUMNS, "width_col", need_size)
    height = _column(schema.names, f.height_col, HEIGHT_COLUMNS, "height_col", need_size)
    if need_size:
        assert width is not None and height is not None, "_column raises when a needed column is missing"
        _require_numeric(schema, width, "ingest.filters.width_col")
        _require_numeric(schema, height, "ingest.filters.height_col")
    for name in f.thresholds:
        if name not in schema.names:
            raise UrlListError(f"config key 'ingest.filters.thresholds.{name}': the URL list has no column '{name}'")
        _require_numeric(schema, name, f"ingest.filters.thresholds.{name}")
    return dataclasses.replace(f, width_col=width if need_size else None, height_col=height if need_size else None)


def columns_read(f: IngestFilters) -> list[str]:
    """Columns (stored names) the metadata rules of resolved filters read, besides url and caption."""
    return [c for c in (f.width_col, f.height_col, *f.thresholds) if c]


def _column(names: list[str], wanted: str | None, candidates: tuple[str, ...], key: str, needed: bool) -> str | None:
    if wanted is not None:
        if wanted not in names:
            raise UrlListError(f"config key 'ingest.filters.{key}': the URL list has no column '{wanted}'")
        return wanted
    found = next((c for c in candidates if c in names), None)
    if found is None and needed:
        raise UrlListError(
            f"config key 'ingest.filters.{key}': the URL list has no such column (looked for "
            f"{', '.join(candidates)}); set it"
        )
    return found


def _require_numeric(schema: pa.Schema, name: str, key: str) -> None:
    kind = schema.field(name).type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)):
        raise UrlListError(f"config key '{key}': column '{name}' is {kind}, expected numbers")


def _numeric(table: pa.Table, name: str) -> pa.ChunkedArray:
    """A resolved column as float64; all missing where this part of the list lacks it."""
    if name not in table.column_names:
        return pa.chunked_array([pa.nulls(len(table), pa.float64())])
    _require_numeric(table.schema, name, name)
    return pc.cast(table[name], pa.float64())


def _fill_false(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(mask, False), dtype=bool)


def url_hosts(urls: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Each URL's host (with its port, if listed), lower case; null where the URL is malformed."""
    return pc.utf8_lower(pc.struct_field(pc.extract_regex(pc.fill_null(urls, ""), _URL), "host"))


def _blocked(urls: pa.ChunkedArray, domains: list[str]) -> np.ndarray:
    hosts = url_hosts(urls)
    blocked = {d.lower().strip(".") for d in domains}

    def is_blocked(host: str | None) -> bool:
        parts = (host or "").split(".")
        return any(".".join(parts[i:]) in blocked for i in range(len(parts)))

    unique = pc.unique(hosts).to_pylist()  # far fewer hosts than rows
    hits = pa.array([h for h in unique if is_blocked(h)], pa.string())
    return _fill_false(pc.is_in(hosts, value_set=hits))


def _local_rules(table: pa.Table, f: IngestFilters) -> list[tuple[str, Callable[[], np.ndarray]]]:
    """(rule name, mask of rows failing it) of every rule a row decides alone, in counting order;
    `duplicate_url` sits between `malformed_url` and the rest (see `rule_names`)."""
    url = table["url"]
    caption = pc.fill_null(table["caption"], "")
    rules: list[tuple[str, Callable[[], np.ndarray]]] = [
        ("missing_url", lambda: ~_fill_false(pc.greater(pc.utf8_length(pc.fill_null(url, "")), 0))),
        ("malformed_url", lambda: ~_fill_false(pc.match_substring_regex(pc.fill_null(url, ""), _URL))),
    ]
    if f.blocked_domains:
        rules.append(("blocked_domain", lambda: _blocked(url, f.blocked_domains)))
    if NON_UTF8 in table.column_names:
        rules.append(("non_utf8_caption", lambda: _fill_false(table[NON_UTF8])))
    if f.drop_empty_caption:
        rules.append(("empty_caption", lambda: ~_fill_false(pc.match_substring_regex(caption, r"\S"))))
    chars = functools.cache(lambda: pc.utf8_length(caption))
    words = functools.cache(lambda: pc.count_substring_regex(caption, r"\S+"))
    if f.min_caption_chars:
        rules.append(("caption_too_short", lambda: _fill_false(pc.less(chars(), f.min_caption_chars))))
    if f.max_caption_chars:
        rules.append(("caption_too_long", lambda: _fill_false(pc.greater(chars(), f.max_caption_chars))))
    if f.min_caption_words:
        rules.append(("caption_too_few_words", lambda: _fill_false(pc.less(words(), f.min_caption_words))))
    if f.max_caption_words:
        rules.append(("caption_too_many_words", lambda: _fill_false(pc.greater(words(), f.max_caption_words))))
    if f.width_col and f.height_col:
        width, height = _numeric(table, f.width_col), _numeric(table, f.height_col)
        if f.min_width:
            rules.append(("width_too_small", lambda: ~_fill_false(pc.greater_equal(width, f.min_width))))
        if f.min_height:
            rules.append(("height_too_small", lambda: ~_fill_false(pc.greater_equal(height, f.min_height))))
        if f.max_aspect_ratio:
            ratio = pc.divide(pc.max_element_wise(width, height), pc.min_element_wise(width, height))
            rules.append(("aspect_ratio", lambda: ~_fill_false(pc.less_equal(ratio, f.max_aspect_ratio))))
    for name, bound in f.thresholds.items():
        values = _numeric(table, name)
        ok = pa.array(np.ones(len(table), bool))
        if bound.min is not None:
            ok = pc.and_kleene(ok, pc.greater_equal(values, bound.min))
        if bound.max is not None:
            ok = pc.and_kleene(ok, pc.less_equal(values, bound.max))
        rules.append((f"threshold:{name}", lambda ok=ok: ~_fill_false(ok)))
    return rules


def rule_names(f: IngestFilters) -> list[str]:
    """Every metadata rule of resolved filters, in the order a row is counted under the first it fails."""
    names = [name for name, _ in _local_rules(_NAMES_PROBE, f)]
    return [*names[:2], "duplicate_url", *names[2:]]


# An empty list with every column a rule could read: `rule_names` lists rules without data.
_NAMES_PROBE = pa.table(
    {"url": pa.array([], pa.string()), "caption": pa.array([], pa.string()), NON_UTF8: pa.array([], pa.bool_())}
)
BEFORE_DEDUP = ("missing_url", "malformed_url")  # a row failing these has no URL to deduplicate
KEPT = 255  # the code of a row no rule drops


def first_failing(table: pa.Table, f: IngestFilters) -> np.ndarray:
    """Per row, the index in `rule_names(f)` of the first rule it fails, or KEPT; never
    `duplicate_url`, which depends on the rest of the list (data_pipeline/plan_run.py decides it)."""
    names = rule_names(f)
    codes = np.full(len(table), KEPT, np.uint8)
    for name, failing in _local_rules(table, f):
        codes[(codes == KEPT) & failing()] = names.index(name)
    return codes


def counts_by_rule(codes: np.ndarray, f: IngestFilters) -> dict[str, int]:
    """How many rows each rule drops, from `first_failing` codes."""
    names = rule_names(f)
    found = np.bincount(codes, minlength=256)
    return {names[c]: int(found[c]) for c in np.flatnonzero(found[:KEPT])}


def apply_metadata_filters(table: pa.Table, f: IngestFilters) -> tuple[pa.Table, dict[str, int]]:
    """The rows of one in-memory list that pass every rule, in list order, and how many each
    rule dropped: the whole rule set in one process, for small lists and as the reference
    the distributed planner is tested against."""
    f = resolve(f, table.schema)
    names = rule_names(f)
    codes = first_failing(table, f)
    has_url = ~np.isin(codes, [names.index(n) for n in BEFORE_DEDUP])
    rows = np.flatnonzero(has_url)
    dup, _ = dedup.repeats(url_list.url_digests(table["url"].take(pa.array(rows))), rows)
    codes[rows[dup]] = names.index("duplicate_url")
    kept = table.filter(pa.array(codes == KEPT))
    if NON_UTF8 in kept.column_names:
        kept = kept.drop_columns([NON_UTF8])
    return kept, counts_by_rule(codes, f)


def make_resizer(image_size: int, resize_mode: str, encode_format: str, encode_quality: int, f: IngestFilters):
    """img2dataset's Resizer, behind a header check that refuses bombs before decoding them."""
    from img2dataset.resizer import (
        Resizer,
    )  # lazy: img2dataset loads albumentations and OpenCV; only the download tasks resize
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
    """Downloaded samples of one in-memory table whose image bytes repeat an earlier one (in
    (shard, row) order); data_pipeline/content_dedup.py does the same over a whole data set.

    `status` has shard, row, uid, sha256 (hex) for every downloaded sample; returns shard, uid and
    duplicate_of (the kept sample's uid).
    """
    digests, valid = dedup.from_hex(status["sha256"])
    rows = np.flatnonzero(valid)
    order = dedup.order_of(np.asarray(status["shard"])[rows], np.asarray(status["row"])[rows])
    dup, first = dedup.repeats(digests[rows], order)
    ranked = np.argsort(order[dup], kind="stable")
    dup, first = dup[ranked], first[ranked]
    return pa.table(
        {
            "shard": pa.array(np.asarray(status["shard"])[rows[dup]], pa.int64()),
            "uid": status["uid"].take(pa.array(rows[dup])),
            "duplicate_of": status["uid"].take(pa.array(rows[first])),
        }
    )


@dataclasses.dataclass
class Outcomes:
    """img2dataset's per-sample messages of some shards, counted by what they mean."""

    failed: dict[str, int] = dataclasses.field(default_factory=dict)  # by reason (`failure_reason`)
    refused: dict[str, int] = dataclasses.field(default_factory=dict)  # REFUSALS: the site's or our policy
    filtered: dict[str, int] = dataclasses.field(default_factory=dict)  # image filters, by rule


# Not failures: a picture whose owner opted out (X-Robots-Tag), or whose host is in a blocked network.
REFUSALS = ("opted_out", "blocked_address")


def summarize_messages(status_dict: dict[str, int]) -> Outcomes:
    out = Outcomes()
    for message, n in status_dict.items():
        if message == "success":
            continue
        rule = IMAGE_RULES.get(message)
        reason = failure_reason(message)
        target, name = (
            (out.filtered, rule) if rule else (out.refused, reason) if reason in REFUSALS else (out.failed, reason)
        )
        target[name] = target.get(name, 0) + n
    return out


_REASONS = (
    (re.compile(r"disallowed by X-Robots-Tag"), "opted_out"),
    (re.compile(fetch_guard.BLOCKED_PREFIX), "blocked_address"),
    (re.compile(fetch_guard.INVALID_PREFIX + r"|URL can't contain control characters|nonnumeric port"), "invalid_url"),
    (re.compile(r"HTTP Error 408"), "http_408"),
    (re.compile(r"HTTP Error 429"), "http_429"),
    (re.compile(r"HTTP Error 3\d\d|redirect", re.I), "redirect_loop"),
    (re.compile(r"HTTP Error 4\d\d"), "http_4xx"),
    (re.compile(r"HTTP Error 5\d\d"), "http_5xx"),
    (re.compile(r"timed out|timeout", re.I), "timeout"),
    (re.compile(r"empty body|buf\.empty\(\)", re.I), "empty_body"),
    (
        re.compile(r"cannot identify image|truncated|broken data|decod|not a|image file is|unsupported", re.I),
        "decode_error",
    ),
    (
        re.compile(
            r"Name or service not known|name resolution|No address associated with hostname|nodename nor servname"
            r"|getaddrinfo failed",
            re.I,
        ),
        "dns",
    ),
    (
        re.compile(r"urlopen error|Connection|unknown url type|no host|Remote end closed", re.I),
        "connection_error",
    ),
)


def failure_reason(message: str) -> str:
    """A stable class for one of img2dataset's per-sample error messages."""
    return next((reason for pattern, reason in _REASONS if pattern.search(message)), "other")


def filter_settings(f: IngestFilters) -> dict[str, Any]:
    """The post-download settings that change which samples a shard keeps (part of its plan)."""
    return {k: getattr(f, k) for k in ("min_image_size", "max_image_aspect_ratio", "max_image_pixels")}
