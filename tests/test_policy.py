"""The policy, its MoE dispatch and LoRA: shapes, batch independence, and DP-correct
per-sample gradients under Opacus (see /work/shared/notes/dp-on-moe.md)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from shared_model.config import load_config
from shared_model.lora import LoRALinear, stable_seed
from shared_model.moe import MoELayer
from shared_model.policy import Policy, build_meta, count_parameters
from shared_model.shards import SHARED_ADAPTER, embodiment_shard, expert_shard, set_trainable


@pytest.fixture(scope="module")
def cfg():
    return load_config(model="tiny")


@pytest.fixture(scope="module")
def policy(cfg):
    return Policy(cfg.model, cfg.embodiments).eval()


def _inputs(cfg, name: str, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    emb = cfg.embodiments[name]
    obs = torch.randn(batch, cfg.model.history, emb.obs_dim, generator=gen)
    image = None
    if emb.image_feature_dim:
        image = torch.randn(batch, cfg.model.history, emb.image_feature_dim, generator=gen)
    return obs, image


def _randomise_lora_b(model: nn.Module, seed: int = 1) -> None:
    """LoRA B starts at zero; make it non-zero so the LoRA path really contributes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B.weight"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


def test_forward_shapes_every_embodiment(cfg, policy):
    assert set(cfg.embodiments) == {"so100", "franka", "aloha", "agv"}
    for name, emb in cfg.embodiments.items():
        obs, image = _inputs(cfg, name, 3)
        actions, aux = policy(name, obs, image)
        assert actions.shape == (3, cfg.model.chunk, emb.action_dim)
        assert aux.shape == (3,)
        assert torch.isfinite(actions).all()
        assert (aux >= 0).all()


def test_batch_independence(cfg):
    policy = Policy(cfg.model, cfg.embodiments).eval()
    _randomise_lora_b(policy)
    for name in cfg.embodiments:
        obs, image = _inputs(cfg, name, 7, seed=3)
        actions, aux = policy(name, obs, image)
        for i in range(7):
            one, one_aux = policy(name, obs[i : i + 1], None if image is None else image[i : i + 1])
            torch.testing.assert_close(actions[i : i + 1], one, atol=1e-5, rtol=0)
            torch.testing.assert_close(aux[i : i + 1], one_aux, atol=1e-5, rtol=0)


def test_empty_batch_forward_and_backward(cfg):
    model = Policy(cfg.model, cfg.embodiments)
    obs, image = _inputs(cfg, "agv", 0)
    actions, aux = model("agv", obs, image)
    assert actions.shape == (0, cfg.model.chunk, 2) and aux.shape == (0,)
    (actions.sum() + aux.sum()).backward()


def test_input_errors(cfg, policy):
    obs, image = _inputs(cfg, "agv", 2)
    with pytest.raises(ValueError, match="unknown embodiment 'ur5'"):
        policy("ur5", obs, image)
    with pytest.raises(ValueError, match=r"expects obs of shape \[B, 4, 7\]"):
        policy("agv", obs[..., :-1], image)
    with pytest.raises(ValueError, match="expects obs"):
        policy("agv", obs[:, :-1], image)
    with pytest.raises(ValueError, match="expects obs"):
        policy("agv", obs[0], image)
    with pytest.raises(ValueError, match="image features of shape"):
        policy("agv", obs, None)
    with pytest.raises(ValueError, match="image features of shape"):
        policy("agv", obs, image[..., :-1])
    so_obs, _ = _inputs(cfg, "so100", 2)
    with pytest.raises(ValueError, match="has no image features"):
        policy("so100", so_obs, image)


def test_bad_embodiment_name(cfg):
    embs = {"so.100": cfg.embodiments["so100"]}
    with pytest.raises(ValueError, match="embodiment name"):
        Policy(cfg.model, embs)


def test_deterministic_init_leaves_global_rng_alone(cfg):
    state = torch.random.get_rng_state()
    a = Policy(cfg.model, cfg.embodiments).state_dict()
    b = Policy(cfg.model, cfg.embodiments).state_dict()
    assert torch.equal(state, torch.random.get_rng_state())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    other = copy.deepcopy(cfg.model)
    other.init_seed = cfg.model.init_seed + 1
    c = Policy(other, cfg.embodiments).state_dict()
    assert not torch.equal(a["blocks.0.moe.experts.0.w_gate.weight"], c["blocks.0.moe.experts.0.w_gate.weight"])
    # LoRA A depends on lora_seed only: identical on every node, whatever the init seed.
    assert torch.equal(a["blocks.1.attn.v.lora_A.weight"], c["blocks.1.attn.v.lora_A.weight"])
    assert not torch.equal(a["blocks.1.attn.v.lora_A.weight"], a["blocks.1.attn.q.lora_A.weight"])
    assert not torch.equal(a["blocks.0.attn.v.lora_A.weight"], a["blocks.1.attn.v.lora_A.weight"])
    assert all(torch.count_nonzero(a[k]) == 0 for k in a if k.endswith("lora_B.weight"))

    # A new embodiment changes nothing that existed before (consortium members can join).
    fewer = Policy(cfg.model, {"so100": cfg.embodiments["so100"]}).state_dict()
    assert all(torch.equal(fewer[k], a[k]) for k in fewer)


def test_lora_linear():
    base = nn.Linear(12, 10, bias=False)
    lora = LoRALinear(base, rank=3, alpha=6.0, seed=stable_seed(7, "x"))
    again = LoRALinear(nn.Linear(12, 10, bias=False), rank=3, alpha=6.0, seed=stable_seed(7, "x"))
    assert torch.equal(lora.lora_A.weight, again.lora_A.weight)
    assert type(lora.lora_A) is nn.Linear and type(lora.lora_B) is nn.Linear  # Opacus leaf modules
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_B.weight"]
    x = torch.randn(5, 12)
    torch.testing.assert_close(lora(x), base(x))  # B = 0 at init: LoRA starts as the identity update
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    expected = base(x) + 2.0 * x @ lora.lora_A.weight.T @ lora.lora_B.weight.T
    torch.testing.assert_close(lora(x), expected)
    assert stable_seed(7, "x") == stable_seed(7, "x") != stable_seed(8, "x")


def _dense_moe_reference(moe: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the (mostly zero) gates."""
    gates, top_i, _ = moe.router(x)
    combine = torch.zeros(*x.shape[:2], moe.n_experts).scatter(-1, top_i, gates)
    return sum(combine[..., e : e + 1] * expert(x) for e, expert in enumerate(moe.experts))


def test_moe_dispatch_matches_dense_and_preserves_batch():
    torch.manual_seed(0)
    moe = MoELayer(d_model=16, n_experts=6, top_k=2, hidden=24)
    x = torch.randn(5, 11, 16)
    seen: list[tuple[int, ...]] = []
    handles = [e.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape))) for e in moe.experts]
    y, aux = moe(x)
    for h in handles:
        h.remove()
    torch.testing.assert_close(y, _dense_moe_reference(moe, x), atol=1e-6, rtol=1e-5)
    assert len(seen) == 6 and all(s[0] == 5 and s[2] == 16 for s in seen)  # [B, C, D], never flattened
    assert aux.shape == (5,) and (aux >= 0).all()

    # aux is the per-sample Switch loss E * sum_e f_e * P_e.
    _, top_i, probs = moe.router(x)
    frac = torch.zeros(5, 11, 6).scatter(-1, top_i, 1.0).mean(1) / 2
    torch.testing.assert_close(aux, 6 * (frac * probs.mean(1)).sum(-1))


def test_moe_calls_every_expert_even_when_starved_and_on_empty_batch():
    torch.manual_seed(0)
    moe = MoELayer(d_model=8, n_experts=4, top_k=1, hidden=8)
    moe.router.proj.register_forward_hook(lambda m, i, o: o - 1e4 * torch.tensor([1.0, 0, 0, 0]))
    calls: list[tuple[int, ...]] = []
    for e in moe.experts:
        e.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    x = torch.randn(3, 5, 8)
    y, _ = moe(x)
    assert calls[0] == (3, 1, 8)  # starved expert: one gate-0 padding token per sample
    torch.testing.assert_close(y, _dense_moe_reference(moe, x), atol=1e-6, rtol=1e-5)
    calls.clear()
    y, aux = moe(torch.randn(0, 5, 8))
    assert y.shape == (0, 5, 8) and aux.shape == (0,) and len(calls) == 4


def test_moe_padding_is_zero_so_an_overflowing_expert_cannot_couple_samples():
    """A sample's padding slots depend on the other samples' loads. Padded with the sample's
    own unrouted tokens, an expert that overflows on one of them gives inf x gate 0 = NaN in
    that sample's output, only when some other sample raised the capacity: one episode could
    then wipe out other episodes' terms of a DP step. Padded with zeros, it cannot."""
    d, n_exp = 8, 4
    moe = MoELayer(d_model=d, n_experts=n_exp, top_k=1, hidden=16)
    with torch.no_grad():
        route = torch.zeros(n_exp, d)
        route[:, :n_exp] = 100 * torch.eye(n_exp)  # each token goes to the expert of its largest of dims 0..3
        moe.router.proj.weight.copy_(route)
        for lin in (moe.experts[3].w_gate, moe.experts[3].w_up, moe.experts[3].w_down):
            lin.weight.fill_(1e9)  # overflows float32 on any sizeable input
    a = torch.zeros(1, 4, d)
    a[..., 0] = 1.0
    a[0, 1, 4:] = 1e6  # every token of a goes to expert 0; token 1 would overflow expert 3
    b = torch.zeros(1, 4, d)
    b[0, :, 0] = 1.0
    b[0, :2, 0] = 0.0
    b[0, :2, 3] = 1e-6  # two tokens of b go to expert 3, so its capacity is 2 in a batch with b
    with torch.no_grad():
        alone, _ = moe(a)
        together, _ = moe(torch.cat([a, b]))
    assert torch.isfinite(alone).all() and torch.isfinite(together[0]).all()
    torch.testing.assert_close(together[0], alone[0])


def test_build_meta_allocates_nothing(cfg):
    meta = build_meta(cfg.model, cfg.embodiments)
    real = Policy(cfg.model, cfg.embodiments)
    assert all(p.is_meta for p in meta.parameters())
    assert count_parameters(meta) == count_parameters(real) == sum(v.numel() for v in real.state_dict().values())
    assert [n for n, _ in meta.named_parameters()] == [n for n, _ in real.named_parameters()]


# --- Opacus: per-sample gradients must equal single-sample backward passes -------------------


def _per_sample_loss(pred: torch.Tensor, target: torch.Tensor, aux: torch.Tensor, coef: float) -> torch.Tensor:
    return ((pred - target) ** 2).mean(dim=(1, 2)) + coef * aux


def _opacus_vs_loop(cfg, model: Policy, shards: list[str], name: str, batch: int) -> dict[str, torch.Tensor]:
    """Max |grad_sample - single-sample grad| per trainable parameter; returns grad samples."""
    from opacus import GradSampleModule

    trainable = set_trainable(model, shards)
    reference = copy.deepcopy(model)  # hook-free copy for the single-sample loop
    obs, image = _inputs(cfg, name, batch, seed=11)
    target = torch.randn(batch, cfg.model.chunk, cfg.embodiments[name].action_dim, generator=torch.Generator())
    coef = 0.5  # large, so a wrong aux gradient would show
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "full backward hook ... no inputs require grad"
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        pred, aux = gsm(name, obs, image)
        _per_sample_loss(pred, target, aux, coef).sum().backward()
    params = dict(model.named_parameters())
    grad_samples = {n: params[n].grad_sample.detach().clone() for n in trainable}
    assert all(g.shape[0] == batch for g in grad_samples.values())
    ref_params = dict(reference.named_parameters())
    for i in range(batch):
        reference.zero_grad(set_to_none=True)
        pred, aux = reference(name, obs[i : i + 1], None if image is None else image[i : i + 1])
        _per_sample_loss(pred, target[i : i + 1], aux, coef).sum().backward()
        for n in trainable:
            diff = (grad_samples[n][i] - ref_params[n].grad).abs().max().item()
            assert diff < 1e-5, f"{n} sample {i}: per-sample gradient off by {diff}"
    gsm._close()
    return grad_samples


def test_opacus_per_sample_gradients_match_loop(cfg):
    model = Policy(cfg.model, cfg.embodiments)
    _randomise_lora_b(model)
    shards = [expert_shard(0, 1), expert_shard(1, 2), SHARED_ADAPTER, embodiment_shard("agv")]
    grads = _opacus_vs_loop(cfg, model, shards, "agv", batch=6)
    assert "blocks.0.attn.q.lora_B.weight" in grads and "adapters.agv.image.weight" in grads
    assert not any("lora_A" in n for n in grads)
    assert any(g.abs().max() > 0 for n, g in grads.items() if ".experts." in n)


def test_opacus_per_sample_gradients_with_a_starved_expert(cfg):
    model = Policy(cfg.model, cfg.embodiments)
    _randomise_lora_b(model)
    starve = torch.zeros(cfg.model.n_experts)
    starve[0] = 1e4
    for block in model.blocks:  # no token of any sample routes to expert 0, in any layer
        block.moe.router.proj.register_forward_hook(lambda m, i, o: o - starve)
    shards = [expert_shard(0, 0), expert_shard(1, 3), SHARED_ADAPTER, embodiment_shard("franka")]
    grads = _opacus_vs_loop(cfg, model, shards, "franka", batch=6)
    starved = [g for n, g in grads.items() if n.startswith("blocks.0.moe.experts.0.")]
    assert len(starved) == 3 and all(torch.count_nonzero(g) == 0 for g in starved)


def test_opacus_empty_batch(cfg):
    from opacus import GradSampleModule

    model = Policy(cfg.model, cfg.embodiments)
    set_trainable(model, [expert_shard(0, 0), SHARED_ADAPTER, embodiment_shard("so100")])
    obs, _ = _inputs(cfg, "so100", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        pred, aux = gsm("so100", obs)
        _per_sample_loss(pred, torch.zeros_like(pred), aux, 0.01).sum().backward()
    assert all(p.grad_sample.shape[0] == 0 for p in model.parameters() if p.requires_grad)
    gsm._close()
