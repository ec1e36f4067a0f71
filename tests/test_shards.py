"""The shard layout: every tensor in exactly one shard, at every size, and the shard API
the coordinator, the member node and the store rely on."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from shared_model.config import load_config
from shared_model.policy import Policy, build_meta, count_parameters
from shared_model.shards import (
    BACKBONE,
    SHARED_ADAPTER,
    ShardLayout,
    TensorSpec,
    embodiment_shard,
    expert_shard,
    load_shard,
    parse_expert_shard,
    set_trainable,
    shard_kind,
    shard_of,
    shard_state,
    trainable_names,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cfg():
    return load_config(model="tiny")


@pytest.fixture()
def model(cfg):
    return Policy(cfg.model, cfg.embodiments)


def test_shard_ids_and_kinds():
    assert expert_shard(3, 17) == "expert/L3/E17" and parse_expert_shard("expert/L3/E17") == (3, 17)
    assert embodiment_shard("so100") == "adapter/emb/so100"
    assert [shard_kind(s) for s in (BACKBONE, expert_shard(0, 0), SHARED_ADAPTER, embodiment_shard("agv"))] == [
        "backbone",
        "expert",
        "adapter_shared",
        "adapter_emb",
    ]
    for bad in ("", "expert/L1", "expert/L1/Ex", "adapter", "adapter/emb/", "adapter/emb/a/b", "Backbone"):
        with pytest.raises(ValueError, match="malformed shard id"):
            shard_kind(bad)
    with pytest.raises(ValueError):
        embodiment_shard("a/b")
    with pytest.raises(ValueError):
        expert_shard(-1, 0)
    with pytest.raises(ValueError):
        parse_expert_shard(BACKBONE)


def test_shard_of_rules():
    cases = {
        "pos_emb.weight": BACKBONE,
        "action_queries.weight": BACKBONE,
        "ln_f.bias": BACKBONE,
        "blocks.12.ln_2.weight": BACKBONE,
        "blocks.0.attn.q.base.weight": BACKBONE,
        "blocks.0.attn.k.weight": BACKBONE,
        "blocks.0.attn.o.weight": BACKBONE,
        "blocks.3.moe.router.proj.weight": BACKBONE,
        "blocks.3.moe.experts.17.w_gate.weight": "expert/L3/E17",
        "blocks.60.moe.experts.383.w_down.weight": "expert/L60/E383",
        "blocks.1.attn.v.lora_A.weight": SHARED_ADAPTER,
        "blocks.1.attn.q.lora_B.weight": SHARED_ADAPTER,
        "adapters.so100.encoder.0.weight": "adapter/emb/so100",
        "adapters.agv.image.bias": "adapter/emb/agv",
        "adapters.aloha.decoder.2.weight": "adapter/emb/aloha",
    }
    assert {n: shard_of(n) for n in cases} == cases
    for bad in (
        "foo.weight",
        "_module.pos_emb.weight",
        "blocks.0.moe.experts.0.w_gate.bias",
        "blocks.0.attn.k.lora_B.weight",
        "adapters.so100.encoder.1.weight",
    ):
        with pytest.raises(ValueError, match="fits no shard rule"):
            shard_of(bad)


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_shards_cover_state_dict_exactly(size):
    cfg = load_config(model=size)
    m = cfg.model
    model = Policy(m, cfg.embodiments)
    state = model.state_dict()
    assert list(state) == [n for n, _ in model.named_parameters()]  # no buffers outside shards
    layout = ShardLayout.from_model(model)
    names = [spec.name for specs in layout.shards.values() for spec in specs]
    assert sorted(names) == sorted(state) and len(names) == len(set(names))
    for shard_id, specs in layout.shards.items():
        for spec in specs:
            assert shard_of(spec.name) == shard_id
            assert spec.shape == tuple(state[spec.name].shape) and spec.dtype == state[spec.name].dtype
    assert layout.total_numel() == count_parameters(model)
    kinds = layout.count_by_kind()
    assert kinds["backbone"][0] == 1 and kinds["adapter_shared"][0] == 1
    assert kinds["expert"] == (m.n_layers * m.n_experts, m.n_layers * m.n_experts * 3 * m.d_model * m.expert_hidden)
    assert kinds["adapter_emb"][0] == len(cfg.embodiments)
    assert sum(n for _, n in kinds.values()) == layout.total_numel()
    assert ShardLayout.from_config(m, cfg.embodiments) == layout


def test_layout_order_and_sizes(cfg, model):
    layout = ShardLayout.from_model(model)
    m = cfg.model
    experts = [expert_shard(layer, e) for layer in range(m.n_layers) for e in range(m.n_experts)]
    embs = [embodiment_shard(n) for n in sorted(cfg.embodiments)]
    assert list(layout.shards) == [BACKBONE, *experts, SHARED_ADAPTER, *embs]
    eid = expert_shard(1, 2)
    assert layout.numel(eid) == 3 * m.d_model * m.expert_hidden
    assert layout.nbytes(eid) == 4 * layout.numel(eid)
    assert layout.nbytes(eid, torch.bfloat16) == 2 * layout.numel(eid)
    assert layout.numel(SHARED_ADAPTER) == m.n_layers * 2 * 2 * m.d_model * m.lora_rank
    spec = TensorSpec("x", (3, 4), torch.float16)
    assert spec.numel == 12 and spec.nbytes == 24
    with pytest.raises(ValueError, match="not in this layout"):
        layout.numel(expert_shard(99, 0))
    with pytest.raises(ValueError, match="malformed"):
        layout.numel("nope")


def test_set_trainable(cfg, model):
    shards = [expert_shard(0, 1), SHARED_ADAPTER, embodiment_shard("agv"), BACKBONE]
    names = set_trainable(model, shards)
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]
    expected = {
        *(f"blocks.0.moe.experts.1.{w}.weight" for w in ("w_gate", "w_up", "w_down")),
        *(f"blocks.{layer}.attn.{qv}.lora_B.weight" for layer in range(cfg.model.n_layers) for qv in "qv"),
        *(n for n, _ in model.named_parameters() if n.startswith("adapters.agv.")),
    }
    assert set(names) == expected
    assert "adapters.agv.image.weight" in expected
    assert trainable_names(model, BACKBONE) == []
    assert all("lora_B" in n for n in trainable_names(model, SHARED_ADAPTER))
    assert set_trainable(model, []) == [] and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="no tensors"):
        set_trainable(model, [expert_shard(0, 99)])
    with pytest.raises(ValueError, match="no tensors"):
        set_trainable(model, [embodiment_shard("ur5")])


def test_shard_state_is_a_view_and_load_round_trips(cfg, model):
    other_cfg = load_config(model="tiny", overrides=["model.init_seed=5"])
    other = Policy(other_cfg.model, other_cfg.embodiments)
    layout = ShardLayout.from_model(model)
    for shard_id in layout.shards:
        state = shard_state(model, shard_id)
        assert [s.name for s in layout.shards[shard_id]] == list(state)
        load_shard(other, shard_id, {k: v.clone() for k, v in state.items()})
    mine, theirs = model.state_dict(), other.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)

    view = shard_state(model, expert_shard(0, 0))["blocks.0.moe.experts.0.w_up.weight"]
    assert not view.requires_grad
    with torch.no_grad():
        model.blocks[0].moe.experts[0].w_up.weight.add_(1.0)
    assert torch.equal(view, model.blocks[0].moe.experts[0].w_up.weight)  # shares storage


def test_load_shard_errors_name_the_keys(model):
    shard_id = embodiment_shard("so100")
    good = {k: v.clone() for k, v in shard_state(model, shard_id).items()}
    before = {k: v.clone() for k, v in good.items()}
    missing = dict(good)
    del missing["adapters.so100.decoder.2.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['adapters.so100.decoder.2.bias'\]"):
        load_shard(model, shard_id, missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['adapters.so100.extra'\]"):
        load_shard(model, shard_id, {**good, "adapters.so100.extra": torch.zeros(1)})
    bad_shape = {k: (v + 1 if "encoder" in k else v) for k, v in good.items()}
    bad_shape["adapters.so100.decoder.2.weight"] = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"shape mismatch: adapters.so100.decoder.2.weight"):
        load_shard(model, shard_id, bad_shape)
    after = shard_state(model, shard_id)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-loaded
    with pytest.raises(ValueError, match="malformed"):
        load_shard(model, "bogus", good)
    with pytest.raises(ValueError, match="no tensors"):
        shard_state(model, embodiment_shard("ur5"))


def test_functions_see_through_opacus_wrapper(model):
    from opacus import GradSampleModule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    names = set_trainable(gsm, [SHARED_ADAPTER])
    assert names and all(n.startswith("blocks.") for n in names)
    assert list(shard_state(gsm, BACKBONE))[0] == "pos_emb.weight"
    assert ShardLayout.from_model(gsm) == ShardLayout.from_model(model)
    gsm._close()


_TRILLION_SCRIPT = r"""
import json, resource, time
t0 = time.perf_counter()
from shared_model.config import load_config
from shared_model.policy import build_meta, count_parameters
from shared_model.shards import ShardLayout, shard_of
cfg = load_config(model="trillion")
t1 = time.perf_counter()
model = build_meta(cfg.model, cfg.embodiments)
t2 = time.perf_counter()
layout = ShardLayout.from_model(model)
t3 = time.perf_counter()
state = model.state_dict(keep_vars=True)
names = [s.name for specs in layout.shards.values() for s in specs]
print(json.dumps({
    "build_s": t2 - t1, "layout_s": t3 - t2, "total_s": t3 - t0,
    "params": count_parameters(model), "layout_numel": layout.total_numel(),
    "kinds": layout.count_by_kind(), "n_shards": len(layout.shards),
    "covers": sorted(names) == sorted(state) and len(names) == len(set(names)),
    "all_meta": all(t.is_meta for t in state.values()),
    "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def test_trillion_layout_on_meta():
    """Spec: the trillion config builds on meta with ~1.0e12 parameters in < 2 GB (and < 30 s, printed)."""
    out = subprocess.run(
        [sys.executable, "-c", _TRILLION_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(r)
    assert r["all_meta"] and r["covers"]
    assert abs(r["params"] - 1.0e12) <= 0.05e12
    assert r["layout_numel"] == r["params"]
    assert r["kinds"]["expert"][0] == 61 * 384
    assert r["n_shards"] == 1 + 61 * 384 + 1 + len(load_config(model="trillion").embodiments)
    # The < 30 s part of the spec is measured and printed (and by `kyodo-coordinator
    # model-info`), not asserted: timings never go in assertions on these shared machines.
    assert r["max_rss_mb"] < 2048, f"trillion layout used {r['max_rss_mb']:.0f} MB"


def test_build_meta_layout_matches_real_model_names(cfg, model):
    assert ShardLayout.from_model(build_meta(cfg.model, cfg.embodiments)) == ShardLayout.from_model(model)
