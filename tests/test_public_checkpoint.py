"""The round-0 model from public data: pretrained on public simulated episodes only."""

from __future__ import annotations

import pytest
import torch

from coordinator.federation import initial_model
from coordinator.public_checkpoint import public_checkpoint, public_embodiments
from member_node.synthetic import generate_episodes
from member_node.trainer import evaluate
from member_node.windows import EpisodeWindows
from shared_model.config import ConfigError, load_config
from shared_model.policy import Policy

FAST = ["public.episodes=24", "train.local_steps=10", "train.batch_size=16"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(model="tiny", overrides=["public.rounds=3", *FAST])


@pytest.fixture(scope="module")
def checkpoint(cfg):
    return public_checkpoint(cfg)


def test_without_public_rounds_round_0_is_the_random_initialisation():
    cfg = load_config(model="tiny")
    assert cfg.public.rounds == 0
    want = Policy(cfg.model, cfg.embodiments).state_dict()
    got = initial_model(cfg)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_the_checkpoint_is_deterministic_and_trains_every_shard_kind(cfg, checkpoint):
    assert all(torch.equal(checkpoint[k], v) for k, v in initial_model(cfg).items())
    random = Policy(cfg.model, cfg.embodiments).state_dict()
    assert checkpoint.keys() == random.keys()
    changed = {k for k in random if not torch.equal(checkpoint[k], random[k])}
    for name in ("blocks.0.attn.k.weight", "pos_emb.weight", "blocks.0.moe.router.proj.weight"):  # backbone
        assert name in changed
    assert "blocks.0.attn.q.lora_B.weight" in changed  # the shared adapter
    assert "blocks.0.attn.q.lora_A.weight" not in changed  # A stays at its shared seed
    assert any(".moe.experts." in k for k in changed)
    assert {k.split(".")[1] for k in changed if k.startswith("adapters.")} == set(cfg.embodiments)
    assert all(torch.isfinite(v).all() for v in checkpoint.values())


def test_public_episodes_come_from_another_control_rate(cfg):
    public = public_embodiments(cfg)
    assert public.keys() == cfg.embodiments.keys()
    for name, emb in cfg.embodiments.items():
        assert public[name].fps == round(emb.fps * 1.5) and public[name].action_dim == emb.action_dim


def test_pretraining_on_public_data_helps_on_a_members_robot(cfg, checkpoint):
    """The checkpoint errs less than a random policy on so100 episodes at the members' own
    control rate, from seeds the public data never used."""
    emb = cfg.embodiments["so100"]
    member = EpisodeWindows(generate_episodes("so100", emb, 16, 4.0, 22), emb, cfg.model.history, cfg.model.chunk)
    policy = Policy(cfg.model, cfg.embodiments)
    untrained = evaluate(policy, "so100", member, per_episode=4).action_mse
    policy.load_state_dict(checkpoint)
    assert evaluate(policy, "so100", member, per_episode=4).action_mse < untrained


@pytest.mark.parametrize(
    "override, message",
    [
        ("public.rounds=-1", "public.rounds"),
        ("public.episodes=0", "public.episodes"),
        ("public.fps_scale=0", "public.fps_scale"),
        ("public.fps_scale=nan", "public.fps_scale"),
    ],
)
def test_bad_public_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(model="tiny", overrides=[override])


def test_public_checkpoint_needs_rounds():
    with pytest.raises(ValueError, match="public.rounds"):
        public_checkpoint(load_config(model="tiny"))
