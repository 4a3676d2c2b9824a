"""Thumbnails from headers first: probe (format allow-list, declared size, decode cost) before
any decoding, and the decode budget that bounds jobs and bytes in flight (issue 13, defect 3)."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import av
import pytest
from PIL import Image

from tests.e2e.test_upload_limits import png_bomb
from xmpp_server.decode_budget import DecodeBudget, OverBudget
from xmpp_server.thumbnails import IMAGE_BYTES_PER_PIXEL, Refused, probe, render


def saved(tmp_path: Path, image: Image.Image, fmt: str, **params: object) -> Path:
    path = tmp_path / f"file.{fmt.lower()}"
    image.save(path, fmt, **params)
    return path


def test_bomb_is_priced_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(9400, 9400))
    probed = probe(path, "image/png")
    assert probed is not None
    assert (probed.width, probed.height) == (9400, 9400)
    assert probed.cost == 9400 * 9400 * IMAGE_BYTES_PER_PIXEL  # 674 MiB: over any sane budget
    assert probed.dimensions.thumbnail is None


def test_jpeg_is_priced_at_its_reduced_decoding_scale(tmp_path: Path) -> None:
    path = saved(tmp_path, Image.new("RGB", (4000, 3000), (9, 9, 9)), "JPEG")
    probed = probe(path, "image/jpeg")
    assert probed is not None and probed.decoded_pixels == 1000 * 750  # 1/4 scale, >= 512 px
    preview = render(path, "image/jpeg", probed)
    assert (preview.width, preview.height) == (4000, 3000)
    assert (preview.thumbnail_width, preview.thumbnail_height) == (256, 192)


def test_png_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = saved(tmp_path, Image.new("RGB", (400, 200)), "PNG", exif=exif)
    probed = probe(path, "image/png")
    assert probed is not None
    # Pillow writes eXIf before IDAT, so the header already tells it.
    preview = render(path, "image/png", probed)
    assert (preview.width, preview.height) == (200, 400)
    assert (preview.thumbnail_width, preview.thumbnail_height) == (128, 256)


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "ICO", "PPM", "TGA"])
def test_formats_outside_the_allow_list_are_not_opened(tmp_path: Path, fmt: str) -> None:
    path = saved(tmp_path, Image.new("RGB", (64, 64)), fmt)
    with pytest.raises(Exception, match="cannot identify"):
        probe(path, "image/png")


def test_video_types_outside_the_allow_list_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    path.write_bytes(b"RIFF\0\0\0\0AVI LIST")
    with pytest.raises(Refused):
        probe(path, "video/x-msvideo")
    playlist = tmp_path / "clip.mp4"
    playlist.write_bytes(b"#EXTM3U\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:10.0,\nfile:///etc/passwd\n")
    with pytest.raises(av.error.InvalidDataError):  # opened as MP4, never as HLS
        probe(playlist, "video/mp4")


def test_other_types_have_no_probe(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("notes")
    assert probe(path, "text/plain") is None


def test_png_thumbnail_keeps_transparency(tmp_path: Path) -> None:
    out = io.BytesIO()
    Image.new("RGBA", (800, 600), (0, 128, 255, 128)).save(out, "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(out.getvalue())
    probed = probe(path, "image/png")
    assert probed is not None
    preview = render(path, "image/png", probed)
    assert preview.media_type == "image/png"
    assert (preview.thumbnail_width, preview.thumbnail_height) == (256, 192)


# -- the decode budget ------------------------------------------------------------------


async def test_budget_bounds_jobs_and_bytes() -> None:
    budget = DecodeBudget(capacity=100, jobs=2)
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def job() -> int:
        with lock:
            seen.append((budget.running, budget.in_use))
        threading.Event().wait(0.01)
        return 1

    results = await asyncio.gather(*(budget.run(cost, job) for cost in (40, 40, 40, 90, 10, 60)))
    assert results == [1] * 6
    assert budget.peak <= 100 and budget.peak_running <= 2
    assert all(running <= 2 and in_use <= 100 for running, in_use in seen)
    assert (budget.running, budget.in_use) == (0, 0)


async def test_budget_refuses_a_job_larger_than_itself() -> None:
    budget = DecodeBudget(capacity=100, jobs=2)
    with pytest.raises(OverBudget):
        await budget.run(101, lambda: None)
    assert budget.peak == 0


async def test_a_cancelled_caller_keeps_the_reservation_until_its_thread_ends() -> None:
    budget = DecodeBudget(capacity=100, jobs=2)
    release = threading.Event()
    task = asyncio.create_task(budget.run(80, release.wait))
    while budget.running == 0:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert budget.in_use == 80  # the thread still decodes
    waiting = asyncio.create_task(budget.run(30, lambda: "second"))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    release.set()
    assert await waiting == "second"
    assert budget.in_use == 0
