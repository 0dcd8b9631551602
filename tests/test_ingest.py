"""`unclip ingest` for real: Ray tasks running img2dataset against an HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import ingest, storage, synthetic, url_list
from data_pipeline.config import IngestConfig, RayConfig, SyntheticConfig


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("site")
    records = synthetic.generate(str(folder), SyntheticConfig(count=30, seed=5))
    with synthetic.serve_directory(str(folder)) as base:
        yield folder, records, base


@pytest.mark.slow
def test_ingest_counts_reasons_and_resumes(site, tmp_path, local_ray):
    folder, records, base = site
    urls = tmp_path / "urls.parquet"
    synthetic.write_url_list(records, base, str(urls))
    table = pq.read_table(urls)
    duplicate = table.slice(0, 1)
    pq.write_table(pa.concat_tables([table, duplicate]), urls)  # one URL listed twice
    raw = str(tmp_path / "raw")
    cfg = IngestConfig(url_list=str(urls), shard_size=10)

    summary = ingest.run(cfg, RayConfig(), raw, "saved: config\n", log=lambda _: None)
    assert summary["input_rows"] == 34
    assert summary["filtered_before_download"] == {"duplicate_url": 1}
    assert summary["attempted"] == 33 and summary["kept"] == 30 and summary["failed"] == 3
    assert summary["failed_by_reason"] == {"decode_error": 2, "http_4xx": 1}
    assert storage.read_json(storage.join(raw, "_summary.json")) == summary
    assert storage.read_text(storage.join(raw, "_config.yaml")) == "saved: config\n"
    assert ingest.complete_shards(raw) == [0, 1, 2, 3]

    # every kept sample sits in a tar with its caption and URL-derived key
    kept = {}
    for shard in range(4):
        with tarfile.open(tmp_path / "raw" / f"{shard:05d}.tar") as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.load(tar.extractfile(member))
                    kept[meta["uid"]] = meta["caption"]
    good = [r for r in records if r["broken"] is None]
    assert kept == {url_list.stable_key(f"{base}/{r['path']}"): r["caption"] for r in good}

    # a shard whose marker is missing is redone; complete ones are left alone
    stats_before = (tmp_path / "raw" / "00000_stats.json").read_text()
    (tmp_path / "raw" / "00002_stats.json").unlink()
    (tmp_path / "raw" / "00002.tar").write_bytes(b"partial garbage")
    again = ingest.run(cfg, RayConfig(), raw, "saved: config\n", log=lambda _: None)
    assert (tmp_path / "raw" / "00000_stats.json").read_text() == stats_before
    assert tarfile.is_tarfile(tmp_path / "raw" / "00002.tar")
    assert {k: again[k] for k in ("attempted", "kept", "failed")} == {"attempted": 33, "kept": 30, "failed": 3}


def test_failure_reasons_are_classified():
    assert ingest.failure_reason("HTTP Error 404: File not found") == "http_4xx"
    assert ingest.failure_reason("HTTP Error 503: Service Unavailable") == "http_5xx"
    assert ingest.failure_reason("<urlopen error timed out>") == "timeout"
    assert ingest.failure_reason("Image decoding error") == "decode_error"
    assert ingest.failure_reason("<urlopen error [Errno 111] Connection refused>") == "connection_error"
    assert ingest.failure_reason("something new") == "other"


def test_a_rerun_with_another_list_is_refused(tmp_path):
    table = url_list.read(str(_write_list(tmp_path / "a.parquet", ["http://h/1", "http://h/2", "http://h/3"])))
    shards, _ = ingest.plan_shards(table, 2)
    raw = str(tmp_path / "raw")
    ingest.check_plan(raw, shards, done=set())
    ingest.check_plan(raw, shards, done={0, 1})  # the same list again: fine
    other = url_list.read(str(_write_list(tmp_path / "b.parquet", ["http://h/9", "http://h/2", "http://h/3"])))
    with pytest.raises(url_list.UrlListError, match="holds shard 00000 of another URL list"):
        ingest.check_plan(raw, ingest.plan_shards(other, 2)[0], done={0})


def _write_list(path, urls):
    pq.write_table(pa.table({"url": urls}), path)
    return path
