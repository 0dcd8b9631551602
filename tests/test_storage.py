"""Storage: one API over local disk, memory:// and S3 (moto's server on 127.0.0.1), with
atomic commits: an interrupted write leaves nothing a reader would take for complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from data_pipeline import storage


@pytest.fixture(params=["local", "memory", "s3"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "memory":
        return f"memory://unclip-{uuid.uuid4().hex[:8]}"
    return request.getfixturevalue("s3_prefix")


def test_write_read_list(base):
    storage.write_json(storage.join(base, "a", "x.json"), {"k": 1})
    storage.write_text(storage.join(base, "a", "y.txt"), "hi")
    assert storage.read_json(storage.join(base, "a", "x.json")) == {"k": 1}
    assert storage.listdir(storage.join(base, "a")) == ["x.json", "y.txt"]
    assert storage.listdir(storage.join(base, "missing")) == []
    storage.move(storage.join(base, "a", "y.txt"), storage.join(base, "a", "z.txt"))
    assert storage.listdir(storage.join(base, "a")) == ["x.json", "z.txt"]
    assert storage.sha256_file(storage.join(base, "a", "z.txt")) == (
        "8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4"
    )


def test_failed_file_write_leaves_nothing(base):
    target = storage.join(base, "f.bin")
    storage.write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with storage.atomic_open(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("writer died")
    assert storage.read_bytes(target) == b"old"  # the previous complete version stays
    fs, path = storage.url_to_fs(base)
    leftovers = [p for p in fs.ls(path, detail=False) if os.path.basename(p.rstrip("/")).startswith(storage.TMP_PREFIX)]
    assert leftovers == []


def test_failed_folder_write_is_not_committed(base):
    folder = storage.join(base, "ckpt")
    with pytest.raises(RuntimeError):
        with storage.atomic_dir(folder) as staging:
            with open(os.path.join(staging, "weights"), "wb") as f:
                f.write(b"x" * 1000)
            raise RuntimeError("killed mid-save")
    assert not storage.exists(folder)
    assert not storage.is_committed(folder)

    with storage.atomic_dir(folder) as staging:
        os.makedirs(os.path.join(staging, "sub"))
        for name in ("weights", "sub/optimizer"):
            with open(os.path.join(staging, name), "wb") as f:
                f.write(name.encode())
    assert storage.is_committed(folder)
    assert storage.read_bytes(storage.join(folder, "sub", "optimizer")) == b"sub/optimizer"

    # replacing a committed folder: the new one is complete, nothing of the old remains
    with storage.atomic_dir(folder) as staging:
        with open(os.path.join(staging, "weights"), "wb") as f:
            f.write(b"v2")
    assert storage.listdir(folder) == [storage.COMMIT_MARKER, "weights"]
    assert storage.read_bytes(storage.join(folder, "weights")) == b"v2"


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from data_pipeline import storage
    with storage.atomic_open(sys.argv[1]) as f:
        f.write(b"first half ")
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
        f.write(b"second half")
    """
)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_sigkill_mid_write_leaves_nothing_visible(where, tmp_path, request):
    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_prefix")
    target = storage.join(base, "shard.parquet")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, target], stdout=subprocess.PIPE, env=os.environ.copy())
    assert proc.stdout.readline().strip() == b"writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not storage.exists(target)
    assert storage.listdir(base) == []  # temporaries are hidden from readers
    storage.remove_stale_temporaries(base)
    fs, path = storage.url_to_fs(base)
    assert not fs.exists(path) or fs.ls(path, detail=False) == []


def test_local_paths_and_file_urls_agree(tmp_path):
    storage.write_text(str(tmp_path / "a.txt"), "x")
    assert storage.read_text(f"file://{tmp_path}/a.txt") == "x"
    assert storage.normalize(f"{tmp_path}/./sub/..") == str(tmp_path)
    assert storage.is_local(f"file://{tmp_path}") and not storage.is_local("memory://x")
    with pytest.raises(ValueError, match="not on the local filesystem"):
        storage.local_path("memory://x")
