"""`unclip embed` for real: Ray tasks and actors, open_clip and a diffusers VAE built from small configs,
over webdataset and parquet shards on local disk and on S3 (moto on 127.0.0.1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline import embed, sources, store, store_writer, synthetic
from data_pipeline.config import SyntheticConfig
from data_pipeline.embed_worker import invalid_rows
from launch import cli, config
from models.base import storage
from models.base.configlib import to_dict
from models.encoders import write_tiny_encoders

SHARD = 8
QUIET = lambda _msg: None  # noqa: E731


def embed_config(root, env, *extra):
    return config.load(
        None,
        [
            f"root={root}",
            f"embed.input={env['wds']}",
            "embed.batch_size=4",
            f"encoders.clip.model=local-dir:{env['encoders']}/clip",
            f"encoders.vae.path={env['encoders']}/vae",
            *extra,
        ],
    )


def run_embed(cfg):
    return embed.run(cfg.encoders, cfg.embed, cfg.ray, cfg.raw_url, cfg.store_url, to_dict(cfg), log=QUIET)


@pytest.fixture(scope="module")
def env(tmp_path_factory, local_ray):
    """96 good images and 2 undecodable ones as webdataset shards, tiny encoders, one reference store."""
    base = tmp_path_factory.mktemp("embed")
    site = base / "site"
    records = [r for r in synthetic.generate(str(site), SyntheticConfig(count=96, seed=3)) if r["broken"] != "missing"]
    wds = str(base / "wds")
    synthetic.write_shards(records, str(site), wds, SHARD)
    env = {"base": base, "site": site, "records": records, "wds": wds, "encoders": str(base / "encoders")}
    cfg = embed_config(base / "reference", env)
    write_tiny_encoders(cfg.encoders)
    env["manifest"] = run_embed(cfg)
    env["store_url"] = cfg.store_url
    return env


def read_all(store_url: str) -> dict[str, np.ndarray]:
    s = store.open_store(store_url)
    data = s.read(
        [
            "key",
            "clip_score",
            "clip_image_emb",
            "clip_text_emb",
            "clip_text_tokens",
            "text_mask",
            "vae_latent",
            "image_64",
        ]
    )
    order = np.argsort(data["key"])
    return {k: v[order] for k, v in data.items()}


@pytest.mark.slow
def test_manifest_follows_the_contract(env):
    m = env["manifest"]
    assert m["schema_version"] == store.SCHEMA_VERSION
    clip, vae = m["encoders"]["clip"], m["encoders"]["vae"]
    assert clip["weights_sha256"] == storage.sha256_file(
        os.path.join(env["encoders"], "clip", "open_clip_model.safetensors")
    )
    assert vae["weights_sha256"] == storage.sha256_file(
        os.path.join(env["encoders"], "vae", "diffusion_pytorch_model.safetensors")
    )
    assert vae["scaling_factor"] == pytest.approx(0.18215)
    assert m["columns"]["clip_image_emb"] == {"dtype": "float16", "shape": [64]}
    assert m["columns"]["clip_text_tokens"] == {"dtype": "float16", "shape": [32, 64]}
    assert m["columns"]["text_mask"] == {"dtype": "bool", "shape": [32]}
    assert m["columns"]["image_64"] == {"dtype": "png", "shape": [64, 64, 3]}
    index = store.read_index(env["store_url"], m, None)
    assert m["totals"]["parts"] == 13 and index["file"].to_pylist()[:2] == ["part-00000.parquet", "part-00001.parquet"]
    for file, digest, size in zip(
        index["file"].to_pylist(), index["sha256"].to_pylist(), index["bytes"].to_pylist(), strict=True
    ):
        if file is not None:
            assert storage.sha256_file(storage.join(env["store_url"], file)) == digest
            assert os.path.getsize(storage.join(env["store_url"], file)) == size
    # the last shard holds only the two undecodable images: its part has no file, not a 0-row one
    assert (
        index["rows"].to_pylist()[-1] == 0 and index["file"].to_pylist()[-1] is None and m["totals"]["empty_parts"] == 1
    )
    assert not os.path.exists(os.path.join(env["store_url"], "part-00012.parquet"))
    assert m["totals"]["rows"] == sum(index["rows"].to_pylist()) == 96
    assert m["totals"]["counts"]["rejected_decode_error"] == 2 and m["totals"]["counts"]["kept"] == 96
    # the index's statistics add up to the manifest's
    sums = np.sum([np.frombuffer(b, "<f8") for b in index["sum:clip_image_emb"].to_pylist() if b is not None], axis=0)
    assert np.allclose(sums / sum(index["count:clip_image_emb"].to_pylist()), m["clip_image_emb_mean"])
    emb = read_all(env["store_url"])["clip_image_emb"].astype(np.float64)
    assert np.allclose(m["clip_image_emb_mean"], emb.mean(0), atol=1e-4)
    assert np.allclose(m["clip_image_emb_std"], emb.std(0), atol=1e-4)
    assert m["config"]["embed"]["batch_size"] == 4


def test_invalid_rows_are_named():
    specs = {"clip_image_emb": {"dtype": "float16", "shape": [2]}, "text_mask": {"dtype": "bool", "shape": [3]}}
    good = np.zeros((4, 2), np.float32)
    assert invalid_rows({"clip_image_emb": good}, specs, 4) == {}
    bad = good.copy()
    bad[1, 0], bad[2, 1], bad[3, 0] = np.nan, np.inf, 1e6  # 1e6 does not fit in float16
    assert invalid_rows({"clip_image_emb": bad}, specs, 4) == {1: "non_finite", 2: "non_finite", 3: "non_finite"}
    assert invalid_rows({"clip_image_emb": np.zeros((4, 3))}, specs, 4) == {i: "wrong_shape" for i in range(4)}


@pytest.mark.slow
def test_clip_score_filter_drops_and_counts(env):
    scores = read_all(env["store_url"])["clip_score"]
    threshold = float(np.median(scores))
    cfg = embed_config(env["base"] / "filtered", env, f"embed.min_clip_score={threshold}")
    m = run_embed(cfg)
    expected = int((scores >= np.float32(threshold)).sum())
    assert m["totals"]["rows"] == expected < 96
    assert m["totals"]["counts"]["rejected_clip_score_below_threshold"] == 96 - expected
    assert (read_all(cfg.store_url)["clip_score"] >= np.float32(threshold)).all()


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_same_store(env):
    root = env["base"] / "killed"
    cfg = embed_config(root, env)
    args = [
        f"root={root}",
        f"embed.input={env['wds']}",
        "embed.batch_size=4",
        "ray.num_cpus=2",
        f"encoders.clip.model=local-dir:{env['encoders']}/clip",
        f"encoders.vae.path={env['encoders']}/vae",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "embed", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 180
    while not store_writer.committed_parts(cfg.store_url) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "embed finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)  # the killed driver's local Ray winds down with it
    done = store_writer.committed_parts(cfg.store_url)
    assert 1 <= len(done) < 13 and not storage.exists(storage.join(cfg.store_url, store.MANIFEST))

    rerun = run_embed(cfg)
    assert rerun["totals"]["rows"] == 96 and rerun["totals"]["counts"]["rejected_decode_error"] == 2
    assert_same_store(cfg.store_url, env)


def assert_same_store(store_url: str, env) -> None:
    """The same keys and values as the reference store, and every part byte for byte."""
    got, want = read_all(store_url), read_all(env["store_url"])
    assert len(set(got["key"])) == len(got["key"]) == 96
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    digests = lambda url: store.read_index(url, store.read_manifest(url), ["part", "sha256"]).to_pylist()  # noqa: E731
    assert digests(store_url) == digests(env["store_url"])


@pytest.mark.slow
def test_other_encoders_or_settings_are_refused(env, tmp_path):
    seed1 = config.load(
        None,
        [f"encoders.clip.model=local-dir:{tmp_path}/clip", f"encoders.vae.path={tmp_path}/vae", "encoders.tiny.seed=1"],
    )
    write_tiny_encoders(seed1.encoders)
    other = embed_config(env["base"] / "reference", env, f"encoders.clip.model=local-dir:{tmp_path}/clip")
    with pytest.raises(
        store.StoreError, match=r"encoders.clip.weights_sha256 is '[0-9a-f]{64}' there, '[0-9a-f]{64}' now"
    ):
        run_embed(other)
    with pytest.raises(store.StoreError, match=r"embed.precision='fp32', now 'bf16'"):
        run_embed(embed_config(env["base"] / "reference", env, "embed.precision=bf16"))
    assert store.open_store(env["store_url"]).manifest["totals"]["rows"] == 96  # untouched


@pytest.mark.slow
def test_inspect_and_read_api(env, capsys):
    assert cli.main(["inspect", env["store_url"], "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert "96 in 13 parts" in out and "rejected_decode_error=2" in out
    assert "clip_text_tokens     float16  32x64" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert float(lines["clip_text_tokens"].split()[-1].replace(",", "")) > 1000  # 32x64 halves, compressed
    assert sum(1 for line in out.splitlines() if "clip_score=" in line) == 2

    s = store.open_store(env["store_url"])
    t = store.tensors(s, ["clip_image_emb", "text_mask", "vae_latent"], s.files[:2])
    assert t["clip_image_emb"].dtype == torch.float16 and t["clip_image_emb"].shape == (16, 64)
    assert t["text_mask"].dtype == torch.bool and t["vae_latent"].shape == (16, 4, 16, 16)


@pytest.mark.slow
def test_parquet_input_and_s3_with_faults_and_an_outage(env, s3_prefix, faults, capsys):
    """Parquet shards on S3 into a store on S3, once fault-free and once through a proxy failing a
    tenth of requests, where an outage after the first part stops the run in one named line and a
    rerun (faults still on) completes: the two stores' parts are the same bytes."""
    from tests.conftest import FAULT_SETTINGS
    from tests.support.faultproxy import run_into_outage, upstream_keys

    good = [r for r in env["records"] if r["broken"] is None][:14]
    wds = storage.join(s3_prefix, "wds")
    synthetic.write_shards(good, str(env["site"]), wds, 7, fmt="parquet")
    settings = [f"embed.input={wds}", "embed.extra_vae_resolutions=[32]", *FAULT_SETTINGS]
    cfg = embed_config(storage.join(s3_prefix, "root"), env, *settings)
    m = run_embed(cfg)
    assert m["totals"]["rows"] == 14 and m["totals"]["parts"] == 2
    assert m["columns"]["vae_latent_32"]["shape"] == [4, 8, 8]
    assert set(storage.listdir(cfg.store_url)) >= {"manifest.json", "part-00000.parquet", "part-00001.json"}
    data = store.open_store(cfg.store_url).read(["caption", "clip_image_emb", "vae_latent_32"])
    assert data["vae_latent_32"].shape == (14, 4, 8, 8) and sorted(data["caption"]) == sorted(
        r["caption"] for r in good
    )

    faulty = storage.join(s3_prefix, "faulty")
    command = [
        "embed",
        f"root={faulty}",
        "embed.batch_size=4",
        f"encoders.clip.model=local-dir:{env['encoders']}/clip",
        f"encoders.vae.path={env['encoders']}/vae",
        *settings,
    ]

    def parts():
        return [
            k
            for k in upstream_keys(faults, storage.join(faulty, "store"))
            if k.rsplit("/", 1)[-1].startswith("part-") and k.endswith(".json")
        ]

    faults.schedule(0.1, seed=21)
    code, seconds = run_into_outage(faults, lambda: cli.main(command), ready=lambda: len(parts()) >= 1, kind="reset")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and seconds < 120 and line.startswith("unclip embed: error: storage unavailable: "), (
        code,
        seconds,
        line,
    )
    assert s3_prefix.removeprefix("s3://") in line
    committed = {
        k: v for k, v in upstream_keys(faults, storage.join(faulty, "store")).items() if storage.TMP_PREFIX not in k
    }
    failed_tries = sum(faults.counts[kind] for kind in ("slowdown", "reset", "stall"))
    faults.schedule(0.1, seed=22)
    assert cli.main(command) == 0, capsys.readouterr().err[-2000:]
    assert failed_tries + sum(faults.counts[kind] for kind in ("slowdown", "reset", "stall")) >= 3, faults.counts
    faults.schedule(0.0)
    after = upstream_keys(faults, storage.join(faulty, "store"))
    assert all(after[k] == etag for k, etag in committed.items() if "/part-" in k)  # committed parts kept, not redone
    names = [n for n in storage.listdir(cfg.store_url) if n.startswith("part-") and n.endswith(".parquet")]
    assert len(names) == 2
    same = {
        n: storage.sha256_file(storage.join(cfg.store_url, n)) == storage.sha256_file(storage.join(faulty, "store", n))
        for n in names
    }
    assert all(same.values()), same
    assert (
        store.open_store(storage.join(faulty, "store")).read(["caption"])["caption"].tolist()
        == data["caption"].tolist()
    )


@pytest.mark.slow
def test_parts_hold_exactly_what_the_encoders_give_each_chunk(env):
    """The workers' store against the encoders run here, chunk by chunk as embed cuts them: the same
    keys in the same order and the same values, bit for bit."""
    from data_pipeline.embed_worker import Encoder, iter_chunks
    from models.encoders import clip_preprocess

    cfg = embed_config(env["base"] / "reference", env)
    identity, specs = embed.encoder_identity(cfg.encoders, cfg.embed)
    source = sources.open_source(cfg.embed.input, cfg.raw_url, "auto", None, None)
    encoder = Encoder(cfg.encoders, specs, "cpu", "fp32", 1, None)
    s = store.open_store(env["store_url"])
    for shard in source.ids:
        chunks = [
            encoder.encode(c)
            for c in iter_chunks(
                source,
                shard,
                4,
                clip_preprocess(cfg.encoders.clip).image_size,
                cfg.embed.latent_columns(),
                ["image_64", "image_256"],
            )
        ]
        keep = [np.array([not r for r in c["rejected"]], bool) for c in chunks]
        expected_keys = [
            k for c, k_ in zip(chunks, keep, strict=True) for k, kept in zip(c["key"], k_, strict=True) if kept
        ]
        if not expected_keys:
            continue
        got = s.read(
            ["key", "clip_image_emb", "clip_text_tokens", "vae_latent", "image_64"],
            [storage.join(s.url, f"part-{shard:05d}.parquet")],
        )
        assert got["key"].tolist() == expected_keys  # the shard's order
        for name in ("clip_image_emb", "clip_text_tokens", "vae_latent"):
            want = np.concatenate([c[name][k_] for c, k_ in zip(chunks, keep, strict=True) if len(c["key"])])
            assert np.array_equal(got[name], want), (shard, name)
        assert got["image_64"].tolist() == [
            b for c, k_ in zip(chunks, keep, strict=True) for b, kept in zip(c["image_64"], k_, strict=True) if kept
        ]
    # the empty caption, embedded as every caption is (the unconditional input of ldm.null_text=empty_caption)
    text = encoder.clip.encode_text([""])
    empty = s.null_caption()
    assert s.manifest["null_caption"]["sha256"] == storage.sha256_file(storage.join(s.url, store.NULL_CAPTION))
    assert np.array_equal(empty["clip_text_tokens"], text["tokens"][0].numpy().astype(np.float16))
    assert np.array_equal(empty["clip_text_emb"], text["emb"][0].numpy().astype(np.float16))
    assert empty["text_mask"].tolist() == [True, True] + [False] * (len(empty["text_mask"]) - 2)


@pytest.mark.slow
def test_two_jobs_over_halves_of_the_shards_make_the_store_one_job_makes(env):
    root = env["base"] / "halves"
    first = run_embed(embed_config(root, env, "embed.shards=0-5"))
    assert first["totals"]["parts"] == 6
    second = run_embed(embed_config(root, env, "embed.shards=6-12"))
    assert second["totals"]["parts"] == 13 and second["totals"]["rows"] == 96
    assert_same_store(str(root / "store"), env)
    with pytest.raises(
        sources.SourceError, match=r"'embed.shards': no webdataset shard has an id in 40-50 \(ids 0-12\)"
    ):
        run_embed(embed_config(root, env, "embed.shards=40-50"))


@pytest.mark.slow
def test_duckdb_polars_and_datasets_read_a_store_with_an_empty_shard(env, tmp_path, monkeypatch):
    import datasets
    import duckdb
    import polars

    url = env["store_url"]
    assert store.open_store(url).manifest["totals"]["empty_parts"] == 1
    want = sorted(read_all(url)["key"].tolist())
    pattern = os.path.join(url, "part-*.parquet")
    assert sorted(k for (k,) in duckdb.sql(f"SELECT key FROM read_parquet('{pattern}')").fetchall()) == want
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{pattern}') WHERE len(clip_image_emb) = 64").fetchall() == [
        (96,)
    ]
    assert sorted(polars.read_parquet(pattern)["key"].to_list()) == want
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    parts = sorted(str(p) for p in (env["base"] / "reference" / "store").glob("part-*.parquet"))
    loaded = datasets.load_dataset("parquet", data_files=parts, split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(loaded["key"]) == want and len(loaded[0]["clip_image_emb"]) == 64


@pytest.mark.slow
def test_a_store_of_the_previous_layout_is_refused_then_converted(env, tmp_path):
    """Manifest schema 1 (a JSON entry per part, sums as JSON lists, an empty shard's part a file
    with one 0-row row group), as the previous version wrote it."""
    import json as jsonlib
    import shutil

    old = tmp_path / "old"
    shutil.copytree(
        env["base"] / "reference" / "store",
        old,
        ignore=shutil.ignore_patterns("parts-*", "manifest.json", "_encoders.json"),
    )
    new_manifest = store.read_manifest(env["store_url"])
    entries = []
    for sidecar in sorted(old.glob("part-*.json")):
        new = jsonlib.loads(sidecar.read_text())
        if new["file"] is None:  # the previous writer's empty part
            specs = {k: v for k, v in new_manifest["columns"].items() if k not in store.BASE_COLUMNS}
            pq.write_table(store.arrow_schema(specs).empty_table(), old / f"part-{new['part']:05d}.parquet")
            new["file"], new["sha256"], new["bytes"] = f"part-{new['part']:05d}.parquet", "0" * 64, 1
        sums = {
            k: {
                "count": v["count"],
                "sum": store_writer.decode_floats(v["sum"]).tolist(),
                "sumsq": store_writer.decode_floats(v["sumsq"]).tolist(),
            }
            for k, v in new["stats"].items()
        }
        entry = {
            "file": new["file"],
            "rows": new["rows"],
            "bytes": new["bytes"],
            "sha256": new["sha256"],
            "sums": sums,
            "counts": new["counts"],
        }
        sidecar.write_text(jsonlib.dumps(entry))
        entries.append({k: entry[k] for k in ("file", "rows", "bytes", "sha256")})
    (old / "manifest.json").write_text(
        jsonlib.dumps(
            {
                "schema_version": 1,
                "created": new_manifest["created"],
                "encoders": new_manifest["encoders"],
                "columns": new_manifest["columns"],
                "shards": entries,
                "totals": {"rows": 96, "bytes": 1, "kept": 96},
                "holdout": new_manifest["holdout"],
                "config": new_manifest["config"],
                "clip_image_emb_mean": new_manifest["clip_image_emb_mean"],
                "clip_image_emb_std": new_manifest["clip_image_emb_std"],
            }
        )
    )

    with pytest.raises(store.StoreError, match=rf"manifest schema 1.*convert it in place with `unclip manifest {old}`"):
        store.open_store(str(old))
    assert cli.main(["manifest", str(old)]) == 0
    converted = store.open_store(str(old))
    assert not (old / "part-00012.parquet").exists() and converted.manifest["totals"]["empty_parts"] == 1
    for name in ("clip_image_emb_mean", "clip_image_emb_std", "vae_latent_mean", "vae_latent_std"):
        assert np.allclose(converted.manifest[name], new_manifest[name]), name
    fresh = store.open_store(env["store_url"])
    assert np.array_equal(converted.index.group_train_rows, fresh.index.group_train_rows)  # the same held-out rows
    assert np.array_equal(read_all(str(old))["clip_image_emb"], read_all(env["store_url"])["clip_image_emb"])
