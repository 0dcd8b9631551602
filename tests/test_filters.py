"""Ingest filters as pure logic: every rule counted once, deterministic dedup, the bomb guard."""

from __future__ import annotations

import hashlib
import io
import random

import pyarrow as pa
import pytest

from data_pipeline.config import IngestFilters, Threshold
from data_pipeline.filters import apply_metadata_filters, find_duplicates, make_resizer, summarize_messages
from data_pipeline.url_list import NON_UTF8, UrlListError
from tests.support import images


def listing(rows: list[dict]) -> pa.Table:
    base = {"url": None, "caption": "a fine caption", NON_UTF8: False, "WIDTH": 100, "HEIGHT": 100, "similarity": 0.5}
    return pa.Table.from_pylist([{**base, **r} for r in rows])


def test_each_metadata_rule_counts_what_it_drops():
    rows = [
        {"url": "http://ok.com/1.png"},
        {"url": None},
        {"url": "not a url"},
        {"url": "ftp://host/x.png"},
        {"url": "http://ok.com/1.png"},  # repeat of row 0
        {"url": "http://cdn.blocked.com/x.png"},
        {"url": "http://blocked.com/y.png"},
        {"url": "http://notblocked.com/y.png"},
        {"url": "http://ok.com/2.png", "caption": "   "},
        {"url": "http://ok.com/3.png", "caption": None, NON_UTF8: True},
        {"url": "http://ok.com/4.png", "caption": "ab"},
        {"url": "http://ok.com/5.png", "caption": "x" * 300},
        {"url": "http://ok.com/6.png", "caption": "onlyoneword"},
        {"url": "http://ok.com/7.png", "WIDTH": 10},
        {"url": "http://ok.com/8.png", "HEIGHT": 10},
        {"url": "http://ok.com/9.png", "WIDTH": 1000, "HEIGHT": 200},
        {"url": "http://ok.com/10.png", "similarity": 0.1},
        {"url": "http://ok.com/11.png", "similarity": None},
        {"url": "http://ok.com/12.png", "caption": "two words"},
    ]
    f = IngestFilters(
        min_caption_chars=3,
        max_caption_chars=200,
        min_caption_words=2,
        max_caption_words=50,
        min_width=64,
        min_height=64,
        max_aspect_ratio=3.0,
        thresholds={"similarity": Threshold(min=0.3)},
        blocked_domains=["blocked.com"],
    )
    kept, counts = apply_metadata_filters(listing(rows), f)
    assert kept["url"].to_pylist() == ["http://ok.com/1.png", "http://notblocked.com/y.png", "http://ok.com/12.png"]
    assert NON_UTF8 not in kept.column_names
    assert counts == {
        "missing_url": 1,
        "malformed_url": 2,
        "duplicate_url": 1,
        "blocked_domain": 2,
        "empty_caption": 1,
        "non_utf8_caption": 1,
        "caption_too_short": 1,
        "caption_too_long": 1,
        "caption_too_few_words": 1,
        "width_too_small": 1,
        "height_too_small": 1,
        "aspect_ratio": 1,
        "threshold:similarity": 2,
    }
    assert sum(counts.values()) + len(kept) == len(rows)


def test_a_row_is_counted_under_its_first_failing_rule_only():
    rows = [{"url": "http://a.com/x", "caption": "", "WIDTH": 1, "similarity": 0.0}]
    _, counts = apply_metadata_filters(
        listing(rows), IngestFilters(min_width=64, thresholds={"similarity": Threshold(min=0.3)})
    )
    assert counts == {"empty_caption": 1}


def test_filters_on_missing_columns_stop_before_download():
    table = listing([{"url": "http://a.com/x"}]).drop_columns(["WIDTH", "HEIGHT"])
    with pytest.raises(
        UrlListError,
        match=r"'ingest.filters.width_col': the URL list has no such column \(looked for WIDTH, list_width\)",
    ):
        apply_metadata_filters(table, IngestFilters(min_width=10))
    with pytest.raises(
        UrlListError, match=r"'ingest.filters.thresholds.punsafe': the URL list has no column 'punsafe'"
    ):
        apply_metadata_filters(table, IngestFilters(thresholds={"punsafe": Threshold(max=0.5)}))
    with pytest.raises(UrlListError, match=r"column 'caption' is string, expected numbers"):
        apply_metadata_filters(table, IngestFilters(thresholds={"caption": Threshold(max=0.5)}))


def test_content_dedup_keeps_the_earliest_sample_whatever_the_input_order():
    h1, h2, h3 = (
        hashlib.sha256(name.encode()).hexdigest() for name in ("h1", "h2", "h3")
    )  # as img2dataset writes them
    rows = [
        {"shard": 0, "row": 0, "uid": "a", "sha256": h1},
        {"shard": 0, "row": 1, "uid": "b", "sha256": h2},
        {"shard": 1, "row": 0, "uid": "c", "sha256": h1},
        {"shard": 2, "row": 5, "uid": "d", "sha256": h2},
        {"shard": 2, "row": 7, "uid": "e", "sha256": h1},
        {"shard": 3, "row": 0, "uid": "f", "sha256": h3},
        {"shard": 3, "row": 1, "uid": "g", "sha256": None},  # a sample without a hash is never a duplicate
    ]
    expected = {("c", "a"), ("d", "b"), ("e", "a")}
    for seed in range(5):
        random.Random(seed).shuffle(rows)
        dups = find_duplicates(pa.Table.from_pylist(rows))
        assert set(zip(dups["uid"].to_pylist(), dups["duplicate_of"].to_pylist(), strict=True)) == expected


def test_bomb_is_refused_from_its_header_and_odd_images_are_kept():
    resize = make_resizer(64, "center_crop", "png", 9, IngestFilters(max_image_pixels=10_000_000))
    assert resize(io.BytesIO(images.bomb_png()))[-1] == "image area too large"
    assert resize(io.BytesIO(b""))[-1] == "empty body"
    for data in (images.cmyk_jpeg(), images.png16(), images.palette_png(), images.transparent_png()):
        encoded, width, height, *_, err = resize(io.BytesIO(data))
        assert err is None and (width, height) == (64, 64)
        from PIL import Image

        pixel = Image.open(io.BytesIO(encoded)).convert("RGB").getpixel((32, 32))
        assert all(abs(a - b) <= 12 for a, b in zip(pixel, images.RED, strict=False)), pixel


def test_messages_split_into_failures_refusals_and_image_filters():
    outcomes = summarize_messages(
        {
            "success": 5,
            "HTTP Error 404: Not Found": 2,
            "image too small": 1,
            "empty body": 1,
            "aspect ratio too large": 3,
            "Use of image disallowed by X-Robots-Tag directive": 4,
            "<urlopen error blocked address: h.example is 10.0.0.1, a private address (ingest.allow_networks...)>": 2,
            "invalid URL: host 'a b.com' holds characters no host name has": 1,
            "<urlopen error [Errno -3] Temporary failure in name resolution>": 6,
            "<urlopen error [Errno -2] Name or service not known>": 1,
            "HTTP Error 429: Too Many Requests": 1,
        }
    )
    assert outcomes.failed == {"http_4xx": 2, "empty_body": 1, "invalid_url": 1, "dns": 7, "http_429": 1}
    assert outcomes.refused == {"opted_out": 4, "blocked_address": 2}
    assert outcomes.filtered == {"image_too_small": 1, "image_aspect_ratio": 3}
