"""``kyodo-member status`` on a long-lived node's ledger: runs summarised, the latest entries
listed, nothing cut at 80 columns; a short ledger of one run lists every entry as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from member_node.cli import main
from privacy.accountant import Mechanism, epsilon
from privacy.keys import load_or_create_signing_key, public_key_hex
from privacy.ledger import RELEASE_EVALUATION, Ledger

DELTA = 1e-5
MECHANISM = {
    "noise_multiplier": 2.0,
    "sample_rate": 0.08,
    "steps": 25,
    "clipping_norm": 1.0,
    "opacus_mode": "bk",
    "noise_source": "chacha20",
}
LONG_RUN = "consortium-2026-q4-lifelong-" + "x" * 12 + "-0a1b2c3d"


def _state_dir(root: Path, runs: dict[str, int], budgets: dict[str, float] | None = None) -> Path:
    """A node state directory whose ledger trained ``runs[run]`` rounds in each run, in order,
    and released one held-out error after the last round of each; ``budgets[run]`` is declared
    before the run's first release."""
    key = load_or_create_signing_key(root / "member_ed25519.pem")
    member = {"member": "sony", "embodiment": "so100", "epsilon": 64.0, "delta": DELTA, "accountant": "rdp"}
    (root / "member.json").write_text(json.dumps(member | {"public_key": public_key_hex(key)}))
    ledger, history = Ledger(root / "ledger.jsonl", key), []
    for run, rounds in runs.items():
        if run in (budgets or {}):
            ledger.declare_budget("sony", budgets[run], DELTA)
        for rnd in range(1, rounds + 1):
            releases = ["dp-sgd", RELEASE_EVALUATION] if rnd == rounds else ["dp-sgd"]
            for release in releases:
                training = release == "dp-sgd"
                mechanism = (
                    MECHANISM if training else MECHANISM | {"noise_multiplier": 20.0, "sample_rate": 1.0, "steps": 1}
                )
                history.append(Mechanism(mechanism["noise_multiplier"], mechanism["sample_rate"], mechanism["steps"]))
                ledger.append(
                    run=run,
                    round=rnd,
                    member="sony",
                    shards=["adapter/emb/so100"] if training else [],
                    mechanism=mechanism,
                    dataset_fingerprint="sha256:" + "ab" * 32,
                    epsilon=epsilon(history, DELTA),
                    delta=DELTA,
                    accountant="rdp",
                    decision="full",
                    release=release,
                )
    return root


def _status(capsys, state_dir: Path, *extra: str) -> list[str]:
    assert main(["status", "--state-dir", str(state_dir), "--plot", str(state_dir / "eps.png"), *extra]) == 0
    out = capsys.readouterr().out
    assert "…" not in out, "no number, header or run number is cut"
    assert max(map(len, out.splitlines())) <= 80
    return out.splitlines()


@pytest.fixture(autouse=True)
def _eighty_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")


def test_a_long_ledger_is_summarised_by_run_and_lists_its_latest_entries(tmp_path, capsys):
    runs = {f"run-{i}": 3 for i in range(1, 12)} | {LONG_RUN: 4}
    lines = _status(capsys, _state_dir(tmp_path, runs))
    text = "\n".join(lines)
    # 12 runs: the last 10 in the runs table, each with its number, trainings and evaluation.
    assert "the last 10 of 12 runs (--all: every one)" in text
    assert not any(line.split()[:2] == ["#2", "run-2"] for line in lines)
    assert any(
        line.split()[:6] == ["#3", "run-3", "3", "1", "1-3", f"{_eps_after(tmp_path, 'run-3'):.3f}"] for line in lines
    )
    assert LONG_RUN[:20] in text and LONG_RUN[-8:] in text, "a long run id folds instead of being cut"
    # The entries table: the last 20 of 49 releases, each naming its run by number.
    assert "the last 20 of 49 entries (--all: every one)" in text
    entry_lines = [
        line.split() for line in lines if line.strip().startswith("#") and line.split()[2:3] in (["train"], ["eval"])
    ]
    assert len(entry_lines) == 20 and entry_lines[-1][:3] == ["#12", "4", "eval"]
    assert "ledger verified: 49 entries" in text

    every = _status(capsys, tmp_path, "--all")
    assert sum(1 for line in every if line.split()[2:3] in (["train"], ["eval"])) == 49
    assert "of 12 runs" not in "\n".join(every) and any(line.split()[:2] == ["#1", "run-1"] for line in every)


def test_a_short_ledger_of_one_run_lists_every_entry_with_what_is_left(tmp_path, capsys):
    lines = _status(capsys, _state_dir(tmp_path, {"demo-0a1b": 4}))
    text = "\n".join(lines)
    assert "run demo-0a1b" in text and "ε left" in text and "runs" not in text
    entries = [line.split() for line in lines if line.split()[1:2] in (["train"], ["eval"])]
    assert [e[:2] for e in entries] == [["1", "train"], ["2", "train"], ["3", "train"], ["4", "train"], ["4", "eval"]]


def _eps_after(state_dir: Path, run: str) -> float:
    return [e for e in Ledger(state_dir / "ledger.jsonl").releases() if e["run"] == run][-1]["epsilon"]


def test_status_lists_the_budgets_the_ledger_declared(tmp_path, capsys):
    """A node declares its budget before the first release under it: status shows when the
    member raised it, and that a budget the node runs with now is declared at its next release."""
    state = _state_dir(tmp_path, {"run-1": 2, "run-2": 1}, budgets={"run-1": 32.0, "run-2": 64.0})
    text = "\n".join(_status(capsys, state))
    assert "budget declared in the signed ledger:" in text
    assert "ε=32 δ=1e-05 from release 1 (" in text and "ε=64 δ=1e-05 from release 4 (" in text
    assert "ledger verified: 5 entries" in text and "before its next release" not in text
    from member_node.status import declared_steps

    assert declared_steps(Ledger(state / "ledger.jsonl").entries()) == [(0, 32.0), (3, 64.0)]

    member = json.loads((state / "member.json").read_text())
    (state / "member.json").write_text(json.dumps(member | {"epsilon": 80.0}))
    assert "the node declares ε=80 δ=1e-05 before its next release" in "\n".join(_status(capsys, state))


def test_the_sent_column_says_what_left_not_what_was_spent(tmp_path, capsys):
    """A ledger entry is written before the update leaves: a node killed after it, or a round
    whose secure aggregation ended before the masked input, spent and sent nothing."""
    from member_node.sent_updates import MASKED, PLAIN, note_sent, start_noting

    state = _state_dir(tmp_path, {"demo-0a1b": 4})
    trained = [line for line in _status(capsys, state) if line.split()[1:2] == ["train"]]
    assert all(line.rstrip().endswith(" Δ") for line in trained), "a node that noted nothing says what it did before"
    start_noting(state)
    note_sent(state, "demo-0a1b", 1, MASKED)
    note_sent(state, "demo-0a1b", 2, PLAIN)
    with open(state / "sent_updates.jsonl", "a") as torn:
        torn.write('{"run": "demo-0a1b", "rou')  # a crash mid-line: skipped
    trained = [line.rstrip() for line in _status(capsys, state) if line.split()[1:2] == ["train"]]
    assert [line.split()[0] for line in trained] == ["1", "2", "3", "4"]
    assert trained[0].endswith(" Δ") and trained[1].endswith(" Δ")
    assert trained[2].endswith(" -") and trained[3].endswith(" -")


def test_a_plot_that_cannot_be_written_leaves_the_table_and_exit_status_alone(tmp_path, capsys):
    """On a read-only state directory status printed its table, then a traceback, exit 1."""
    state_dir = _state_dir(tmp_path, {"demo-0a1b": 2})
    (tmp_path / "blocked").write_text("a file where the plot's directory should be")
    assert main(["status", "--state-dir", str(state_dir), "--plot", str(tmp_path / "blocked" / "eps.png")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "run demo-0a1b" in out and "plot not written" in out and "--plot PATH writes it elsewhere" in out


def test_entries_are_recomputed_with_the_accountant_they_record(tmp_path, capsys):
    """A node whose runs switched accountants (a run's privacy.accountant, or the member's own
    pin) read 'NOT verified' on every entry of the other accountant: the auditor passed it."""
    state_dir = _state_dir(tmp_path, {"demo-0a1b": 2})
    member = json.loads((state_dir / "member.json").read_text())
    (state_dir / "member.json").write_text(json.dumps(member | {"accountant": "prv"}))  # the newest run's
    lines = _status(capsys, state_dir)
    assert any("ledger verified" in line for line in lines), lines


def test_a_node_without_dp_says_no_budget_holds_not_that_all_of_it_is_left(tmp_path, capsys):
    """A live check's --no-dp member read 'ε spent 0.000 of 8, 8.000 left' after 9 exact rounds."""
    state_dir = _state_dir(tmp_path, {})
    member = json.loads((state_dir / "member.json").read_text())
    (state_dir / "member.json").write_text(json.dumps(member | {"dp": False}))
    assert main(["status", "--state-dir", str(state_dir)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "this node trains without DP (dp: false)" in out and "no budget holds" in out and "left" not in out
