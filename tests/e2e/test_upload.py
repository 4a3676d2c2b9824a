"""HTTP server and XEP-0363 file upload: slots, PUT/GET, thumbnails, purge, the S3 backend."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import shutil
import socket
import ssl
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from multidict import CIMultiDict
from PIL import Image
from slixmpp import JID
from slixmpp.exceptions import IqError
from sqlalchemy import update

from tests.e2e.harness import DOMAIN, Client, add_user, clients, running_server
from tests.ports import free_tcp_port, on_free_port
from xmpp_server.blobs import S3Blobs
from xmpp_server.cli import ctl_main
from xmpp_server.modules.upload import HttpUpload
from xmpp_server.server import Server
from xmpp_server.storage.tables import UploadedFile

NS_UPLOAD = "urn:xmpp:http:upload:0"
NS_PREVIEW = "urn:natter:upload-thumbnail:0"
NS_THUMBS = "urn:xmpp:thumbs:1"
NS_FILE = "urn:xmpp:jingle:apps:file-transfer:5"
NS_HASHES = "urn:xmpp:hashes:2"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


def http_on(port: int) -> dict[str, Any]:
    """[http] for a server with plain HTTP on loopback ``port`` (0 means off, not "any")."""
    base = f"http://127.0.0.1:{port}"
    return {"enabled": True, "host": "127.0.0.1", "port": port, "tls_port": 0, "public_url": base}


@contextlib.asynccontextmanager
async def upload_server(
    db_url: str, tmp_path: Path, **options: Any
) -> AsyncIterator[tuple[Server, str]]:
    def start(port: int) -> contextlib.AbstractAsyncContextManager[Server]:
        overrides = {"http": http_on(port), "modules": {"upload": options}}
        return running_server(db_url, tmp_path, overrides)

    async with on_free_port(start) as server:
        yield server, module(server).base_url


def module(server: Server) -> HttpUpload:
    upload = server.host.modules["upload"]
    assert isinstance(upload, HttpUpload)
    return upload


async def login(server: Server, name: str = "alice") -> Client:
    jid = await add_user(server, name)
    client = Client(server, jid)
    client.register_plugin("xep_0363")
    await client.login(presence=False)
    return client


async def slot(client: Client, filename: str, size: int, content_type: str) -> tuple[str, str]:
    iq = await client.plugin["xep_0363"].request_slot(
        JID(DOMAIN), filename, size, content_type, timeout=10
    )
    return iq["http_upload_slot"]["put"]["url"], iq["http_upload_slot"]["get"]["url"]


async def put(url: str, data: bytes, content_type: str, **headers: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.put(url, data=data, headers={"Content-Type": content_type, **headers}) as response,
    ):
        return response.status


async def upload(client: Client, filename: str, data: bytes, content_type: str) -> str:
    put_url, get_url = await slot(client, filename, len(data), content_type)
    assert await put(put_url, data, content_type) == 201
    return get_url


async def fetch(url: str, **headers: str) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        return response.status, CIMultiDict(response.headers), await response.read()


async def error_of(client: Client, filename: str, size: int, content_type: str) -> ET.Element:
    with pytest.raises(IqError) as info:
        await slot(client, filename, size, content_type)
    error = info.value.iq.xml.find("{jabber:client}error")
    assert error is not None
    return error


async def preview(client: Client, url: str) -> ET.Element:
    iq = client.make_iq_get(ito=DOMAIN)
    iq.append(ET.Element(f"{{{NS_PREVIEW}}}thumbnail", {"url": url}))
    result = await iq.send(timeout=10)
    answer = result.xml.find(f"{{{NS_PREVIEW}}}thumbnail")
    assert answer is not None
    return answer


# -------------------------------------------------------------------------------- media


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (width, height), (0, 128, 255, 128)).save(out, "PNG")
    return out.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (300, 100), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def rotated_jpeg() -> bytes:
    """400×200 pixels stored, EXIF orientation 6: displayed 200×400."""
    image = Image.new("RGB", (400, 200), (0, 200, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif)
    return out.getvalue()


def video(tmp_path: Path) -> bytes:
    import av

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height = 320, 240
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, 10)
        for i in range(5):
            frame = av.VideoFrame.from_image(Image.new("RGB", (320, 240), (i * 50, 100, 0)))
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path.read_bytes()


# -------------------------------------------------------------------------------- tests


async def test_health_and_disco(migrated_db_url: str, tmp_path: Path) -> None:
    async with upload_server(migrated_db_url, tmp_path, max_file_size=5000) as (server, base):
        status, _, body = await fetch(base + "/health")
        assert status == 200 and b'"ok"' in body
        async with clients(await login(server)) as (alice,):
            info = await alice.plugin["xep_0030"].get_info(JID(DOMAIN), timeout=10)
            assert NS_UPLOAD in info["disco_info"]["features"]
            assert NS_PREVIEW in info["disco_info"]["features"]
            assert ("store", "file", None, "HTTP File Upload") in info["disco_info"]["identities"]
            forms = [f["values"] for f in info["disco_info"].iterables]
            assert {"FORM_TYPE": [NS_UPLOAD], "max-file-size": "5000"} in [
                {k: v for k, v in form.items()} for form in forms
            ]


async def test_round_trip(migrated_db_url: str, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    async with upload_server(migrated_db_url, tmp_path) as (server, base):
        async with clients(await login(server)) as (alice,):
            # slixmpp's own XEP-0363 client: discovery, slot, PUT.
            url = await alice.plugin["xep_0363"].upload_file(
                "très cool.bin",
                input_file=io.BytesIO(data),
                content_type="application/octet-stream",
                domain=JID(DOMAIN),
                timeout=10,
            )
        assert url.startswith(base + "/upload/")
        status, headers, body = await fetch(url)
        assert status == 200 and body == data
        assert headers["Content-Type"] == "application/octet-stream"
        assert headers["Content-Disposition"].startswith("attachment;")
        assert "filename*=UTF-8''tr%C3%A8s%20cool.bin" in headers["Content-Disposition"]
        assert "immutable" in headers["Cache-Control"]
        assert headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
        assert headers["X-Content-Type-Options"] == "nosniff"
        status, headers, body = await fetch(url, Range="bytes=100-199")
        assert status == 206 and body == data[100:200]
        assert headers["Content-Range"] == f"bytes 100-199/{len(data)}"
        status, _, body = await fetch(url, Range="bytes=-10")
        assert status == 206 and body == data[-10:]
        assert (await fetch(url, Range="bytes=999999-"))[0] == 416
        assert (await fetch(url, **{"If-None-Match": headers["ETag"]}))[0] == 304
        assert (await fetch(url + "x"))[0] == 404
        assert (await fetch(base + "/upload/nosuchslot/file.bin"))[0] == 404
        uploads = await server.host.storage.uploads.list(f"alice@{DOMAIN}")
        assert [(u.filename, u.size, u.sha256) for u in uploads] == [
            ("très cool.bin", len(data), hashlib.sha256(data).hexdigest())
        ]
        path = tmp_path / "data" / "uploads" / uploads[0].path
        assert path.read_bytes() == data


async def test_put_is_checked(migrated_db_url: str, tmp_path: Path) -> None:
    data = b"hello, world\n"
    async with upload_server(migrated_db_url, tmp_path) as (server, _):
        async with clients(await login(server)) as (alice,):
            put_url, get_url = await slot(alice, "a.txt", len(data), "text/plain")
            bad = put_url[:-4] + ("0000" if not put_url.endswith("0000") else "1111")
            assert await put(bad, data, "text/plain") == 403
            # A correctly signed URL that expired.
            query = parse_qs(urlsplit(put_url).query)
            slot_id = urlsplit(put_url).path.split("/")[2]
            past = int(query["expires"][0]) - 3600
            sig = module(server).sign(slot_id, "a.txt", len(data), "text/plain", past)
            expired = put_url.split("?")[0] + f"?expires={past}&sig={sig}"
            assert await put(expired, data, "text/plain") == 403
            assert await put(put_url, data + b"more", "text/plain") == 413
            assert await put(put_url, data, "image/png") == 403
            assert (await fetch(get_url))[0] == 404  # nothing uploaded yet
            assert await put(put_url, data, "text/plain") == 201
            assert await put(put_url, data, "text/plain") == 409
            assert (await fetch(get_url))[2] == data


async def test_slot_errors(migrated_db_url: str, tmp_path: Path) -> None:
    options = {"max_file_size": 1000, "quota_per_user": 1500, "allowed_types": ["image/*"]}
    async with upload_server(migrated_db_url, tmp_path, **options) as (server, _):
        async with clients(await login(server)) as (alice,):
            error = await error_of(alice, "big.png", 1001, "image/png")
            assert error.get("type") == "modify"
            assert error.find(f"{{{NS_STANZAS}}}not-acceptable") is not None
            size = error.find(f"{{{NS_UPLOAD}}}file-too-large/{{{NS_UPLOAD}}}max-file-size")
            assert size is not None and size.text == "1000"

            error = await error_of(alice, "page.html", 10, "text/html")
            assert error.find(f"{{{NS_STANZAS}}}not-acceptable") is not None
            assert error.find(f"{{{NS_UPLOAD}}}file-too-large") is None

            await slot(alice, "one.png", 1000, "image/png")  # reserved while the slot is valid
            error = await error_of(alice, "two.png", 600, "image/png")
            assert error.find(f"{{{NS_STANZAS}}}resource-constraint") is not None
            await slot(alice, "three.png", 500, "image/png")


@pytest.mark.parametrize(
    ("kind", "content_type", "size", "thumb_size", "thumb_type"),
    [
        ("png", "image/png", (800, 600), (256, 192), "image/png"),
        ("gif", "image/gif", (300, 100), (256, 85), "image/jpeg"),
        ("jpeg", "image/jpeg", (200, 400), (128, 256), "image/jpeg"),
        ("video", "video/mp4", (320, 240), (256, 192), "image/jpeg"),
    ],
)
async def test_thumbnails(
    migrated_db_url: str,
    tmp_path: Path,
    kind: str,
    content_type: str,
    size: tuple[int, int],
    thumb_size: tuple[int, int],
    thumb_type: str,
) -> None:
    data = {
        "png": lambda: png(800, 600),
        "gif": animated_gif,
        "jpeg": rotated_jpeg,
        "video": lambda: video(tmp_path),
    }[kind]()
    async with upload_server(migrated_db_url, tmp_path) as (server, _):
        async with clients(await login(server)) as (alice,):
            url = await upload(alice, f"file.{kind}", data, content_type)
            answer = await preview(alice, url)
        thumb = answer.find(f"{{{NS_THUMBS}}}thumbnail")
        assert thumb is not None
        assert thumb.get("uri") == url + "?thumb=1"
        assert thumb.get("media-type") == thumb_type
        assert (int(thumb.get("width", 0)), int(thumb.get("height", 0))) == thumb_size
        file = answer.find(f"{{{NS_FILE}}}file")
        assert file is not None
        assert file.findtext(f"{{{NS_FILE}}}media-type") == content_type
        assert file.findtext(f"{{{NS_FILE}}}name") == f"file.{kind}"
        assert file.findtext(f"{{{NS_FILE}}}size") == str(len(data))
        assert file.findtext(f"{{{NS_FILE}}}width") == str(size[0])
        assert file.findtext(f"{{{NS_FILE}}}height") == str(size[1])
        digest = file.find(f"{{{NS_HASHES}}}hash")
        assert digest is not None and digest.get("algo") == "sha-256"
        assert digest.text == base64.b64encode(hashlib.sha256(data).digest()).decode()
        assert file.find(f"{{{NS_THUMBS}}}thumbnail") is not None

        status, headers, body = await fetch(url + "?thumb=1")
        assert status == 200 and headers["Content-Type"] == thumb_type
        with Image.open(io.BytesIO(body)) as image:
            assert image.size == thumb_size
            if kind == "gif":  # the first frame: red
                red, green, blue = image.convert("RGB").getpixel((10, 10))  # type: ignore[misc]
                assert red > 200 and green < 50 and blue < 50


async def test_preview_of_other_files(migrated_db_url: str, tmp_path: Path) -> None:
    async with upload_server(migrated_db_url, tmp_path) as (server, base):
        async with clients(await login(server)) as (alice,):
            url = await upload(alice, "notes.txt", b"notes", "text/plain")
            answer = await preview(alice, url)
            assert answer.find(f"{{{NS_THUMBS}}}thumbnail") is None
            assert answer.findtext(f"{{{NS_FILE}}}file/{{{NS_FILE}}}name") == "notes.txt"
            assert (await fetch(url + "?thumb=1"))[0] == 404
            for other in (base + "/upload/nope/notes.txt", "https://example.org/x"):
                with pytest.raises(IqError) as info:
                    await preview(alice, other)
                assert info.value.iq["error"]["condition"] == "item-not-found"


async def age(server: Server, days: int) -> None:
    async with server.host.storage.sessions.begin() as session:
        await session.execute(
            update(UploadedFile).values(created_at=datetime.now(UTC) - timedelta(days=days))
        )


async def test_purge(migrated_db_url: str, tmp_path: Path) -> None:
    async with upload_server(migrated_db_url, tmp_path, expire_days=30) as (server, base):
        async with clients(await login(server)) as (alice,):
            old = await upload(alice, "old.png", png(300, 300), "image/png")
            unused = await slot(alice, "unused.txt", 5, "text/plain")
            await age(server, 40)
            new = await upload(alice, "new.txt", b"fresh", "text/plain")
        root = tmp_path / "data" / "uploads"
        files = sorted(p.name for p in root.rglob("*") if p.is_file())
        assert len(files) == 3  # old, its thumbnail, new
        assert await module(server).purge_expired() == 2  # old and the unused slot
        assert (await fetch(old))[0] == 404
        assert (await fetch(old + "?thumb=1"))[0] == 404
        assert (await fetch(new))[2] == b"fresh"
        assert unused[1] != new
        remaining = await server.host.storage.uploads.list(f"alice@{DOMAIN}")
        assert [u.filename for u in remaining] == ["new.txt"]
        assert len([p for p in root.rglob("*") if p.is_file()]) == 1

        # natterctl uploads purge, with the same configuration.
        config = tmp_path / "natterd.toml"
        config.write_text(
            f'[server]\ndomain = "{DOMAIN}"\ndata_dir = "{tmp_path / "data"}"\n'
            f'[storage]\nurl = "{migrated_db_url}"\n'
        )
        argv = ["--config", str(config), "uploads", "purge", "--older-than", "1"]
        assert await asyncio.to_thread(ctl_main, argv) == 0
        assert len(await server.host.storage.uploads.list(f"alice@{DOMAIN}")) == 1
        await age(server, 2)
        assert await asyncio.to_thread(ctl_main, argv) == 0
        assert await server.host.storage.uploads.list(f"alice@{DOMAIN}") == []
        assert [p for p in root.rglob("*") if p.is_file()] == []
        assert base


# -------------------------------------------------------------------------------- S3


def answers(process: subprocess.Popen[bytes], port: int) -> bool:
    """Whether ``process`` came up on ``port`` (False: it exited, e.g. the port was taken)."""
    for _ in range(100):
        if process.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            time.sleep(0.2)  # whoever answered, moto is it only if it is still running
            return process.poll() is None
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    binary = shutil.which("moto_server") or str(Path(__file__).parents[2] / ".venv/bin/moto_server")
    if not Path(binary).exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    for _attempt in range(5):  # a new port if the one picked was taken before moto bound it
        port = free_tcp_port()
        process = subprocess.Popen(
            [binary, "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            if answers(process, port):
                yield f"http://127.0.0.1:{port}"
                return
        finally:
            process.terminate()
            process.wait(10)
    pytest.skip("moto_server did not start")


async def test_s3_backend(migrated_db_url: str, tmp_path: Path, moto_server: str) -> None:
    options = {
        "storage": "s3",
        "endpoint_url": moto_server,
        "bucket": f"natter-{tmp_path.name.lower().replace('_', '-')[:40]}",
        "access_key": "testing",
        "secret_key": "testing",
        "region": "us-east-1",
        "expire_days": 1,
    }
    blobs = S3Blobs(moto_server, options["bucket"], "testing", "testing")
    await blobs.create_bucket()
    data = png(512, 256)
    async with upload_server(migrated_db_url, tmp_path, **options) as (server, _):
        async with clients(await login(server)) as (alice,):
            url = await upload(alice, "picture.png", data, "image/png")
            answer = await preview(alice, url)
        thumb = answer.find(f"{{{NS_THUMBS}}}thumbnail")
        assert thumb is not None and (thumb.get("width"), thumb.get("height")) == ("256", "128")
        status, headers, body = await fetch(url)
        assert status == 200 and body == data and headers["Content-Type"] == "image/png"
        status, _, body = await fetch(url, Range="bytes=8-15")
        assert status == 206 and body == data[8:16]
        assert (await fetch(url + "?thumb=1"))[0] == 200
        (stored,) = await server.host.storage.uploads.list(f"alice@{DOMAIN}")
        assert await blobs.get(stored.path) == data
        assert await blobs.size(stored.path) == len(data)
        assert stored.thumbnail is not None and await blobs.exists(stored.thumbnail)
        assert not (tmp_path / "data" / "uploads").exists() or not [
            p for p in (tmp_path / "data" / "uploads").rglob("*") if p.is_file()
        ]
        await age(server, 2)
        assert await module(server).purge_expired() == 1
        assert not await blobs.exists(stored.path)
        assert not await blobs.exists(stored.thumbnail)
        assert (await fetch(url))[0] == 404
    await blobs.close()


async def test_https_port(migrated_db_url: str, tmp_path: Path) -> None:
    """tls_port serves with the [tls] certificate; public_url defaults to https://domain:tls_port."""

    def start(port: int) -> contextlib.AbstractAsyncContextManager[Server]:
        http = {"enabled": True, "host": "127.0.0.1", "port": 0, "tls_port": port}
        return running_server(migrated_db_url, tmp_path, {"http": http})

    async with on_free_port(start) as server:
        tls_port = server.host.config.http.tls_port
        assert module(server).base_url == f"https://{DOMAIN}:{tls_port}"
        context = ssl.create_default_context(cafile=str(server.host.config.cert_path))
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://localhost:{tls_port}/health", ssl=context) as response,
        ):
            assert response.status == 200
            assert (await response.json())["status"] == "ok"
