"""XEP-0363 HTTP File Upload, with thumbnails and file metadata for previews.

A client asks the server's JID for a slot (``<request xmlns='urn:xmpp:http:upload:0'
filename size content-type/>``) and gets two URLs on the HTTP server (``[http]``):

* PUT ``<public_url>/upload/<slot>/<filename>?expires=<unix time>&sig=<HMAC>``: the signature
  (HMAC-SHA256 with the module's secret) covers the slot, filename, size, content type and
  expiry, so the URL is good for that one file, for ``slot_ttl`` seconds. A wrong signature,
  an expired URL or another Content-Type is 403; a Content-Length other than the announced
  size is 413.
* GET ``<public_url>/upload/<slot>/<filename>``: the slot is 192 random bits, so the URL is the
  capability (as everywhere with XEP-0363). ``?thumb=1`` gives the thumbnail.

When the PUT completes, the file's SHA-256 is known and images and videos get a thumbnail
(``xmpp_server/thumbnails.py``). Since the slot answer comes before the upload, previews are
asked for afterwards with ``<thumbnail xmlns='urn:natter:upload-thumbnail:0' url='GET URL'/>``,
answered with an XEP-0264 thumbnail and XEP-0385 (SIMS) file metadata a sender can copy into
its message (docs/architecture.md, "File uploads").
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import hashlib
import hmac
import logging
import os
import secrets
import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, unquote, urlsplit

from aiohttp import web
from aiohttp.http_exceptions import PayloadEncodingError
from sqlalchemy.exc import SQLAlchemyError

from xmpp_server.blobs import BlobError, BlobNotFound, BlobStore, FsBlobs, S3Blobs
from xmpp_server.config import Config, ConfigError
from xmpp_server.decode_budget import DecodeBudget, OverBudget
from xmpp_server.errors import (
    BadRequest,
    Forbidden,
    ItemNotFound,
    NotAcceptable,
    ResourceConstraint,
)
from xmpp_server.jid import JID
from xmpp_server.modules.base import Module
from xmpp_server.router import IqKey, Session
from xmpp_server.stanza import iq_result, qn
from xmpp_server.storage.uploads import Completion, Upload
from xmpp_server.thumbnails import Preview, probe, render
from xmpp_server.xml import Element

if TYPE_CHECKING:
    from xmpp_server.server import Host
    from xmpp_server.storage import Storage

log = logging.getLogger("natterd.upload")

NS_UPLOAD = "urn:xmpp:http:upload:0"
NS_PREVIEW = "urn:natter:upload-thumbnail:0"
NS_THUMBS = "urn:xmpp:thumbs:1"
NS_FILE = "urn:xmpp:jingle:apps:file-transfer:5"
NS_HASHES = "urn:xmpp:hashes:2"
NS_DATA = "jabber:x:data"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"

PREFIX = "/upload"
SECRET_FILE = "upload.secret"
PURGE_INTERVAL = 3600.0
WRITE_BATCH = 1 << 20  # bytes of a PUT body gathered before one write to the staging file

DEFAULT_TYPES = (
    "image/*",
    "video/*",
    "audio/*",
    "text/plain",
    "application/pdf",
    "application/octet-stream",
    "application/zip",
    "application/vnd.openxmlformats-officedocument.*",
    "application/vnd.oasis.opendocument.*",
)
# Shown in the browser; everything else (SVG and HTML included) is served as an attachment.
INLINE = ("image/png", "image/jpeg", "image/gif", "image/webp", "image/avif", "audio/*", "video/*")


@dataclass(frozen=True)
class UploadOptions:
    max_file_size: int = field(default=100 * 1024 * 1024, metadata={"min": 1})
    """Largest file accepted, in bytes (advertised in disco#info)."""
    quota_per_user: int = field(default=1024 * 1024 * 1024, metadata={"min": 0})
    """Bytes one account may keep stored; 0 = unlimited."""
    slot_ttl: int = field(default=300, metadata={"min": 10})
    """Seconds a PUT URL stays valid."""
    expire_days: int = field(default=365, metadata={"min": 0})
    """Files older than this are purged every hour; 0 = kept forever."""
    allowed_types: tuple[str, ...] = field(default=DEFAULT_TYPES, metadata={"scalar": True})
    """Content types accepted (shell patterns like ``image/*``); empty = any."""
    thumbnails: bool = True
    thumbnail_jobs: int = field(default=2, metadata={"min": 1, "max": 64})
    """Thumbnails decoded at once (each in a worker thread); more wait their turn."""
    thumbnail_memory: int = field(default=128 * 1024 * 1024, metadata={"min": 1024 * 1024})
    """Bytes all thumbnail decodes in flight may hold, estimated from headers before decoding;
    a file that alone needs more gets no thumbnail (docs/media-limits.md)."""
    secret: str = ""
    """HMAC key that signs PUT URLs; "" = generated into ``{data_dir}/upload.secret``."""
    storage: Literal["fs", "s3"] = "fs"
    path: str = ""
    """fs: the directory; "" = ``{data_dir}/uploads``, relative = under data_dir."""
    endpoint_url: str = ""
    bucket: str = ""
    access_key: str = ""
    secret_key: str = ""
    region: str = "us-east-1"

    def __post_init__(self) -> None:
        if self.storage == "s3":
            for name in ("endpoint_url", "bucket", "access_key", "secret_key"):
                if not getattr(self, name):
                    raise ConfigError('must be set when storage = "s3"', f"modules.upload.{name}")
            if not self.endpoint_url.startswith(("http://", "https://")):
                raise ConfigError("expected an http(s) URL", "modules.upload.endpoint_url")


class UploadAborted(Exception):
    """The client closed the connection in the middle of a PUT body."""

    def __init__(self, received: int) -> None:
        super().__init__(f"aborted after {received} bytes")
        self.received = received


def upload_dir(config: Config, options: UploadOptions) -> Path:
    return config.data_dir / (options.path or "uploads")


def open_blobs(config: Config, options: UploadOptions) -> BlobStore:
    """The blob store the options name (also for ``natterctl uploads purge``)."""
    if options.storage == "s3":
        return S3Blobs(
            options.endpoint_url,
            options.bucket,
            options.access_key,
            options.secret_key,
            options.region,
        )
    return FsBlobs(upload_dir(config, options))


def load_secret(config: Config, options: UploadOptions) -> bytes:
    """The configured secret, or one generated on first use (atomically: every process that
    reads it afterwards gets the same)."""
    if options.secret:
        return options.secret.encode()
    path = config.data_dir / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as file:
                file.write(secrets.token_urlsafe(32) + "\n")
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip().encode()


async def purge(
    storage: Storage, blobs: BlobStore, older_than: datetime | None, slot_ttl: int
) -> int:
    """Delete files created before ``older_than`` (None: none) and slots never used; returns
    how many rows went. Blobs go first: a failure leaves the row to try again later."""
    stale = datetime.now(UTC) - timedelta(seconds=slot_ttl + 60)
    total = 0
    while True:
        batch = await storage.uploads.expired(older_than, stale, limit=500)
        if not batch:
            return total
        for upload in batch:
            for key in (upload.path, upload.thumbnail):
                if key:
                    await blobs.delete(key)
        total += await storage.uploads.delete([u.slot for u in batch])


def download_url(base_url: str, slot: str, filename: str) -> str:
    """The GET URL of a file (``base_url``: ``[http] public_url`` or what it defaults to)."""
    return f"{base_url}{PREFIX}/{slot}/{quote(filename, safe='')}"


def slot_of_url(base_url: str, url: str) -> tuple[str, str] | None:
    """(slot, filename) of one of our GET URLs, None for any other URL."""
    base = urlsplit(base_url + PREFIX + "/")
    parts = urlsplit(url)
    if (parts.scheme, parts.netloc) != (base.scheme, base.netloc) or parts.query:
        return None
    if not parts.path.startswith(base.path):
        return None
    slot, slash, name = parts.path[len(base.path) :].partition("/")
    if not slash or not slot or "/" in name:
        return None
    return slot, unquote(name)


def clean_filename(raw: str | None) -> str:
    """The last path segment, NFC, without control characters, at most 200 characters."""
    if not raw:
        raise BadRequest("a filename is required")
    name = unicodedata.normalize("NFC", raw.replace("\\", "/").rsplit("/", 1)[-1])
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip()
    if name in ("", ".", ".."):
        raise BadRequest("invalid filename")
    if len(name) > 200:
        stem, dot, ext = name.rpartition(".")
        name = (stem[: 200 - len(ext) - 1] + dot + ext) if dot and len(ext) < 20 else name[:200]
    return name


def media_type(raw: str | None) -> str:
    """``type/subtype`` in lower case, parameters dropped; octet-stream when absent."""
    value = (raw or "").split(";", 1)[0].strip().lower()
    return value or "application/octet-stream"


def _matches(value: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, p.lower()) for p in patterns)


def _text(tag: str, value: object) -> Element:
    el = Element(qn(NS_FILE, tag))
    el.text = str(value)
    return el


class HttpUpload(Module):
    name = "upload"
    options_class = UploadOptions
    features = (NS_UPLOAD, NS_PREVIEW)
    options: UploadOptions

    def __init__(self, host: Host, options: Any) -> None:
        super().__init__(host, options)
        self.active = host.config.http.enabled
        if not self.active:
            setattr(self, "features", ())  # noqa: B010 - nothing to offer without HTTP
        self.base_url = host.config.http_public_url
        self.staging = upload_dir(host.config, options) / ".incoming"
        self._blobs: BlobStore | None = None
        self._secret: bytes | None = None
        self._purger: asyncio.Task[None] | None = None
        self.decode_budget = DecodeBudget(options.thumbnail_memory, options.thumbnail_jobs)

    @property
    def blobs(self) -> BlobStore:
        if self._blobs is None:
            self._blobs = open_blobs(self.host.config, self.options)
        return self._blobs

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            self._secret = load_secret(self.host.config, self.options)
        return self._secret

    def setup(self) -> None:
        if not self.active:
            log.warning("modules.upload is enabled but [http] is not: no file uploads")
            return
        router = self.host.router
        router.add_iq(IqKey("get", "host", NS_UPLOAD, "request"), self.on_request)
        router.add_iq(IqKey("get", "host", NS_PREVIEW, "thumbnail"), self.on_thumbnail)

    async def start(self) -> None:
        if self.active:
            self.staging.mkdir(parents=True, exist_ok=True)
            self._purger = asyncio.create_task(self._purge_forever(), name="upload-expiry")

    async def stop(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
            self._purger = None
        if self._blobs is not None:
            await self._blobs.close()

    async def _purge_forever(self) -> None:
        while True:
            try:
                await self.purge_expired()
            except (SQLAlchemyError, BlobError, OSError):
                log.exception("upload expiry failed; trying again later")
            await asyncio.sleep(PURGE_INTERVAL)

    async def purge_expired(self) -> int:
        days = self.options.expire_days
        cutoff = datetime.now(UTC) - timedelta(days=days) if days else None
        purged = await purge(self.host.storage, self.blobs, cutoff, self.options.slot_ttl)
        if purged:
            log.info("purged %d uploads", purged)
        return purged

    # -- disco ------------------------------------------------------------------------

    def disco_info(self) -> list[Element]:
        """XEP-0363 §2: the store/file identity and the max-file-size form (XEP-0128)."""
        if not self.active:
            return []
        identity = Element(
            qn(NS_DISCO_INFO, "identity"),
            {"category": "store", "type": "file", "name": "HTTP File Upload"},
        )
        form = Element(qn(NS_DATA, "x"), {"type": "result"})
        for var, value in (("FORM_TYPE", NS_UPLOAD), ("max-file-size", self.options.max_file_size)):
            fld = Element(qn(NS_DATA, "field"), {"var": var})
            if var == "FORM_TYPE":
                fld.set("type", "hidden")
            val = Element(qn(NS_DATA, "value"))
            val.text = str(value)
            fld.append(val)
            form.append(fld)
        return [identity, form]

    # -- slots ------------------------------------------------------------------------

    def _requester(self, iq: Element) -> str:
        requester = JID.parse(iq.get("from", ""))
        if requester.domain != self.host.domain or not requester.local:
            raise Forbidden("uploads are for this server's users")
        return str(requester.bare)

    def sign(self, slot: str, filename: str, size: int, content_type: str, expires: int) -> str:
        message = "\n".join([slot, filename, str(size), content_type, str(expires)])
        return hmac.new(self.secret, message.encode(), hashlib.sha256).hexdigest()

    def get_url(self, slot: str, filename: str) -> str:
        return download_url(self.base_url, slot, filename)

    async def on_request(self, origin: Session | None, iq: Element) -> None:
        owner = self._requester(iq)
        request = iq.find(qn(NS_UPLOAD, "request"))
        assert request is not None
        filename = clean_filename(request.get("filename"))
        try:
            size = int(request.get("size", ""))
        except ValueError:
            raise BadRequest("size must be a number of bytes") from None
        if size <= 0:
            raise BadRequest("size must be positive")
        content_type = media_type(request.get("content-type"))
        limit = self.options.max_file_size
        if size > limit:
            too_large = Element(qn(NS_UPLOAD, "file-too-large"))
            maximum = Element(qn(NS_UPLOAD, "max-file-size"))
            maximum.text = str(limit)
            too_large.append(maximum)
            raise NotAcceptable(
                f"File too large. The maximum file size is {limit} bytes", extra=[too_large]
            )
        allowed = self.options.allowed_types
        if allowed and not _matches(content_type, allowed):
            raise NotAcceptable(f"files of type {content_type} are not accepted")
        quota = self.options.quota_per_user
        if quota:
            since = datetime.now(UTC) - timedelta(seconds=self.options.slot_ttl)
            used = await self.host.storage.uploads.usage(owner, since)
            if used + size > quota:
                raise ResourceConstraint(
                    f"Quota reached: {used} of {quota} bytes used; delete older files first"
                )
        slot = secrets.token_urlsafe(24)
        await self.host.storage.uploads.create(
            owner, slot, filename, size, content_type, f"{slot[:2]}/{slot}"
        )
        expires = int(time.time()) + self.options.slot_ttl
        get = self.get_url(slot, filename)
        sig = self.sign(slot, filename, size, content_type, expires)
        answer = Element(qn(NS_UPLOAD, "slot"))
        answer.append(Element(qn(NS_UPLOAD, "put"), {"url": f"{get}?expires={expires}&sig={sig}"}))
        answer.append(Element(qn(NS_UPLOAD, "get"), {"url": get}))
        if origin is not None:
            origin.deliver(iq_result(iq, answer))

    # -- previews ---------------------------------------------------------------------

    def slot_of(self, url: str) -> tuple[str, str] | None:
        """(slot, filename) of one of our GET URLs, None for any other URL."""
        return slot_of_url(self.base_url, url)

    async def on_thumbnail(self, origin: Session | None, iq: Element) -> None:
        self._requester(iq)
        request = iq.find(qn(NS_PREVIEW, "thumbnail"))
        assert request is not None
        url = request.get("url", "")
        found = self.slot_of(url)
        upload = await self.host.storage.uploads.get(found[0]) if found else None
        if upload is None or found is None or upload.filename != found[1]:
            raise ItemNotFound("no such upload")
        if upload.completed_at is None:
            raise ItemNotFound("the file has not been uploaded yet")
        answer = Element(qn(NS_PREVIEW, "thumbnail"), {"url": url})
        thumb: Element | None = None
        if upload.thumbnail and upload.thumbnail_type:
            thumb = Element(
                qn(NS_THUMBS, "thumbnail"),
                {
                    "uri": f"{self.get_url(upload.slot, upload.filename)}?thumb=1",
                    "media-type": upload.thumbnail_type,
                    "width": str(upload.thumbnail_width),
                    "height": str(upload.thumbnail_height),
                },
            )
            answer.append(thumb)
        answer.append(self.file_element(upload, thumb))
        if origin is not None:
            origin.deliver(iq_result(iq, answer))

    def file_element(self, upload: Upload, thumb: Element | None) -> Element:
        """XEP-0385 (SIMS) style metadata: Jingle file-transfer:5 ``<file/>``, plus the
        original's ``<width/>``/``<height/>`` as XEP-0446 names them."""
        file = Element(qn(NS_FILE, "file"))
        file.append(_text("media-type", upload.content_type))
        file.append(_text("name", upload.filename))
        file.append(_text("size", upload.size))
        if upload.completed_at is not None:
            file.append(_text("date", upload.completed_at.strftime("%Y-%m-%dT%H:%M:%SZ")))
        if upload.sha256:
            digest = Element(qn(NS_HASHES, "hash"), {"algo": "sha-256"})
            digest.text = base64.b64encode(bytes.fromhex(upload.sha256)).decode()
            file.append(digest)
        if upload.width and upload.height:
            file.append(_text("width", upload.width))
            file.append(_text("height", upload.height))
        if thumb is not None:
            file.append(Element(thumb.tag, dict(thumb.attrib)))
        return file

    # -- HTTP -------------------------------------------------------------------------

    def http_routes(self) -> list[web.AbstractRouteDef]:
        if not self.active:
            return []
        path = PREFIX + "/{slot}/{name}"
        return [
            web.put(path, self.http_put),
            web.get(path, self.http_get),  # HEAD too
            web.options(path, self.http_options),
        ]

    @staticmethod
    def _cors(headers: Any) -> None:
        headers["Access-Control-Allow-Origin"] = "*"
        headers["Access-Control-Allow-Methods"] = "GET, HEAD, PUT, OPTIONS"
        headers["Access-Control-Allow-Headers"] = "Content-Type, Range"
        headers["Access-Control-Expose-Headers"] = "Content-Length, Content-Range, ETag"

    def _error(self, status: type[web.HTTPException], reason: str) -> web.HTTPException:
        exc = status(text=reason + "\n")
        self._cors(exc.headers)
        return exc

    def _too_large(self, size: int, actual: int, reason: str) -> web.HTTPException:
        exc = web.HTTPRequestEntityTooLarge(max_size=size, actual_size=actual, text=reason + "\n")
        self._cors(exc.headers)
        return exc

    async def http_options(self, request: web.Request) -> web.Response:
        response = web.Response(status=204)
        self._cors(response.headers)
        response.headers["Access-Control-Max-Age"] = "86400"
        return response

    async def http_put(self, request: web.Request) -> web.Response:
        slot, name = request.match_info["slot"], request.match_info["name"]
        upload = await self.host.storage.uploads.get(slot)
        try:
            expires = int(request.query.get("expires", ""))
        except ValueError:
            expires = 0
        given = request.query.get("sig", "")
        if upload is None or upload.filename != name:
            raise self._error(web.HTTPForbidden, "unknown upload slot")
        expected = self.sign(slot, name, upload.size, upload.content_type, expires)
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise self._error(web.HTTPForbidden, "bad signature")
        if expires < time.time():
            raise self._error(web.HTTPForbidden, "this upload URL has expired")
        if upload.completed_at is not None:
            raise self._error(web.HTTPConflict, "already uploaded")
        sent_type = request.headers.get("Content-Type")
        if sent_type is not None and media_type(sent_type) != upload.content_type:
            raise self._error(
                web.HTTPForbidden, f"Content-Type must be {upload.content_type} as requested"
            )
        if request.content_length is None:
            raise self._error(web.HTTPLengthRequired, "Content-Length required")
        if request.content_length != upload.size:
            raise self._too_large(
                upload.size,
                request.content_length,
                f"Content-Length must be {upload.size} as requested",
            )
        staged = self.staging / f"{slot}.{secrets.token_hex(4)}"
        try:
            digest = await self._receive(request, staged, upload.size)
            done = await self._store(upload, staged, digest)
        except UploadAborted as exc:
            # The client went away (a phone losing its network): routine, not a server error.
            log.info(
                "%s aborted upload %s after %d of %d bytes",
                upload.owner,
                slot,
                exc.received,
                upload.size,
            )
            raise self._error(web.HTTPBadRequest, "the upload was aborted") from None
        finally:
            staged.unlink(missing_ok=True)
        if not await self.host.storage.uploads.complete(slot, done):
            raise self._error(web.HTTPConflict, "already uploaded")
        log.info("%s uploaded %d bytes (%s)", upload.owner, upload.size, upload.content_type)
        response = web.Response(status=201, text="created\n")
        self._cors(response.headers)
        return response

    async def _receive(self, request: web.Request, staged: Path, size: int) -> str:
        """Write the body to ``staged``; returns its SHA-256 (hex). Raises
        :class:`UploadAborted` when the connection is lost before the body is complete."""
        digest = hashlib.sha256()
        received = 0
        fh = await asyncio.to_thread(staged.open, "wb")
        try:
            pending: list[bytes] = []
            pending_size = 0
            while True:
                try:
                    chunk = await request.content.readany()
                except (ConnectionError, PayloadEncodingError):
                    raise UploadAborted(received) from None
                if not chunk:
                    break
                received += len(chunk)
                if received > size:
                    raise self._too_large(size, received, "more data than announced")
                digest.update(chunk)
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= WRITE_BATCH:
                    await asyncio.to_thread(fh.write, b"".join(pending))
                    pending, pending_size = [], 0
            if pending:
                await asyncio.to_thread(fh.write, b"".join(pending))
        finally:
            await asyncio.to_thread(fh.close)
        if received != size:
            raise self._error(web.HTTPBadRequest, "the upload was cut short")
        return digest.hexdigest()

    async def _store(self, upload: Upload, staged: Path, sha256: str) -> Completion:
        """Make the preview, then move the file and its thumbnail into the blob store."""
        done = Completion(sha256=sha256)
        kind = upload.content_type.split("/", 1)[0]
        if self.options.thumbnails and kind in ("image", "video"):
            preview = await self._preview(staged, upload.content_type)
            if preview is not None:
                done = Completion(sha256, preview.width, preview.height)
                if preview.thumbnail is not None and preview.media_type is not None:
                    key = f"{upload.path}.thumb"
                    try:
                        await self.blobs.put(key, preview.thumbnail, preview.media_type)
                    except BlobError:
                        log.exception("cannot store the thumbnail of %s", upload.slot)
                    else:
                        done = Completion(
                            sha256,
                            preview.width,
                            preview.height,
                            key,
                            preview.media_type,
                            preview.thumbnail_width,
                            preview.thumbnail_height,
                        )
        try:
            await self.blobs.put_file(upload.path, staged, upload.content_type, sha256)
        except BlobError as exc:
            log.error("cannot store upload %s: %s", upload.slot, exc)
            raise self._error(web.HTTPServiceUnavailable, "storage unavailable") from None
        return done

    async def _preview(self, staged: Path, content_type: str) -> Preview | None:
        """Probe the headers, then decode within the budget; None or the bare dimensions for
        what is refused or undecodable (the upload itself stays valid)."""
        try:  # a job slot but no bytes: opening a file decodes no pixels, but it is work
            probed = await self.decode_budget.run(0, probe, staged, content_type)
        except Exception as exc:  # noqa: BLE001 - parsers raise anything on hostile input
            log.info("no preview of %s (%s): %s", staged.name, content_type, exc)
            return None
        if probed is None:
            return None
        try:
            return await self.decode_budget.run(probed.cost, render, staged, content_type, probed)
        except OverBudget as exc:
            log.info(
                "no thumbnail of %s (%s, %d×%d): %s",
                staged.name,
                content_type,
                probed.width,
                probed.height,
                exc,
            )
        except Exception as exc:  # noqa: BLE001 - decoders raise anything on hostile input
            log.info("no preview of %s (%s): %s", staged.name, content_type, exc)
        return probed.dimensions

    async def http_get(self, request: web.Request) -> web.StreamResponse:
        slot, name = request.match_info["slot"], request.match_info["name"]
        upload = await self.host.storage.uploads.get(slot)
        if upload is None or upload.filename != name or upload.completed_at is None:
            raise self._error(web.HTTPNotFound, "no such file")
        thumb = request.query.get("thumb") in ("1", "true")
        if thumb:
            if not upload.thumbnail or not upload.thumbnail_type:
                raise self._error(web.HTTPNotFound, "no thumbnail")
            key, content_type, etag = upload.thumbnail, upload.thumbnail_type, f"{upload.sha256}-t"
            size = await self.blobs.size(key)
            if size is None:
                raise self._error(web.HTTPNotFound, "no thumbnail")
        else:
            key, content_type, etag = upload.path, upload.content_type, str(upload.sha256)
            size = upload.size
        headers: dict[str, str] = {
            "Content-Type": content_type,
            "Cache-Control": "public, max-age=31536000, immutable",
            "ETag": f'"{etag}"',
            "Last-Modified": format_datetime(upload.completed_at, usegmt=True),
            "Accept-Ranges": "bytes",
            "Content-Security-Policy": "default-src 'none'; sandbox",
        }
        if not thumb:
            disposition = "inline" if _matches(content_type, INLINE) else "attachment"
            ascii_name = name.encode("ascii", "replace").decode().replace('"', "_")
            headers["Content-Disposition"] = (
                f"{disposition}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name)}"
            )
        if request.headers.get("If-None-Match") == f'"{etag}"':
            not_modified = web.Response(status=304, headers=headers)
            self._cors(not_modified.headers)
            return not_modified
        start, end, status = 0, size, 200
        if "Range" in request.headers:
            try:
                wanted = request.http_range
            except ValueError:
                wanted = None  # several ranges, or unparsable: the whole file
            if wanted is not None and (wanted.start is not None or wanted.stop is not None):
                first, last, _ = wanted.indices(size)
                if first >= last:
                    exc = self._error(web.HTTPRequestRangeNotSatisfiable, "range not satisfiable")
                    exc.headers["Content-Range"] = f"bytes */{size}"
                    raise exc
                start, end, status = first, last, 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        response = web.StreamResponse(status=status, headers=headers)
        self._cors(response.headers)
        response.content_length = end - start
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        try:
            async for chunk in self.blobs.stream(key, start, end):
                await response.write(chunk)
        except BlobNotFound:
            log.error("upload %s is missing from the blob store", slot)
            raise
        except BlobError as exc:
            log.error("cannot read upload %s: %s", slot, exc)
            raise
        await response.write_eof()
        return response
