"""Export a committed round in the Hugging Face layout, streaming one shard at a time.

Output (what ``transformers`` and ``huggingface_hub`` read for a sharded checkpoint)::

    out_dir/model.safetensors.index.json     {"metadata": {"total_size": ...}, "weight_map": {tensor: file}}
    out_dir/config.json                      the run's model and embodiment settings (when given)
    out_dir/model-00001-of-0000N.safetensors
    ...

Why it is written the way it is:

* **Memory follows one store shard, not an output file.** A Hugging Face file holds up to
  ``max_shard_bytes`` (5 GB by default), and ``safetensors.torch.save_file`` needs every
  tensor of a file in memory at once. Instead the whole split is planned first from the
  objects' headers alone (names, dtypes, shapes: a few KB each), which fixes every output
  file's header and every tensor's byte offset; then each store object is read once,
  verified, and its tensors' bytes are written straight to their offsets (``pwrite``). No
  tensor is ever decoded or re-encoded: the exported bytes are the stored bytes.
* **Alignment as safetensors does it.** Within a file, tensors are placed by descending item
  size, then name, so every tensor starts at a multiple of its item size (the header is
  padded to 8 bytes) and zero-copy loaders can map them directly.
* **Complete or absent.** Files are written under temporary names, fsynced and renamed; the
  index, which is what makes the directory a model, is written last.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from shared_model.durable import fsync_dir
from shared_model.store import DTYPE_SIZES, ShardStore, StoreError, write_all

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # Hugging Face's default max_shard_size ("5GB")
_MODEL_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
_TMP_PREFIX = ".kyodo-export-"


@dataclass
class _Placement:
    """Where one tensor goes: output file index and absolute byte offset in that file."""

    file: int
    offset: int


@dataclass
class _OutFile:
    name: str
    header: bytes  # 8-byte length + padded JSON
    tensors: dict[str, tuple[str, list[int], int]] = field(default_factory=dict)  # name -> dtype, shape, nbytes
    remaining: int = 0  # tensors still to write
    fd: int | None = None

    @property
    def tmp_name(self) -> str:
        return f"{_TMP_PREFIX}{self.name}.tmp"


@dataclass
class ExportResult:
    """What ``export_hf`` wrote."""

    out_dir: Path
    files: list[str]
    total_size: int
    n_tensors: int
    round: int
    manifest: str


def _file_header(tensors: dict[str, tuple[str, list[int], int]]) -> tuple[bytes, dict[str, int]]:
    """The safetensors header of one output file and each tensor's offset in its data section."""
    order = sorted(tensors, key=lambda n: (-DTYPE_SIZES[tensors[n][0]], n))
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offsets: dict[str, int] = {}
    position = 0
    for name in order:
        dtype, shape, nbytes = tensors[name]
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + nbytes]}
        offsets[name] = position
        position += nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, offsets


def _clear(out_dir: Path, overwrite: bool) -> None:
    """Refuse to mix with an existing model (stale files would be loaded), unless asked to replace it."""
    existing = [p for p in out_dir.iterdir() if p.name in (INDEX_NAME, CONFIG_NAME) or _MODEL_FILE.match(p.name)]
    if existing and not overwrite:
        names = ", ".join(sorted(p.name for p in existing)[:3])
        raise StoreError(f"{out_dir} already holds a model ({names}, ...); --overwrite (overwrite=True) replaces it")
    # The index first: a crash part-way never leaves an index naming files that are gone.
    for p in sorted(existing, key=lambda p: p.name != INDEX_NAME):
        p.unlink()
    for p in out_dir.iterdir():
        if p.name.startswith(_TMP_PREFIX):
            p.unlink()


def export_hf(
    store: ShardStore,
    round_number: int,
    out_dir: str | os.PathLike[str],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    *,
    overwrite: bool = False,
    config: dict | None = None,
) -> ExportResult:
    """Write round ``round_number`` of ``store`` to ``out_dir`` in the Hugging Face sharded layout.

    ``config``: the run's model and embodiment settings, written as ``config.json`` before the
    index (a checkpoint without one cannot be rebuilt: the layer count, experts, LoRA rank and
    each robot's dimensions are not in the tensors' names; a walkthrough found none).

    Tensors keep their stored dtype and bytes. Files are filled in shard layout order up to
    ``max_shard_bytes`` of tensor data each; a tensor larger than that gets a file of its own
    (as Hugging Face does). Every object is hash-verified as it is read; a corrupt one stops
    the export with ``CorruptObjectError`` before anything is renamed into place.
    """
    if max_shard_bytes <= 0:
        raise StoreError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    manifest = store.manifest(round_number)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear(out, overwrite)

    # 1. Plan from headers: which file every tensor goes to.
    groups: list[dict[str, tuple[str, list[int], int]]] = [{}]
    filled = 0
    owner: dict[str, str] = {}
    order = manifest.shard_order()
    for shard_id in order:
        header = store.read_header(manifest.shards[shard_id])
        for name, info in header.tensors.items():
            if name in owner:
                raise StoreError(f"round {round_number}: tensor {name!r} is in both {owner[name]!r} and {shard_id!r}")
            owner[name] = shard_id
            if groups[-1] and filled + info.nbytes > max_shard_bytes:
                groups.append({})
                filled = 0
            groups[-1][name] = (info.dtype, list(info.shape), info.nbytes)
            filled += info.nbytes
    if not owner:
        raise StoreError(f"round {round_number} has no tensors to export")
    n = len(groups)
    files: list[_OutFile] = []
    placement: dict[str, _Placement] = {}
    for i, group in enumerate(groups):
        header_bytes, offsets = _file_header(group)
        f = _OutFile(f"model-{i + 1:05d}-of-{n:05d}.safetensors", header_bytes, group, remaining=len(group))
        files.append(f)
        for name, off in offsets.items():
            placement[name] = _Placement(i, len(header_bytes) + off)

    # 2. Stream: one verified object at a time, its tensors' bytes to their planned offsets.
    try:
        for shard_id in order:
            obj = store.read_object(manifest.shards[shard_id], shard_id=shard_id)
            data = memoryview(obj.data)
            for name, info in obj.header.tensors.items():
                target = placement.get(name)
                planned = None if target is None else files[target.file].tensors.get(name)
                if target is None or planned != (info.dtype, list(info.shape), info.nbytes):
                    raise StoreError(f"object of shard {shard_id!r} changed between planning and export ({name!r})")
                f = files[target.file]
                if f.fd is None:
                    f.fd = os.open(out / f.tmp_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    write_all(f.fd, memoryview(f.header), 0)
                start = obj.header.data_start + info.start
                write_all(f.fd, data[start : start + info.nbytes], target.offset)
                f.remaining -= 1
                if f.remaining == 0:
                    os.fsync(f.fd)
                    os.close(f.fd)
                    f.fd = None
            del data, obj
    except BaseException:
        for f in files:
            if f.fd is not None:
                os.close(f.fd)
            (out / f.tmp_name).unlink(missing_ok=True)
        raise

    # 3. Into place: data files, then the index that names them.
    for f in files:
        if f.remaining:  # only possible if a shard had no tensors in its object
            raise StoreError(f"{f.name}: {f.remaining} tensors were never written")
        os.replace(out / f.tmp_name, out / f.name)
    if config is not None:
        tmp_config = out / f"{_TMP_PREFIX}{CONFIG_NAME}.tmp"
        body = {"model_type": "kyodo-moe-policy", "kyodo_round": manifest.round, **config}
        tmp_config.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp_config, out / CONFIG_NAME)
    total = sum(nbytes for f in files for (_, _, nbytes) in f.tensors.values())
    index = {
        "metadata": {"total_size": total, "kyodo_round": manifest.round, "kyodo_manifest": manifest.digest},
        "weight_map": {name: files[p.file].name for name, p in sorted(placement.items())},
    }
    tmp_index = out / f"{_TMP_PREFIX}{INDEX_NAME}.tmp"
    with open(tmp_index, "w", encoding="utf-8") as fh:
        json.dump(index, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp_index, out / INDEX_NAME)
    fsync_dir(out)
    return ExportResult(out, [f.name for f in files], total, len(placement), manifest.round, manifest.digest)
