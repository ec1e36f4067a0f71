"""The round-0 model from public data: pretrained on public simulated episodes only."""

from __future__ import annotations

import hashlib
import json

import pytest
import safetensors.torch
import torch

from coordinator.cli import main as coordinator_cli
from coordinator.federation import initial_model
from coordinator.public_checkpoint import (
    CheckpointError,
    check_published,
    initial_source,
    load_checkpoint,
    public_checkpoint,
    public_embodiments,
    write_checkpoint,
)
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


def test_progress_is_reported_after_each_embodiments_steps():
    cfg = load_config(model="tiny", overrides=["public.rounds=2", *FAST])
    calls: list[tuple[int, str]] = []
    public_checkpoint(cfg, on_block=lambda rnd, name: calls.append((rnd, name)))
    assert calls == [(rnd, name) for rnd in (1, 2) for name in sorted(cfg.embodiments)]


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


# ----------------------------------------------------------------------------- imported checkpoint


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """What an operator does once: ``kyodo-coordinator pretrain``, then publish the hash."""
    out = tmp_path_factory.mktemp("published") / "round0.safetensors"
    assert coordinator_cli(["pretrain", "--model", "tiny", "--rounds", "3", "--out", str(out), *FAST]) == 0
    return out, hashlib.sha256(out.read_bytes()).hexdigest()


def _importing(path, digest, *more):
    return load_config(
        model="tiny", overrides=[f"public.checkpoint={path}", f"public.checkpoint_sha256={digest}", *more]
    )


def test_pretrain_writes_the_checkpoint_a_run_imports(published, checkpoint):
    path, digest = published
    meta = safetensors.safe_open(str(path), "pt").metadata()
    assert meta["format"] == "kyodo-public-checkpoint/1" and meta["model"] == "tiny"
    assert json.loads(meta["public"])["rounds"] == 3
    cfg = _importing(path, digest)
    got = initial_model(cfg)
    assert got.keys() == checkpoint.keys() and all(torch.equal(got[k], checkpoint[k]) for k in checkpoint)
    assert initial_source(cfg) == {"source": "public-checkpoint", "sha256": f"sha256:{digest}"}


def test_pretrain_refuses_to_overwrite(published):
    path, digest = published
    assert coordinator_cli(["pretrain", "--model", "tiny", "--rounds", "1", "--out", str(path), *FAST]) == 2
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_a_file_other_than_the_published_one_is_refused(published, tmp_path):
    path, digest = published
    tampered = tmp_path / "round0.safetensors"
    state = safetensors.torch.load_file(str(path))
    state["blocks.0.moe.router.proj.weight"][0, 0] += 1e-3
    write_checkpoint(state, tampered, {"format": "kyodo-public-checkpoint/1"})
    with pytest.raises(CheckpointError, match=f"not the published public.checkpoint_sha256 {digest}"):
        initial_model(_importing(tampered, digest))
    # The demo refuses it before any member prepares data or Ray starts.
    argv = ["demo", "--model", "tiny", f"public.checkpoint={tampered}", f"public.checkpoint_sha256={digest}",
            f"out_dir={tmp_path / 'run'}", f"data_root={tmp_path / 'data'}"]  # fmt: skip
    assert coordinator_cli(argv) == 2
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_a_missing_or_malformed_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read it"):
        initial_model(_importing(tmp_path / "absent.safetensors", "0" * 64))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        initial_model(_importing(junk, hashlib.sha256(b"not safetensors").hexdigest()))


def test_a_checkpoint_of_another_model_is_refused(tmp_path, cfg):
    """Hash right, tensors wrong: a file made for another model size, one with a tensor left
    out, one with a non-finite value."""
    other = load_config(model="tiny", overrides=["model.d_model=16", "model.n_heads=2"])
    ours = Policy(cfg.model, cfg.embodiments).state_dict()
    cases = {
        "does not fit model 'tiny': action_queries.weight: torch.float32 .8, 16., model has torch.float32 .8, 32.; "
        ".*and \\d+ more": Policy(other.model, other.embodiments).state_dict(),
        "missing pos_emb.weight": {k: v for k, v in ours.items() if k != "pos_emb.weight"},
        "pos_emb.weight: not finite": {**ours, "pos_emb.weight": torch.full_like(ours["pos_emb.weight"], float("nan"))},
    }
    for i, (message, state) in enumerate(cases.items()):
        path = tmp_path / f"{i}.safetensors"
        digest = write_checkpoint(state, path, {})
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(_importing(path, digest))
        if "finite" not in message:  # the early check reads names, shapes and dtypes only
            with pytest.raises(CheckpointError, match=message):
                check_published(_importing(path, digest))


def test_a_checkpoint_of_another_task_buckets_is_refused_early_and_says_so(tmp_path, cfg):
    """Checked from the file's header before a run is submitted (``init``, ``run``)."""
    reads_tasks = load_config(model="tiny", overrides=["model.task_buckets=16"])
    path = tmp_path / "tasks.safetensors"
    digest = write_checkpoint(Policy(reads_tasks.model, reads_tasks.embodiments).state_dict(), path, {})
    with pytest.raises(
        CheckpointError, match="unexpected task_proj.weight .*another model.task_buckets than this run's 0"
    ):
        check_published(_importing(path, digest))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["public.checkpoint=/x.safetensors"], "needs public.checkpoint_sha256"),
        (["public.checkpoint=/x.safetensors", "public.checkpoint_sha256=ABC"], "64 lowercase hex"),
        ([f"public.checkpoint_sha256={'a' * 64}"], "public.checkpoint .the file. is not"),
        (["public.checkpoint=/x.safetensors", f"public.checkpoint_sha256={'a' * 64}", "public.rounds=2"], "set one"),
    ],
)
def test_checkpoint_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(model="tiny", overrides=overrides)


def test_the_round_0_record_says_where_round_0_came_from():
    assert initial_source(load_config(model="tiny")) == {"source": "init", "init_seed": 0}
    pretrained = initial_source(load_config(model="tiny", overrides=["public.rounds=4"]))
    assert pretrained["source"] == "public-pretraining" and pretrained["rounds"] == 4
