"""A run whose round 0 is an earlier run's committed model (``continue_from``): the store's
object import, the coordinator's round 0 and record, and every refusal, with the real round
runner over an in-process grid (``tests/round_fakes.py``)."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from coordinator.continuation import ContinuationError, earlier_round, same_model_evaluations
from coordinator.federation import run_federation
from coordinator.run_state import RunState
from coordinator.run_status import describe_round_zero
from privacy.round_signature import round_signature_problem
from shared_model.config import ConfigError, load_config
from shared_model.store import CorruptObjectError, MissingObjectError, ShardStore
from tests.round_fakes import FakeGrid

MEMBERS = {"honda": "aloha", "sony": "so100", "softbank": "agv", "fanuc": "franka"}
BASE = ["secagg.enabled=false", "train.min_cohort=2"]


def _run(root: Path, name: str, *overrides: str, **grid_options) -> tuple[Path, FakeGrid]:
    out = root / name
    cfg = load_config(model="tiny", overrides=[*BASE, f"out_dir={out}", "train.rounds=2", *overrides])
    grid = FakeGrid(MEMBERS, RunState(cfg, root / "layout").layout, **grid_options)
    log = io.StringIO()
    run_federation(cfg, grid, Console(file=log, width=300))
    (out / "console.txt").write_text(log.getvalue())
    return out, grid


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    out, _ = _run(tmp_path_factory.mktemp("runs"), "first")
    return out


def _object_file(store: ShardStore, object_id: str) -> os.stat_result:
    return store.object_path(object_id).stat()


def test_round_zero_is_the_earlier_heads_objects_linked_not_copied(first_run, tmp_path):
    first = ShardStore(first_run / "store")
    head = first.head_manifest()
    out, grid = _run(tmp_path, "second", f"continue_from={first_run}")
    store = ShardStore(out / "store")
    zero = store.manifest(0)
    assert zero.shards == head.shards
    for object_id in set(zero.shards.values()):  # one file on disk, two names
        assert _object_file(store, object_id).st_ino == _object_file(first, object_id).st_ino
    run_id = json.loads((first_run / "run.json").read_text())["run"]
    source = json.loads(zero.extra["initial"])
    assert {k: source[k] for k in ("source", "run", "round", "manifest")} == {
        "source": "run",
        "run": run_id,
        "round": 2,
        "manifest": f"sha256:{head.digest}",
    }
    records = _records(out)
    assert records[0]["initial"] == source and [r["round"] for r in records] == [0, 1, 2]
    assert records[2]["updated_shards"], "the continued run trains on"
    # The lineage is checkable from round 0's record alone: the earlier coordinator signed
    # exactly that manifest as that round of that run.
    signed = {"manifest": head.digest, **source["coordinator"]}
    key = json.loads((first_run / "run.json").read_text())["coordinator_public_key"]
    assert round_signature_problem(signed, run_id, 2, head.digest, key) is None
    assert describe_round_zero(source) == f"continued from round 2 of run {run_id} (manifest sha256:{head.digest})"
    assert f"round 0: continued from round 2 of run {run_id}" in (out / "console.txt").read_text()  # the run's log


def test_round_zero_carries_the_held_out_errors_released_for_the_model_it_continues(tmp_path):
    """Round 0 is the model the earlier run's members released held-out errors for: those are
    carried (asking again would spend each DP member's budget on a number already released),
    and only a member that released none for it is asked."""
    from shared_model.protocol import EVALUATE

    first, _ = _run(tmp_path, "first", withholding={"fanuc": "not due"})
    first_id = json.loads((first / "run.json").read_text())["run"]
    released = _records(first)[2]["evaluation"]
    assert sorted(released) == ["honda", "softbank", "sony"]
    out, grid = _run(tmp_path, "second", f"continue_from={first}", "train.rounds=1", withholding={"fanuc": "x"})
    zero = _records(out)[0]
    assert zero["evaluation_same_model"] == {m: {**e, "run": first_id, "round": 2} for m, e in released.items()}
    assert zero["evaluation"] == {} and zero["evaluation_withheld"] == {"fanuc": "x"}, "fanuc alone was asked"
    asked = sorted(name for kind, name, _ in grid.ledger_heads if kind == EVALUATE)
    assert asked == sorted(["fanuc", *MEMBERS]), "round 0: fanuc; round 1: everyone"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["per_member"]["0"] == {m: e["action_mse"] for m, e in released.items()}
    assert "the held-out errors honda, softbank, sony released for that model are carried" in " ".join(
        (out / "console.txt").read_text().split()
    )
    # A run continued from that round 0 (its HEAD, had it died before round 1) would carry them on.
    second_id = json.loads((out / "run.json").read_text())["run"]
    assert same_model_evaluations(out, second_id, 0) == zero["evaluation_same_model"]


def test_a_round_that_changed_no_shard_carries_the_held_out_errors_of_the_round_before(tmp_path):
    """Nobody could train in rounds 1 and 2, so their model is round 0's: the errors released
    for it are carried (naming round 0), and only a member that released none is asked."""
    from shared_model.protocol import EVALUATE

    idle = dict.fromkeys(MEMBERS, "over budget")
    out, grid = _run(tmp_path, "idle", sitting_out=idle, withholding={"fanuc": "not due"})
    records = _records(out)
    run_id = json.loads((out / "run.json").read_text())["run"]
    released = records[0]["evaluation"]
    assert sorted(released) == ["honda", "softbank", "sony"]
    for rnd in (1, 2):
        assert records[rnd]["updated_shards"] == []
        assert records[rnd]["evaluation_same_model"] == {
            m: {**e, "run": run_id, "round": 0} for m, e in released.items()
        }
    asked = [name for kind, name, _ in grid.ledger_heads if kind == EVALUATE]
    assert sorted(asked) == sorted([*MEMBERS, "fanuc", "fanuc"]), "round 0: everyone; then fanuc alone"
    assert json.loads((out / "summary.json").read_text())["mean_mse"] == [0.5, 0.5, 0.5]
    assert "no shard changed: the held-out errors honda, softbank, sony" in " ".join(
        (out / "console.txt").read_text().split()
    )


def test_members_that_hold_the_earlier_model_are_sent_nothing_for_round_zero(first_run, tmp_path):
    held = tuple(sorted(set(ShardStore(first_run / "store").head_manifest().shards.values())))
    out, _ = _run(tmp_path, "second", f"continue_from={first_run}", "train.rounds=1", held=held)
    sent = _records(out)[0]["sync_bytes"]
    assert sum(sent.values()) == 0, sent
    assert all(_records(first_run)[0]["sync_bytes"][m] > 0 for m in MEMBERS)  # a fresh replica gets it all


def test_a_changed_source_object_is_refused_and_nothing_is_committed(first_run, tmp_path):
    copy = tmp_path / "first"
    shutil.copytree(first_run, copy)
    store = ShardStore(copy / "store")
    victim = sorted(set(store.head_manifest().shards.values()))[0]
    path = store.object_path(victim)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.unlink()  # a fresh inode: the first run's file stays intact
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptObjectError, match=victim):
        _run(tmp_path, "second", f"continue_from={copy}")
    assert ShardStore(tmp_path / "second" / "store").head() is None
    assert not (tmp_path / "second" / "rounds.jsonl").exists()


def test_import_copies_across_filesystems_and_reports_missing_objects(first_run, tmp_path, monkeypatch):
    first = ShardStore(first_run / "store")
    object_id = next(iter(first.head_manifest().shards.values()))
    target = ShardStore(tmp_path / "store")

    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    assert target.import_object(first, object_id) is True
    assert _object_file(target, object_id).st_ino != _object_file(first, object_id).st_ino
    assert target.read_object(object_id).data == first.read_object(object_id).data
    assert target.import_object(first, object_id) is False  # already there, intact
    with pytest.raises(MissingObjectError):
        target.import_object(ShardStore(tmp_path / "empty"), "ab" * 32)
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def _cfg(tmp_path: Path, source: Path, *overrides: str):
    return load_config(
        model="tiny", overrides=[*BASE, f"out_dir={tmp_path / 'next'}", f"continue_from={source}", *overrides]
    )


def test_refusals_say_what_to_do(first_run, tmp_path):
    with pytest.raises(ContinuationError, match="no committed round there"):
        earlier_round(_cfg(tmp_path, tmp_path / "nowhere"))
    with pytest.raises(ContinuationError, match="this run's own directory"):
        earlier_round(load_config(model="tiny", overrides=[f"out_dir={first_run}", f"continue_from={first_run}"]))
    with pytest.raises(ContinuationError, match="another model config"):
        earlier_round(_cfg(tmp_path, first_run, "model.n_experts=2"))
    with pytest.raises(ConfigError, match="continue_from and public.rounds > 0 both make round 0"):
        _cfg(tmp_path, first_run, "public.rounds=2")
    # The HEAD round's record missing (the coordinator died after committing it), or forged.
    for name, edit in (("unrecorded", lambda rs: rs[:-1]), ("forged", _forge)):
        copy = tmp_path / name
        shutil.copytree(first_run, copy)
        records = edit(_records(copy))
        (copy / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        with pytest.raises(ContinuationError, match="round 2 \\(its HEAD\\) has no valid signed record"):
            earlier_round(_cfg(tmp_path, copy))


def _forge(records: list[dict]) -> list[dict]:
    sig = records[-1]["coordinator"]["signature"]
    records[-1]["coordinator"]["signature"] = ("0" if sig[0] != "0" else "1") + sig[1:]
    return records


def test_demo_refuses_a_run_it_cannot_continue_before_anything_starts(tmp_path, capsys):
    from coordinator.cli import main

    data_root = tmp_path / "data"
    argv = ["demo", "--model", "tiny", f"continue_from={tmp_path / 'nowhere'}", f"data_root={data_root}"]
    assert main(argv) == 2
    assert "no committed round there" in capsys.readouterr().out
    assert not data_root.exists()  # no member prepared data


@pytest.mark.parametrize("case", ["consortium key", "another key", "forged"])
def test_the_auditor_checks_the_lineage_round_zero_names(first_run, tmp_path, case):
    """From round 0's manifest alone: a signature that does not verify is a failure; a valid
    one by a key other than the consortium's is a note (the demo signs each run with its own)."""
    import dataclasses

    from privacy.audit.consortium import Consortium
    from privacy.audit.findings import FAIL, NOTE, AuditResult
    from privacy.audit.verify import _check_lineage

    out, _ = _run(tmp_path, "second", f"continue_from={first_run}", "train.rounds=1")
    zero = ShardStore(out / "store").manifest(0)
    key = json.loads((first_run / "run.json").read_text())["coordinator_public_key"]
    if case == "forged":
        source = json.loads(zero.extra["initial"])
        sig = source["coordinator"]["signature"]
        source["coordinator"]["signature"] = ("1" if sig[0] == "0" else "0") + sig[1:]
        zero = dataclasses.replace(zero, extra={**zero.extra, "initial": json.dumps(source)})
    consortium = Consortium({}, coordinator_public_key=key if case != "another key" else "ef" * 32)
    result = AuditResult(run="second", ledgers_dir="", run_dir=str(out), consortium="")
    _check_lineage(result, consortium, zero)
    severities = [(f.severity, f.check) for f in result.findings]
    expected = {"consortium key": [], "another key": [(NOTE, "store")], "forged": [(FAIL, "store")]}[case]
    assert severities == expected, [f.text() for f in result.findings]
    if case == "forged":
        assert "the coordinator signature does not verify" in result.findings[0].text()


def test_a_stop_the_operator_asks_for_ends_the_run_after_the_round_in_flight(tmp_path):
    """``flwr stop`` in the middle of secure aggregation lost a round of every member's budget
    (each node masks a round's update once, and declines it on resume); ``kyodo-coordinator
    stop`` leaves a request the coordinator honours before its next round instead."""
    from coordinator.stop_request import STOP_REQUEST_FILE, request_stop
    from shared_model.protocol import TRAIN

    out = tmp_path / "run"

    class StopInRound(FakeGrid):
        stop_in = 1

        def push_messages(self, messages):
            messages = list(messages)
            records = out / "rounds.jsonl"
            committed = (
                [json.loads(line)["round"] for line in records.read_text().splitlines()] if records.exists() else []
            )
            if any(m.metadata.message_type == TRAIN for m in messages) and max(committed) == self.stop_in - 1:
                request_stop(out)  # the operator, while round stop_in trains
            return super().push_messages(messages)

    cfg = load_config(model="tiny", overrides=[*BASE, f"out_dir={out}", "train.rounds=3"])
    log = io.StringIO()
    run_federation(cfg, StopInRound(MEMBERS, RunState(cfg, tmp_path / "layout").layout), Console(file=log, width=300))
    assert [r["round"] for r in _records(out)] == [0, 1], "round 1 committed and evaluated, round 2 never began"
    assert all(r["evaluation"] for r in _records(out))
    assert ShardStore(out / "store").head_manifest().round == 1
    assert "stopped before round 2 as the operator asked at " in log.getvalue()
    assert not (out / STOP_REQUEST_FILE).exists(), "honoured once"
    # Resumed, it goes on from round 2; a stop asked for in its last round finds nothing left to
    # stop, and the request does not outlive the run.
    grid = StopInRound(MEMBERS, RunState(cfg, tmp_path / "layout").layout)
    grid.stop_in = 3
    run_federation(cfg, grid, Console(file=io.StringIO()))
    assert [r["round"] for r in _records(out)] == [0, 1, 2, 3]
    assert not (out / STOP_REQUEST_FILE).exists()
