"""The embedded default data set: captioned coloured shapes, served over HTTP on 127.0.0.1.

The build machines reach no image host, so `unclip demo` and the tests generate their data,
serve it locally and download it through the real ingest path. Every image records the
attributes it was drawn from, and captions are built from them with varied wording, so what a
model learned can later be checked against the truth.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import os
import random
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from data_pipeline.config import SyntheticConfig
from models.base import storage

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
CAPTION_TEMPLATES = (
    "a {color} {shape} on a {background} background",
    "a {shape} in {color} on {background}",
    "{color} {shape}, {background} background",
    "a picture of a {color} {shape} against a {background} backdrop",
)


@dataclass(frozen=True)
class ShapeAttributes:
    shape: str
    color: str
    background: str
    cx: float  # centre and half-size as fractions of the image side
    cy: float
    size: float


def sample_attributes(rng: random.Random) -> ShapeAttributes:
    color, background = rng.sample(sorted(COLORS), 2)
    size = rng.uniform(0.22, 0.34)
    return ShapeAttributes(
        shape=rng.choice(SHAPES),
        color=color,
        background=background,
        cx=rng.uniform(size + 0.04, 1 - size - 0.04),
        cy=rng.uniform(size + 0.04, 1 - size - 0.04),
        size=size,
    )


def draw(attrs: ShapeAttributes, side: int) -> Image.Image:
    image = Image.new("RGB", (side, side), COLORS[attrs.background])
    pen = ImageDraw.Draw(image)
    cx, cy, r = attrs.cx * side, attrs.cy * side, attrs.size * side
    fill = COLORS[attrs.color]
    if attrs.shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif attrs.shape == "square":
        pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def caption(attrs: ShapeAttributes, rng: random.Random) -> str:
    return rng.choice(CAPTION_TEMPLATES).format(color=attrs.color, shape=attrs.shape, background=attrs.background)


def attributes_from_caption(text: str) -> tuple[str, str, str] | None:
    """(shape, colour, background) named by a caption of the templates above, or None.
    Every template names the shape's colour before the background's."""
    words = text.replace(",", " ").split()
    colors = [w for w in words if w in COLORS]
    shapes = [w for w in words if w in SHAPES]
    if len(colors) != 2 or len(shapes) != 1:
        return None
    return shapes[0], colors[0], colors[1]


def one_attribute_away(shape: str, color: str, background: str) -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) that differs from the given one in exactly one attribute."""
    return (
        [(s, color, background) for s in SHAPES if s != shape]
        + [(shape, c, background) for c in COLORS if c not in (color, background)]
        + [(shape, color, b) for b in COLORS if b not in (color, background)]
    )


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def generate(out_dir: str, cfg: SyntheticConfig) -> list[dict]:
    """Write images under `out_dir/images/` and return one record per URL to list.

    Records carry `path` (relative to `out_dir`), `caption` and the attributes; broken entries
    (a missing file, bytes that are not an image, a truncated PNG) have `broken` set to why.
    """
    rng = random.Random(cfg.seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    for i in range(cfg.count):
        attrs = sample_attributes(rng)
        rel = f"images/{i:06d}.png"
        with open(os.path.join(out_dir, rel), "wb") as f:
            f.write(png_bytes(draw(attrs, cfg.image_size)))
        records.append({"path": rel, "caption": caption(attrs, rng), "broken": None, **asdict(attrs)})
    if cfg.broken:
        good = png_bytes(draw(sample_attributes(rng), cfg.image_size))
        broken = {
            "images/missing.png": None,  # never written: the server answers 404
            "images/not-an-image.png": b"<html><body>this is not an image</body></html>",
            "images/truncated.png": good[: len(good) // 2],
        }
        for rel, body in broken.items():
            if body is not None:
                with open(os.path.join(out_dir, rel), "wb") as f:
                    f.write(body)
            reason = "missing" if body is None else os.path.basename(rel)[:-4]
            records.append({"path": rel, "caption": f"a broken entry ({reason})", "broken": reason})
    return records


def write_url_list(records: list[dict], base_url: str, path: str) -> str:
    """A LAION-style parquet URL list (`URL`, `TEXT` + attribute columns) for `records`."""
    rows = [{"URL": f"{base_url}/{r['path']}", "TEXT": r["caption"]} for r in records]
    for row, r in zip(rows, records, strict=True):
        row["attributes"] = storage.strict_json(
            {k: r.get(k) for k in ("shape", "color", "background", "cx", "cy", "size")}
        )
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_directory(directory: str) -> Iterator[str]:
    """Serve `directory` on 127.0.0.1 (a free port) for the duration; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="synthetic-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def write_shards(
    records: list[dict], site_dir: str, out_url: str, shard_size: int, fmt: str = "webdataset"
) -> list[str]:
    """The generated images as image shards (webdataset tars or parquet), for `embed.input`.

    Samples carry no URL, so their keys come from file name and in-file key, as for any outside
    data set without one."""
    files = []
    for start in range(0, len(records), shard_size):
        rows = records[start : start + shard_size]
        name = f"shard-{start // shard_size:05d}"
        buf = io.BytesIO()
        if fmt == "webdataset":
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for i, r in enumerate(rows):
                    with open(os.path.join(site_dir, r["path"]), "rb") as f:
                        members = {
                            "png": f.read(),
                            "txt": r["caption"].encode(),
                            "json": storage.strict_json({"caption": r["caption"]}).encode(),
                        }
                    for ext, data in members.items():
                        info = tarfile.TarInfo(f"{start + i:08d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            name += ".tar"
        else:
            images = [open(os.path.join(site_dir, r["path"]), "rb").read() for r in rows]
            pq.write_table(pa.table({"image": images, "caption": [r["caption"] for r in rows]}), buf)
            name += ".parquet"
        storage.write_bytes(storage.join(out_url, name), buf.getvalue())
        files.append(storage.join(out_url, name))
    return files
