"""Training windows: history/chunk padding, per-episode sampling, public-bound scaling, splits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from member_node.lerobot import Episode
from member_node.synthetic import generate_episodes
from member_node.windows import EpisodeWindows, split_episodes
from shared_model.config import EmbodimentConfig, load_config

EMB = EmbodimentConfig(
    kind="arm",
    state_dim=2,
    env_state_dim=1,
    image_feature_dim=3,
    action_dim=2,
    fps=10,
    state_bound=[2.0, 4.0],
    env_state_bound=[100.0],
    action_bound=[0.5, 2.0],
)


def _episode(index: int, length: int) -> Episode:
    """Frame t of episode e: state (t, -t), env (e), image (t, e, 1), action (t, 2t)."""
    t = np.arange(length, dtype=np.float32)
    return Episode(
        index=index,
        state=np.stack([t, -t], 1),
        env_state=np.full((length, 1), index, dtype=np.float32),
        image_features=np.stack([t, np.full_like(t, index), np.ones_like(t)], 1),
        action=np.stack([t, 2 * t], 1),
    )


def _windows(lengths: list[int], history: int = 4, chunk: int = 3) -> EpisodeWindows:
    return EpisodeWindows([_episode(i, n) for i, n in enumerate(lengths)], EMB, history=history, chunk=chunk)


def _raw_obs(batch_obs: torch.Tensor) -> np.ndarray:
    return batch_obs.numpy() * np.array([2.0, 4.0, 100.0], dtype=np.float32)


def test_history_repeats_first_frame_at_start() -> None:
    windows = _windows([5])
    batches = list(windows.all_windows(batch_size=100))
    assert len(batches) == 1
    obs = _raw_obs(batches[0].obs)
    assert obs.shape == (5, 4, 3)
    np.testing.assert_allclose(obs[0, :, 0], [0, 0, 0, 0])
    np.testing.assert_allclose(obs[2, :, 0], [0, 0, 1, 2])
    np.testing.assert_allclose(obs[4, :, 0], [1, 2, 3, 4])
    np.testing.assert_allclose(batches[0].image[2, :, 0].numpy(), [0, 0, 1, 2])


def test_chunk_repeats_last_action_and_masks_it() -> None:
    batch = next(_windows([5]).all_windows(batch_size=100))
    action = batch.action.numpy() * np.array([0.5, 2.0], dtype=np.float32)
    assert action.shape == (5, 3, 2) and batch.action_pad.dtype == torch.bool
    np.testing.assert_allclose(action[1, :, 0], [1, 2, 3])
    np.testing.assert_allclose(action[3, :, 0], [3, 4, 4])
    np.testing.assert_allclose(action[4, :, 1], [8, 8, 8])
    assert batch.action_pad[1].tolist() == [False, False, False]
    assert batch.action_pad[3].tolist() == [False, False, True]
    assert batch.action_pad[4].tolist() == [False, True, True]


def test_windows_never_cross_episodes() -> None:
    windows = _windows([2, 6, 3], history=5, chunk=5)
    assert len(windows) == 3 and windows.num_windows() == 11
    obs = torch.cat([b.obs for b in windows.all_windows(batch_size=4)])
    episode_of_frame = _raw_obs(obs)[:, :, 2]
    expected = np.repeat([0, 1, 2], [2, 6, 3])
    np.testing.assert_allclose(episode_of_frame, np.repeat(expected[:, None], 5, axis=1))


def test_evaluation_subsample_is_evenly_spaced_per_episode_and_deterministic() -> None:
    windows = _windows([2, 9, 5], history=1, chunk=1)
    frames = [_raw_obs(b.obs)[:, 0, :] for b in windows.all_windows(batch_size=4, per_episode=3)]
    obs = np.concatenate(frames)
    # episode 0 is shorter than 3: all of it; episodes 1 and 2: the middle of each third
    assert obs[:, 2].tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert obs[:, 0].tolist() == [0, 1, 1, 4, 7, 0, 2, 4]
    again = np.concatenate([_raw_obs(b.obs)[:, 0, :] for b in windows.all_windows(per_episode=3)])
    np.testing.assert_array_equal(obs, again)
    assert sum(len(b) for b in windows.all_windows(per_episode=0)) == windows.num_windows()
    assert sum(len(b) for b in windows.all_windows(per_episode=50)) == windows.num_windows()
    with pytest.raises(ValueError, match="per_episode"):
        next(windows.all_windows(per_episode=-1))


def test_normalisation_uses_public_bounds_only() -> None:
    small, large = _windows([3]), EpisodeWindows([_episode(0, 3), _episode(1, 50)], EMB, 4, 3)
    a = next(small.all_windows()).obs[:3]
    b = next(large.all_windows()).obs[:3]
    torch.testing.assert_close(a, b)  # more (different) data, same scaling
    np.testing.assert_allclose(a[2, -1].numpy(), [2 / 2.0, -2 / 4.0, 0.0])
    act = next(small.all_windows()).action
    torch.testing.assert_close(small.denormalize_action(act)[1, 0], torch.tensor([1.0, 2.0]))


def test_sample_draws_one_window_from_each_listed_episode() -> None:
    windows = _windows([4, 7, 2, 9])
    rng = np.random.default_rng(0)
    ids = [3, 0, 3, 2, 1]
    batch = windows.sample(ids, rng)
    assert len(batch) == 5 and batch.obs.shape == (5, 4, 3) and batch.action.shape == (5, 3, 2)
    assert batch.image.shape == (5, 4, 3)
    np.testing.assert_allclose(_raw_obs(batch.obs)[:, -1, 2], ids)
    seen = set()
    for _ in range(300):
        current = _raw_obs(windows.sample([1], rng).obs)[0, -1, 0]
        seen.add(int(round(current)))
    assert seen == set(range(7))  # every position of episode 1 is reachable, nothing else


def test_sample_is_reproducible_from_rng() -> None:
    windows = _windows([4, 7, 2, 9])
    a = windows.sample([0, 1, 2, 3], np.random.default_rng(5))
    b = windows.sample([0, 1, 2, 3], np.random.default_rng(5))
    torch.testing.assert_close(a.obs, b.obs)


def test_sample_empty_and_bad_ids() -> None:
    windows = _windows([4, 7])
    batch = windows.sample([], np.random.default_rng(0))
    assert batch.obs.shape == (0, 4, 3) and batch.image.shape == (0, 4, 3)
    assert batch.action.shape == (0, 3, 2) and batch.action_pad.shape == (0, 3)
    assert batch.obs.dtype == torch.float32 and batch.action_pad.dtype == torch.bool
    with pytest.raises(IndexError):
        windows.sample([2], np.random.default_rng(0))


def test_relative_action_dimensions_are_offsets_from_the_current_state() -> None:
    """Dim 0 relative to state dim 1 (-t), dim 1 absolute: the target is where to go from
    here, and adding the state back gives the same physical actions as an absolute target."""
    rel_emb = EmbodimentConfig(**{**EMB.__dict__, "action_relative_to": [1, -1]})
    episodes = [_episode(0, 5)]
    relative = next(EpisodeWindows(episodes, rel_emb, history=4, chunk=3).all_windows(batch_size=100))
    absolute = next(EpisodeWindows(episodes, EMB, history=4, chunk=3).all_windows(batch_size=100))
    target = relative.action.numpy() * np.array([0.5, 2.0], dtype=np.float32)
    np.testing.assert_allclose(target[1, :, 0], [1 + 1, 2 + 1, 3 + 1])  # actions 1,2,3 from state -1
    np.testing.assert_allclose(target[3, :, 0], [3 + 3, 4 + 3, 4 + 3])
    np.testing.assert_allclose(target[:, :, 1], absolute.action.numpy()[:, :, 1] * 2.0)
    windows = EpisodeWindows(episodes, rel_emb, history=4, chunk=3)
    torch.testing.assert_close(
        windows.denormalize_action(relative.action, relative.obs),
        _windows([5]).denormalize_action(absolute.action),
    )
    pred = torch.randn_like(relative.action)  # any prediction: its error is the same in both spaces
    torch.testing.assert_close(
        windows.denormalize_action(pred, relative.obs) - windows.denormalize_action(relative.action, relative.obs),
        (pred - relative.action) * torch.tensor([0.5, 2.0]),
    )
    with pytest.raises(ValueError, match="relative to the current state"):
        windows.denormalize_action(pred)


def test_an_untrained_relative_policy_target_is_small_on_synthetic_arms() -> None:
    """On a position-controlled arm most of a chunk's target is where the arm already is."""
    cfg = load_config()
    emb = cfg.embodiments["so100"]
    episodes = generate_episodes("so100", emb, 20, 2.0, seed=0)
    absolute_emb = EmbodimentConfig(**{**emb.__dict__, "action_relative_to": []})
    rel = next(EpisodeWindows(episodes, emb, 4, 8).all_windows(batch_size=10_000)).action
    ab = next(EpisodeWindows(episodes, absolute_emb, 4, 8).all_windows(batch_size=10_000)).action
    assert float((rel**2).mean()) < 0.2 * float((ab**2).mean())


def test_no_image_features_gives_none() -> None:
    emb = load_config().embodiments["so100"]
    episodes = generate_episodes("so100", emb, 6, 0.5, seed=0)
    windows = EpisodeWindows(episodes, emb, history=4, chunk=8)
    batch = windows.sample([0, 5], np.random.default_rng(1))
    assert batch.image is None and batch.obs.shape == (2, 4, emb.obs_dim)
    assert float(batch.obs.abs().max()) <= 1.0 and float(batch.action.abs().max()) <= 1.0


def _episodes(n: int, seed: int = 0):
    return generate_episodes("so100", load_config(model="tiny").embodiments["so100"], n, 0.5, seed=seed)


def test_split_is_disjoint_deterministic_and_by_episode() -> None:
    episodes = _episodes(200)
    train, held = split_episodes(episodes, 0.2, seed=7)
    assert 20 <= len(held) <= 60  # binomial(200, 0.2): 40 +- 5.7
    assert set(train).isdisjoint(held) and sorted(train + held) == list(range(200))
    assert split_episodes(episodes, 0.2, seed=7) == (train, held)
    # Order does not matter: the same episodes end on the same side.
    flipped_train, _ = split_episodes(episodes[::-1], 0.2, seed=7)
    assert sorted(199 - i for i in flipped_train) == train
    assert split_episodes(episodes, 0.2, seed=8) != (train, held)


def test_a_neighbouring_dataset_moves_only_the_episode_that_differs() -> None:
    """The privacy unit is the episode: adding or removing one must not reshuffle which other
    episodes are trained on (a seeded permutation of the count did: DP-SGD's guarantee covers
    training sets that differ in one episode, not in a hundred)."""
    episodes = _episodes(101)
    base, extra = episodes[:100], episodes[100]
    train, held = split_episodes(base, 0.2, seed=0)
    train_plus, held_plus = split_episodes([*base, extra], 0.2, seed=0)
    assert {*train_plus, *held_plus} - {*train, *held} == {100}
    assert set(train_plus) - {100} == set(train) and set(held_plus) - {100} == set(held)
    for removed in (0, 37, 99):
        # As a re-exported LeRobot dataset would be: the remaining episodes renumbered.
        rest = [dataclasses.replace(e, index=k) for k, e in enumerate(e for i, e in enumerate(base) if i != removed)]
        names = [i for i in range(100) if i != removed]
        t, h = split_episodes(rest, 0.2, seed=0)
        assert {names[i] for i in t} == set(train) - {removed} and {names[i] for i in h} == set(held) - {removed}


def test_a_side_may_be_empty_rather_than_depend_on_the_others() -> None:
    """No episode is moved across to fill an empty side: for a tiny dataset that would make
    one episode's presence decide where another one trains."""
    episodes = _episodes(3)
    assert split_episodes(episodes, 0.0, seed=0) == ([0, 1, 2], [])
    assert split_episodes(episodes, 1.0, seed=0) == ([], [0, 1, 2])
    for n in range(1, 4):
        train, held = split_episodes(episodes[:n], 0.5, seed=0)
        assert sorted(train + held) == list(range(n))
        bigger_train, bigger_held = split_episodes(episodes[: n + 1] if n < 3 else episodes, 0.5, seed=0)
        assert set(train) <= set(bigger_train) and set(held) <= set(bigger_held)


def test_split_degenerate_sizes() -> None:
    assert split_episodes([], 0.2, seed=0) == ([], [])
    with pytest.raises(ValueError, match="held_out_fraction"):
        split_episodes(_episodes(3), 1.5, seed=0)
