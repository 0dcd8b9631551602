"""An HTTP proxy on 127.0.0.1 in front of moto's S3 server that fails requests on a seeded schedule.

Per request it can answer 503 SlowDown, reset the connection midway (mid request body for writes,
so the store never sees them; mid response body for reads), or stall past the client's read
timeout. With no schedule it passes everything through, so every S3 test runs behind it.
"""

from __future__ import annotations

import collections
import functools
import http.client
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("slowdown", "reset", "stall")
# A stall costs the client its whole read timeout: drawn half as often as the others.
WEIGHTS = {"slowdown": 2, "reset": 2, "stall": 1}
SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>fault</RequestId></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class FaultProxy:
    """`endpoint` forwards to `upstream`; `schedule(rate, seed)` fails that share of requests,
    `outage(True)` fails them all. `counts` says what was done, by kind."""

    def __init__(self, upstream: str, stall_s: float = 3.0):
        self.upstream = urlsplit(upstream)
        self.stall_s = stall_s
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._rate = 0.0
        self._rng = random.Random(0)
        self._outage: str | None = None
        self._kinds = FAULTS
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the S3 clients expect

            def log_message(self, *args) -> None:
                pass

            def do_request(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_request

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def schedule(self, rate: float, seed: int = 0, kinds: tuple[str, ...] = FAULTS) -> None:
        with self._lock:
            self._rate, self._rng, self._outage, self._kinds = rate, random.Random(seed), None, kinds
            self.counts.clear()

    def outage(self, kind: str | None = "slowdown") -> None:
        """Every request fails this way from now on (None: the store answers again)."""
        with self._lock:
            self._outage = kind

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _decide(self) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            fault = self._outage
            if fault is None and self._rate and self._rng.random() < self._rate:
                fault = self._rng.choices(self._kinds, [WEIGHTS[k] for k in self._kinds])[0]
            if fault:
                self.counts[fault] += 1
            return fault

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        fault = self._decide()
        body = _read_body(handler)
        if fault == "slowdown":
            handler.send_response(503)
            handler.send_header("Content-Type", "application/xml")
            handler.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
            handler.end_headers()
            handler.wfile.write(SLOWDOWN_BODY if handler.command != "HEAD" else b"")
            return
        if fault in ("reset", "stall") and handler.command != "GET":
            if fault == "stall":
                time.sleep(self.stall_s)
            _reset(handler)  # the store never saw this write
            return
        status, headers, payload = self._forward(handler, body)
        handler.send_response(status)
        head = handler.command == "HEAD"  # its Content-Length is the object's size: passed on as it is
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP and (head or name.lower() != "content-length"):
                handler.send_header(name, value)
        if not head:
            handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if head:
            return
        if fault in ("reset", "stall"):  # a read broken off midway
            handler.wfile.write(payload[: len(payload) // 2])
            handler.wfile.flush()
            if fault == "stall":
                time.sleep(self.stall_s)
            _reset(handler)
            return
        handler.wfile.write(payload)

    def _forward(self, handler: BaseHTTPRequestHandler, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            conn.request(handler.command, handler.path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while size := int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
        while handler.rfile.readline().strip():  # trailers
            pass
        return b"".join(chunks)
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


def _reset(handler: BaseHTTPRequestHandler) -> None:
    """Close with RST rather than FIN: the client sees 'connection reset by peer'."""
    handler.close_connection = True
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.connection.close()


@functools.cache
def _upstream_client(endpoint: str):
    """One client per endpoint: tests poll through it 20 times a second, and making one costs more."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def upstream_keys(proxy: FaultProxy, url: str) -> dict[str, str]:
    """Key -> ETag of every object under s3 `url`, asked of moto itself (past the proxy's faults)."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = _upstream_client(f"http://{proxy.upstream.hostname}:{proxy.upstream.port}")
    out: dict[str, str] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return out


def run_into_outage(proxy: FaultProxy, command, ready, kind: str, limit_s: float = 300) -> tuple[object, float]:
    """Run `command()` in a thread; once `ready()` holds, every request fails the `kind` way.
    Returns what the command returned and how long it went on after the outage began."""
    box: dict[str, object] = {}
    thread = threading.Thread(target=lambda: box.update(result=command()), daemon=True)
    thread.start()
    deadline = time.time() + limit_s
    while not ready() and thread.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert thread.is_alive(), "the command finished before the outage could begin"
    proxy.outage(kind)
    began = time.time()
    thread.join(limit_s)
    assert not thread.is_alive(), f"still running {limit_s} s into the outage"
    return box.get("result"), time.time() - began
