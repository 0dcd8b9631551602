"""S3 as a job that runs for days needs it: s3fs, with retries and timeouts from botocore's own
configuration, every retry logged, and a failure that outlasts them named by URL and operation.

Retrying is the storage client's job, so nothing here retries: botocore's "standard" retry mode
(503 SlowDown and other 5xx, throttling, connection resets, read and connect timeouts) runs every
request up to `attempts` times, and s3fs's own loop re-reads a response body that broke off
midway (botocore hands the body over once the headers arrive, so it cannot). What this subclass
adds is what neither client knows: which of our URLs was being read or written when they gave up.
`storage` registers it for `s3://`; its `configure_object_store` sets the knobs for this
process and every process started from it. A base module: it imports only `errors`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, NoReturn, cast

import s3fs
from botocore.exceptions import BotoCoreError, ClientError
from fsspec.asyn import sync_wrapper

from models.base.errors import StorageUnavailable

# botocore's own default of attempts for standard mode is 3; a job that runs for days rides out a
# longer S3 brown-out before giving up. A read timeout of 60 s is the AWS SDKs' own default.
DEFAULT_ATTEMPTS = 5
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0

log = logging.getLogger("unclip.storage")

# Error codes S3 (and S3-compatible stores) answer when they want the request again later.
RETRYABLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "ServiceUnavailable",
    "InternalError",
    "RequestLimitExceeded",
    "TooManyRequests",
}


def transient_reason(err: BaseException) -> str | None:
    """What made `err` a passing fault of the store or the network (None: a real answer, such as
    404 or 403, which no retry changes). Looks through the causes: s3fs re-raises botocore's
    errors as OSError subclasses with the original as `__cause__`."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ClientError):
            status = current.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = current.response.get("Error", {}).get("Code", "")
            return f"HTTP {status} {code}".strip() if status >= 500 or code in RETRYABLE_CODES else None
        if isinstance(current, (BotoCoreError, asyncio.TimeoutError, socket.timeout, ConnectionError)) or (
            type(current).__module__.startswith("aiohttp")
        ):
            return f"{type(current).__name__}: {current}"
        current = current.__cause__ or current.__context__
    return None


class S3FileSystem(s3fs.S3FileSystem):
    """s3fs with botocore's standard retries by default, and one named error when they run out."""

    def __init__(
        self,
        *args: Any,
        attempts: int = DEFAULT_ATTEMPTS,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout: float = DEFAULT_READ_TIMEOUT_S,
        config_kwargs: dict | None = None,
        **kwargs: Any,
    ):
        retrying = {
            "retries": {"max_attempts": attempts, "mode": "standard"},
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
        }
        super().__init__(*args, config_kwargs={**retrying, **(config_kwargs or {})}, **kwargs)
        self.retries = attempts  # s3fs's loop around a request and a body read: its class default is 5
        self.attempts = attempts

    async def set_session(self, refresh: bool = False, kwargs: dict | None = None):
        fresh = self._s3 is None or refresh
        client = await super().set_session(refresh, kwargs or {})
        if fresh:
            client.meta.events.register("needs-retry.s3", _log_failed_attempt)
        return client

    async def _call_s3(self, method: str, *akwarglist: Any, **kwargs: Any) -> Any:
        # s3fs's own `_call_s3` wraps botocore in a loop of `self.retries` more tries: with
        # botocore's attempts inside, an outage would last attempts² tries. Here botocore alone
        # retries a request; the loop is kept only for a body that broke off midway (below).
        await self.set_session()
        client = await self.get_s3(kwargs.get("Bucket"))
        call = getattr(client, method)
        try:
            return await s3fs.core._error_wrapper(
                call, kwargs=self._get_s3_method_kwargs(call, *akwarglist, **kwargs), retries=1
            )
        except Exception as err:
            _raise_named(err, method, _url_of(kwargs), self.attempts)

    call_s3 = sync_wrapper(_call_s3)  # s3fs's files call this one: bound to s3fs's method otherwise

    async def _cat_file(self, path: str, *args: Any, **kwargs: Any) -> bytes:
        try:
            return await super()._cat_file(path, *args, **kwargs)
        except Exception as err:
            _raise_named(err, "get_object", f"s3://{self._strip_protocol(path)}", self.attempts)

    async def _get_file(self, rpath: str, lpath: str, *args: Any, **kwargs: Any) -> None:
        try:
            return await super()._get_file(rpath, lpath, *args, **kwargs)
        except Exception as err:
            _raise_named(err, "get_object", f"s3://{self._strip_protocol(rpath)}", self.attempts)

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> s3fs.core.S3File:
        f = super()._open(path, mode, *args, **kwargs)
        # s3fs builds its S3File by name; ours only adds naming to reads (the read cache holds
        # the bound fetcher, so it is pointed at ours too)
        f.__class__ = _S3File
        cache = getattr(f, "cache", None)
        if cache is not None:
            cache.fetcher = f._fetch_range
        return f


class _S3File(s3fs.core.S3File):
    def _fetch_range(self, start: int, end: int) -> bytes:
        try:
            # s3fs is unannotated: pyright infers None from fsspec's `sync`, which returns the bytes
            return cast(bytes, super()._fetch_range(start, end))
        except Exception as err:
            _raise_named(err, "get_object", f"s3://{self.bucket}/{self.key}", self.fs.attempts)


def _url_of(request: dict[str, Any]) -> str:
    """The object (or prefix) a request is about; a batch delete names its first key."""
    key = request.get("Key") or request.get("Prefix") or ""
    if not key and request.get("Delete", {}).get("Objects"):
        key = request["Delete"]["Objects"][0].get("Key", "")
    return f"s3://{request.get('Bucket', '')}/{key}"


def _raise_named(err: Exception, method: str, url: str, attempts: int) -> NoReturn:
    """Raise `err` as StorageUnavailable naming `url` and the operation, if it was a passing fault
    that outlasted the retries; otherwise `err` itself (a 404 stays FileNotFoundError, and one
    already named by an inner call keeps its name)."""
    reason = transient_reason(err)
    if reason is None or isinstance(err, StorageUnavailable):
        raise err
    reason = " ".join(reason.split())[:300]  # the error's own text may run over lines
    raise StorageUnavailable(
        f"storage unavailable: {method} {url} still failed after {attempts} attempts ({reason}); what was "
        "committed before is intact: run again once the store answers (storage.attempts and "
        "storage.read_timeout_s set how long to wait)"
    ) from err


def _log_failed_attempt(
    attempts: int = 0,
    operation: Any = None,
    response: Any = None,
    caught_exception: Any = None,
    request_dict: Any = None,
    **_: Any,
) -> None:
    """botocore asks every handler of `needs-retry` after each attempt; this one only says that an
    attempt failed (botocore's own handler decides about the retry), and returns None so as not
    to take part in that decision."""
    status = response[0].status_code if response is not None else 0
    if caught_exception is None and status < 500 and status != 429:
        return None
    why = f"{type(caught_exception).__name__}" if caught_exception is not None else f"HTTP {status}"
    url = (request_dict or {}).get("url", "")
    log.warning(
        "storage: %s %s attempt %d failed (%s); botocore retries it",
        getattr(operation, "name", "?"),
        url,
        attempts,
        why,
    )
    return None
