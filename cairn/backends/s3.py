"""The ``s3:`` backend on aiobotocore, for AWS and any S3-compatible store.

Credentials and region come from botocore's usual chain: the ``AWS_*`` environment
variables, the shared ``~/.aws/credentials`` and ``~/.aws/config`` files (``profile``
picks a section), then instance metadata. botocore's own retries are switched off:
the retry wrapper decides, so a wrong key fails at once instead of after backoff.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import re
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from cairn.backends.base import (
    BackendError,
    NotFound,
    ObjectTruncated,
    PermissionDenied,
    QuotaExceeded,
    Retained,
    ServerUnavailable,
    TransientError,
    Unreachable,
    validate_name,
    validate_prefix,
)


@contextlib.contextmanager
def _hidden(*names: str) -> Iterator[None]:
    """Make ``import name`` fail inside the block (the modules come back after)."""
    saved = {name: sys.modules.get(name) for name in names}
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]  # "import name" fails
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module


# aiobotocore imports httpx when it is installed (cairn's REST backend uses it), for
# a transport we do not use, and httpx imports rich: ~70 ms of CPU, a quarter of
# this module's import, on every s3: command. It falls back to "no httpx" by itself.
with _hidden("httpx", "httpx2"):
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

# restic's default; S3 serves many parallel requests, but each holds a 16 MiB pack.
DEFAULT_CONNECTIONS = 5
# Objects above the threshold go up in parts: a failed part is retried alone, and
# parts travel in parallel. Packs (16 MiB by default) fit in one PUT.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
PART_SIZE = 16 * 1024 * 1024  # S3's minimum is 5 MiB; at most 10,000 parts
_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "403",
    "AllAccessDisabled",
    "InvalidToken",
    "ExpiredToken",
}
_MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchBucket", "NoSuchUpload"}
_TRANSIENT = {
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "500",
    "502",
    "503",
    "504",
    "Throttling",
    "RequestTimeTooSkewed",
    # The body changed on its way (Content-MD5 or the signed SHA-256 differ): resend.
    "BadDigest",
    "XAmzContentSHA256Mismatch",
}


@dataclass(frozen=True)
class S3Options:
    """Settings beyond the location; ``None`` defers to botocore's configuration."""

    endpoint: str | None = None
    region: str | None = None
    profile: str | None = None
    path_style: bool | None = None
    storage_class: str | None = None
    multipart_threshold: int = MULTIPART_THRESHOLD
    part_size: int = PART_SIZE
    connections: int = DEFAULT_CONNECTIONS
    # S3 Object Lock: "GOVERNANCE" or "COMPLIANCE" retention of every object but locks.
    object_lock: str | None = None
    retention_days: int = 0


def _translate(exc: Exception, what: str) -> BackendError:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = err.get("Message") or code or str(status)
        if code in _MISSING or status == 404:
            return NotFound(f"{what}: not found ({message})")
        if code in _DENIED or status == 403:
            return PermissionDenied(f"{what}: access denied ({code}: {message})")
        if code == "InvalidRange" or status == 416:
            return ObjectTruncated(f"{what}: requested range is past the end of the object")
        if code in ("QuotaExceeded", "EntityTooLarge"):
            return QuotaExceeded(f"{what}: {message}")
        if status in (502, 503, 504) and code != "SlowDown":
            # A gateway or load balancer whose servers are down (S3 itself says
            # SlowDown with its 503: that is an answer, and is retried as such).
            return ServerUnavailable(
                f"{what}: HTTP {status}: the server (or the gateway in front of it) is unavailable"
            )
        if code in _TRANSIENT or status >= 500 or status == 429:
            return TransientError(f"{what}: {code} {message}")
        return BackendError(f"{what}: {code} {message}")
    if isinstance(exc, NoCredentialsError):
        return PermissionDenied(
            f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or a profile in ~/.aws/credentials)"
        )
    if isinstance(exc, BotoConnectionError):  # refused, DNS, TLS, connect timeout
        return Unreachable(f"{what}: cannot connect: {exc}")
    if isinstance(exc, HTTPClientError | ReadTimeoutError | OSError):
        return TransientError(f"{what}: {exc}")
    return BackendError(f"{what}: {exc}")


async def _content_md5(data: bytes | memoryview) -> str:
    """The ``Content-MD5`` header: every S3 server checks it and refuses a body that
    changed in transit (BadDigest). Hashed in a thread (hashlib releases the GIL), so
    a 16 MiB pack does not stall the event loop for tens of milliseconds."""
    digest = await anyio.to_thread.run_sync(_md5, data)
    return base64.b64encode(digest).decode("ascii")


def _request_body(data: memoryview) -> io.BytesIO:
    """The body of a PUT: one copy of ``data``, in a buffer of its own. Given bytes,
    botocore wraps them in a BytesIO that shares them and aiohttp's ``getbuffer()``
    on it copies them all again: two copies of every 16 MiB pack, now one."""
    body = io.BytesIO()
    body.write(data)
    body.seek(0)
    return body


def _md5(data: bytes | memoryview) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


def _no_expect_continue(params: dict[str, Any], **_: Any) -> None:
    """Drop the ``Expect: 100-continue`` botocore puts on every upload.

    With it, aiohttp sends the headers and waits for the server's interim answer before
    the body: one more round trip per PUT (a pack, a lock, an index, a snapshot), which
    over a 20 ms link was a quarter of a backup's request/response exchanges. restic
    (minio-go) does not ask for it either. What it would save, not sending the body of
    an upload the server refuses (a wrong key), happens once: such errors are not
    retried.
    """
    params["headers"].pop("Expect", None)


def _refuse_if_retained(name: str, head: dict[str, Any]) -> None:
    """Raise ``Retained`` when HEAD says the object is under Object Lock: a plain
    DELETE would then only hide it behind a delete marker (the locked version stays,
    and keeps costing), which looks like success but is not one."""
    if head.get("ObjectLockLegalHoldStatus") == "ON":
        raise Retained(f"{name}: under a legal hold (S3 Object Lock)", "legal hold")
    until = head.get("ObjectLockRetainUntilDate")
    if isinstance(until, datetime) and until > datetime.now(UTC):
        mode = str(head.get("ObjectLockMode", "")).lower()
        shown = until.strftime("%Y-%m-%d %H:%M:%S UTC")
        raise Retained(f"{name}: retained until {shown} (S3 Object Lock, {mode} mode)", shown)


class S3Backend:
    """Objects under ``prefix`` in ``bucket``; the client is created on first use."""

    def __init__(self, bucket: str, prefix: str, options: S3Options | None = None) -> None:
        self._bucket = bucket
        self._prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._opts = options or S3Options()
        self._client: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._lock = anyio.Lock()
        where = f"{self._opts.endpoint.rstrip('/')}/" if self._opts.endpoint else ""
        # Never show a key someone put in the endpoint URL.
        where = re.sub(r"//[^/@]*@", "//***@", where)
        self._location = f"s3:{where}{bucket}/{self._prefix}".rstrip("/")

    @property
    def location(self) -> str:
        return self._location

    @property
    def connections(self) -> int:
        return self._opts.connections

    @property
    def atomic_replace(self) -> bool:
        return True  # a PUT (or a completed multipart upload) replaces atomically

    async def _s3(self) -> Any:
        async with self._lock:
            if self._client is None:
                o = self._opts
                # Over plain http botocore hashes every upload's body with SHA-256 for
                # the signature, on the event loop (16 MiB a pack; ~1/6 of a backup's
                # main-process CPU over the latency bench). The signed Content-MD5 we
                # send already binds the body to the signature (the server refuses a
                # body that does not match it), which is all botocore relies on over
                # https, where this setting changes nothing.
                s3conf: dict[str, Any] = {"payload_signing_enabled": False}
                if o.path_style is not None:
                    s3conf["addressing_style"] = "path" if o.path_style else "virtual"
                config = AioConfig(
                    # botocore >= 1.36 adds CRC checksums to every request and checks
                    # them on every response "when supported"; many S3-compatible
                    # servers answer a ranged GET with the whole object's checksum, or
                    # reject the streaming (aws-chunked) uploads it implies. Only where
                    # an operation requires one; PUTs carry our own Content-MD5.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    s3=s3conf,
                    retries={"total_max_attempts": 1, "mode": "standard"},
                    max_pool_connections=max(o.connections, 1) * 2,
                    connect_timeout=10,  # see rest.TIMEOUT
                    read_timeout=300,
                )
                session = get_session()
                if o.profile:
                    session.set_config_variable("profile", o.profile)
                # Plain http has no TLS to verify: don't load (parse) a CA bundle for
                # it, ~30 ms of CPU before the first request; None keeps botocore's
                # verification (AWS_CA_BUNDLE, ca_bundle) for https.
                plain = (o.endpoint or "").lower().startswith("http://")
                client = await self._stack.enter_async_context(
                    session.create_client(
                        "s3",
                        endpoint_url=o.endpoint,
                        region_name=o.region,
                        config=config,
                        verify=False if plain else None,
                    )
                )
                # After botocore's own before-call handler that adds the header.
                client.meta.events.register_last("before-call.s3", _no_expect_continue)
                self._client = client
            return self._client

    def _key(self, name: str) -> str:
        return self._prefix + validate_name(name)

    async def _call(self, what: str, method: str, **kw: Any) -> Any:
        client = await self._s3()
        try:
            return await getattr(client, method)(Bucket=self._bucket, **kw)
        except (BotoCoreError, ClientError, OSError) as exc:
            raise _translate(exc, f"{self._location}: {what}") from exc

    def _retention(self, name: str) -> dict[str, Any]:
        """Object Lock headers for a new object: everything is retained but locks,
        which must go when their holder is done. (PUTs carry Content-MD5, which
        AWS requires of a request setting retention.)"""
        if self._opts.object_lock is None or name.startswith("locks/"):
            return {}
        until = datetime.now(UTC) + timedelta(days=self._opts.retention_days)
        return {"ObjectLockMode": self._opts.object_lock, "ObjectLockRetainUntilDate": until}

    async def save(self, name: str, data: bytes | memoryview) -> None:
        body = memoryview(data).cast("B")
        extra: dict[str, Any] = self._retention(name)
        if self._opts.storage_class:
            extra["StorageClass"] = self._opts.storage_class
        if len(body) <= self._opts.multipart_threshold:
            await self._call(
                f"save {name}",
                "put_object",
                Key=self._key(name),
                Body=_request_body(body),
                ContentMD5=await _content_md5(body),
                **extra,
            )
        else:
            await self._save_multipart(name, body, extra)

    async def _save_multipart(self, name: str, body: memoryview, extra: dict[str, Any]) -> None:
        key, what = self._key(name), f"save {name}"
        upload = await self._call(what, "create_multipart_upload", Key=key, **extra)
        upload_id = upload["UploadId"]
        size = self._opts.part_size
        parts: dict[int, str] = {}

        async def send(number: int, start: int) -> None:
            part = body[start : start + size]
            reply = await self._call(
                what,
                "upload_part",
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=_request_body(part),
                ContentMD5=await _content_md5(part),
            )
            parts[number] = reply["ETag"]

        try:
            # Parts go up in parallel, bounded by a few at a time per object.
            limiter = anyio.CapacityLimiter(4)

            async def bounded(number: int, start: int) -> None:
                async with limiter:
                    await send(number, start)

            async with anyio.create_task_group() as tg:
                for number, start in enumerate(range(0, len(body), size), start=1):
                    tg.start_soon(bounded, number, start)
            listing = [{"PartNumber": n, "ETag": parts[n]} for n in sorted(parts)]
            await self._call(
                what,
                "complete_multipart_upload",
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": listing},
            )
            if "ObjectLockMode" in extra:
                # Set again on the object: not every server applies what
                # CreateMultipartUpload asked for (moto does not).
                retention = {
                    "Mode": extra["ObjectLockMode"],
                    "RetainUntilDate": extra["ObjectLockRetainUntilDate"],
                }
                await self._call(what, "put_object_retention", Key=key, Retention=retention)
        except BaseException:
            # An abandoned upload is invisible but billed; abort it.
            with anyio.CancelScope(shield=True), contextlib.suppress(BackendError):
                await self._call(what, "abort_multipart_upload", Key=key, UploadId=upload_id)
            raise

    async def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if length == 0:
            if await self.stat(name) < offset:
                raise ObjectTruncated(f"{name}: offset {offset} is past the end")
            return b""
        kw: dict[str, Any] = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            kw["Range"] = f"bytes={offset}-{end}"
        what = f"load {name}"
        reply = await self._call(what, "get_object", Key=self._key(name), **kw)
        try:
            async with reply["Body"] as stream:
                data: bytes = await stream.read()
        except (BotoCoreError, OSError) as exc:
            raise _translate(exc, f"{self._location}: {what}") from exc
        if length is not None and len(data) != length:
            raise ObjectTruncated(
                f"{name}: asked for {length} bytes at offset {offset}, got {len(data)}"
            )
        return data

    async def stat(self, name: str) -> int:
        reply = await self._call(f"stat {name}", "head_object", Key=self._key(name))
        return int(reply["ContentLength"])

    async def remove(self, name: str) -> None:
        # S3 deletes succeed for missing keys; the contract wants NotFound.
        head = await self._call(f"stat {name}", "head_object", Key=self._key(name))
        _refuse_if_retained(name, head)
        await self._call(f"remove {name}", "delete_object", Key=self._key(name))

    async def list(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        validate_prefix(prefix)
        client = await self._s3()
        paginator = client.get_paginator("list_objects_v2")
        try:
            async for page in paginator.paginate(Bucket=self._bucket, Prefix=self._prefix + prefix):
                for item in page.get("Contents", []):
                    yield item["Key"][len(self._prefix) :], int(item["Size"])
        except (BotoCoreError, ClientError, OSError) as exc:
            raise _translate(exc, f"{self._location}: list {prefix}") from exc

    async def create_layout(self) -> None:
        """Create the bucket when missing; S3 has no directories to make."""
        try:
            await self._call("create layout", "head_bucket")
        except NotFound:
            pass
        else:
            if self._opts.object_lock is not None:
                await self._check_object_lock()
            return
        kw: dict[str, Any] = {}
        if self._opts.object_lock is not None:
            # Only a new bucket can have Object Lock (it turns versioning on).
            kw["ObjectLockEnabledForBucket"] = True
        region = (await self._s3()).meta.region_name
        if region and region != "us-east-1" and not self._opts.endpoint:
            kw["CreateBucketConfiguration"] = {"LocationConstraint": region}
        await self._call("create bucket", "create_bucket", **kw)

    async def _check_object_lock(self) -> None:
        """An existing bucket must have Object Lock enabled, or every save would fail."""
        try:
            reply = await self._call("object lock", "get_object_lock_configuration")
        except BackendError as exc:
            enabled, detail = False, str(exc)
        else:
            config = reply.get("ObjectLockConfiguration", {})
            enabled, detail = config.get("ObjectLockEnabled") == "Enabled", ""
        if not enabled:
            raise BackendError(
                f"{self._location}: bucket {self._bucket} has no Object Lock enabled "
                f"(S3 allows it only when a bucket is created) {detail}".rstrip()
            )

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            self._client = None
            await self._stack.aclose()
