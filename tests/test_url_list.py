"""URL lists: every supported format and location; unusable lists stop before any download."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import url_list
from data_pipeline.url_list import UrlListError

ROWS = [
    {"URL": "http://h/a.png", "TEXT": "a cat", "similarity": 0.3},
    {"URL": "http://h/b.png", "TEXT": "a dog", "similarity": 0.4},
]


def write(path, fmt, rows=ROWS):
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        sep = "," if fmt == "csv" else "\t"
        keys = list(rows[0])
        path.write_text(sep.join(keys) + "\n" + "".join(sep.join(str(r[k]) for k in keys) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_reads_each_format_with_laion_columns(tmp_path, fmt):
    table = url_list.read(str(write(tmp_path / f"list.{fmt}", fmt)))
    assert table.column_names[:3] == ["url", "caption", "uid"]
    assert table["url"].to_pylist() == ["http://h/a.png", "http://h/b.png"]
    assert table["caption"].to_pylist() == ["a cat", "a dog"]
    assert table["similarity"].to_pylist() == [0.3, 0.4]  # metadata is carried
    assert table["uid"].to_pylist() == [url_list.stable_key("http://h/a.png"), url_list.stable_key("http://h/b.png")]


def test_folder_glob_and_configured_columns(tmp_path):
    rows = [{"link": "http://h/c.png", "alt": "x"}]
    write(tmp_path / "a.parquet", "parquet", rows)
    write(tmp_path / "b.parquet", "parquet", rows)
    (tmp_path / "_SUCCESS").write_text("")
    assert len(url_list.read(str(tmp_path), url_col="link", caption_col="alt")) == 2
    assert len(url_list.read(str(tmp_path / "a*.parquet"), url_col="link")) == 1


def test_missing_url_column_names_file_and_columns(tmp_path):
    path = write(tmp_path / "list.parquet", "parquet", [{"href": "http://h/a.png"}])
    with pytest.raises(UrlListError, match=rf"URL list '{path}': no URL column \(looked for URL, url; columns: href\)"):
        url_list.read(str(path))
    with pytest.raises(UrlListError, match=rf"URL list '{path}': no caption column 'alt' \(columns: href\)"):
        url_list.read(str(path), url_col="href", caption_col="alt")


def test_unreadable_and_empty_lists(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(UrlListError, match=rf"URL list '{bad}': cannot read it as parquet"):
        url_list.read(str(bad))
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"URL": pa.array([], pa.string())}), empty)
    with pytest.raises(UrlListError, match=rf"URL list '{empty}': no rows"):
        url_list.read(str(empty))
    with pytest.raises(UrlListError, match="not found"):
        url_list.read(str(tmp_path / "nothing.csv"))
