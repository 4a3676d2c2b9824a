"""Previews of uploaded media: dimensions and a small thumbnail (Pillow; PyAV for video).

Blocking and CPU-bound: call :func:`make_preview` in a worker thread. Anything that cannot be
decoded gives no preview rather than an error: the upload itself stays valid.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

log = logging.getLogger("natterd.upload")

MAX_SIZE = 256  # the thumbnail's longest side, in pixels
MAX_PIXELS = 64_000_000  # larger images (or decompression bombs) get no thumbnail
JPEG_QUALITY = 80


@dataclass(frozen=True)
class Preview:
    width: int | None = None  # of the original, as displayed (EXIF orientation applied)
    height: int | None = None
    thumbnail: bytes | None = None
    media_type: str | None = None  # image/jpeg, or image/png for images with transparency
    thumbnail_width: int | None = None
    thumbnail_height: int | None = None


def make_preview(path: Path, content_type: str, max_size: int = MAX_SIZE) -> Preview | None:
    """A preview of an image or video file, None for other types or undecodable files."""
    kind = content_type.split("/", 1)[0]
    try:
        if kind == "image":
            return _image(path, max_size)
        if kind == "video":
            return _video(path, max_size)
    except Exception as exc:  # noqa: BLE001 - decoders raise anything on hostile input
        log.info("no preview of %s (%s): %s", path.name, content_type, exc)
    return None


def _image(path: Path, max_size: int) -> Preview:
    with Image.open(path) as image:  # the first frame of an animation
        width, height = image.size
        if width * height > MAX_PIXELS:
            return Preview(*_oriented(image, width, height))
        image.draft("RGB", (max_size * 2, max_size * 2))  # JPEG: decode at a reduced scale
        upright = ImageOps.exif_transpose(image)
        width, height = _oriented(image, width, height)
        return _thumbnail(upright, width, height, max_size)


def _oriented(image: Image.Image, width: int, height: int) -> tuple[int, int]:
    """The size as displayed: EXIF orientations 5 to 8 swap the sides."""
    orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _video(path: Path, max_size: int) -> Preview | None:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            return None
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            image: Image.Image = frame.to_image()  # type: ignore[no-untyped-call]
            return _thumbnail(image, frame.width, frame.height, max_size)
    return None


def _thumbnail(image: Image.Image, width: int, height: int, max_size: int) -> Preview:
    alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    image = image.convert("RGBA" if alpha else "RGB")
    image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if alpha:
        image.save(out, "PNG", optimize=True)
        media_type = "image/png"
    else:
        image.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
        media_type = "image/jpeg"
    return Preview(width, height, out.getvalue(), media_type, image.width, image.height)
