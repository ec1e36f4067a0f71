"""Utility under privacy: is federating with DP worth it for each member?

On the default federation's data (each member's held-out episodes), three ways to train the
same policy for the same number of rounds x local steps:
  (a) alone: each member trains every shard it would train in the federation, on its own
      data only, without DP (its model never leaves its data center);
  (b) pooled: all members' data in one place, non-private (a reference no consortium may
      run: it is the upper bound);
  (c) federated: the real member nodes and planner, each member under DP-SGD at its own
      epsilon (default 8), aggregated per shard by the coordinator's server optimiser
      (``train.server_optimizer``, FedAvg by default).
Two more columns separate the two costs: "fed no DP" (the federation with the members' DP
switched off: what federating costs or gains) and "alone+DP" (each member alone under the
same DP budget: what federating gains at equal privacy).
Prints each member's held-out action MSE for the three and the ratios (c)/(a), (c)/(b);
targets: (c) < (a) for every member and (c) <= 1.5 (b). Writes bench/results/utility.json (``--out``).

Federation can only beat (a) where a member alone is short of data. ``--data-curve`` checks
that: each member alone (non-private) on 1/16, 1/4 and all of its training episodes, for the
same steps as (a) and for 4x as many. A flat curve means more episodes (another member's)
cannot lower that member's error, whatever the privacy cost.

Runs in-process (no Flower transport: the transport does not change the numbers; the
end-to-end tests cover it). Usage: ``python bench/utility.py [--model tiny] [overrides]``;
``public.rounds=16`` starts every column from a checkpoint pretrained on public simulated
episodes (``coordinator.public_checkpoint``) instead of a random initialisation;
``public.checkpoint=FILE public.checkpoint_sha256=HASH`` from one ``kyodo-coordinator
pretrain`` wrote.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aggregation.server_opt import FedAvg
from aggregation.weighted_mean import ShardMean
from coordinator.federation import initial_model
from coordinator.planner import MemberInfo, plan_round
from coordinator.public_checkpoint import initial_source
from coordinator.rounds import server_optimizer
from coordinator.run_status import describe_round_zero
from member_node.identity import resolve_identity
from member_node.node import MemberNode
from member_node.synthetic import generate_dataset
from member_node.trainer import UniformSampler, adamw, evaluate, per_sample_loss, train_shards
from member_node.windows import EpisodeWindows, split_episodes
from shared_model.config import KyodoConfig, load_config
from shared_model.protocol import TrainDeclined, TrainHyperParams, TrainRequest
from shared_model.shards import ShardLayout, set_trainable, shard_of

_INITIAL: dict[str, dict[str, torch.Tensor]] = {}


def _initial(cfg: KyodoConfig) -> dict[str, torch.Tensor]:
    """Every column starts from the same round-0 model (pretrained once with ``public.rounds``)."""
    key = repr((cfg.model, sorted(cfg.embodiments.items()), cfg.public, cfg.train))
    if key not in _INITIAL:
        _INITIAL[key] = initial_model(cfg)
    return {k: v.clone() for k, v in _INITIAL[key].items()}


def _hparams(cfg: KyodoConfig) -> TrainHyperParams:
    t = cfg.train
    return TrainHyperParams(
        t.lr, t.local_steps, t.batch_size, t.weight_decay, t.seed, cfg.privacy.max_grad_norm, cfg.privacy.sample_rate
    )


def _plan(cfg: KyodoConfig, nodes: list[MemberNode], rnd: int):
    infos = [MemberInfo(i, n.identity.name, (n.identity.embodiment,), 0) for i, n in enumerate(nodes)]
    t = cfg.train
    return plan_round(
        rnd,
        infos,
        n_layers=cfg.model.n_layers,
        n_experts=cfg.model.n_experts,
        embodiments=sorted(cfg.embodiments),
        min_cohort=t.min_cohort,
        experts_per_member=t.experts_per_member,
    )


def _held_out_mse(cfg: KyodoConfig, node: MemberNode, policy: torch.nn.Module | None = None) -> float:
    """``policy`` (default: the node's own) on the held-out windows the node's ``evaluate`` uses."""
    per_episode = cfg.train.eval_windows_per_episode
    policy = node.policy if policy is None else policy
    return evaluate(policy, node.identity.embodiment, node.held_windows, per_episode=per_episode).action_mse


def _exact_mse(cfg: KyodoConfig, node: MemberNode, model: dict[str, torch.Tensor]) -> float:
    """The exact held-out error of ``model`` (a bench may read it; a DP node reports it noised)."""
    node.policy.load_state_dict(model)
    return _held_out_mse(cfg, node)


def federated(cfg: KyodoConfig, nodes: list[MemberNode]) -> dict[str, float]:
    model = _initial(cfg)
    layout = ShardLayout.from_config(cfg.model, cfg.embodiments)
    hp = _hparams(cfg)
    optimizer = server_optimizer(cfg)  # the coordinator's own, per shard, as configured
    for rnd in range(1, cfg.train.rounds + 1):
        plan = _plan(cfg, nodes, rnd)
        accs = {
            s: ShardMean(s, c, {x.name: x.shape for x in layout.shards[s] if ".lora_A." not in x.name})
            for s, c in plan.cohorts.items()
        }
        for node in nodes:
            req = TrainRequest(
                rnd, plan.shards_of(node.identity.name), hp, model, run="utility", planned_rounds=cfg.train.rounds
            )
            reply = node.train(req)
            if isinstance(reply, TrainDeclined):
                continue
            grouped: dict[str, dict] = {}
            for name, delta in reply.deltas.items():
                grouped.setdefault(shard_of(name), {})[name] = delta
            for shard in reply.shards:
                accs[shard].add(node.identity.name, grouped[shard], reply.num_examples or 1)  # 0: withheld (DP)
        for acc in accs.values():
            if len(acc.contributors) >= (1 if acc.shard_id.startswith("adapter/emb/") else cfg.train.min_cohort):
                model.update(optimizer.apply(model, acc.mean(), acc.shard_id))
    return {n.identity.name: _exact_mse(cfg, n, model) for n in nodes}


def alone_dp(cfg: KyodoConfig, nodes: list[MemberNode]) -> dict[str, float]:
    """Each member alone under its own DP budget: the same node code as the federation, but
    each member's updates go only into its own copy of the model (equal-privacy baseline)."""
    out = {}
    hp = _hparams(cfg)
    for node in nodes:
        model = _initial(cfg)
        for rnd in range(1, cfg.train.rounds + 1):
            shards = _plan(cfg, nodes, rnd).shards_of(node.identity.name)
            req = TrainRequest(rnd, shards, hp, model, run="utility-alone", planned_rounds=cfg.train.rounds)
            reply = node.train(req)
            if isinstance(reply, TrainDeclined):
                continue
            model.update(FedAvg(1.0).apply(model, reply.deltas))
        out[node.identity.name] = _exact_mse(cfg, node, model)
    return out


def untrained(cfg: KyodoConfig, nodes: list[MemberNode]) -> dict[str, float]:
    """The initial model: the scale against which every column's learning shows."""
    policy = nodes[0].policy
    policy.load_state_dict(_initial(cfg))
    return {n.identity.name: _held_out_mse(cfg, n, policy) for n in nodes}


def _train_alone(
    cfg: KyodoConfig, nodes: list[MemberNode], node: MemberNode, windows: EpisodeWindows, rounds: int
) -> float:
    """Non-private, own data only, the federation's shards of each round; held-out MSE."""
    hp = _hparams(cfg)
    node.policy.load_state_dict(_initial(cfg))
    rng = np.random.default_rng(cfg.train.seed)
    for rnd in range(1, rounds + 1):
        shards = _plan(cfg, nodes, rnd).shards_of(node.identity.name)
        train_shards(
            node.policy, node.identity.embodiment, windows, shards, hp, aux_coef=cfg.model.aux_loss_coef, rng=rng
        )
    return _held_out_mse(cfg, node)


def alone(cfg: KyodoConfig, nodes: list[MemberNode]) -> dict[str, float]:
    return {n.identity.name: _train_alone(cfg, nodes, n, n.train_windows, cfg.train.rounds) for n in nodes}


CURVE_FRACTIONS = (1 / 16, 1 / 4, 1.0)
CURVE_STEP_FACTORS = (1, 4)


def data_curve(cfg: KyodoConfig, nodes: list[MemberNode]) -> dict[str, list[dict[str, float]]]:
    """Each member alone on a growing share of its own training episodes (a prefix of its
    training split), for (a)'s rounds and for 4x as many: is it short of data?"""
    out: dict[str, list[dict[str, float]]] = {}
    m = cfg.model
    for node in nodes:
        emb = cfg.embodiments[node.identity.embodiment]
        train_ids, _ = split_episodes(node.dataset.episodes, cfg.train.held_out_fraction, seed=cfg.train.seed)
        rows = []
        for fraction in CURVE_FRACTIONS:
            n = max(1, round(fraction * len(train_ids)))
            windows = EpisodeWindows(
                [node.dataset.episodes[i] for i in train_ids[:n]], emb, m.history, m.chunk, m.task_buckets
            )
            for factor in CURVE_STEP_FACTORS:
                mse = _train_alone(cfg, nodes, node, windows, cfg.train.rounds * factor)
                rows.append({"episodes": n, "steps": cfg.train.rounds * factor * cfg.train.local_steps, "mse": mse})
        out[node.identity.name] = rows
    return out


def pooled(cfg: KyodoConfig, nodes: list[MemberNode]) -> dict[str, float]:
    """One model and one optimiser over all data: per round the union of the federation's
    shards, the same number of steps per member, one step of each member's data in turn."""
    policy = nodes[0].policy
    policy.load_state_dict(_initial(cfg))
    hp = _hparams(cfg)
    rng = np.random.default_rng(cfg.train.seed)
    sampler = UniformSampler(hp.batch_size)
    for rnd in range(1, cfg.train.rounds + 1):
        names = set(set_trainable(policy, sorted(_plan(cfg, nodes, rnd).cohorts)))
        optimizer = adamw([p for n, p in policy.named_parameters() if n in names], hp)
        policy.train()
        for _ in range(hp.local_steps):
            for node in nodes:
                batch = node.train_windows.sample(sampler(len(node.train_windows), rng), rng)
                pred, aux = policy(node.identity.embodiment, batch.obs, batch.image, batch.task)
                loss = per_sample_loss(pred, batch.action, batch.action_pad, aux, cfg.model.aux_loss_coef)
                optimizer.zero_grad(set_to_none=True)
                loss.mean().backward()
                optimizer.step()
    set_trainable(policy, [])
    return {n.identity.name: _held_out_mse(cfg, n, policy) for n in nodes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--federation", default="default")
    parser.add_argument("--data-curve", action="store_true", help="also: each member alone on 1/16, 1/4, all its data")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "utility.json"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            model=args.model,
            federation=args.federation,
            overrides=[f"data_root={tmp}/data", f"state_root={tmp}/state", *args.overrides],
        )
        for m in cfg.federation.members:
            generate_dataset(
                Path(cfg.data_root) / m.name,
                m.embodiment,
                cfg.embodiments[m.embodiment],
                m.episodes,
                m.episode_seconds,
                m.seed,
                tasks=m.tasks,
            )
        nodes = [
            MemberNode(cfg, resolve_identity({"partition-id": i}, cfg)) for i in range(len(cfg.federation.members))
        ]
        open_cfg = copy.deepcopy(cfg)
        open_cfg.state_root = f"{tmp}/state-open"
        for m in open_cfg.federation.members:
            m.dp = False
        open_nodes = [
            MemberNode(open_cfg, resolve_identity({"partition-id": i}, open_cfg))
            for i in range(len(open_cfg.federation.members))
        ]
        solo_cfg = copy.deepcopy(cfg)
        solo_cfg.state_root = f"{tmp}/state-solo"
        solo_nodes = [
            MemberNode(solo_cfg, resolve_identity({"partition-id": i}, solo_cfg))
            for i in range(len(solo_cfg.federation.members))
        ]
        start = time.monotonic()
        results = {
            "untrained": untrained(cfg, nodes),
            "alone": alone(cfg, nodes),
            "alone_dp": alone_dp(solo_cfg, solo_nodes),
            "pooled": pooled(cfg, nodes),
            "federated_open": federated(open_cfg, open_nodes),
            "federated_dp": federated(cfg, nodes),
        }
        curve = data_curve(cfg, nodes) if args.data_curve else None
        seconds = time.monotonic() - start
    eps = {m.name: m.epsilon for m in cfg.federation.members}
    print(
        f"held-out action MSE, model {cfg.model.name}, {cfg.train.rounds} rounds x {cfg.train.local_steps} steps ({seconds:.0f}s)"
    )
    pub = cfg.public
    source = initial_source(cfg)
    print(f"every column starts from the same round 0, {describe_round_zero(source)}; 'untrained' is that model")
    print(
        f"{'member':10s} {'untrained':>9s} {'(a) alone':>10s} {'alone+DP':>9s} {'(b) pooled':>11s} {'fed no DP':>10s}"
        f" {'(c) fed+DP':>11s} {'eps':>5s} {'c/a':>6s} {'c/b':>6s} {'c/aDP':>6s}"
    )
    rows = {}
    for name in results["alone"]:
        a, ad, b, o, c = (results[k][name] for k in ("alone", "alone_dp", "pooled", "federated_open", "federated_dp"))
        rows[name] = {
            "untrained": results["untrained"][name],
            "alone": a,
            "alone_dp": ad,
            "pooled": b,
            "federated_no_dp": o,
            "federated_dp": c,
            "epsilon": eps[name],
            "c_over_a": c / a,
            "c_over_b": c / b,
            "c_over_alone_dp": c / ad,
        }
        print(
            f"{name:10s} {results['untrained'][name]:9.4f} {a:10.4f} {ad:9.4f} {b:11.4f} {o:10.4f} {c:11.4f} {eps[name]:5g}"
            f" {c / a:6.2f} {c / b:6.2f} {c / ad:6.2f}"
        )
    met = all(r["c_over_a"] < 1 for r in rows.values()) and all(r["c_over_b"] <= 1.5 for r in rows.values())
    print(f"targets (c < a for every member, c <= 1.5 b): {'met' if met else 'NOT met'}")
    if curve is not None:
        print("\neach member alone, non-private, on part of its own training episodes (held-out MSE):")
        for name, curve_rows in curve.items():
            cells = "  ".join(f"{r['episodes']} eps x {r['steps']} steps: {r['mse']:.4f}" for r in curve_rows)
            print(f"{name:10s} {cells}")
    out = Path(args.out)
    out.parent.mkdir(exist_ok=True)
    result = {
        "model": cfg.model.name,
        "federation": cfg.federation.name,
        "initial": source,
        "public_rounds": pub.rounds,
        "public_fps_scale": pub.fps_scale,
        "rows": rows,
        "targets_met": met,
    }
    if curve is not None:
        result["data_curve"] = curve
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
