"""Data-parallel DP-SGD inside one member (``member_node.parallel``): real worker processes
in a real ``torch.distributed`` group (gloo on 127.0.0.1), against the single-process round."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from member_node.lerobot import Episode
from member_node.parallel import split_episodes_for_workers, train_shards_parallel
from member_node.synthetic import generate_episodes
from member_node.trainer import train_shards
from member_node.windows import EpisodeWindows
from privacy.dp_sgd import DPConfig
from shared_model.config import load_config
from shared_model.policy import Policy
from shared_model.protocol import TrainHyperParams

EMB = "so100"
SHARDS = ["expert/L0/E1", "adapter/shared", f"adapter/emb/{EMB}"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(model="tiny")


def _one_frame_episodes(cfg, n: int) -> list[Episode]:
    """Episodes of a single frame: each has exactly one window, so which window a step draws
    does not depend on any generator, and two ways of sampling all episodes see the same data."""
    full = generate_episodes(EMB, cfg.embodiments[EMB], n, 1.0, seed=3)
    return [Episode(e.index, e.state[:1], e.env_state[:1], None, e.action[:1]) for e in full]


def test_episodes_are_split_disjointly_and_evenly():
    parts = split_episodes_for_workers(list(range(7)), 3)  # any sequence; episodes in practice
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match="cannot be split across 8 workers"):
        split_episodes_for_workers(list(range(7)), 8)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        split_episodes_for_workers(list(range(7)), 0)


def test_two_workers_take_the_single_process_step(cfg):
    """q = 1 (every episode every step) and the same test noise seed: the two-worker round adds
    up the same clipped gradients, draws the same noise once, and takes the same steps."""
    episodes = _one_frame_episodes(cfg, 12)
    hp = TrainHyperParams(lr=1e-2, local_steps=3, batch_size=12, max_grad_norm=0.1)
    dp = DPConfig(noise_multiplier=0.7, max_grad_norm=0.1, sample_rate=1.0)
    policy = Policy(cfg.model, cfg.embodiments)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    parallel = train_shards_parallel(policy, EMB, episodes, SHARDS, hp, dp=dp, workers=2, aux_coef=0.01, noise_seed=5)
    assert all(torch.equal(v, start[k]) for k, v in policy.state_dict().items()), "the node's policy is untouched"
    windows = EpisodeWindows(episodes, cfg.embodiments[EMB], history=cfg.model.history, chunk=cfg.model.chunk)
    single = train_shards(
        policy, EMB, windows, SHARDS, hp, aux_coef=0.01, rng=np.random.default_rng(0), dp=dp, dp_noise_seed=5
    )
    assert (parallel.steps, parallel.empty_steps, parallel.num_examples, parallel.dp_mode) == (3, 0, 12, "bk")
    assert set(parallel.deltas) == set(single.deltas)
    for name, delta in single.deltas.items():
        assert parallel.deltas[name].device.type == "cpu"
        torch.testing.assert_close(parallel.deltas[name], delta, rtol=1e-4, atol=1e-6)
    assert any(d.abs().max() > 0 for d in parallel.deltas.values())


def test_a_physical_batch_smaller_than_the_sample_gives_the_same_round(cfg):
    """A member with many episodes: its Poisson sample goes through in chunks, same update."""
    episodes = _one_frame_episodes(cfg, 12)
    windows = EpisodeWindows(episodes, cfg.embodiments[EMB], history=cfg.model.history, chunk=cfg.model.chunk)
    hp = TrainHyperParams(lr=1e-2, local_steps=2, batch_size=12)
    dp = DPConfig(noise_multiplier=0.7, max_grad_norm=0.1, sample_rate=1.0)

    def run(physical_batch):
        policy = Policy(cfg.model, cfg.embodiments)
        return train_shards(
            policy, EMB, windows, SHARDS, hp, aux_coef=0.01, rng=np.random.default_rng(0), dp=dp, dp_noise_seed=2,
            physical_batch=physical_batch,
        )  # fmt: skip

    whole, chunked = run(None), run(5)  # 12 episodes a step: chunks of 5, 5 and 2
    assert chunked.steps == whole.steps == 2
    for name, delta in whole.deltas.items():
        torch.testing.assert_close(chunked.deltas[name], delta, rtol=1e-4, atol=1e-6)


def test_poisson_rounds_over_workers_stay_in_step(cfg):
    """At q < 1 a worker's own sample is often empty; every step still runs everywhere and the
    workers end on the same update (the round checks it before returning)."""
    episodes = generate_episodes(EMB, cfg.embodiments[EMB], 9, 1.0, seed=4)
    hp = TrainHyperParams(lr=1e-3, local_steps=4, batch_size=2)
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=0.1, sample_rate=0.2)
    result = train_shards_parallel(
        Policy(cfg.model, cfg.embodiments), EMB, episodes, SHARDS, hp, dp=dp, workers=3, aux_coef=0.01
    )
    assert result.steps == 4 and result.num_examples == 9
    assert all(torch.isfinite(d).all() for d in result.deltas.values())


def test_a_failing_worker_fails_the_round_with_its_reason(cfg):
    episodes = generate_episodes(EMB, cfg.embodiments[EMB], 4, 1.0, seed=4)
    hp = TrainHyperParams(lr=1e-3, local_steps=1, batch_size=2)
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=0.1, sample_rate=0.5)
    with pytest.raises(RuntimeError, match="a training worker failed.*expert/L9/E0"):
        train_shards_parallel(
            Policy(cfg.model, cfg.embodiments), EMB, episodes, ["expert/L9/E0"], hp, dp=dp, workers=2, aux_coef=0.01
        )
    more = torch.cuda.device_count() + 1
    with pytest.raises(ValueError, match=f"{more} workers need {more} CUDA devices"):
        train_shards_parallel(
            Policy(cfg.model, cfg.embodiments), EMB, episodes * more, SHARDS, hp, dp=dp, workers=more,
            aux_coef=0.01, device_type="cuda",
        )  # fmt: skip


def test_a_member_node_with_two_workers_trains_a_private_round(tmp_path):
    """The node config's ``workers``: the round runs over worker processes, the ledger and
    receipt are those of one round, and the node's model is the committed one afterwards."""
    from dataclasses import replace

    from member_node.identity import resolve_identity
    from member_node.node import MemberNode
    from member_node.synthetic import generate_dataset
    from privacy.ledger import receipt_from_json
    from shared_model.protocol import TrainRequest

    cfg = load_config(model="tiny", overrides=[f"data_root={tmp_path}", f"state_root={tmp_path / 'state'}"])
    generate_dataset(tmp_path / "sony", EMB, cfg.embodiments[EMB], episodes=12, episode_seconds=2.0, seed=1)
    identity = resolve_identity({"partition-id": 1, "workers": 2}, cfg)  # the default federation's sony
    identity = replace(identity, workers=2)
    node = MemberNode(cfg, identity)
    model = {k: v.clone() for k, v in Policy(cfg.model, cfg.embodiments).state_dict().items()}
    hp = TrainHyperParams(lr=1e-2, local_steps=3, batch_size=4, sample_rate=0.4)
    reply = node.train(TrainRequest(1, SHARDS, hp, model, run="r", planned_rounds=2))
    entry = receipt_from_json(reply.receipt)
    assert entry == node.ledger.find("r", 1) and entry["mechanism"]["steps"] == reply.steps == 3
    assert entry["mechanism"]["sample_rate"] == 0.4
    assert all(torch.isfinite(d).all() for d in reply.deltas.values())
    assert any(d.abs().max() > 0 for d in reply.deltas.values())
    assert all(torch.equal(v, model[k]) for k, v in node.policy.state_dict().items())
    # More workers than training episodes: not an error the coordinator would see (it would
    # tell it how few episodes the member has); the node uses one worker per episode.
    n_train = len(node.train_episodes)
    assert MemberNode(cfg, replace(identity, workers=n_train + 1, state_dir=tmp_path / "w")).workers == n_train


_KEY_SCRIPT = """
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from privacy.dp_sgd import _shared_noise_key

def work(rank, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    key = bytes([rank + 1]) * 32  # each worker its own key before the broadcast
    shared = _shared_noise_key(key, torch.device("cpu"))
    with open(f"{out}.{rank}", "wb") as f:
        f.write(shared)
    dist.barrier()
    dist.destroy_process_group()

if __name__ == "__main__":
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    mp.spawn(work, args=(sys.argv[1], sys.argv[2]), nprocs=2)
"""


def test_every_worker_noises_with_rank_0s_key(tmp_path):
    """The workers' slices are parts of one draw only under one key: rank 0's reaches all."""
    script = tmp_path / "keys.py"
    script.write_text(_KEY_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "store"), str(tmp_path / "key")],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "key.0").read_bytes() == (tmp_path / "key.1").read_bytes() == bytes([1]) * 32
