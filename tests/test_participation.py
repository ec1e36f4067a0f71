"""Who trains a round: a node that says at query it cannot (no budget left, round already
trained) is left out of every cohort, and the round record keeps its reason.

A real RoundRunner over the in-process grid of ``tests.round_fakes``; the node side of the
same decision (query answers what train would) is in tests/test_member_node.py.
"""

from __future__ import annotations

import logging

import pytest

from coordinator.federation import initial_model
from coordinator.rounds import RoundRunner
from coordinator.run_state import RunState
from shared_model.config import load_config
from shared_model.protocol import QUERY
from tests.round_fakes import FakeGrid

EXHAUSTED = "privacy budget exhausted: epsilon 8 of 8 spent"


def test_a_member_that_cannot_train_is_in_no_cohort_and_the_round_says_why(tmp_path, caplog):
    cfg = load_config(model="tiny", overrides=["secagg.enabled=false", "train.min_cohort=3", "train.rounds=5"])
    state = RunState(cfg, tmp_path)
    state.commit_initial(initial_model(cfg), {"run": "t"})
    members = {m.name: m.embodiment for m in cfg.federation.members}
    grid = FakeGrid(members, state.layout, sitting_out={"sony": EXHAUSTED}, withholding={"honda": EXHAUSTED})
    runner = RoundRunner(cfg, grid, state, run_id="t", timeout=30)
    with caplog.at_level(logging.INFO, logger="kyodo"):
        result = runner.run_round(1)
    assert runner.eval_withheld == {"honda": EXHAUSTED} and "honda" not in result.evaluation
    # The query carried the round's plan, so a DP node can run the decision train would.
    query = grid.queries[0]
    assert (query.round, query.run, query.planned_rounds) == (1, "t", 5)
    assert query.hparams is not None and query.hparams.local_steps == cfg.train.local_steps
    assert "sony" not in result.plan.members and "sony" not in result.train
    assert all("sony" not in cohort for cohort in result.plan.cohorts.values())
    assert result.declined == {"sony": EXHAUSTED}
    # Three members remain: the shared shards still find their cohort of three and train.
    assert "adapter/shared" in result.updated_shards and "adapter/emb/so100" not in result.plan.cohorts
    assert f"sony sits out ({EXHAUSTED})" in caplog.text
    assert "sony" in result.evaluation, "a member without budget is still asked to evaluate"
    # The operator's round table lists the member with its reason.
    from rich.console import Console

    from coordinator.progress import round_table

    console = Console(width=200, record=True)
    console.print(round_table(result, {"sony": (8.0, 8.0)}))
    text = console.export_text()
    sony = next(line for line in text.splitlines() if line.startswith("│ sony"))
    assert "declined" in sony and "8.00/8" in sony
    # A node that reports less than the newest receipt the coordinator holds from it (its
    # ledger restored from a backup) is shown at what it signed for.
    console = Console(width=200, record=True)
    console.print(round_table(result, {"sony": (5.77, 8.0)}, held={"sony": 7.03}))
    sony = next(line for line in console.export_text().splitlines() if line.startswith("│ sony"))
    assert "7.03/8" in sony
    assert f"sony sat out: {EXHAUSTED}" in text
    # One whose reply failed after training took this round's receipt with it: at least that.
    result.failed["sony"] = "train error 5000: internal error on node: OSError"
    console = Console(width=200, record=True)
    console.print(round_table(result, {"sony": (5.77, 8.0)}, held={"sony": 7.03}))
    sony = next(line for line in console.export_text().splitlines() if line.startswith("│ sony"))
    assert ">=7.03/8" in sony


def test_a_node_gone_mid_round_is_named_by_the_request_it_left_unanswered(tmp_path, caplog):
    """Flower's SuperLink answers for a node that stopped heartbeating (``Node Unavailable``):
    the error reply comes from the SuperLink, and the failure is still that member's."""
    cfg = load_config(model="tiny", overrides=["secagg.enabled=false", "train.min_cohort=3"])
    state = RunState(cfg, tmp_path)
    state.commit_initial(initial_model(cfg), {"run": "t"})
    members = {m.name: m.embodiment for m in cfg.federation.members}
    grid = FakeGrid(members, state.layout, gone={"honda": {"train", "evaluate"}})
    runner = RoundRunner(cfg, grid, state, run_id="t", timeout=30)
    with caplog.at_level(logging.WARNING, logger="kyodo"):
        result = runner.run_round(1)
    assert set(result.failed) >= {"honda"} and "Node Unavailable" in result.failed["honda"]
    assert "?" not in result.failed and "honda" not in result.evaluation
    assert "honda: train error 5" in caplog.text and "honda: evaluate error 5" in caplog.text


def test_every_request_names_the_newest_receipt_the_coordinator_holds_even_after_a_restart(tmp_path):
    """The coordinator tells each node the newest of its receipts it holds (a node whose
    ledger lacks it was rolled back: tests/test_member_node.py). Newest by epsilon, which a
    ledger never lowers, so a re-sent older receipt does not move it back; a restarted
    coordinator takes the heads from its round records, and knows whose node is whose from
    the consortium's registrations before anyone has answered a query."""
    import json

    from privacy.ledger import entry_hash, receipt_to_json
    from shared_model.protocol import EVALUATE, QUERY, TRAIN

    cfg = load_config(
        model="tiny", overrides=["secagg.enabled=false", "train.min_cohort=2", "federation.members.1.node_id=4"]
    )
    state = RunState(cfg, tmp_path)
    state.commit_initial(initial_model(cfg), {"run": "t"})
    members = {m.name: m.embodiment for m in cfg.federation.members}
    grid = FakeGrid(members, state.layout)  # nodes 1.. in sorted name order: sony is node 4
    old, new = _signed_entries(tmp_path / "sony-ledger.jsonl", 2)
    records = [{"round": 1, "receipts": {"sony": old}, "evaluation": {"sony": {"receipt": receipt_to_json(new)}}}]
    runner = RoundRunner(cfg, grid, state, run_id="t", timeout=30)
    runner.restore_ledger_heads(json.loads(json.dumps(records)))  # as read back from rounds.jsonl
    runner.saw_receipt("sony", old)  # re-sent: older
    runner.run_round(2)
    heads = {(kind, name): head for kind, name, head in grid.ledger_heads}
    assert {heads[(kind, "sony")] for kind in (QUERY, TRAIN, EVALUATE)} == {entry_hash(new)}
    assert heads[(QUERY, "honda")] == heads[(TRAIN, "honda")] == "", "no receipt of honda's yet"


def _signed_entries(path, count: int, deltas: tuple[float, ...] = ()) -> list[dict]:
    """``count`` real signed entries of one ledger, each composing one more round (at
    ``deltas[i]`` when given: a member that raises its delta records a smaller epsilon)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from privacy.accountant import Mechanism, epsilon
    from privacy.ledger import Ledger

    ledger, entries = Ledger(path, Ed25519PrivateKey.generate()), []
    mechanism = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, "clipping_norm": 1.0}
    mechanism |= {"opacus_mode": "bk", "noise_source": "chacha20"}
    for rnd in range(1, count + 1):
        entries.append(
            ledger.append(
                run="t",
                round=rnd,
                member="sony",
                shards=["adapter/emb/so100"],
                mechanism=mechanism,
                dataset_fingerprint="sha256:" + "ab" * 32,
                epsilon=epsilon([Mechanism(1.0, 0.1, 10)] * rnd, deltas[rnd - 1] if deltas else 1e-5),
                delta=deltas[rnd - 1] if deltas else 1e-5,
                accountant="rdp",
                decision="full",
            )  # fmt: skip
        )
    return entries


def test_a_consortium_run_starts_from_the_heads_its_earlier_runs_recorded(tmp_path, caplog):
    """A ledger rolled back between runs: the new run takes each pinned member's newest
    receipt from the runs beside it, but only receipts its pinned ledger key signed (a
    simulated run's members start from fresh state, and are not pinned). A damaged earlier
    run is skipped, not fatal."""
    from coordinator.federation import _heads_from_earlier_runs
    from coordinator.records import append_record
    from privacy.ledger import entry_hash

    first, second = _signed_entries(tmp_path / "sony-ledger.jsonl", 2)
    stranger = _signed_entries(tmp_path / "other-ledger.jsonl", 3)[-1]  # spent more than sony's newest
    runs = tmp_path / "runs"
    append_record(runs / "1", {"round": 1, "receipts": {"sony": first}})
    append_record(runs / "2", {"round": 1, "ledger_heads": {"sony": second}})  # held, e.g. from a run before
    append_record(runs / "3", {"round": 1, "receipts": {"sony": stranger}})  # another key: not sony's
    (runs / "4").mkdir()
    (runs / "4" / "rounds.jsonl").write_text('{"round": 1, "recei')  # torn
    pin = f"federation.members.1.ledger_public_key={first['public_key']}"
    for overrides, expected in (([pin], entry_hash(second)), ([], "")):
        cfg = load_config(model="tiny", overrides=["secagg.enabled=false", *overrides])
        state = RunState(cfg, runs / "5")
        runner = RoundRunner(cfg, FakeGrid({}, state.layout), state, run_id="t", timeout=30)
        with caplog.at_level(logging.WARNING, logger="kyodo"):
            _heads_from_earlier_runs(runner, cfg, runs / "5")
        assert runner.ledger_head("sony") == expected
    assert "round records of" in caplog.text and "/4" in caplog.text


def test_the_head_follows_the_chain_not_the_largest_epsilon(tmp_path):
    """Every receipt the coordinator verifies moves the member's head to its newest entry:
    newest by the chain, not by epsilon, which falls when a member raises its delta."""
    from privacy.ledger import entry_hash, receipt_to_json

    older, newer = _signed_entries(tmp_path / "l.jsonl", 2, deltas=(1e-6, 1e-2))
    assert newer["epsilon"] < older["epsilon"]
    cfg = load_config(model="tiny")
    state = RunState(cfg, tmp_path / "run")
    runner = RoundRunner(cfg, FakeGrid({}, state.layout), state, run_id="t", timeout=30)
    runner.public_keys["sony"] = older["public_key"]
    for entry in (older, newer, older):  # the last one re-sent
        runner._signed_entry("sony", receipt_to_json(entry), {"member": "sony"}, "receipt")
    assert runner.ledger_head("sony") == entry_hash(newer)


def test_a_resumed_run_sends_the_heads_its_round_records_hold(tmp_path):
    """The coordinator died after round 1; on resume the receipts it kept in ``rounds.jsonl``
    are the heads it sends again, before any node has sent a new receipt, and in the query
    already, so a rolled-back node sits the round out instead of breaking a cohort at train."""
    import io
    import json

    from rich.console import Console

    from coordinator.federation import run_federation
    from privacy.ledger import entry_hash
    from shared_model.protocol import QUERY, TRAIN

    (receipt,) = _signed_entries(tmp_path / "sony-ledger.jsonl", 1)
    base = ["secagg.enabled=false", "train.min_cohort=2", f"out_dir={tmp_path / 'run'}"]
    members = {"honda": "aloha", "sony": "so100", "softbank": "agv", "fanuc": "franka"}
    for rounds in (1, 2):
        cfg = load_config(model="tiny", overrides=[*base, f"train.rounds={rounds}"])
        grid = FakeGrid(members, RunState(cfg, tmp_path / "layout").layout)
        run_federation(cfg, grid, Console(file=io.StringIO()))
        if rounds == 1:
            # As a DP node's train reply would have left it in round 1's record.
            records = tmp_path / "run" / "rounds.jsonl"
            lines = [json.loads(line) for line in records.read_text().splitlines()]
            lines[-1]["receipts"] = {"sony": receipt}
            records.write_text("".join(json.dumps(line) + "\n" for line in lines))
            assert {head for _, name, head in grid.ledger_heads if name == "sony"} == {""}
    # Node ids are not pinned here: the first query could not know which node is sony's, so
    # sony's node is asked again with its head before the round is planned.
    queries = {name: [h for kind, n, h in grid.ledger_heads if kind == QUERY and n == name] for name in members}
    assert queries == {"honda": [""], "sony": ["", entry_hash(receipt)], "softbank": [""], "fanuc": [""]}
    assert [h for kind, n, h in grid.ledger_heads if kind == TRAIN and n == "sony"] == [entry_hash(receipt)]
    # Round 2's record keeps the head it held, for an auditor of this run alone (sony's node
    # may only have declined here, leaving no receipt of this run to miss).
    last = json.loads((tmp_path / "run" / "rounds.jsonl").read_text().splitlines()[-1])
    assert last["round"] == 2 and last["ledger_heads"] == {"sony": receipt} and last["evaluation_withheld"] == {}


def _runner_with_keys(tmp_path, keys: dict[str, str]):
    cfg = load_config(model="tiny", overrides=["secagg.enabled=false", "train.min_cohort=2"])
    state = RunState(cfg, tmp_path / "run")
    state.commit_initial(initial_model(cfg), {"run": "t"})
    grid = FakeGrid({m.name: m.embodiment for m in cfg.federation.members}, state.layout, public_keys=keys)
    return RoundRunner(cfg, grid, state, run_id="t", timeout=1), grid


@pytest.mark.parametrize("second", [None, "honda"], ids=["then-silent", "then-as-itself"])
def test_a_claim_withdrawn_on_the_second_query_leaves_the_member_untouched(tmp_path, caplog, second):
    """Honda's node answers as sony (node ids are not pinned), so it is asked again with
    sony's head, and then stays silent or answers as honda. Its claim on sony still counts:
    both nodes are left out, as before the second query existed, and sony's key stays the one
    sony's node reported (receipts and secure aggregation are checked against it)."""
    from privacy.ledger import receipt_to_json

    (receipt,) = _signed_entries(tmp_path / "sony-ledger.jsonl", 1)
    keys = {"honda": "11" * 32, "sony": receipt["public_key"], "softbank": "22" * 32, "fanuc": "33" * 32}
    runner, grid = _runner_with_keys(tmp_path, keys)
    assert sorted(m.name for m in runner.query(1).values()) == sorted(keys)
    runner.saw_receipt("sony", receipt)
    grid.script = {"honda": ["sony", second]}
    with caplog.at_level(logging.INFO, logger="kyodo"):
        members = {m.name for m in runner.query(2).values()}
    assert "sony" not in members and "claim the same member name ['sony']" in caplog.text
    assert runner.public_keys["sony"] == keys["sony"]
    runner._signed_entry("sony", receipt_to_json(receipt), {"member": "sony"}, "receipt")  # still verifies


def test_a_node_that_answers_its_second_query_as_another_member_is_left_out(tmp_path, caplog):
    """Asked with sony's head, a node answers as honda: it was never asked with honda's head,
    so its answer cannot stand for honda's (and its claim on sony counts as one)."""
    (sony,) = _signed_entries(tmp_path / "sony-ledger.jsonl", 1)
    (honda,) = _signed_entries(tmp_path / "honda-ledger.jsonl", 1)
    runner, grid = _runner_with_keys(tmp_path, {})
    runner.saw_receipt("sony", sony)
    runner.saw_receipt("honda", honda)
    grid.script = {"honda": ["sony", "honda"]}
    with caplog.at_level(logging.INFO, logger="kyodo"):
        members = {m.name for m in runner.query(1).values()}
    assert "honda" not in members and "answered as 'sony', then as 'honda': left out" in caplog.text
    assert "sony" not in members, "its first claim stands beside sony's own node: both are left out"


def test_the_second_answer_replaces_the_first(tmp_path):
    """Asked without its head, sony's node says it cannot train; asked again with it, it can:
    it trains, and the round does not say it sat out. Silent the second time, it is left out."""
    (receipt,) = _signed_entries(tmp_path / "sony-ledger.jsonl", 1)
    runner, grid = _runner_with_keys(tmp_path, {})
    runner.saw_receipt("sony", receipt)
    grid.script = {"sony": [("sony", "some reason"), "sony"]}
    members = {m.name: m for m in runner.query(1).values()}
    assert members["sony"].can_train and "sony" not in runner.sits_out
    grid.script = {"sony": ["sony", None]}
    runner.members = {}  # as after a restart
    assert "sony" not in {m.name for m in runner.query(2).values()}


def test_the_summary_says_withheld_when_no_member_released_a_held_out_error():
    """A round in which every DP node withheld its release (or sat out) has no mean: it says
    so rather than print NaN."""
    from rich.console import Console

    from coordinator.progress import summary_table
    from shared_model.protocol import EvaluateReply

    console = Console(width=80, record=True)
    console.print(summary_table([(0, {"sony": EvaluateReply("sony", 10, 0.25, 0.1)}), (1, {})]))
    rows = [line.replace("│", " ").split() for line in console.export_text().splitlines()]
    assert ["0", "0.2500", "0.2500"] in rows and ["1", "-", "withheld"] in rows
    assert "nan" not in console.export_text()
    # Members release on their own schedules: a mean over some of them says over how many.
    both = {m: EvaluateReply(m, 10, v, 0.1) for m, v in (("sony", 0.25), ("honda", 0.75))}
    console = Console(width=80, record=True)
    console.print(summary_table([(0, both), (1, {"honda": both["honda"]})]))
    rows = [line.replace("│", " ").split() for line in console.export_text().splitlines()]
    assert ["0", "0.7500", "0.2500", "0.5000"] in rows and ["1", "0.7500", "-", "0.7500", "(1", "of", "2)"] in rows


def test_the_cohort_table_after_a_round_says_which_planned_shards_were_not_updated():
    from rich.console import Console

    from coordinator.planner import RoundPlan
    from coordinator.progress import cohort_table

    plan = RoundPlan(
        3,
        cohorts={"adapter/shared": ["honda", "sony"], "expert/L0/E1": ["sony", "beta"], "adapter/emb/so100": ["sony"]},
        skipped={"expert/L1/E0": "rotation"},
    )
    console = Console(width=200, record=True)
    console.print(cohort_table(plan))
    console.print(cohort_table(plan, ["adapter/emb/so100"]))
    text = " ".join(console.export_text().split())
    assert text.count("1 shards not planned this round (rotation or cohort too small)") == 2
    assert "2 planned shards not updated (adapter/shared, expert/L0/E1): see the warnings above" in text


def test_a_member_pinned_to_an_older_consortium_file_sits_out_before_anyone_trains(tmp_path):
    """A node pinned to a file that lacks a cohort member refuses that cohort at share keys,
    after every member of it trained and paid: a walkthrough lost two members' shared shards
    for two rounds so. The nodes say at query whom they pinned; the coordinator seats only
    members that pinned each other, and names the fix."""
    cfg = load_config(model="tiny", overrides=["train.min_cohort=3", "train.rounds=5"])
    assert cfg.secagg.enabled
    state = RunState(cfg, tmp_path)
    state.commit_initial(initial_model(cfg), {"run": "t"})
    members = {m.name: m.embodiment for m in cfg.federation.members}
    everyone = sorted(members)
    # sony pinned the file when it listed sony alone; fanuc pins none (it is not checked).
    pinned = {"sony": ["sony"], "honda": everyone, "softbank": everyone}
    grid = FakeGrid(members, state.layout, pinned=pinned)
    runner = RoundRunner(cfg, grid, state, run_id="t", timeout=30)
    runner.query(1)
    assert grid.queries[0].roster == everyone, "the query names the consortium's roster"
    assert set(runner.sits_out) == {"sony"}
    assert "does not list fanuc, honda, softbank" in runner.sits_out["sony"]
    assert "kyodo-member trust" in runner.sits_out["sony"]
    plan = runner.plan(1)
    assert "sony" not in plan.members and set(plan.members) == {"honda", "softbank", "fanuc"}
    assert grid.notices == {}, "sony's own node already logs what its file lacks: no notice"

    # A member admitted before the others pinned it: it sits out, not the three that lack it.
    grid = FakeGrid(members, state.layout, pinned={m: [n for n in everyone if n != "fanuc"] for m in everyone}
                    | {"fanuc": everyone})  # fmt: skip
    runner = RoundRunner(cfg, grid, state, run_id="t", timeout=30)
    runner.query(1)
    assert list(runner.sits_out) == ["fanuc"]
    assert "honda, softbank, sony pinned a consortium file that does not list it" in runner.sits_out["fanuc"]
    # Its own file is the newest, so only a notice from the coordinator tells its node why.
    assert list(grid.notices) == ["fanuc"]
    assert grid.notices["fanuc"].not_pinned_by == ["honda", "softbank", "sony"]
    assert (grid.notices["fanuc"].round, grid.notices["fanuc"].run) == (1, "t")

    # Without secure aggregation nothing checks pinned keys: nobody is left out for them.
    cfg = load_config(model="tiny", overrides=["secagg.enabled=false", "train.min_cohort=3"])
    runner = RoundRunner(cfg, FakeGrid(members, state.layout, pinned=pinned), state, run_id="t", timeout=30)
    runner.query(1)
    assert runner.sits_out == {}


def test_a_round_with_fewer_than_a_cohort_able_to_train_warns_that_only_adapters_train(tmp_path, caplog):
    """Two of four out of budget leave two who can train: no expert or shared adapter gets a
    cohort of three, yet both still spend a round of budget on their own robot's adapter."""
    cfg = load_config(model="tiny", overrides=["secagg.enabled=false", "train.min_cohort=3"])
    state = RunState(cfg, tmp_path)
    state.commit_initial(initial_model(cfg), {"run": "t"})
    members = {m.name: m.embodiment for m in cfg.federation.members}
    grid = FakeGrid(members, state.layout, sitting_out={"sony": EXHAUSTED, "fanuc": EXHAUSTED})
    runner = RoundRunner(cfg, grid, state, run_id="t", timeout=30)
    runner.query(1)
    with caplog.at_level(logging.INFO, logger="kyodo"):
        plan = runner.plan(1)
    assert set(plan.cohorts) == {"adapter/emb/aloha", "adapter/emb/agv"}
    assert "round 1 trains embodiment adapters only: 2 member(s) can train" in caplog.text
    assert "train.min_cohort (3)" in caplog.text

    # With three able to train the shared shards have their cohort: no warning.
    caplog.clear()
    grid = FakeGrid(members, state.layout, sitting_out={"sony": EXHAUSTED})
    runner = RoundRunner(cfg, grid, state, run_id="t", timeout=30)
    runner.query(1)
    with caplog.at_level(logging.INFO, logger="kyodo"):
        plan = runner.plan(1)
    assert "adapter/shared" in plan.cohorts and "adapters only" not in caplog.text


def test_a_member_absent_from_a_round_has_its_reason_recorded(tmp_path):
    """The participation table's "-" said only that a member was not there; why (its node not
    connected, silent, or erring at query) was in the coordinator's log alone."""
    cfg = load_config(model="tiny", overrides=["secagg.enabled=false", "train.min_cohort=1"])
    state = RunState(cfg, tmp_path)
    state.commit_initial(initial_model(cfg), {"run": "t"})
    members = {m.name: m.embodiment for m in cfg.federation.members}
    grid = FakeGrid(members, state.layout, gone={"fanuc": {QUERY}})
    runner = RoundRunner(cfg, grid, state, run_id="t", timeout=2)
    gone = "its node was unavailable when the round began (the SuperLink answered for it: Error: Node Unavailable"
    runner.query(1)  # nothing ties the erring node to fanuc yet (no registered node ids here)
    assert runner.absent["fanuc"].startswith(f"no node answered as it; connected nodes of unknown members gave: {gone}")
    assert list(runner.absent) == ["fanuc"]
    grid.gone = {}
    runner.query(2)  # now every node has answered once: whose node is whose is known
    assert runner.absent == {}
    grid.gone = {"fanuc": {QUERY}}
    grid.script["sony"] = [None]  # its node stays connected but never answers
    honda = next(node for node, name in grid.names.items() if name == "honda")
    del grid.names[honda]  # disconnected: the SuperLink no longer lists it
    runner.query(3)
    assert runner.absent["fanuc"].startswith(gone) and runner.absent["fanuc"].endswith("did not heartbeat)")
    assert {m: why for m, why in runner.absent.items() if m != "fanuc"} == {
        "honda": "its node was not connected when the round began",
        "sony": "its node did not answer the query in time",
    }
    assert [m.name for m in runner.members.values()] == ["softbank"]


def test_the_coordinator_warns_of_a_node_that_holds_more_than_its_member_published(tmp_path, caplog):
    """A deployed node enforces its own budget; a walkthrough's member raised it without
    publishing it and spent 7.2 against a published 2, seen only after the run."""
    cfg = load_config(
        model="tiny",
        overrides=["secagg.enabled=false", "federation.members.1.epsilon=2", "federation.members.3.epsilon=8"],
    )
    assert [m.name for m in cfg.federation.members][1::2] == ["sony", "fanuc"]
    state = RunState(cfg, tmp_path)
    state.commit_initial(initial_model(cfg), {"run": "t"})
    members = {m.name: m.embodiment for m in cfg.federation.members}
    budgets = {"honda": (7.0, 8.0), "sony": (1.0, 8.0), "fanuc": (8.5, 9.0), "softbank": (0.0, 0.0)}
    grid = FakeGrid(members, state.layout, budgets=budgets)
    runner = RoundRunner(cfg, grid, state, run_id="t", timeout=30)
    with caplog.at_level(logging.WARNING, logger="kyodo"):
        runner.query(1)
        runner.query(2)
    said = caplog.text
    assert said.count("sony holds an epsilon budget of 8, above the 2 it published: the audit fails") == 1
    assert said.count("fanuc has spent epsilon 8.5, over the 8 it published") == 1, "once per run"
    assert "honda" not in said and "softbank" not in said
    assert "kyodo-member budget" in said and "add-member --update" in said


def test_a_shard_secure_aggregation_could_not_recover_names_who_sent_no_update():
    """ "2 of 3 members shared keys" names no one: the shard's reason says who sat out and why."""
    from coordinator.planner import RoundPlan
    from coordinator.rounds import RoundResult, _sat_out

    result = RoundResult(round=1, plan=RoundPlan(1), declined={"sony": "the round seats fanuc ..."})
    result.failed["honda"] = "no train reply in time"
    result.train["softbank"] = object()
    assert _sat_out(["honda", "softbank", "sony"], result) == (
        " (honda: no train reply in time; sony: the round seats fanuc ...)"
    )
    assert _sat_out(["softbank"], result) == ""
