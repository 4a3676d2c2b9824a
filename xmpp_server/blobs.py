"""Blob storage for uploaded files and their thumbnails: a directory, or an S3 bucket.

One small interface (:class:`BlobStore`) with two backends. Keys are relative paths made of
``[A-Za-z0-9_.-]`` segments (never ``..``), chosen by the server, never by a client.

The S3 backend speaks the S3 REST API over aiohttp and signs requests with AWS Signature
Version 4 itself (path-style URLs, so any S3-compatible server works: AWS, MinIO, Garage,
Ceph RGW, moto).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
import shutil
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import aiohttp
from yarl import URL

CHUNK = 256 * 1024
_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*")


class BlobError(Exception):
    """The backend failed (I/O error, S3 error response)."""


class BlobNotFound(BlobError):
    pass


def check_key(key: str) -> str:
    if not _KEY.fullmatch(key) or len(key) > 512:
        raise ValueError(f"invalid blob key {key!r}")
    return key


class BlobStore(ABC):
    """Where uploaded bytes live. Every method is safe to call from the event loop."""

    @abstractmethod
    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store ``data`` under ``key``, replacing what was there."""

    @abstractmethod
    async def put_file(self, key: str, path: Path, content_type: str, sha256: str) -> None:
        """Store a local file (``sha256``: its hex digest) and consume it: afterwards ``path``
        no longer exists, whether the call succeeded or not."""

    @abstractmethod
    def stream(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The bytes ``[start, end)`` of a blob (to its end when ``end`` is None), in chunks.
        Raises BlobNotFound (when iterated) if there is no such blob."""

    async def get(self, key: str) -> bytes:
        return b"".join([chunk async for chunk in self.stream(key)])

    @abstractmethod
    async def delete(self, key: str) -> bool:
        """Delete a blob; True if it existed (S3 cannot tell, and says True)."""

    @abstractmethod
    async def size(self, key: str) -> int | None:
        """The blob's size in bytes, None if there is no such blob."""

    async def exists(self, key: str) -> bool:
        return await self.size(key) is not None

    async def close(self) -> None:  # noqa: B027 - most backends hold nothing
        """Release connections."""


# ---------------------------------------------------------------------------------------------
# Local directory


class FsBlobs(BlobStore):
    """Files under ``root``; writes go to a temporary file first, then are renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _place(self, source: Path, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, dest)
        except OSError:
            # Another file system: copy next to the destination, then rename atomically.
            tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}")
            try:
                shutil.copyfile(source, tmp)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
                source.unlink(missing_ok=True)

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        dest = self._path(key)

        def write() -> None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)

        await asyncio.to_thread(write)

    async def put_file(self, key: str, path: Path, content_type: str, sha256: str) -> None:
        dest = self._path(key)
        try:
            await asyncio.to_thread(self._place, path, dest)
        finally:
            path.unlink(missing_ok=True)

    async def stream(
        self, key: str, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            fh = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        try:
            await asyncio.to_thread(fh.seek, start)
            left = None if end is None else end - start
            while left is None or left > 0:
                want = CHUNK if left is None else min(CHUNK, left)
                chunk = await asyncio.to_thread(fh.read, want)
                if not chunk:
                    break
                if left is not None:
                    left -= len(chunk)
                yield chunk
        finally:
            fh.close()

    async def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            await asyncio.to_thread(path.unlink)
        except FileNotFoundError:
            return False
        return True

    async def size(self, key: str) -> int | None:
        try:
            return (await asyncio.to_thread(self._path(key).stat)).st_size
        except FileNotFoundError:
            return None


# ---------------------------------------------------------------------------------------------
# S3 and compatible servers

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sigv4_headers(
    method: str,
    url: URL,
    *,
    region: str,
    access_key: str,
    secret_key: str,
    payload_sha256: str,
    headers: dict[str, str] | None = None,
    now: datetime | None = None,
    service: str = "s3",
) -> dict[str, str]:
    """The headers that sign a request with AWS Signature Version 4 (header-based).

    ``url`` must be already percent-encoded (``URL(..., encoded=True)``): its path is the
    canonical URI as sent. Returns ``headers`` plus host, x-amz-date, x-amz-content-sha256
    and Authorization; every header passed in is signed.
    """
    now = now or datetime.now(UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    host = url.raw_host or ""
    if url.port is not None and not url.is_default_port():
        host = f"{host}:{url.port}"
    signed = {k.lower(): " ".join(v.split()) for k, v in (headers or {}).items()}
    signed.update({"host": host, "x-amz-date": amz_date, "x-amz-content-sha256": payload_sha256})
    names = sorted(signed)
    query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(url.query.items())
    )
    canonical = "\n".join(
        [
            method,
            url.raw_path or "/",
            query,
            "".join(f"{n}:{signed[n]}\n" for n in names),
            ";".join(names),
            payload_sha256,
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = _hmac(("AWS4" + secret_key).encode(), day)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    result = dict(headers or {})
    result.update(
        {
            "Host": host,
            "x-amz-date": amz_date,
            "x-amz-content-sha256": payload_sha256,
            "Authorization": f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}",
        }
    )
    return result


class S3Blobs(BlobStore):
    """Objects in one bucket, path-style: ``<endpoint_url>/<bucket>/<key>``."""

    def __init__(
        self,
        endpoint_url: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        timeout: float = 300.0,
    ) -> None:
        self.endpoint = endpoint_url.rstrip("/")
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=10)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout, auto_decompress=False)
        return self._session

    def _url(self, key: str | None) -> URL:
        path = f"/{quote(self.bucket, safe='')}"
        if key is not None:
            path += "/" + quote(check_key(key), safe="/-_.~")
        return URL(self.endpoint + path, encoded=True)

    def _sign(
        self, method: str, url: URL, payload_sha256: str, headers: dict[str, str] | None = None
    ) -> dict[str, str]:
        return sigv4_headers(
            method,
            url,
            region=self.region,
            access_key=self.access_key,
            secret_key=self.secret_key,
            payload_sha256=payload_sha256,
            headers=headers,
        )

    @staticmethod
    async def _fail(method: str, what: str, response: aiohttp.ClientResponse) -> BlobError:
        body = (await response.text(errors="replace"))[:300]
        return BlobError(f"S3 {method} {what}: HTTP {response.status}: {body}")

    async def create_bucket(self) -> None:
        """Create the bucket (for set-up and tests); an existing one of ours is fine."""
        url = self._url(None)
        headers = self._sign("PUT", url, EMPTY_SHA256)
        async with self._client().put(url, headers=headers) as response:
            if response.status >= 300 and response.status != 409:
                raise await self._fail("PUT", self.bucket, response)

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        url = self._url(key)
        headers = self._sign(
            "PUT", url, hashlib.sha256(data).hexdigest(), {"Content-Type": content_type}
        )
        try:
            async with self._client().put(url, data=data, headers=headers) as response:
                if response.status >= 300:
                    raise await self._fail("PUT", key, response)
        except aiohttp.ClientError as exc:
            raise BlobError(f"S3 PUT {key}: {exc}") from exc

    async def put_file(self, key: str, path: Path, content_type: str, sha256: str) -> None:
        url = self._url(key)
        try:
            size = path.stat().st_size
            headers = self._sign(
                "PUT",
                url,
                sha256,
                {"Content-Type": content_type, "Content-Length": str(size)},
            )
            with path.open("rb") as fh:
                async with self._client().put(url, data=fh, headers=headers) as response:
                    if response.status >= 300:
                        raise await self._fail("PUT", key, response)
        except (aiohttp.ClientError, OSError) as exc:
            raise BlobError(f"S3 PUT {key}: {exc}") from exc
        finally:
            path.unlink(missing_ok=True)

    async def stream(
        self, key: str, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        url = self._url(key)
        extra: dict[str, str] = {}
        if start or end is not None:
            extra["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        headers = self._sign("GET", url, EMPTY_SHA256, extra)
        try:
            async with self._client().get(url, headers=headers) as response:
                if response.status == 404:
                    raise BlobNotFound(key)
                if response.status >= 300:
                    raise await self._fail("GET", key, response)
                async for chunk in response.content.iter_chunked(CHUNK):
                    yield chunk
        except aiohttp.ClientError as exc:
            raise BlobError(f"S3 GET {key}: {exc}") from exc

    async def delete(self, key: str) -> bool:
        url = self._url(key)
        try:
            async with self._client().delete(
                url, headers=self._sign("DELETE", url, EMPTY_SHA256)
            ) as response:
                if response.status >= 300 and response.status != 404:
                    raise await self._fail("DELETE", key, response)
                return response.status != 404
        except aiohttp.ClientError as exc:
            raise BlobError(f"S3 DELETE {key}: {exc}") from exc

    async def size(self, key: str) -> int | None:
        url = self._url(key)
        try:
            async with self._client().head(
                url, headers=self._sign("HEAD", url, EMPTY_SHA256)
            ) as response:
                if response.status == 404:
                    return None
                if response.status >= 300:
                    raise BlobError(f"S3 HEAD {key}: HTTP {response.status}")
                length = response.headers.get("Content-Length")
                return int(length) if length is not None else None
        except aiohttp.ClientError as exc:
            raise BlobError(f"S3 HEAD {key}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
