"""Image bytes of every awkward kind the ingest tests serve."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

RED = (200, 30, 30)


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png(size=(80, 80), color=RED) -> bytes:
    return _save(Image.new("RGB", size, color), "PNG")


def jpeg(size=(80, 80), color=RED) -> bytes:
    return _save(Image.new("RGB", size, color), "JPEG", quality=95)


def cmyk_jpeg() -> bytes:
    return _save(Image.new("RGB", (80, 80), RED).convert("CMYK"), "JPEG", quality=95)


def png16() -> bytes:
    import cv2

    bgr = np.empty((80, 80, 3), np.uint16)
    bgr[...] = [c * 257 for c in reversed(RED)]  # OpenCV's channel order, 16 bits each
    return cv2.imencode(".png", bgr)[1].tobytes()


def palette_png() -> bytes:
    return _save(Image.new("RGB", (80, 80), RED).convert("P", palette=Image.Palette.ADAPTIVE), "PNG")


def transparent_png() -> bytes:
    image = Image.new("RGBA", (80, 80), (*RED, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    return _save(image, "PNG")


def truncated_jpeg() -> bytes:
    data = jpeg((200, 200))
    return data[: len(data) // 3]


def bomb_png(side: int = 40_000) -> bytes:
    """A PNG whose header says side x side pixels but that carries almost no data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
