"""Where bytes live: any fsspec URL, with atomic "write then commit" for files and folders.

Every job in unclip reads and writes through this module, so the same code runs on a local
disk, `file://`, `s3://` (any S3-compatible endpoint; set AWS_ENDPOINT_URL for a non-AWS one),
`gs://` and `memory://`.

The commit rules readers may rely on:
- a file is either absent or complete: it is written under a hidden temporary name in the same
  folder and moved into place only after the last byte was written (on S3, where an object
  appears only once its upload completed, it is written in place);
- a folder is complete only when it holds `_COMMITTED`, which is written after everything else
  (on local disk the whole folder is also renamed into place, so nothing partial is visible).
Temporary names start with `.tmp-`; `remove_stale_temporaries` clears those a killed job left.

`s3://` goes through `storage_s3.S3FileSystem`: botocore retries every request (`storage.*` keys,
`configure_object_store`), and a fault that outlasts the retries is `errors.StorageUnavailable`, naming
the URL and the operation. Other object stores use their client's own retries (gcsfs retries
5xx and connection errors by itself).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import math
import numbers
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import IO, Any, cast

import fsspec
import fsspec.config
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile

COMMIT_MARKER = "_COMMITTED"
TMP_PREFIX = ".tmp-"

# How the settings reach processes started from this one (ranks, a local Ray's workers, and Ray
# jobs, which forward them): fsspec reads FSSPEC_<PROTOCOL>_<KWARG> at import, JSON-decoded.
S3_SETTINGS_ENV = ("FSSPEC_S3_ATTEMPTS", "FSSPEC_S3_CONNECT_TIMEOUT", "FSSPEC_S3_READ_TIMEOUT")


def configure_object_store(attempts: int, connect_timeout_s: float, read_timeout_s: float) -> None:
    """Retries and timeouts of every S3 client made from now on, here and in processes started
    from here. Each request is tried `attempts` times, with botocore's backoff (up to 20 s apart);
    a stalled connection counts as failed after `read_timeout_s`. `storage_s3.S3FileSystem` turns
    them into botocore's configuration."""
    settings = {"attempts": attempts, "connect_timeout": connect_timeout_s, "read_timeout": read_timeout_s}
    fsspec.config.conf.setdefault("s3", {}).update(settings)
    for name, value in zip(S3_SETTINGS_ENV, settings.values(), strict=True):
        os.environ[name] = strict_json(value)


def _register_s3() -> None:
    for protocol in ("s3", "s3a"):
        if protocol in fsspec.registry:  # already imported by someone: replace the class itself
            from models.base.storage_s3 import S3FileSystem  # lazy: s3fs and botocore, for s3:// only

            fsspec.register_implementation(protocol, S3FileSystem, clobber=True)
        else:
            fsspec.register_implementation(protocol, "models.base.storage_s3.S3FileSystem", clobber=True)


_register_s3()


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `url` and the path inside it (local paths come back absolute)."""
    fs, path = fsspec.core.url_to_fs(str(url))
    if isinstance(fs, LocalFileSystem):
        path = os.path.abspath(path)
    return fs, path


def is_local(url: str) -> bool:
    return isinstance(url_to_fs(url)[0], LocalFileSystem)


def local_path(url: str) -> str:
    """The OS path of a local URL; refuses remote ones."""
    fs, path = url_to_fs(url)
    if not isinstance(fs, LocalFileSystem):
        raise ValueError(f"'{url}' is not on the local filesystem")
    return path


def join(url: str, *parts: str) -> str:
    url = str(url)
    if "://" in url:
        return posixpath.join(url.rstrip("/"), *parts)
    return os.path.join(url, *parts)


def normalize(url: str) -> str:
    """A canonical form of `url`: absolute for local paths, unchanged for remote ones."""
    return local_path(url) if is_local(url) else str(url).rstrip("/")


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    # Object-store clients cache listings; other processes (Ray tasks, ranks) write behind them.
    fs.invalidate_cache(posixpath.dirname(path))
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = url_to_fs(url)
    fs.makedirs(path, exist_ok=True)


def listdir(url: str) -> list[str]:
    """Base names in folder `url` (empty when missing), without temporaries."""
    fs, path = url_to_fs(url)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    return sorted(n for n in names if not n.startswith(TMP_PREFIX))


def _open_binary(fs: fsspec.AbstractFileSystem, path: str) -> IO[bytes]:
    # fsspec's `open` is unannotated: pyright infers its text-mode branch too, which "rb" never takes
    return cast(IO[bytes], fs.open(path, "rb"))


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    with _open_binary(fs, path) as f:
        return f.read()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str) -> Any:
    return json.loads(read_text(url))


def remove(url: str) -> None:
    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _tmp_sibling(path: str) -> str:
    head, tail = posixpath.split(path)
    return posixpath.join(head, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{tail}")


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[IO]:
    """Open `url` for writing; it appears, complete, only if the block finishes without error."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes only ('wb' or 'w'), got mode {mode!r}")
    fs, path = url_to_fs(url)
    if _puts_whole_objects(fs):
        # S3 shows an object only once its PUT (or its multipart upload) completed: written in
        # place, with no temporary to copy and delete (a third of the requests). An error in the
        # block throws the buffer away, so nothing is sent.
        f = fs.open(path, mode)
        # s3fs's S3File is an fsspec buffered file holding the upload; text mode ("w") wraps it
        upload = cast(AbstractBufferedFile, f.buffer if isinstance(f, io.TextIOWrapper) else f)
        try:
            yield cast(IO, f)  # fsspec's files are file objects, though not typing.IO subclasses
        except BaseException:
            upload.discard()
            upload.closed = True
            raise
        f.close()
        return
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with fs.open(tmp, mode) as f:
            yield cast(IO, f)  # fsspec's files are file objects, though not typing.IO subclasses
            if isinstance(fs, LocalFileSystem):
                f.flush()
                os.fsync(f.fileno())
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def _puts_whole_objects(fs: fsspec.AbstractFileSystem) -> bool:
    return "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_bytes(url: str, data: bytes) -> None:
    with atomic_open(url, "wb") as f:
        f.write(data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """`obj` as strict JSON can hold it: every non-finite float (NaN, +-inf, numpy's and torch's
    too) becomes None; numpy scalars and arrays, and tensors, become Python numbers and lists.
    Python's json writes NaN and Infinity, which strict readers (JSON.parse, jq, Go, serde) refuse;
    a writer whose reader must know why a figure is missing puts the reason beside the null."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bool, str)) or obj is None:
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        return value if math.isfinite(value) else None
    tolist = getattr(obj, "tolist", None)  # duck-typed: this module does not import numpy or torch
    if callable(tolist):
        return json_safe(tolist())
    return obj


def strict_json(obj: Any, **dumps_kwargs: Any) -> str:
    """The one way unclip turns data into JSON text (files, JSON lines, JSON in columns and
    environment variables): `json.dumps` of `json_safe(obj)` with `allow_nan=False`, so no writer
    can emit NaN or Infinity. `dumps_kwargs` are json.dumps' own; what a `default` returns is made
    safe too."""
    default = dumps_kwargs.get("default")
    if default is not None:
        dumps_kwargs["default"] = lambda o: json_safe(default(o))
    return json.dumps(json_safe(obj), allow_nan=False, **dumps_kwargs)


def write_json(url: str, obj: Any) -> None:
    write_text(url, strict_json(obj, indent=2, sort_keys=False, default=str) + "\n")


def move(src_url: str, dst_url: str) -> None:
    """Move one file; on object stores a server-side copy then delete, so `dst` appears whole."""
    fs, src = url_to_fs(src_url)
    _, dst = url_to_fs(dst_url)
    fs.mv(src, dst)


def is_committed(url: str) -> bool:
    return exists(join(url, COMMIT_MARKER))


@contextlib.contextmanager
def atomic_dir(url: str) -> Iterator[str]:
    """Yield a local staging folder; on success its files become folder `url`, marker last.

    Staging is always local because the writers we feed (DeepSpeed, torch.save, PIL) want OS
    paths. On local disk the staging folder sits beside the destination and is renamed into
    place in one step; elsewhere files are uploaded and `_COMMITTED` is uploaded after them.
    An existing folder at `url` is replaced.
    """
    fs, path = url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.path.basename(path)}-", dir=parent)
    else:
        staging = tempfile.mkdtemp(prefix=TMP_PREFIX)
    try:
        yield staging
        commit_folder(staging, url)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)


def mark_committed(url: str) -> None:
    """The last write of a folder committed on object storage, once every file is there (the ranks
    of a checkpoint upload their own shares, then one of them calls this)."""
    write_text(join(url, COMMIT_MARKER), "ok\n")


def commit_folder(staging: str, url: str) -> None:
    """The folder-commit protocol, the one place it is written: the finished local folder `staging`
    becomes folder `url`, with `_COMMITTED` last, replacing any folder there. On local disk that is
    one rename of the staging folder (which must sit beside `url`); elsewhere the files are uploaded,
    then the marker."""
    fs, path = url_to_fs(url)
    with open(os.path.join(staging, COMMIT_MARKER), "w") as f:
        f.write("ok\n")
    if isinstance(fs, LocalFileSystem):
        if os.path.exists(path):
            doomed = _tmp_sibling(path)
            os.replace(path, doomed)
            shutil.rmtree(doomed)
        os.replace(staging, path)
        return
    if fs.exists(path):
        fs.rm(path, recursive=True)
    files = sorted(os.path.relpath(os.path.join(d, n), staging) for d, _, ns in os.walk(staging) for n in ns)
    files.remove(COMMIT_MARKER)
    for rel in files + [COMMIT_MARKER]:
        fs.put_file(os.path.join(staging, rel), posixpath.join(path, rel.replace(os.sep, "/")))


def download_dir(url: str, local_dir: str) -> str:
    """Copy folder `url` to `local_dir` (a no-op path return when `url` is already local)."""
    fs, path = url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return path
    os.makedirs(local_dir, exist_ok=True)
    for remote in fs.find(path):
        rel = posixpath.relpath(remote, path)
        target = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(remote, target)
    return local_dir


def remove_stale_temporaries(url: str, older_than_s: float = 0) -> int:
    """Delete what killed writers left under folder `url` (one level); returns the count.
    `older_than_s`: only temporaries at least this old, where another job may be writing."""
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        return 0
    stale = [e for e in fs.ls(path, detail=True) if posixpath.basename(e["name"].rstrip("/")).startswith(TMP_PREFIX)]
    if older_than_s:
        stale = [e for e in stale if time.time() - _modified(e) >= older_than_s]
    for entry in stale:
        fs.rm(entry["name"], recursive=True)
    return len(stale)


def _modified(entry: dict[str, Any]) -> float:
    """An fsspec listing entry's modification time, in seconds since the epoch (now if unknown)."""
    value = entry.get("mtime") or entry.get("LastModified") or entry.get("updated") or entry.get("created")
    if value is None:
        return time.time()
    if isinstance(value, str):  # gcsfs: ISO 8601
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def sha256_file(url: str, chunk: int = 1 << 22) -> str:
    fs, path = url_to_fs(url)
    digest = hashlib.sha256()
    with _open_binary(fs, path) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
