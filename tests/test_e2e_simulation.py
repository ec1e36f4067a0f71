"""End to end: the real ServerApp and ClientApps under Flower's simulation engine (Ray).

Runs ``kyodo-coordinator demo`` as a separate process (as a user would) on ``tiny`` with
the 4-member default federation for 2 rounds, then checks the outcome on disk.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from shared_model.shards import shard_of
from shared_model.store import ShardStore

pytestmark = pytest.mark.slow


MEMBERS = ("honda", "sony", "softbank", "fanuc")
# The default federation's members with 200 episodes each instead of 2000: the outcomes
# checked here do not need the data DP-SGD's utility does, and CI has 2 cores.
SMALL_DATA = tuple(f"federation.members.{i}.episodes=200" for i in range(len(MEMBERS)))


def _demo(root: Path, *overrides: str, rounds: int = 2):
    out_dir, data_root = root / "run", root / "data"
    cmd = [
        sys.executable, "-m", "coordinator.cli", "demo", "--model", "tiny", "--rounds", str(rounds),
        f"out_dir={out_dir}", f"data_root={data_root}", "train.local_steps=30", "train.lr=0.005",
        *SMALL_DATA, *overrides,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out_dir, data_root, proc.stdout


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Members switched DP off (their own debugging switch): checks that the model learns."""
    return _demo(tmp_path_factory.mktemp("demo"), *(f"federation.members.{i}.dp=false" for i in range(4)))


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    """The default: every member trains with DP-SGD within its own budget (epsilon 8).

    1000 episodes per member, not 200: DP-SGD's noise per step scales with 1/episodes, and
    at 200 the relative-action policy barely moves off holding still (0.98x in 2 rounds).
    Steps, not episodes, set the training time. 3 rounds, not 2: after 2 the mean held-out
    error was 0.90-0.98x of the initial one (the noise is drawn afresh every run), after 3
    0.75-0.78x. The sample rate is the one those numbers were measured at (128 / 800
    training episodes); every receipt must then carry exactly it."""
    episodes = (f"federation.members.{i}.episodes=1000" for i in range(4))
    return _demo(tmp_path_factory.mktemp("dp"), *episodes, "privacy.sample_rate=0.16", rounds=3)


@pytest.fixture(scope="module")
def published_checkpoint(tmp_path_factory):
    """The operator's round-0 checkpoint, made once with ``kyodo-coordinator pretrain``."""
    out = tmp_path_factory.mktemp("public") / "round0.safetensors"
    cmd = [
        sys.executable, "-m", "coordinator.cli", "pretrain", "--model", "tiny", "--rounds", "2", "--out", str(out),
        "public.episodes=24", "train.local_steps=10", "train.batch_size=16",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, hashlib.sha256(out.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def plaintext_run(tmp_path_factory, published_checkpoint):
    """Secure aggregation switched off (the operator's debugging switch), one round, from
    the published public checkpoint."""
    path, digest = published_checkpoint
    checkpoint = (f"public.checkpoint={path}", f"public.checkpoint_sha256={digest}")
    return _demo(tmp_path_factory.mktemp("plain"), "secagg.enabled=false", *checkpoint, rounds=1)


def test_secure_aggregation_can_be_switched_off_and_the_record_says_so(plaintext_run):
    out_dir, _, _ = plaintext_run
    records = [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    assert records[1]["secure_aggregation"] is False
    assert records[1]["updated_shards"]
    assert set(records[1]["aggregation"].values()) == {"plaintext"}
    assert records[1]["absent"] == {}, "every member's node answered"


def test_a_run_starts_from_the_published_checkpoint_and_records_its_hash(plaintext_run, published_checkpoint):
    out_dir, _, _ = plaintext_run
    path, digest = published_checkpoint
    want = safetensors.torch.load_file(str(path))
    store = ShardStore(out_dir / "store")
    got = store.load_model(0)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    source = {"source": "public-checkpoint", "sha256": f"sha256:{digest}"}
    assert json.loads(store.manifest(0).extra["initial"]) == source
    record = json.loads((out_dir / "rounds.jsonl").read_text().splitlines()[0])
    assert record["round"] == 0 and record["initial"] == source


def test_every_member_prepared_its_own_data(demo_run):
    _, data_root, _ = demo_run
    for member in MEMBERS:
        assert (data_root / member / "meta" / "info.json").is_file()


def test_rounds_were_recorded(demo_run):
    out_dir, _, stdout = demo_run
    records = [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for rec in records[1:]:
        assert set(rec["train"]) == {"honda", "sony", "softbank", "fanuc"}, rec["failed"]
        assert set(rec["evaluation"]) == {"honda", "sony", "softbank", "fanuc"}
        assert rec["updated_shards"], "something was trained"
        for shard, cohort in rec["cohorts"].items():
            if not shard.startswith("adapter/emb/"):
                assert len(cohort) >= 3
        # Secure aggregation is on by default: every shard with a cohort of several members
        # was aggregated from masked updates; a one-owner embodiment adapter is marked as such.
        assert rec["secure_aggregation"] is True
        for shard in rec["updated_shards"]:
            expected = "secagg" if len(rec["cohorts"][shard]) > 1 else "single"
            assert rec["aggregation"][shard] == expected
    assert "Held-out action error" in stdout


def test_members_receive_only_the_shards_that_changed(demo_run):
    """Incremental sync: round 0 sends every object once; afterwards a member receives, per
    round, exactly the objects of the shards that round changed (counted in bytes)."""
    out_dir, _, _ = demo_run
    records = [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines()]
    store = ShardStore(out_dir / "store")
    full = sum(store.object_size(oid) for oid in store.manifest(0).shards.values())
    assert records[0]["sync_bytes"] == {m: full for m in MEMBERS}
    for rnd in (1, 2):
        before, after = store.manifest(rnd - 1).shards, store.manifest(rnd).shards
        changed = sum(store.object_size(after[s]) for s in after if after[s] != before[s])
        assert 0 < changed < full  # the backbone, and experts not scheduled, never travel again
        assert records[rnd]["sync_bytes"] == {m: changed for m in MEMBERS}, records[rnd]["sync_bytes"]


def test_model_changed_only_in_trained_shards(demo_run):
    out_dir, _, _ = demo_run
    records = [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines()]
    trained = {s for rec in records[1:] for s in rec["updated_shards"]}
    store = ShardStore(out_dir / "store")
    assert store.head().round == 2
    before, after = store.load_model(0), store.load_model(2)
    assert before.keys() == after.keys()
    # Each round wrote only the shards it changed: the rest keep round 0's objects.
    m0, m2 = store.manifest(0), store.manifest(2)
    assert {s for s in m0.shards if m0.shards[s] != m2.shards[s]} <= trained
    changed = {shard_of(name) for name in before if not torch.equal(before[name], after[name])}
    assert changed, "the model did not change"
    assert changed <= trained, f"shards changed without being trained: {changed - trained}"
    assert "backbone" not in changed
    assert any(s.startswith("expert/") for s in changed)
    assert "adapter/shared" in changed
    # LoRA A is frozen from its seed: only B moves.
    for name in before:
        if ".lora_A." in name:
            assert torch.equal(before[name], after[name])


def test_held_out_error_falls(demo_run):
    out_dir, _, _ = demo_run
    summary = json.loads((out_dir / "summary.json").read_text())
    first, last = summary["mean_mse"][0], summary["mean_mse"][-1]
    assert last < 0.7 * first, summary["mean_mse"]
    for member, mse in summary["per_member"]["2"].items():
        assert mse < summary["per_member"]["0"][member], member


def test_dp_run_records_verified_receipts_within_budget(dp_run):
    from privacy.keys import load_public_key
    from privacy.ledger import Ledger, verify_chain

    out_dir, _, stdout = dp_run
    records = [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines()]
    for rec in records[1:]:
        assert set(rec["receipts"]) == set(rec["train"]) == set(MEMBERS), (rec["failed"], rec["declined"])
    for member in MEMBERS:
        state = out_dir / "nodes" / member
        meta = json.loads((state / "member.json").read_text())
        ledger = Ledger(state / "ledger.jsonl")
        assert verify_chain(ledger.entries(), load_public_key(meta["public_key"])) == []
        # The budget the node enforced is declared, signed, before the first release.
        assert ledger.entries()[0]["budget"] == {"epsilon": meta["epsilon"], "delta": meta["delta"]}
        assert len(ledger.budgets()) == 1
        entries = ledger.releases()
        trained = [e for e in entries if e["release"] == "dp-sgd"]
        assert [e["round"] for e in trained] == [1, 2, 3]
        assert all(e["epsilon"] <= meta["epsilon"] for e in entries)
        # The coordinator's copy of each receipt is exactly the member's ledger entry.
        assert [records[r]["receipts"][member] for r in (1, 2, 3)] == trained
        # q is the consortium's public rate, not batch / this member's episodes (its size).
        assert {e["mechanism"]["sample_rate"] for e in trained} == {0.16}
    assert "ε spent" in stdout


def test_the_auditor_verifies_the_real_run(dp_run, tmp_path):
    """kyodo-audit on the run as an auditor gets it: ledgers, round records, store."""
    out_dir, _, _ = dp_run
    consortium = tmp_path / "consortium.yaml"
    audit = [sys.executable, "-m", "privacy.audit.cli"]
    made = subprocess.run(
        [*audit, "consortium", "--from-nodes", str(out_dir / "nodes"), "-o", str(consortium),
         "--coordinator-from", str(out_dir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    inputs = ["--ledgers", str(out_dir / "nodes"), "--rounds", str(out_dir), "--consortium", str(consortium)]
    proc = subprocess.run([*audit, "verify", *inputs, "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert not [f for f in result["findings"] if f["severity"] == "fail"]
    assert not [f for f in result["findings"] if "signatures not checked" in f["message"]]
    # Each round's record is the one committed with its manifest, receipts included.
    for rnd in (1, 2, 3):
        committed = json.loads(ShardStore(out_dir / "store").manifest(rnd).extra["round_record"])
        assert set(committed["receipts"]) == set(MEMBERS)


def _exact_held_out_mse(out_dir: Path, data_root: Path, round_number: int) -> dict[str, float]:
    """Each member's true held-out error on a committed model: what this test, holding every
    member's data, can compute and no coordinator ever sees (it gets noised releases)."""
    from member_node.lerobot import read_dataset
    from member_node.trainer import evaluate
    from member_node.windows import EpisodeWindows, split_episodes
    from shared_model.config import load_config
    from shared_model.policy import Policy

    cfg = load_config(model="tiny")
    policy = Policy(cfg.model, cfg.embodiments)
    policy.load_state_dict(ShardStore(out_dir / "store").load_model(round_number))
    out = {}
    for m in cfg.federation.members:
        emb = cfg.embodiments[m.embodiment]
        episodes = read_dataset(data_root / m.name, emb, m.embodiment).episodes
        _, held = split_episodes(episodes, cfg.train.held_out_fraction, seed=cfg.train.seed)
        windows = EpisodeWindows([episodes[i] for i in held], emb, cfg.model.history, cfg.model.chunk)
        out[m.name] = evaluate(policy, m.embodiment, windows, per_episode=cfg.train.eval_windows_per_episode).action_mse
    return out


def test_dp_run_still_learns(dp_run):
    """On the exact held-out error: the reported one is a noised, clipped release.

    Per member, because the noise is drawn afresh every run and one member dominates a sum:
    after 3 rounds honda, sony and fanuc ended at 0.89-0.96x of their initial error in four
    runs, softbank anywhere from 0.67x to 1.01x; the summed error at 0.77-0.98x, so the old
    bound on the sum (0.95x) failed one run in four. A DP path that stopped learning leaves
    every ratio near or above 1."""
    out_dir, data_root, _ = dp_run
    first, last = _exact_held_out_mse(out_dir, data_root, 0), _exact_held_out_mse(out_dir, data_root, 3)
    ratios = sorted(last[m] / first[m] for m in first)
    assert sum(r < 1.0 for r in ratios) >= 3 and (ratios[1] + ratios[2]) / 2 < 0.97, (first, last)


def test_dp_members_release_their_held_out_error_privately(dp_run):
    """Under DP each evaluation the coordinator recorded is a noised release with a receipt
    that is the member's ledger entry; no exact error (MAE) left any node."""
    from privacy.ledger import Ledger

    out_dir, data_root, _ = dp_run
    records = [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines()]
    exact = _exact_held_out_mse(out_dir, data_root, 3)
    for member in MEMBERS:
        evaluations = {
            e["round"]: e
            for e in Ledger(out_dir / "nodes" / member / "ledger.jsonl").releases()
            if e["release"] == "evaluation"
        }
        assert sorted(evaluations) == [0, 1, 2, 3], member
        for record in records:
            reported = record["evaluation"][member]
            assert json.loads(reported["receipt"]) == evaluations[record["round"]]
            assert reported["action_mae"] is None
        assert records[-1]["evaluation"][member]["action_mse"] != exact[member]


def test_member_status_shows_the_ledger(dp_run, tmp_path):
    out_dir, _, _ = dp_run
    plot = tmp_path / "eps.png"
    cmd = [
        sys.executable,
        "-m",
        "member_node.cli",
        "status",
        "--state-dir",
        str(out_dir / "nodes" / "sony"),
        "--plot",
        str(plot),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verified" in proc.stdout and "NOT verified" not in proc.stdout
    assert "…" not in proc.stdout, "at 80 columns (a pipe) no number or header is cut"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
