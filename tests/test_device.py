"""Which device a member node trains on: checked at start, and training there matches the host."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from member_node.identity import NodeConfigError, resolve_identity, workers_problem
from member_node.node import MemberNode
from member_node.synthetic import generate_dataset
from privacy.secure_noise import SecureRandom
from shared_model.config import load_config
from shared_model.device import resolve_device
from shared_model.policy import Policy
from shared_model.protocol import EvaluateRequest, TrainHyperParams, TrainRequest

HP = TrainHyperParams(lr=0.01, local_steps=3, batch_size=8, weight_decay=0.0, seed=0, sample_rate=0.8)
NO_CUDA = not torch.cuda.is_available()


@pytest.mark.parametrize("name", ["cpu", "CPU", " cpu "])
def test_cpu_is_always_there(name):
    assert resolve_device(name) == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "cuda:", "cuda:-1", "cuda:x", "gpu", "", "cpu:0:1", "xpu"])
def test_names_torch_or_this_node_cannot_train_on_are_refused(name):
    with pytest.raises(ValueError, match="not one of cpu, cuda, cuda:N"):
        resolve_device(name)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA device")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_cuda_device_says_so(name):
    with pytest.raises(ValueError, match="sees no CUDA device"):
        resolve_device(name)


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_a_cuda_index_beyond_the_machine_is_refused():
    count = torch.cuda.device_count()
    assert resolve_device(f"cuda:{count - 1}").index == count - 1
    with pytest.raises(ValueError, match=f"has {count} CUDA device"):
        resolve_device(f"cuda:{count}")


def test_mps_is_refused_because_the_dp_noise_needs_float64():
    with pytest.raises(ValueError, match="mps has no float64"):
        resolve_device("mps")


def test_the_node_config_device_is_checked_before_the_node_starts(tmp_path):
    cfg = load_config(model="tiny")
    base = {"member": "x", "embodiment": "so100", "data-dir": str(tmp_path / "d")}
    assert resolve_identity(base, cfg).torch_device() == torch.device("cpu")  # the default
    assert resolve_identity({**base, "device": "cpu"}, cfg).device == "cpu"
    with pytest.raises(NodeConfigError, match="member 'x': node config 'device': device 'tpu'"):
        resolve_identity({**base, "device": "tpu"}, cfg)
    assert not (tmp_path / "d").exists() and not (tmp_path / "d-state").exists()
    assert resolve_identity({**base, "workers": 3}, cfg).workers == 3
    for workers, match in ((0, "must be >= 1"), ("two", "whole number"), (True, "whole number")):
        with pytest.raises(NodeConfigError, match=f"'workers'.*{match}"):
            resolve_identity({**base, "workers": workers}, cfg)
    if NO_CUDA:
        with pytest.raises(NodeConfigError, match="sees no CUDA device"):
            resolve_identity({**base, "workers": 2, "device": "cuda"}, cfg)


def test_which_devices_data_parallel_workers_can_share():
    assert workers_problem(1, "cpu") == "" and workers_problem(4, "cpu") == ""
    assert "name the device 'cuda'" in workers_problem(2, "cuda:1")  # worker r takes cuda:r
    if torch.cuda.device_count() < 64:
        assert "64 workers need 64 CUDA devices" in workers_problem(64, "cuda")


def test_noise_made_for_a_device_is_the_host_stream_moved_there():
    """The key stream is the same whatever the device; only where Box-Muller runs changes."""
    host = SecureRandom(seed=9).normal(1001)
    assert torch.equal(SecureRandom(seed=9).normal(1001, torch.device("cpu")), host)
    if not NO_CUDA:
        on_gpu = SecureRandom(seed=9).normal(1001, "cuda")
        assert on_gpu.device.type == "cuda" and torch.allclose(on_gpu.cpu(), host, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def sony(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    cfg = load_config(model="tiny", overrides=[f"data_root={root}", f"state_root={root / 'state'}"])
    generate_dataset(root / "sony", "so100", cfg.embodiments["so100"], episodes=12, episode_seconds=2.0, seed=1)
    identity = resolve_identity({"partition-id": 1}, cfg)
    model = {k: v.clone() for k, v in Policy(cfg.model, cfg.embodiments).state_dict().items()}
    return cfg, identity, model


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_a_round_on_cuda_matches_the_host_and_returns_host_tensors(sony, tmp_path):
    cfg, identity, model = sony
    shards = ["expert/L0/E1", "adapter/shared", "adapter/emb/so100"]
    plain = replace(identity, dp=False)
    host = MemberNode(cfg, replace(plain, state_dir=tmp_path / "h")).train(TrainRequest(1, shards, HP, model))
    node = MemberNode(cfg, replace(plain, state_dir=tmp_path / "g", device="cuda"))
    gpu = node.train(TrainRequest(1, shards, HP, model))
    assert next(node.policy.parameters()).device.type == "cuda"
    for name, delta in host.deltas.items():
        assert gpu.deltas[name].device.type == "cpu"
        torch.testing.assert_close(gpu.deltas[name], delta, rtol=1e-3, atol=1e-5)
    held = node.evaluate(EvaluateRequest(1, model, run="r"))
    assert held.action_mse > 0
    # Under DP: the receipt, the noise and the deltas come back as on the host.
    private = MemberNode(cfg, replace(identity, state_dir=tmp_path / "p", device="cuda"))
    reply = private.train(TrainRequest(1, shards, HP, model, run="r", planned_rounds=2))
    assert reply.receipt and all(d.device.type == "cpu" and torch.isfinite(d).all() for d in reply.deltas.values())
