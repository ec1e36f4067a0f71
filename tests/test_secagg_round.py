"""A whole SecAgg+ round between real member nodes (real data, DP training, on-disk state)
and the coordinator's SecAggServer, every message through its wire form (to_content /
from_content). The Flower transport itself is covered by the end-to-end tests; here every
dropout stage can be forced deterministically."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from safetensors.numpy import load_file

from aggregation.secagg.errors import SecAggError
from aggregation.secagg.server import SecAggServer, build_setup
from aggregation.secagg.vectors import flatten_shard, shard_length
from coordinator.planner import MemberInfo, plan_round
from coordinator.secure_round import mean_update
from member_node.identity import resolve_identity
from member_node.node import MemberNode
from member_node.synthetic import generate_dataset
from privacy.keys import public_key_hex
from shared_model.config import load_config
from shared_model.policy import Policy
from shared_model.protocol import (
    ConsistencyReply,
    ConsistencyRequest,
    MaskedInputReply,
    MaskedInputRequest,
    ProtocolError,
    QueryReply,
    QueryRequest,
    SecAggSetup,
    ShareKeysReply,
    ShareKeysRequest,
    TrainHyperParams,
    TrainReply,
    TrainRequest,
    UnmaskReply,
    UnmaskRequest,
)
from shared_model.shards import ShardLayout

RUN = "secagg-test"
HP = TrainHyperParams(
    lr=0.01, local_steps=3, batch_size=6, weight_decay=0.0, seed=0, max_grad_norm=0.1, sample_rate=0.75
)
# Every embodiment has two owners, so every shard's cohort has at least two members and
# every update leaves its node masked (a cohort of one is covered separately below).
EMBODIMENTS = {"honda": "aloha", "sony": "so100", "softbank": "so100", "fanuc": "aloha"}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("secagg")
    overrides = [f"data_root={root / 'data'}", f"state_root={root / 'state'}"]
    overrides += [f"federation.members.{i}.embodiment={e}" for i, e in enumerate(EMBODIMENTS.values())]
    cfg = load_config(model="tiny", overrides=overrides)
    for m in cfg.federation.members:
        generate_dataset(root / "data" / m.name, m.embodiment, cfg.embodiments[m.embodiment], 10, 2.0, m.seed)
    nodes = {
        m.name: MemberNode(cfg, resolve_identity({"partition-id": i}, cfg))
        for i, m in enumerate(cfg.federation.members)
    }
    model = {k: v.clone() for k, v in Policy(cfg.model, cfg.embodiments).state_dict().items()}
    return cfg, nodes, model


def _wire(obj, cls):
    """Through the wire form, as the transport would carry it."""
    return cls.from_content(obj.to_content())


class Round:
    """Drives one round; ``drop`` maps a member to the stage at which it vanishes."""

    def __init__(
        self, cfg, nodes, model, round_number: int, drop: dict[str, str] | None = None, members=None, run: str = RUN
    ):
        self.cfg, self.nodes, self.model, self.round, self.run_name = cfg, nodes, model, round_number, run
        self.drop = drop or {}
        names = members or sorted(nodes)
        infos = [MemberInfo(i, n, (nodes[n].identity.embodiment,), 10) for i, n in enumerate(names)]
        self.plan = plan_round(
            round_number, infos, n_layers=cfg.model.n_layers, n_experts=cfg.model.n_experts,
            embodiments=sorted(cfg.embodiments), min_cohort=2, experts_per_member=2,
        )  # fmt: skip
        self.layout = ShardLayout.from_config(cfg.model, cfg.embodiments)
        self.shapes = {
            shard: {s.name: tuple(s.shape) for s in self.layout.shards[shard] if ".lora_A." not in s.name}
            for shard in self.plan.cohorts
        }
        self.setup = build_setup(self.plan.cohorts, bits=20, clip_range=1.0, graph_seed=b"graph-seed-test!")
        self.server = SecAggServer(run, round_number, self.setup, {s: shard_length(v) for s, v in self.shapes.items()})
        self.received: list[RecordDict] = []  # every payload the coordinator receives
        self.plaintext: dict[str, dict[str, np.ndarray]] = {}
        self.weights: dict[str, float] = {}
        self.masked: dict[str, MaskedInputReply] = {}  # what the coordinator received at stage 3

    def _answer(self, member: str, stage: str, request, handler, reply_cls):
        if self.drop.get(member) == stage:
            return None
        content = handler(self.nodes[member], type(request).from_content(request.to_content())).to_content()
        self.received.append(content)
        return reply_cls.from_content(content)

    def run(self):
        for member in self.plan.members:
            request = TrainRequest(
                self.round,
                self.plan.shards_of(member),
                HP,
                self.model,
                run=self.run_name,
                planned_rounds=100,
                secagg=self.setup,
            )
            reply = self._answer(member, "train", request, MemberNode.train, TrainReply)
            if reply is None:
                continue
            assert not reply.deltas, "under secure aggregation no plaintext delta leaves the node"
            node = self.nodes[member]
            # The member's own disk (the test peeks; the coordinator cannot).
            stored = node.secagg.root / self.run_name / f"r{self.round}" / "update.safetensors"
            self.plaintext[member] = load_file(str(stored))
            # DP nodes withhold their size (0): the coordinator then weighs everyone equally
            self.weights[member] = float(reply.num_examples or 1)
            self.server.add_advert(member, reply.advert, public_key_hex(node.signing_key), self.weights[member])
        for member, request in self.server.share_keys_requests().items():
            reply = self._answer(member, "share_keys", request, MemberNode.share_keys, ShareKeysReply)
            if reply is not None:
                self.server.add_shares(reply)
        for member, request in self.server.masked_input_requests().items():
            reply = self._answer(member, "masked_input", request, MemberNode.masked_input, MaskedInputReply)
            if reply is not None:
                self.masked[member] = reply
                self.server.add_masked(reply)
        for member, request in self.server.consistency_requests().items():
            reply = self._answer(member, "consistency", request, MemberNode.consistency, ConsistencyReply)
            if reply is not None:
                self.server.add_consistency(reply)
        for member, request in self.server.unmask_requests().items():
            reply = self._answer(member, "unmask", request, MemberNode.unmask, UnmaskReply)
            if reply is not None:
                self.server.add_unmask(reply)
        return self.server.finish()

    def expected_mean(self, shard: str, contributors: list[str]) -> np.ndarray:
        total = sum(self.weights[m] * self.plaintext[m][shard].astype(np.float64) for m in contributors)
        return total / sum(self.weights[m] for m in contributors)


def _tolerance(cohort: int) -> float:
    return 2 * cohort * 2.0 / (2**20 - 1)  # n members x one quantization step (2R / levels) each, x2 slack


def test_secure_mean_equals_plaintext_mean_and_nothing_individual_is_received(federation):
    cfg, nodes, model = federation
    rnd = Round(cfg, nodes, model, 1)
    sums = rnd.run()
    assert set(sums) == set(rnd.plan.cohorts), rnd.server.skipped
    for shard, outcome in sums.items():
        assert outcome.secure and sorted(outcome.contributors) == sorted(rnd.plan.cohorts[shard])
        mean = outcome.total / outcome.weight
        np.testing.assert_allclose(mean, rnd.expected_mean(shard, outcome.contributors), atol=_tolerance(4))
        tensors = mean_update(outcome, rnd.shapes[shard])
        assert set(tensors) == set(rnd.shapes[shard])
    # Item 5: no received payload equals or correlates with any member's plaintext update.
    checked = 0
    for content in rnd.received:
        for record in content.array_records.values():
            for _, array in record.items():
                payload = array.numpy().astype(np.float64)
                for member, vectors in rnd.plaintext.items():
                    for vec in vectors.values():
                        if vec.shape != payload.shape or vec.size < 100:
                            continue
                        assert not np.array_equal(payload, vec)
                        # An independent payload gives r of variance 1/n, but r is a weighted sum
                        # of the payload's entries with weights from the update, and an update whose
                        # mass sits in a few entries makes that sum far from Gaussian (a CI run saw
                        # 5.08 "sigma" from a mask drawn by a CSPRNG). Its effective number of terms,
                        # the participation ratio (sum v^2)^2 / sum v^4, sets the scale instead;
                        # 5 of those still leaves no room for a real relation (unmasked: r ~ 1).
                        v = vec.astype(np.float64)
                        r = np.corrcoef(payload, v)[0, 1]
                        n_eff = float(np.sum(v * v) ** 2 / max(np.sum(v**4), 1e-300))
                        bound = 5 / np.sqrt(n_eff)
                        assert abs(r) < min(bound, 0.5), (
                            f"a payload correlates with {member}'s update (r={r:.3f}, n_eff {n_eff:.0f})"
                        )
                        checked += vec.size >= 4000
    assert checked > 0
    # The node forgot the round: no key, seed or update left on disk.
    for node in nodes.values():
        assert not (node.secagg.root / RUN / "r1").exists()


@pytest.mark.parametrize("stage", ["train", "share_keys", "masked_input", "consistency", "unmask"])
def test_one_member_drops_at_any_stage(federation, stage):
    cfg, nodes, model = federation
    stages = ["train", "share_keys", "masked_input", "consistency", "unmask"]
    rnd = Round(cfg, nodes, model, 10 + stages.index(stage), {"sony": stage})
    sums = rnd.run()
    # What sony's own status will say it sent: its masked update left only if it got that far.
    from member_node.private_eval import release_key
    from member_node.sent_updates import sent_updates

    left = {m: release_key(RUN, rnd.round) in sent_updates(nodes[m].identity.state_dir) for m in rnd.plan.members}
    assert left["sony"] == (stage in ("consistency", "unmask")) and all(v for m, v in left.items() if m != "sony")
    for shard, cohort in rnd.plan.cohorts.items():
        if "sony" in cohort and len(cohort) == 2:
            # A pair cannot lose a member: the partner's sum alone would be its update, and
            # after the masked input its self-mask seed's only share holder is gone.
            assert shard not in sums and shard in rnd.server.skipped
            if stage in ("masked_input", "consistency"):
                # The holders' rule is what lost it, not missing shares: the reason says so.
                reason = rnd.server.skipped[shard]
                assert "of its 2 members signed the survivor set" in reason and "masked input from" in reason, reason
                assert "holders reveal shares only when 2 did" in reason
            continue
        assert shard in sums, (shard, rnd.server.skipped)
        outcome = sums[shard]
        expected_in = stage in ("consistency", "unmask")  # its masked input was in before it vanished
        assert ("sony" in outcome.contributors) == (expected_in and "sony" in cohort)
        np.testing.assert_allclose(
            outcome.total / outcome.weight, rnd.expected_mean(shard, outcome.contributors), atol=_tolerance(4)
        )


def test_too_many_dropouts_skip_the_shard_and_nothing_else(federation):
    cfg, nodes, model = federation
    # Complete graph of 4, threshold 2: with two vanishing after their masked input, each
    # remaining member's self-mask seed has one share holder left, below the threshold, so the
    # 4-member cohort's shards are skipped; the honda/fanuc pair is untouched and recovered.
    drop = {"sony": "unmask", "softbank": "unmask"}
    rnd = Round(cfg, nodes, model, 20, drop)
    sums = rnd.run()
    for shard, cohort in rnd.plan.cohorts.items():
        if len(cohort) == 4:
            assert shard not in sums and "threshold" in rnd.server.skipped[shard]
    assert "adapter/emb/aloha" in sums
    assert sorted(sums["adapter/emb/aloha"].contributors) == ["fanuc", "honda"]


def test_a_round_of_cohorts_of_one_leaves_no_secrets_behind(federation):
    """No consistency or unmask stage follows a round whose every cohort is a member alone, so
    its round keys would wait on disk for the node's next round (a walkthrough found them)."""
    cfg, nodes, model = federation
    rnd = Round(cfg, nodes, model, 1, members=["honda"], run="secagg-singles")
    sums = rnd.run()
    assert sums and all(not s.secure for s in sums.values())
    assert not (nodes["honda"].secagg.root / "secagg-singles" / "r1").exists()


def test_a_cohort_of_one_is_marked_not_secure(federation):
    cfg, nodes, model = federation
    rnd = Round(cfg, nodes, model, 30, members=["honda", "sony", "softbank"])
    sums = rnd.run()
    assert sums["adapter/emb/aloha"].secure is False  # honda alone owns aloha here
    assert sums["adapter/shared"].secure is True


def test_a_member_that_requires_secure_aggregation_declines_rounds_that_would_send_its_update_bare(
    federation, tmp_path
):
    """Whether a round is masked and who shares a cohort are the coordinator's choices: a node
    with require-secagg declines, spending nothing, a round without secure aggregation or one
    that puts it alone or with one other member in a cohort (the other could subtract its own
    update), except for its own embodiment adapter."""
    from dataclasses import replace

    from shared_model.protocol import TrainDeclined

    cfg, nodes, model = federation
    strict = MemberNode(cfg, replace(nodes["honda"].identity, state_dir=tmp_path / "honda", require_secagg=True))
    bare = strict.train(TrainRequest(1, ["adapter/shared"], HP, model, run=RUN, planned_rounds=100))
    assert isinstance(bare, TrainDeclined) and "the round has none" in bare.reason
    alone = build_setup({"adapter/shared": ["honda"], "adapter/emb/aloha": ["honda"]}, bits=20, clip_range=1.0,
                        graph_seed=b"graph-seed-test!")  # fmt: skip
    request = TrainRequest(2, ["adapter/shared"], HP, model, run=RUN, planned_rounds=100, secagg=alone)
    declined = strict.train(_wire(request, TrainRequest))
    assert isinstance(declined, TrainDeclined) and "alone in the cohort of adapter/shared" in declined.reason
    assert strict.ledger.releases() == [], "nothing was spent"
    pair = build_setup({"adapter/shared": ["honda", "sony"]}, bits=20, clip_range=1.0, graph_seed=b"graph-seed-test!")
    request = TrainRequest(2, ["adapter/shared"], HP, model, run=RUN, planned_rounds=100, secagg=pair)
    declined = strict.train(_wire(request, TrainRequest))
    assert isinstance(declined, TrainDeclined) and "in a cohort of two" in declined.reason, declined
    assert strict.ledger.releases() == [], "nothing was spent"
    own = TrainRequest(3, ["adapter/emb/aloha"], HP, model, run=RUN, planned_rounds=100, secagg=alone)
    assert isinstance(strict.train(_wire(own, TrainRequest)), TrainReply), "its own robot's adapter may go alone"


def test_node_answers_unmask_once_and_refuses_inconsistent_requests(federation):
    cfg, nodes, model = federation
    rnd = Round(cfg, nodes, model, 40, {"honda": "unmask", "sony": "unmask", "softbank": "unmask", "fanuc": "unmask"})
    rnd.run()
    requests = rnd.server.unmask_requests()
    node = nodes["sony"]
    # A survivor set is signed once: a second one would let a coordinator show two.
    with pytest.raises(ProtocolError, match="consistency: already answered"):
        node.consistency(_wire(rnd.server.consistency_requests()["sony"], ConsistencyRequest))
    # Unmask reveals for the set it signed, never another.
    other = _wire(requests["sony"], UnmaskRequest)
    other.survivors, other.dropped = ["honda", "softbank", "sony"], ["fanuc"]
    with pytest.raises(ProtocolError, match="survivors differ from the set this node signed"):
        node.unmask(other)
    assert node.unmask(_wire(requests["sony"], UnmaskRequest)).shares, "a refused request left it answerable"
    assert not (node.secagg.root / RUN / "r40").exists(), "and once answered, the round is forgotten"
    first = nodes["honda"].unmask(_wire(requests["honda"], UnmaskRequest))
    assert first.member == "honda" and first.shares
    with pytest.raises(ProtocolError, match="no secure-aggregation round 40"):  # answered, and forgotten
        nodes["honda"].unmask(_wire(requests["honda"], UnmaskRequest))
    both = UnmaskRequest(40, RUN, ["sony", "fanuc"], ["fanuc"])
    with pytest.raises(ProtocolError, match="both survived and dropped"):
        UnmaskRequest.from_content(both.to_content())


def test_forged_advert_is_refused(federation):
    cfg, nodes, model = federation
    rnd = Round(cfg, nodes, model, 50, {m: "share_keys" for m in nodes})
    rnd.run()
    requests = rnd.server.share_keys_requests()
    request = _wire(requests["sony"], ShareKeysRequest)
    other = next(iter(request.adverts))
    gid = next(iter(request.adverts[other].mask_pks))
    request.adverts[other].mask_pks[gid] = bytes(32)  # the coordinator swaps a key
    with pytest.raises(SecAggError):
        nodes["sony"].share_keys(request)


def test_an_advert_without_a_mask_key_for_each_shared_cohort_is_refused(federation):
    """A neighbour's advert must name its own mask key for each cohort the two share: the
    coordinator refuses to relay one that does not, and a node refuses to share keys with one,
    even signed by the neighbour itself."""
    from aggregation.secagg.keys import RoundKeys, sign_advert
    from shared_model.protocol import KeyAdvert

    cfg, nodes, model = federation
    rnd = Round(cfg, nodes, model, 51, {m: "share_keys" for m in nodes})
    rnd.run()
    request = _wire(rnd.server.share_keys_requests()["sony"], ShareKeysRequest)
    other = next(iter(request.adverts))
    shared = [g.group_id for g in rnd.setup.groups_of("sony") if other in g.members]
    cipher_pk, mask_pks = RoundKeys.generate(set(request.adverts[other].mask_pks) - {shared[0]}).public_bytes()
    digest = rnd.setup.digest()
    signature = sign_advert(nodes[other].signing_key, RUN, 51, other, cipher_pk, mask_pks, digest, 0)
    request.adverts[other] = KeyAdvert(cipher_pk, mask_pks, digest, 0, signature)
    with pytest.raises(ProtocolError, match=f"advertise no mask key for group {shared[0]}"):
        nodes["sony"].share_keys(request)
    server = SecAggServer(RUN, 51, rnd.setup, {})
    with pytest.raises(SecAggError, match=f"advertises mask keys for groups .*, expected .*'{shared[0]}'"):
        server.add_advert(other, request.adverts[other], public_key_hex(nodes[other].signing_key), 1.0)


def test_masked_input_refuses_a_group_of_one_active_member(federation):
    cfg, nodes, model = federation
    rnd = Round(cfg, nodes, model, 60, {m: "masked_input" for m in nodes})
    rnd.run()
    request = _wire(rnd.server.masked_input_requests()["sony"], MaskedInputRequest)
    gid = next(g for g in request.active if len(request.active[g]) > 1)
    request.active[gid] = ["sony"]
    with pytest.raises(ProtocolError, match="its sum would be one update"):
        nodes["sony"].masked_input(request)


def test_a_dp_node_refuses_a_weight_that_would_make_its_cohorts_sum_its_own_update(federation):
    """A review shrank every other member's weight to 1e-30, so a cohort's sum was one member's
    update. A DP node withholds its size and every update of its cohort weighs 1."""
    cfg, nodes, model = federation
    assert nodes["sony"].identity.dp
    rnd = Round(cfg, nodes, model, 61, {m: "masked_input" for m in nodes})
    rnd.run()
    request = _wire(rnd.server.masked_input_requests()["sony"], MaskedInputRequest)
    assert set(request.weights.values()) == {1.0}, "equal weights, as the coordinator sends under DP"
    gid = next(iter(request.weights))
    request.weights[gid] = 1e-30
    with pytest.raises(ProtocolError, match="weighs the same"):
        nodes["sony"].masked_input(request)


@pytest.mark.parametrize("members", [3, 4, 9])
def test_a_threshold_of_half_the_neighbours_or_less_is_refused_by_coordinator_and_node(members):
    """A node answers unmask once, with one of a peer's two secrets: at a threshold of half its
    neighbours or less a coordinator that tells half of them the peer dropped and the rest it
    stayed (a review did, with threshold 1 among four) collects both and unmasks the peer's
    update. The coordinator refuses to build such a round and a node refuses to join one."""
    from shared_model.protocol import SecAggSetup

    names = [f"m{i}" for i in range(members)]
    cohorts = {"expert/L0/E0": names}
    honest = build_setup(cohorts, bits=20, clip_range=1.0, graph_seed=b"graph-seed-test!")
    (group,) = honest.groups
    degree = len(group.neighbours["m0"])
    assert 2 * group.threshold > degree
    half = degree // 2
    with pytest.raises(SecAggError, match="not more than half"):
        build_setup(cohorts, bits=20, clip_range=1.0, threshold=half, graph_seed=b"graph-seed-test!")
    group.threshold = half
    with pytest.raises(ProtocolError, match="not more than half of a member's"):
        SecAggSetup.from_json(honest.to_json(), "train request")


def test_the_threshold_is_checked_against_the_best_connected_member():
    """A graph of unequal degrees: threshold 2 is more than half of the leaves' 2 neighbours
    but only half of the hub's 4, whose secrets two of its neighbours each could then give."""
    from shared_model.protocol import SecAggSetup

    (group,) = build_setup({"expert/L0/E0": ["a", "b"]}, bits=20, clip_range=1.0, graph_seed=b"graph-seed-test!").groups
    group.members = ["a", "b", "c", "d", "e"]
    group.neighbours = {"a": ["b", "c", "d", "e"], "b": ["a", "c"], "c": ["a", "b"], "d": ["a", "e"], "e": ["a", "d"]}
    group.threshold = 2
    with pytest.raises(ProtocolError, match="threshold 2 is not more than half of a member's 4 neighbours"):
        SecAggSetup([group]).from_json(SecAggSetup([group]).to_json(), "train request")


def test_a_round_a_node_vanished_from_leaves_no_secrets_once_the_next_round_begins(federation):
    """A node that vanishes before ``unmask`` never deletes that round's secrets itself: a
    walkthrough found a dropped member's round keys and its neighbours' shares on disk two runs
    later. They go when the node begins its next round, in any run; an update whose masked
    form never left stays, without its keys, for its own run's resume to send again."""
    cfg, nodes, model = federation
    Round(cfg, nodes, model, 70, {"sony": "masked_input", "fanuc": "unmask"}, run="vanished").run()
    root = nodes["sony"].secagg.root
    assert (root / "vanished" / "r70" / "keys.json").is_file() and (
        root / "vanished" / "r70" / "self_seeds.json"
    ).exists()
    Round(cfg, nodes, model, 1, run="next").run()
    assert sorted(p.name for p in (root / "vanished" / "r70").iterdir()) == ["base.txt", "update.safetensors"]
    assert nodes["sony"].secagg.can_resend("vanished", 70), "its own run's resume can still send it"
    assert not (nodes["fanuc"].secagg.root / "vanished" / "r70").exists(), "masked and sent: nothing to keep"


def test_a_node_pinned_to_the_consortium_file_refuses_identity_keys_it_does_not_publish(federation):
    """Advert signatures are checked against identity keys the coordinator lists; a node that
    trusts the consortium's published file refuses a round whose keys are not the published
    ones (a coordinator seating members of its own making beside it), before sharing anything."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    cfg, nodes, model = federation
    published = {name: public_key_hex(node.signing_key) for name, node in nodes.items()}
    rnd = Round(cfg, nodes, model, 62, {m: "share_keys" for m in nodes})
    rnd.run()
    request = _wire(rnd.server.share_keys_requests()["sony"], ShareKeysRequest)
    sony = nodes["sony"].secagg
    try:
        sony.pinned_keys = {**published, "fanuc": public_key_hex(Ed25519PrivateKey.generate())}
        with pytest.raises(ProtocolError, match="fanuc's identity key is not the one this member's consortium file"):
            sony.share_keys(request)
        sony.pinned_keys = {k: v for k, v in published.items() if k != "fanuc"}
        with pytest.raises(ProtocolError, match=r"\(fanuc is not in it\)"):
            sony.share_keys(request)
        sony.pinned_keys = published
        assert sony.share_keys(request).sealed, "the published keys: it shares"
    finally:
        sony.pinned_keys = None


def test_a_pinned_node_sits_out_a_round_that_seats_a_member_its_file_does_not_list_before_spending(
    federation, tmp_path, caplog
):
    """Share keys refuses a cohort member the pinned file does not list, but only after the
    node trained and paid for it: the train request's cohorts already name everyone, so the
    node declines there, for nothing, and says how to pick up a newly admitted member."""
    from dataclasses import replace

    from privacy.audit.consortium import Consortium, Member, dump_consortium
    from shared_model.protocol import TrainDeclined

    cfg, nodes, model = federation
    from privacy.keys import load_or_create_signing_key

    published = {name: public_key_hex(node.signing_key) for name, node in nodes.items() if name != "fanuc"}
    published["honda"] = public_key_hex(load_or_create_signing_key(tmp_path / "honda" / "member_ed25519.pem"))
    pinned_file = tmp_path / "consortium.yaml"
    dump_consortium(Consortium({n: Member(n, k, 8.0, 1e-5) for n, k in published.items()}), pinned_file)
    identity = replace(nodes["honda"].identity, state_dir=tmp_path / "honda", consortium_file=str(pinned_file))
    honda = MemberNode(cfg, identity)
    cohort = build_setup({"adapter/shared": ["honda", "sony", "fanuc"]}, bits=20, clip_range=1.0,
                         graph_seed=b"graph-seed-test!")  # fmt: skip
    request = TrainRequest(1, ["adapter/shared"], HP, model, run=RUN, planned_rounds=100, secagg=cohort)
    with caplog.at_level(logging.WARNING, logger="kyodo"):
        declined = honda.train(_wire(request, TrainRequest))
    assert isinstance(declined, TrainDeclined), declined
    assert "seats fanuc in this member's cohorts" in declined.reason and "kyodo-member trust" in declined.reason
    assert honda.ledger.releases() == [], "nothing was spent"
    # The member reads why in its own node's log, not only the coordinator.
    assert f"honda sits round 1 of run {RUN} out: the round seats fanuc" in caplog.text
    # At query the node says whom it pinned (the coordinator seats it only with them) and warns
    # its member that the consortium's roster lists someone its file lacks.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kyodo"):
        reply = honda.query(_wire(QueryRequest(1, roster=sorted(nodes)), QueryRequest))
    assert _wire(reply, QueryReply).pinned == sorted(published)
    assert "the consortium now lists fanuc, whom the pinned consortium file" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kyodo"):
        honda.query(_wire(QueryRequest(1, roster=sorted(published)), QueryRequest))
    assert caplog.text == ""
    listed = build_setup({"adapter/shared": ["honda", "sony", "softbank"]}, bits=20, clip_range=1.0,
                         graph_seed=b"graph-seed-test!")  # fmt: skip
    request = TrainRequest(1, ["adapter/shared"], HP, model, run=RUN, planned_rounds=100, secagg=listed)
    assert isinstance(honda.train(_wire(request, TrainRequest)), TrainReply), "a cohort the file lists: it trains"


def test_flatten_roundtrip():
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.tensor([7.0])}
    from aggregation.secagg.vectors import unflatten_shard

    vec = flatten_shard(tensors)
    assert vec.tolist() == [7.0, 0, 1, 2, 3, 4, 5]
    back = unflatten_shard(vec, {k: tuple(v.shape) for k, v in tensors.items()})
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError):
        unflatten_shard(vec[:3], {k: tuple(v.shape) for k, v in tensors.items()})


def test_stored_update_reads_back_exactly_and_nothing_else_is_accepted(tmp_path):
    from safetensors.numpy import save_file

    from member_node.secagg_client import _read_update

    rng = np.random.default_rng(0)
    vectors = {"expert/L0/E1": rng.standard_normal(1001).astype(np.float32), "adapter/shared": np.zeros(0, np.float32)}
    save_file(vectors, str(tmp_path / "u.safetensors"))
    back = _read_update(tmp_path / "u.safetensors")
    assert set(back) == set(vectors) and all(
        np.array_equal(back[k], v) and back[k].dtype == np.float32 for k, v in vectors.items()
    )
    save_file({"expert/L0/E1": np.zeros(4, np.float64)}, str(tmp_path / "f64.safetensors"))
    with pytest.raises(ProtocolError, match="not a float32 vector"):
        _read_update(tmp_path / "f64.safetensors")
    raw = (tmp_path / "u.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-8])
    with pytest.raises(ProtocolError):
        _read_update(tmp_path / "cut.safetensors")


def _first_attempt_dies_after(rnd: Round, stage: str) -> None:
    """The coordinator's first attempt at the round gets through ``stage`` and dies."""
    for member in rnd.plan.members:
        request = TrainRequest(
            rnd.round, rnd.plan.shards_of(member), HP, rnd.model, run=RUN, planned_rounds=100, secagg=rnd.setup
        )
        reply = rnd._answer(member, "train", request, MemberNode.train, TrainReply)
        rnd.plaintext[member] = load_file(
            str(rnd.nodes[member].secagg.root / RUN / f"r{rnd.round}" / "update.safetensors")
        )
        rnd.weights[member] = 1.0
        rnd.server.add_advert(member, reply.advert, public_key_hex(rnd.nodes[member].signing_key), 1.0)
    for member, request in rnd.server.share_keys_requests().items():
        rnd.server.add_shares(rnd._answer(member, "share_keys", request, MemberNode.share_keys, ShareKeysReply))
    if stage == "masked_input":
        for member, request in rnd.server.masked_input_requests().items():
            rnd._answer(member, "masked_input", request, MemberNode.masked_input, MaskedInputReply)


def test_a_round_sent_again_after_a_coordinator_restart_aggregates_the_kept_updates(federation, caplog):
    """The coordinator died after the members trained (their receipts are in their ledgers) but
    before any masked input left: the resumed coordinator sends the round again, and each node
    sends the very update it trained, under the new session's keys, spending nothing more."""
    cfg, nodes, model = federation
    first = Round(cfg, nodes, model, 100)
    _first_attempt_dies_after(first, "share_keys")
    ledgers = {name: node.ledger.releases() for name, node in nodes.items()}
    again = Round(cfg, nodes, model, 100)
    asked = {m: nodes[m].query(QueryRequest(100, RUN, HP, planned_rounds=100)) for m in again.plan.members}
    assert all(reply.can_train for reply in asked.values()), {m: r.reason for m, r in asked.items()}
    with caplog.at_level("WARNING", logger="kyodo.member"):
        sums = again.run()
    assert caplog.text.count(
        "sent again (the coordinator restarted, or the run was stopped and resumed, mid-round): its kept update"
    ) == len(nodes)
    assert set(sums) == set(again.plan.cohorts), again.server.skipped
    for member, vectors in again.plaintext.items():
        assert {k: v.tolist() for k, v in vectors.items()} == {
            k: v.tolist() for k, v in first.plaintext[member].items()
        }
    for shard, outcome in sums.items():
        np.testing.assert_allclose(
            outcome.total / outcome.weight, first.expected_mean(shard, outcome.contributors), atol=_tolerance(4)
        )
    assert {name: node.ledger.releases() for name, node in nodes.items()} == ledgers, "nothing spent twice"


def test_an_update_whose_masked_form_left_is_never_sent_again(federation):
    """Once its masked input left, other members' unmask shares could open that session's sum:
    the same update in a session with another cohort could then be told apart from the others."""
    from shared_model.protocol import TrainDeclined

    cfg, nodes, model = federation
    first = Round(cfg, nodes, model, 110)
    _first_attempt_dies_after(first, "masked_input")
    member = first.plan.members[0]
    reply = nodes[member].train(
        TrainRequest(110, first.plan.shards_of(member), HP, model, run=RUN, planned_rounds=100, secagg=first.setup)
    )
    assert isinstance(reply, TrainDeclined) and "already trained" in reply.reason
    assert not nodes[member].query(QueryRequest(110, RUN, HP, planned_rounds=100)).can_train


def test_a_round_sent_again_for_other_shards_is_sat_out(federation):
    from shared_model.protocol import TrainDeclined

    cfg, nodes, model = federation
    first = Round(cfg, nodes, model, 120)
    _first_attempt_dies_after(first, "share_keys")
    member = first.plan.members[0]
    other = [s for s in ("adapter/shared", "adapter/emb/aloha") if s not in first.plan.shards_of(member)][:1]
    shards = [*first.plan.shards_of(member)][:1] + other
    reply = nodes[member].train(TrainRequest(120, shards, HP, model, run=RUN, planned_rounds=100, secagg=first.setup))
    assert isinstance(reply, TrainDeclined)
    assert f"already trained, for shards {sorted(first.plan.shards_of(member))}" in reply.reason


def _shown(rnd: Round, views: dict[str, list[str]]) -> dict[str, UnmaskReply]:
    """A coordinator that shows each holder its own survivor set: each signs the set it is
    shown (consistency), then unmasks with every signature collected. The holders' replies."""
    nodes = rnd.nodes
    everyone = sorted(nodes)
    signatures: dict[str, dict[str, bytes]] = {}
    for holder, survivors in views.items():
        dropped = [m for m in everyone if m not in survivors]
        request = _wire(ConsistencyRequest(rnd.round, rnd.run_name, survivors, dropped), ConsistencyRequest)
        for gid, signature in nodes[holder].consistency(request).signatures.items():
            signatures.setdefault(gid, {})[holder] = signature
    replies = {}
    for holder, survivors in views.items():
        dropped = [m for m in everyone if m not in survivors]
        request = UnmaskRequest(rnd.round, rnd.run_name, survivors, dropped, signatures)
        try:
            replies[holder] = nodes[holder].unmask(_wire(request, UnmaskRequest))
        except ProtocolError as err:
            # A holder that signed no set deleted the round's secrets at consistency: it has nothing to reveal.
            assert "no secure-aggregation round" in str(err) and holder not in {
                h for sigs in signatures.values() for h in sigs
            }
            replies[holder] = UnmaskReply(holder, {})
    return replies


def _stripped(rnd: Round, owner: str, group, shard: str, self_seed: bytes, mask_key: bytes) -> np.ndarray | None:
    """What a coordinator holding ``owner``'s self-mask seed and mask key makes of its masked
    ``shard``: the owner's update if the two open it, ``None`` if the masks do not come off."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from aggregation.secagg.keys import agree, mask_context
    from aggregation.secagg.masks import apply_masks
    from aggregation.secagg.quantize import QuantizationPlan, dequantize_sum

    values = rnd.masked[owner].masked[shard].copy()
    key = X25519PrivateKey.from_private_bytes(mask_key)
    seeds = [(self_seed, True)]
    for peer in group.neighbours[owner]:
        peer_pk = rnd.server.adverts[peer].mask_pks[group.group_id]
        seed = agree(key, peer_pk, mask_context(rnd.run_name, rnd.round, group.group_id, owner, peer))
        seeds.append((seed, owner < peer))  # the owner added +mask for peers after it: take it off
    apply_masks(values, shard, seeds)
    try:
        return dequantize_sum(values, 1, QuantizationPlan.from_dict(group.quantization))
    except SecAggError:
        return None


@pytest.mark.parametrize("seed_from", ["cohort of four", "pair"])
def test_a_coordinator_that_splits_a_member_across_its_cohorts_cannot_open_its_update(federation, seed_from):
    """A review told sony's neighbours in one cohort that sony stayed and its neighbour in
    another that it dropped: each answered unmask once, as it should, with one of sony's
    secrets, and when sony used one mask key and one self-mask seed in every cohort the two
    opened its update (max error 1.8e-6). Each cohort now has its own of both."""
    from aggregation.secagg.shamir import combine_shares

    cfg, nodes, model = federation
    rnd = Round(cfg, nodes, model, 1, {m: "consistency" for m in nodes}, run=f"split-{seed_from.replace(' ', '-')}")
    rnd.run()
    four = next(g for g in rnd.setup.groups if "adapter/shared" in g.shards)
    pair = next(g for g in rnd.setup.groups if "adapter/emb/so100" in g.shards)
    assert sorted(pair.members) == ["softbank", "sony"] and len(four.members) == 4 and pair.threshold == 1
    everyone = sorted(nodes)
    told_sony_dropped = ["softbank"] if seed_from == "cohort of four" else ["honda", "fanuc"]
    kept = nodes["sony"].secagg.root / rnd.run_name / f"r{rnd.round}"  # sony's disk: the test peeks
    on_disk = {
        "self_seed": json.loads((kept / "self_seeds.json").read_text()),
        "mask_key": json.loads((kept / "keys.json").read_text())["masks"],
    }  # read before sony unmasks, which deletes them

    def own(group, kind):
        return bytes.fromhex(on_disk[kind][group.group_id])

    views = {h: [m for m in everyone if h not in told_sony_dropped or m != "sony"] for h in everyone}
    replies = _shown(rnd, views)

    def secret(group, kind, holders):
        shares = {group.share_id(h): replies[h].shares[group.group_id][kind]["sony"] for h in holders}
        return combine_shares(shares, group.threshold)

    # The consistency stage now withholds the secret from the cohort where sony was told
    # dropped (too few survivors signed there); the one from the other cohort is revealed. The
    # withheld one is read off sony's disk, as a larger cohort could yield it: what is tested
    # is that a secret of one cohort opens nothing in another.
    if seed_from == "cohort of four":
        self_seed = secret(four, "self_seed", ["honda", "fanuc"])
        assert self_seed == own(four, "self_seed"), "collected as in the review"
        assert pair.group_id not in replies["softbank"].shares
        mask_key = own(pair, "mask_key")
    else:
        self_seed = secret(pair, "self_seed", ["softbank"])
        assert self_seed == own(pair, "self_seed"), "collected as in the review"
        assert four.group_id not in replies["honda"].shares and four.group_id not in replies["fanuc"].shares
        mask_key = own(four, "mask_key")
    assert _stripped(rnd, "sony", four, "adapter/shared", self_seed, mask_key) is None
    # The same coordinator with both of the group's own secrets (read off sony's disk here,
    # which no one outside sony can) does open it: the masks above held, not the arithmetic failed.
    own_seed, own_key = own(four, "self_seed"), own(four, "mask_key")
    opened = _stripped(rnd, "sony", four, "adapter/shared", own_seed, own_key)
    np.testing.assert_allclose(opened, rnd.plaintext["sony"]["adapter/shared"], atol=2 * 2.0 / (2**20 - 1))


def test_a_node_masks_only_with_at_least_the_threshold_of_its_neighbours(federation):
    """A review told sony alone that honda was its only active neighbour (two active, so it
    masked, with honda alone), then told the others honda dropped: honda's mask key and sony's
    self-mask seed opened sony's update. A node now refuses to mask with fewer neighbours than
    the threshold: its self mask could not honestly be removed anyway."""
    cfg, nodes, model = federation
    rnd = Round(cfg, nodes, model, 1, run="few-peers", drop={m: "masked_input" for m in nodes})
    rnd.run()
    four = next(g for g in rnd.setup.groups if "adapter/shared" in g.shards)
    request = _wire(rnd.server.masked_input_requests()["sony"], MaskedInputRequest)
    request.active[four.group_id] = ["honda", "sony"]
    with pytest.raises(ProtocolError, match="lists 1 of this node's neighbours as active, fewer than the threshold 2"):
        nodes["sony"].masked_input(request)


@pytest.mark.parametrize("sets", ["each with sony alone", "each of three"])
def test_holders_shown_different_survivor_sets_reveal_nothing(federation, sets):
    """A review told each holder that it and sony alone survived: each revealed sony's seed
    share and every other member's mask-key share, and the coordinator opened sony's update.
    A node signs the survivor set it is shown (never one with no more members than the
    threshold, as no honest round has) and reveals only when the threshold of its members
    signed the same; each signs once, so sets shown to different holders get one signature each."""
    cfg, nodes, model = federation
    rnd = Round(cfg, nodes, model, 1, run=f"shown-{sets.split()[-1]}", drop={m: "consistency" for m in nodes})
    rnd.run()
    four = next(g for g in rnd.setup.groups if "adapter/shared" in g.shards)
    if sets == "each with sony alone":
        views = {h: sorted({h, "sony"}) for h in ["honda", "softbank", "fanuc"]}
    else:
        views = {
            "honda": ["honda", "softbank", "sony"],
            "softbank": ["fanuc", "softbank", "sony"],
            "fanuc": ["fanuc", "honda", "sony"],
            "sony": sorted(nodes),
        }
    for holder, reply in _shown(rnd, views).items():
        assert four.group_id not in reply.shares, f"{holder} revealed shares of {four.group_id}"


def test_a_holder_reveals_no_key_of_a_member_it_did_not_mask_with(federation):
    """Only a member this node masked with (active in its masked-input request) can have left
    a mask in the sum: another's key share is never revealed, whatever unmask says. Here the
    coordinator leaves fanuc out of the others' active set while fanuc masks with them."""
    cfg, nodes, model = federation
    rnd = Round(cfg, nodes, model, 1, run="not-masked-with", drop={m: "masked_input" for m in nodes})
    rnd.run()
    four = next(g for g in rnd.setup.groups if "adapter/shared" in g.shards)
    three = ["honda", "softbank", "sony"]
    for member, request in rnd.server.masked_input_requests().items():
        request = _wire(request, MaskedInputRequest)
        if member != "fanuc":
            request.active[four.group_id] = three
        nodes[member].masked_input(request)
    replies = _shown(rnd, dict.fromkeys(three, three))
    for holder, reply in replies.items():
        assert "fanuc" not in reply.shares[four.group_id]["mask_key"], holder
        assert sorted(reply.shares[four.group_id]["self_seed"]) == sorted(set(three) - {holder})


def test_neighbours_sent_different_setups_refuse_to_share_keys(federation):
    """A review sent one member a cohort of three and its neighbours one of five under the same
    group id, and opened the first member's update. Every advert signs the digest of the setup
    its node was sent; a neighbour's that differs from this node's own is refused."""
    from dataclasses import replace

    from shared_model.protocol import SecAggSetup

    cfg, nodes, model = federation
    rnd = Round(cfg, nodes, model, 1, run="two-setups", drop={m: "share_keys" for m in nodes})
    rnd.run()
    other = SecAggSetup.from_json(rnd.setup.to_json(), "test")
    other.groups = [replace(g, threshold=3) if "adapter/shared" in g.shards else g for g in other.groups]
    rnd.server.adverts["sony"] = nodes["sony"].secagg.resend(
        rnd.run_name, 1, other
    )  # sony's session with another setup
    request = _wire(rnd.server.share_keys_requests()["honda"], ShareKeysRequest)
    with pytest.raises(ProtocolError, match="sony was sent another secure-aggregation setup for this round"):
        nodes["honda"].share_keys(request)


def test_the_coordinator_asks_no_member_to_mask_with_fewer_than_the_threshold_of_its_neighbours():
    """Dropouts can leave a member with fewer active neighbours than the threshold (here f,
    linked to a and b only); members refuse to mask then (their self mask could not be
    removed), so the coordinator leaves it out and the rest of the group goes on."""
    (group,) = build_setup(
        {"expert/L0/E0": list("abcde")}, bits=20, clip_range=1.0, graph_seed=b"graph-seed-test!"
    ).groups
    group.members = list("abcdef")
    group.neighbours = {**group.neighbours, "f": ["a", "b"]}
    group.neighbours["a"] = [*group.neighbours["a"], "f"]
    group.neighbours["b"] = [*group.neighbours["b"], "f"]
    group.threshold = 3
    server = SecAggServer(RUN, 1, SecAggSetup([group]), {"expert/L0/E0": 10})
    for m in group.members:
        server.adverts[m], server.weights[m], server.sealed[m] = None, 1.0, {}
    assert sorted(server.masked_input_requests()) == list("abcde")
    assert server.active[group.group_id] == list("abcde")
    # c, d and e gone too: a and b have each other alone, the group cannot be unmasked.
    server = SecAggServer(RUN, 1, SecAggSetup([group]), {"expert/L0/E0": 10})
    for m in "abf":
        server.adverts[m], server.weights[m], server.sealed[m] = None, 1.0, {}
    assert server.masked_input_requests() == {}
    assert (
        "3 of 6 members shared keys, 0 of them with the threshold of active neighbours"
        in server.skipped["expert/L0/E0"]
    )


def test_a_member_without_dp_applies_only_the_weight_its_cohort_signed(tmp_path):
    """Example-weighted FedAvg scales each update by its count over the cohort's largest. A
    review weighed one non-DP member 1e30: every other member's scale became ~0 and the sum was
    that member's update. Each advert signs the member's count; a node applies 1 or its count
    over the largest its active members signed, nothing else."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from member_node.secagg_client import MemberSecAgg

    names, counts, shard = ["m0", "m1", "m2", "m3"], {"m0": 40, "m1": 50, "m2": 60, "m3": 70}, "expert/L0/E0"
    keys = {m: Ed25519PrivateKey.generate() for m in names}
    nodes = {m: MemberSecAgg(tmp_path / m, m, keys[m]) for m in names}
    setup = build_setup({shard: names}, bits=20, clip_range=1.0, graph_seed=b"graph-seed-test!")
    deltas = {m: {"blocks.0.moe.experts.0.w_up.weight": torch.randn(64) * 0.01} for m in names}

    identity = {m: public_key_hex(keys[m]) for m in names}

    def through_masked_input(run: str, weigh) -> tuple[SecAggServer, dict[str, MaskedInputRequest]]:
        server = _keys_shared(run, setup, nodes, identity, deltas, counts=counts, weigh=weigh)
        return server, {m: _wire(r, MaskedInputRequest) for m, r in server.masked_input_requests().items()}

    server, requests = through_masked_input("honest", lambda m: float(counts[m]))
    for m, request in requests.items():
        server.add_masked(nodes[m].masked_input(request))
    for m, request in server.consistency_requests().items():
        server.add_consistency(nodes[m].consistency(_wire(request, ConsistencyRequest)))
    for m, request in server.unmask_requests().items():
        server.add_unmask(nodes[m].unmask(_wire(request, UnmaskRequest)))
    outcome = server.finish()[shard]
    expected = sum(counts[m] * flatten_shard(deltas[m]).astype(np.float64) for m in names) / sum(counts.values())
    np.testing.assert_allclose(outcome.total / outcome.weight, expected, atol=_tolerance(4))

    _, requests = through_masked_input("inflated", lambda m: 1e30 if m == "m0" else float(counts[m]))
    with pytest.raises(ProtocolError, match="not 1 nor its count over the largest its active members signed"):
        nodes["m1"].masked_input(requests["m1"])
    nodes["m0"].masked_input(requests["m0"])  # its own scale, 1, is honest: but nobody else masks


def _random_updates(names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    return {m: {"blocks.0.moe.experts.0.w_up.weight": torch.randn(64) * 0.01} for m in names}


def _keys_shared(run: str, setup, nodes, identity: dict[str, str], updates, *, counts=None, weigh=None) -> SecAggServer:
    """A round among MemberSecAgg nodes through share keys (every message in its wire form):
    ``updates`` per member (64 entries of one shard), ``counts`` the example counts they report
    and sign (0: withheld), ``weigh`` the weight the coordinator gives each (1 by default)."""
    server = SecAggServer(run, 1, setup, {s: 64 for g in setup.groups for s in g.shards})
    for m, node in nodes.items():
        advert = node.begin(run, 1, setup, updates[m], weight=(counts or {}).get(m, 0))
        server.add_advert(m, _wire_advert(advert), identity[m], weigh(m) if weigh else 1.0)
    for m, request in server.share_keys_requests().items():
        server.add_shares(nodes[m].share_keys(_wire(request, ShareKeysRequest)))
    return server


def _wire_advert(advert):
    from shared_model.protocol import KeyAdvert

    return KeyAdvert.from_json(advert.to_json(), "test")


def _sparse_members(tmp_path, n: int):
    """n MemberSecAgg nodes (DP: equal weights) pinned to each other's keys, one shard, the
    default sparse graph; every message through its wire form."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from member_node.secagg_client import MemberSecAgg

    names = [f"m{i:02d}" for i in range(n)]
    keys = {m: Ed25519PrivateKey.generate() for m in names}
    pinned = {m: public_key_hex(k) for m, k in keys.items()}
    nodes = {m: MemberSecAgg(tmp_path / m, m, keys[m], equal_weight=True, pinned_keys=pinned) for m in names}
    return names, nodes, pinned


def test_two_survivor_sets_each_signed_by_the_threshold_open_nothing_in_a_sparse_cohort(tmp_path):
    """A review, 13 members (degree 8, threshold 5): the target T was told its active
    neighbours were P (exactly the threshold of them); P was shown everyone as survivors and
    signed, the rest were shown everyone but P and signed; P revealed T's seed, the rest the
    mask keys of P, and T's update opened. Each signer set had the threshold, but signers need
    not be neighbours in a sparse graph. A node now needs signatures from a majority of the
    whole group, which two sets can never both have."""
    import itertools

    shard = "expert/L0/E0"
    names, nodes, pinned = _sparse_members(tmp_path, 13)
    setup = build_setup({shard: names}, bits=20, clip_range=1.0, graph_seed=b"graph-seed-test!")
    (group,) = setup.groups
    gid, t, graph = group.group_id, group.threshold, group.neighbours
    target, peers, rest = next(
        (x, list(p), [m for m in names if m not in p and m != x])
        for x in names
        for p in itertools.combinations(graph[x], t)
        if all(len(set(graph[j]) - set(p) - {x}) >= t for j in p)
    )
    server = _keys_shared("sparse", setup, nodes, pinned, _random_updates(names))
    for m, request in server.masked_input_requests().items():
        request = _wire(request, MaskedInputRequest)
        if m == target:
            request.active[gid] = sorted([*peers, target])
        nodes[m].masked_input(request)
    shown = [(peers, sorted(names)), (rest, sorted([*rest, target]))]
    signatures: list[dict[str, bytes]] = []
    for signers, survivors in shown:
        request = ConsistencyRequest(1, "sparse", survivors, sorted(set(names) - set(survivors)))
        signed = {m: nodes[m].consistency(_wire(request, ConsistencyRequest)).signatures.get(gid) for m in signers}
        signatures.append({m: s for m, s in signed.items() if s is not None})
    assert len(signatures[0]) == t < len(names) // 2 + 1 <= len(signatures[1]), "one set has a majority, one not"
    seed_shares = 0
    for (signers, survivors), signed in zip(shown, signatures, strict=True):
        request = UnmaskRequest(1, "sparse", survivors, sorted(set(names) - set(survivors)), {gid: signed})
        for m in signers:
            reply = nodes[m].unmask(_wire(request, UnmaskRequest))
            seed_shares += target in reply.shares.get(gid, {}).get("self_seed", {})
    # The set with a majority holds the target as a survivor, so only its holders there (not
    # the threshold of them: the rest are the peers it was made to mask with) give seed shares.
    assert seed_shares < t, "the target's self-mask seed stays hidden: its update cannot be opened"


def test_survivor_signatures_from_another_session_of_the_round_do_not_count(tmp_path):
    """A coordinator can run a round again with the same setup (nodes without DP train it
    again) and collect each member's signature once per session; a review combined sessions'
    signatures into sets that opened a member. A survivor set is signed with a digest of the
    session's adverts (fresh keys each session), so an earlier session's signatures count for
    nothing."""
    shard = "expert/L0/E0"
    names, nodes, pinned = _sparse_members(tmp_path, 4)
    setup = build_setup({shard: names}, bits=20, clip_range=1.0, graph_seed=b"graph-seed-test!")
    (group,) = setup.groups

    def session() -> tuple[SecAggServer, dict[str, bytes]]:
        server = _keys_shared("again", setup, nodes, pinned, _random_updates(names))
        for m, request in server.masked_input_requests().items():
            server.add_masked(nodes[m].masked_input(_wire(request, MaskedInputRequest)))
        for m, request in server.consistency_requests().items():
            server.add_consistency(nodes[m].consistency(_wire(request, ConsistencyRequest)))
        return server, server.survivor_signatures[group.group_id]

    _, earlier = session()
    server, current = session()
    assert set(earlier) == set(current) == set(names)
    requests = server.unmask_requests()
    replayed = _wire(requests["m00"], UnmaskRequest)
    replayed.signatures = {group.group_id: {**earlier, "m00": current["m00"]}}
    assert group.group_id not in nodes["m00"].unmask(replayed).shares
    reply = nodes["m01"].unmask(_wire(requests["m01"], UnmaskRequest))
    assert sorted(reply.shares[group.group_id]["self_seed"]) == ["m00", "m02", "m03"], "this session's count"


def test_a_run_id_that_would_leave_the_secure_aggregation_directory_is_refused(tmp_path):
    """The protocol refuses such ids; the node's own paths hold even without it (a review's run
    id ".." put a round's private keys in state/, where nothing deleted them)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from member_node.secagg_client import MemberSecAgg
    from shared_model.protocol import ProtocolError

    secagg = MemberSecAgg(tmp_path, "sony", Ed25519PrivateKey.generate(), equal_weight=True)
    assert secagg._dir("run-1", 7) == tmp_path / "secagg" / "run-1" / "r7"
    for run in ("..", ".", "", "a/../..", "a/b"):
        with pytest.raises(ProtocolError, match="cannot name a secure-aggregation directory"):
            secagg._dir(run, 7)


def test_a_round_whose_masked_update_left_is_declined_saying_its_budget_is_lost(federation, caplog):
    """A run stopped at once (or cut off) after a member's masked input left: on resume the
    member cannot mask that update again, and says why, to the coordinator and in its log."""
    from shared_model.protocol import QueryRequest

    cfg, nodes, model = federation
    rnd = Round(cfg, nodes, model, 200, {"sony": "unmask"})  # after every other test's rounds
    rnd.run()
    with caplog.at_level("WARNING", logger="kyodo.member"):
        reply = nodes["sony"].query(QueryRequest(rnd.round, RUN, HP, 100))
    assert not reply.can_train and "its update already left masked in an earlier attempt of the round" in (reply.reason)
    assert "the epsilon spent on it does not reach the model" in caplog.text
