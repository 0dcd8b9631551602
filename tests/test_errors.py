"""Every failure a user can cause is one line and an exit code: 2 for bad input or configuration,
1 for a job that failed; the traceback only with --debug. Each command runs as a user runs it, in
a process of its own, on a broken input of each kind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.support.storefactory import make_store

SMALL = ["prior.layers=2", "prior.heads=2", "train.batch_size=8", "train.steps=2", "train.progress_bar=never"]


def unclip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, timeout=300)


def assert_one_line(result: subprocess.CompletedProcess, command: str, code: int, *names: str) -> str:
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and "Warning" not in line and not line.startswith("  ")
    ]
    errors = [line for line in lines if "error:" in line]
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert len(errors) == 1 and errors[0].startswith(f"unclip {command}: error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    make_store(str(root / "store"), (20, 17, 13), holdout=0.2)
    return root


def test_a_missing_url_list(tmp_path):
    result = unclip("ingest", f"root={tmp_path}", f"ingest.url_list={tmp_path}/nowhere.parquet")
    assert_one_line(result, "ingest", 2, "nowhere.parquet", "not found")


def test_a_truncated_manifest_is_refused_by_every_reader(store_root, tmp_path):
    broken = tmp_path / "root"
    shutil.copytree(store_root / "store", broken / "store")
    manifest = broken / "store" / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    for command in (["inspect"], ["train", "prior", *SMALL], ["eval"], ["manifest"]):
        result = unclip(*command, f"root={broken}")
        if command == ["manifest"]:  # the command that rebuilds it from the parts
            assert result.returncode == 0, result.stderr[-2000:]
            manifest.write_text(manifest.read_text()[:100])
            continue
        assert_one_line(result, command[0], 2, "manifest.json", "not valid JSON", "unclip manifest")
    debug = unclip("inspect", f"root={broken}", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # --debug: the whole story


def test_a_missing_run(store_root, tmp_path):
    for command in (["sample"], ["eval"], ["export", "--out", str(tmp_path / "out")]):
        result = unclip(*command, f"root={store_root}")
        assert_one_line(result, command[0], 2, "runs")


@pytest.mark.slow
def test_a_store_part_with_flipped_bytes_is_found_before_training_reads_it(store_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(store_root / "store", root / "store")
    part = root / "store" / "part-00001.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    result = unclip("train", "prior", f"root={root}", "train.nproc=2", *SMALL)
    assert_one_line(result, "train", 2, "part-00001.parquet", "sha256")
    assert not os.path.exists(root / "runs" / "prior" / "main" / "latest")  # nothing trained on it


@pytest.fixture(scope="module")
def random_encoders(tmp_path_factory) -> list[str]:
    """Small random encoders, written once for the tests that only need some to exist."""
    folder = tmp_path_factory.mktemp("encoders")
    encoders = ["encoders.clip.model=local-dir:" + str(folder / "clip"), f"encoders.vae.path={folder / 'vae'}"]
    assert unclip("encoders", "init", f"root={folder}", *encoders).returncode == 0
    return encoders


@pytest.mark.slow
@pytest.mark.parametrize("content", [b"", b"this is not a tar file" * 100], ids=["empty", "unreadable"])
def test_an_empty_or_unreadable_shard(tmp_path, content, random_encoders):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(content)
    result = unclip("embed", f"root={tmp_path}", f"embed.input={shards}", "ray.num_cpus=2", *random_encoders)
    assert_one_line(result, "embed", 2, "00000.tar", "cannot read it")


@pytest.fixture
def small_disk(tmp_path):
    """A 3.5 MB tmpfs: one tiny prior checkpoint (~2.3 MB) fits, a second does not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3500k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_keeps_latest_on_the_previous_one(store_root, tmp_path, small_disk):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(store_root / "store", root / "store")
    os.symlink(small_disk, root / "runs")  # the run folder is on the small disk
    result = unclip(
        "train", "prior", f"root={root}", "train.nproc=1", *SMALL[:-1], "train.steps=4", "train.checkpoint_every=2"
    )
    line = assert_one_line(
        result, "train", 1, "step_0000004", "no space left", "bytes free", "`latest` stays at step_0000002"
    )
    assert (
        "optim_states.pt" in line or "model_states.pt" in line or ".tmp-step_0000004" in line
    )  # the file it was writing
    run = small_disk / "prior" / "main"
    assert (run / "latest").read_text().strip() == "step_0000002"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step_") or p.name.startswith(".tmp")) == [
        "step_0000002"
    ]
    resumed = unclip("train", "prior", f"root={root}", "train.nproc=1", *SMALL[:-1], "train.steps=2")
    assert (
        resumed.returncode == 0 and "resumed from" in resumed.stdout and "already at step 2" in resumed.stdout
    )  # whole, in use
