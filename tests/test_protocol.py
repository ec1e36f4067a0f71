import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from shared_model.protocol import (
    REC_MASKED,
    REC_REQUEST,
    EvaluateReply,
    EvaluateRequest,
    MaskedInputReply,
    ProtocolError,
    QueryReply,
    QueryRequest,
    SeatingNoted,
    SeatingNotice,
    TrainHyperParams,
    TrainReply,
    TrainRequest,
    coarse_count,
)

HP = TrainHyperParams(lr=0.01, local_steps=5, batch_size=8, weight_decay=0.0, seed=3)


def test_round_trips():
    model = {"a.weight": torch.randn(3, 2), "b": torch.arange(4, dtype=torch.float32)}
    req = TrainRequest.from_content(TrainRequest(2, ["expert/L0/E1", "adapter/shared"], HP, model).to_content())
    assert req.round == 2 and req.shards == ["expert/L0/E1", "adapter/shared"] and req.hparams == HP
    assert torch.equal(req.model["a.weight"], model["a.weight"])
    rep = TrainReply.from_content(TrainReply("sony", ["adapter/shared"], model, 40, 0.5, 5).to_content())
    assert rep.member == "sony" and rep.num_examples == 40 and math.isclose(rep.loss, 0.5)
    withheld = TrainReply.from_content(TrainReply("sony", ["adapter/shared"], model, 0, math.nan, 5).to_content())
    assert withheld.num_examples == 0  # under DP the size is withheld
    with pytest.raises(ProtocolError, match="num-examples must be >= 0"):
        TrainReply.from_content(TrainReply("sony", ["adapter/shared"], model, -1, 0.5, 5).to_content())
    assert QueryRequest.from_content(QueryRequest(0).to_content()) == QueryRequest(0)
    planned = QueryRequest(3, "run-1", HP, planned_rounds=8)
    assert QueryRequest.from_content(planned.to_content()) == planned
    with pytest.raises(ProtocolError, match="run id"):
        QueryRequest.from_content(QueryRequest(3, "bad run", HP).to_content())
    q = QueryReply.from_content(QueryReply("sony", ["so100"], 60).to_content())
    assert q.embodiments == ["so100"] and q.can_train and q.reason == ""
    out = QueryReply.from_content(QueryReply("sony", ["so100"], 0, can_train=False, reason="x" * 900).to_content())
    assert not out.can_train and out.reason == "x" * 500  # a node's free text is bounded before it is logged
    ev = EvaluateReply.from_content(EvaluateReply("sony", 10, 0.1, 0.2).to_content())
    assert ev.action_mae == 0.2
    assert EvaluateRequest.from_content(EvaluateRequest(1, model).to_content()).round == 1
    assert EvaluateRequest.from_content(EvaluateRequest(1, model, run="r-7").to_content()).run == "r-7"


def test_the_roster_and_the_pinned_members_round_trip_and_bad_names_are_refused():
    rostered = QueryRequest(3, "run-1", HP, planned_rounds=8, roster=["honda", "sony"])
    assert QueryRequest.from_content(rostered.to_content()) == rostered
    assert QueryRequest.from_content(QueryRequest(0, roster=["sony"]).to_content()).roster == ["sony"]
    pinned = QueryReply.from_content(QueryReply("sony", ["so100"], 0, pinned=["honda", "sony"]).to_content())
    assert pinned.pinned == ["honda", "sony"]
    assert QueryReply.from_content(QueryReply("sony", ["so100"], 0).to_content()).pinned == []
    with pytest.raises(ProtocolError, match="roster holds an invalid member name"):
        QueryRequest.from_content(QueryRequest(0, roster=["so ny"]).to_content())
    with pytest.raises(ProtocolError, match="pinned holds an invalid member name"):
        QueryReply.from_content(QueryReply("sony", ["so100"], 0, pinned=["../x"]).to_content())
    with pytest.raises(ProtocolError, match="at most 10000 member names"):
        QueryReply.from_content(QueryReply("sony", ["so100"], 0, pinned=[f"m{i}" for i in range(10_001)]).to_content())


def test_a_seating_notice_carries_member_names_only():
    notice = SeatingNotice(2, "run-1", ["honda", "sony"])
    assert SeatingNotice.from_content(notice.to_content()) == notice
    assert SeatingNoted.from_content(SeatingNoted("fanuc").to_content()) == SeatingNoted("fanuc")
    for bad, match in (
        (SeatingNotice(2, "run-1", []), "names no member"),
        (SeatingNotice(2, "run-1", ["a b"]), "invalid member name"),
        (SeatingNotice(2, "bad run", ["honda"]), "run id"),
        (SeatingNotice(-1, "run-1", ["honda"]), "round must be >= 0"),
    ):
        with pytest.raises(ProtocolError, match=match):
            SeatingNotice.from_content(bad.to_content())
    with pytest.raises(ProtocolError, match="member name"):
        SeatingNoted.from_content(SeatingNoted("../x").to_content())


def test_private_and_withheld_evaluations_round_trip_and_bad_metrics_are_refused():
    private = EvaluateReply.from_content(EvaluateReply("sony", 51, 0.004, math.nan, receipt="{}").to_content())
    assert private.receipt == "{}" and math.isnan(private.action_mae) and private.released
    withheld = EvaluateReply("sony", 0, math.nan, math.nan, withheld="budget spent")
    parsed = EvaluateReply.from_content(withheld.to_content())
    assert not parsed.released and parsed.withheld == "budget spent"
    for mse, mae in ((math.nan, 0.1), (math.inf, 0.1), (0.1, math.inf)):
        with pytest.raises(ProtocolError, match="metrics must be finite"):
            EvaluateReply.from_content(EvaluateReply("sony", 1, mse, mae).to_content())


def _train_content(**changes):
    content = TrainRequest(1, ["adapter/shared"], HP, {"x": torch.zeros(1)}).to_content()
    rec = dict(content.config_records[REC_REQUEST])
    for k, v in changes.items():
        if v is None:
            rec.pop(k)
        else:
            rec[k] = v
    content.config_records[REC_REQUEST] = ConfigRecord(rec)
    return content


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"local_steps": 0}, "local_steps"),
        ({"batch_size": 10**9}, "batch_size"),
        ({"shards": ["../../etc/passwd"]}, "not a valid shard id"),
        ({"shards": ["adapter/shared", "adapter/shared"]}, "duplicates"),
        ({"shards": []}, "no shards"),
        ({"round": "one"}, "round"),
        ({"round": -5}, "round must be >= 0"),  # a review's left a noise plan behind before the ledger refused it
        ({"round": 0}, "numbered from 1"),
        ({"run": ".."}, "run id '..' is not valid"),  # a path component on the node (secagg/<run>/)
        ({"run": "."}, "run id '.' is not valid"),
        ({"run": "r-1\n"}, "is not valid"),  # "$" matched before a final newline
        ({"shards": ["backbone\n"]}, "not a valid shard id"),
        ({"seed": None}, "missing field 'seed'"),
    ],
)
def test_invalid_train_requests(changes, match):
    with pytest.raises(ProtocolError, match=match):
        TrainRequest.from_content(_train_content(**changes))


def test_missing_records_and_nonfinite_tensors():
    with pytest.raises(ProtocolError, match="missing config record"):
        TrainRequest.from_content(RecordDict())
    bad = TrainRequest(1, ["adapter/shared"], HP, {"x": torch.tensor([float("inf")])}).to_content()
    with pytest.raises(ProtocolError, match="non-finite"):
        TrainRequest.from_content(bad)


def test_coarse_count():
    assert [coarse_count(n) for n in (0, 7, 12, 57, 1234, 99999)] == [0, 7, 10, 50, 1000, 90000]


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_masked_input_reply_is_npy_on_the_wire_and_read_without_copy(dtype):
    vec = np.random.default_rng(0).integers(0, 1000, 1001, dtype=dtype)
    content = MaskedInputReply("sony", {"expert/L0/E1": vec}).to_content()
    array = content.array_records[REC_MASKED]["expert/L0/E1"]
    assert array.data == Array(vec).data  # byte for byte what np.save / flwr would send
    assert np.array_equal(array.numpy(), vec)
    parsed = MaskedInputReply.from_content(content)
    got = parsed.masked["expert/L0/E1"]
    assert parsed.member == "sony" and got.dtype == dtype and np.array_equal(got, vec)
    assert not got.flags.writeable and not got.flags.owndata  # a view of the received bytes


def _masked_content(array: Array) -> RecordDict:
    content = MaskedInputReply("sony", {}).to_content()
    content.array_records[REC_MASKED] = ArrayRecord({"expert/L0/E1": array})
    return content


def _truncated() -> Array:
    good = Array(np.arange(10, dtype=np.uint32))
    return Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-4])


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (Array(np.zeros(4, np.float32)), "uint32/uint64"),
        (Array(np.zeros(4, np.int64)), "uint32/uint64"),
        (Array(np.zeros((2, 2), np.uint32)), "uint32/uint64"),
        (Array(np.zeros(4, ">u4")), "uint32/uint64"),
        (_truncated(), "data bytes"),
        (Array(dtype="uint32", shape=(4,), stype="numpy.ndarray", data=b"not an npy file at all"), "not a valid .npy"),
        (Array(dtype="uint32", shape=(4,), stype="torch.Tensor", data=b"x"), "must be a numpy array"),
    ],
)
def test_masked_input_reply_refuses_anything_but_a_ring_vector(array, match):
    with pytest.raises(ProtocolError, match=match):
        MaskedInputReply.from_content(_masked_content(array))


def test_a_key_advert_carries_one_mask_key_per_group_and_refuses_anything_else():
    from shared_model.protocol import MAX_ADVERT_GROUPS, KeyAdvert

    advert = KeyAdvert(bytes(range(32)), {"g0": bytes(32), "g12": bytes([7]) * 32}, bytes([3]) * 32, 40, bytes(64))
    assert KeyAdvert.from_json(advert.to_json(), "train reply") == advert
    good = advert.to_json()
    for change, match in (
        ({"mask_pks": {"x0": "00" * 32}}, "group id 'x0'"),
        ({"mask_pks": {"g0": "00" * 31}}, "mask key of group g0 must be 32 bytes"),
        ({"mask_pks": "00" * 32}, "mask_pks must be an object"),
        ({"mask_pks": {f"g{i}": "00" * 32 for i in range(MAX_ADVERT_GROUPS + 1)}}, "at most"),
        ({"mask_pk": "00" * 32, "mask_pks": None}, "mask_pks must be an object"),
        ({"setup_sha256": None}, "setup_sha256 must be lowercase hex"),
        ({"weight": -1}, "advert weight must be an integer >= 0"),
        ({"weight": 1.5}, "advert weight must be an integer >= 0"),
    ):
        with pytest.raises(ProtocolError, match=match):
            KeyAdvert.from_json({**good, **change}, "train reply")


def test_survivor_signatures_travel_per_group_and_bad_ones_are_refused():
    from shared_model.protocol import ConsistencyReply, ConsistencyRequest, UnmaskRequest

    request = ConsistencyRequest(3, "run-1", ["a", "b", "c"], ["d"])
    assert ConsistencyRequest.from_content(request.to_content()) == request
    reply = ConsistencyReply("a", {"g0": bytes(64), "g2": bytes([1]) * 64})
    assert ConsistencyReply.from_content(reply.to_content()) == reply
    unmask = UnmaskRequest(3, "run-1", ["a", "b", "c"], ["d"], {"g0": {"a": bytes(64), "b": bytes([2]) * 64}})
    assert UnmaskRequest.from_content(unmask.to_content()) == unmask
    for bad, match in (
        (ConsistencyReply("a", {"x1": bytes(64)}), "bad group"),
        (ConsistencyReply("a", {"g0": bytes(63)}), "must be 64 bytes"),
        (UnmaskRequest(3, "run-1", ["a"], [], {"g0": {"a": bytes(10)}}), "must be 64 bytes"),
        (UnmaskRequest(3, "run-1", ["a"], [], {"g0": {"no name!": bytes(64)}}), "not a valid name"),
        (ConsistencyRequest(3, "run-1", ["a"], ["a"]), "both survived and dropped"),
    ):
        with pytest.raises(ProtocolError, match=match):
            type(bad).from_content(bad.to_content())


def test_a_share_keys_request_names_the_identity_key_of_every_advert():
    from shared_model.protocol import KeyAdvert, ShareKeysRequest

    advert = KeyAdvert(bytes(range(32)), {"g0": bytes(32)}, bytes(32), 0, bytes(64))
    request = ShareKeysRequest(1, "run-1", {"a": advert}, {"a": "ab" * 32, "b": "cd" * 32})
    assert ShareKeysRequest.from_content(request.to_content()) == request  # more keys than adverts: fine
    with pytest.raises(ProtocolError, match="every advert needs its member's identity key"):
        ShareKeysRequest.from_content(ShareKeysRequest(1, "run-1", {"a": advert}, {"b": "cd" * 32}).to_content())


def test_an_evaluate_request_s_run_id_is_checked_like_any_other():
    """It is signed into the ledger and logged: a review put two log lines and 2 MB in one."""
    for run in ("../../etc/passwd\nkyodo.member WARNING: FORGED", "r" * 2_000_000, "..", "r\n"):
        content = EvaluateRequest(1, {"x": torch.zeros(1)}, run="r-1").to_content()
        rec = dict(content.config_records[REC_REQUEST])
        rec["run"] = run
        content.config_records[REC_REQUEST] = ConfigRecord(rec)
        with pytest.raises(ProtocolError, match="is not valid"):
            EvaluateRequest.from_content(content)
    assert EvaluateRequest.from_content(EvaluateRequest(1, {"x": torch.zeros(1)}).to_content()).run == ""
