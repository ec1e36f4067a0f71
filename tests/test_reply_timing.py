"""Replies held until a fixed time after their request arrived (member_node.reply_timing)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import replace

import pytest
from clientapp_io import context, message

import member_node.node as node_module
from member_node.identity import NodeConfigError, resolve_identity
from member_node.node import MemberNode
from member_node.reply_timing import ReplyDelay
from member_node.synthetic import generate_dataset
from shared_model.config import load_config
from shared_model.policy import Policy
from shared_model.protocol import EvaluateRequest, QueryRequest, TrainHyperParams, TrainRequest


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_a_quick_reply_waits_out_the_rest_of_its_time():
    t = FakeTime()
    delay = ReplyDelay(5.0, "train", clock=t.clock, sleep=t.sleep)
    with delay.held():
        t.now += 2.0  # the work
    assert t.slept == [3.0] and t.now == 105.0


def test_a_slow_reply_leaves_at_once_and_the_node_warns(caplog):
    t = FakeTime()
    delay = ReplyDelay(5.0, "eval", clock=t.clock, sleep=t.sleep)
    with caplog.at_level(logging.WARNING, logger="kyodo.member"), delay.held():
        t.now += 7.5
    assert t.slept == []
    assert "eval reply took 7.5 s, more than eval-reply-after 5.0 s" in caplog.text


def test_off_by_default_and_errors_are_held_too():
    """An error reply's text is fixed, but when it leaves would say how far the work got."""
    t = FakeTime()
    with ReplyDelay(0.0, "train", clock=t.clock, sleep=t.sleep).held():
        t.now += 1.0
    assert t.slept == []
    with pytest.raises(RuntimeError), ReplyDelay(5.0, "train", clock=t.clock, sleep=t.sleep).held():
        t.now += 1.5
        raise RuntimeError("the work failed")
    assert t.slept == [3.5]


@pytest.mark.parametrize("seconds", [-1.0, float("nan"), float("inf")])
def test_bad_delays_are_refused(seconds):
    with pytest.raises(ValueError, match="train-reply-after"):
        ReplyDelay(seconds, "train")


def test_node_config_keys(tmp_path):
    cfg = load_config(model="tiny")
    base = {"member": "x", "embodiment": "agv", "data-dir": str(tmp_path)}
    ident = resolve_identity({**base, "train-reply-after": "30", "eval-reply-after": 2.5}, cfg)
    assert (ident.train_reply_after, ident.eval_reply_after) == (30.0, 2.5)
    assert resolve_identity(base, cfg).train_reply_after == 0.0
    with pytest.raises(NodeConfigError, match="eval-reply-after"):
        resolve_identity({**base, "eval-reply-after": -3}, cfg)
    with pytest.raises(NodeConfigError, match="train-reply-after"):
        resolve_identity({**base, "train-reply-after": "soon"}, cfg)


def _member(tmp_path, **node_config):
    """A sony node of the tiny default federation, served by the real ClientApp."""
    cfg = load_config(model="tiny", overrides=[f"data_root={tmp_path}", f"state_root={tmp_path / 'state'}"])
    generate_dataset(tmp_path / "sony", "so100", cfg.embodiments["so100"], episodes=12, episode_seconds=2.0, seed=1)
    config = {"member": "sony", "embodiment": "so100", "data-dir": str(tmp_path / "sony")}
    config.update({"state-dir": str(tmp_path / "node-state"), **node_config})
    model = {k: v.clone() for k, v in Policy(cfg.model, cfg.embodiments).state_dict().items()}
    return context(cfg, config), model


def _recording_delays(monkeypatch, events: list) -> None:
    """Every ReplyDelay the node config makes reads a clock that records each read (and
    stands still at 0) and records each wait instead of sleeping: what the ClientApp does
    in which order, with no wall-clock timing in the test."""
    import member_node.identity as identity_module

    def recording_delay(seconds, what):
        return ReplyDelay(seconds, what, clock=lambda: events.append("clock") or 0.0, sleep=lambda s: events.append(s))

    monkeypatch.setattr(identity_module, "ReplyDelay", recording_delay)


def test_the_client_app_holds_train_and_eval_replies_errors_included(tmp_path, monkeypatch):
    """Through the real ClientApp: a DP update, a decline, an error and a released error each
    wait out the member's padding for their kind; queries are not padded."""
    from member_node.client_app import app

    events: list = []
    _recording_delays(monkeypatch, events)
    ctx, model = _member(tmp_path, **{"train-reply-after": 30.0, "eval-reply-after": 5.0})
    hp = TrainHyperParams(lr=0.01, local_steps=2, batch_size=8, sample_rate=0.5)
    requests = [
        (TrainRequest(1, ["adapter/emb/so100"], hp, model, run="r", planned_rounds=2), "train", 30.0),
        (TrainRequest(2, ["adapter/emb/so100"], replace(hp, sample_rate=0.0), model, run="r"), "train", 30.0),
        (TrainRequest(3, ["backbone"], hp, model, run="r"), "train", 30.0),  # refused: frozen shard
        (EvaluateRequest(1, model, run="r"), "evaluate", 5.0),
        (QueryRequest(0), "query", None),
    ]
    errors = []
    for request, kind, padding in requests:
        events.clear()
        reply = app(message(request.to_content(), kind), ctx)
        waits = [e for e in events if e != "clock"]
        assert waits == ([] if padding is None else [padding]), kind
        errors.append(reply.has_error())
    assert errors == [False, False, True, False, False]


def test_the_clock_starts_before_the_node_reads_the_members_data(tmp_path, monkeypatch):
    """In deployment every message starts a ClientApp process and builds the node: reading
    the dataset (longer the more episodes) must fall inside the padded time."""
    from member_node.client_app import app

    events: list = []
    _recording_delays(monkeypatch, events)
    real_read = node_module.read_dataset
    monkeypatch.setattr(node_module, "read_dataset", lambda *a: events.append("read") or real_read(*a))
    ctx, model = _member(tmp_path, **{"train-reply-after": 30.0})
    hp = TrainHyperParams(lr=0.01, local_steps=1, batch_size=8, sample_rate=0.5)
    reply = app(message(TrainRequest(1, ["adapter/emb/so100"], hp, model, run="r").to_content(), "train"), ctx)
    assert not reply.has_error()
    assert events[0] == "clock" and "read" in events and events[-1] == 30.0


def test_receipts_carry_the_requests_arrival_not_the_end_of_the_work(tmp_path):
    """The ledger entries of a node's releases are stamped with the moment their request
    reached the node (the ClientApp passes it), so a receipt does not time the work."""
    cfg = load_config(model="tiny", overrides=[f"data_root={tmp_path}", f"state_root={tmp_path / 'state'}"])
    generate_dataset(tmp_path / "sony", "so100", cfg.embodiments["so100"], episodes=12, episode_seconds=2.0, seed=1)
    node = MemberNode(cfg, resolve_identity({"partition-id": 1}, cfg))
    model = {k: v.clone() for k, v in Policy(cfg.model, cfg.embodiments).state_dict().items()}
    hp = TrainHyperParams(lr=0.01, local_steps=2, batch_size=8, sample_rate=0.5)
    arrived = dt.datetime(2026, 12, 1, 8, 0, 0, 123456, tzinfo=dt.UTC)
    trained = node.train(TrainRequest(1, ["adapter/emb/so100"], hp, model, run="r", planned_rounds=2), arrived)
    released = node.evaluate(EvaluateRequest(1, model, run="r"), arrived + dt.timedelta(seconds=1))
    assert json.loads(trained.receipt)["time"] == "2026-12-01T08:00:00.123456+00:00"
    assert json.loads(released.receipt)["time"] == "2026-12-01T08:00:01.123456+00:00"


def test_a_ledger_entry_time_must_say_its_zone(tmp_path):
    from privacy.keys import load_or_create_signing_key
    from privacy.ledger import Ledger, LedgerError

    ledger = Ledger(tmp_path / "ledger.jsonl", load_or_create_signing_key(tmp_path / "key.pem"))
    fields = dict(
        run="r", round=1, member="m", shards=["adapter/shared"], privacy_unit="episode",
        mechanism={"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1, "clipping_norm": 1.0,
                   "opacus_mode": "bk", "noise_source": "chacha20"},
        dataset_fingerprint="hmac-sha256:" + "0" * 64, epsilon=3.0, delta=1e-5, accountant="rdp",
        decision="full",
    )  # fmt: skip
    with pytest.raises(LedgerError, match="timezone-aware"):
        ledger.append(at=dt.datetime(2026, 12, 1, 8, 0), **fields)
    tokyo = dt.timezone(dt.timedelta(hours=9))
    entry = ledger.append(at=dt.datetime(2026, 12, 1, 17, 0, tzinfo=tokyo), **fields)
    assert entry["time"] == "2026-12-01T08:00:00.000000+00:00"


def test_a_padded_reply_is_made_after_the_wait(tmp_path, monkeypatch):
    """Flower stamps a reply's metadata (``created_at``, ``ttl``) when the Message is made and
    passes both on to the coordinator: made before the padding, a reply would still say when
    the work on the data ended. Train and evaluate replies, errors included, are made after."""
    import member_node.client_app as client_app

    events: list = []
    _recording_delays(monkeypatch, events)
    real_message = client_app.Message
    monkeypatch.setattr(client_app, "Message", lambda *a, **k: events.append("reply made") or real_message(*a, **k))
    ctx, model = _member(tmp_path, **{"train-reply-after": 30.0, "eval-reply-after": 5.0})
    hp = TrainHyperParams(lr=0.01, local_steps=1, batch_size=8, sample_rate=0.5)
    for request, kind, padding in [
        (TrainRequest(1, ["adapter/emb/so100"], hp, model, run="r", planned_rounds=2), "train", 30.0),
        (TrainRequest(2, ["backbone"], hp, model, run="r"), "train", 30.0),  # an error reply
        (EvaluateRequest(1, model, run="r"), "evaluate", 5.0),
    ]:
        events.clear()
        client_app.app(message(request.to_content(), kind), ctx)
        assert events[-2:] == [padding, "reply made"] and events.count("reply made") == 1, (kind, events)
