"""Replies held until a fixed time after their request arrived (member_node.reply_timing)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import replace

import pytest

import member_node.node as node_module
from member_node.identity import NodeConfigError, resolve_identity
from member_node.node import MemberNode
from member_node.reply_timing import ReplyDelay
from member_node.synthetic import generate_dataset
from shared_model.config import load_config
from shared_model.policy import Policy
from shared_model.protocol import EvaluateRequest, TrainDeclined, TrainHyperParams, TrainRequest


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


def test_off_by_default_and_errors_are_not_held():
    t = FakeTime()
    with ReplyDelay(0.0, "train", clock=t.clock, sleep=t.sleep).held():
        t.now += 1.0
    with pytest.raises(RuntimeError), ReplyDelay(5.0, "train", clock=t.clock, sleep=t.sleep).held():
        raise RuntimeError("the work failed")
    assert t.slept == []


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


def test_a_node_holds_its_train_and_eval_replies(tmp_path):
    """A real node: the replies (a DP update, a decline, a released error) leave no earlier
    than the member's padding after the request."""
    cfg = load_config(model="tiny", overrides=[f"data_root={tmp_path}", f"state_root={tmp_path / 'state'}"])
    generate_dataset(tmp_path / "sony", "so100", cfg.embodiments["so100"], episodes=12, episode_seconds=2.0, seed=1)
    identity = replace(resolve_identity({"partition-id": 1}, cfg), train_reply_after=1.0, eval_reply_after=0.5)
    node = MemberNode(cfg, identity)
    model = {k: v.clone() for k, v in Policy(cfg.model, cfg.embodiments).state_dict().items()}
    hp = TrainHyperParams(lr=0.01, local_steps=2, batch_size=8, sample_rate=0.5)

    start = time.monotonic()
    reply = node.train(TrainRequest(1, ["adapter/emb/so100"], hp, model, run="r", planned_rounds=2))
    assert not isinstance(reply, TrainDeclined) and time.monotonic() - start >= 1.0
    start = time.monotonic()
    declined = node.train(TrainRequest(2, ["adapter/emb/so100"], replace(hp, sample_rate=0.0), model, run="r"))
    assert isinstance(declined, TrainDeclined) and time.monotonic() - start >= 1.0
    start = time.monotonic()
    node.evaluate(EvaluateRequest(1, model, run="r"))
    assert time.monotonic() - start >= 0.5


def test_receipts_carry_the_requests_arrival_not_the_end_of_the_work(tmp_path, monkeypatch):
    """The ledger entry of a release is stamped with the moment its request reached the node,
    so a receipt does not time the work on the member's data either."""
    cfg = load_config(model="tiny", overrides=[f"data_root={tmp_path}", f"state_root={tmp_path / 'state'}"])
    generate_dataset(tmp_path / "sony", "so100", cfg.embodiments["so100"], episodes=12, episode_seconds=2.0, seed=1)
    node = MemberNode(cfg, resolve_identity({"partition-id": 1}, cfg))
    model = {k: v.clone() for k, v in Policy(cfg.model, cfg.embodiments).state_dict().items()}
    real = node_module.evaluate

    def slow_evaluate(*args, **kwargs):
        time.sleep(1.5)  # as if the member held many more held-out episodes
        return real(*args, **kwargs)

    monkeypatch.setattr(node_module, "evaluate", slow_evaluate)
    sent = dt.datetime.now(dt.UTC)
    reply = node.evaluate(EvaluateRequest(0, model, run="r"))
    stamped = dt.datetime.fromisoformat(json.loads(reply.receipt)["time"])
    assert dt.datetime.now(dt.UTC) - sent >= dt.timedelta(seconds=1.5)
    assert dt.timedelta(0) <= stamped - sent < dt.timedelta(seconds=1.0)


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
