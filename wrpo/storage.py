"""Object storage backends: one flat key/value interface over local folders and `s3://bucket/prefix`.

This module knows objects, not stages: the run directory's commit protocol (manifests, shards, unit
markers, checked reads) is `wrpo.pipeline.rundir`, built on these backends (docs/architecture.md).

Atomicity: a local object is written to a temporary file and renamed into place; an S3 object is one PUT
(or one multipart upload, which S3 only makes visible once completed), so a partial object is never
visible under its final name. The temporary file is created as `open()` would create the object (mode
0666 less the process umask, not mkstemp's 0600); a `public` folder (`wrpo export`) gets files 0644 and
the folders it creates 0755 whatever the umask, so a serving account can read it (docs/eval.md).

Streaming: `iter_chunks` reads an object in chunks of 1 MiB (an S3 read that breaks off is resumed
with a ranged GET from the byte it stopped at) and `open_write` writes one through a file object (a
local temporary file renamed into place; on S3 one PUT under 16 MiB, else a multipart upload of 16 MiB
parts sent as they fill, aborted if the writing fails), so no object is ever held whole in memory
(docs/data.md, "Scale").

S3 access uses boto3 with its own retry machinery (standard mode: throttling, 5xx and connection errors
are retried with exponential backoff), the endpoint and region from the spec, and credentials from the
standard chain (env vars, shared files, instance/pod roles).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from wrpo.errors import WrpoError

MULTIPART_THRESHOLD = 64 * 1024 * 1024
_CHUNK = 1024 * 1024


class StorageError(WrpoError):
    """Storage could not be reached or an object is missing/corrupt; the message names the URI."""


class ObjectNotFound(StorageError):
    """The object does not exist."""


@dataclass(frozen=True)
class S3Options:
    """How to reach S3: endpoint URL (None = AWS), region, and boto3's retry budget."""

    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 10
    retry_mode: str = "standard"
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    # Explicit keys (the operator reads them from the run's Secret); None: boto3's standard chain.
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_spec(cls, storage: Any) -> S3Options:
        """From a FusionSpec `storage` section (`s3_endpoint`, `s3_region`); env vars fill the gaps."""
        return cls(
            endpoint_url=storage.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL"),
            region=storage.s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        )


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: an S3 URI needs a bucket (s3://bucket/prefix)")
    return bucket, prefix.strip("/")


# ---------------------------------------------------------------------------------------------- backends


class Backend(Protocol):
    """Flat key/value object access under one root (a folder or a bucket prefix)."""

    def uri(self, key: str) -> str: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def iter_chunks(self, key: str) -> Iterator[bytes]: ...
    def open_write(self, key: str) -> AbstractContextManager[IO[bytes]]: ...
    def download(self, key: str, path: Path) -> None: ...
    def size(self, key: str) -> int | None: ...
    def list(self, prefix: str) -> dict[str, int]: ...
    def delete(self, keys: list[str]) -> None: ...


class LocalBackend:
    """A folder; writes go to a temporary file in the same folder and are renamed into place. `public`:
    files 0644 and new folders 0755 whatever the umask (see the module docstring)."""

    def __init__(self, root: str | Path, public: bool = False):
        self.root = Path(root)
        self.public = public

    def _path(self, key: str) -> Path:
        return self.root / key

    def uri(self, key: str) -> str:
        return str(self._path(key))

    @contextmanager
    def open_write(self, key: str) -> Iterator[IO[bytes]]:
        """A file to write the object through; it appears under its name only when the block ends."""
        dest = self._path(key)
        self._mkdirs(dest.parent)
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.partial"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
        try:
            with os.fdopen(fd, "wb") as f:
                if self.public:
                    os.fchmod(f.fileno(), 0o644)
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _mkdirs(self, folder: Path) -> None:
        """Create `folder` and its missing parents; a public backend sets 0755 on those it created."""
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        for p in missing if self.public else []:
            p.chmod(0o755)

    def put_bytes(self, key: str, data: bytes) -> None:
        with self.open_write(key) as f:
            f.write(data)

    def put_file(self, key: str, path: Path) -> None:
        with self.open_write(key) as f, open(path, "rb") as src:
            shutil.copyfileobj(src, f, _CHUNK)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.uri(key)}: no such object") from None

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        try:
            f = open(self._path(key), "rb")  # noqa: SIM115 (closed below, also when the reader stops early)
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"{self.uri(key)}: no such object") from None
        with f:
            yield from iter(lambda: f.read(_CHUNK), b"")

    def download(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.uri(key)}: no such object") from None

    def size(self, key: str) -> int | None:
        p = self._path(key)
        return p.stat().st_size if p.is_file() else None

    def list(self, prefix: str) -> dict[str, int]:
        base = self._path(prefix)
        if not base.is_dir():
            return {}
        return {str(p.relative_to(self.root)): p.stat().st_size for p in base.rglob("*")
                if p.is_file() and not p.name.endswith(".partial")}

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)


class S3Backend:
    """A bucket prefix through boto3 (retries, multipart uploads and downloads via its transfer manager)."""

    def __init__(self, bucket: str, prefix: str, options: S3Options):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.max_attempts = options.max_attempts
        config = Config(
            retries={"max_attempts": options.max_attempts, "mode": options.retry_mode},
            connect_timeout=options.connect_timeout_s, read_timeout=options.read_timeout_s,
            region_name=options.region,
        )
        self.client = boto3.client("s3", endpoint_url=options.endpoint_url, config=config,
                                   aws_access_key_id=options.access_key_id,
                                   aws_secret_access_key=options.secret_access_key,
                                   aws_session_token=options.session_token)
        self.transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                                       multipart_chunksize=MULTIPART_THRESHOLD)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "?")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(f"{self.uri(key)}: no such object") from None
            raise StorageError(f"{self.uri(key)}: S3 error {code}: {e}") from None
        except BotoCoreError as e:
            raise StorageError(f"{self.uri(key)}: S3 unreachable after retries ({e})") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key), Config=self.transfer)

    def put_file(self, key: str, path: Path) -> None:
        with self._errors(key):
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)

    def get_bytes(self, key: str) -> bytes:
        """One GET (the transfer manager would HEAD first: twice the requests for every marker)."""
        return b"".join(self.iter_chunks(key))

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        """The object in chunks; a body that breaks off mid-way is asked for again from where it stopped
        (boto3 retries a request, not a body being read)."""
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        offset, failures = 0, 0
        while True:
            extra = {"Range": f"bytes={offset}-"} if offset else {}
            with self._errors(key):
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **extra)["Body"]
            try:
                for chunk in body.iter_chunks(_CHUNK):
                    offset += len(chunk)
                    yield chunk
                return
            except (BotoCoreError, HTTPError, OSError) as e:
                failures += 1
                if failures >= self.max_attempts:
                    raise StorageError(f"{self.uri(key)}: reading broke off at byte {offset} "
                                       f"{failures} times ({e})") from None
            finally:
                body.close()

    @contextmanager
    def open_write(self, key: str) -> Iterator[IO[bytes]]:
        """A writer that uploads as it goes: one PUT for an object under PART_SIZE, else a multipart
        upload of PART_SIZE parts (aborted if the block fails), so memory holds one part at most."""
        w = _MultipartWriter(self, key)
        try:
            yield w  # type: ignore[misc]
            w.finish()
        except BaseException:
            w.abort()
            raise

    def download(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(key):
            self.client.download_file(self.bucket, self._key(key), str(path), Config=self.transfer)

    def size(self, key: str) -> int | None:
        try:
            with self._errors(key):
                return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]
        except ObjectNotFound:
            return None

    def list(self, prefix: str) -> dict[str, int]:
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        out: dict[str, int] = {}
        with self._errors(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                for obj in page.get("Contents", []):
                    out[obj["Key"][strip:]] = obj["Size"]
        return out

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i:i + 1000]]
            with self._errors(keys[i]):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})


PART_SIZE = 16 * 1024 * 1024  # parts of a streamed S3 upload (S3 allows 10,000: objects up to 160 GB)


class _MultipartWriter:
    """`S3Backend.open_write`'s file object: buffers one part, uploads it when full; `finish` completes
    the upload (or PUTs a small object whole), `abort` drops the parts so nothing becomes visible."""

    def __init__(self, backend: S3Backend, key: str):
        self.b, self.key = backend, key
        self.buf = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []

    def write(self, data: bytes) -> int:
        self.buf += data
        while len(self.buf) >= PART_SIZE:
            self._part(bytes(self.buf[:PART_SIZE]))
            del self.buf[:PART_SIZE]
        return len(data)

    def _part(self, data: bytes) -> None:
        b = self.b
        with b._errors(self.key):
            if self.upload_id is None:
                self.upload_id = b.client.create_multipart_upload(Bucket=b.bucket, Key=b._key(self.key))["UploadId"]
            n = len(self.parts) + 1
            etag = b.client.upload_part(Bucket=b.bucket, Key=b._key(self.key), UploadId=self.upload_id,
                                        PartNumber=n, Body=data)["ETag"]
        self.parts.append({"PartNumber": n, "ETag": etag})

    def finish(self) -> None:
        b = self.b
        if self.upload_id is None:
            with b._errors(self.key):
                b.client.put_object(Bucket=b.bucket, Key=b._key(self.key), Body=bytes(self.buf))
            return
        if self.buf:
            self._part(bytes(self.buf))
            self.buf.clear()
        with b._errors(self.key):
            b.client.complete_multipart_upload(Bucket=b.bucket, Key=b._key(self.key), UploadId=self.upload_id,
                                               MultipartUpload={"Parts": self.parts})

    def abort(self) -> None:
        if self.upload_id is not None:
            with contextlib.suppress(Exception):  # the write failed already; lifecycle rules clear leftovers
                self.b.client.abort_multipart_upload(Bucket=self.b.bucket, Key=self.b._key(self.key),
                                                     UploadId=self.upload_id)


def open_backend(uri: str, s3: S3Options | None = None, public: bool = False) -> Backend:
    """A backend rooted at a local folder or an `s3://bucket/prefix` URI (`public`: see LocalBackend; S3
    objects have no modes)."""
    if uri.startswith("s3://"):
        bucket, prefix = split_s3_uri(uri)
        return S3Backend(bucket, prefix, s3 or S3Options())
    return LocalBackend(uri.removeprefix("file://"), public)


def read_uri_bytes(uri: str, s3: S3Options | None = None) -> bytes:
    """Read one object given by a full local path or s3:// URI (used for input datasets)."""
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        return S3Backend(bucket, "", s3 or S3Options()).get_bytes(key)
    return LocalBackend("/").get_bytes(str(Path(uri).resolve()).lstrip("/"))


def download_uri_tree(uri: str, dest: Path, s3: S3Options | None = None) -> Path:
    """Copy every object under an s3:// prefix into `dest` (for `datasets` folders and model folders)."""
    backend = open_backend(uri, s3)
    objects = backend.list("")
    if not objects:
        raise StorageError(f"{uri}: no objects under this prefix")
    for key in objects:
        backend.download(key, dest / key)
    return dest
