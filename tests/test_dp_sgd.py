"""DP-SGD on the member node: clipped per-episode gradients, noise, Poisson batches, cleanup.

The reference for every clipping check is a loop of single-sample backward passes on a
hook-free copy of the policy, clipped by hand with Opacus' rule
``min(1, C / (||g_i|| + 1e-6))`` over all trainable parameters together.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import secrets

import numpy as np
import pytest
import torch
from torch import nn

from member_node.synthetic import generate_episodes
from member_node.trainer import train_shards
from member_node.windows import EpisodeWindows
from privacy.bookkeeping import BookKeepingClipper, trainable_linears
from privacy.dp_sgd import DEFAULT_MODE, DPSGD, MODES, DPConfig, PoissonEpisodeSampler
from shared_model.config import load_config
from shared_model.policy import Policy
from shared_model.protocol import TrainHyperParams
from shared_model.shards import BACKBONE, SHARED_ADAPTER, ShardLayout, embodiment_shard, expert_shard, set_trainable

EMB = "agv"  # has image features: the adapter's image projection is trainable too
AUX_COEF = 0.5  # large, so a wrong gradient through the router's aux loss would show
SHARDS = [expert_shard(0, 0), expert_shard(1, 3), SHARED_ADAPTER, embodiment_shard(EMB)]


@pytest.fixture(scope="module")
def cfg():
    return load_config(model="tiny")


@pytest.fixture(scope="module")
def base(cfg) -> Policy:
    """Tiny policy with non-zero LoRA B (B starts at 0, which would hide a wrong LoRA path)."""
    model = Policy(cfg.model, cfg.embodiments)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B.weight"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def _starve_expert_0(model: Policy, n_experts: int) -> None:
    """No token of any sample routes to expert 0, in any layer (a forward hook on the frozen
    router: it costs nothing in DP terms and survives deepcopy)."""
    starve = torch.zeros(n_experts)
    starve[0] = 1e4
    for block in model.blocks:
        block.moe.router.proj.register_forward_hook(lambda m, i, o: o - starve)


def _batch(cfg, batch: int, seed: int = 11):
    gen = torch.Generator().manual_seed(seed)
    emb = cfg.embodiments[EMB]
    obs = torch.randn(batch, cfg.model.history, emb.obs_dim, generator=gen)
    image = torch.randn(batch, cfg.model.history, emb.image_feature_dim, generator=gen)
    target = torch.randn(batch, cfg.model.chunk, emb.action_dim, generator=gen)
    return obs, image, target


def _loss(pred: torch.Tensor, aux: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((pred - target) ** 2).mean(dim=(1, 2)) + AUX_COEF * aux


def _loop_gradients(model: Policy, obs, image, target, task=None) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Per-sample gradients by single-sample backward passes, and their norms."""
    ref = copy.deepcopy(model)
    names = set_trainable(ref, SHARDS)
    params = dict(ref.named_parameters())
    grads = []
    for i in range(obs.shape[0]):
        ref.zero_grad(set_to_none=True)
        pred, aux = ref(EMB, obs[i : i + 1], image[i : i + 1], None if task is None else task[i : i + 1])
        _loss(pred, aux, target[i : i + 1]).sum().backward()
        grads.append({n: params[n].grad.detach().clone() for n in names})
    norms = torch.stack([torch.sqrt(sum(g.square().sum() for g in gs.values())) for gs in grads])
    return grads, norms


def _clipped_sum(
    model: Policy, mode: str, clip: float, obs, image, target, weights=None, task=None
) -> dict[str, torch.Tensor]:
    """The clipped gradient sum a DP engine writes (noise 0), read off one SGD step of lr 1."""
    model = copy.deepcopy(model)
    names = set_trainable(model, SHARDS)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD([params[n] for n in names], lr=1.0)
    before = {n: params[n].detach().clone() for n in names}
    with DPSGD(model, opt, DPConfig(0.0, clip, 0.5, mode), normaliser=1.0, noise_seed=0) as dp:
        dp.zero_grad()
        pred, aux = dp(EMB, obs, image, task)
        loss = _loss(pred, aux, target)
        dp.backward(loss if weights is None else loss * weights)
        dp.step()
    return {n: before[n] - params[n].detach() for n in names}


def _clip_factors(norms: torch.Tensor, clip: float) -> torch.Tensor:
    return (clip / (norms + 1e-6)).clamp(max=1.0)


@pytest.mark.parametrize("starved", [False, True], ids=["routed", "starved-expert"])
@pytest.mark.parametrize("mode", sorted({DEFAULT_MODE, "bk", "hooks"}))
def test_clipped_per_sample_gradients_match_single_sample_loop(cfg, base, mode, starved):
    model = copy.deepcopy(base)
    if starved:
        _starve_expert_0(model, cfg.model.n_experts)
    obs, image, target = _batch(cfg, 6)
    grads, norms = _loop_gradients(model, obs, image, target)
    clip = float(norms.median())  # some samples clipped, some not
    factors = _clip_factors(norms, clip)
    assert (factors < 1).any() and (factors == 1).any()
    if starved:  # the starved trainable expert really got no token and no gradient
        assert all(torch.count_nonzero(g) == 0 for gs in grads for n, g in gs.items() if ".experts.0." in n)

    # Each sample's clipped gradient, from a full-batch pass (routing, capacities and padding
    # as in training) where only that sample's loss counts.
    for i in range(len(grads)):
        one_hot = torch.zeros(len(grads))
        one_hot[i] = 1.0
        got = _clipped_sum(model, mode, clip, obs, image, target, weights=one_hot)
        for name, value in got.items():
            diff = (value - factors[i] * grads[i][name]).abs().max().item()
            assert diff < 1e-5, f"{mode} sample {i} {name}: clipped gradient off by {diff}"
    # The whole batch at once: the clipped sum.
    got = _clipped_sum(model, mode, clip, obs, image, target)
    for name, value in got.items():
        want = sum(f * g[name] for f, g in zip(factors, grads, strict=True))
        assert (value - want).abs().max().item() < 1e-5, name


def test_task_conditioned_policy_clips_per_sample_gradients_exactly(cfg):
    """The task projection (adapter/shared) is clipped with each sample's other gradients:
    samples of different tasks get different task gradients, and none escapes clipping.
    Opacus' hooks match the single-sample loop to 1e-5; kyodo's book-keeping clipping
    divides by an upper bound of each norm (its float32 rounding bound), so it matches
    Opacus to 1e-4 relative, as in the test above."""
    model_cfg = dataclasses.replace(cfg.model, task_buckets=16)
    model = Policy(model_cfg, cfg.embodiments)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B.weight") or name == "task_proj.weight":
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    assert "task_proj.weight" in set_trainable(copy.deepcopy(model), SHARDS)
    obs, image, target = _batch(cfg, 6)
    task = torch.randn(6, 16, generator=gen)
    task = task / task.norm(dim=1, keepdim=True)  # unit length, as shared_model.task_text makes them
    grads, norms = _loop_gradients(model, obs, image, target, task)
    clip = float(norms.median())
    factors = _clip_factors(norms, clip)
    assert all(g["task_proj.weight"].abs().sum() > 0 for g in grads)
    hooks = _clipped_sum(model, "hooks", clip, obs, image, target, task=task)
    for name, value in hooks.items():
        want = sum(f * g[name] for f, g in zip(factors, grads, strict=True))
        assert (value - want).abs().max().item() < 1e-5, name
    assert hooks["task_proj.weight"].abs().sum() > 0
    bk = _clipped_sum(model, "bk", clip, obs, image, target, task=task)
    assert bk.keys() == hooks.keys()
    for name in bk:
        assert ((bk[name] - hooks[name]).norm() / hooks[name].norm()).item() < 1e-4, name


def test_bookkeeping_norms_match_loop_and_opacus_hooks(cfg, base):
    model = copy.deepcopy(base)
    _starve_expert_0(model, cfg.model.n_experts)
    obs, image, target = _batch(cfg, 5, seed=3)
    _, loop_norms = _loop_gradients(model, obs, image, target)
    trainable = set_trainable(model, SHARDS)
    clipper = BookKeepingClipper(model, max_grad_norm=1.0)
    # Only the trainable layers are touched; frozen ones keep their plain forward, no hooks.
    tapped = {name for name, m in model.named_modules() if "forward" in m.__dict__}
    assert tapped == {n.rsplit(".", 1)[0] for n in trainable}
    assert not any(m._forward_hooks or m._backward_hooks for name, m in model.named_modules() if "router" not in name)
    try:
        clipper.zero_grad()
        pred, aux = model(EMB, obs, image)
        _loss(pred, aux, target).sum().backward()
        norms = clipper.clip_and_accumulate()
    finally:
        clipper.close()
        set_trainable(model, [])
    assert (norms - loop_norms).abs().max().item() < 1e-5
    clip = float(loop_norms.median())
    bk = _clipped_sum(base, "bk", clip, obs, image, target)
    hooks = _clipped_sum(base, "hooks", clip, obs, image, target)
    # bk divides by an upper bound of each norm (the ghost sum plus its float32 rounding
    # bound, ~1e-5 above it), so its clipped samples are scaled ~1e-5 less than Opacus'.
    for n in bk:
        assert ((bk[n] - hooks[n]).norm() / hooks[n].norm()).item() < 1e-4, n


def test_a_sample_with_a_non_finite_gradient_contributes_nothing(cfg, base):
    """bk drops it (clipped to 0, still a per-sample function of norm <= C), so the update is
    the clipped sum of the others and stays finite: no NaN update, no refused quantization,
    no data-dependent failure the coordinator could see."""
    obs, image, target = _batch(cfg, 5, seed=4)
    broken = target.clone()
    broken[2] = math.nan
    dropped = _clipped_sum(base, "bk", 0.05, obs, image, broken)
    keep = [0, 1, 3, 4]
    others = _clipped_sum(base, "bk", 0.05, obs[keep], image[keep], target[keep])
    assert all(torch.isfinite(d).all() for d in dropped.values())
    assert max((dropped[n] - others[n]).abs().max().item() for n in others) < 1e-6


def test_a_step_taken_in_chunks_is_the_same_step(cfg, base):
    """bk adds each chunk's clipped sum to the step's: memory follows the chunk, not the
    Poisson sample, and the update does not change."""
    obs, image, target = _batch(cfg, 5, seed=6)
    whole = _clipped_sum(base, "bk", 0.05, obs, image, target)
    model = copy.deepcopy(base)
    names = set_trainable(model, SHARDS)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD([params[n] for n in names], lr=1.0)
    before = {n: params[n].detach().clone() for n in names}
    with DPSGD(model, opt, DPConfig(0.0, 0.05, 0.5, "bk"), normaliser=1.0, noise_seed=0) as dp:
        dp.zero_grad()
        for part in (slice(0, 2), slice(2, 3), slice(3, 5)):
            pred, aux = dp(EMB, obs[part], image[part])
            dp.backward(_loss(pred, aux, target[part]))
        dp.step()
    chunked = {n: before[n] - params[n].detach() for n in names}
    assert max((chunked[n] - whole[n]).abs().max().item() for n in whole) < 1e-6
    # Modes that need the whole batch at once say so instead of mixing chunks up.
    model = copy.deepcopy(base)
    names = set_trainable(model, SHARDS)
    opt = torch.optim.SGD([dict(model.named_parameters())[n] for n in names], lr=1.0)
    with DPSGD(model, opt, DPConfig(0.0, 0.05, 0.5, "hooks"), normaliser=1.0, noise_seed=0) as dp:
        dp.zero_grad()
        pred, aux = dp(EMB, obs[:2], image[:2])
        dp.backward(_loss(pred, aux, target[:2]))
        pred, aux = dp(EMB, obs[2:], image[2:])
        with pytest.raises(RuntimeError, match="whole batch in one backward"):
            dp.backward(_loss(pred, aux, target[2:]))


def test_no_noise_and_huge_clip_is_plain_sgd(cfg, base):
    obs, image, target = _batch(cfg, 8, seed=5)
    ref = copy.deepcopy(base)
    names = set_trainable(ref, SHARDS)
    params = dict(ref.named_parameters())
    before = {n: params[n].detach().clone() for n in names}
    opt = torch.optim.SGD([params[n] for n in names], lr=0.1)
    pred, aux = ref(EMB, obs, image)
    _loss(pred, aux, target).mean().backward()
    opt.step()
    want = {n: params[n].detach() - before[n] for n in names}
    for mode in ("bk", "hooks"):
        model = copy.deepcopy(base)
        set_trainable(model, SHARDS)
        mp = dict(model.named_parameters())
        opt = torch.optim.SGD([mp[n] for n in names], lr=0.1)
        # normaliser = actual batch, so DP's "sum / normaliser" is the plain mean
        with DPSGD(model, opt, DPConfig(0.0, 1e6, 0.5, mode), normaliser=8.0) as dp:
            dp.zero_grad()
            pred, aux = dp(EMB, obs, image)
            dp.backward(_loss(pred, aux, target))
            dp.step()
        diff = max((mp[n].detach() - before[n] - want[n]).abs().max().item() for n in names)
        assert diff < 1e-6, f"{mode}: {diff}"


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_is_a_noise_only_step(cfg, base, mode):
    model = copy.deepcopy(base)
    names = set_trainable(model, SHARDS)
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in names}
    opt = torch.optim.SGD([params[n] for n in names], lr=1.0)
    obs, image, target = _batch(cfg, 0)
    with DPSGD(model, opt, DPConfig(1.0, 1.0, 0.1, mode), normaliser=4.0, noise_seed=7) as dp:
        dp.zero_grad()
        pred, aux = dp(EMB, obs, image)
        dp.backward(_loss(pred, aux, target))
        dp.step()
        assert dp.steps == 1 and dp.empty_steps == 1
    assert all(not torch.equal(params[n], before[n]) for n in names)  # noise moved every tensor
    assert all(torch.isfinite(params[n]).all() for n in names)


def test_a_dp_step_cannot_be_skipped(cfg, base):
    """Opacus lets a caller skip a step and keep the clipped sum for the next; kyodo's sum is
    noised in place and every step is spent, so skipping is refused outright."""
    model = copy.deepcopy(base)
    names = set_trainable(model, SHARDS)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD([params[n] for n in names], lr=1.0)
    with (
        DPSGD(model, opt, DPConfig(1.0, 1.0, 0.1, "bk"), normaliser=4.0, noise_seed=7) as dp,
        pytest.raises(RuntimeError, match="skipping is not supported"),
    ):
        dp.optimizer.signal_skip_step()


def test_noise_has_the_right_scale(cfg, base):
    """Zero data gradient (an empty batch): the SGD update is pure noise of std sigma*C/normaliser*lr."""
    sigma, clip, expected, lr = 2.0, 0.5, 10.0, 0.1
    model = copy.deepcopy(base)
    set_trainable(
        model, [expert_shard(layer, e) for layer in range(cfg.model.n_layers) for e in range(4)] + [SHARED_ADAPTER]
    )
    params = [p for p in model.parameters() if p.requires_grad]
    before = torch.cat([p.detach().flatten() for p in params])
    opt = torch.optim.SGD(params, lr=lr)
    obs, image, target = _batch(cfg, 0)
    with DPSGD(model, opt, DPConfig(sigma, clip, 0.1, "bk"), normaliser=expected) as dp:
        dp.zero_grad()
        pred, aux = dp(EMB, obs, image)
        dp.backward(_loss(pred, aux, target))
        dp.step()
    update = torch.cat([p.detach().flatten() for p in params]) - before
    assert update.numel() > 40_000  # std of the estimate ~0.3%, of the mean ~0.45% of want
    want = sigma * clip / expected * lr
    assert abs(update.std().item() / want - 1) < 0.02
    assert abs(update.mean().item()) < 0.03 * want


def test_noise_is_secret_by_default_and_seedable_for_tests(cfg, base):
    def noise(seed):
        model = copy.deepcopy(base)
        set_trainable(model, [SHARED_ADAPTER])
        params = [p for p in model.parameters() if p.requires_grad]
        before = torch.cat([p.detach().flatten() for p in params])
        with DPSGD(model, torch.optim.SGD(params, lr=1.0), DPConfig(1.0, 1.0, 0.5), 2.0, noise_seed=seed) as dp:
            obs, image, target = _batch(cfg, 0)
            dp.zero_grad()
            pred, aux = dp(EMB, obs, image)
            dp.backward(_loss(pred, aux, target))
            dp.step()
        return torch.cat([p.detach().flatten() for p in params]) - before

    assert torch.equal(noise(3), noise(3))
    assert not torch.equal(noise(None), noise(None))


def test_noise_and_sampling_each_take_a_fresh_secret_key_not_torch_generator(cfg, base, monkeypatch):
    """One ChaCha20 key per DPSGD (per round) and one per Poisson sampler, from ``secrets``;
    torch's global generator is neither used nor advanced."""
    model = copy.deepcopy(base)
    set_trainable(model, [SHARED_ADAPTER])
    params = [p for p in model.parameters() if p.requires_grad]
    real = secrets.token_bytes
    calls: list[int] = []
    monkeypatch.setattr(secrets, "token_bytes", lambda n: calls.append(n) or real(n))
    state = torch.random.get_rng_state()
    before = torch.cat([p.detach().flatten() for p in params])
    with DPSGD(model, torch.optim.SGD(params, lr=1.0), DPConfig(1.0, 1.0, 0.5), 2.0) as dp:
        obs, image, target = _batch(cfg, 0)
        dp.zero_grad()
        pred, aux = dp(EMB, obs, image)
        dp.backward(_loss(pred, aux, target))
        dp.step()
    PoissonEpisodeSampler(0.5)(10)
    assert calls == [32, 32]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert (torch.cat([p.detach().flatten() for p in params]) - before).abs().min() > 0


def test_poisson_sampler():
    rng = np.random.default_rng(0)
    sampler = PoissonEpisodeSampler(0.1, seed=1)
    sizes = [len(sampler(200, rng)) for _ in range(400)]
    assert abs(np.mean(sizes) - 20) < 1.0  # E = qN
    # At exactly q: the accountant assumes it. 2M Bernoulli(0.1) trials have sd 424, so a
    # sampler at 1.04 q (8000 over) is 19 sd out and 5 sd is a false alarm once in 3.5M runs.
    assert abs(len(sampler(2_000_000, rng)) - 200_000) < 5 * math.sqrt(2_000_000 * 0.1 * 0.9)
    ids = sampler(200, rng)
    assert len(set(ids.tolist())) == len(ids) and ids.max() < 200  # each episode at most once
    assert any(len(PoissonEpisodeSampler(0.01, seed=2)(20, rng)) == 0 for _ in range(50))  # empty happens
    # The trainer's rng (derived from the coordinator's seed) does not decide the batch.
    a = PoissonEpisodeSampler(0.5)(100, np.random.default_rng(0))
    b = PoissonEpisodeSampler(0.5)(100, np.random.default_rng(0))
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError):
        PoissonEpisodeSampler(0.0)


def test_config_validation_and_record():
    with pytest.raises(ValueError):
        DPConfig(-1.0, 1.0, 0.1)
    with pytest.raises(ValueError):
        DPConfig(1.0, 0.0, 0.1)
    with pytest.raises(ValueError):
        DPConfig(1.0, 1.0, 1.5)
    with pytest.raises(ValueError):
        DPConfig(1.0, 1.0, 0.1, mode="nope")
    rec = DPConfig(1.1, 0.5, 0.02).to_record()
    assert rec == {
        "noise_multiplier": 1.1,
        "max_grad_norm": 0.5,
        "sample_rate": 0.02,
        "mode": DEFAULT_MODE,
        "privacy_unit": "episode",
    }


def test_bookkeeping_refuses_parameters_it_cannot_clip(cfg):
    model = Policy(cfg.model, cfg.embodiments)
    # Every parameter any shard can train is an nn.Linear weight / bias (so bk covers them all).
    every = [s for s in ShardLayout.from_model(model).shards if s != BACKBONE]
    trainable = set_trainable(model, every)
    assert len(trainable) > 0 and len(trainable_linears(model)) == len({n.rsplit(".", 1)[0] for n in trainable})
    set_trainable(model, SHARDS)
    model.pos_emb.weight.requires_grad_(True)  # an nn.Embedding: outside the nn.Linear rules
    with pytest.raises(ValueError, match="pos_emb.weight"):
        BookKeepingClipper(model, 1.0)
    assert all("forward" not in m.__dict__ for m in model.modules())  # nothing was attached


def test_bookkeeping_weight_tying_is_exact():
    """A layer called twice per forward: its per-sample gradient sums both calls' tokens."""
    torch.manual_seed(0)
    layer, head = nn.Linear(5, 4), nn.Linear(4, 3)
    head.requires_grad_(False)
    x = torch.randn(6, 2, 5)

    def loss_fn(inp: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(layer(inp))
        return head(layer(inp) * h).pow(2).sum(dim=(1, 2))

    model = nn.ModuleDict({"layer": layer, "head": head})
    grads = []
    for i in range(6):
        layer.zero_grad(set_to_none=True)
        loss_fn(x[i : i + 1]).sum().backward()
        grads.append(torch.cat([layer.weight.grad.flatten(), layer.bias.grad]))
    per_sample = torch.stack(grads)
    factors = _clip_factors(per_sample.norm(dim=1), 0.5)
    clipper = BookKeepingClipper(model, 0.5)
    clipper.zero_grad()
    loss_fn(x).sum().backward()
    clipper.clip_and_accumulate()
    got = torch.cat([layer.weight.grad.flatten(), layer.bias.grad])
    clipper.close()
    assert (got - (factors[:, None] * per_sample).sum(0)).abs().max().item() < 1e-5


# ---------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def windows(cfg) -> EpisodeWindows:
    emb = cfg.embodiments[EMB]
    episodes = generate_episodes(EMB, emb, 12, 1.0, seed=0)
    return EpisodeWindows(episodes, emb, history=cfg.model.history, chunk=cfg.model.chunk)


def _hooks_and_attrs(model: nn.Module) -> list[str]:
    """Anything a DP round could leave behind on the policy."""
    left = []
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            left.append(f"{name}: hooks")
        left += [f"{name}.{a}" for a in ("forward", "activations", "max_batch_len") if a in m.__dict__]
    for name, p in model.named_parameters():
        left += [f"{name}.{a}" for a in ("grad_sample", "summed_grad", "_forward_counter") if hasattr(p, a)]
        if p.grad is not None or p.requires_grad:
            left.append(f"{name}: grad / requires_grad")
    return left


@pytest.mark.parametrize("mode", sorted({DEFAULT_MODE, "hooks"}))
def test_train_shards_dp_repeated_rounds_on_one_policy(cfg, windows, mode):
    policy = Policy(cfg.model, cfg.embodiments)
    keys = list(policy.state_dict())
    hp = TrainHyperParams(lr=1e-3, local_steps=4, batch_size=4)
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.3, mode=mode)
    for round_number in range(3):
        result = train_shards(
            policy, EMB, windows, SHARDS, hp, aux_coef=0.01, rng=np.random.default_rng(round_number), dp=dp
        )
        assert result.steps == 4 and result.dp_mode == mode and 0 <= result.empty_steps <= 4
        assert set(result.deltas) == set(set_trainable(copy.deepcopy(policy), SHARDS))
        assert all(torch.isfinite(d).all() and d.abs().max() > 0 for d in result.deltas.values())
        assert list(policy.state_dict()) == keys
        assert _hooks_and_attrs(policy) == []
    # A non-private round on the same object still works afterwards.
    result = train_shards(policy, EMB, windows, SHARDS, hp, aux_coef=0.01, rng=np.random.default_rng(9))
    assert result.dp_mode is None and result.steps == 4


def test_train_shards_dp_all_empty_batches(cfg, windows):
    """q so small that every batch is empty: every step still runs and counts."""
    policy = Policy(cfg.model, cfg.embodiments)
    hp = TrainHyperParams(lr=1e-3, local_steps=3, batch_size=4)
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1e-9)
    result = train_shards(policy, EMB, windows, SHARDS, hp, aux_coef=0.01, rng=np.random.default_rng(0), dp=dp)
    assert result.steps == 3 and result.empty_steps == 3 and np.isnan(result.loss)
    assert all(d.abs().max() > 0 for d in result.deltas.values())  # noise only, but applied


def test_train_shards_dp_is_reproducible_only_with_test_seeds(cfg, windows):
    hp = TrainHyperParams(lr=1e-2, local_steps=2, batch_size=4)
    dp = DPConfig(noise_multiplier=0.5, max_grad_norm=1.0, sample_rate=0.5)

    def run(seed):
        policy = Policy(cfg.model, cfg.embodiments)
        sampler = None if seed is None else PoissonEpisodeSampler(0.5, seed=seed)
        return train_shards(
            policy,
            EMB,
            windows,
            SHARDS,
            hp,
            aux_coef=0.01,
            rng=np.random.default_rng(0),
            sampler=sampler,
            dp=dp,
            dp_noise_seed=seed,
        ).deltas

    a, b = run(1), run(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    c, d = run(None), run(None)
    assert not all(torch.equal(c[n], d[n]) for n in c)
    with pytest.raises(ValueError, match="Poisson"):
        train_shards(
            Policy(cfg.model, cfg.embodiments),
            EMB,
            windows,
            SHARDS,
            hp,
            aux_coef=0.01,
            rng=np.random.default_rng(0),
            sampler=PoissonEpisodeSampler(0.1),
            dp=dp,
        )


def test_dp_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DPConfig(1.0, 1.0, 0.1).noise_multiplier = 0.0  # type: ignore[misc]


def _seeded_dp_round(start, windows, hp, dp, *, rng_seed=0, secret_seed=0, **kwargs) -> dict[str, torch.Tensor]:
    """The deltas of one DP round of ``SHARDS`` from a copy of ``start``, the node's secret
    sampling stream seeded for the test."""
    return train_shards(
        copy.deepcopy(start),
        EMB,
        windows,
        SHARDS,
        hp,
        aux_coef=0.01,
        rng=np.random.default_rng(rng_seed),
        sampler=PoissonEpisodeSampler(dp.sample_rate, seed=secret_seed),
        dp=dp,
        **kwargs,
    ).deltas


def test_dp_update_is_divided_by_the_public_batch_size_not_by_the_members_episode_count(cfg, windows):
    """The accountant covers the noised clipped sum and what public numbers make of it. The
    member's N is private, so the divisor is the consortium's ``batch_size``: with plain SGD,
    one noise-free step at q = 1 (the same clipped sum every time) halves when the public
    batch doubles (divided by q N, it would not move)."""
    dp = DPConfig(noise_multiplier=0.0, max_grad_norm=1e-3, sample_rate=1.0)
    start = Policy(cfg.model, cfg.embodiments)

    def sgd(params, hp):
        return torch.optim.SGD(list(params), lr=hp.lr)

    def step(batch_size: int) -> dict[str, torch.Tensor]:
        hp = TrainHyperParams(lr=1.0, local_steps=1, batch_size=batch_size)
        return _seeded_dp_round(start, windows, hp, dp, make_optimizer=sgd)

    small, large = step(4), step(8)
    for name in small:
        torch.testing.assert_close(small[name], 2 * large[name], rtol=1e-3, atol=2e-8)  # p + step - p in float32
    # Every one of the 12 episodes is clipped to 1e-3, so the step's norm is at most 12e-3 / 4
    # (and far above 1e-3 / 4: the clipped gradients point roughly the same way).
    norm = torch.cat([d.flatten() for d in small.values()]).norm().item()
    assert 1e-3 / 4 < norm <= 12e-3 / 4 * (1 + 1e-4)


def test_window_offsets_are_uniform_inside_each_episode():
    sampler = PoissonEpisodeSampler(0.5, seed=4)
    lengths = np.array([1, 3, 10] * 4000)
    offsets = sampler.window_offsets(lengths)
    assert offsets.dtype == np.int64 and np.all((offsets >= 0) & (offsets < lengths))
    counts = np.bincount(offsets[lengths == 10], minlength=10)
    assert np.all(np.abs(counts - 400) < 5 * np.sqrt(400 * 0.9))
    with pytest.raises(ValueError, match="at least one window"):
        sampler.window_offsets(np.array([3, 0]))


def test_a_dp_round_draws_nothing_from_the_coordinators_generator(cfg, windows):
    """Which episodes and which of their windows a DP step uses come from the node's secret
    stream only. Drawn from the trainer's ``rng`` (derived from the coordinator's seed), one
    episode more in a sample would shift the windows of every episode after it: neighbouring
    datasets would then differ in many clipped terms of a step's sum, not in one."""
    hp = TrainHyperParams(lr=1e-2, local_steps=3, batch_size=4)
    dp = DPConfig(noise_multiplier=0.5, max_grad_norm=1.0, sample_rate=0.5)
    start = Policy(cfg.model, cfg.embodiments)
    assert windows.lengths.min() > 1  # several windows per episode: the choice matters

    a, b = (_seeded_dp_round(start, windows, hp, dp, rng_seed=r, secret_seed=3, dp_noise_seed=3) for r in (0, 1))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_windows_at_checks_its_offsets(windows):
    batch = windows.at([0, 2], np.array([0, int(windows.lengths[2]) - 1]))
    assert len(batch) == 2
    with pytest.raises(IndexError, match="inside that episode"):
        windows.at([0], np.array([int(windows.lengths[0])]))
    with pytest.raises(IndexError, match="one offset per listed episode"):
        windows.at([0, 1], np.array([0]))


def test_a_ghost_norm_whose_tokens_cancel_still_clips_the_sample():
    """One sample, two tokens: near-equal large inputs, opposite output gradients. Its true
    gradient is small next to its token terms, whose ghost sum nearly cancels: it computed
    to 0 while the true norm was 200, and the sample went in unclipped. The clip now
    divides by an upper bound of the norm (the sum plus its rounding bound)."""
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(64, 64, bias=False)
    worst = 0.0
    for _ in range(200):
        v = torch.randn(64, generator=gen)
        v = v / v.norm() * 3e3
        step = torch.randn(64, generator=gen)
        step = step / step.norm() * 0.2
        u = torch.randn(64, generator=gen)
        u = u / u.norm() * 1e3
        a = torch.stack([v, v + step]).unsqueeze(0)
        g = torch.stack([u, -u]).unsqueeze(0)
        clipper = BookKeepingClipper(layer, max_grad_norm=1.0)
        try:
            clipper.zero_grad()
            (layer(a) * g).sum().backward()
            clipper.clip_and_accumulate()
            worst = max(worst, layer.weight.grad.double().norm().item())
        finally:
            clipper.close()
    assert worst <= 1.0
