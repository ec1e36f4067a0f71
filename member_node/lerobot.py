"""LeRobot dataset format v3.0 on local disk, read and written with pyarrow only.

Members keep their robot episodes in the format the robot-learning community already
uses, so a member can point its node at a dataset recorded with LeRobot, and the synthetic
demo data goes through the very reader real users rely on. No hub access, no ``lerobot``
dependency: the layout is small enough to implement directly::

    meta/info.json                                   schema, fps, path templates, totals
    meta/stats.json                                  per-feature min/max/mean/std/count/quantiles
    meta/tasks.parquet                               task text (the pandas index) -> task_index
    meta/episodes/chunk-000/file-000.parquet         one row per episode: length, file, row range
    data/chunk-XXX/file-XXX.parquet                  frames of many episodes per file

The reader validates everything against the member's *declared* embodiment and raises
:class:`DatasetError` naming the file and the field, because a member debugging its data
should not have to read a pyarrow traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shared_model.config import EmbodimentConfig

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
TASKS_PATH = "meta/tasks.parquet"
DEFAULT_CHUNKS_SIZE = 1000
DEFAULT_DATA_FILES_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILES_SIZE_IN_MB = 200

STATE = "observation.state"
ENV_STATE = "observation.environment_state"
# Not "observation.image_features", the name kyodo wrote first: LeRobot takes any feature whose
# key contains "image" for a camera and refuses its (8,)-shaped stats as not (3, 1, 1) (lerobot
# 0.4.4's compute_stats; a check with the real library could neither write an agv dataset nor
# merge kyodo's). Datasets written under the old name are still read.
IMAGE_FEATURES = "observation.camera_embedding"
LEGACY_KEYS = {IMAGE_FEATURES: "observation.image_features"}
# The quantiles LeRobot's stats carry (its QUANTILES normalisation needs q01 and q99).
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
ACTION = "action"
INDEX_COLUMNS = ("timestamp", "frame_index", "episode_index", "index", "task_index")
# Why an episode is left out (LeRobotDataset.left_out).
NON_FINITE = "non-finite values"
UNEVEN = "timestamps not evenly spaced at the dataset's fps"
# How far a frame's timestamp may sit from frame_index / fps before the episode counts as
# uneven (a dropped frame or a cut is a whole period): a quarter period, far above float32
# rounding in hour-long episodes. LeRobot writes timestamp = frame_index / fps.
TIMESTAMP_TOLERANCE_PERIODS = 0.25

# (feature key, EmbodimentConfig dimension attribute, Episode attribute)
VECTOR_FEATURES = (
    (STATE, "state_dim", "state"),
    (ENV_STATE, "env_state_dim", "env_state"),
    (IMAGE_FEATURES, "image_feature_dim", "image_features"),
    (ACTION, "action_dim", "action"),
)
EPISODE_COLUMNS = (
    "episode_index",
    "length",
    "data/chunk_index",
    "data/file_index",
    "dataset_from_index",
    "dataset_to_index",
)


class DatasetError(ValueError):
    """The dataset on disk is unusable; the message names the file and the field."""


class TaskMappingError(DatasetError):
    """meta/tasks.parquet cannot say which task each frame does. Not an error of the dataset
    as such: it is read without tasks and says why (``LeRobotDataset.task_problem``), and only a
    node whose model reads the task refuses it. Such data trained before kyodo read tasks."""


@dataclass(frozen=True, eq=False)
class Episode:
    """One recorded episode, all arrays time-major ([T, dim], float32)."""

    index: int
    state: np.ndarray
    env_state: np.ndarray | None
    image_features: np.ndarray | None
    action: np.ndarray
    # The task texts of the episode (meta/tasks.parquet via each frame's task_index), and for
    # an episode whose frames name more than one, each frame's position in ``tasks`` (None:
    # every frame does ``tasks[0]``). Empty: the dataset names no task.
    tasks: tuple[str, ...] = ()
    task_of_frame: np.ndarray | None = None

    @property
    def length(self) -> int:
        return int(self.state.shape[0])

    def frame_tasks(self) -> np.ndarray:
        """``[T]`` position in ``tasks`` of each frame's task (all 0 for one task)."""
        if self.task_of_frame is None:
            return np.zeros(self.length, dtype=np.int64)
        return np.asarray(self.task_of_frame, dtype=np.int64)

    @property
    def obs(self) -> np.ndarray:
        """Proprioceptive state and environment state side by side: what the encoder sees."""
        if self.env_state is None:
            return self.state
        return np.concatenate([self.state, self.env_state], axis=-1)


@dataclass
class LeRobotDataset:
    """A validated dataset: its metadata, its episodes, and the files they came from."""

    root: Path
    info: dict[str, Any]
    episodes: list[Episode]
    embodiment_name: str
    meta_files: tuple[Path, ...] = ()
    data_files: tuple[Path, ...] = ()
    # (path relative to root, size, sha256) of every file read, hashed from the very bytes parsed
    manifest: tuple[tuple[str, int, str], ...] = field(default=(), repr=False)
    # Episodes left out, and why: a frame holds a non-finite value (NON_FINITE), or frames are
    # not evenly spaced at the dataset's fps (UNEVEN): see ``_split_file``. For the member's own
    # eyes (``data inspect``, the node's log) only.
    left_out: Mapping[int, str] = field(default_factory=dict)
    # Why the episodes carry no task although the dataset has meta/tasks.parquet (a
    # TaskMappingError's message), or None.
    task_problem: str | None = None

    @property
    def dropped(self) -> tuple[int, ...]:
        return tuple(sorted(self.left_out))

    @property
    def fps(self) -> int:
        return int(self.info["fps"])

    @property
    def num_frames(self) -> int:
        return sum(ep.length for ep in self.episodes)

    def fingerprint(self) -> str:
        """sha256 of the manifest (info, episode metadata, data file hashes and sizes).

        It identifies exactly which data a node trained on, for ledgers and resumption,
        while revealing nothing about the frames themselves. The file hashes are taken
        from the bytes the reader parsed, so a file changed after reading cannot make the
        fingerprint disagree with the episodes in memory.
        """
        return _manifest_digest(b"kyodo/lerobot-fingerprint/v2\n", self.manifest)

    def legacy_fingerprints(self) -> list[str]:
        """The fingerprint kyodo gave this data before it read meta/tasks.parquet (``v1``: the
        same manifest without that file), so receipts made then still match their data."""
        files = [entry for entry in self.manifest if entry[0] != TASKS_PATH]
        return [_manifest_digest(b"kyodo/lerobot-fingerprint/v1\n", files)]


def _manifest_digest(version: bytes, manifest: Sequence[tuple[str, int, str]]) -> str:
    digest = hashlib.sha256(version)
    for rel, size, sha in manifest:
        digest.update(f"{rel}\t{size}\t{sha}\n".encode())
    return digest.hexdigest()


class _Manifest:
    """Records (relative path, size, sha256) of each file as it is read."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.entries: list[tuple[str, int, str]] = []

    def read_bytes(self, path: Path) -> bytes:
        data = path.read_bytes()
        self.entries.append((path.relative_to(self.root).as_posix(), len(data), hashlib.sha256(data).hexdigest()))
        return data


# ----------------------------------------------------------------------------- writer


def write_dataset(
    root: Path | str,
    embodiment: EmbodimentConfig,
    embodiment_name: str,
    episodes: Sequence[Episode],
    *,
    task: str = "",
    names: Mapping[str, Sequence[str]] | None = None,
    data_files_size_in_mb: float = DEFAULT_DATA_FILES_SIZE_IN_MB,
    chunks_size: int = DEFAULT_CHUNKS_SIZE,
    overwrite: bool = False,
) -> Path:
    """Write ``episodes`` as a LeRobot v3.0 dataset at ``root`` and return ``root``.

    Each episode does the tasks it names (``Episode.tasks``), or ``task`` if it names none;
    the dataset's tasks are numbered in order of first use. Episodes are renumbered 0..N-1 in
    the given order, as the format requires. Data is
    split into several files once a file would exceed ``data_files_size_in_mb`` (an
    episode never spans two files). The dataset is built in a sibling temporary folder
    and renamed into place, so a crash never leaves a half-written dataset behind.
    """
    root = Path(root)
    if not episodes:
        raise ValueError("write_dataset needs at least one episode")
    if chunks_size < 1 or data_files_size_in_mb <= 0:
        raise ValueError("chunks_size and data_files_size_in_mb must be positive")
    for position, ep in enumerate(episodes):
        _check_episode(ep, position, embodiment, embodiment_name)
    _check_target(root, overwrite)

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write_all(tmp, embodiment, embodiment_name, episodes, task, names or {}, data_files_size_in_mb, chunks_size)
        _swap_into_place(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _swap_into_place(new: Path, root: Path) -> None:
    """Rename ``new`` to ``root``; an old dataset is moved aside first and deleted last."""
    if not root.exists():
        os.replace(new, root)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    os.replace(root, old / "dataset")
    os.replace(new, root)
    shutil.rmtree(old, ignore_errors=True)


def _check_target(root: Path, overwrite: bool) -> None:
    """Refuse to clobber anything that is not an (empty dir or) earlier dataset."""
    if not root.exists():
        return
    if not root.is_dir():
        raise FileExistsError(f"{root}: exists and is not a directory")
    if not any(root.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{root}: already exists and is not empty")
    if not (root / "meta" / "info.json").is_file():
        raise FileExistsError(f"{root}: not a LeRobot dataset; refusing to overwrite it")


def _check_episode(ep: Episode, position: int, emb: EmbodimentConfig, name: str) -> None:
    length = ep.state.shape[0] if ep.state.ndim == 2 else -1
    if length < 1:
        raise ValueError(f"episode {position}: state must be [T>=1, state_dim], got {ep.state.shape}")
    for key, dim_attr, attr in VECTOR_FEATURES:
        dim = getattr(emb, dim_attr)
        arr = getattr(ep, attr)
        if dim == 0:
            if arr is not None:
                raise ValueError(f"episode {position}: has {attr} but embodiment {name!r} declares {dim_attr} 0")
            continue
        if arr is None or arr.shape != (length, dim):
            shape = None if arr is None else arr.shape
            raise ValueError(f"episode {position}: {key} has shape {shape}, expected ({length}, {dim}) for {name!r}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"episode {position}: {key} has non-finite values")
    if ep.task_of_frame is not None:
        which = np.asarray(ep.task_of_frame)
        if which.shape != (length,) or not len(ep.tasks) or which.min() < 0 or which.max() >= len(ep.tasks):
            raise ValueError(
                f"episode {position}: task_of_frame needs one position in its {len(ep.tasks)} tasks per frame"
            )


def _write_all(
    root: Path,
    emb: EmbodimentConfig,
    name: str,
    episodes: Sequence[Episode],
    task: str,
    names: Mapping[str, Sequence[str]],
    size_mb: float,
    chunks_size: int,
) -> None:
    keys = [(key, attr) for key, dim_attr, attr in VECTOR_FEATURES if getattr(emb, dim_attr) > 0]
    lengths = np.array([ep.length for ep in episodes], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    columns = {key: np.concatenate([getattr(ep, attr) for ep in episodes]).astype(np.float32) for key, attr in keys}
    tasks, episode_tasks, task_index = _task_columns(episodes, task)
    frame_columns = _index_columns(lengths, emb.fps, task_index)
    files = _assign_files(lengths, _bytes_per_frame(columns), size_mb, chunks_size)

    for (chunk, file), eps in _group_by_file(files).items():
        lo, hi = int(starts[eps[0]]), int(starts[eps[-1]] + lengths[eps[-1]])
        table = _frames_table(
            {k: v[lo:hi] for k, v in columns.items()}, {k: v[lo:hi] for k, v in frame_columns.items()}
        )
        _write_parquet(root / DATA_PATH.format(chunk_index=chunk, file_index=file), table)

    episode_table = _episodes_table(lengths, starts, files, episode_tasks, {**columns, **frame_columns})
    _write_parquet(root / EPISODES_PATH.format(chunk_index=0, file_index=0), episode_table)
    _write_parquet(root / TASKS_PATH, _tasks_table(tasks))
    stats = {k: _stats(v, starts) for k, v in {**columns, **frame_columns}.items()}
    _write_json(root / "meta" / "stats.json", stats)
    info = _info(emb, name, keys, names, len(episodes), int(lengths.sum()), len(tasks), size_mb, chunks_size)
    _write_json(root / "meta" / "info.json", info)


def frame_task_ids(episodes: Sequence[Episode], default: str = "") -> tuple[list[str], list[np.ndarray]]:
    """One list of the task texts the episodes' frames do (first use first), and for each
    episode its frames' positions in that list. An episode naming no task does ``default``.
    A text an episode lists but no frame does is left out, as LeRobot collects an episode's
    tasks from its frames (written, it counted in ``total_tasks`` and read back nowhere)."""
    tasks: dict[str, int] = {}
    per_episode: list[np.ndarray] = []
    for ep in episodes:
        own = list(ep.tasks) or [default]
        which = ep.frame_tasks()
        _, first = np.unique(which, return_index=True)
        index = np.zeros(len(own), dtype=np.int64)
        for position in which[np.sort(first)]:  # in the order the frames meet them
            index[position] = tasks.setdefault(own[position], len(tasks))
        per_episode.append(index[which])
    return list(tasks), per_episode


def _task_columns(episodes: Sequence[Episode], default: str) -> tuple[list[str], list[list[str]], np.ndarray]:
    """The dataset's task texts, each episode's (in frame order), and every frame's task_index."""
    tasks, per_episode = frame_task_ids(episodes, default)
    episode_tasks = [[tasks[i] for i in dict.fromkeys(ids.tolist())] for ids in per_episode]
    return tasks, episode_tasks, np.concatenate(per_episode)


def _tasks_table(tasks: Sequence[str]) -> pa.Table:
    """Task text -> task_index as LeRobot writes it: a pandas frame indexed by the text. With a
    plain ``task`` column instead (kyodo's first layout) LeRobot read every task as its index
    number and a recording resumed on the dataset failed (``ArrowTypeError``)."""
    index = "__index_level_0__"
    pandas_meta = {
        "index_columns": [index],
        "column_indexes": [
            {"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
             "metadata": {"encoding": "UTF-8"}},
        ],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None},
            {"name": None, "field_name": index, "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
        ],
        "attributes": {},
        "creator": {"library": "pyarrow", "version": pa.__version__},
    }  # fmt: skip
    table = pa.table({"task_index": pa.array(range(len(tasks)), type=pa.int64()), index: pa.array(list(tasks))})
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


def _index_columns(lengths: np.ndarray, fps: int, task_index: np.ndarray) -> dict[str, np.ndarray]:
    total = int(lengths.sum())
    episode_index = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    frame_index = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
    return {
        "timestamp": (frame_index / float(fps)).astype(np.float32),
        "frame_index": frame_index,
        "episode_index": episode_index,
        "index": np.arange(total, dtype=np.int64),
        "task_index": task_index,
    }


def _bytes_per_frame(columns: Mapping[str, np.ndarray]) -> int:
    return sum(4 * v.shape[1] for v in columns.values()) + 4 + 8 * 4


def _assign_files(lengths: np.ndarray, bytes_per_frame: int, size_mb: float, chunks_size: int) -> list[tuple[int, int]]:
    """(chunk, file) per episode: start a new file when the current one would overflow."""
    limit = size_mb * 1024 * 1024
    chunk = file = 0
    used = 0
    out = []
    for length in lengths:
        size = int(length) * bytes_per_frame
        if used and used + size > limit:
            chunk, file = (chunk + 1, 0) if file + 1 >= chunks_size else (chunk, file + 1)
            used = 0
        used += size
        out.append((chunk, file))
    return out


def _group_by_file(files: Sequence[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for ep, key in enumerate(files):
        groups.setdefault(key, []).append(ep)
    return groups


def _vector_array(values: np.ndarray) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def _frames_table(vectors: Mapping[str, np.ndarray], scalars: Mapping[str, np.ndarray]) -> pa.Table:
    arrays = {k: _vector_array(v) for k, v in vectors.items()}
    arrays.update({k: pa.array(v) for k, v in scalars.items()})
    return pa.table(arrays)


def _episodes_table(
    lengths: np.ndarray,
    starts: np.ndarray,
    files: Sequence[tuple[int, int]],
    episode_tasks: Sequence[Sequence[str]],
    columns: Mapping[str, np.ndarray],
) -> pa.Table:
    n = len(lengths)
    data: dict[str, Any] = {
        "episode_index": pa.array(np.arange(n, dtype=np.int64)),
        "tasks": pa.array([list(t) for t in episode_tasks], type=pa.list_(pa.string())),
        "length": pa.array(lengths),
        "data/chunk_index": pa.array(np.array([c for c, _ in files], dtype=np.int64)),
        "data/file_index": pa.array(np.array([f for _, f in files], dtype=np.int64)),
        "dataset_from_index": pa.array(starts),
        "dataset_to_index": pa.array(starts + lengths),
    }
    # Every column's stats, index columns included, in LeRobot's order (count after std): a
    # recording LeRobot resumes on the dataset appends episode rows of exactly this schema, and
    # with fewer columns its reader refused the second metadata file.
    for key, values in columns.items():
        integer = np.issubdtype(values.dtype, np.integer)
        for stat, per_episode in _episode_stats(values, starts).items():
            exact = stat == "count" or (integer and stat in ("min", "max"))
            rows = per_episode.reshape(n, -1)
            data[f"stats/{key}/{stat}"] = pa.array(
                rows.astype(np.int64).tolist() if exact else rows.tolist(),
                type=pa.list_(pa.int64() if exact else pa.float64()),
            )
    data["meta/episodes/chunk_index"] = pa.array(np.zeros(n, dtype=np.int64))
    data["meta/episodes/file_index"] = pa.array(np.zeros(n, dtype=np.int64))
    return pa.table(data)


def _episode_stats(values: np.ndarray, starts: np.ndarray) -> dict[str, np.ndarray]:
    """Per-episode min/max/mean/std without a Python loop over episodes (np.ufunc.reduceat)."""
    v = values.astype(np.float64).reshape(len(values), -1)
    counts = np.diff(np.append(starts, len(v)))[:, None]
    mean = np.add.reduceat(v, starts, axis=0) / counts
    sq = np.add.reduceat(v * v, starts, axis=0) / counts
    # np.quantile has no reduceat: one call per episode (2000 episodes of so100: about 0.1 s)
    ends = np.append(starts[1:], len(v))
    quantiles = np.stack([np.quantile(v[a:b], QUANTILES, axis=0) for a, b in zip(starts, ends, strict=True)], axis=1)
    return {
        "min": np.minimum.reduceat(v, starts, axis=0),
        "max": np.maximum.reduceat(v, starts, axis=0),
        "mean": mean,
        "std": np.sqrt(np.maximum(sq - mean * mean, 0.0)),
        "count": counts.astype(np.int64),
        **{f"q{round(q * 100):02d}": per_episode for q, per_episode in zip(QUANTILES, quantiles, strict=True)},
    }


def _stats(values: np.ndarray, starts: np.ndarray) -> dict[str, list[float] | list[int]]:
    """The whole dataset's stats (meta/stats.json). min/max/mean/std/count are exact; each
    quantile is the frame-weighted mean of the episodes' own, as LeRobot aggregates them
    (``aggregate_feature_stats``): with exact dataset quantiles instead, a policy normalising by
    quantiles scaled the same data up to 2x differently when kyodo wrote it than when LeRobot
    did, and a recording LeRobot resumed on kyodo's data mixed the two definitions."""
    whole = {stat: rows[0] for stat, rows in _episode_stats(values, np.zeros(1, dtype=np.int64)).items()}
    episodes = _episode_stats(values, starts)
    counts = episodes["count"].astype(np.float64)  # [episodes, 1]
    for stat in whole:
        if stat.startswith("q"):
            whole[stat] = (episodes[stat] * counts).sum(axis=0) / counts.sum()
    return {stat: (row.astype(int) if stat == "count" else row).tolist() for stat, row in whole.items()}


def _info(
    emb: EmbodimentConfig,
    name: str,
    keys: Sequence[tuple[str, str]],
    names: Mapping[str, Sequence[str]],
    n_episodes: int,
    n_frames: int,
    n_tasks: int,
    size_mb: float,
    chunks_size: int,
) -> dict[str, Any]:
    dims = {key: getattr(emb, dim_attr) for key, dim_attr, _ in VECTOR_FEATURES}
    features: dict[str, Any] = {}
    for key, _ in keys:
        feature_names = list(names.get(key, [f"{key}.{i}" for i in range(dims[key])]))
        if len(feature_names) != dims[key]:
            raise ValueError(f"names for {key} has {len(feature_names)} entries but the feature has {dims[key]}")
        features[key] = {"dtype": "float32", "shape": [dims[key]], "names": feature_names}
    features["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
    for key in INDEX_COLUMNS[1:]:
        features[key] = {"dtype": "int64", "shape": [1], "names": None}
    return {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": name,
        "total_episodes": n_episodes,
        "total_frames": n_frames,
        "total_tasks": n_tasks,
        "chunks_size": chunks_size,
        "data_files_size_in_mb": size_mb,
        "video_files_size_in_mb": DEFAULT_VIDEO_FILES_SIZE_IN_MB,
        "fps": emb.fps,
        "splits": {"train": f"0:{n_episodes}"},
        "data_path": DATA_PATH,
        "video_path": None,
        "features": features,
    }


def _write_parquet(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ----------------------------------------------------------------------------- reader


def read_dataset(root: Path | str, embodiment: EmbodimentConfig, embodiment_name: str) -> LeRobotDataset:
    """Read and validate a LeRobot v3.0 dataset against the member's declared embodiment."""
    root = Path(root)
    info_path = root / "meta" / "info.json"
    manifest = _Manifest(root)
    info = _read_info(root, info_path, manifest)
    keys = _check_info(info, info_path, embodiment, embodiment_name)
    meta, meta_files = _read_episode_meta(root, info, info_path, manifest)
    tasks, task_problem = None, None
    try:
        tasks = _read_tasks(root, manifest)
    except TaskMappingError as err:
        task_problem = str(err)
    read_so_far = len(manifest.entries)
    try:
        episodes, data_files, left_out = _read_frames(root, info, meta, embodiment, manifest, keys, tasks)
    except TaskMappingError as err:  # frames name a task tasks.parquet lacks: read them without tasks
        task_problem = str(err)
        del manifest.entries[read_so_far:]
        episodes, data_files, left_out = _read_frames(root, info, meta, embodiment, manifest, keys, None)
    if not episodes:
        # A node with nothing to train on would still join and announce itself: refuse here,
        # where `data inspect`, `init` and `start` all look.
        raise no_usable_episode(root, left_out)
    return LeRobotDataset(
        root=root,
        info=info,
        episodes=episodes,
        embodiment_name=embodiment_name,
        meta_files=tuple(meta_files),
        data_files=tuple(data_files),
        manifest=tuple(manifest.entries),
        left_out=left_out,
        task_problem=task_problem,
    )


def distinct_tasks(episodes: Sequence[Episode]) -> list[str]:
    """The task texts the episodes name, in order of first use."""
    return list(dict.fromkeys(t for ep in episodes for t in ep.tasks))


def no_usable_episode(root: Path, left_out: Mapping[int, str]) -> DatasetError:
    """What a node with nothing to train on says: every episode left out, or none listed."""
    why = f"all {len(left_out)} are left out ({left_out_text(left_out)})" if left_out else "it lists none"
    return DatasetError(f"{root}: no usable episode: {why}")


def left_out_text(left_out: Mapping[int, str], shown: int = 20) -> str:
    """ "2 with non-finite values (episodes 3, 7); 1 with timestamps ... (episode 5)"."""
    by_reason: dict[str, list[int]] = {}
    for episode, reason in sorted(left_out.items()):
        by_reason.setdefault(reason, []).append(episode)
    parts = []
    for reason, episodes in by_reason.items():
        listed = ", ".join(map(str, episodes[:shown])) + (", ..." if len(episodes) > shown else "")
        parts.append(f"{len(episodes)} with {reason} (episode{'s' if len(episodes) > 1 else ''} {listed})")
    return "; ".join(parts)


def _read_info(root: Path, info_path: Path, manifest: _Manifest) -> dict[str, Any]:
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset directory not found (expected meta/info.json inside it)")
    if not info_path.is_file():
        raise DatasetError(f"{info_path}: file not found (every LeRobot dataset has meta/info.json)")
    try:
        info = json.loads(manifest.read_bytes(info_path).decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{info_path}: invalid JSON: {err}") from None
    if not isinstance(info, dict):
        raise DatasetError(f"{info_path}: top level must be a JSON object, not {type(info).__name__}")
    return info


def _require(info: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if key not in info:
        raise DatasetError(f"{path}: field {key!r} is missing")
    value = info[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DatasetError(f"{path}: field {key!r} has the wrong type ({type(value).__name__}: {value!r})")
    return value


def _present_key(features: Mapping[str, Any], key: str) -> str:
    """The name the dataset gives a feature: ``key``, or the name kyodo wrote it under before."""
    legacy = LEGACY_KEYS.get(key)
    return legacy if key not in features and legacy in features else key


def _check_info(info: dict[str, Any], path: Path, emb: EmbodimentConfig, name: str) -> dict[str, str]:
    """Check the schema against the embodiment; returns each vector feature's column name."""
    version = info.get("codebase_version")
    if version != CODEBASE_VERSION:
        raise DatasetError(
            f"{path}: field 'codebase_version' is {version!r} but only {CODEBASE_VERSION!r} is supported"
            " (convert older datasets with LeRobot's v2.1 -> v3.0 converter)"
        )
    features = _require(info, "features", dict, path)
    keys = {key: _present_key(features, key) for key, _, _ in VECTOR_FEATURES}
    for key, dim_attr, _ in VECTOR_FEATURES:
        _check_vector_feature(features, keys[key], getattr(emb, dim_attr), dim_attr, path, name)
    for key in INDEX_COLUMNS:
        if key not in features:
            raise DatasetError(f"{path}: feature {key!r} is missing from 'features'")
    # The policy's history and action chunk span a fixed time: a different rate changes their meaning.
    fps = _require(info, "fps", (int, float), path)
    if fps != emb.fps:
        raise DatasetError(f"{path}: field 'fps' is {fps} but embodiment {name!r} declares fps {emb.fps}")
    data_path = _require(info, "data_path", str, path)
    try:
        data_path.format(chunk_index=0, file_index=0)
    except (KeyError, IndexError, ValueError) as err:
        raise DatasetError(f"{path}: field 'data_path' {data_path!r} is not a valid path template ({err})") from None
    for key in ("total_episodes", "total_frames"):
        _require(info, key, int, path)
    return keys


def _check_vector_feature(
    features: Mapping[str, Any], key: str, dim: int, dim_attr: str, path: Path, name: str
) -> None:
    spec = features.get(key)
    if spec is None:
        if dim > 0:
            # A LeRobot recording typically has state, action and cameras only.
            raise DatasetError(
                f"{path}: feature {key!r} is missing but embodiment {name!r} declares {dim_attr} {dim} (the "
                f"consortium's embodiments must match what members record: one without it declares {dim_attr} 0)"
            )
        return
    if not isinstance(spec, dict):
        raise DatasetError(f"{path}: feature {key!r} must be an object with dtype/shape/names")
    shape = spec.get("shape")
    if shape != [dim]:
        raise DatasetError(
            f"{path}: feature {key!r} has shape {shape} but embodiment {name!r} declares {dim_attr} {dim}"
        )
    dtype = spec.get("dtype")
    if dtype not in ("float32", "float64"):
        raise DatasetError(f"{path}: feature {key!r} has dtype {dtype!r}; expected 'float32'")


def _read_episode_meta(
    root: Path, info: Mapping[str, Any], info_path: Path, manifest: _Manifest
) -> tuple[dict[str, np.ndarray], list[Path]]:
    meta_dir = root / "meta" / "episodes"
    files = sorted(meta_dir.glob("chunk-*/file-*.parquet"))
    if not files:
        raise DatasetError(f"{meta_dir}: no episode metadata (expected chunk-000/file-000.parquet)")
    parts: dict[str, list[np.ndarray]] = {col: [] for col in EPISODE_COLUMNS}
    for path in files:
        table = _read_parquet(path, EPISODE_COLUMNS, manifest)
        for col in EPISODE_COLUMNS:
            parts[col].append(_int_column(table, col, path))
    meta = {col: np.concatenate(chunks) for col, chunks in parts.items()}
    order = np.argsort(meta["episode_index"], kind="stable")
    meta = {col: values[order] for col, values in meta.items()}
    meta["_meta_file"] = np.concatenate([np.full(len(p), i) for i, p in enumerate(parts["episode_index"])])[order]
    _check_episode_meta(meta, files, info, info_path)
    return meta, files


def _check_episode_meta(
    meta: Mapping[str, np.ndarray], files: Sequence[Path], info: Mapping[str, Any], info_path: Path
) -> None:
    ids = meta["episode_index"]
    if len(np.unique(ids)) != len(ids):
        raise DatasetError(f"{files[0].parent.parent}: field 'episode_index' lists an episode twice")
    if len(ids) != info["total_episodes"]:
        raise DatasetError(
            f"{info_path}: field 'total_episodes' is {info['total_episodes']} but meta/episodes lists {len(ids)}"
        )
    span = meta["dataset_to_index"] - meta["dataset_from_index"]
    for i in np.flatnonzero((meta["length"] < 1) | (span != meta["length"])):
        path = files[int(meta["_meta_file"][i])]
        raise DatasetError(
            f"{path}: episode {int(ids[i])} field 'length' is {int(meta['length'][i])} but "
            f"'dataset_to_index' - 'dataset_from_index' is {int(span[i])}"
        )
    total = int(meta["length"].sum())
    if total != info["total_frames"]:
        raise DatasetError(
            f"{info_path}: field 'total_frames' is {info['total_frames']} but meta/episodes sums to {total}"
        )


def _read_tasks(root: Path, manifest: _Manifest) -> dict[int, str] | None:
    """task_index -> text from meta/tasks.parquet (None when the dataset has no such file).

    LeRobot writes it from a pandas frame indexed by the text, so the text is the file's one
    string column, whatever its name (``__index_level_0__``, or ``task`` for a named index).
    """
    path = root / TASKS_PATH
    if not path.is_file():
        return None
    try:
        table = _read_parquet(path, ["task_index"], manifest, all_columns=True)
        ids = _int_column(table, "task_index", path)
    except DatasetError as err:
        raise TaskMappingError(str(err)) from None
    text_columns = [f.name for f in table.schema if _is_text(f.type)]
    if len(text_columns) != 1:
        raise TaskMappingError(f"{path}: expected one text column (the task) beside 'task_index', found {text_columns}")
    texts = table.column(text_columns[0]).cast(pa.string())
    if texts.null_count:
        raise TaskMappingError(f"{path}: column {text_columns[0]!r} has null rows")
    if len(np.unique(ids)) != len(ids):
        raise TaskMappingError(f"{path}: column 'task_index' names a task twice")
    return dict(zip(ids.tolist(), texts.to_pylist(), strict=True))


def _is_text(kind: pa.DataType) -> bool:
    """A string column, plain or dictionary-encoded (pandas categoricals are written so)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _read_parquet(path: Path, columns: Sequence[str], manifest: _Manifest, *, all_columns: bool = False) -> pa.Table:
    """Read ``columns`` of one parquet file, turning every failure into a DatasetError."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        parquet = pq.ParquetFile(pa.BufferReader(manifest.read_bytes(path)))
        present = set(parquet.schema_arrow.names)
        for col in columns:
            if col not in present:
                raise DatasetError(f"{path}: column {col!r} is missing")
        return parquet.read() if all_columns else parquet.read(columns=list(columns))
    except DatasetError:
        raise
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DatasetError(f"{path}: not a readable parquet file ({err})") from None


def _int_column(table: pa.Table, col: str, path: Path) -> np.ndarray:
    column = table.column(col)
    if column.null_count or not pa.types.is_integer(column.type):
        raise DatasetError(f"{path}: column {col!r} must hold integers without nulls (type {column.type})")
    return column.to_numpy().astype(np.int64)


def _vector_column(table: pa.Table, col: str, dim: int, path: Path) -> np.ndarray:
    """A list<float> column as a [rows, dim] float32 array, with shape and null checks."""
    column = table.column(col).combine_chunks()
    if column.null_count:
        raise DatasetError(f"{path}: column {col!r} has null rows")
    kind = column.type
    if pa.types.is_fixed_size_list(kind):
        width = kind.list_size
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        widths = _list_lengths(column)
        width = int(widths[0]) if len(widths) else dim
        if len(widths) and np.any(widths != width):
            raise DatasetError(f"{path}: column {col!r} has rows of different lengths")
    else:
        raise DatasetError(f"{path}: column {col!r} has type {kind}; expected a list of floats")
    if width != dim:
        raise DatasetError(f"{path}: column {col!r} has rows of length {width} but meta/info.json declares {dim}")
    if not pa.types.is_floating(kind.value_type):
        raise DatasetError(f"{path}: column {col!r} holds {kind.value_type}; expected float32")
    values = column.flatten()
    if values.null_count:
        raise DatasetError(f"{path}: column {col!r} has null values")
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(column), dim)


def _float_column(table: pa.Table, col: str, path: Path) -> np.ndarray:
    column = table.column(col)
    if column.null_count or not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
        raise DatasetError(f"{path}: column {col!r} must hold numbers without nulls (type {column.type})")
    return column.to_numpy().astype(np.float64)


def _list_lengths(column: pa.Array) -> np.ndarray:
    """Row lengths of a (large) list array."""
    return np.diff(column.offsets.to_numpy())


def _read_frames(
    root: Path,
    info: Mapping[str, Any],
    meta: Mapping[str, np.ndarray],
    emb: EmbodimentConfig,
    manifest: _Manifest,
    keys: Mapping[str, str],
    tasks: Mapping[int, str] | None,
) -> tuple[list[Episode], list[Path], list[int]]:
    vectors = {
        attr: (keys[key], getattr(emb, dim_attr)) for key, dim_attr, attr in VECTOR_FEATURES if getattr(emb, dim_attr)
    }
    columns = ["episode_index", "frame_index", "timestamp", *(key for key, _ in vectors.values())]
    if tasks is not None:
        columns.append("task_index")
    file_of = np.stack([meta["data/chunk_index"], meta["data/file_index"]], axis=1)
    keys, inverse = np.unique(file_of, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    episodes: list[Episode | None] = [None] * len(meta["episode_index"])
    data_files: list[Path] = []
    left_out: dict[int, str] = {}
    for k, (chunk, file) in enumerate(keys):
        path = root / info["data_path"].format(chunk_index=int(chunk), file_index=int(file))
        rows = np.flatnonzero(inverse == k)
        if not path.is_file():
            ep = int(meta["episode_index"][rows[0]])
            raise DatasetError(
                f"{path}: data file not found (named by meta/episodes fields"
                f" 'data/chunk_index', 'data/file_index' of episode {ep})"
            )
        table = _read_parquet(path, columns, manifest)
        split = _split_file(table, path, meta, rows, vectors, float(info["fps"]), tasks)
        for row, episode in zip(rows, split, strict=True):
            if isinstance(episode, str):
                left_out[int(meta["episode_index"][row])] = episode
            else:
                episodes[row] = episode
        data_files.append(path)
    return [ep for ep in episodes if ep is not None], data_files, left_out


def _split_file(
    table: pa.Table,
    path: Path,
    meta: Mapping[str, np.ndarray],
    rows: np.ndarray,
    vectors: Mapping[str, tuple[str, int]],
    fps: float,
    tasks: Mapping[int, str] | None,
) -> list[Episode | str]:
    """Cut one data file into its episodes, checking counts and frame order.

    An episode with a non-finite value in any frame (a sensor drop-out), or whose timestamps
    are not frame_index / fps (a cut or dropped frames: windows across it would pair an
    observation with actions from another moment), comes back as the reason: left out, not
    an error. Why: refusing the whole dataset for it made one such episode
    visible to the coordinator with certainty (every request answered with a data error
    instead of an update), a difference between neighbouring datasets that no epsilon
    covers. Leaving it out is decided by that episode alone, so a dataset with it behaves
    exactly as the dataset without it. Structural faults (counts, frame order, files) are
    faults of how the dataset was written, not of one episode's content, and stay errors.
    """
    episode_index = _int_column(table, "episode_index", path)
    frame_index = _int_column(table, "frame_index", path)
    timestamp = _float_column(table, "timestamp", path)
    arrays = {attr: _vector_column(table, key, dim, path) for attr, (key, dim) in vectors.items()}
    task_index = None
    if tasks is not None:
        task_index = _int_column(table, "task_index", path)
        unknown = np.setdiff1d(np.unique(task_index), np.fromiter(tasks, dtype=np.int64, count=len(tasks)))
        if len(unknown):
            raise TaskMappingError(
                f"{path}: column 'task_index' holds {int(unknown[0])}, which meta/tasks.parquet does not list"
            )
    finite = np.ones(len(episode_index), dtype=bool)
    for values in arrays.values():
        finite &= np.isfinite(values).all(axis=1)
    non_finite_episodes = set(np.unique(episode_index[~finite]).tolist())
    order = np.lexsort((frame_index, episode_index))
    sorted_eps = episode_index[order]
    wanted = meta["episode_index"][rows]
    stray = np.setdiff1d(np.unique(sorted_eps), wanted)
    if len(stray):
        raise DatasetError(
            f"{path}: column 'episode_index' holds episode {int(stray[0])}, which meta/episodes places elsewhere"
        )
    lo = np.searchsorted(sorted_eps, wanted, side="left")
    hi = np.searchsorted(sorted_eps, wanted, side="right")
    out = []
    for ep_id, a, b, length in zip(wanted, lo, hi, meta["length"][rows], strict=True):
        if b - a != length:
            raise DatasetError(
                f"{path}: episode {int(ep_id)} has {int(b - a)} frames"
                f" but meta/episodes field 'length' is {int(length)}"
            )
        idx = order[a:b]
        if not np.array_equal(frame_index[idx], np.arange(length)):
            raise DatasetError(f"{path}: column 'frame_index' of episode {int(ep_id)} is not 0..{int(length) - 1}")
        if int(ep_id) in non_finite_episodes:
            out.append(NON_FINITE)
            continue
        offsets = timestamp[idx] - timestamp[idx[0]] - np.arange(length) / fps
        if not np.all(np.abs(offsets) <= TIMESTAMP_TOLERANCE_PERIODS / fps):
            out.append(UNEVEN)
            continue
        out.append(
            Episode(
                index=int(ep_id),
                state=arrays["state"][idx],
                env_state=arrays["env_state"][idx] if "env_state" in arrays else None,
                image_features=arrays["image_features"][idx] if "image_features" in arrays else None,
                action=arrays["action"][idx],
                **_episode_tasks(task_index, idx, tasks),
            )
        )
    return out


def _episode_tasks(task_index: np.ndarray | None, idx: np.ndarray, tasks: Mapping[int, str] | None) -> dict[str, Any]:
    """``tasks`` and ``task_of_frame`` of one episode from its frames' task_index."""
    if task_index is None or tasks is None:
        return {}
    ids, first, which = np.unique(task_index[idx], return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # tasks in the order the episode meets them
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    texts = tuple(tasks[int(i)] for i in ids[order])
    return {"tasks": texts, "task_of_frame": None if len(ids) == 1 else rank[which.reshape(-1)].astype(np.int64)}
