"""Planning and dedup in Ray tasks keep exactly what one process holding everything keeps.

The references are the in-memory forms of the same rules (`url_list.read` +
`filters.apply_metadata_filters`, `filters.find_duplicates`); the distributed runs are split into
many pieces and buckets so that every boundary is crossed."""

from __future__ import annotations

import hashlib
import io
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import content_dedup, dedup, filters, plan, plan_run, raw, tasks, url_list
from data_pipeline.config import IngestConfig, IngestFilters, Threshold
from models.base import storage
from tests.support import optout_reference

QUIET = lambda _msg: None  # noqa: E731


def write_mixed_list(folder) -> None:
    """Four files, four formats. URLs repeat within and across files, sometimes first in a row
    another rule drops; WIDTH exists in two files only; `key` is a name img2dataset reserves."""
    rng = random.Random(0)
    rows = []
    for i in range(700):
        n = rng.randrange(600)  # ~1.2 listings per URL, spread over every file
        caption = rng.choice(["", "   ", "x", f"a photo of thing {i}", f"two words {i}", "café au lait"])
        rows.append(
            {
                "URL": f"http://host{n % 9}.example/{n}.jpg" if i % 97 else "not a url",
                "TEXT": caption,
                "similarity": round(rng.random(), 3),
                "key": f"k{i}",
            }
        )
    with_width = [{**r, "WIDTH": 50 + 7 * i % 400, "HEIGHT": 300} for i, r in enumerate(rows[:400])]
    pq.write_table(pa.Table.from_pylist(with_width), folder / "a.parquet", row_group_size=37)
    (folder / "b.csv").write_bytes(
        b"URL,TEXT,similarity,key\n"
        + b"".join(f'{r["URL"]},"{r["TEXT"]}",{r["similarity"]},{r["key"]}\n'.encode() for r in rows[400:500])
        + b'http://host1.example/999.jpg,"caf\xe9 latin-1",0.9,kbad\n'
    )
    (folder / "c.tsv").write_text(
        "URL\tTEXT\tsimilarity\n" + "".join(f"{r['URL']}\t{r['TEXT']}\t{r['similarity']}\n" for r in rows[500:600])
    )
    (folder / "d.jsonl").write_text(
        "".join(json.dumps({**r, "extra": i, "WIDTH": 90 + i, "HEIGHT": 99}) + "\n" for i, r in enumerate(rows[600:]))
    )


def planned_rows(planned: plan.Plan) -> pa.Table:
    return pa.concat_tables([plan.read_shard(planned.shard_inputs(s)) for s in range(planned.shards)])


@pytest.mark.slow
def test_the_plan_in_tasks_keeps_exactly_the_rows_of_one_process(tmp_path, local_ray):
    lists = tmp_path / "lists"
    lists.mkdir()
    write_mixed_list(lists)
    strict = IngestFilters(
        min_caption_words=2,
        min_width=100,
        thresholds={"similarity": Threshold(min=0.1)},
        blocked_domains=["host4.example"],
    )
    for f in (IngestFilters(), strict):  # the defaults keep rows of every file; `strict` lacks WIDTH in two
        reference, counts = filters.apply_metadata_filters(url_list.read(str(lists)), f)
        assert counts["duplicate_url"] > 200 and len(reference) > 60
        plans = {}
        # a piece per file and one bucket; row-group pieces and 11 buckets; pieces in runs of 30 rows
        for layout in ((1_000_000, 4_000_000), (40, 64), (30, 50)):
            cfg = IngestConfig(
                url_list=str(lists), shard_size=16, plan_task_rows=layout[0], dedup_bucket_rows=layout[1], filters=f
            )
            spec = plan.prepare(cfg, str(tmp_path / f"raw-{layout[0]}-{len(counts)}"), {}, [], QUIET)
            plans[layout] = planned = plan_run.execute(spec, QUIET)
            assert planned.input_rows == 701 and planned.filtered == counts
            got = planned_rows(planned)
            assert got.schema == reference.schema
            assert got.to_pylist() == reference.to_pylist()  # the same rows, columns and types, in list order
            for shard in range(planned.shards):  # shards are the same slices of the kept rows
                assert (
                    plan.read_shard(planned.shard_inputs(shard)).to_pylist()
                    == reference.slice(shard * 16, 16).to_pylist()
                )
    assert counts["width_too_small"] > 50 and counts["blocked_domain"] > 20 and counts["non_utf8_caption"] == 1
    many = plans[(40, 64)]
    assert (
        len(many.spec.pieces) == 14 and many.spec.buckets == 11
    )  # 11 row-group pieces of a.parquet, one per text file
    assert any(len(many.shard_inputs(s)) > 1 for s in range(many.shards))  # some shards span pieces
    runs = tasks.committed(plans[(30, 50)].spec.folder("scan"))
    assert [len(runs[i]["run_starts"]) for i in range(14)] == [2] * 10 + [
        1,
        4,
        4,
        4,
    ]  # 37 = 30 + 7 rows, then 30; 100 (+1) = 30+30+30+10 (+1)


@pytest.mark.slow
def test_an_optout_list_removes_exactly_the_rows_it_names(tmp_path, local_ray):
    lists, optouts = tmp_path / "lists", tmp_path / "optout"
    lists.mkdir()
    optouts.mkdir()
    write_mixed_list(lists)
    listed = url_list.read(str(lists))["url"].to_pylist()
    exact = sorted({u for u in listed if u and u.endswith("7.jpg")})  # URLs as listed, some repeated in the list
    entries = [*exact, "host3.example", "*.HOST5.example", "example", "not an entry", "http://elsewhere.example/1.jpg"]
    # the registry's export: parquet in row groups, and a text file with a comment and a blank line
    pq.write_table(pa.table({"url": entries[: len(exact) // 2]}), optouts / "a.parquet", row_group_size=5)
    (optouts / "b.txt").write_text("# do not train\n\n" + "\n".join(entries[len(exact) // 2 :]) + "\n")

    kept, counts = filters.apply_metadata_filters(url_list.read(str(lists)), IngestFilters())
    reference, opted_out = optout_reference.apply(kept, entries)
    assert 60 < opted_out < len(kept)
    for layout in ((1_000_000, 4_000_000), (40, 64)):  # one bucket; row-group pieces and 11 buckets
        cfg = IngestConfig(
            url_list=str(lists),
            shard_size=16,
            plan_task_rows=layout[0],
            dedup_bucket_rows=layout[1],
            filters=IngestFilters(optout_list=str(optouts)),
        )
        raw_url = str(tmp_path / f"raw-{layout[0]}")
        spec = plan.prepare(cfg, raw_url, {}, [], QUIET)
        planned = plan_run.execute(spec, QUIET)
        assert planned.filtered == {**counts, "opted_out_listed": opted_out}
        assert planned_rows(planned).to_pylist() == reference.to_pylist()
        listed_counts = tasks.committed(spec.folder("optout-keys"))
        assert sum(r["ignored"] for r in listed_counts.values()) == 2  # "example" alone, "not an entry"
        assert len(spec.optout_pieces) == 2  # a.parquet (its row groups in one piece), b.txt


def write_status_shards(raw_url: str, shards: int, rows: int, seed: int = 0) -> pa.Table:
    """img2dataset-like status files: ~1 in 4 downloads repeats an earlier image, some failed.
    Returns everything as one table (shard, row, uid, sha256) for the reference."""
    rng = np.random.default_rng(seed)
    pool = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(shards * rows * 3 // 4)]
    everything = []
    for shard in range(shards):
        sha = [pool[int(rng.integers(len(pool)))] for _ in range(rows)]
        status = ["success" if rng.random() > 0.1 else "failed_to_download" for _ in range(rows)]
        table = pa.table(
            {
                "key": [f"{shard:05d}{r:04d}" for r in range(rows)],  # img2dataset's: shard, then place in list
                "uid": [f"{shard}-{r}" for r in range(rows)],
                "sha256": [s if st == "success" else None for s, st in zip(sha, status, strict=True)],
                "status": status,
            }
        )
        buf = io.BytesIO()
        # as img2dataset writes them: in the order downloads finished, not in list order
        pq.write_table(table.take(pa.array(rng.permutation(rows))), buf)
        storage.write_bytes(raw.shard_file(raw_url, shard, ".parquet"), buf.getvalue())
        everything.append(
            table.append_column("shard", pa.array([shard] * rows)).append_column("row", pa.array(range(rows)))
        )
    return pa.concat_tables(everything).filter(pa.compute.equal(pa.concat_tables(everything)["status"], "success"))


@pytest.mark.slow
def test_content_dedup_keeps_the_earliest_sample_across_shards_and_buckets(tmp_path, local_ray):
    raw_url = str(tmp_path / "raw")
    downloaded = write_status_shards(raw_url, shards=23, rows=40)
    expected = filters.find_duplicates(downloaded)
    assert 150 < len(expected) < 500

    chosen = content_dedup.layout(raw_url, 23, 23 * 40, plan_task_rows=160, shard_size=40, bucket_rows=100)
    assert chosen == {"shards": 23, "group_shards": 4, "buckets": 10}
    result = content_dedup.run(raw_url, chosen, QUIET)
    assert result["duplicates"] == len(expected)
    for shard in range(23):
        want = expected.filter(pa.compute.equal(expected["shard"], shard))
        path = raw.shard_file(raw_url, shard, raw.DUPLICATES_SUFFIX)
        if len(want) == 0:
            assert not storage.exists(path)
            continue
        got = pq.read_table(path)
        assert got["uid"].to_pylist() == want["uid"].to_pylist()  # each shard's own list, in list order
        assert got["duplicate_of"].to_pylist() == want["duplicate_of"].to_pylist()  # the earliest copy is kept
        assert raw.shard_duplicates(raw_url, shard) == set(want["uid"].to_pylist())


def test_exact_dedup_core_on_raw_keys():
    """Keys that agree in their first 24 bytes are still told apart; ties go to the lowest order."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (50, 32), dtype=np.uint8)
    near = base.copy()
    near[:, 31] ^= 1  # the same bucket and prefix, another key
    digests = np.concatenate([base, near, base[:20]])
    order = dedup.order_of(
        np.r_[np.full(50, 3), np.full(50, 1), np.full(20, 0)], np.r_[np.arange(50), np.arange(50), np.arange(20)]
    )
    dup, first = dedup.repeats(digests, order)
    assert sorted(dup.tolist()) == list(range(20))  # base[:20] at major 3 repeat the copies at major 0
    assert sorted(first.tolist()) == list(range(100, 120))
    assert np.array_equal(dedup.from_hex(dedup.to_hex(digests, 32))[0], digests)
