"""LeRobot v3.0 reader/writer: round trips, multi-file layouts, and clear errors on bad data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from parquet_edits import edit_vector, rewrite_parquet

from member_node.lerobot import IMAGE_FEATURES, STATE, DatasetError, Episode, read_dataset, write_dataset
from member_node.synthetic import generate_dataset, generate_episodes
from shared_model.config import EmbodimentConfig, load_config

EMBODIMENTS = load_config().embodiments
NAMES = sorted(EMBODIMENTS)
DATA0 = Path("data/chunk-000/file-000.parquet")


def _synth(root: Path, name: str = "so100", episodes: int = 5, seconds: float = 0.5, **kw) -> Path:
    return generate_dataset(root / name, name, EMBODIMENTS[name], episodes, seconds, seed=3, **kw)


def _read(root: Path, name: str = "so100"):
    return read_dataset(root, EMBODIMENTS[name], name)


def _assert_same(a: Episode, b: Episode) -> None:
    assert a.index == b.index
    for attr in ("state", "env_state", "image_features", "action"):
        x, y = getattr(a, attr), getattr(b, attr)
        assert (x is None) == (y is None), attr
        if x is not None:
            np.testing.assert_array_equal(x, y)
            assert y.dtype == np.float32


def _edit_info(root: Path, edit) -> Path:
    path = root / "meta" / "info.json"
    info = json.loads(path.read_text())
    edit(info)
    path.write_text(json.dumps(info))
    return path


def _rewrite_data(root: Path, edit, rel: Path = DATA0) -> Path:
    return rewrite_parquet(root / rel, edit)


def _edit_vector(table: pa.Table, col: str, row: int, value: float) -> pa.Table:
    """Set element 1 of vector column ``col`` at ``row`` to ``value``."""
    return edit_vector(table, col, row, value)


def _raises(root: Path, *fragments: str, name: str = "so100") -> str:
    with pytest.raises(DatasetError) as info:
        _read(root, name)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_every_embodiment(tmp_path: Path, name: str) -> None:
    emb = EMBODIMENTS[name]
    written = generate_episodes(name, emb, 4, 0.5, seed=3)
    root = _synth(tmp_path, name, episodes=4)
    dataset = _read(root, name)

    assert len(dataset.episodes) == 4 and dataset.fps == emb.fps
    assert dataset.num_frames == sum(ep.length for ep in written)
    for a, b in zip(written, dataset.episodes, strict=True):
        _assert_same(a, b)
    assert dataset.episodes[0].obs.shape == (written[0].length, emb.obs_dim)

    info = dataset.info
    assert info["codebase_version"] == "v3.0" and info["robot_type"] == name
    assert info["total_episodes"] == 4 and info["total_frames"] == dataset.num_frames and info["total_tasks"] == 1
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] is None and info["splits"] == {"train": "0:4"}
    features = info["features"]
    assert features["observation.state"]["shape"] == [emb.state_dim]
    assert len(features["observation.state"]["names"]) == emb.state_dim
    assert features["action"] == {"dtype": "float32", "shape": [emb.action_dim], "names": features["action"]["names"]}
    assert (IMAGE_FEATURES in features) == (emb.image_feature_dim > 0)
    assert ("observation.environment_state" in features) == (emb.env_state_dim > 0)
    for key in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert features[key]["shape"] == [1]

    # Task text as the pandas index, as LeRobot writes it (a plain column read as task 0's index).
    tasks = pq.read_table(root / "meta" / "tasks.parquet")
    assert tasks.to_pydict() == {"task_index": [0], "__index_level_0__": [tasks.column(1)[0].as_py()]}
    assert tasks.column(1)[0].as_py()  # the synthetic robot's task text
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["__index_level_0__"]
    stats = json.loads((root / "meta" / "stats.json").read_text())
    # LeRobot's QUANTILES normalisation needs q01 and q99.
    assert set(stats["observation.state"]) >= {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}
    # Each quantile the frame-weighted mean of the episodes' own, as LeRobot aggregates them.
    lengths = np.array([ep.length for ep in dataset.episodes])
    per_episode = np.stack([np.quantile(ep.state.astype(np.float64), 0.99, axis=0) for ep in dataset.episodes])
    weighted = (per_episode * lengths[:, None]).sum(axis=0) / lengths.sum()
    np.testing.assert_allclose(stats["observation.state"]["q99"], weighted, rtol=1e-6)
    state = np.concatenate([ep.state for ep in dataset.episodes]).astype(np.float64)
    np.testing.assert_allclose(stats["observation.state"]["mean"], state.mean(axis=0), rtol=1e-6)
    assert all(lo <= hi for lo, hi in zip(stats["action"]["q01"], stats["action"]["q99"], strict=True))
    meta = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet")
    first = dataset.episodes[0].state
    np.testing.assert_allclose(
        meta.column("stats/observation.state/q50")[0].as_py(), np.median(first, axis=0), rtol=1e-6
    )
    # Episode rows as LeRobot appends them when it resumes a recording on the dataset: every
    # column's stats (index columns too), count after std, integer bounds of integer columns.
    state_stats = [c.split("/")[-1] for c in meta.column_names if c.startswith("stats/observation.state/")]
    assert state_stats == ["min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"]
    for key in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert f"stats/{key}/q99" in meta.column_names
    assert meta.schema.field("stats/frame_index/max").type == pa.list_(pa.int64())
    assert meta.column("stats/frame_index/max")[0].as_py() == [written[0].length - 1]
    assert meta.column("stats/action/count")[0].as_py() == [written[0].length]
    expected = {"episode_index", "tasks", "length", "data/chunk_index", "data/file_index"}
    assert expected | {"dataset_from_index", "dataset_to_index"} <= set(meta.column_names)
    frames = pq.read_table(root / DATA0)
    assert pa.types.is_fixed_size_list(frames.schema.field("observation.state").type)
    assert frames.column("index").to_pylist() == list(range(dataset.num_frames))


def test_multi_file_and_multi_chunk(tmp_path: Path) -> None:
    emb = EMBODIMENTS["aloha"]
    episodes = generate_episodes("aloha", emb, 7, 0.4, seed=1)
    root = write_dataset(tmp_path / "ds", emb, "aloha", episodes, data_files_size_in_mb=0.002, chunks_size=2)
    files = sorted((root / "data").rglob("*.parquet"))
    assert len(files) >= 3
    assert (root / "data" / "chunk-001").is_dir()
    dataset = _read(root, "aloha")
    assert len(dataset.data_files) == len(files)
    for a, b in zip(episodes, dataset.episodes, strict=True):
        _assert_same(a, b)
    meta = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pydict()
    for ep, chunk, file in zip(meta["episode_index"], meta["data/chunk_index"], meta["data/file_index"], strict=True):
        table = pq.read_table(root / f"data/chunk-{chunk:03d}/file-{file:03d}.parquet")
        assert ep in set(table.column("episode_index").to_pylist())


def test_reads_variable_length_list_columns(tmp_path: Path) -> None:
    """Datasets written through HF `datasets` may store vectors as list<float>, not fixed-size lists."""
    root = _synth(tmp_path)
    expected = _read(root).episodes

    def to_list(table: pa.Table) -> pa.Table:
        for col in ("observation.state", "action"):
            i = table.schema.get_field_index(col)
            table = table.set_column(i, col, table.column(col).cast(pa.list_(pa.float32())))
        return table

    _rewrite_data(root, to_list)
    for a, b in zip(expected, _read(root).episodes, strict=True):
        _assert_same(a, b)


def test_fingerprint_is_stable_and_tracks_content(tmp_path: Path) -> None:
    a = _read(_synth(tmp_path / "a")).fingerprint()
    b_root = _synth(tmp_path / "b")
    assert _read(b_root).fingerprint() == a
    assert len(a) == 64 and int(a, 16) >= 0

    _rewrite_data(b_root, lambda t: _edit_vector(t, "observation.state", 0, 1.0))
    assert _read(b_root).fingerprint() != a


def test_writer_refuses_to_clobber(tmp_path: Path) -> None:
    other = tmp_path / "so100"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        _synth(tmp_path)
    with pytest.raises(FileExistsError, match="not a LeRobot dataset"):
        _synth(tmp_path, overwrite=True)
    (other / "notes.txt").unlink()
    root = _synth(tmp_path)
    with pytest.raises(FileExistsError):
        _synth(tmp_path)
    assert _synth(tmp_path, episodes=3, overwrite=True) == root
    assert len(_read(root).episodes) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- errors


def test_missing_root_and_info(tmp_path: Path) -> None:
    _raises(tmp_path / "nowhere", str(tmp_path / "nowhere"), "not found")
    root = _synth(tmp_path)
    (root / "meta" / "info.json").unlink()
    _raises(root, "meta/info.json", "not found")


def test_invalid_json(tmp_path: Path) -> None:
    root = _synth(tmp_path)
    (root / "meta" / "info.json").write_text("{not json")
    _raises(root, "meta/info.json", "invalid JSON")


def test_wrong_version(tmp_path: Path) -> None:
    root = _synth(tmp_path)
    _edit_info(root, lambda info: info.update(codebase_version="v2.1"))
    _raises(root, "meta/info.json", "'codebase_version'", "'v2.1'")


def test_missing_feature(tmp_path: Path) -> None:
    root = _synth(tmp_path)
    _edit_info(root, lambda info: info["features"].pop("observation.state"))
    _raises(root, "meta/info.json", "'observation.state'", "missing")
    # Real LeRobot recordings have state, action and cameras: the error says how a consortium
    # declares an embodiment for them.
    root = _synth(tmp_path, "franka")
    _edit_info(root, lambda info: info["features"].pop("observation.environment_state"))
    _raises(root, "meta/info.json", "'observation.environment_state'", "env_state_dim 7", "one without it declares "
            "env_state_dim 0", name="franka")  # fmt: skip


def test_state_shape_against_embodiment(tmp_path: Path) -> None:
    root = _synth(tmp_path)
    _edit_info(root, lambda info: info["features"]["observation.state"].update(shape=[7]))
    message = _raises(root)
    assert message == (
        f"{root}/meta/info.json: feature 'observation.state' has shape [7] but embodiment 'so100' declares state_dim 6"
    )


@pytest.mark.parametrize(
    ("key", "field"),
    [
        ("action", "action_dim 2"),
        ("observation.environment_state", "env_state_dim 2"),
        (IMAGE_FEATURES, "image_feature_dim 8"),
    ],
)
def test_other_shapes_against_embodiment(tmp_path: Path, key: str, field: str) -> None:
    root = _synth(tmp_path, "agv")
    _edit_info(root, lambda info: info["features"][key].update(shape=[3]))
    _raises(root, "meta/info.json", f"'{key}'", "[3]", field, name="agv")


def test_dataset_of_another_embodiment(tmp_path: Path) -> None:
    root = _synth(tmp_path, "franka")
    _raises(root, "meta/info.json", "'observation.state' has shape [15]", "'so100' declares state_dim 6")
    faster = EmbodimentConfig(**{**EMBODIMENTS["franka"].__dict__, "fps": 30})
    with pytest.raises(DatasetError, match="field 'fps' is 20 but embodiment 'mine' declares fps 30"):
        read_dataset(root, faster, "mine")


def test_corrupt_data_file(tmp_path: Path) -> None:
    root = _synth(tmp_path)
    (root / DATA0).write_bytes(b"PAR1 this is not parquet at all PAR1")
    _raises(root, str(root / DATA0), "not a readable parquet file")


def test_missing_data_file(tmp_path: Path) -> None:
    root = _synth(tmp_path)
    (root / DATA0).unlink()
    _raises(root, str(root / DATA0), "not found", "'data/file_index'")


def test_deleted_column(tmp_path: Path) -> None:
    root = _synth(tmp_path)
    _rewrite_data(root, lambda t: t.drop_columns(["action"]))
    _raises(root, str(root / DATA0), "column 'action' is missing")


def test_frame_count_disagrees_with_meta(tmp_path: Path) -> None:
    root = _synth(tmp_path)
    _rewrite_data(root, lambda t: t.slice(0, t.num_rows - 1))
    _raises(root, str(root / DATA0), "episode 4", "'length'")


def test_total_frames_disagrees(tmp_path: Path) -> None:
    root = _synth(tmp_path)
    _edit_info(root, lambda info: info.update(total_frames=info["total_frames"] + 1))
    _raises(root, "meta/info.json", "'total_frames'")


def test_missing_episode_metadata_column(tmp_path: Path) -> None:
    root = _synth(tmp_path)
    path = root / "meta/episodes/chunk-000/file-000.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["length"]), path)
    _raises(root, str(path), "column 'length' is missing")


def test_an_episode_with_non_finite_values_is_left_out_not_the_dataset(tmp_path: Path) -> None:
    """A sensor drop-out in one episode: that episode is left out and named for the member;
    the others read as before. Refusing the whole dataset told the coordinator, with
    certainty, that such an episode was there."""
    root = _synth(tmp_path)
    clean = _read(root)
    second_start = clean.episodes[0].length + clean.episodes[1].length + 2  # frame 2 of episode 2
    _rewrite_data(root, lambda t: _edit_vector(t, "action", 3, np.nan))  # episode 0, frame 3
    _rewrite_data(root, lambda t: _edit_vector(t, STATE, second_start, np.inf))
    kept = _read(root)
    assert kept.dropped == (0, 2)
    assert [e.index for e in kept.episodes] == [1, 3, 4]
    for episode in kept.episodes:
        _assert_same(clean.episodes[episode.index], episode)
    assert kept.fingerprint() != clean.fingerprint()  # the files did change


def test_a_dataset_whose_every_episode_is_left_out_is_refused(tmp_path: Path) -> None:
    """A node with nothing to train on would still join rounds: the read says so instead."""
    root = _synth(tmp_path)
    starts = np.cumsum([0] + [e.length for e in _read(root).episodes])[:-1]
    for start in starts:
        _rewrite_data(root, lambda t, row=int(start): _edit_vector(t, "action", row, np.nan))
    _raises(
        root, str(root), "no usable episode: all 5 are left out (5 with non-finite values (episodes 0, 1, 2, 3, 4))"
    )


def test_agv_image_features_that_are_not_finite_leave_their_episode_out(tmp_path: Path) -> None:
    root = _synth(tmp_path, "agv")
    _rewrite_data(root, lambda t: _edit_vector(t, IMAGE_FEATURES, 0, np.nan))
    kept = _read(root, "agv")
    assert kept.dropped == (0,) and [e.index for e in kept.episodes] == [1, 2, 3, 4]


def test_a_dataset_written_with_the_camera_embedding_s_first_name_is_still_read(tmp_path: Path) -> None:
    """kyodo first wrote the agv's camera embedding as "observation.image_features", a name the
    real LeRobot takes for a camera (it refused the stats); members' datasets from then still read."""
    root = _synth(tmp_path, "agv")
    expected = _read(root, "agv").episodes
    legacy = "observation.image_features"
    _edit_info(root, lambda info: info["features"].update({legacy: info["features"].pop(IMAGE_FEATURES)}))
    _rewrite_data(root, lambda t: t.rename_columns([legacy if c == IMAGE_FEATURES else c for c in t.column_names]))
    for a, b in zip(expected, _read(root, "agv").episodes, strict=True):
        _assert_same(a, b)


def test_an_episode_whose_timestamps_jump_is_left_out_and_an_hour_long_one_is_not(tmp_path: Path) -> None:
    """A cut in a recording (here 2 s missing inside episode 1) reads, by frame_index, as
    evenly spaced frames: its windows would pair an observation with actions from another
    moment. It is left out, like a sensor drop-out, decided by that episode alone."""
    from member_node.lerobot import UNEVEN

    root = _synth(tmp_path, episodes=4, seconds=1.0)
    clean = _read(root)
    first = clean.episodes[0].length

    def cut(table: pa.Table) -> pa.Table:
        ts = table.column("timestamp").to_numpy().copy()
        ts[first + 10 : first + clean.episodes[1].length] += 2.0
        return table.set_column(table.schema.get_field_index("timestamp"), "timestamp", pa.array(ts))

    _rewrite_data(root, cut)
    kept = _read(root)
    assert kept.left_out == {1: UNEVEN} and [e.index for e in kept.episodes] == [0, 2, 3]
    # float32 timestamps of an hour at 30 fps stay within the tolerance (rounding is ~1e-4 s there)
    emb = EMBODIMENTS["so100"]
    long = generate_episodes("so100", emb, 1, 3600.0, seed=0)
    assert long[0].length >= 100_000
    assert _read(write_dataset(tmp_path / "long", emb, "so100", long)).left_out == {}
