"""Task conditioning: the task text from LeRobot's tasks.parquet through the windows into the
policy's shared ``task_proj``, and the synthetic subtask data that needs it."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from member_node.lerobot import Episode, read_dataset, write_dataset
from member_node.synthetic import generate_dataset, generate_episodes
from member_node.windows import EpisodeWindows
from shared_model.config import ConfigError, load_config
from shared_model.policy import Policy
from shared_model.shards import SHARED_ADAPTER, ShardLayout, set_trainable, shard_of, trainable_names
from shared_model.task_text import task_table, task_vector, task_words

BUCKETS = 64


@pytest.fixture(scope="module")
def cfg():
    return load_config(model="tiny")


# ----------------------------------------------------------------------------- hashing


def test_task_vector_is_unit_length_and_ignores_case_and_punctuation():
    a = task_vector("Pick up the red cube.", BUCKETS)
    assert a.shape == (BUCKETS,) and a.dtype == np.float32
    assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(a, task_vector("pick  up, the RED cube", BUCKETS))
    assert task_words("Pick up!") == ["pick", "up", "pick up"]


def test_non_ascii_words_count():
    """Every script's words are read: two Japanese tasks differ, share their common part,
    and an umlaut is part of its word."""
    red, blue = task_vector("赤いキューブを拾う", 256), task_vector("青いキューブを拾う", 256)
    assert red.any() and blue.any() and not np.array_equal(red, blue)
    assert 0.5 < float(red @ blue) < 1.0
    assert not np.array_equal(task_vector("öffnen", 256), task_vector("ffnen", 256))
    np.testing.assert_array_equal(task_vector("Öffnen", 256), task_vector("öffnen", 256))
    assert task_words("café au lait") == ["café", "au", "lait", "café au", "au lait"]


def test_empty_task_is_the_zero_vector():
    assert not task_vector("", BUCKETS).any()
    assert not task_vector(" ... ", BUCKETS).any()


def test_different_tasks_and_word_orders_differ():
    reach = task_vector("move to the goal and close the gripper", 256)
    home = task_vector("return to the home configuration and keep the gripper open", 256)
    assert float(reach @ home) < 0.7
    assert not np.array_equal(task_vector("move left", 256), task_vector("left move", 256))


def test_task_vector_is_the_same_in_another_process():
    """Every node must compute the same vector: no per-process salt (Python's hash())."""
    code = "from shared_model.task_text import task_vector; print(task_vector('stack the blocks', 64).tolist())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]
    )
    np.testing.assert_allclose(eval(out.stdout), task_vector("stack the blocks", 64))


def test_task_table_and_bad_buckets():
    table = task_table(["a b", "c"], 8)
    assert table.shape == (2, 8)
    assert task_table([], 8).shape == (0, 8)
    with pytest.raises(ValueError, match="buckets"):
        task_vector("a", 0)


# ----------------------------------------------------------------------------- model and shards


def test_task_proj_is_a_trainable_part_of_the_shared_adapter(cfg):
    model_cfg = dataclasses.replace(cfg.model, task_buckets=BUCKETS)
    layout = ShardLayout.from_config(model_cfg, cfg.embodiments)
    assert shard_of("task_proj.weight") == SHARED_ADAPTER
    assert any(
        s.name == "task_proj.weight" and s.shape == (model_cfg.d_model, BUCKETS) for s in layout.shards[SHARED_ADAPTER]
    )
    policy = Policy(model_cfg, cfg.embodiments)
    assert "task_proj.weight" in trainable_names(policy, SHARED_ADAPTER)
    assert "task_proj.weight" in set_trainable(policy, [SHARED_ADAPTER])
    # without it the layout is unchanged
    plain = ShardLayout.from_config(cfg.model, cfg.embodiments)
    assert all(s.name != "task_proj.weight" for s in plain.shards[SHARED_ADAPTER])


def test_task_proj_starts_at_zero_so_the_task_changes_nothing_until_trained(cfg):
    model_cfg = dataclasses.replace(cfg.model, task_buckets=BUCKETS)
    policy = Policy(model_cfg, cfg.embodiments)
    plain = Policy(cfg.model, cfg.embodiments)
    emb = cfg.embodiments["so100"]
    obs = torch.randn(3, cfg.model.history, emb.obs_dim)
    task = torch.from_numpy(task_table(["a", "b", "c"], BUCKETS))
    with torch.no_grad():
        got, _ = policy("so100", obs, None, task)
        want, _ = plain("so100", obs)
        assert torch.equal(got, want)
        policy.task_proj.weight.normal_()
        moved, _ = policy("so100", obs, None, task)
    assert not torch.allclose(moved, want)


def test_policy_demands_the_task_exactly_when_it_reads_it(cfg):
    model_cfg = dataclasses.replace(cfg.model, task_buckets=BUCKETS)
    policy = Policy(model_cfg, cfg.embodiments)
    obs = torch.randn(2, cfg.model.history, cfg.embodiments["so100"].obs_dim)
    with pytest.raises(ValueError, match="reads the task"):
        policy("so100", obs)
    with pytest.raises(ValueError, match="reads the task"):
        policy("so100", obs, None, torch.zeros(2, BUCKETS + 1))
    with pytest.raises(ValueError, match="does not read the task"):
        Policy(cfg.model, cfg.embodiments)("so100", obs, None, torch.zeros(2, BUCKETS))


def test_negative_task_buckets_is_a_config_error():
    with pytest.raises(ConfigError, match="task_buckets"):
        load_config(model="tiny", overrides=["model.task_buckets=-1"])


# ----------------------------------------------------------------------------- data


def _episode(index: int, length: int, emb, tasks=(), task_of_frame=None) -> Episode:
    rng = np.random.default_rng(index)
    return Episode(
        index,
        rng.uniform(-0.1, 0.1, (length, emb.state_dim)).astype(np.float32),
        rng.uniform(-0.1, 0.1, (length, emb.env_state_dim)).astype(np.float32),
        None,
        rng.uniform(-0.1, 0.1, (length, emb.action_dim)).astype(np.float32),
        tasks=tasks,
        task_of_frame=task_of_frame,
    )


def test_tasks_round_trip_per_episode_and_per_frame(tmp_path, cfg):
    emb = cfg.embodiments["so100"]
    switch = np.array([0, 0, 1, 1, 0], dtype=np.int64)
    episodes = [
        _episode(0, 4, emb, ("reach",)),
        _episode(1, 5, emb, ("home", "reach"), switch),
        _episode(2, 3, emb),  # names none: does the dataset's default task
    ]
    root = write_dataset(tmp_path / "ds", emb, "so100", episodes, task="wave")
    tasks = pq.read_table(root / "meta" / "tasks.parquet").to_pylist()
    assert sorted((t["task_index"], t["__index_level_0__"]) for t in tasks) == [(0, "reach"), (1, "home"), (2, "wave")]
    back = read_dataset(root, emb, "so100")
    assert back.info["total_tasks"] == 3
    assert [e.tasks for e in back.episodes] == [("reach",), ("home", "reach"), ("wave",)]
    assert back.episodes[0].task_of_frame is None
    np.testing.assert_array_equal(back.episodes[1].task_of_frame, switch)
    meta = pq.read_table(next((root / "meta" / "episodes").rglob("*.parquet")), columns=["tasks"]).to_pylist()
    assert [m["tasks"] for m in meta] == [["reach"], ["home", "reach"], ["wave"]]


def test_only_tasks_some_frame_does_are_written(tmp_path, cfg):
    """As LeRobot collects an episode's tasks from its frames: a listed task no frame does is
    neither in tasks.parquet nor counted, and the episode's tasks come in frame order."""
    emb = cfg.embodiments["so100"]
    episodes = [
        _episode(0, 3, emb, ("used", "never used")),
        _episode(1, 4, emb, ("late", "early", "unused too"), np.array([1, 1, 0, 0])),
        _episode(2, 2, emb, ("dup", "dup"), np.array([0, 1])),
    ]
    root = write_dataset(tmp_path / "ds", emb, "so100", episodes)
    back = read_dataset(root, emb, "so100")
    assert back.info["total_tasks"] == 4
    assert [e.tasks for e in back.episodes] == [("used",), ("early", "late"), ("dup",)]
    meta = pq.read_table(next((root / "meta" / "episodes").rglob("*.parquet")), columns=["tasks"]).to_pylist()
    assert [m["tasks"] for m in meta] == [["used"], ["early", "late"], ["dup"]]
    np.testing.assert_array_equal(back.episodes[1].frame_tasks(), [0, 0, 1, 1])


def test_a_dataset_without_tasks_parquet_reads_with_no_task(tmp_path, cfg):
    emb = cfg.embodiments["so100"]
    root = write_dataset(tmp_path / "ds", emb, "so100", [_episode(0, 4, emb, ("reach",))])
    (root / "meta" / "tasks.parquet").unlink()
    assert read_dataset(root, emb, "so100").episodes[0].tasks == ()


def test_task_annotations_that_do_not_map_read_as_no_task_and_say_why(tmp_path, cfg):
    """Data that trained before kyodo read tasks still reads (a model that does not read the
    task does not need them); the problem is kept for the node and `data inspect` to say."""
    emb = cfg.embodiments["so100"]
    root = write_dataset(tmp_path / "ds", emb, "so100", [_episode(0, 4, emb, ("reach",))])
    path = root / "meta" / "tasks.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(0, "task_index", pa.array([7], type=pa.int64())), path)
    back = read_dataset(root, emb, "so100")
    assert back.episodes[0].tasks == () and len(back.episodes) == 1
    assert "column 'task_index' holds 0, which meta/tasks.parquet does not list" in back.task_problem
    assert [rel for rel, _, _ in back.manifest].count("data/chunk-000/file-000.parquet") == 1
    path.write_bytes(b"not parquet")
    assert "not a readable parquet file" in read_dataset(root, emb, "so100").task_problem
    # a pandas categorical is written dictionary-encoded: still the task's text
    texts = pa.array(["reach"]).dictionary_encode()
    pq.write_table(pa.table({"task_index": pa.array([0], type=pa.int64()), "task": texts}), path)
    fixed = read_dataset(root, emb, "so100")
    assert fixed.task_problem is None and fixed.episodes[0].tasks == ("reach",)


def test_receipts_made_before_tasks_were_read_still_match_their_data(tmp_path, cfg):
    """The fingerprint now covers meta/tasks.parquet (v2); v1, as kyodo computed it before,
    is the same manifest without that file."""
    emb = cfg.embodiments["so100"]
    root = write_dataset(tmp_path / "ds", emb, "so100", [_episode(0, 4, emb, ("reach",))])
    data = read_dataset(root, emb, "so100")
    v1 = hashlib.sha256(b"kyodo/lerobot-fingerprint/v1\n")
    for rel in ("meta/info.json", "meta/episodes/chunk-000/file-000.parquet", "data/chunk-000/file-000.parquet"):
        content = (root / rel).read_bytes()
        v1.update(f"{rel}\t{len(content)}\t{hashlib.sha256(content).hexdigest()}\n".encode())
    assert data.legacy_fingerprints() == [v1.hexdigest()]
    assert data.fingerprint() != v1.hexdigest()


def test_writer_refuses_a_task_of_frame_that_does_not_fit(tmp_path, cfg):
    emb = cfg.embodiments["so100"]
    bad = _episode(0, 4, emb, ("a", "b"), np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="task_of_frame"):
        write_dataset(tmp_path / "ds", emb, "so100", [bad])
    assert not (tmp_path / "ds").exists()


def test_windows_carry_the_task_of_their_current_frame(cfg):
    emb = cfg.embodiments["so100"]
    episodes = [_episode(0, 5, emb, ("home", "reach"), np.array([0, 0, 1, 1, 0])), _episode(1, 3, emb)]
    windows = EpisodeWindows(episodes, emb, history=2, chunk=2, task_buckets=BUCKETS)
    batch = windows.at([0, 0, 0, 1], np.array([1, 2, 4, 0]))
    home, reach = task_vector("home", BUCKETS), task_vector("reach", BUCKETS)
    np.testing.assert_array_equal(batch.task.numpy(), np.stack([home, reach, home, np.zeros(BUCKETS, np.float32)]))
    assert EpisodeWindows(episodes, emb, history=2, chunk=2).at([0], np.array([0])).task is None
    assert all(b.task.shape[1] == BUCKETS for b in windows.all_windows(batch_size=3))


# ----------------------------------------------------------------------------- synthetic subtasks


@pytest.mark.parametrize("name", ["so100", "aloha", "franka", "agv"])
def test_synthetic_subtasks_switch_and_the_goal_stays_observed(cfg, name):
    emb = cfg.embodiments[name]
    episodes = generate_episodes(name, emb, 12, 4.0, seed=5, tasks=2)
    single = generate_episodes(name, emb, 12, 4.0, seed=5)
    texts = {t for e in episodes for t in e.tasks}
    assert len(texts) == 2 and {e.tasks for e in single} == {(single[0].tasks[0],)}
    assert single[0].tasks[0] in texts
    assert any(e.task_of_frame is not None for e in episodes)
    for one, two in zip(episodes, single, strict=True):
        # the same goals, shown in the environment state whatever the subtask
        np.testing.assert_array_equal(one.env_state, two.env_state)
        np.testing.assert_array_equal(one.state[0], two.state[0])
    # the home subtask drives toward the origin: the command differs from the goal task's
    assert any(not np.allclose(a.action, b.action) for a, b in zip(episodes, single, strict=True))


def test_home_subtask_approaches_the_home_configuration(cfg):
    emb = cfg.embodiments["so100"]
    episodes = generate_episodes("so100", emb, 40, 6.0, seed=2, tasks=2)
    joints = emb.env_state_dim
    closer = []
    for ep in episodes:
        which = ep.frame_tasks()
        text = "return to the home configuration and keep the gripper open"
        home = np.flatnonzero(which == ep.tasks.index(text)) if text in ep.tasks else []
        if len(home) > 20:
            start, end = home[0], home[min(len(home) - 1, 20)]
            closer.append(np.abs(ep.state[end, :joints]).sum() < np.abs(ep.state[start, :joints]).sum())
    assert closer and np.mean(closer) > 0.9


# Digests of generate_episodes(name, emb, 6, 1.0, seed=3) as kyodo wrote them before the
# tasks option existed (a2e4e53): one-task data must stay what members and benchmarks had.
ONE_TASK_DIGESTS = {
    "agv": "263b9a09a3aff847c9e82729f469d304",
    "aloha": "1a6c40122350da33d7600094d78b3e3a",
    "so100": "3d1ed8d44c30c9ccadbc360621f755a2",
    "franka": "d81836dac448675846905de8f181c078",
}


@pytest.mark.parametrize("name", sorted(ONE_TASK_DIGESTS))
def test_single_task_data_is_what_it_was_before_the_option(cfg, name):
    digest = hashlib.sha256()
    for ep in generate_episodes(name, cfg.embodiments[name], 6, 1.0, 3, tasks=1):
        for array in (ep.state, ep.env_state, ep.image_features, ep.action):
            digest.update(b"-" if array is None else array.tobytes())
    assert digest.hexdigest()[:32] == ONE_TASK_DIGESTS[name]
    with pytest.raises(ValueError, match="tasks must be 1"):
        generate_episodes(name, cfg.embodiments[name], 2, 1.0, 0, tasks=3)


def test_subtask_dataset_round_trips_through_lerobot(tmp_path, cfg):
    emb = cfg.embodiments["aloha"]
    root = generate_dataset(tmp_path / "ds", "aloha", emb, 8, 3.0, 1, tasks=2)
    made = generate_episodes("aloha", emb, 8, 3.0, 1, tasks=2)
    back = read_dataset(root, emb, "aloha")
    assert back.info["total_tasks"] == 2
    for one, two in zip(made, back.episodes, strict=True):
        assert one.tasks == two.tasks
        np.testing.assert_array_equal(one.frame_tasks(), two.frame_tasks())


# ----------------------------------------------------------------------------- end to end


def _demo_round(tmp_path: Path, episodes: int, *overrides: str) -> subprocess.CompletedProcess:
    """One round of ``kyodo-coordinator demo`` (tiny, the default federation's four members
    with ``episodes`` each) in ``tmp_path``/run, its data in ``tmp_path``/data."""
    cmd = [
        sys.executable, "-m", "coordinator.cli", "demo", "--model", "tiny", "--rounds", "1",
        f"out_dir={tmp_path / 'run'}", f"data_root={tmp_path / 'data'}",
        *(f"federation.members.{i}.episodes={episodes}" for i in range(4)), *overrides,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])


@pytest.mark.slow
def test_a_federated_dp_round_trains_the_task_projection_under_secure_aggregation(tmp_path):
    """The real ServerApp and ClientApps (Flower simulation): members whose episodes name two
    subtasks train ``task_proj`` with DP-SGD, the cohort's sum commits, the audit holds."""
    import json

    from shared_model.store import ShardStore

    out_dir, data_root = tmp_path / "run", tmp_path / "data"
    tasks = (f"federation.members.{i}.tasks=2" for i in (0, 1))
    proc = _demo_round(tmp_path, 120, "model.task_buckets=32", *tasks)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = Path(__file__).parents[1]
    assert read_dataset(data_root / "honda", load_config().embodiments["aloha"], "aloha").info["total_tasks"] == 2
    store = ShardStore(out_dir / "store")
    assert store.head().round == 1
    before, after = store.load_model(0)["task_proj.weight"], store.load_model(1)["task_proj.weight"]
    assert not before.any() and after.any()
    record = [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines()][-1]
    assert "adapter/shared" in record["updated_shards"]
    consortium = tmp_path / "consortium.yaml"
    audit = [sys.executable, "-m", "privacy.audit.cli"]
    made = subprocess.run(
        [*audit, "consortium", "--from-nodes", str(out_dir / "nodes"), "--coordinator-from", str(out_dir), "-o", str(consortium)],
        capture_output=True, text=True, cwd=root,
    )  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    verified = subprocess.run(
        [*audit, "verify", "--ledgers", str(out_dir / "nodes"), "--rounds", str(out_dir), "--consortium", str(consortium)],
        capture_output=True, text=True, cwd=root,
    )  # fmt: skip
    assert verified.returncode == 0 and "PASS" in verified.stdout, verified.stdout[-3000:] + verified.stderr[-2000:]


def test_data_inspect_lists_the_tasks_short(tmp_path, cfg, capsys):
    from member_node import cli

    emb = cfg.embodiments["so100"]
    long_text = "stack " * 200
    root = write_dataset(
        tmp_path / "ds", emb, "so100", [_episode(0, 3, emb, ("wave",)), _episode(1, 3, emb, (long_text,))]
    )
    assert cli.main(["data", "inspect", str(root), "--embodiment", "so100"]) == 0
    out = capsys.readouterr().out
    assert "2: 'wave', 'stack stack" in " ".join(out.split()).replace("│ │", "")
    assert long_text.strip() not in out.replace("│", "")
    (root / "meta" / "tasks.parquet").unlink()
    assert cli.main(["data", "inspect", str(root), "--embodiment", "so100"]) == 0
    assert "no meta/tasks.parquet" in capsys.readouterr().out


def test_stores_written_before_task_buckets_existed_are_the_same_model(cfg):
    """The manifest's model hash of task_buckets 0 is that of a config without the key (a run
    committed by an earlier kyodo), so such runs stay resumable and continuable."""
    from shared_model.store import model_config_hash

    old = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "task_buckets"}
    assert cfg.model.task_buckets == 0
    assert model_config_hash(cfg.model, cfg.embodiments) == model_config_hash(old, cfg.embodiments)
    with_tasks = dataclasses.replace(cfg.model, task_buckets=32)
    assert model_config_hash(with_tasks, cfg.embodiments) != model_config_hash(old, cfg.embodiments)


def test_a_model_mismatch_names_the_settings_that_differ(tmp_path, cfg):
    from coordinator.run_state import model_mismatch
    from shared_model.config import to_yaml
    from shared_model.store import model_config_hash

    committed = model_config_hash(cfg.model, cfg.embodiments)
    old_yaml = to_yaml(cfg).replace("  task_buckets: 0\n", "")  # written before the setting existed
    assert "task_buckets" not in old_yaml
    (tmp_path / "config.yaml").write_text(old_yaml, encoding="utf-8")
    changed = load_config(model="tiny", overrides=["model.task_buckets=16", "model.lr=0.01"])
    said = model_mismatch(changed, tmp_path, committed)
    assert said.startswith(f"another model config ({committed[:12]} != ")
    assert "model.lr 0.003 -> 0.01" in said and "model.task_buckets 0 -> 16" in said
    # a config.yaml that no longer describes the committed rounds is not quoted
    (tmp_path / "config.yaml").write_text(to_yaml(changed), encoding="utf-8")
    assert "->" not in model_mismatch(changed, tmp_path, committed)


@pytest.mark.slow
def test_a_simulated_resume_with_another_task_buckets_keeps_the_runs_settings(tmp_path):
    """The refused resume (ServerApp side) used to rewrite config.yaml first."""
    out_dir = tmp_path / "run"
    first = _demo_round(tmp_path, 40, "train.local_steps=2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    settings = (out_dir / "config.yaml").read_bytes()
    again = _demo_round(tmp_path, 40, "train.local_steps=2", "model.task_buckets=16")
    assert again.returncode != 0
    assert "model.task_buckets 0 -> 16" in again.stdout + again.stderr
    assert (out_dir / "config.yaml").read_bytes() == settings


@pytest.mark.parametrize(
    "buckets, tasks, warned",
    [
        (0, 2, "name 2 tasks but the consortium's model does not read the task"),
        (0, 1, None),
        (32, 2, None),
        (32, 0, "reads the task, but the episodes name none with a word in it"),
    ],
)
def test_the_node_log_says_when_its_data_and_the_model_disagree_about_tasks(tmp_path, caplog, buckets, tasks, warned):
    import logging

    from member_node.identity import resolve_identity
    from member_node.node import MemberNode

    cfg = load_config(
        model="tiny",
        overrides=[f"data_root={tmp_path}", f"state_root={tmp_path / 'state'}", f"model.task_buckets={buckets}"],
    )
    root = generate_dataset(tmp_path / "sony", "so100", cfg.embodiments["so100"], 6, 1.0, 1, tasks=max(tasks, 1))
    if tasks == 0:
        (root / "meta" / "tasks.parquet").unlink()
    node = MemberNode(cfg, resolve_identity({"partition-id": 1}, cfg))
    with caplog.at_level(logging.WARNING, logger="kyodo.member"):
        assert node.dataset.episodes
    said = " ".join(r.getMessage() for r in caplog.records)
    if warned:
        assert warned in said
    else:
        assert "task" not in said


def test_broken_task_annotations_stop_only_a_node_whose_model_reads_the_task(tmp_path, caplog, capsys):
    import logging

    from member_node import cli
    from member_node.identity import resolve_identity
    from member_node.lerobot import DatasetError
    from member_node.node import MemberNode

    def node(buckets: int) -> MemberNode:
        overrides = [f"data_root={tmp_path}", f"state_root={tmp_path / 'state'}", f"model.task_buckets={buckets}"]
        cfg = load_config(model="tiny", overrides=overrides)
        return MemberNode(cfg, resolve_identity({"partition-id": 1}, cfg))

    root = generate_dataset(tmp_path / "sony", "so100", load_config().embodiments["so100"], 6, 1.0, 1, tasks=2)
    (root / "meta" / "tasks.parquet").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="kyodo.member"):
        assert node(0).dataset.episodes
    assert "task annotations ignored" in caplog.text and "not a readable parquet file" in caplog.text
    with pytest.raises(DatasetError, match="the consortium's model reads the task, and .*not a readable parquet"):
        assert node(32).dataset.episodes
    assert cli.main(["data", "inspect", str(root), "--embodiment", "so100"]) == 0
    assert "unreadable, so none" in " ".join(capsys.readouterr().out.split())
