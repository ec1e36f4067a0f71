"""Data recorded in other units than its embodiment declares is refused where the member sets
its node up (data inspect, init, start), not trained on at the wrong scale."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from member_node import cli
from member_node.data_units import UNITS_FACTOR, unit_problems
from member_node.lerobot import read_dataset, write_dataset
from member_node.synthetic import generate_dataset, generate_episodes
from shared_model.config import load_config

EMBODIMENTS = load_config().embodiments
DEGREES = 180 / np.pi


def _as_lerobot_so100(episode, scale: bool = True):
    """An so100 episode as LeRobot's SO-100 follower records it: joints in degrees, gripper 0..100."""
    if not scale:
        return episode
    joints = np.array([DEGREES] * 5 + [100.0], dtype=np.float32)
    return dataclasses.replace(
        episode, state=episode.state * joints, action=episode.action * joints, env_state=episode.env_state * DEGREES
    )


@pytest.mark.parametrize("name", sorted(EMBODIMENTS))
def test_the_synthetic_robots_are_in_their_embodiments_units(tmp_path: Path, name: str) -> None:
    root = generate_dataset(tmp_path / name, name, EMBODIMENTS[name], 12, 2.0, seed=0)
    assert unit_problems(read_dataset(root, EMBODIMENTS[name], name), EMBODIMENTS[name], name) == []


def test_inspect_refuses_a_recording_in_degrees_and_names_each_dimension(tmp_path: Path, capsys) -> None:
    emb = EMBODIMENTS["so100"]
    episodes = [_as_lerobot_so100(ep) for ep in generate_episodes("so100", emb, 8, 2.0, seed=1)]
    names = {"observation.state": ["shoulder_pan.pos", "a", "b", "c", "d", "gripper.pos"]}
    root = write_dataset(tmp_path / "deg", emb, "so100", episodes, names=names)
    assert cli.main(["data", "inspect", str(root), "--embodiment", "so100"]) == 1
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert "episodes" in captured.out, "the table of what was read comes first"
    assert "values far outside the bounds of embodiment 'so100', most likely recorded in other units" in err
    assert "observation.state dimension 0 ('shoulder_pan.pos'): a typical episode reaches" in err
    assert "x its bound 2 (so100 state_bound)" in err
    problems = unit_problems(read_dataset(root, emb, "so100"), emb, "so100")
    assert "degrees" in err and f"and {len(problems) - 4} more" in err, "four shown, the rest counted"
    assert any(p.startswith("observation.state dimension 5 ('gripper.pos')") for p in problems)
    assert {p.split(" dimension")[0] for p in problems} == {
        "observation.state",
        "observation.environment_state",
        "action",
    }
    assert "fingerprint" not in captured.out


def test_one_wild_episode_does_not_make_a_dataset_look_mis_scaled(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    emb = EMBODIMENTS["so100"]
    episodes = generate_episodes("so100", emb, 9, 2.0, seed=2)
    episodes[4] = _as_lerobot_so100(episodes[4])
    root = write_dataset(tmp_path / "one", emb, "so100", episodes)
    assert unit_problems(read_dataset(root, emb, "so100"), emb, "so100") == []
    assert cli.main(["data", "inspect", str(root), "--embodiment", "so100"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "fingerprint" in said and "episodes │ 8" in said, "that one episode is left out, the rest train"
    assert "1 with values past 5x the embodiment's bounds (recorded in other units?) (episode 4)" in said
    # The line is drawn at UNITS_FACTOR x the bound: just inside passes, just outside does not.
    wide = dataclasses.replace(emb, state_bound=[b / (UNITS_FACTOR * 0.5) for b in emb.state_bound])
    assert unit_problems(read_dataset(root, emb, "so100"), wide, "so100") == []
    tight = dataclasses.replace(emb, state_bound=[b / (UNITS_FACTOR * 4) for b in emb.state_bound])
    assert unit_problems(read_dataset(root, emb, "so100"), tight, "so100")


def test_init_warns_and_start_refuses_data_in_other_units(tmp_path: Path, capsys) -> None:
    from member_node import supernode

    emb = EMBODIMENTS["so100"]
    data = tmp_path / "data"
    write_dataset(data, emb, "so100", [_as_lerobot_so100(ep) for ep in generate_episodes("so100", emb, 6, 1.0, seed=3)])
    argv = ["init", str(tmp_path / "node"), "--member", "m", "--embodiment", "so100", "--epsilon", "8"]
    assert cli.main([*argv, "--delta", "1e-5", "--data", str(data)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: data" in out and "most likely recorded in other units" in out
    with pytest.raises(supernode.SetupError, match="most likely recorded in other units"):
        cli._check_data(supernode.load_setup(tmp_path / "node"))


def test_episodes_in_other_units_among_many_in_the_right_ones_are_left_out_one_by_one(tmp_path: Path) -> None:
    """A check with the real LeRobot merged 20 episodes recorded in degrees into 30 in radians:
    the dataset-wide check let them through and the node trained them at about 100x scale.
    Each is now left out by its own values, as a sensor drop-out is; the node trains the rest."""
    from member_node.data_units import OUT_OF_UNITS, without_episodes_beyond_bounds
    from member_node.lerobot import DatasetError

    emb = EMBODIMENTS["so100"]
    episodes = generate_episodes("so100", emb, 10, 2.0, seed=4)
    mixed = [_as_lerobot_so100(ep, scale=i % 5 in (1, 3)) for i, ep in enumerate(episodes)]
    root = write_dataset(tmp_path / "mixed", emb, "so100", mixed)
    dataset = read_dataset(root, emb, "so100")
    assert unit_problems(dataset, emb, "so100") == [], "4 of 10: not a recording in other units"
    trained = without_episodes_beyond_bounds(dataset, emb)
    assert trained.left_out == dict.fromkeys([1, 3, 6, 8], OUT_OF_UNITS)
    assert [ep.index for ep in trained.episodes] == [0, 2, 4, 5, 7, 9]
    everything = write_dataset(tmp_path / "all", emb, "so100", [_as_lerobot_so100(ep) for ep in episodes[:3]])
    with pytest.raises(DatasetError, match="no usable episode: all 3 are left out"):
        without_episodes_beyond_bounds(read_dataset(everything, emb, "so100"), emb)
