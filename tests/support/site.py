"""The test site: an HTTP server on loopback that serves every kind of picture, trouble and
refusal ingest meets on the web, and the bad-input list written against it."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
import urllib.parse

import pyarrow as pa
import pyarrow.parquet as pq

from tests.support import images


class Site(http.server.BaseHTTPRequestHandler):
    """Routes: /ok/N.png (distinct images, optionally slow), and one route per bad input."""

    delay_s = 0.0
    private = ""  # the base URL of a server on a blocked address, which /to-private redirects to
    # X-Robots-Tag answers: refused for every agent, for unclip's token alone, and one for another crawler
    opt_outs = {
        "/optout/noai.png": "noai",
        "/optout/noimageai.png": "noimageai, nofollow",
        "/optout/for-unclip.png": "unclip: noai",
        "/optout/for-another-crawler.png": "otherbot: noai",
    }
    fixed = {
        "/dup/a.png": lambda: images.png(color=(0, 0, 1)),  # same bytes as /ok/0.png
        "/dup/b.png": lambda: images.png(color=(0, 0, 1)),
        "/text.png": lambda: b"<html>not an image</html>",
        "/truncated.jpg": images.truncated_jpeg,
        "/cmyk.jpg": images.cmyk_jpeg,
        "/png16.png": images.png16,
        "/palette.png": images.palette_png,
        "/transparent.png": images.transparent_png,
        "/empty.png": lambda: b"",
        "/bomb.png": images.bomb_png,
        "/small.png": lambda: images.png((20, 20)),
        "/wide.png": lambda: images.png((200, 40)),
    }

    user_agents: set[str] = set()  # every User-Agent the site was sent

    def do_GET(self):
        Site.user_agents.add(self.headers.get("User-Agent", ""))
        path = urllib.parse.unquote(self.path)  # as requested: percent-encoded UTF-8
        if path in self.opt_outs:
            return self._send(200, images.png(color=(200, list(self.opt_outs).index(path), 2)), self.opt_outs[path])
        if path.startswith("/uni/"):  # published names outside ASCII: a byte of the name picks the colour
            return self._send(200, images.png(color=(201, path.encode()[-5], 2)))
        if path == "/to-private":
            self.send_response(302)
            self.send_header("Location", f"{self.private}/ok/1.png")
            self.end_headers()
            return None
        if path.startswith("/late/"):  # an earlier copy of /same/N/...: it finishes after the later one
            time.sleep(1.5)
            return self._send(200, images.png(color=(int(path.split("/")[2][:-4]), 7, 1)))
        if self.path.startswith("/same/"):  # /same/N/K.png: image N, whatever K (another URL, the same bytes)
            return self._send(200, images.png(color=(int(self.path.split("/")[2]), 7, 1)))
        if self.path.startswith("/ok/"):
            time.sleep(self.delay_s)
            i = int(self.path[4:-4])
            return self._send(200, images.png(color=(i % 256, (i // 256) % 256, 1)))
        if self.path in ("/404.png", "/500.png"):
            return self._send(int(self.path[1:4]), b"no")
        if self.path == "/hang.png":
            time.sleep(10)
            return self._send(200, images.png())
        if self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
            return None
        if self.path in self.fixed:
            return self._send(200, self.fixed[self.path]())
        return self._send(404, b"no")

    def _send(self, status: int, body: bytes, robots: str | None = None) -> None:
        self.send_response(status)
        if robots:
            self.send_header("X-Robots-Tag", robots)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(delay_s: float = 0.0, address: str = "127.0.0.1", private: str = "", seen: list[str] | None = None):
    """The site on `address`; `seen`: where to note every request it receives."""

    def note(handler, *args) -> None:
        if seen is not None:
            seen.append(handler.path)
        Site.do_GET(handler)

    handler = type("SiteHandler", (Site,), {"delay_s": delay_s, "private": private, "do_GET": note})
    server = http.server.ThreadingHTTPServer((address, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{address}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


PRIVATE_REQUESTS: list[str] = []  # what the server on a blocked address (127.0.0.2) was asked


def write_lists(folder, base: str, private: str) -> dict[str, str]:
    """The bad-input list, split over one file of each format; returns url -> caption of the good rows."""
    good = {f"{base}/ok/{i}.png": f"picture number {i}" for i in range(12)}
    good.update(
        {f"{base}{p}": f"odd image {p}" for p in ("/cmyk.jpg", "/png16.png", "/palette.png", "/transparent.png")}
    )
    bad = {
        f"{base}{p}": f"bad {p}"
        for p in (
            "/404.png",
            "/500.png",
            "/hang.png",
            "/text.png",
            "/truncated.jpg",
            "/empty.png",
            "/bomb.png",
            "/loop",
            "/small.png",
            "/wide.png",
            "/dup/a.png",
            "/dup/b.png",
        )
    }
    # opted out (refused), a crawler's own opt-out (kept), a private address and a redirect into one
    bad.update({f"{base}{p}": f"opted out {p}" for p in Site.opt_outs if "another" not in p})
    good[f"{base}/optout/for-another-crawler.png"] = "an opt-out for another crawler"
    bad.update({f"{base}/to-private": "redirected to a private address", f"{private}/ok/2.png": "a private address"})
    # published names outside ASCII (downloaded), and a host IDNA refuses (a label over 63 characters)
    good.update({f"{base}/uni/flag_Réunion.png": "a flag", f"{base}/uni/women’s_room.png?größe=groß": "a door"})
    bad["http://" + "ä" * 70 + ".example/x.png"] = "an invalid host"
    rows = [{"url": u, "caption": c} for u, c in {**good, **bad}.items()]
    rows += [
        {"url": "htp:/broken", "caption": "malformed"},
        {"url": "not a url", "caption": "malformed"},
        {"url": f"{base}/ok/1.png", "caption": "listed twice"},
        {"url": f"{base}/ok/100.png", "caption": "   "},
    ]
    quarter = len(rows) // 4
    pq.write_table(pa.Table.from_pylist(rows[:quarter]), folder / "a.parquet")
    (folder / "b.csv").write_bytes(
        b"url,caption\n"
        + b"".join(f'{r["url"]},"{r["caption"]}"\n'.encode() for r in rows[quarter : 2 * quarter])
        + f"{base}/ok/101.png,".encode()
        + b'"caf\xe9 latin-1"\n'
    )
    (folder / "c.tsv").write_text(
        "url\tcaption\n" + "".join(f"{r['url']}\t{r['caption']}\n" for r in rows[2 * quarter : 3 * quarter])
    )
    (folder / "d.jsonl").write_bytes(
        "".join(json.dumps(r) + "\n" for r in rows[3 * quarter :]).encode()
        + b'{"url": "'
        + f"{base}/ok/102.png".encode()
        + b'", "caption": "bad \xff bytes"}\n'
    )
    return good
