"""The member node's logic and its ClientApp, on generated data (no Flower runtime needed)."""

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from clientapp_io import context, message
from flwr.app import RecordDict

from member_node.identity import NodeConfigError, resolve_identity
from member_node.node import MemberNode
from member_node.synthetic import generate_dataset
from privacy.accountant import Mechanism
from shared_model.config import load_config
from shared_model.policy import Policy
from shared_model.protocol import (
    ERR_INVALID_REQUEST,
    ERR_NODE_CONFIG,
    EvaluateRequest,
    ProtocolError,
    QueryRequest,
    TrainDeclined,
    TrainHyperParams,
    TrainReply,
    TrainRequest,
    coarse_count,
)
from shared_model.shards import shard_of

HP = TrainHyperParams(lr=0.01, local_steps=3, batch_size=8, weight_decay=0.0, seed=0, sample_rate=0.8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("member")
    cfg = load_config(model="tiny", overrides=[f"data_root={root}", f"state_root={root / 'state'}"])
    generate_dataset(root / "sony", "so100", cfg.embodiments["so100"], episodes=12, episode_seconds=2.0, seed=1)
    identity = resolve_identity({"partition-id": 1}, cfg)  # default federation: sony is member 1
    node = MemberNode(cfg, identity)
    model = {k: v.clone() for k, v in Policy(cfg.model, cfg.embodiments).state_dict().items()}
    return cfg, node, model


@pytest.fixture
def fresh_node(setup, tmp_path):
    """A node of the same member with its own, empty state directory (ledger, key)."""
    cfg, node, _ = setup
    return MemberNode(cfg, replace(node.identity, state_dir=tmp_path / "state"))


def test_identity_from_node_config(setup):
    cfg, node, _ = setup
    assert node.identity.name == "sony" and node.identity.embodiment == "so100"
    ident = resolve_identity({"member": "x", "embodiment": "agv", "data-dir": "/d"}, cfg)
    assert ident.name == "x" and str(ident.data_dir) == "/d"
    with pytest.raises(NodeConfigError, match="data-dir"):
        resolve_identity({"member": "x", "embodiment": "agv"}, cfg)
    with pytest.raises(NodeConfigError, match="does not know"):
        resolve_identity({"member": "x", "embodiment": "boat", "data-dir": "/d"}, cfg)
    with pytest.raises(NodeConfigError, match="has no member"):
        resolve_identity({"partition-id": 9}, cfg)


def test_query_is_coarse_and_private_under_dp(setup, tmp_path):
    cfg, node, _ = setup
    reply = node.query(QueryRequest(0))
    assert reply.member == "sony" and reply.embodiments == ["so100"] and reply.episodes == 0  # DP: withheld
    open_node = MemberNode(cfg, replace(node.identity, state_dir=tmp_path / "s", dp=False))
    assert open_node.query(QueryRequest(0)).episodes == 10  # 12 -> 10


def test_train_returns_exactly_the_assigned_shards(fresh_node, setup):
    _, _, model = setup
    node = fresh_node
    shards = ["expert/L0/E1", "adapter/shared", "adapter/emb/so100"]
    reply = node.train(TrainRequest(1, shards, HP, model))
    assert {shard_of(n) for n in reply.deltas} == set(shards)
    assert not any(".lora_A." in n for n in reply.deltas), "LoRA A is frozen"
    assert all(torch.isfinite(d).all() for d in reply.deltas.values())
    assert any(d.abs().sum() > 0 for d in reply.deltas.values())
    assert reply.num_examples == 0 and reply.steps == 3  # DP: the size is withheld


def test_non_private_training_is_reproducible(fresh_node, setup):
    """Without DP (a member's debugging switch) a round is a pure function of its inputs."""
    _, _, model = setup
    node = fresh_node
    node.identity = replace(node.identity, dp=False)
    a = node.train(TrainRequest(1, ["adapter/emb/so100"], HP, model))
    b = node.train(TrainRequest(1, ["adapter/emb/so100"], HP, model))
    assert a.receipt == "" and all(torch.equal(a.deltas[k], b.deltas[k]) for k in a.deltas)
    # Which is why it masks a round's update once: masked again in other cohorts, the sums
    # would solve for it (a review recovered one member's update from four sessions). In the
    # clear (above) it tells nothing new, and a coordinator resuming a round may ask again.
    from aggregation.secagg.server import build_setup
    from member_node.sent_updates import MASKED, note_sent
    from shared_model.protocol import MaskedInputRequest

    note_sent(node.identity.state_dir, "r", 2, MASKED)
    with pytest.raises(ProtocolError, match="already sent its masked update"):
        node.masked_input(MaskedInputRequest(2, "r", {}, {}, {}))
    setup = build_setup(
        {"adapter/emb/so100": [node.identity.name, "b", "c"]}, bits=16, clip_range=1.0, graph_seed=bytes(16)
    )
    again = node.train(TrainRequest(2, ["adapter/emb/so100"], HP, model, run="r", secagg=setup))
    assert isinstance(again, TrainDeclined) and "masks a round's update once" in again.reason


@pytest.mark.parametrize(
    "shards, match",
    [
        (["backbone"], "frozen"),
        (["adapter/emb/aloha"], "another embodiment"),
        (["expert/L9/E0"], "does not exist"),
    ],
)
def test_train_refuses_bad_assignments(setup, shards, match):
    _, node, model = setup
    with pytest.raises(ProtocolError, match=match):
        node.train(TrainRequest(1, shards, HP, model))


def test_wrong_model_tensors_refused(setup):
    _, node, model = setup
    broken = dict(model)
    name = next(iter(broken))
    broken[name] = torch.zeros(1)
    with pytest.raises(ProtocolError, match="shape"):
        node.train(TrainRequest(1, ["adapter/shared"], HP, broken))
    with pytest.raises(ProtocolError, match="missing"):
        node.evaluate(EvaluateRequest(1, {k: v for k, v in model.items() if k != name}))


def test_evaluate_without_dp_is_exact(setup, tmp_path):
    cfg, node, model = setup
    open_node = MemberNode(cfg, replace(node.identity, state_dir=tmp_path / "s", dp=False))
    reply = open_node.evaluate(EvaluateRequest(0, model, run="r"))
    assert reply.num_examples > 0 and reply.action_mse > 0 and reply.action_mae > 0
    assert reply.receipt == "" and reply.released and open_node.ledger.releases() == []


def test_evaluate_under_dp_is_a_recorded_release(fresh_node, setup):
    """The held-out error leaves a DP node noised, within budget, with its ledger entry as receipt."""
    from privacy.ledger import receipt_from_json

    _, _, model = setup
    reply = fresh_node.evaluate(EvaluateRequest(0, model, run="r"))
    assert reply.released and reply.action_mae != reply.action_mae, "the exact MAE does not leave a DP node"
    assert 0 <= reply.action_mse <= fresh_node.identity.eval_loss_bound
    entry = receipt_from_json(reply.receipt)
    assert entry == fresh_node.ledger.find("r", 0, "evaluation") and entry["mechanism"]["sample_rate"] == 1.0
    assert entry["mechanism"]["noise_source"] == "os-csprng-gauss"
    assert fresh_node.epsilon_spent() == pytest.approx(entry["epsilon"]) and entry["epsilon"] > 0
    # the same request again (a resumed coordinator): the same answer, nothing more spent
    again = fresh_node.evaluate(EvaluateRequest(0, model, run="r"))
    assert (again.action_mse, again.receipt) == (reply.action_mse, reply.receipt)
    assert len(fresh_node.ledger.releases()) == 1
    # training the next round after it: both in one chain, the plan reserved room for evaluations
    trained = fresh_node.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=2))
    assert receipt_from_json(trained.receipt)["epsilon"] > entry["epsilon"]
    withheld = fresh_node.evaluate(EvaluateRequest(1, model))  # no run named: cannot be recorded
    assert not withheld.released and "names no run" in withheld.withheld


# ---------------------------------------------------------------- the ClientApp itself
def test_client_app_answers_and_refuses(setup):
    from member_node.client_app import app

    cfg, _, model = setup
    ctx = context(cfg, {"partition-id": 1})
    reply = app(message(TrainRequest(50, ["adapter/emb/so100"], HP, model).to_content(), "train"), ctx)
    assert not reply.has_error(), reply.error
    assert TrainReply.from_content(reply.content).member == "sony"

    bad = TrainRequest(1, ["backbone"], HP, model).to_content()
    reply = app(message(bad, "train"), ctx)
    assert reply.has_error() and reply.error.code == ERR_INVALID_REQUEST and "frozen" in reply.error.reason

    reply = app(message(RecordDict(), "train"), ctx)
    assert reply.has_error() and reply.error.code == ERR_INVALID_REQUEST

    reply = app(message(QueryRequest(0).to_content(), "query"), context(cfg, {}))
    assert reply.has_error() and reply.error.code == ERR_NODE_CONFIG
    # What is wrong goes to the member's log; the reply (the coordinator's) says only that.
    data_dir = str(Path(cfg.data_root) / "sony")
    bad_budget = context(cfg, {"member": "sony", "embodiment": "so100", "data-dir": data_dir, "epsilon": -1})
    reply = app(message(QueryRequest(0).to_content(), "query"), bad_budget)
    assert reply.has_error() and reply.error.code == ERR_NODE_CONFIG
    assert reply.error.reason == "the member's node configuration is invalid (see its node log)"


def test_a_node_that_cannot_write_its_state_says_so_in_one_line(setup, tmp_path, monkeypatch, caplog):
    """A full or read-only state directory read as a bare OSError traceback in the member's log
    and 'internal error on node: OSError' at the coordinator (a fault test, on a real deployment)."""
    import errno

    import member_node.node as node_module
    from member_node.client_app import app

    cfg, _, _ = setup
    state = tmp_path / "state"

    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(state / "queried_rounds.json.tmp"))

    monkeypatch.setattr(node_module, "note_queried", full_disk)
    data_dir = str(Path(cfg.data_root) / "sony")
    ctx = context(cfg, {"member": "sony", "embodiment": "so100", "data-dir": data_dir, "state-dir": str(state)})
    with caplog.at_level("ERROR", logger="kyodo.member"):
        reply = app(message(QueryRequest(3, "r", HP, 4).to_content(), "query"), ctx)
    assert reply.has_error(), reply.content
    assert reply.error.reason == "the member's node cannot use a file it needs (see its node log)"
    assert str(state) not in reply.error.reason, "the path stays on the node"
    assert "cannot use a file it needs (No space left on device: " in caplog.text and "Traceback" not in caplog.text
    assert "free space, or make the file and its directory writable" in caplog.text


def test_a_seating_notice_reaches_the_members_own_log_in_the_nodes_words(setup, caplog):
    """A member the others have not pinned yet is never asked to train, and its own file is
    the newest: the coordinator's notice is the only way its node can say why."""
    from member_node.client_app import app
    from shared_model.protocol import SeatingNoted, SeatingNotice

    cfg, _, _ = setup
    ctx = context(cfg, {"partition-id": 1})
    notice = SeatingNotice(4, "run-7", [f"m{i}" for i in range(7)])
    with caplog.at_level(logging.WARNING, logger="kyodo"):
        reply = app(message(notice.to_content(), "query.seating"), ctx)
    assert not reply.has_error(), reply.error
    assert SeatingNoted.from_content(reply.content) == SeatingNoted("sony")
    said = "sony is left out of training (round 4 of run run-7): m0, m1, m2, m3, m4 and 2 more pinned a consortium file"
    assert said in caplog.text
    assert "kyodo-member trust" in caplog.text
    # Names only: a notice that tries to carry text is refused before anything is logged.
    caplog.clear()
    bad = SeatingNotice(4, "run-7", ["honda\nERROR forged line"]).to_content()
    with caplog.at_level(logging.WARNING, logger="kyodo"):
        reply = app(message(bad, "query.seating"), ctx)
    assert reply.has_error() and reply.error.code == ERR_INVALID_REQUEST and "forged" not in caplog.text


def test_a_node_that_was_not_asked_for_rounds_says_which_went_on_without_it(fresh_node, caplog):
    """A node restarted quickly joins after the round's query went out (Flower keeps the old
    session for two heartbeats), and nothing reached it to say it missed that round."""
    node = fresh_node
    with caplog.at_level(logging.WARNING, logger="kyodo"):
        for rnd in (0, 1, 1, 2):  # a round asked twice (a second query, a resumed run) is no gap
            node.query(QueryRequest(rnd, "run-7", HP))
        assert "went on without" not in caplog.text
        node.query(QueryRequest(4, "run-7", HP))
        assert "sony: round 3 of run run-7 went on without this member" in caplog.text
        assert "it is back from round 4" in caplog.text
        caplog.clear()
        node.query(QueryRequest(3, "run-7", HP))  # an older round again (a resume after a crash)
        node.query(QueryRequest(5, "run-7", HP))
        assert "went on without" not in caplog.text
        # Another run is its own count, from the round the node first saw it (a member that
        # starts its node late knows it did).
        node.query(QueryRequest(3, "run-8", HP))
        node.query(QueryRequest(6, "run-7", HP))
        assert "went on without" not in caplog.text
        node.query(QueryRequest(6, "run-8", HP))
        assert "rounds 4-5 of run run-8 went on without this member" in caplog.text
    # A torn note (a crash while writing) loses a gap's message, never a query, and invents none.
    from member_node.missed_rounds import QUERIED_FILE, note_queried

    (Path(node.identity.state_dir) / QUERIED_FILE).write_text('{"run-7": 6', encoding="utf-8")
    assert note_queried(Path(node.identity.state_dir), "run-7", 8) == range(0)
    assert note_queried(Path(node.identity.state_dir), "run-7", 10) == range(9, 10)


# ---------------------------------------------------------------- privacy on the node
def test_dp_round_writes_a_signed_receipt(fresh_node, setup):
    from privacy.keys import public_key_hex
    from privacy.ledger import receipt_from_json, verify_entry

    _, _, model = setup
    node = fresh_node
    reply = node.train(TrainRequest(1, ["adapter/shared", "adapter/emb/so100"], HP, model, run="r1", planned_rounds=4))
    entry = receipt_from_json(reply.receipt)
    verify_entry(entry, public_key_hex(node.signing_key))
    assert entry["run"] == "r1" and entry["round"] == 1 and entry["privacy_unit"] == "episode"
    assert entry["mechanism"]["steps"] == reply.steps
    assert entry["version"] == 4 and entry["mechanism"]["noise_source"] == "chacha20-box-muller-f64"
    assert 0 < entry["epsilon"] <= node.budget.epsilon
    assert node.ledger.releases() == [entry]
    from member_node.sent_updates import sent_updates

    assert sent_updates(node.identity.state_dir) == {"r1|1": "update"}, "the member's status says it left"
    # the budget the round was planned under is declared, signed, just before it
    declared = node.ledger.entries()[0]
    assert declared["release"] == "budget" and declared["member"] == node.identity.name
    assert declared["budget"] == {"epsilon": node.budget.epsilon, "delta": node.budget.delta}
    assert "budget" not in reply.receipt, "a declaration stays in the ledger; the receipt is the release"
    assert reply.loss != reply.loss, "the un-noised training loss does not leave a DP node"
    assert reply.num_examples == 0, "the dataset size does not leave a DP node either"
    # The dataset is pinned under the member's own key: the coordinator cannot test a guess.
    import hashlib
    import hmac as hmac_lib

    key = bytes.fromhex((node.identity.state_dir / "dataset_fingerprint.key").read_text())
    plain = node.dataset.fingerprint()
    assert plain not in reply.receipt
    prefix, nonce, mac = entry["dataset_fingerprint"].split(":")
    assert prefix == "hmac-sha256" and len(bytes.fromhex(nonce)) == 16
    assert mac == hmac_lib.new(key, bytes.fromhex(nonce) + plain.encode(), hashlib.sha256).hexdigest()
    # A fresh nonce per receipt: the same data never gives the coordinator the same value twice.
    assert node.dataset_fingerprint() != node.dataset_fingerprint()
    assert (node.identity.state_dir / "dataset_fingerprint.key").stat().st_mode & 0o777 == 0o600


def test_the_sample_rate_in_a_receipt_is_the_public_one_not_the_members_size(fresh_node, setup):
    """A rate derived from the member's episodes would tell the coordinator its size (q = B / N)."""
    from privacy.ledger import receipt_from_json
    from shared_model.protocol import TrainDeclined

    _, _, model = setup

    reply = fresh_node.train(TrainRequest(1, ["adapter/emb/so100"], replace(HP, sample_rate=0.3), model, run="q"))
    assert receipt_from_json(reply.receipt)["mechanism"]["sample_rate"] == 0.3
    # A request without one (an older coordinator, privacy.sample_rate=0) is declined, at
    # query too: deriving q from the episode count would reveal it, probing included.
    no_rate = replace(HP, sample_rate=0.0)
    declined = fresh_node.train(TrainRequest(2, ["adapter/emb/so100"], no_rate, model, run="q"))
    assert isinstance(declined, TrainDeclined) and "names no DP sample rate" in declined.reason
    assert fresh_node.query(QueryRequest(2, "q", no_rate)).reason == declined.reason
    assert len(fresh_node.ledger.releases()) == 1


def test_resent_round_is_not_trained_twice(fresh_node, setup):
    from shared_model.protocol import TrainDeclined

    _, _, model = setup
    node = fresh_node
    node.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r1", planned_rounds=2))
    again = node.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r1", planned_rounds=2))
    assert isinstance(again, TrainDeclined) and "already trained" in again.reason
    assert len(node.ledger.releases()) == 1


def test_budget_is_never_exceeded_and_node_declines(setup, tmp_path):
    from shared_model.protocol import TrainDeclined

    cfg, node, model = setup
    tight = MemberNode(cfg, replace(node.identity, state_dir=tmp_path / "s", epsilon=1.0, noise_multiplier=0.8))
    hp = replace(HP, local_steps=40)
    outcomes = [
        tight.train(TrainRequest(r, ["adapter/emb/so100"], hp, model, run="r", planned_rounds=9)) for r in range(1, 10)
    ]
    assert any(isinstance(o, TrainDeclined) for o in outcomes)
    assert tight.epsilon_spent() <= 1.0
    assert tight.query(QueryRequest(10)).epsilon_spent <= 1.0


def test_query_answers_what_train_would_decide_and_records_nothing(setup, tmp_path):
    """A node that would decline the round says so at query, so the coordinator leaves it out
    of the cohorts instead of counting on it (a decline inside a cohort of min_cohort breaks it)."""
    from shared_model.protocol import TrainDeclined

    cfg, node, model = setup
    # No evaluation releases, so the plan gives the whole budget to training.
    member = MemberNode(cfg, replace(node.identity, state_dir=tmp_path / "s", epsilon=1.0, eval_noise_multiplier=0))
    ask = QueryRequest(1, "r", HP, planned_rounds=1)
    assert member.query(ask).can_train and member.query(ask).reason == ""
    assert member.ledger.releases() == [] and not (tmp_path / "s" / "noise_plan.json").exists()
    # The one planned round spends the budget (planned to land just under it) ...
    assert not isinstance(member.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r")), TrainDeclined)
    spent = member.epsilon_spent()
    assert 0.99 < spent <= 1.0
    # ... after which it is out, with the member's reason, both for the same round and for
    # another run (the budget is the member's, over every run).
    for planned in (1, 4):
        for again in (QueryRequest(1, "r", HP, planned), QueryRequest(1, "r2", HP, planned)):
            reply = member.query(again)
            declined = member.train(
                TrainRequest(1, ["adapter/emb/so100"], HP, model, run=again.run, planned_rounds=planned)
            )
            assert not reply.can_train and isinstance(declined, TrainDeclined)
            assert reply.reason == declined.reason
    assert "already trained" in member.query(QueryRequest(1, "r", HP)).reason
    # What is left (under 1%) would need a noise multiplier far above the cap.
    for planned in (1, 4):
        assert "privacy budget nearly exhausted" in member.query(QueryRequest(1, "r2", HP, planned)).reason
    assert member.epsilon_spent() == spent and len(member.ledger.releases()) == 1
    # Without the round's plan (an older coordinator) only an exhausted budget is known.
    assert member.query(QueryRequest(1)).can_train == (spent < 1.0)


def test_restarted_node_keeps_its_ledger(setup, tmp_path):
    cfg, node, model = setup
    ident = replace(node.identity, state_dir=tmp_path / "s")
    first = MemberNode(cfg, ident)
    first.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=3))
    spent = first.epsilon_spent()
    restarted = MemberNode(cfg, ident)
    assert restarted.epsilon_spent() == pytest.approx(spent) and spent > 0
    assert restarted.query(QueryRequest(2)).public_key == first.query(QueryRequest(2)).public_key
    restarted.train(TrainRequest(2, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=3))
    assert restarted.epsilon_spent() > spent and len(restarted.ledger.releases()) == 2


def _store_with(tmp_path, model):
    """A coordinator-side store holding every shard of ``model``."""
    from shared_model.store import ShardStore

    store = ShardStore(tmp_path / "coordinator-store")
    shards: dict[str, dict] = {}
    for name, tensor in model.items():
        shards.setdefault(shard_of(name), {})[name] = tensor
    manifest = {s: store.put_shard(s, t) for s, t in shards.items()}
    return store, manifest, shards


def test_incremental_sync_checks_hashes_and_fetches_only_what_is_missing(fresh_node, setup, tmp_path):
    from coordinator.sync import ModelSync
    from shared_model.protocol import ModelRef

    _, _, model = setup
    node = fresh_node
    store, manifest, shards = _store_with(tmp_path, model)
    everything = {oid: store.object_bytes(oid) for oid in manifest.values()}

    tampered = dict(everything)
    victim = manifest["adapter/shared"]
    tampered[victim] = tampered[victim][:-1] + bytes([tampered[victim][-1] ^ 1])
    with pytest.raises(ProtocolError, match="refused"):
        node.evaluate(EvaluateRequest(0, None, ModelRef(manifest, tampered)))
    partial = {k: v for k, v in everything.items() if k != victim}
    with pytest.raises(ProtocolError, match="neither held nor sent"):
        node.evaluate(EvaluateRequest(0, None, ModelRef(manifest, partial)))

    sync = ModelSync(store)
    sync.manifest = type("M", (), {"shards": manifest})()  # a committed head's shard map
    sync.reported("sony", node.query(QueryRequest(0)).objects)
    first = sync.ref_for("sony")
    reply = node.evaluate(EvaluateRequest.from_content(EvaluateRequest(0, None, first, run="r").to_content()))
    assert reply.released and reply.receipt
    # The node now holds every object; a new version of one shard is the only thing sent.
    new_tensors = {k: v + 1.0 for k, v in shards["adapter/emb/so100"].items()}
    manifest2 = dict(manifest, **{"adapter/emb/so100": store.put_shard("adapter/emb/so100", new_tensors)})
    sync.manifest = type("M", (), {"shards": manifest2})()
    sync.start_round()
    sync.reported("sony", node.query(QueryRequest(1)).objects)
    second = sync.ref_for("sony")
    assert set(second.objects) == {manifest2["adapter/emb/so100"]}
    assert sync.sent_bytes["sony"] == store.object_size(manifest2["adapter/emb/so100"])
    # Re-sent as round 0 of run r: answered from the ledger, so no pacing rule withholds it
    # before the model is loaded (a node that has not trained in a run releases its initial error only).
    assert node.evaluate(EvaluateRequest(0, None, second, run="r")).receipt == reply.receipt
    loaded = node.policy.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in new_tensors.items())
    assert set(node.query(QueryRequest(2)).objects) == set(manifest2.values())  # the old version is dropped


def test_after_training_the_node_holds_the_committed_model_again(setup, tmp_path):
    """Training moves the node's policy; what it evaluates (and trains from) next must be the
    model the request names, even where a shard's committed object did not change (its
    cohort failed, or its aggregate was refused), not the member's own unaggregated update."""
    from shared_model.protocol import ModelRef

    cfg, node, model = setup
    store, manifest, _ = _store_with(tmp_path / "store", model)
    ref = ModelRef(manifest, {oid: store.object_bytes(oid) for oid in manifest.values()})
    plain = replace(node.identity, dp=False)
    member = MemberNode(cfg, replace(plain, state_dir=tmp_path / "m"))
    before = member.evaluate(EvaluateRequest(0, None, ref)).action_mse
    trained = member.train(TrainRequest(1, ["adapter/emb/so100", "adapter/shared"], HP, None, model_ref=ref))
    assert any(d.abs().sum() > 0 for d in trained.deltas.values())
    after = member.evaluate(EvaluateRequest(1, None, ModelRef(manifest, {})))  # nothing changed: nothing sent
    assert after.action_mse == before
    fresh = MemberNode(cfg, replace(plain, state_dir=tmp_path / "f"))
    assert fresh.evaluate(EvaluateRequest(1, None, ref)).action_mse == before


def test_a_corrupt_replica_object_is_dropped_and_its_path_stays_on_the_node(setup, tmp_path, caplog):
    """Bit rot in the node's replica: the reply (the coordinator's) names the shard, not the
    member's file path, and the copy is dropped so the next round's query asks for it again."""
    from shared_model.protocol import ModelRef

    cfg, node, model = setup
    store, manifest, _ = _store_with(tmp_path / "store", model)
    ref = ModelRef(manifest, {oid: store.object_bytes(oid) for oid in manifest.values()})
    plain = replace(node.identity, dp=False, state_dir=tmp_path / "m")
    MemberNode(cfg, plain).evaluate(EvaluateRequest(0, None, ref))
    oid = manifest["adapter/emb/so100"]
    member = MemberNode(cfg, plain)  # the next message's node (a fresh process in deployment)
    path = member.replica.object_path(oid)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="kyodo"), pytest.raises(ProtocolError) as refused:
        member.evaluate(EvaluateRequest(1, None, ModelRef(manifest, {})))
    assert "adapter/emb/so100" in str(refused.value) and "dropped" in str(refused.value)
    assert str(tmp_path) not in str(refused.value) and str(path) in caplog.text
    assert oid not in MemberNode(cfg, plain).query(QueryRequest(2)).objects
    healed = MemberNode(cfg, plain).evaluate(EvaluateRequest(1, None, ModelRef(manifest, {oid: ref.objects[oid]})))
    assert healed.action_mse >= 0


def test_a_long_plan_trains_first_when_evaluations_cannot_all_fit(fresh_node, setup):
    """100 planned rounds: 100 evaluation releases at noise 5 alone exceed epsilon 8, so the
    plan reserves nothing for them and training goes on; releases are then checked one by one."""
    from shared_model.protocol import TrainReply

    _, _, model = setup
    reply = fresh_node.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="long", planned_rounds=100))
    assert isinstance(reply, TrainReply) and reply.steps == HP.local_steps


@pytest.mark.parametrize("fraction", [1e-9, 1 - 1e-9], ids=["nothing-held-out", "nothing-to-train"])
def test_a_dp_node_with_an_empty_side_still_answers_with_noise(tmp_path, fraction):
    """A tiny dataset may split with one side empty. A DP node then answers as usual (noise-
    only steps; the noised error of no episode) instead of failing, which would tell the
    coordinator how few episodes it holds."""
    overrides = [f"data_root={tmp_path}", f"state_root={tmp_path / 'state'}", f"train.held_out_fraction={fraction}"]
    cfg = load_config(model="tiny", overrides=overrides)
    generate_dataset(tmp_path / "sony", "so100", cfg.embodiments["so100"], episodes=3, episode_seconds=2.0, seed=1)
    node = MemberNode(cfg, resolve_identity({"partition-id": 1}, cfg))
    assert min(len(node.train_windows), len(node.held_windows)) == 0
    model = {k: v.clone() for k, v in Policy(cfg.model, cfg.embodiments).state_dict().items()}
    reply = node.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=2))
    assert isinstance(reply, TrainReply) and reply.steps == HP.local_steps and reply.receipt
    assert all(torch.isfinite(d).all() for d in reply.deltas.values())
    assert any(d.abs().max() > 0 for d in reply.deltas.values())  # at least the noise
    released = node.evaluate(EvaluateRequest(1, model, run="r"))
    assert released.receipt and 0.0 <= released.action_mse <= node.identity.eval_loss_bound


def test_an_episode_with_non_finite_values_changes_nothing_the_node_does(setup, tmp_path, caplog):
    """A dataset with one drop-out episode trains and evaluates exactly as the dataset without
    it (before, it made the node refuse every request: a certain tell for that episode). The
    member's log names the episode; the replies do not."""
    import numpy as np
    from parquet_edits import edit_vector, rewrite_parquet

    from member_node.lerobot import ACTION, write_dataset
    from member_node.synthetic import generate_episodes

    cfg, node, model = setup
    emb = cfg.embodiments["so100"]
    episodes = generate_episodes("so100", emb, 10, 2.0, seed=5)
    with_bad = write_dataset(tmp_path / "with", emb, "so100", episodes, task="reach")
    start = sum(e.length for e in episodes[:4])  # episode 4's first frame
    rewrite_parquet(
        with_bad / "data" / "chunk-000" / "file-000.parquet",
        lambda t: edit_vector(t, ACTION, start, np.nan, element=0),
    )
    clean = [replace(e, index=i) for i, e in enumerate(episodes[:4] + episodes[5:])]
    without = write_dataset(tmp_path / "without", emb, "so100", clean, task="reach")

    def run(data_dir, state):
        member = MemberNode(cfg, replace(node.identity, data_dir=data_dir, state_dir=tmp_path / state, dp=False))
        trained = member.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=1))
        return trained, member.evaluate(EvaluateRequest(1, model, run="r")), member

    caplog.set_level("WARNING", logger="kyodo.member")
    (a, a_eval, member), (b, b_eval, _) = run(with_bad, "s1"), run(without, "s2")
    assert member.dataset.dropped == (4,) and "episodes left out: 1 with non-finite values (episode 4)" in caplog.text
    assert (a.steps, a.num_examples, a_eval.action_mse) == (b.steps, b.num_examples, b_eval.action_mse)
    assert all(torch.equal(a.deltas[k], b.deltas[k]) for k in b.deltas)
    # The same for an episode recorded in other units (degrees): left out by its own values.
    degrees = replace(episodes[4], state=episodes[4].state * 57.3, action=episodes[4].action * 57.3)
    in_degrees = write_dataset(
        tmp_path / "degrees", emb, "so100", [*episodes[:4], degrees, *episodes[5:]], task="reach"
    )
    c, c_eval, member = run(in_degrees, "s3")
    assert member.dataset.dropped == (4,) and "1 with values past 5x the embodiment's bounds" in caplog.text
    assert (c.steps, c.num_examples, c_eval.action_mse) == (b.steps, b.num_examples, b_eval.action_mse)
    assert all(torch.equal(c.deltas[k], b.deltas[k]) for k in b.deltas)


def test_the_round_that_runs_is_the_mechanism_its_receipt_records(setup, tmp_path, monkeypatch):
    """What trains (sigma, q, steps, C) is what the ledger says, for a round the budget
    shortens too: a node that trained the requested steps, or another sigma or q, while
    recording the allowed ones would under-count its epsilon."""
    import member_node.node as node_module
    from privacy.accountant import epsilon
    from privacy.ledger import receipt_from_json

    cfg, node, model = setup
    ran = []
    real = node_module.train_shards

    def spy(policy, embodiment, windows, shards, hparams, **kw):
        ran.append((hparams.local_steps, kw["dp"]))
        return real(policy, embodiment, windows, shards, hparams, **kw)

    monkeypatch.setattr(node_module, "train_shards", spy)
    requested = replace(HP, local_steps=20, sample_rate=0.5)
    fits = epsilon([Mechanism(1.3, 0.5, 7)], 1e-5) * 1.0001  # 7 of the 20 steps fit
    own_sigma = replace(node.identity, state_dir=tmp_path / "own", noise_multiplier=1.3, epsilon=fits)
    planned = replace(node.identity, state_dir=tmp_path / "planned")
    for identity in (own_sigma, planned):
        ran.clear()
        member = MemberNode(cfg, identity)
        reply = member.train(TrainRequest(1, ["adapter/emb/so100"], requested, model, run="r", planned_rounds=3))
        recorded = receipt_from_json(reply.receipt)["mechanism"]
        [(steps, dp)] = ran
        assert (steps, dp.noise_multiplier, dp.sample_rate, dp.max_grad_norm) == (
            recorded["steps"], recorded["noise_multiplier"], recorded["sample_rate"], recorded["clipping_norm"],
        )  # fmt: skip
        assert reply.steps == steps
    assert receipt_from_json(reply.receipt)["decision"] == "full"
    assert ran and MemberNode(cfg, own_sigma).ledger.releases()[0]["decision"] == "shortened"
    assert MemberNode(cfg, own_sigma).ledger.releases()[0]["mechanism"]["steps"] == 7


def test_the_noise_plan_leaves_room_for_every_planned_evaluation(setup, tmp_path):
    """Planned over a run's rounds, sigma must leave budget for the held-out error released
    after each of them; planned without that reserve, the last evaluations would not fit."""
    from privacy.accountant import noise_for_target

    cfg, node, model = setup
    member = MemberNode(cfg, replace(node.identity, state_dir=tmp_path / "s"))
    member.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=4))
    sigma = member.ledger.releases()[0]["mechanism"]["noise_multiplier"]
    without_reserve = noise_for_target(
        member.budget.epsilon, member.budget.delta, HP.sample_rate, HP.local_steps, 4, accountant=cfg.privacy.accountant
    )
    with_reserve = noise_for_target(
        member.budget.epsilon, member.budget.delta, HP.sample_rate, HP.local_steps, 4,
        accountant=cfg.privacy.accountant, history=[member.eval_releaser.privacy.mechanism()] * 4,
    )  # fmt: skip
    assert sigma == pytest.approx(with_reserve) and sigma > without_reserve


def test_a_member_that_lowers_its_budget_gets_a_new_noise_plan(setup, tmp_path):
    """The plan is kept across restarts, but only for the budget it was made for: a member
    that lowers its epsilon and restarts must not keep the old, smaller sigma."""
    cfg, node, model = setup
    state = tmp_path / "s"
    first = MemberNode(cfg, replace(node.identity, state_dir=state))
    first.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=4))
    stricter = MemberNode(cfg, replace(node.identity, state_dir=state, epsilon=node.identity.epsilon * 0.8))
    stricter.train(TrainRequest(2, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=4))
    sigmas = [e["mechanism"]["noise_multiplier"] for e in stricter.ledger.releases()]
    assert sigmas[1] > sigmas[0]
    # the ledger says which budget each round was planned under
    kinds = [e["release"] for e in stricter.ledger.entries()]
    assert kinds == ["budget", "dp-sgd", "budget", "dp-sgd"]
    declared = [e["budget"]["epsilon"] for e in stricter.ledger.budgets()]
    assert declared == [node.identity.epsilon, node.identity.epsilon * 0.8]


def test_a_member_spreads_its_budget_over_its_own_rounds_whatever_a_run_plans(setup, tmp_path, capsys):
    """The budget covers every run the node trains. Without ``budget-rounds`` a run the
    coordinator plans as one round gets all of it; with ``budget-rounds=4`` the same run gets
    a sigma planned over four rounds, and later runs over what is left of the four."""
    from privacy.accountant import noise_for_target

    cfg, node, model = setup
    quiet = replace(node.identity, eval_noise_multiplier=0.0)  # no evaluation reserve: sigmas compare exactly

    def sigma_for(identity, state, run):
        member = MemberNode(cfg, replace(identity, state_dir=tmp_path / state))
        member.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run=run, planned_rounds=1))
        return member.ledger.releases()[-1]["mechanism"]["noise_multiplier"]

    def planned(rounds, history=()):
        return noise_for_target(
            quiet.epsilon, quiet.delta, HP.sample_rate, HP.local_steps, rounds,
            accountant=cfg.privacy.accountant, history=list(history),
        )  # fmt: skip

    assert sigma_for(quiet, "coordinators", "short") == pytest.approx(planned(1))
    paced = replace(quiet, budget_rounds=4)
    first = sigma_for(paced, "paced", "short")
    assert first == pytest.approx(planned(4)) and first > planned(1)
    second = sigma_for(paced, "paced", "next")  # a second one-round run: 3 of the member's 4 rounds left
    spent = MemberNode(cfg, replace(paced, state_dir=tmp_path / "paced")).ledger.history()[:1]
    assert second == pytest.approx(planned(3, spent))
    # The member sees its pace beside its spend.
    from member_node.cli import main

    assert main(["status", "--state-dir", str(tmp_path / "paced"), "--plot", str(tmp_path / "eps.png")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "spread over at least 4 training rounds (budget-rounds); 2 trained, 2 to go" in out


def test_budget_rounds_comes_from_the_node_config(setup):
    cfg, _, _ = setup
    node_config = {"member": "x", "embodiment": "agv", "data-dir": "/d"}
    assert resolve_identity({**node_config, "budget-rounds": 12}, cfg).budget_rounds == 12
    assert resolve_identity(node_config, cfg).budget_rounds == 0
    with pytest.raises(NodeConfigError, match="budget-rounds"):
        resolve_identity({**node_config, "budget-rounds": -1}, cfg)


def test_a_node_whose_ledger_was_rolled_back_spends_nothing_more(setup, tmp_path, capsys, monkeypatch):
    """A state directory restored from a backup has a ledger that lacks entries the node
    already released receipts of; its accountant would count less than was spent. The
    coordinator names the newest receipt it holds, and a node that lacks it declines to train
    and withholds its evaluation (query says so first), whatever its budget would allow."""
    from privacy.ledger import entry_hash, receipt_from_json
    from shared_model.protocol import EvaluateReply, QueryReply, TrainDeclined

    cfg, node, model = setup
    identity = replace(node.identity, state_dir=tmp_path / "s")
    member = MemberNode(cfg, identity)
    member.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=8))
    backup = member.ledger.path.read_bytes()  # last night's backup: round 1 only
    reply = member.train(TrainRequest(2, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=8))
    head = entry_hash(receipt_from_json(reply.receipt))
    whole = member.ledger.path.read_bytes()
    member.ledger.path.write_bytes(backup)  # the disk died; the state came back from the backup

    def wire(request, cls):
        return cls.from_content(request.to_content())

    restored = MemberNode(cfg, identity)
    spent = restored.epsilon_spent()
    query = restored.query(wire(QueryRequest(3, "r", HP, 8, ledger_head=head), QueryRequest))
    assert isinstance(query, QueryReply) and not query.can_train and "ledger lacks entry" in query.reason
    declined = restored.train(
        wire(TrainRequest(3, ["adapter/emb/so100"], HP, model, "r", 8, ledger_head=head), TrainRequest)
    )
    assert isinstance(declined, TrainDeclined) and "restored from a backup" in declined.reason
    evaluation = restored.evaluate(wire(EvaluateRequest(3, model, run="r", ledger_head=head), EvaluateRequest))
    assert isinstance(evaluation, EvaluateReply) and evaluation.receipt == "" and "ledger lacks" in evaluation.withheld
    assert restored.epsilon_spent() == spent and len(restored.ledger.releases()) == 1, "nothing was spent"
    # The head it does hold (round 1's) lets it go on; so does a request without one.
    round_one = entry_hash(restored.ledger.releases()[0])
    assert restored.query(QueryRequest(3, "r", HP, 8, ledger_head=round_one)).can_train
    assert restored.query(QueryRequest(3, "r", HP, 8)).can_train
    # The member sees it in `kyodo-member status` (the ledger alone looks whole), until the
    # ledger that holds the entry is back.
    from member_node.cli import main

    monkeypatch.setenv("COLUMNS", "100")
    status = ["status", "--state-dir", str(tmp_path / "s"), "--plot", str(tmp_path / "eps.png")]
    assert main(status) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "ledger rolled back: since " in out and f"named entry {head[:16]}..." in out and "restore the ledger" in out
    seen = json.loads((tmp_path / "s" / "rollback.json").read_text())
    assert seen["first"] <= seen["last"] and seen["missing_entry"] == head
    member.ledger.path.write_bytes(whole)
    assert main(status) == 0 and "rolled back" not in capsys.readouterr().out


def test_a_ledger_head_that_is_not_a_hash_is_refused():
    with pytest.raises(ProtocolError, match="ledger_head"):
        QueryRequest.from_content(QueryRequest(1, "r", HP, 2, ledger_head="nope").to_content())


def test_pacing_counts_training_rounds_replans_when_changed_and_paces_evaluations(setup, tmp_path):
    """Evaluation releases are not training rounds; a member that sets budget-rounds mid-run
    gets a new plan at once; and under budget-rounds a run gets one held-out release per round
    the node trained plus its initial one (more would spend what the pace keeps for later)."""
    from privacy.ledger import RELEASE_EVALUATION, release_of

    cfg, node, model = setup
    state = tmp_path / "s"
    member = MemberNode(cfg, replace(node.identity, state_dir=state, budget_rounds=2))
    member.evaluate(EvaluateRequest(0, model, run="r"))
    member.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=1))
    member.evaluate(EvaluateRequest(1, model, run="r"))
    paced = MemberNode(cfg, replace(node.identity, state_dir=state, budget_rounds=6))
    assert [release_of(e) for e in paced.ledger.releases()] == [RELEASE_EVALUATION, "dp-sgd", RELEASE_EVALUATION]
    assert paced.plans.rounds_to_plan(planned_rounds=1, round_number=2) == 5  # 6 - 1 trained
    paced.train(TrainRequest(2, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=1))
    sigmas = [e["mechanism"]["noise_multiplier"] for e in paced.ledger.releases() if release_of(e) == "dp-sgd"]
    assert sigmas[1] > sigmas[0], "planned again over the member's new rounds, not kept from the old plan"
    assert paced.evaluate(EvaluateRequest(2, model, run="r")).receipt  # round 2 trained: its release is due
    extra = paced.evaluate(EvaluateRequest(3, model, run="r"))  # round 3 was never trained
    assert not extra.receipt and "budget-rounds paces this member" in extra.withheld
    assert paced.evaluate(EvaluateRequest(2, model, run="r")).receipt, "a re-sent request is still answered"
    assert len(paced.ledger.releases()) == 5


def test_budget_rounds_and_a_fixed_noise_multiplier_are_exclusive(setup):
    from shared_model.config import ConfigError

    cfg, _, _ = setup
    node_config = {"member": "x", "embodiment": "agv", "data-dir": "/d", "budget-rounds": 4}
    with pytest.raises(NodeConfigError, match="set one"):
        resolve_identity({**node_config, "noise-multiplier": 1.0}, cfg)
    for bad in ("budget_rounds=-1", "noise_multiplier=1.0"):
        overrides = ["federation.members.0.budget_rounds=4", f"federation.members.0.{bad}"]
        with pytest.raises(ConfigError, match="budget_rounds"):
            load_config(model="tiny", overrides=overrides[1:] if bad.startswith("budget") else overrides)


def test_a_pace_the_noise_cap_cannot_meet_says_to_lower_budget_rounds(setup, tmp_path):
    cfg, node, model = setup
    member = MemberNode(cfg, replace(node.identity, state_dir=tmp_path / "s", budget_rounds=100_000))
    reply = member.query(QueryRequest(1, "r", HP, 4))
    assert (
        not reply.can_train and "budget-rounds 100000 leaves 100000 rounds to spread it over: lower it" in reply.reason
    )
    # It trains no round of that plan, so none is kept room for: its held-out error is released.
    declined = member.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=4))
    assert not isinstance(declined, TrainReply) and "mostly noise" in declined.reason
    assert member.evaluate(EvaluateRequest(1, model, run="r")).receipt


def test_held_out_errors_are_spread_over_the_run_within_the_plans_room_so_training_keeps_its_rounds(
    setup, tmp_path, capsys
):
    """A release spends the same budget as training: the node makes room for as many as cost
    training little (privacy.budget.plan_noise) and withholds the rest, so its pace's training
    rounds still fit. Expensive releases (noise multiplier 2) over a 20-round pace get room for
    a few, spread evenly over the run with the last at its last round (taken first come, first
    served, a long run released its first ones and withheld its final model's)."""
    from member_node.release_schedule import ReleaseSchedule

    cfg, node, model = setup
    identity = replace(node.identity, state_dir=tmp_path / "s", budget_rounds=20, eval_noise_multiplier=2.0)
    member = MemberNode(cfg, identity)
    assert member.evaluate(EvaluateRequest(0, model, run="r")).receipt, "the initial one: nothing planned yet"
    released, reasons = [], set()
    for rnd in range(1, 21):
        trained = member.train(TrainRequest(rnd, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=20))
        assert isinstance(trained, TrainReply), (rnd, trained)
        reply = member.evaluate(EvaluateRequest(rnd, model, run="r"))
        if reply.receipt:
            released.append(rnd)
        else:
            reasons.add(reply.withheld.split(":")[0])
    (plan,) = json.loads((tmp_path / "s" / "noise_plan.json").read_text()).values()
    assert (plan["rounds"], plan["first_round"], plan["run"]) == (20, 1, "r")
    assert 0 < plan["evaluations"] < 20, plan
    schedule = ReleaseSchedule.of_plan(plan)
    assert len(released) == plan["evaluations"] == schedule.releases and released[-1] == 20
    gaps = [b - a for a, b in zip([0, *released], released, strict=False)]
    assert max(gaps) - min(gaps) <= 1, f"evenly spread: {released}"
    assert reasons == {"this node spreads its held-out errors over the run"}
    assert [e["decision"] for e in member.ledger.releases() if e["release"] == "dp-sgd"] == ["full"] * 20
    assert member.epsilon_spent() <= identity.epsilon
    assert member.evaluate(EvaluateRequest(released[0], model, run="r")).receipt, "a re-sent request is answered"
    # The member reads how in its status.
    from member_node.cli import main

    assert main(["status", "--state-dir", str(tmp_path / "s"), "--plot", str(tmp_path / "eps.png")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    room = plan["evaluations"]
    assert f"over 20 training rounds from round 1, with room for {room} held-out errors beside them" in out
    assert f"{room} of them in this run, spread over rounds 1-20, the last at its last round" in out


def test_kyodo_member_plan_shows_what_the_node_then_does(setup, tmp_path):
    """The plan's row for the node's own pace is the node's: its noise, and the epsilon after
    the run's initial held-out error and first round (the review that asked for this found the
    plan 6% low on noise and 24% low on that epsilon: it left the initial release out)."""
    from member_node.budget_plan import PlanSettings, pace_rows
    from privacy.budget import Budget

    cfg, node, model = setup
    identity = replace(node.identity, state_dir=tmp_path / "s", budget_rounds=10, eval_noise_multiplier=2.0)
    settings = PlanSettings(
        budget=Budget(identity.epsilon, identity.delta), budget_rounds=10, evaluation=identity.eval_privacy().mechanism(),
        accountant=cfg.privacy.accountant, sample_rate=HP.sample_rate, local_steps=HP.local_steps, run_rounds=4,
        max_noise_multiplier=cfg.privacy.max_noise_multiplier,
    )  # fmt: skip
    (row,) = [r for r in pace_rows(settings, [], trained=0) if r.node_uses]
    member = MemberNode(cfg, identity)
    member.evaluate(EvaluateRequest(0, model, run="r"))
    member.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=4))
    member.evaluate(EvaluateRequest(1, model, run="r"))
    trained = [e for e in member.ledger.releases() if e["release"] == "dp-sgd"]
    assert row.spread == 10 and trained[0]["mechanism"]["noise_multiplier"] == pytest.approx(row.noise_multiplier)
    assert member.epsilon_spent() == pytest.approx(row.epsilon_first_round)


def test_the_room_for_releases_is_the_plan_training_uses_after_a_budget_change_and_back(setup, tmp_path):
    """A member that lowers its budget and restores it trains with its first plan again; the
    releases are then judged by that plan, not by the newer one, and every round of the pace
    trains (judged by the newest plan, a review measured 8 of 10)."""
    cfg, node, model = setup
    state = tmp_path / "s"
    paced = replace(node.identity, state_dir=state, budget_rounds=10, eval_noise_multiplier=2.0)
    member = MemberNode(cfg, paced)
    member.evaluate(EvaluateRequest(0, model, run="r"))
    for rnd in range(1, 11):
        epsilon = 6.0 if rnd == 3 else paced.epsilon
        member = MemberNode(cfg, replace(paced, epsilon=epsilon))  # a restart with the budget of the day
        reply = member.train(TrainRequest(rnd, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=10))
        assert reply.receipt, (rnd, getattr(reply, "reason", ""))
        member.evaluate(EvaluateRequest(rnd, model, run="r"))
    trained = [e for e in member.ledger.releases() if e["release"] == "dp-sgd"]
    assert [e["decision"] for e in trained] == ["full"] * 10
    assert member.epsilon_spent() <= paced.epsilon


def test_evaluation_off_and_plans_from_before_rooms_release_as_before(setup, tmp_path):
    from member_node.release_plan import NOISE_PLAN_FILE, plan_key

    cfg, node, model = setup
    silent = MemberNode(cfg, replace(node.identity, state_dir=tmp_path / "off", eval_noise_multiplier=0.0))
    silent.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=4))
    assert "releases no held-out error" in silent.evaluate(EvaluateRequest(1, model, run="r")).withheld
    # A plan file written before plans were records: a bare noise multiplier, used as it is.
    state = tmp_path / "legacy"
    member = MemberNode(cfg, replace(node.identity, state_dir=state))
    evaluations = member.eval_releaser.privacy
    depends_on = (
        HP.sample_rate, HP.local_steps, member.budget.epsilon, member.budget.delta, cfg.privacy.accountant,
        evaluations.mechanism(), member.identity.budget_rounds,
    )  # fmt: skip
    (state / NOISE_PLAN_FILE).write_text(json.dumps({plan_key("r", depends_on): 2.5}))
    member.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=4))
    assert member.ledger.releases()[-1]["mechanism"]["noise_multiplier"] == 2.5
    assert member.evaluate(EvaluateRequest(1, model, run="r")).receipt


def test_without_a_pace_rounds_after_the_runs_last_are_not_kept_for(setup, tmp_path):
    """A member left out of most of a 40-round run, without budget-rounds: nothing trains after
    the run's last round, so its final held-out error is released; before, the 39 rounds it
    never got were kept for and it was withheld."""
    cfg, node, model = setup
    member = MemberNode(cfg, replace(node.identity, state_dir=tmp_path / "s", eval_noise_multiplier=2.0))
    member.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=40))
    for rnd in range(1, 4):  # the plan's few releases (this noise is dear) fall later in the run
        assert not member.evaluate(EvaluateRequest(rnd, model, run="r")).receipt
    last = member.evaluate(EvaluateRequest(40, model, run="r"))
    assert last.receipt, last.withheld
    assert member.epsilon_spent() <= member.budget.epsilon


def test_a_coordinator_cannot_drain_the_budget_with_releases_of_runs_the_node_never_trained_in(setup, tmp_path):
    """Run names and round numbers are the coordinator's words. A review drained a paced node
    from epsilon 2.44 to 7.97 with 58 held-out error requests, each under a fresh run name,
    and then the node could not train; without a pace, 55 requests for rounds past the run's
    last did the same. A run the node has not trained in now gets its initial release only,
    one such run at a time since the node last trained, and no round past a run's planned
    ones is released."""
    cfg, node, model = setup
    member = MemberNode(cfg, replace(node.identity, state_dir=tmp_path / "paced", budget_rounds=40))
    member.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=1))
    assert member.evaluate(EvaluateRequest(1, model, run="r")).receipt
    spent = member.epsilon_spent()
    replies = [member.evaluate(EvaluateRequest(0, model, run=f"probe{k}")) for k in range(20)]
    assert [bool(reply.receipt) for reply in replies] == [True] + [False] * 19
    assert "one run's initial release at a time" in replies[1].withheld
    again = member.evaluate(EvaluateRequest(1, model, run="probe0"))
    assert not again.receipt and "has not trained in run probe0" in again.withheld
    assert member.evaluate(EvaluateRequest(0, model, run="probe0")).receipt, "a re-sent request is still answered"
    released = [e for e in member.ledger.releases() if e["release"] == "evaluation"]
    assert len(released) == 2 and member.epsilon_spent() < spent + 0.5
    # Once the node trains again, the next run's initial release is due (how a new run starts).
    member.train(TrainRequest(2, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=1))
    assert member.evaluate(EvaluateRequest(0, model, run="next")).receipt

    unpaced = MemberNode(cfg, replace(node.identity, state_dir=tmp_path / "unpaced"))
    unpaced.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=10))
    late = unpaced.evaluate(EvaluateRequest(1000, model, run="r"))
    assert not late.receipt and "round 1000 is past the 10 rounds run r was planned with" in late.withheld
    assert unpaced.evaluate(EvaluateRequest(10, model, run="r")).receipt, "the run's last round is released"
    with pytest.raises(ProtocolError, match="round must be >= 0"):
        EvaluateRequest.from_content(EvaluateRequest(-1, model, run="r").to_content())


def test_under_a_pace_a_new_runs_initial_release_leaves_room_for_the_paces_training(setup, tmp_path):
    """The initial release of a run the node has not trained in is judged by the newest plan,
    whichever run made it: under a pace that plan still holds the pace's training rounds. At a
    release noise of 1 a release is too dear for the plan to make room for any."""
    cfg, node, model = setup
    identity = replace(node.identity, state_dir=tmp_path / "s", budget_rounds=40, eval_noise_multiplier=1.0)
    member = MemberNode(cfg, identity)
    assert member.evaluate(EvaluateRequest(0, model, run="r")).receipt, "nothing planned yet: it fits the budget"
    member.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=4))
    (plan,) = json.loads((tmp_path / "s" / "noise_plan.json").read_text()).values()
    assert plan["evaluations"] == 0
    fresh = member.evaluate(EvaluateRequest(0, model, run="another"))
    assert not fresh.receipt and "training comes first" in fresh.withheld, fresh.withheld


def test_a_release_with_no_training_left_to_keep_room_for_says_it_is_over_the_budget(setup, tmp_path):
    """With no training round left in the plan, "too little for the 0 training rounds" named
    the wrong reason (a walkthrough): the release alone would overspend."""
    cfg, node, model = setup
    member = MemberNode(cfg, replace(node.identity, state_dir=tmp_path / "s", eval_noise_multiplier=0.3))
    member.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=1))
    reply = member.evaluate(EvaluateRequest(1, model, run="r"))
    assert not reply.receipt and "over the member's budget 8" in reply.withheld, reply.withheld
    assert "training rounds" not in reply.withheld


def test_a_consortium_file_the_node_cannot_read_stops_it_with_the_reason(setup, tmp_path):
    cfg, node, _ = setup
    missing = tmp_path / "consortium.yaml"
    with pytest.raises(NodeConfigError, match="node config 'consortium-file'"):
        MemberNode(cfg, replace(node.identity, state_dir=tmp_path / "s", consortium_file=str(missing)))
    missing.write_text("format: kyodo-consortium\nversion: 1\nmembers: []\n")
    with pytest.raises(NodeConfigError, match="consortium-file"):
        MemberNode(cfg, replace(node.identity, state_dir=tmp_path / "s", consortium_file=str(missing)))


@pytest.mark.parametrize("attack", ["fresh-run-each-round", "re-plan-each-round"])
def test_a_coordinators_run_names_and_hyper_parameters_cannot_cost_a_node_its_training(setup, tmp_path, attack):
    """A review's two ways to spend a node's budget on held-out error releases (release noise
    2: the plan has room for one in 20 rounds): without a pace, a fresh run's initial release
    after every training round cut 20 promised rounds to 8; under a pace, nudging the sample
    rate and planned rounds re-made the plan every round, and each new plan's schedule released
    again (4 releases, 25% more noise). Both now train every round and release the room's one."""
    from privacy.ledger import release_of

    cfg, node, model = setup
    paced = attack == "re-plan-each-round"
    identity = replace(node.identity, state_dir=tmp_path / "s", eval_noise_multiplier=2.0, budget_rounds=20 * paced)
    member = MemberNode(cfg, identity)
    for rnd in range(1, 21):
        hparams = replace(HP, sample_rate=round(0.8 - 0.001 * rnd, 4)) if paced else HP
        planned = rnd if paced else 20
        trained = member.train(
            TrainRequest(rnd, ["adapter/emb/so100"], hparams, model, run="r", planned_rounds=planned)
        )
        assert isinstance(trained, TrainReply), (rnd, trained)
        member.evaluate(EvaluateRequest(rnd, model, run="r"))
        if not paced:
            member.evaluate(EvaluateRequest(0, model, run=f"probe{rnd}"))
    kinds = [release_of(e) for e in member.ledger.releases()]
    assert kinds.count("dp-sgd") == 20 and kinds.count("evaluation") <= 2, kinds
    assert member.epsilon_spent() <= identity.epsilon


def test_objects_of_a_refused_request_do_not_stay_in_the_replica(fresh_node):
    """A review's 8 refused requests, each with well-formed objects of the wrong tensors, left
    112 MiB in the replica, listed in every later query reply."""
    import hashlib

    from shared_model.protocol import ModelRef
    from shared_model.store import serialize_shard

    node = fresh_node
    held = set(node.replica.objects())
    for attempt in range(3):
        objects, manifest = {}, {}
        for shard in sorted(node.layout.shards):
            data = serialize_shard(shard, {"junk": torch.randn(64) + attempt})
            manifest[shard] = hashlib.sha256(data).hexdigest()
            objects[manifest[shard]] = data
        with pytest.raises(ProtocolError):
            node.evaluate(EvaluateRequest(0, model=None, run="r", model_ref=ModelRef(manifest, objects)))
    assert set(node.replica.objects()) == held


def test_a_run_model_this_machine_cannot_hold_is_refused_before_it_is_built():
    """The model comes with the coordinator's run config: a review's query naming the
    trillion-parameter preset made a node allocate until the kernel stopped it."""
    from member_node.node import check_model_fits

    with pytest.raises(NodeConfigError, match=r"'trillion' needs \d+\.\d GiB of float32 weights"):
        check_model_fits(load_config(model="trillion"))
    check_model_fits(load_config(model="tiny"))
    with pytest.raises(NodeConfigError, match="this node does not build it"):
        check_model_fits(load_config(model="tiny"), memory_bytes=1 << 20)


def test_the_members_own_accountant_and_limits_replace_the_runs(setup, tmp_path, caplog):
    """The accountant decides what the member's epsilon means, the limits which rounds it
    trains: a member that pinned them in its node config keeps them whatever a run asks."""
    from privacy.ledger import receipt_from_json

    cfg, node, model = setup
    run_asks_prv = replace(cfg, privacy=replace(cfg.privacy, accountant="prv", max_noise_multiplier=50.0, min_steps=1))
    own = replace(node.identity, state_dir=tmp_path / "own", accountant="rdp", max_noise_multiplier=3.0, min_steps=2)
    member = MemberNode(run_asks_prv, own)
    assert member.privacy_overrides == {
        "accountant": ("rdp", "prv"),
        "max_noise_multiplier": (3.0, 50.0),
        "min_steps": (2, 1),
    }
    with caplog.at_level("INFO", logger="kyodo.member"):
        reply = member.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r", planned_rounds=4))
    assert receipt_from_json(reply.receipt)["accountant"] == "rdp"
    assert "under its own accountant rdp (the run asks prv)" in caplog.text
    assert json.loads((own.state_dir / "member.json").read_text())["accountant"] == "rdp"
    # Its own cap, not the run's 50, decides when an update would be mostly noise.
    paced = MemberNode(run_asks_prv, replace(own, state_dir=tmp_path / "paced", budget_rounds=1000))
    declined = paced.query(QueryRequest(1, "r", HP, 4))
    assert not declined.can_train and "the member's max-noise-multiplier 3" in declined.reason
    # Unset, the run's settings hold, and nothing is logged about them.
    follows = MemberNode(run_asks_prv, replace(node.identity, state_dir=tmp_path / "follows"))
    assert follows.privacy_overrides == {} and follows.cfg.privacy.accountant == "prv"


def test_the_members_own_privacy_settings_come_from_its_node_config(setup):
    cfg, _, _ = setup
    base = {"member": "x", "embodiment": "so100", "data-dir": "/d"}
    ident = resolve_identity({**base, "accountant": "prv", "max-noise-multiplier": 4.0, "min-steps": 3}, cfg)
    assert (ident.accountant, ident.max_noise_multiplier, ident.min_steps) == ("prv", 4.0, 3)
    assert resolve_identity({**base, "accountant": ""}, cfg).privacy_settings(cfg.privacy) == cfg.privacy
    for key, value, match in (
        ("accountant", "gdp", "'accountant' 'gdp' is not one of rdp, prv"),
        ("max-noise-multiplier", -1.0, "'max-noise-multiplier' must be a positive number"),
        ("max-noise-multiplier", float("nan"), "'max-noise-multiplier' must be a positive number"),
        ("min-steps", -2, "'min-steps' must be >= 0"),
    ):
        with pytest.raises(NodeConfigError, match=match):
            resolve_identity({**base, key: value}, cfg)


def test_a_node_without_dp_sends_coarse_counts_as_its_query_promises(setup, tmp_path):
    """Its train reply's weight (and the signed advert carrying it) and its held-out count were
    exact: a review read 102 + 72 / 4 = 120 episodes off them while the query said 100."""
    cfg, node, model = setup
    generate_dataset(tmp_path / "data", "so100", cfg.embodiments["so100"], episodes=37, episode_seconds=2.0, seed=5)
    open_node = MemberNode(cfg, replace(node.identity, state_dir=tmp_path / "s", data_dir=tmp_path / "data", dp=False))
    trained, _ = map(len, open_node._split)
    held = cfg.train.eval_windows_per_episode * len(open_node._split[1])  # windows evaluated
    assert trained % 10 and held % 10, "exact counts the test can tell from coarse ones"
    reply = open_node.train(TrainRequest(1, ["adapter/emb/so100"], HP, model, run="r"))
    assert reply.num_examples == coarse_count(trained) == trained // 10 * 10
    evaluation = open_node.evaluate(EvaluateRequest(1, model, run="r"))
    assert evaluation.num_examples == coarse_count(held) and evaluation.action_mse > 0


def test_a_fault_of_the_node_is_not_declined_as_a_spent_budget(setup, tmp_path):
    """Any ValueError while planning the noise read as 'privacy budget exhausted', with the
    fault's own text, in a reply the coordinator signs into its records: a corrupt
    noise_plan.json did. Only an unreachable epsilon declines; a fault fails the request
    (the ClientApp answers with its type name and logs it on the node)."""
    from member_node.release_plan import NOISE_PLAN_FILE

    cfg, node, _ = setup
    member = MemberNode(cfg, replace(node.identity, state_dir=tmp_path / "s"))
    (tmp_path / "s" / NOISE_PLAN_FILE).write_text('{"r|\x01": ')
    with pytest.raises(json.JSONDecodeError):
        member.query(QueryRequest(1, "r", HP, 4))
    spent = MemberNode(cfg, replace(node.identity, state_dir=tmp_path / "t", epsilon=1e-3))
    reply = spent.query(QueryRequest(1, "r", replace(HP, local_steps=50), 4))
    assert not reply.can_train and reply.reason.startswith("privacy budget")
