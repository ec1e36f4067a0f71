"""The content-addressed shard store and the Hugging Face export: round trips, deterministic
ids, copy-on-write rounds, crash safety of HEAD, refusal of corrupt objects, gc."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from shared_model.export import INDEX_NAME, export_hf
from shared_model.policy import Policy
from shared_model.shards import ShardLayout, expert_shard, shard_state
from shared_model.store import (
    CommitConflictError,
    CorruptManifestError,
    CorruptObjectError,
    MissingObjectError,
    ShardStore,
    StoreError,
    model_config_hash,
    serialize_shard,
)


@pytest.fixture(scope="module")
def policy(tiny_cfg) -> Policy:
    """A tiny policy whose weights are *not* the deterministic init (LoRA B included), so a
    freshly built Policy differs until the stored weights are loaded into it."""
    model = Policy(tiny_cfg.model, tiny_cfg.embodiments)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _commit_model(store: ShardStore, model: Policy, cfg) -> dict[str, str]:
    layout = ShardLayout.from_model(model)
    ids = {sid: store.put_shard(sid, shard_state(model, sid)) for sid in layout.shards}
    store.commit(None, ids, model_config=model_config_hash(cfg.model, cfg.embodiments))
    return ids


def _object_files(store: ShardStore) -> set[Path]:
    return set((store.root / "objects").glob("*/*.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def test_round_trip(tmp_path, policy, tiny_cfg):
    store = ShardStore(tmp_path / "store")
    assert store.head() is None and store.head_manifest() is None
    ids = _commit_model(store, policy, tiny_cfg)
    head = store.head()
    assert head is not None and head.round == 0
    manifest = store.manifest(0)
    assert manifest.digest == head.manifest and manifest.shards == ids and manifest.parent is None
    assert manifest.model_config == model_config_hash(tiny_cfg.model, tiny_cfg.embodiments)

    _assert_same(store.load_model(0), policy.state_dict())
    streamed = list(store.iter_shards(0))
    assert [s for s, _ in streamed] == list(ShardLayout.from_model(policy).shards)  # layout order
    for shard_id, tensors in streamed:
        assert store.has(ids[shard_id]) and store.object_size(ids[shard_id]) > sum(t.nbytes for t in tensors.values())
        _assert_same(tensors, shard_state(policy, shard_id))

    # Tensors are writable views of one verified buffer; writing to them leaves the store alone.
    tensors = store.get_shard(ids["backbone"])
    next(iter(tensors.values())).add_(1.0)
    _assert_same(store.get_shard(ids["backbone"]), shard_state(policy, "backbone"))

    # A second handle on the same directory sees the same committed state.
    assert ShardStore(tmp_path / "store").manifest(0) == manifest


def test_deterministic_ids(tmp_path):
    tensors = {
        "blocks.0.moe.experts.1.w_up.weight": torch.randn(8, 4),
        "blocks.0.moe.experts.1.w_gate.weight": torch.randn(8, 4).to(torch.bfloat16),
        "blocks.0.moe.experts.1.w_down.weight": torch.arange(12, dtype=torch.int64).reshape(4, 3),
    }
    shard = expert_shard(0, 1)
    store = ShardStore(tmp_path / "a")
    first = store.put_shard(shard, tensors)
    # Same tensors in another insertion order, as copies, non-contiguous sources: same id.
    reordered = {k: tensors[k].clone() for k in reversed(list(tensors))}
    reordered["blocks.0.moe.experts.1.w_up.weight"] = tensors["blocks.0.moe.experts.1.w_up.weight"].t().contiguous().t()
    assert not reordered["blocks.0.moe.experts.1.w_up.weight"].is_contiguous()
    assert store.put_shard(shard, reordered) == first
    assert len(_object_files(store)) == 1
    # One bit of difference, or another shard id: another object.
    changed = dict(tensors, **{"blocks.0.moe.experts.1.w_up.weight": tensors["blocks.0.moe.experts.1.w_up.weight"] + 1})
    assert store.put_shard(shard, changed) != first
    assert store.put_shard(expert_shard(0, 2), tensors) != first

    # safetensors writes `__metadata__` in Rust HashMap order, seeded afresh for every map, even
    # within one process: with two keys the bytes change from call to call. (If this ever
    # stops failing, safetensors made it deterministic.) Hence objects carry a single key, and
    # repeated serialisations of one shard are byte-identical.
    variants = {safetensors.torch.save(tensors, metadata={"a": "1", "b": "2"}) for _ in range(32)}
    assert len(variants) > 1
    assert {serialize_shard(shard, tensors) for _ in range(32)} == {store.object_bytes(first)}
    # The header carries exactly one metadata key: more would be written in HashMap order.
    with safe_open(store.object_path(first), framework="pt") as f:
        assert list(f.metadata()) == ["kyodo"] and json.loads(f.metadata()["kyodo"])["shard"] == shard


def test_second_round_writes_only_changed_shards(tmp_path, policy, tiny_cfg):
    store = ShardStore(tmp_path / "store")
    ids0 = _commit_model(store, policy, tiny_cfg)
    before = _object_files(store)
    assert len(before) == len(ids0)

    changed_shards = [expert_shard(1, 2), "adapter/shared"]
    changed = {}
    for sid in changed_shards:
        tensors = {k: v.clone() + 0.5 for k, v in shard_state(policy, sid).items()}
        changed[sid] = store.put_shard(sid, tensors)
    # An unchanged shard re-put (same tensors) writes nothing and keeps its id.
    assert store.put_shard("backbone", shard_state(policy, "backbone")) == ids0["backbone"]
    m1 = store.commit(store.head_manifest(), changed, extra={"note": "round 1"})

    after = _object_files(store)
    assert len(after - before) == len(changed_shards)
    assert m1.round == 1 and m1.parent == 0 and m1.parent_manifest == store.manifest(0).digest
    assert {s for s in m1.shards if m1.shards[s] != ids0[s]} == set(changed_shards)
    assert sorted(p.name for p in (store.root / "manifests").iterdir()) == ["round-000000.json", "round-000001.json"]
    round1 = store.load_model(1)
    for name, value in policy.state_dict().items():
        moved = any(name in shard_state(policy, s) for s in changed_shards)
        assert torch.equal(round1[name], value + 0.5 if moved else value), name
    _assert_same(store.load_model(0), policy.state_dict())  # the old round is untouched
    assert store.manifest(1).extra == {"note": "round 1"} and store.rounds() == [1, 0]


def test_head_moves_atomically_and_a_crashed_commit_is_garbage(tmp_path, policy, tiny_cfg, monkeypatch):
    store = ShardStore(tmp_path / "store")
    ids0 = _commit_model(store, policy, tiny_cfg)
    head0 = store.head()
    sid = expert_shard(0, 0)
    orphan = store.put_shard(sid, {k: v + 1 for k, v in shard_state(policy, sid).items()})

    real_write = ShardStore._write_atomic

    def crash_on_head(self, final, data):
        if final.name == "HEAD":
            raise OSError("simulated power loss before HEAD moved")
        return real_write(self, final, data)

    monkeypatch.setattr(ShardStore, "_write_atomic", crash_on_head)
    with pytest.raises(OSError, match="power loss"):
        store.commit(store.head_manifest(), {sid: orphan})
    monkeypatch.undo()

    # After the "crash" (a fresh process opens the store): HEAD and round 0 are intact.
    reopened = ShardStore(tmp_path / "store")
    assert reopened.head() == head0
    assert (reopened.root / "manifests" / "round-000001.json").is_file()  # written, never committed
    with pytest.raises(StoreError, match="round 1 is not committed"):
        reopened.manifest(1)
    _assert_same(reopened.load_model(0), policy.state_dict())

    (reopened.root / "tmp" / "HEAD.123.dead.tmp").write_bytes(b"half")  # a torn temp file
    report = reopened.gc()
    assert report.removed_objects == 1 and report.removed_rounds == [1] and report.removed_tmp == 1
    assert not reopened.has(orphan) and all(reopened.has(o) for o in ids0.values())
    assert report.kept_rounds == [0] and report.kept_objects == len(ids0)

    # The retried commit goes through.
    orphan_again = reopened.put_shard(sid, {k: v + 1 for k, v in shard_state(policy, sid).items()})
    assert orphan_again == orphan
    assert reopened.commit(reopened.head_manifest(), {sid: orphan}).round == 1
    assert reopened.head().round == 1


def test_corrupt_or_missing_object_is_refused(tmp_path, policy, tiny_cfg):
    store = ShardStore(tmp_path / "store")
    ids = _commit_model(store, policy, tiny_cfg)
    sid = expert_shard(1, 3)
    path = store.object_path(ids[sid])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))

    with pytest.raises(CorruptObjectError) as err:
        store.load_model(0)
    assert err.value.object_id == ids[sid] and err.value.shard_id == sid
    assert ids[sid] in str(err.value) and sid in str(err.value) and "corrupt" in str(err.value)
    with pytest.raises(CorruptObjectError):
        store.object_bytes(ids[sid])  # never sent to a replica either
    with pytest.raises(CorruptObjectError):
        export_hf(store, 0, tmp_path / "hf")
    assert not any((tmp_path / "hf").iterdir())  # nothing half-exported

    # Re-putting the good tensors heals the object in place.
    assert store.put_shard(sid, shard_state(policy, sid)) == ids[sid]
    _assert_same(store.load_model(0), policy.state_dict())

    path.unlink()
    with pytest.raises(MissingObjectError, match=sid):
        list(store.iter_shards(0))
    with pytest.raises(MissingObjectError):
        store.object_size(ids[sid])


def test_put_object_bytes_verifies_before_writing(tmp_path, policy, tiny_cfg):
    coordinator = ShardStore(tmp_path / "coordinator")
    ids = _commit_model(coordinator, policy, tiny_cfg)
    replica = ShardStore(tmp_path / "member")
    sid = expert_shard(0, 3)
    oid = ids[sid]
    data = coordinator.object_bytes(oid)

    tampered = bytearray(data)
    tampered[len(tampered) // 2] ^= 0xFF
    with pytest.raises(CorruptObjectError, match="hash to"):
        replica.put_object_bytes(oid, bytes(tampered))
    with pytest.raises(CorruptObjectError):
        replica.put_object_bytes(oid, data[:-4])  # truncated in transit
    assert not replica.has(oid) and not _object_files(replica)
    for bad in ("../../etc/passwd", oid.upper(), oid[:-1], ""):
        with pytest.raises(StoreError, match="malformed object id"):
            replica.put_object_bytes(bad, data)

    assert replica.put_object_bytes(oid, data) is True
    assert replica.put_object_bytes(oid, data) is False  # already held: nothing written
    _assert_same(replica.get_shard(oid, shard_id=sid), shard_state(policy, sid))
    with pytest.raises(StoreError, match="holds shard"):
        replica.get_shard(oid, shard_id="backbone")


def test_export_round_trip_loads_into_policy(tmp_path, policy, tiny_cfg):
    store = ShardStore(tmp_path / "store")
    _commit_model(store, policy, tiny_cfg)
    state = policy.state_dict()
    total = sum(t.nbytes for t in state.values())
    result = export_hf(store, 0, tmp_path / "hf", max_shard_bytes=total // 4)

    out = tmp_path / "hf"
    index = json.loads((out / INDEX_NAME).read_text())
    n = len(result.files)
    assert n >= 4 and result.files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX_NAME, *result.files])
    assert index["metadata"]["total_size"] == total == result.total_size
    assert set(index["weight_map"]) == set(state) and set(index["weight_map"].values()) == set(result.files)

    loaded: dict[str, torch.Tensor] = {}
    for name in result.files:
        with safe_open(out / name, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert all(index["weight_map"][k] == name for k in f.keys())  # noqa: SIM118 (safe_open API)
        loaded.update(load_file(out / name))
    _assert_same(loaded, state)

    fresh = Policy(tiny_cfg.model, tiny_cfg.embodiments)
    emb = "agv"  # the embodiment with image features: exercises every adapter path
    spec = tiny_cfg.embodiments[emb]
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(3, tiny_cfg.model.history, spec.obs_dim, generator=gen)
    image = torch.randn(3, tiny_cfg.model.history, spec.image_feature_dim, generator=gen)
    policy.eval(), fresh.eval()
    with torch.no_grad():
        want = policy(emb, obs, image)[0]
        assert not torch.equal(fresh(emb, obs, image)[0], want)
        fresh.load_state_dict(loaded, strict=True)
        assert torch.equal(fresh(emb, obs, image)[0], want)

    with pytest.raises(StoreError, match="already holds a model"):
        export_hf(store, 0, out)
    again = export_hf(store, 0, out, overwrite=True)  # one file now: the stale ones must go
    assert again.files == ["model-00001-of-00001.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX_NAME, *again.files])
    _assert_same(load_file(out / again.files[0]), state)


def test_export_mixed_dtypes_is_aligned(tmp_path):
    store = ShardStore(tmp_path / "store")
    tensors = {
        "a.weight": torch.randn(3, 5).to(torch.bfloat16),
        "b.weight": torch.randn(7, dtype=torch.float64),
        "c.weight": torch.arange(5, dtype=torch.int8),
        "d.weight": torch.randn(2, 3),
        "e.weight": torch.zeros(0, 4),
    }
    oid = store.put_shard("backbone", tensors)
    store.commit(None, {"backbone": oid}, model_config="x" * 64)
    result = export_hf(store, 0, tmp_path / "hf")
    path = tmp_path / "hf" / result.files[0]
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    sizes = {"F64": 8, "F32": 4, "BF16": 2, "I8": 1}
    for name, info in header.items():
        if name != "__metadata__":
            assert info["data_offsets"][0] % sizes[info["dtype"]] == 0, name
    _assert_same(load_file(path), tensors)


def test_gc_keep_last_and_extra_references(tmp_path, policy, tiny_cfg):
    store = ShardStore(tmp_path / "store")
    ids0 = _commit_model(store, policy, tiny_cfg)
    sid = expert_shard(0, 1)
    base = shard_state(policy, sid)
    per_round = {}
    for r in (1, 2, 3):
        per_round[r] = store.put_shard(sid, {k: v + r for k, v in base.items()})
        optim = store.put_shard(sid, {f"exp_avg.{k}": torch.full_like(v, r) for k, v in base.items()})
        store.commit(store.head_manifest(), {sid: per_round[r]}, extra={"optimizer": {sid: optim}, "round": r})
    optim3 = store.manifest(3).extra["optimizer"][sid]
    stray = store.put_shard(sid, {k: v - 1 for k, v in base.items()})  # written, never committed

    report = store.gc(keep_last=2)
    assert report.kept_rounds == [2, 3] and report.removed_rounds == [0, 1]
    assert store.rounds() == [3, 2]
    assert not store.has(stray) and not store.has(per_round[1]) and not store.has(ids0[sid])
    assert store.has(per_round[2]) and store.has(per_round[3]) and store.has(optim3)  # extra keeps objects
    assert all(store.has(o) for s, o in ids0.items() if s != sid)  # still referenced by rounds 2 and 3
    with pytest.raises(StoreError, match="removed by gc"):
        store.manifest(0)
    assert store.load_model(2)[next(iter(base))].equal(next(iter(base.values())) + 2)

    assert store.gc().removed_objects == 0  # idempotent
    with pytest.raises(StoreError, match="keep_last"):
        store.gc(keep_last=0)
    young = store.put_shard(sid, {k: v * 3 for k, v in base.items()})
    assert store.gc(min_age_s=3600).removed_objects == 0 and store.has(young)  # too young to collect
    replica_keep = store.gc(keep_objects=[young])
    assert store.has(young) and replica_keep.removed_objects == 0


def test_commit_and_manifest_errors_are_clear(tmp_path, policy, tiny_cfg):
    store = ShardStore(tmp_path / "store")
    with pytest.raises(StoreError, match="no committed round"):
        store.manifest(0)
    oid = store.put_shard("backbone", shard_state(policy, "backbone"))
    with pytest.raises(StoreError, match="needs model_config"):
        store.commit(None, {"backbone": oid})
    with pytest.raises(MissingObjectError, match="'backbone'"):
        store.commit(None, {"backbone": "0" * 64}, model_config="c" * 64)
    with pytest.raises(ValueError, match="malformed shard id"):
        store.commit(None, {"experts/0": oid}, model_config="c" * 64)
    with pytest.raises(ValueError, match="malformed shard id"):
        store.put_shard("expert/0/1", shard_state(policy, "backbone"))
    with pytest.raises(StoreError, match="round trip"):
        store.commit(None, {"backbone": oid}, model_config="c" * 64, extra={"cohort": {1: "a"}})
    with pytest.raises(StoreError, match="canonical JSON"):
        store.commit(None, {"backbone": oid}, model_config="c" * 64, extra={"loss": float("nan")})
    assert store.head() is None  # none of the refused commits moved HEAD

    m0 = store.commit(None, {"backbone": oid}, model_config="c" * 64)
    m1 = store.commit(m0, {}, extra={"skipped": True})
    with pytest.raises(CommitConflictError, match="HEAD is at round 1"):
        store.commit(m0, {})  # a stale parent: another writer got there first
    with pytest.raises(CommitConflictError):
        store.commit(None, {"backbone": oid}, model_config="c" * 64)
    with pytest.raises(StoreError, match="must come after"):
        store.commit(m1, {}, round_number=1)
    with pytest.raises(StoreError, match="would have no shards"):
        store.commit(m1, {}, removed=["backbone"])
    with pytest.raises(StoreError, match="not committed"):
        store.manifest(5)

    # A manifest edited on disk no longer matches the hash chain from HEAD.
    path = store.root / "manifests" / "round-000000.json"
    path.write_bytes(path.read_bytes().replace(b'"round":0', b'"round":0 '))
    fresh = ShardStore(store.root)
    with pytest.raises(CorruptManifestError, match="round 0"):
        fresh.manifest(0)
    with pytest.raises(CorruptManifestError):
        fresh.gc()  # gc never decides what to delete from a manifest it cannot trust
