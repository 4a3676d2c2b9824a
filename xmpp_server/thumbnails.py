"""Previews of uploaded media: dimensions and a small thumbnail (Pillow; PyAV for video).

Two blocking steps, for a worker thread. :func:`probe` reads headers only: the format (an
allow-list), the declared size and what decoding would cost in memory. :func:`render` decodes.
Between the two the caller reserves that cost in a :class:`~xmpp_server.decode_budget.
DecodeBudget`, so a decompression bomb (a 343 KB PNG of 9400×9400 pixels decodes to 350 MB)
is refused from its header and never decoded. Anything that cannot be decoded gives no
preview rather than an error: the upload itself stays valid.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

log = logging.getLogger("natterd.upload")

MAX_SIZE = 256  # the thumbnail's longest side, in pixels
MAX_PIXELS = 200_000_000  # declared sizes above this are refused from the header alone
JPEG_QUALITY = 80

IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP")
"""Pillow decoders we run on uploads; the other plugins (TIFF, PSD, ICO, EPS...) never see one."""
VIDEO_DEMUXERS = {
    "video/mp4": "mp4",
    "video/quicktime": "mov",
    "video/3gpp": "3gp",
    "video/webm": "webm",
    "video/x-matroska": "matroska",
}
"""The FFmpeg demuxer each video type is opened with: never probed, so a playlist or other
format that reads further files or URLs cannot pose as a video."""
VIDEO_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4"})

IMAGE_BYTES_PER_PIXEL = 8
"""Peak decode memory per decoded pixel: Pillow keeps 4 bytes a pixel, and the conversion to
RGB(A) may hold a second copy while the first is alive."""
CODED_MARGIN = 128
"""Decoders allocate frames padded past each side (block size, alignment, motion-vector edges)."""
VIDEO_BYTES_PER_PIXEL = 8
"""A few YUV 4:2:0 frames (1.5 bytes a pixel) in the decoder's pool; scaling to the thumbnail
happens in FFmpeg, straight from the decoded frame."""

ORIENTATION = 0x0112
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class Refused(ValueError):
    """The file is of a format we do not decode, or larger than the bounds."""


@dataclass(frozen=True)
class Preview:
    width: int | None = None  # of the original, as displayed (EXIF orientation applied)
    height: int | None = None
    thumbnail: bytes | None = None
    media_type: str | None = None  # image/jpeg, or image/png for images with transparency
    thumbnail_width: int | None = None
    thumbnail_height: int | None = None


@dataclass(frozen=True)
class Probe:
    """What the headers say, before any pixel is decoded."""

    kind: Literal["image", "video"]
    width: int  # as stored
    height: int
    orientation: int  # EXIF, when the headers tell it without decoding; 1 otherwise
    decoded_pixels: int  # after JPEG's reduced-scale decoding
    cost: int  # bytes decoding may hold at its peak

    @property
    def dimensions(self) -> Preview:
        """The size as displayed, without a thumbnail (for files refused a decode)."""
        return Preview(*_displayed(self.width, self.height, self.orientation))


def _displayed(width: int, height: int, orientation: int) -> tuple[int, int]:
    """EXIF orientations 5 to 8 swap the sides."""
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def probe(path: Path, content_type: str, max_size: int = MAX_SIZE) -> Probe | None:
    """The probe of an image or video, None for other types; raises :class:`Refused` (or any
    exception a parser raises on hostile input) for what must not be decoded."""
    kind = content_type.split("/", 1)[0]
    if kind == "image":
        return _probe_image(path, max_size)
    if kind == "video":
        return _probe_video(path, content_type)
    return None


def render(path: Path, content_type: str, probed: Probe, max_size: int = MAX_SIZE) -> Preview:
    """Decode and make the thumbnail; call within a budget reservation of ``probed.cost``."""
    if probed.kind == "image":
        return _render_image(path, probed, max_size)
    return _render_video(path, content_type, probed, max_size)


def make_preview(path: Path, content_type: str, max_size: int = MAX_SIZE) -> Preview | None:
    """Probe and render without a budget (tools and tests): None when nothing is known."""
    try:
        probed = probe(path, content_type, max_size)
        if probed is None:
            return None
        return render(path, content_type, probed, max_size)
    except Exception as exc:  # noqa: BLE001 - decoders raise anything on hostile input
        log.info("no preview of %s (%s): %s", path.name, content_type, exc)
    return None


# -- images ------------------------------------------------------------------------------


def _open_image(path: Path, max_size: int) -> tuple[Image.Image, tuple[int, int]]:
    """The image with only its headers read, set to decode at a reduced scale where the
    format can (JPEG), and its full stored size."""
    image = Image.open(path, formats=IMAGE_FORMATS)
    width, height = image.size
    if width <= 0 or height <= 0 or width * height > MAX_PIXELS:
        image.close()
        raise Refused(f"{width}×{height} pixels")
    image.draft("RGB", (max_size * 2, max_size * 2))
    return image, (width, height)


def _orientation(image: Image.Image, loaded: bool) -> int:
    """EXIF orientation, read without decoding: Pillow's PNG loads the whole image to look for
    an eXIf chunk after the pixel data, so before decoding a PNG counts only one that came
    before it."""
    if image.format == "PNG" and "exif" not in image.info and not loaded:
        return 1
    value = image.getexif().get(ORIENTATION, 1)
    return value if isinstance(value, int) else 1


def _probe_image(path: Path, max_size: int) -> Probe:
    image, (width, height) = _open_image(path, max_size)
    with image:
        pixels = image.size[0] * image.size[1]
        cost = pixels * IMAGE_BYTES_PER_PIXEL
        return Probe("image", width, height, _orientation(image, False), pixels, cost)


def _render_image(path: Path, probed: Probe, max_size: int) -> Preview:
    image, (width, height) = _open_image(path, max_size)
    with image:  # the first frame of an animation
        if image.size[0] * image.size[1] != probed.decoded_pixels:
            raise Refused("the file changed since it was probed")
        image.load()
        orientation = _orientation(image, True)  # loaded now: a PNG's eXIf chunk may come last
        alpha = image.mode in ("RGBA", "LA", "PA") or (
            image.mode == "P" and "transparency" in image.info
        )
        mode = "RGBA" if alpha else "RGB"
        thumbnail = image if image.mode == mode else image.convert(mode)
        thumbnail.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
        if orientation in TRANSPOSE:
            thumbnail = thumbnail.transpose(TRANSPOSE[orientation])
        media_type = "image/png" if alpha else "image/jpeg"
        return _encoded(thumbnail, media_type, *_displayed(width, height, orientation))


def _encoded(image: Image.Image, media_type: str, width: int, height: int) -> Preview:
    out = io.BytesIO()
    if media_type == "image/png":
        image.save(out, "PNG", optimize=True)
    else:
        image.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return Preview(width, height, out.getvalue(), media_type, image.width, image.height)


# -- video -------------------------------------------------------------------------------


def _probe_video(path: Path, content_type: str) -> Probe | None:
    import av

    demuxer = VIDEO_DEMUXERS.get(content_type)
    if demuxer is None:
        raise Refused(f"no thumbnails of {content_type}")
    with av.open(str(path), format=demuxer) as container:
        if not container.streams.video:
            return None
        context = container.streams.video[0].codec_context
        if context.name not in VIDEO_CODECS:
            raise Refused(f"no thumbnails of {context.name} video")
        width, height = context.width, context.height
    if width <= 0 or height <= 0 or width * height > MAX_PIXELS:
        raise Refused(f"{width}×{height} pixels")
    pixels = (width + CODED_MARGIN) * (height + CODED_MARGIN)
    return Probe("video", width, height, 1, pixels, pixels * VIDEO_BYTES_PER_PIXEL)


def _render_video(path: Path, content_type: str, probed: Probe, max_size: int) -> Preview:
    import av

    with av.open(str(path), format=VIDEO_DEMUXERS[content_type]) as container:
        stream = container.streams.video[0]
        context = stream.codec_context
        context.thread_count = 1  # every decoding thread would hold frames of its own
        # FFmpeg refuses any frame larger than the headers declared (padded to its coding
        # blocks), however the stream lies.
        context.options = {"max_pixels": str(probed.decoded_pixels)}
        for frame in container.decode(stream):
            scale = min(1.0, max_size / max(frame.width, frame.height))
            size = max(1, round(frame.width * scale)), max(1, round(frame.height * scale))
            image: Image.Image = frame.to_image(width=size[0], height=size[1])  # type: ignore[no-untyped-call]
            return _encoded(image, "image/jpeg", frame.width, frame.height)
    raise Refused("no video frame")
