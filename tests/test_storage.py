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

from models.base import storage
from models.base.errors import StorageUnavailable


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
    from models.base import storage
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
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, target], stdout=subprocess.PIPE, env=os.environ.copy()
    )
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


def _s3_settings(attempts: int = 5) -> None:
    """A second's read timeout: the proxy's stalls last longer."""
    storage.configure_object_store(attempts=attempts, connect_timeout_s=1.0, read_timeout_s=1.0)


def test_s3_rides_out_faults_with_logged_retries(faults, s3_prefix, tmp_path, caplog):
    """A tenth of requests answered 503 SlowDown, reset midway or stalled past the read timeout
    (one kind at a time): every write and read still comes out whole, retried by botocore and s3fs,
    each failed try logged."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _s3_settings()
    caplog.set_level("WARNING", logger="unclip.storage")
    for kind in ("slowdown", "reset", "stall"):
        base = storage.join(s3_prefix, kind)
        blobs = {f"blob-{i}": os.urandom(3000 + i) for i in range(3)}
        faults.schedule(0.1, seed=23, kinds=(kind,))
        for name, data in blobs.items():
            storage.write_bytes(storage.join(base, "files", name), data)
        with storage.atomic_dir(storage.join(base, "folder")) as staging:
            pq.write_table(pa.table({"x": list(range(1000))}), os.path.join(staging, "t.parquet"))
        assert storage.listdir(storage.join(base, "files")) == sorted(blobs)
        assert {name: storage.read_bytes(storage.join(base, "files", name)) for name in blobs} == blobs
        assert storage.is_committed(storage.join(base, "folder"))
        fs, path = storage.url_to_fs(storage.join(base, "folder", "t.parquet"))
        with fs.open(path, "rb") as f:
            assert pq.read_table(f)["x"].to_pylist() == list(range(1000))
        local = storage.download_dir(storage.join(base, "files"), str(tmp_path / kind))
        assert {name: open(os.path.join(local, name), "rb").read() for name in blobs} == blobs
        assert faults.counts[kind] >= 2, faults.counts
    retried = [r.getMessage() for r in caplog.records if r.name == "unclip.storage"]
    assert retried and all("attempt" in line and "failed" in line for line in retried)


def test_an_s3_outage_is_one_error_naming_the_url(faults, s3_prefix):
    """Every request failing: a read (503 SlowDown), a write (connections reset) and an existence
    check (stalls) each stop in a bounded time with StorageUnavailable naming the URL and the
    operation; an outage is never taken for a missing file."""
    _s3_settings(attempts=2)
    url = storage.join(s3_prefix, "kept.json")
    storage.write_json(url, {"kept": True})
    actions = {
        "slowdown": lambda: storage.read_json(url),
        "reset": lambda: storage.write_json(storage.join(s3_prefix, "new.json"), {}),
        "stall": lambda: storage.exists(url),
    }
    for kind, action in actions.items():
        faults.outage(kind)
        started = time.time()
        with pytest.raises(StorageUnavailable) as failure:
            action()
        assert time.time() - started < 20
        message = str(failure.value)
        assert "\n" not in message and s3_prefix.removeprefix("s3://") in message and "after 2 attempts" in message, (
            message
        )
    faults.outage(None)
    assert storage.read_json(url) == {"kept": True} and not storage.exists(storage.join(s3_prefix, "new.json"))
    with pytest.raises(FileNotFoundError):  # a missing key is still an answer, not an outage
        storage.read_bytes(storage.join(s3_prefix, "absent"))
