"""The content-addressed shard store: one safetensors object per shard version, one manifest per round.

Layout of a store directory (git-like, see ARCHITECTURE.md "Shard store")::

    STORE                                  format marker ({"format": "kyodo-shard-store", "version": 1})
    HEAD                                   {"round": r, "manifest": sha256 of that round's manifest}
    objects/ab/cdef...(62 hex).safetensors one shard version, named by the sha256 of its bytes
    manifests/round-000007.json            canonical JSON: round, parent, config hash, shard -> object, extra
    tmp/                                   writes in progress (temp file, fsync, rename)
    lock                                   flock'd by commit and gc, so gc never races a commit

Why this shape:

* **Objects are content-addressed.** A shard that did not change in a round keeps its object,
  so a round costs what it touched, not the model size; a replica that holds an object never
  fetches it again; and every read can be verified against the name alone. The id is the
  sha256 of the file's bytes, so serialisation must be deterministic: ``safetensors`` (0.8)
  sorts tensors by dtype then name (dict order does not matter), but writes ``__metadata__``
  in Rust ``HashMap`` order, which changes from process to process when there is more than
  one key. Objects therefore carry exactly one metadata key (``kyodo``, whose value is itself
  canonical JSON), so the same tensors give the same bytes and the same id in any process.
* **Manifests are named by round** (``manifests/round-NNNNNN.json``), not by hash: the
  coordinator, an export or an operator asks for "round 7", and a round-named file answers
  that with one read instead of a walk. Integrity is not lost: ``HEAD`` records the sha256
  of the head manifest and every manifest records the sha256 of its parent's, so each
  manifest read is verified against a hash chain that starts at ``HEAD`` (the walk to learn
  an older round's expected hash is cached). A manifest written by a commit that crashed
  before moving ``HEAD`` is simply not in that chain: it is refused, overwritten by the
  retried commit, and removed by ``gc``.
* **HEAD moves last**, by atomic rename: a crash at any point leaves the previous round
  intact and complete; objects written by the crashed round are unreferenced and ``gc``
  removes them.

Objects are read into one buffer, hashed, and the tensors returned by ``get_shard`` are views
into that buffer: a verified shard costs its size in memory once (not twice), and nothing is
ever built from bytes that did not match their hash.

Concurrency: one writer (the coordinator). ``commit`` and ``gc`` hold an exclusive ``flock``
so they never interleave; ``gc`` removes every object no retained manifest references, which
includes objects written for a round that has not been committed yet, so run it between
rounds, or with ``min_age_s`` larger than a round when another process may be writing.
``commit`` re-checks, under the lock, that every object it references exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from shared_model.durable import fsync_dir
from shared_model.shards import ShardLayout, shard_kind

log = logging.getLogger(__name__)

STORE_FORMAT = "kyodo-shard-store"
STORE_VERSION = 1
MANIFEST_VERSION = 1
OBJECT_SUFFIX = ".safetensors"
OBJECT_METADATA_KEY = "kyodo"
# The manifest ``extra`` key under which the coordinator commits the round's record (cohorts,
# receipts, updated shards) as a JSON string, before HEAD moves; auditors compare it with
# ``rounds.jsonl``.
ROUND_RECORD_KEY = "round_record"

_OBJECT_ID = re.compile(r"^[0-9a-f]{64}\Z")
_MANIFEST_NAME = re.compile(r"^round-(\d{6,})\.json\Z")
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header

# safetensors dtype names -> torch dtypes (and item sizes, for alignment and length checks).
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}
DTYPE_SIZES: dict[str, int] = {name: dt.itemsize for name, dt in _DTYPES.items()}
_DTYPE_NAMES: dict[torch.dtype, str] = {dt: name for name, dt in _DTYPES.items()}


# ------------------------------------------------------------------------------- errors


class StoreError(Exception):
    """Anything the store refuses to do; the message says what and why."""


class MissingObjectError(StoreError):
    """An object a caller or a manifest names is not in the store."""

    def __init__(self, object_id: str, shard_id: str | None = None, path: Path | None = None) -> None:
        self.object_id, self.shard_id, self.path = object_id, shard_id, path
        where = f" (shard {shard_id!r})" if shard_id else ""
        super().__init__(f"object {object_id}{where} is not in the store" + (f": no file {path}" if path else ""))


class CorruptObjectError(StoreError):
    """An object's bytes do not hash to its id, or are not a well-formed safetensors file.

    Such an object is never loaded: its tensors could be anything.
    """

    def __init__(self, object_id: str, reason: str, shard_id: str | None = None, path: Path | None = None) -> None:
        self.object_id, self.shard_id, self.path, self.reason = object_id, shard_id, path, reason
        where = f" (shard {shard_id!r})" if shard_id else ""
        at = f" at {path}" if path else ""
        super().__init__(
            f"object {object_id}{where}{at} is corrupt and was not loaded: {reason}. Objects are "
            "content-addressed: a good copy can be put back as it is, from a backup of the store or from a "
            "member's replica (<its state>/replica/objects/, same path; it holds the objects of the newest "
            "round it was sent)"
        )


class CorruptManifestError(StoreError):
    """A manifest or HEAD does not match the hash chain or does not parse."""


class CommitConflictError(StoreError):
    """``commit`` was given a parent that is not the current HEAD (another commit moved it)."""


# ------------------------------------------------------------------------------ helpers


def canonical_json(value: Any) -> bytes:
    """The one byte string for a JSON value: sorted keys, no whitespace, ASCII, no NaN.

    Why strict: manifests and HEAD are hashed, so the same content must always give the same
    bytes, and reading them back must give the same value. A value that JSON would silently
    change (int or tuple keys, tuples, NaN) is refused instead of being stored differently.
    """
    try:
        data = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"value is not canonical JSON: {exc}") from None
    # JSON keeps int/float/bool apart, so `==` after a round trip catches exactly what it
    # would change: non-string keys (stringified) and tuples (made lists).
    if json.loads(data) != value:
        raise StoreError(
            "value does not survive a JSON round trip (non-string keys or tuples?); use str keys and lists"
        )
    return data.encode("ascii")


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def check_object_id(object_id: str) -> str:
    """Refuse anything but 64 lowercase hex digits: ids arrive over the network (replica sync)
    and become file paths, so a malformed one must never reach the file system."""
    if not isinstance(object_id, str) or not _OBJECT_ID.match(object_id):
        raise StoreError(f"malformed object id {object_id!r}: expected 64 lowercase hex digits (a sha256)")
    return object_id


# Model settings added after the first stores, and the value that leaves the model as it was
ADDED_MODEL_SETTINGS = {"task_buckets": 0}


def model_config_hash(model_cfg: Any, embodiments: Mapping[str, Any] | None = None) -> str:
    """sha256 of the model config (and the embodiments, whose adapters are part of the model).

    Recorded in every manifest, so a round can never be loaded into a model of another shape
    by mistake. Accepts the config dataclasses or plain mappings.
    """

    from omegaconf import OmegaConf  # a dependency of the config module anyway

    def plain(obj: Any) -> Any:
        if OmegaConf.is_config(obj):
            return OmegaConf.to_container(obj, resolve=True)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        if isinstance(obj, Mapping):
            return {str(k): plain(v) for k, v in obj.items()}
        return obj

    model = plain(model_cfg)
    if isinstance(model, dict):
        # Settings added after stores were written leave the hash alone while they keep the
        # value that means "off": a run committed before ``task_buckets`` existed is the same
        # model as one with task_buckets 0, and must stay resumable and continuable.
        model = {k: v for k, v in model.items() if not (k in ADDED_MODEL_SETTINGS and v == ADDED_MODEL_SETTINGS[k])}
    value = {"model": model, "embodiments": plain(embodiments or {})}
    data = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return sha256_hex(data.encode("ascii"))


def write_all(fd: int, data: memoryview, offset: int | None = None) -> None:
    """``os.write``/``os.pwrite`` may write less than asked (large buffers): loop until done."""
    done = 0
    while done < len(data):
        chunk = data[done:]
        n = os.write(fd, chunk) if offset is None else os.pwrite(fd, chunk, offset + done)
        if n <= 0:
            raise OSError("short write")
        done += n


def _read_exact(path: Path) -> bytearray:
    """The whole file in one (writable) buffer, read without intermediate copies."""
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = fh.readinto(view[got:])
            if not n:
                break
            got += n
    if got != size:
        raise OSError(f"{path}: file shrank while reading ({got} of {size} bytes)")
    return buf


# ------------------------------------------------------------------- safetensors headers


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of an object: dtype (safetensors name), shape, and byte range in the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ObjectHeader:
    """The parsed header of an object: which shard it holds and where each tensor lies.

    ``tensors`` is in file order (by offset). ``data_start`` is where the data section
    begins (8 + header length), ``size`` the whole file's length.
    """

    shard_id: str | None
    tensors: dict[str, TensorInfo]
    data_start: int
    size: int


def _parse_header(head: bytes | bytearray | memoryview, size: int) -> ObjectHeader:
    """Parse and validate a safetensors header against the file size; ValueError on any defect.

    Why our own parser: it reads only the header (export plans a model from headers alone),
    and it lets ``get_shard`` build tensors as views of the one verified buffer instead of
    copying every tensor (``safetensors.torch.load`` copies each into a new ``bytes``).
    """
    if size < 8 or len(head) < 8:
        raise ValueError("shorter than the 8-byte header length")
    n = int.from_bytes(bytes(head[:8]), "little")
    if n > _MAX_HEADER or 8 + n > size or len(head) < 8 + n:
        raise ValueError(f"header length {n} does not fit a file of {size} bytes")
    try:
        header = json.loads(bytes(head[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    shard_id = None
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("__metadata__ is not a string -> string map")
        if OBJECT_METADATA_KEY in metadata:
            try:
                shard_id = json.loads(metadata[OBJECT_METADATA_KEY]).get("shard")
            except (json.JSONDecodeError, AttributeError):
                raise ValueError(f"__metadata__[{OBJECT_METADATA_KEY!r}] is not a JSON object") from None
    infos: list[tuple[str, TensorInfo]] = []
    for name, raw in header.items():
        if not isinstance(raw, dict) or raw.get("dtype") not in _DTYPES:
            raise ValueError(
                f"tensor {name!r}: missing or unsupported dtype {raw.get('dtype') if isinstance(raw, dict) else raw!r}"
            )
        shape, offsets = raw.get("shape"), raw.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"tensor {name!r}: bad data_offsets {offsets!r}")
        infos.append((name, TensorInfo(raw["dtype"], tuple(shape), offsets[0], offsets[1])))
    infos.sort(key=lambda item: (item[1].start, item[1].end))
    position = 0
    for name, info in infos:
        numel = 1
        for d in info.shape:
            numel *= d
        if info.start != position or info.nbytes != numel * DTYPE_SIZES[info.dtype]:
            raise ValueError(f"tensor {name!r}: data_offsets {[info.start, info.end]} do not match its shape and dtype")
        position = info.end
    if 8 + n + position != size:
        raise ValueError(f"tensors cover {position} data bytes but the file has {size - 8 - n}")
    return ObjectHeader(shard_id, dict(infos), 8 + n, size)


def _prepare_shard(
    shard_id: str, tensors: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors as safetensors will write them, and the object's one metadata entry.

    Tensors are made contiguous and moved to the CPU; their dtype is kept. A tensor that
    shares memory with another one in the same shard is copied, since safetensors refuses
    aliases (the stored shard is self-contained either way).
    """
    shard_kind(shard_id)  # a typo in a shard id fails here, not when the round is loaded
    if not tensors:
        raise StoreError(f"shard {shard_id!r}: no tensors to store")
    prepared: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise StoreError(f"shard {shard_id!r}: expected str -> torch.Tensor, got {type(name)} -> {type(tensor)}")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype not in _DTYPE_NAMES:
            raise StoreError(f"shard {shard_id!r}: tensor {name!r} has dtype {t.dtype}, which the store does not read")
        t = t.contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        prepared[name] = t
    # One key only: safetensors writes several in HashMap order, which varies between calls.
    metadata = {OBJECT_METADATA_KEY: canonical_json({"shard": shard_id, "version": STORE_VERSION}).decode("ascii")}
    return prepared, metadata


def serialize_shard(shard_id: str, tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The canonical bytes of one shard version, in memory (``put_shard`` writes the very same
    bytes straight to a file). Deterministic: see the module docstring."""
    prepared, metadata = _prepare_shard(shard_id, tensors)
    return safetensors.torch.save(prepared, metadata=metadata)


# ------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Head:
    """The last committed round and the sha256 of its manifest."""

    round: int
    manifest: str


def _object_ids_in(value: Any) -> Iterator[str]:
    """Every string in a JSON value that is a well-formed object id."""
    if isinstance(value, str):
        if _OBJECT_ID.match(value):
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _object_ids_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from _object_ids_in(v)


@dataclass(frozen=True)
class Manifest:
    """One committed round: shard id -> object id, plus lineage and free-form ``extra``.

    ``extra`` is canonical JSON (str keys; str, int, float, bool, None, lists, dicts). Object
    ids that appear anywhere in it (e.g. optimiser-state objects) keep those objects alive
    through ``gc``; other 64-hex strings there (record hashes) are harmless. Treat the dicts
    as read-only.
    """

    round: int
    parent: int | None
    parent_manifest: str | None
    model_config: str
    shards: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return canonical_json(
            {
                "version": MANIFEST_VERSION,
                "round": self.round,
                "parent": self.parent,
                "parent_manifest": self.parent_manifest,
                "model_config": self.model_config,
                "shards": self.shards,
                "extra": self.extra,
            }
        )

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON: what HEAD and the child manifest record."""
        return sha256_hex(self.to_json())

    def object_ids(self) -> set[str]:
        """Every object this round keeps alive: its shards and any object id in ``extra``."""
        return set(self.shards.values()) | set(_object_ids_in(self.extra))

    def shard_order(self) -> list[str]:
        """Shard ids in layout order (backbone, experts by layer and expert, adapters)."""
        return list(ShardLayout({s: [] for s in self.shards}).shards)

    @classmethod
    def from_json(cls, data: bytes, what: str = "manifest") -> Manifest:
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptManifestError(f"{what} is not JSON: {exc}") from None
        if not isinstance(raw, dict) or raw.get("version") != MANIFEST_VERSION:
            raise CorruptManifestError(f"{what}: not a version-{MANIFEST_VERSION} manifest")
        expected = {"version", "round", "parent", "parent_manifest", "model_config", "shards", "extra"}
        if set(raw) != expected:
            raise CorruptManifestError(f"{what}: keys {sorted(raw)}, expected {sorted(expected)}")
        shards = raw["shards"]
        if not isinstance(shards, dict) or not all(isinstance(v, str) and _OBJECT_ID.match(v) for v in shards.values()):
            raise CorruptManifestError(f"{what}: 'shards' must map shard ids to object ids")
        for shard_id in shards:
            try:
                shard_kind(shard_id)
            except ValueError as exc:
                raise CorruptManifestError(f"{what}: {exc}") from None
        if not isinstance(raw["round"], int) or not isinstance(raw["extra"], dict):
            raise CorruptManifestError(f"{what}: bad 'round' or 'extra'")
        parent, parent_digest = raw["parent"], raw["parent_manifest"]
        if (parent is None) != (parent_digest is None) or not (
            parent is None
            or (isinstance(parent, int) and isinstance(parent_digest, str) and _OBJECT_ID.match(parent_digest))
        ):
            raise CorruptManifestError(f"{what}: bad 'parent' / 'parent_manifest'")
        if not isinstance(raw["model_config"], str):
            raise CorruptManifestError(f"{what}: bad 'model_config'")
        return cls(raw["round"], raw["parent"], raw["parent_manifest"], raw["model_config"], dict(shards), raw["extra"])


@dataclass
class GCReport:
    """What ``gc`` removed and kept."""

    kept_rounds: list[int] = field(default_factory=list)
    removed_rounds: list[int] = field(default_factory=list)
    kept_objects: int = 0
    removed_objects: int = 0
    removed_bytes: int = 0
    removed_tmp: int = 0


@dataclass
class StoredObject:
    """A verified object: its bytes (one buffer) and parsed header."""

    object_id: str
    data: bytearray
    header: ObjectHeader


# --------------------------------------------------------------------------------- store


class ShardStore:
    """A content-addressed store of shard versions with one manifest per committed round.

    Used by the coordinator (commit rounds, resume from ``head()``, export) and by a member's
    replica (``put_object_bytes`` / ``has`` for incremental sync).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._objects = self.root / "objects"
        self._manifests = self.root / "manifests"
        self._tmp = self.root / "tmp"
        self._head_path = self.root / "HEAD"
        # round -> expected manifest sha256, learned by walking the chain from HEAD.
        self._expected: dict[int, str] = {}
        self._open()

    # ---------------------------------------------------------------- layout, durability

    def _open(self) -> None:
        marker = self.root / "STORE"
        for d in (self.root, self._objects, self._manifests, self._tmp):
            if not d.is_dir():
                d.mkdir(parents=True, exist_ok=True)
                fsync_dir(d.parent)
        if marker.is_file():
            try:
                info = json.loads(marker.read_bytes())
            except json.JSONDecodeError:
                info = None
            if not isinstance(info, dict) or info.get("format") != STORE_FORMAT:
                raise StoreError(f"{self.root} is not a kyodo shard store ({marker} is not a store marker)")
            if info.get("version") != STORE_VERSION:
                raise StoreError(f"{self.root}: store version {info.get('version')}, this code reads {STORE_VERSION}")
        else:
            self._write_atomic(marker, canonical_json({"format": STORE_FORMAT, "version": STORE_VERSION}))

    def _write_atomic(self, final: Path, data: bytes | bytearray | memoryview) -> None:
        """Temp file in ``tmp/``, fsync, rename over ``final``, fsync the directory: a crash
        leaves either the old file or the complete new one under ``final``'s name."""
        tmp = self._tmp / f"{final.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_all(fd, memoryview(data))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, final)
        fsync_dir(final.parent)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def object_path(self, object_id: str) -> Path:
        """``objects/ab/cdef....safetensors`` (the id is validated first)."""
        check_object_id(object_id)
        return self._objects / object_id[:2] / (object_id[2:] + OBJECT_SUFFIX)

    def _manifest_path(self, round_number: int) -> Path:
        return self._manifests / f"round-{round_number:06d}.json"

    # --------------------------------------------------------------------------- objects

    def has(self, object_id: str) -> bool:
        """Whether the object is present (not verified: a read verifies)."""
        return self.object_path(object_id).is_file()

    def object_size(self, object_id: str) -> int:
        """Size of the object in bytes (what sending it costs)."""
        path = self.object_path(object_id)
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise MissingObjectError(object_id, path=path) from None

    def objects(self) -> Iterator[str]:
        """Ids of every object present (verified or not), in no particular order."""
        for fan in self._objects.iterdir():
            if not (fan.is_dir() and len(fan.name) == 2):
                continue
            for f in fan.iterdir():
                oid = fan.name + f.name.removesuffix(OBJECT_SUFFIX)
                if f.name.endswith(OBJECT_SUFFIX) and _OBJECT_ID.match(oid):
                    yield oid

    def _file_digest(self, path: Path) -> str:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()

    def _store_bytes(self, object_id: str, data: bytes | bytearray | memoryview) -> bool:
        """Write verified bytes under their id; skip if an intact copy is there already.

        An existing file with the wrong content (bit rot, a torn copy by hand) is replaced by
        the good bytes in hand rather than kept: the store heals instead of keeping a bad
        object that every later read would refuse.
        """
        path = self.object_path(object_id)
        if path.is_file():
            if self._file_digest(path) == object_id:
                return False
            log.warning("object %s on disk is corrupt; replacing it with verified bytes", object_id)
        self._ensure_fan_dir(path)
        self._write_atomic(path, data)
        return True

    def _install(self, tmp: Path, path: Path) -> None:
        """Rename a verified, fsynced temp file under its object path, durably."""
        self._ensure_fan_dir(path)
        os.replace(tmp, path)
        fsync_dir(path.parent)

    def _ensure_fan_dir(self, path: Path) -> None:
        if not path.parent.is_dir():
            path.parent.mkdir(exist_ok=True)
            fsync_dir(self._objects)

    def put_shard(self, shard_id: str, tensors: Mapping[str, torch.Tensor]) -> str:
        """Store one shard version; returns its object id (the sha256 of its bytes).

        Storing the same tensors again writes nothing and returns the same id. The shard is
        serialised straight into a temp file, hashed from there and renamed to its id: no
        in-memory copy of the shard (``safetensors.torch.save`` makes two), and the id is the
        hash of the bytes actually on disk.
        """
        prepared, metadata = _prepare_shard(shard_id, tensors)
        tmp = self._tmp / f"shard.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            safetensors.torch.save_file(prepared, tmp, metadata=metadata)
            del prepared
            with open(tmp, "rb") as fh:
                object_id = hashlib.file_digest(fh, "sha256").hexdigest()
                path = self.object_path(object_id)
                if path.is_file() and self._file_digest(path) == object_id:
                    return object_id  # already stored (the tmp file goes in `finally`)
                os.fsync(fh.fileno())
            if path.is_file():
                log.warning("object %s on disk is corrupt; replacing it with verified bytes", object_id)
            self._install(tmp, path)
            return object_id
        finally:
            tmp.unlink(missing_ok=True)

    def put_object_bytes(self, object_id: str, data: bytes | bytearray | memoryview) -> bool:
        """Store an object received from elsewhere (replica sync), after checking it.

        The bytes must hash to ``object_id`` and be a well-formed safetensors file; otherwise
        nothing is written and ``CorruptObjectError`` says why. Returns whether it was written
        (False: an intact copy was already there).
        """
        check_object_id(object_id)
        digest = sha256_hex(data)
        if digest != object_id:
            raise CorruptObjectError(object_id, f"received bytes hash to {digest}, not to the object id")
        try:
            _parse_header(memoryview(data), len(data))
        except ValueError as exc:
            raise CorruptObjectError(object_id, f"not a valid safetensors file: {exc}") from None
        return self._store_bytes(object_id, data)

    def import_object(self, source: ShardStore, object_id: str) -> bool:
        """Take an object from another store on this machine (a run continuing an earlier
        run's model, ``coordinator.continuation``); returns whether it was written.

        Objects never change once written, so the file is hard-linked where both stores share
        a filesystem (a trillion-parameter model then costs no second 2 TB on disk and no
        copy time) and copied only where they do not. Either way the file taken is the one
        verified: it is linked (or copied) into ``tmp/`` first, hashed there, and only then
        renamed under its id, so a source file replaced or damaged meanwhile cannot slip in.
        Removing it from either store later (``gc``) removes one name, never the other's data.
        """
        path = self.object_path(object_id)
        if path.is_file() and self._file_digest(path) == object_id:
            return False
        src = source.object_path(object_id)
        if not src.is_file():
            raise MissingObjectError(object_id, path=src)
        tmp = self._tmp / f"import.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            try:
                os.link(src, tmp)
            except OSError:  # another filesystem (EXDEV) or no hard links there: copy
                shutil.copyfile(src, tmp)
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
            digest = self._file_digest(tmp)
            if digest != object_id:
                raise CorruptObjectError(object_id, f"its bytes hash to {digest}", path=src)
            self._install(tmp, path)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def read_object(self, object_id: str, *, shard_id: str | None = None) -> StoredObject:
        """Read and verify an object: its bytes must hash to its id and parse as safetensors.

        ``shard_id`` (what the caller expects the object to hold) only improves error messages
        and is checked against the shard the object says it holds.
        """
        path = self.object_path(object_id)
        try:
            data = _read_exact(path)
        except FileNotFoundError:
            raise MissingObjectError(object_id, shard_id, path) from None
        digest = sha256_hex(data)
        if digest != object_id:
            raise CorruptObjectError(object_id, f"its bytes hash to {digest}", shard_id, path)
        try:
            header = _parse_header(memoryview(data), len(data))
        except ValueError as exc:
            raise CorruptObjectError(object_id, f"not a valid safetensors file: {exc}", shard_id, path) from None
        if shard_id is not None and header.shard_id is not None and header.shard_id != shard_id:
            raise StoreError(f"object {object_id} holds shard {header.shard_id!r}, not {shard_id!r}")
        return StoredObject(object_id, data, header)

    def read_header(self, object_id: str) -> ObjectHeader:
        """The object's header alone (names, dtypes, shapes, offsets), without reading the data.

        Not hash-verified (that needs every byte): for planning only, e.g. an export's file
        split. Whatever is then read through ``read_object`` is verified.
        """
        path = self.object_path(object_id)
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                first = fh.read(8)
                n = int.from_bytes(first, "little") if len(first) == 8 else 0
                head = first + fh.read(min(n, _MAX_HEADER + 1))
        except FileNotFoundError:
            raise MissingObjectError(object_id, path=path) from None
        try:
            return _parse_header(head, size)
        except ValueError as exc:
            raise CorruptObjectError(object_id, f"not a valid safetensors file: {exc}", path=path) from None

    def get_shard(self, object_id: str, *, shard_id: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors of a verified object, by name.

        They are CPU tensors viewing one shared, writable buffer (the object read once): no
        second copy. Keeping any one of them keeps the whole buffer alive.
        """
        obj = self.read_object(object_id, shard_id=shard_id)
        out: dict[str, torch.Tensor] = {}
        base = obj.header.data_start
        for name, info in obj.header.tensors.items():
            dtype = _DTYPES[info.dtype]
            if info.nbytes == 0:
                out[name] = torch.empty(info.shape, dtype=dtype)
                continue
            t = torch.frombuffer(obj.data, dtype=dtype, count=info.nbytes // dtype.itemsize, offset=base + info.start)
            if t.data_ptr() % dtype.itemsize:  # safetensors aligns data; a foreign writer may not
                t = t.clone()
            out[name] = t.reshape(info.shape)
        return out

    def object_bytes(self, object_id: str) -> bytes:
        """The verified bytes of an object, to send to a replica."""
        return bytes(self.read_object(object_id).data)

    # ------------------------------------------------------------------------- manifests

    def head(self) -> Head | None:
        """The last committed round, or None for a store with no commit yet."""
        try:
            data = self._head_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            raw = json.loads(data)
            head = Head(int(raw["round"]), check_object_id(raw["manifest"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, StoreError) as exc:
            raise CorruptManifestError(f"{self._head_path} is unreadable: {exc}") from None
        return head

    def _read_manifest(self, round_number: int, expected: str) -> Manifest:
        path = self._manifest_path(round_number)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(
                f"manifest of round {round_number} is missing ({path}); it was removed by gc(keep_last=...) "
                "or the store is damaged"
            ) from None
        digest = sha256_hex(data)
        if digest != expected:
            raise CorruptManifestError(
                f"manifest of round {round_number} ({path}) hashes to {digest}, but its child or HEAD records {expected}"
            )
        manifest = Manifest.from_json(data, f"manifest of round {round_number}")
        if manifest.round != round_number:
            raise CorruptManifestError(f"{path} holds round {manifest.round}")
        return manifest

    def manifest(self, round_number: int) -> Manifest:
        """The manifest of a committed round, verified against the hash chain from HEAD."""
        head = self.head()
        if head is None:
            raise StoreError("the store has no committed round yet")
        if round_number > head.round or round_number < 0:
            raise StoreError(f"round {round_number} is not committed (HEAD is at round {head.round})")
        if self._expected.get(head.round) != head.manifest:
            self._expected = {head.round: head.manifest}  # HEAD moved (or first use): restart the chain
        if round_number in self._expected:
            return self._read_manifest(round_number, self._expected[round_number])
        # Walk down the chain from the oldest round whose hash is known to the one asked for.
        start = min(r for r in self._expected if r > round_number)
        current = self._read_manifest(start, self._expected[start])
        while current.round > round_number:
            parent, parent_digest = current.parent, current.parent_manifest
            if parent is None or parent_digest is None or parent < round_number:
                raise StoreError(f"round {round_number} is not in the history of HEAD (round {head.round})")
            self._expected[parent] = parent_digest
            current = self._read_manifest(parent, parent_digest)
        return current

    def head_manifest(self) -> Manifest | None:
        """The manifest HEAD names, or None for an empty store (what a restart resumes from)."""
        head = self.head()
        return None if head is None else self.manifest(head.round)

    def rounds(self) -> list[int]:
        """Committed rounds whose manifests are still stored, newest first (HEAD's chain)."""
        out: list[int] = []
        head = self.head()
        if head is None:
            return out
        current: Manifest | None = self.manifest(head.round)
        while current is not None:
            out.append(current.round)
            if current.parent is None or not self._manifest_path(current.parent).is_file():
                break
            current = self.manifest(current.parent)
        return out

    def commit(
        self,
        parent: Manifest | None,
        changed: Mapping[str, str],
        *,
        round_number: int | None = None,
        model_config: str | None = None,
        extra: Mapping[str, Any] | None = None,
        removed: Iterable[str] = (),
    ) -> Manifest:
        """Commit a round: the parent's shards with ``changed`` (shard id -> object id) applied.

        Only changed shards are named; the others keep the parent's objects. ``parent`` must be
        the manifest HEAD names (None for the very first commit), else ``CommitConflictError``:
        two writers cannot both extend the same round. ``round_number`` defaults to the parent's
        + 1 (0 for the first commit); ``model_config`` to the parent's (required for the first
        commit, see ``model_config_hash``). ``removed`` drops shards (e.g. a retired embodiment).

        Every referenced object must already be in the store (``put_shard`` /
        ``put_object_bytes``). The manifest is written first and HEAD moved last, each
        atomically: a crash in between leaves HEAD at the parent.
        """
        with self._lock():
            head = self.head()
            if parent is None:
                if head is not None:
                    raise CommitConflictError(f"parent None (first commit), but HEAD is at round {head.round}")
                base: dict[str, str] = {}
                if round_number is None:
                    round_number = 0
                if model_config is None:
                    raise StoreError("the first commit needs model_config (see model_config_hash)")
            else:
                if head is None or head.manifest != parent.digest or head.round != parent.round:
                    at = "no commit" if head is None else f"round {head.round} ({head.manifest[:12]})"
                    raise CommitConflictError(
                        f"parent is round {parent.round} ({parent.digest[:12]}), but HEAD is at {at}; "
                        "re-read head_manifest() and retry"
                    )
                base = dict(parent.shards)
                if round_number is None:
                    round_number = parent.round + 1
                if model_config is None:
                    model_config = parent.model_config
            if not isinstance(round_number, int) or round_number < 0:
                raise StoreError(f"round number must be a non-negative int, got {round_number!r}")
            if parent is not None and round_number <= parent.round:
                raise StoreError(f"round {round_number} must come after its parent round {parent.round}")
            if not isinstance(model_config, str) or not model_config:
                raise StoreError(f"model_config must be a non-empty string (a hash), got {model_config!r}")
            for shard_id in removed:
                if shard_id not in base:
                    raise StoreError(f"cannot remove shard {shard_id!r}: the parent round does not have it")
                del base[shard_id]
            for shard_id, object_id in changed.items():
                shard_kind(shard_id)
                check_object_id(object_id)
                if not self.has(object_id):
                    raise MissingObjectError(object_id, shard_id, self.object_path(object_id))
                base[shard_id] = object_id
            if not base:
                raise StoreError(f"round {round_number} would have no shards")
            manifest = Manifest(
                round=round_number,
                parent=None if parent is None else parent.round,
                parent_manifest=None if parent is None else parent.digest,
                model_config=model_config,
                shards=dict(sorted(base.items())),
                extra=dict(extra or {}),
            )
            data = manifest.to_json()  # refuses an `extra` that is not canonical JSON
            digest = sha256_hex(data)
            self._write_atomic(self._manifest_path(round_number), data)
            self._write_atomic(self._head_path, canonical_json({"round": round_number, "manifest": digest}))
            # Hashes learned on the parent's chain stay valid: history only grows at the top.
            if parent is None or self._expected.get(parent.round) != parent.digest:
                self._expected = {} if parent is None else {parent.round: parent.digest}
            self._expected[round_number] = digest
            return manifest

    # ---------------------------------------------------------------------------- reading

    def iter_shards(self, round_number: int) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """``(shard id, tensors)`` of a round, one verified shard at a time, in layout order.

        Memory follows the largest shard, not the model: what the coordinator and export use.
        """
        manifest = self.manifest(round_number)
        for shard_id in manifest.shard_order():
            yield shard_id, self.get_shard(manifest.shards[shard_id], shard_id=shard_id)

    def load_model(self, round_number: int) -> dict[str, torch.Tensor]:
        """The whole state dict of a round (small models; large ones use ``iter_shards``)."""
        state: dict[str, torch.Tensor] = {}
        for shard_id, tensors in self.iter_shards(round_number):
            clash = state.keys() & tensors.keys()
            if clash:
                raise StoreError(f"round {round_number}: shard {shard_id!r} repeats tensors {sorted(clash)[:5]}")
            state.update(tensors)
        return state

    # -------------------------------------------------------------------------------- gc

    def gc(self, *, keep_last: int | None = None, min_age_s: float = 0.0, keep_objects: Iterable[str] = ()) -> GCReport:
        """Remove what no retained round references.

        Retained rounds: HEAD's chain, or only its newest ``keep_last`` rounds (older manifests
        are dropped first; HEAD's is always kept). Then every object that no retained manifest
        references (shards and object ids in ``extra``) and that is not in ``keep_objects`` is
        deleted, with manifests not on the chain (a crashed commit's) and stale temp files.
        Only files older than ``min_age_s`` seconds are deleted, so a writer in another
        process can be given time to commit. A member replica (objects, no rounds) passes the
        objects it wants to keep in ``keep_objects``.
        """
        if keep_last is not None and keep_last < 1:
            raise StoreError(f"keep_last must be >= 1 (HEAD's round is always kept), got {keep_last}")
        report = GCReport()
        now = time.time()

        def old(path: Path) -> bool:
            try:
                return now - path.stat().st_mtime >= min_age_s
            except FileNotFoundError:
                return False

        with self._lock():
            kept: list[Manifest] = []
            head = self.head()
            gap: int | None = None
            if head is not None:
                current = self.manifest(head.round)
                kept.append(current)
                while current.parent is not None and (keep_last is None or len(kept) < keep_last):
                    if not self._manifest_path(current.parent).is_file():
                        gap = current.parent
                        break
                    current = self._read_manifest(current.parent, current.parent_manifest)  # type: ignore[arg-type]
                    kept.append(current)
            kept_rounds = {m.round for m in kept}
            files = sorted(
                (int(m.group(1)), p) for p in self._manifests.iterdir() if (m := _MANIFEST_NAME.match(p.name))
            )
            if gap is not None and keep_last is None and any(r < gap for r, _ in files):
                raise StoreError(
                    f"the history of HEAD is broken: the manifest of round {gap} is missing but older manifests "
                    "exist; refusing to gc (restore the manifest or gc with keep_last)"
                )
            for r, path in files:  # oldest first: a crash mid-gc leaves a contiguous newest suffix
                if r not in kept_rounds and old(path):
                    path.unlink(missing_ok=True)
                    report.removed_rounds.append(r)
                    self._expected.pop(r, None)
            live = set(keep_objects)
            for m in kept:
                live |= m.object_ids()
            for object_id in list(self.objects()):
                if object_id in live:
                    report.kept_objects += 1
                    continue
                path = self.object_path(object_id)
                if old(path):
                    size = path.stat().st_size
                    path.unlink(missing_ok=True)
                    report.removed_objects += 1
                    report.removed_bytes += size
            for path in self._tmp.iterdir():
                if old(path):
                    path.unlink(missing_ok=True)
                    report.removed_tmp += 1
            report.kept_rounds = sorted(kept_rounds)
        return report
