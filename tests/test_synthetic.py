"""Synthetic episodes: determinism, physical plausibility, speed, and the member CLI around them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from member_node import cli
from member_node.lerobot import Episode, read_dataset
from member_node.synthetic import generate_dataset, generate_episodes
from shared_model.config import load_config

EMBODIMENTS = load_config().embodiments
NAMES = sorted(EMBODIMENTS)


def _episodes(name: str, seed: int = 0, episodes: int = 20, seconds: float = 4.0) -> list[Episode]:
    return generate_episodes(name, EMBODIMENTS[name], episodes, seconds, seed)


def _goal_error(name: str, ep: Episode) -> np.ndarray:
    """Distance to the goal over time: joint space for arms, metres for the base."""
    emb = EMBODIMENTS[name]
    if emb.kind == "mobile_base":
        return np.linalg.norm(ep.state[:, :2] - ep.env_state, axis=1)
    if emb.kind == "arm_velocity":
        return np.linalg.norm(ep.state[:, : emb.env_state_dim] - ep.env_state, axis=1)
    joints = [i for i, bound in enumerate(emb.state_bound) if bound != 1.0]  # grippers have bound 1
    return np.linalg.norm(ep.state[:, joints] - ep.env_state, axis=1)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bytes(tmp_path: Path, name: str) -> None:
    emb = EMBODIMENTS[name]
    a = generate_dataset(tmp_path / "a", name, emb, 8, 1.0, seed=5)
    b = generate_dataset(tmp_path / "b", name, emb, 8, 1.0, seed=5)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert read_dataset(a, emb, name).fingerprint() == read_dataset(b, emb, name).fingerprint()


@pytest.mark.parametrize("name", NAMES)
def test_different_seed_different_data(name: str) -> None:
    a, b = _episodes(name, seed=1, episodes=4), _episodes(name, seed=2, episodes=4)
    assert not np.array_equal(a[0].env_state[0], b[0].env_state[0])
    assert not np.array_equal(a[0].action[:5], b[0].action[:5])


def test_members_with_the_same_seed_but_other_embodiments_differ() -> None:
    a, b = _episodes("so100", seed=3, episodes=2), _episodes("aloha", seed=3, episodes=2)
    assert not np.allclose(a[0].state[0, :5], b[0].state[0, :5])


def test_camera_is_the_same_for_every_member() -> None:
    """image_features = tanh(W @ goal-in-robot-frame + noise) with one W per embodiment name."""

    def fit_projection(episodes: list[Episode]) -> np.ndarray:
        x, y = [], []
        for ep in episodes:
            rel = ep.env_state - ep.state[:, :2]
            rho = np.linalg.norm(rel, axis=1)
            bearing = np.arctan2(rel[:, 1], rel[:, 0]) - ep.state[:, 2]
            x.append(np.stack([rho * np.cos(bearing), rho * np.sin(bearing), rho], 1))
            y.append(np.arctanh(np.clip(ep.image_features, -0.999, 0.999)))
        return np.linalg.lstsq(np.concatenate(x), np.concatenate(y), rcond=None)[0]

    w1 = fit_projection(_episodes("agv", seed=1))
    w2 = fit_projection(_episodes("agv", seed=2))
    np.testing.assert_allclose(w1, w2, atol=0.05)
    assert np.abs(w1).max() > 0.3  # the features really depend on the goal


# ----------------------------------------------------------------------------- plausibility


@pytest.mark.parametrize("name", NAMES)
def test_values_stay_inside_declared_bounds(name: str) -> None:
    emb = EMBODIMENTS[name]
    episodes = _episodes(name, seed=9, episodes=30)
    for attr, bound in (("state", emb.state_bound), ("env_state", emb.env_state_bound), ("action", emb.action_bound)):
        values = np.concatenate([getattr(ep, attr) for ep in episodes])
        assert values.dtype == np.float32 and np.isfinite(values).all()
        assert (np.abs(values) <= np.asarray(bound, dtype=np.float32)).all(), attr
    if emb.image_feature_dim:
        image = np.concatenate([ep.image_features for ep in episodes])
        assert image.shape[1] == emb.image_feature_dim and (np.abs(image) <= 1).all()
    else:
        assert all(ep.image_features is None for ep in episodes)


@pytest.mark.parametrize("name", NAMES)
def test_goal_is_approached_and_reached(name: str) -> None:
    errors = [_goal_error(name, ep) for ep in _episodes(name, seed=4, episodes=30)]
    initial = np.array([e[0] for e in errors])
    final = np.array([e[-1] for e in errors])
    assert (final < 0.3 * initial).all()
    assert final.mean() < (0.05 if EMBODIMENTS[name].kind == "mobile_base" else 0.03)
    shortest = min(len(e) for e in errors)
    mean_error = np.mean([e[:shortest] for e in errors], axis=0)
    quarters = mean_error[:: max(shortest // 4, 1)]
    assert (np.diff(quarters) < 0).all(), quarters


@pytest.mark.parametrize("name", ["so100", "franka", "aloha"])
def test_grippers_close_near_the_goal(name: str) -> None:
    emb = EMBODIMENTS[name]
    grippers = [i for i, bound in enumerate(emb.state_bound) if bound == 1.0]
    episodes = _episodes(name, seed=2)
    start = np.array([ep.state[0, grippers] for ep in episodes])
    end = np.array([ep.state[-1, grippers] for ep in episodes])
    assert (start > 0.9).all() and (end < 0.1).all()
    assert all(((ep.state[:, grippers] >= 0) & (ep.state[:, grippers] <= 1)).all() for ep in episodes)


def test_position_targets_move_smoothly() -> None:
    emb = EMBODIMENTS["so100"]
    for ep in _episodes("so100", seed=6):
        step = np.abs(np.diff(ep.action[:, :5], axis=0))
        assert step.max() <= 1.2 / emb.fps + 1e-5  # velocity limit of the reference
        assert np.abs(ep.action[1:, :5] - ep.state[1:, :5]).max() < 0.3  # the plant follows its targets


def test_velocity_arm_integrates_its_velocities() -> None:
    emb = EMBODIMENTS["franka"]
    for ep in _episodes("franka", seed=6):
        q, qd = ep.state[:, :7], ep.state[:, 7:14]
        np.testing.assert_allclose(np.diff(q, axis=0), qd[1:] / emb.fps, atol=1e-5)
        assert np.corrcoef(ep.action[:-1, :7].ravel(), qd[1:].ravel())[0, 1] > 0.95


def test_episode_lengths_vary_around_nominal() -> None:
    lengths = np.array([ep.length for ep in _episodes("so100", seed=0, episodes=40)])
    nominal = 4.0 * EMBODIMENTS["so100"].fps
    assert len(set(lengths.tolist())) > 5
    assert (np.abs(lengths - nominal) <= 0.1 * nominal + 1).all()


def test_rejects_unknown_kind_and_mismatched_layout() -> None:
    odd = dataclasses.replace(EMBODIMENTS["so100"], kind="humanoid")
    with pytest.raises(ValueError, match="humanoid"):
        generate_episodes("odd", odd, 2, 1.0, seed=0)
    bad = dataclasses.replace(EMBODIMENTS["so100"], env_state_dim=4, env_state_bound=[2.0] * 4)
    with pytest.raises(ValueError, match="env_state_dim"):
        generate_episodes("bad", bad, 2, 1.0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        generate_episodes("so100", EMBODIMENTS["so100"], 2, 1.0, seed=-1)


# ----------------------------------------------------------------------------- CLI


def test_cli_synth_then_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "agv"
    argv = ["data", "synth", "--embodiment", "agv", "--episodes", "6", "--seed", "1", "--seconds", "2", "--out"]
    assert cli.main([*argv, str(out)]) == 0
    assert "6 episodes" in capsys.readouterr().out
    assert cli.main(["data", "inspect", str(out), "--embodiment", "agv"]) == 0
    text = capsys.readouterr().out
    fingerprint = read_dataset(out, EMBODIMENTS["agv"], "agv").fingerprint()
    assert f"fingerprint {fingerprint}" in text
    # With the node's state dir: which of its receipts were made from this data (the node
    # made the key; each receipt's fingerprint has its own nonce).
    from privacy.keys import keyed_fingerprint, load_or_create_fingerprint_key, load_or_create_signing_key
    from privacy.ledger import Ledger

    state = tmp_path / "state"
    assert cli.main(["data", "inspect", str(out), "--embodiment", "agv", "--state-dir", str(state)]) == 1
    assert "node creates it" in capsys.readouterr().err
    key = load_or_create_fingerprint_key(state / "dataset_fingerprint.key")
    assert cli.main(["data", "inspect", str(out), "--embodiment", "agv", "--state-dir", str(state)]) == 0
    assert "receipts from this data: 0 of 0 ledger entries (none)" in capsys.readouterr().out
    ledger = Ledger(state / "ledger.jsonl", load_or_create_signing_key(state / "member_ed25519.pem"))
    mechanism = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1, "clipping_norm": 1.0,
                 "opacus_mode": "bk", "noise_source": "chacha20"}  # fmt: skip
    # round 3's receipt was made before kyodo read meta/tasks.parquet: the v1 fingerprint
    legacy = read_dataset(out, EMBODIMENTS["agv"], "agv").legacy_fingerprints()[0]
    for rnd, data in ((1, fingerprint), (2, "sha256:" + "0" * 64), (3, legacy)):
        ledger.append(
            run="r", round=rnd, member="m", shards=["adapter/shared"], privacy_unit="episode", mechanism=mechanism,
            dataset_fingerprint=keyed_fingerprint(key, data), epsilon=3.0 * rnd, delta=1e-5, accountant="rdp",
            decision="full",
        )  # fmt: skip
    assert cli.main(["data", "inspect", str(out), "--embodiment", "agv", "--state-dir", str(state)]) == 0
    assert "receipts from this data: 2 of 3 ledger entries (r/1 dp-sgd, r/3 dp-sgd)" in capsys.readouterr().out
    for fragment in ("episodes", "frames", "fps", "image features"):
        assert fragment in text, fragment
    assert cli.main([*argv, str(out)]) == 1  # refuses to overwrite without --force
    assert "already exists" in capsys.readouterr().err
    assert cli.main([*argv, str(out), "--force"]) == 0


def test_cli_inspect_bad_data_exits_1_with_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = generate_dataset(tmp_path / "so100", "so100", EMBODIMENTS["so100"], 3, 0.5, seed=0)
    data = out / "data" / "chunk-000" / "file-000.parquet"
    data.write_bytes(b"garbage")
    assert cli.main(["data", "inspect", str(out), "--embodiment", "so100"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and str(data) in err and "not a readable parquet file" in err
    assert "Traceback" not in err
    assert cli.main(["data", "inspect", str(out), "--embodiment", "franka"]) == 1  # wrong embodiment
    assert "declares state_dim 15" in capsys.readouterr().err


def test_cli_unknown_embodiment_and_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["data", "inspect", str(tmp_path), "--embodiment", "t800"]) == 2
    assert "unknown embodiment 't800'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2


def test_cli_inspect_names_the_episodes_the_node_leaves_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np
    from parquet_edits import edit_vector, rewrite_parquet

    from member_node.lerobot import STATE

    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    out = generate_dataset(tmp_path / "so100", "so100", EMBODIMENTS["so100"], 3, 0.5, seed=0)
    assert cli.main(["data", "inspect", str(out), "--embodiment", "so100"]) == 0
    assert "left out" in (text := capsys.readouterr().out) and "none" in text
    last = EMBODIMENTS["so100"].state_dim - 1  # the last episode's last frame, its last value
    rewrite_parquet(
        out / "data" / "chunk-000" / "file-000.parquet", lambda t: edit_vector(t, STATE, t.num_rows - 1, np.inf, last)
    )
    assert cli.main(["data", "inspect", str(out), "--embodiment", "so100"]) == 0
    text = capsys.readouterr().out
    assert "1 with non-finite values (episode 2)" in text and "the node trains without them" in text
