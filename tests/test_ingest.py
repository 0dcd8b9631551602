"""`unclip ingest` for real: Ray tasks running img2dataset against an HTTP server on 127.0.0.1
that serves every kind of bad input, lists in all four formats, S3 output, kill and rerun."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipeline import filters, ingest, plan, raw, url_list
from data_pipeline.config import IngestConfig, IngestFilters, RayConfig, Threshold
from launch import config
from models.base import storage
from tests.support import images, optout_reference
from tests.support.site import PRIVATE_REQUESTS, Site, serve, write_lists

QUIET = lambda _msg: None  # noqa: E731
LOCAL = ["127.0.0.1"]  # the test servers' one address: every other non-public address stays refused
ALLOW_LOCAL = "ingest.allow_networks=[127.0.0.1]"


@pytest.fixture(scope="module")
def private_site():
    """A site on 127.0.0.2, standing for a service inside the cluster's network (refused)."""
    with serve(address="127.0.0.2", seen=PRIVATE_REQUESTS) as private:
        yield private


@pytest.fixture(scope="module")
def site(private_site):
    """The site on 127.0.0.1 (allowed), whose /to-private redirects to the site on 127.0.0.2."""
    with serve(private=private_site) as base:
        yield base


def kept_keys(raw_url: str) -> list[str]:
    """Sample keys a reader of ROOT/raw/ gets (duplicates dropped), repeats kept."""
    return [
        s["uid"]
        for i in raw.complete_shards(raw_url)
        for s in raw.iter_samples(raw_url, i, raw.shard_duplicates(raw_url, i))
    ]


@pytest.mark.slow
def test_every_bad_input_is_counted_under_its_reason(site, private_site, tmp_path, local_ray):
    lists = tmp_path / "lists"
    lists.mkdir()
    good = write_lists(lists, site, private_site)
    filters = IngestFilters(min_image_size=32, max_image_aspect_ratio=3.0, max_image_pixels=10_000_000)
    cfg = IngestConfig(
        url_list=str(lists),
        shard_size=8,
        timeout_s=4,
        threads_per_task=8,
        filters=filters,
        progress_every_s=1,
        allow_networks=LOCAL,
    )
    raw_url = str(tmp_path / "raw")
    lines: list[str] = []
    summary = ingest.run(cfg, RayConfig(), raw_url, "a: 1\n", log=lines.append)

    assert summary["input_rows"] == 43
    assert summary["filtered_before_download"] == {
        "duplicate_url": 1,
        "empty_caption": 1,
        "malformed_url": 2,
        "non_utf8_caption": 2,
    }
    assert summary["failed_by_reason"] == {
        "decode_error": 2,
        "empty_body": 1,
        "http_4xx": 1,
        "http_5xx": 1,
        "invalid_url": 1,
        "redirect_loop": 1,
        "timeout": 1,
    }
    assert summary["refused_by_reason"] == {"opted_out": 3, "blocked_address": 2}
    assert PRIVATE_REQUESTS == []  # neither the listed private URL nor the redirect reached it
    assert all("(compatible; unclip;" in agent for agent in Site.user_agents)  # the crawler names itself
    assert summary["crawl"]["opt_outs"].startswith("honoured: X-Robots-Tag noai, noimageai, noindex, noimageindex")
    assert summary["filtered_after_download"] == {
        "duplicate_content": 2,
        "image_aspect_ratio": 1,
        "image_too_large": 1,
        "image_too_small": 1,
    }
    # not downloaded: 404, 500, hang, loop, the invalid host, 3 opted out, 2 on a private address
    assert summary["attempted"] == 37 and summary["downloaded"] == 37 - 10
    assert summary["kept"] == len(good) == 19
    assert summary["bytes"] > 0 and summary["images_per_s"] > 0
    assert sorted(kept_keys(raw_url)) == sorted(url_list.stable_key(u) for u in good)
    assert storage.read_json(storage.join(raw_url, raw.SUMMARY)) == summary
    assert any("shards" in line and "images/s" in line for line in lines)  # progress while it ran
    assert "kept" in lines[-1] and "failed: timeout" in lines[-1]  # the final table
    assert "refused: opted_out" in lines[-1] and "refused: blocked_address" in lines[-1]

    # the odd images were converted, not mangled: every kept odd image is the red it was drawn in
    for shard in raw.complete_shards(raw_url):
        with tarfile.open(raw.shard_file(raw_url, shard, ".tar")) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.load(tar.extractfile(member))
                    if "odd image" in meta["caption"]:
                        data = tar.extractfile(member.name[:-5] + ".png").read()
                        pixel = Image.open(io.BytesIO(data)).convert("RGB").getpixel((32, 32))
                        assert all(abs(a - b) <= 12 for a, b in zip(pixel, images.RED, strict=False)), (
                            meta["url"],
                            pixel,
                        )


@pytest.mark.slow
def test_opt_outs_and_private_networks_are_opened_only_when_asked(site, private_site, tmp_path, local_ray):
    urls = [f"{site}/optout/noai.png", f"{site}/optout/for-unclip.png", f"{private_site}/ok/7.png"]
    pq.write_table(pa.table({"url": urls, "caption": ["a", "b", "c"]}), tmp_path / "urls.parquet")
    cfg = IngestConfig(
        url_list=str(tmp_path / "urls.parquet"),
        shard_size=8,
        disallowed_header_directives=[],
        allow_networks=["127.0.0.1", "127.0.0.2/32"],
    )
    lines: list[str] = []
    seen_before = len(PRIVATE_REQUESTS)
    summary = ingest.run(cfg, RayConfig(), str(tmp_path / "raw"), "a: 1\n", log=lines.append)
    assert summary["kept"] == 3 and summary["refused_by_reason"] == {}
    assert PRIVATE_REQUESTS[seen_before:] == ["/ok/7.png"]
    # said once in the log, and in the summary and its table
    assert summary["crawl"]["opt_outs"] == ingest.OPT_OUTS_IGNORED
    assert sum(ingest.OPT_OUTS_IGNORED in line for line in lines[:-1]) == 1
    assert ingest.OPT_OUTS_IGNORED in lines[-1]


@pytest.mark.slow
def test_s3_output_and_input(site, s3_prefix, local_ray, caplog):
    rows = [{"URL": f"{site}/ok/{i}.png", "TEXT": f"picture {i}", "punsafe": i / 10} for i in range(10)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    storage.write_bytes(storage.join(s3_prefix, "lists", "urls.parquet"), buf.getvalue())
    raw_url = storage.join(s3_prefix, "raw")
    safe = IngestFilters(thresholds={"punsafe": Threshold(max=0.55)})
    # two shards in one Ray task, a process each
    cfg = IngestConfig(
        url_list=storage.join(s3_prefix, "lists"),
        shard_size=4,
        processes_per_task=2,
        filters=safe,
        allow_networks=LOCAL,
    )
    storage.write_bytes(storage.join(raw_url, f"{storage.TMP_PREFIX}left-by-a-killed-run"), b"x")
    caplog.set_level(logging.INFO, logger="werkzeug")  # moto's server logs every request it answers
    summary = ingest.run(cfg, RayConfig(), raw_url, "a: 1\n", log=QUIET)
    prefix = raw_url.removeprefix("s3://").split("/", 1)[1]
    listings = [r for r in caplog.records if f"list-type=2&prefix={prefix}/&delimiter=/" in r.getMessage()]
    assert len(listings) == 1  # ROOT/raw/ is listed once per run
    assert summary["filtered_before_download"] == {"threshold:punsafe": 4}
    assert summary["kept"] == 6 and raw.complete_shards(raw_url) == [0, 1]
    assert sorted(kept_keys(raw_url)) == sorted(url_list.stable_key(r["URL"]) for r in rows[:6])
    names = storage.listdir(raw_url)
    assert {
        "00000.tar",
        "00000.parquet",
        "00000_stats.json",
        raw.SUMMARY,
        raw.PROGRESS,
        raw.DEDUP_DIR,
        plan.PLAN_DIR,
    } <= set(names)
    assert not any(
        n.startswith(storage.TMP_PREFIX) for n in storage.url_to_fs(raw_url)[0].ls(storage.url_to_fs(raw_url)[1])
    )
    # carried metadata: the list's punsafe column is in the shard parquet
    assert sorted(raw.read_status(raw_url, 0, ["punsafe"])["punsafe"].to_pylist()) == [0.0, 0.1, 0.2, 0.3]


def _markers(folder) -> int:
    return len(list(folder.glob("*.json"))) if folder.exists() else 0


def _ingest(root, settings: list[str]) -> dict:
    """`unclip ingest` with these settings into `root`, in this process."""
    cfg = config.load(None, [f"root={root}", ALLOW_LOCAL, *settings])
    return ingest.run(cfg.ingest, cfg.ray, str(root / "raw"), "x: 1\n", log=QUIET)


def _kill_ingest_when(root, settings: list[str], ready, what: str) -> None:
    """Start `unclip ingest` in a process of its own and SIGKILL it as soon as `ready()` holds."""
    command = [sys.executable, "-m", "launch.cli", "ingest", f"root={root}", "ray.num_cpus=2", ALLOW_LOCAL, *settings]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, f"the run finished before it could be killed {what}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)  # Ray fate-shares its local cluster with the killed driver; let it wind down
    assert not (root / "raw" / raw.SUMMARY).exists()


def _kill_a_download_task(raw_dir, killed: list[int]) -> None:
    """SIGKILL the first Ray worker seen downloading into `raw_dir` (as when its node dies); Ray runs
    its task again elsewhere and the dead attempt's staging folder stays behind."""
    import psutil

    deadline = time.time() + 120
    while time.time() < deadline and not killed:
        if raw_dir.exists() and any(p.name.startswith(storage.TMP_PREFIX) for p in raw_dir.iterdir()):
            for proc in psutil.process_iter(["cmdline"]):
                if any("_download_group" in part for part in proc.info["cmdline"] or []):
                    proc.kill()
                    killed.append(proc.pid)
                    return
        time.sleep(0.02)


KILL_LIST_SIZE = 120


@pytest.mark.slow
def test_sigkill_then_rerun_keeps_exactly_the_uninterrupted_keys(tmp_path, local_ray):
    with serve(delay_s=0.05) as base:
        urls = [f"{base}/ok/{i}.png" for i in range(KILL_LIST_SIZE)] + [f"{base}/dup/a.png", f"{base}/404.png"]
        # in shard 0, an earlier copy that finishes last (the kept one), and a later copy that finishes first
        urls[1:1] = [f"{base}/late/3.png"]
        urls[5:5] = [f"{base}/same/3/b.png"]
        pq.write_table(
            pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}), tmp_path / "urls.parquet"
        )
        settings = [f"ingest.url_list={tmp_path / 'urls.parquet'}", "ingest.shard_size=8", "ingest.threads_per_task=2"]

        # the reference run loses a download task midway, as when a node dies
        killed: list[int] = []
        killer = threading.Thread(target=_kill_a_download_task, args=(tmp_path / "reference" / "raw", killed))
        killer.start()
        _ingest(tmp_path / "reference", settings)
        killer.join()
        assert killed, "no download task was seen to kill"
        leftovers = [p.name for p in (tmp_path / "reference" / "raw").iterdir()]
        assert not [n for n in leftovers if n.startswith(storage.TMP_PREFIX)]  # the dead task's staging went too
        expected = kept_keys(str(tmp_path / "reference" / "raw"))
        # /dup/a.png repeats /ok/0.png; /same/3/b.png repeats /late/3.png, which stands earlier in the list
        assert len(expected) == len(set(expected)) == KILL_LIST_SIZE + 1
        assert url_list.stable_key(f"{base}/late/3.png") in expected
        assert url_list.stable_key(f"{base}/same/3/b.png") not in expected

        root = tmp_path / "killed"
        _kill_ingest_when(root, settings, lambda: len(raw.complete_shards(str(root / "raw"))) >= 3, "while downloading")
        partial = raw.complete_shards(str(root / "raw"))
        assert 3 <= len(partial) < 16

        summary = _ingest(root, settings)
        assert summary["this_run"]["shards"] == 16 - len(partial)
    # the totals add the earlier run's shards (read back from their stats) to this run's
    assert summary["shards"] == 16 and summary["attempted"] == len(urls) and summary["kept"] == KILL_LIST_SIZE + 1
    assert summary["failed_by_reason"] == {"http_4xx": 1} and summary["filtered_after_download"] == {
        "duplicate_content": 2
    }
    got = kept_keys(str(root / "raw"))
    assert len(got) == len(set(got))  # each once
    assert sorted(got) == sorted(expected)  # exactly the uninterrupted run's keys


@pytest.mark.slow
def test_a_kill_while_planning_then_a_rerun_plans_exactly_the_same_shards(tmp_path, local_ray):
    urls = [f"http://127.0.0.1:9/{i * 7919 % 3000}.png" for i in range(4000)]  # port 9 refuses: downloads fail fast
    pq.write_table(
        pa.table({"url": urls, "caption": [f"c {i}" for i in range(4000)]}),
        tmp_path / "urls.parquet",
        row_group_size=100,
    )
    # an opt-out list naming every tenth URL, in row groups the plan reads as pieces of its own
    entries = [f"http://127.0.0.1:9/{n}.png" for n in range(0, 3000, 10)]
    pq.write_table(pa.table({"url": entries}), tmp_path / "optout.parquet", row_group_size=100)
    settings = [
        f"ingest.url_list={tmp_path / 'urls.parquet'}",
        f"ingest.filters.optout_list={tmp_path / 'optout.parquet'}",
        "ingest.shard_size=500",
        "ingest.plan_task_rows=100",
        "ingest.dedup_bucket_rows=100",
        "ingest.timeout_s=1",
    ]
    root = tmp_path / "killed"
    plan_dir = root / "raw" / plan.PLAN_DIR
    _kill_ingest_when(root, settings, lambda: _markers(plan_dir / "urldup") >= 1, "while planning")
    assert (
        _markers(plan_dir / "scan") == 40
        and _markers(plan_dir / "rows") < 40
        and not raw.complete_shards(str(root / "raw"))
    )

    summary = _ingest(root, settings)
    kept, counts = filters.apply_metadata_filters(url_list.read(str(tmp_path / "urls.parquet")), IngestFilters())
    reference, opted_out = optout_reference.apply(kept, entries)
    assert counts == {"duplicate_url": 1000} and opted_out == 300
    assert summary["filtered_before_download"] == {**counts, "opted_out_listed": 300}
    expected = reference["uid"].to_pylist()
    for shard in raw.complete_shards(
        str(root / "raw")
    ):  # every kept row once, in the same shards (img2dataset's own row order)
        attempted = raw.read_status(str(root / "raw"), shard, ["uid"])["uid"].to_pylist()
        assert sorted(attempted) == sorted(expected[shard * 500 : (shard + 1) * 500])
    assert summary["shards"] == 6 and summary["failed_by_reason"] == {"connection_error": 2700}


@pytest.mark.slow
def test_a_kill_during_content_dedup_then_a_rerun_keeps_the_earliest_copies(site, tmp_path, local_ray):
    urls = [f"{site}/same/{i}/{k}.png" for i in range(30) for k in (0, 1)]
    random.Random(3).shuffle(urls)
    pq.write_table(pa.table({"url": urls, "caption": [f"c {i}" for i in range(60)]}), tmp_path / "urls.parquet")
    settings = [
        f"ingest.url_list={tmp_path / 'urls.parquet'}",
        "ingest.shard_size=2",
        "ingest.plan_task_rows=2",
        "ingest.dedup_bucket_rows=2",
        "ingest.threads_per_task=2",
    ]
    root = tmp_path / "killed"
    dedup_dir = root / "raw" / raw.DEDUP_DIR
    _kill_ingest_when(root, settings, lambda: _markers(dedup_dir / "keys") >= 1, "during content dedup")
    assert len(raw.complete_shards(str(root / "raw"))) == 30 and _markers(dedup_dir / "deliver") < 30

    summary = _ingest(root, settings)
    assert summary["this_run"]["shards"] == 0 and summary["filtered_after_download"] == {"duplicate_content": 30}
    first = {}
    for url in urls:  # the copy listed first is kept
        first.setdefault(url.split("/")[-2], url)
    assert sorted(kept_keys(str(root / "raw"))) == sorted(url_list.stable_key(u) for u in first.values())


def test_a_rerun_with_another_list_or_settings_is_refused(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    _write_list(lists / "a.parquet", ["http://h/1", "http://h/2", "http://h/3"])
    cfg = IngestConfig(url_list=str(lists), shard_size=2)
    raw_url = str(tmp_path / "raw")
    spec = plan.prepare(cfg, raw_url, ingest.plan_settings(cfg), [], QUIET)
    assert (
        plan.prepare(cfg, raw_url, ingest.plan_settings(cfg), [0, 1], QUIET) == spec
    )  # same list and settings: reused

    other = IngestConfig(url_list=str(lists), shard_size=2, image_size=128)
    with pytest.raises(url_list.UrlListError, match="was ingested with ingest.image_size=256, now 128"):
        plan.prepare(other, raw_url, ingest.plan_settings(other), [0], QUIET)
    other = IngestConfig(url_list=str(lists), shard_size=2, filters=IngestFilters(min_caption_chars=5))
    with pytest.raises(url_list.UrlListError, match="was ingested with ingest.filters.min_caption_chars=0, now 5"):
        plan.prepare(other, raw_url, ingest.plan_settings(other), [0], QUIET)

    _write_list(lists / "b.parquet", ["http://h/9"])
    with pytest.raises(
        url_list.UrlListError,
        match=r"holds 1 complete shards \(00000, ...\) of another URL list \(.*b.parquet is new\)",
    ):
        plan.prepare(cfg, raw_url, ingest.plan_settings(cfg), [0], QUIET)
    (lists / "b.parquet").unlink()
    _write_list(lists / "a.parquet", ["http://h/9", "http://h/2", "http://h/3"])
    with pytest.raises(url_list.UrlListError, match=r"of another URL list \(.*a.parquet changed"):
        plan.prepare(cfg, raw_url, ingest.plan_settings(cfg), [0], QUIET)
    # with no shard complete, another list is planned anew
    assert plan.prepare(cfg, raw_url, ingest.plan_settings(cfg), [], QUIET).files[0].rows == 3
    # an opt-out list is part of what a plan is made from: a new export is a new plan
    (tmp_path / "optout.txt").write_text("h\n")
    with_optout = IngestConfig(
        url_list=str(lists), shard_size=2, filters=IngestFilters(optout_list=str(tmp_path / "optout.txt"))
    )
    other_root = str(tmp_path / "raw-optout")
    assert (
        plan.prepare(with_optout, other_root, ingest.plan_settings(with_optout), [], QUIET).optout[0].format == "text"
    )
    (tmp_path / "optout.txt").write_text("h\nhttp://h/2\n")
    with pytest.raises(url_list.UrlListError, match=r"of another URL list \(.*optout.txt changed"):
        plan.prepare(with_optout, other_root, ingest.plan_settings(with_optout), [0], QUIET)


def _write_list(path, urls):
    pq.write_table(pa.table({"url": urls}), path)
    return path


def test_failure_reasons_are_classified():
    from data_pipeline.filters import failure_reason

    assert failure_reason("HTTP Error 404: File not found") == "http_4xx"
    assert failure_reason("HTTP Error 503: Service Unavailable") == "http_5xx"
    assert failure_reason("<urlopen error timed out>") == "timeout"
    assert (
        failure_reason("HTTP Error 302: The HTTP server returned a redirect error that would lead to an infinite loop.")
        == "redirect_loop"
    )
    assert failure_reason("Image decoding error") == "decode_error"
    assert failure_reason("<urlopen error [Errno 111] Connection refused>") == "connection_error"
    assert failure_reason("<urlopen error [Errno -3] Temporary failure in name resolution>") == "dns"
    assert failure_reason("something new") == "other"


def test_the_summary_points_at_dns_when_more_than_5_percent_fail_to_resolve():
    assert ingest.dns_hint(1000, 50) is None
    hint = ingest.dns_hint(1000, 51)
    assert hint is not None and "51 of 1,000 attempts (5%)" in hint and "infra/README.md" in hint
    crawl = ingest.crawl_policy(IngestConfig())
    assert crawl["opt_outs"].startswith("honoured") and crawl["user_agent_token"] == "unclip"
    summary = {
        "input_rows": 1000,
        "filtered_before_download": {},
        "attempted": 1000,
        "downloaded": 900,
        "failed_by_reason": {"dns": 51},
        "refused_by_reason": {},
        "filtered_after_download": {},
        "kept": 900,
        "bytes": 1,
        "shards": 1,
        "wall_s": 1.0,
        "images_per_s": 900.0,
        "crawl": crawl,
        "hint": hint,
    }
    assert ingest.format_table(summary).splitlines()[-1] == f"  hint: {hint}"


@pytest.mark.slow
def test_s3_faults_and_an_outage_lose_nothing(site, s3_prefix, local_ray, faults, capsys):
    """Ingest onto S3 through a proxy failing a tenth of requests: an outage after the first shard
    stops the run in one line naming the URL, the shard stays as it was, and a rerun (faults still
    on) completes with exactly the keys a fault-free run keeps."""
    from launch import cli
    from tests.conftest import FAULT_SETTINGS
    from tests.support.faultproxy import run_into_outage, upstream_keys

    rows = [{"URL": f"{site}/ok/{i}.png", "TEXT": f"picture {i}"} for i in range(8)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    storage.write_bytes(storage.join(s3_prefix, "lists", "urls.parquet"), buf.getvalue())
    raw_url = storage.join(s3_prefix, "raw")
    command = [
        "ingest",
        f"root={s3_prefix}",
        f"ingest.url_list={storage.join(s3_prefix, 'lists')}",
        ALLOW_LOCAL,
        "ingest.shard_size=4",
        "ingest.max_in_flight=1",
        *FAULT_SETTINGS,
    ]
    stats = lambda: sorted(k for k in upstream_keys(faults, raw_url) if k.endswith("_stats.json"))  # noqa: E731
    faults.schedule(0.1, seed=11)
    code, seconds = run_into_outage(faults, lambda: cli.main(command), ready=lambda: len(stats()) >= 1, kind="slowdown")
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and seconds < 120, (code, seconds)
    assert (
        lines[-1].startswith("unclip ingest: error: storage unavailable: ")
        and s3_prefix.removeprefix("s3://") in lines[-1]
    ), lines[-3:]
    before = upstream_keys(faults, raw_url)
    done = [k for k in before if k.endswith("_stats.json")]
    assert len(done) == 1, done
    failed_tries = sum(faults.counts[kind] for kind in ("slowdown", "reset", "stall"))
    faults.schedule(0.1, seed=12)
    assert cli.main(command) == 0, capsys.readouterr().err[-2000:]
    assert failed_tries + sum(faults.counts[kind] for kind in ("slowdown", "reset", "stall")) >= 3, faults.counts
    faults.schedule(0.0)
    assert raw.complete_shards(raw_url) == [0, 1]
    assert sorted(kept_keys(raw_url)) == sorted(url_list.stable_key(r["URL"]) for r in rows)
    after = upstream_keys(faults, raw_url)
    shard_files = [k for k in before if k.rsplit("/", 1)[-1][:5].isdigit() and storage.TMP_PREFIX not in k]
    assert shard_files and {k: after[k] for k in shard_files} == {k: before[k] for k in shard_files}  # not rewritten
