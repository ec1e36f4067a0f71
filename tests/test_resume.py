"""Kill the coordinator mid-round, restart it, and get the very same model.

The real ``kyodo-coordinator demo`` (Flower simulation) runs as a separate process; a
failpoint (``KYODO_FAILPOINT``) makes it die like ``kill -9`` at a chosen point of round 2.
Restarted on the same run directory it resumes from the store's HEAD; with fixed seeds,
members' DP and secure aggregation off (both draw from the OS's randomness on purpose) and
replies folded in member order, the final model is bit-identical to an uninterrupted run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coordinator.records import read_records
from shared_model.store import ShardStore

pytestmark = pytest.mark.slow

REPRODUCIBLE = [
    *(f"federation.members.{i}.dp=false" for i in range(4)),
    "secagg.enabled=false",
    "train.ordered_aggregation=true",
    "train.local_steps=8",
    "train.lr=0.005",
    "train.server_optimizer=fedadam",  # optimiser state must survive the restart too
    "train.server_lr=0.01",
    *(f"federation.members.{i}.episodes=200" for i in range(4)),  # outcomes, not utility: keep CI fast
]


def _demo(out_dir: Path, data_root: Path, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KYODO_FAILPOINT"}
    if failpoint:
        env["KYODO_FAILPOINT"] = failpoint
    cmd = [
        sys.executable, "-m", "coordinator.cli", "demo", "--model", "tiny", "--rounds", "3",
        f"out_dir={out_dir}", f"data_root={data_root}", *REPRODUCIBLE,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=Path(__file__).parent.parent)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    proc = _demo(root / "run", root / "data")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "data", ShardStore(root / "run" / "store").load_model(3)


@pytest.mark.parametrize("where", ["after-train", "after-objects"])
def test_killed_in_round_2_resumes_bit_identical(reference, tmp_path, where):
    data_root, expected = reference
    out_dir = tmp_path / "run"
    killed = _demo(out_dir, data_root, failpoint=f"2:{where}")
    assert killed.returncode != 0, "the failpoint should have killed the coordinator"
    store = ShardStore(out_dir / "store")
    assert store.head().round == 1, "round 2 must not be committed"
    assert [r["round"] for r in read_records(out_dir)] == [0, 1]
    referenced = store.manifest(0).object_ids() | store.manifest(1).object_ids()
    orphans = set(store.objects()) - referenced
    # Both died with round 2's shard objects written (each is written as its shard finishes,
    # so the coordinator never holds the model) but HEAD not moved: orphans, which no round
    # references (gc would remove them).
    assert orphans

    resumed = _demo(out_dir, data_root)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming after round 1" in resumed.stdout
    store = ShardStore(out_dir / "store")
    assert store.head().round == 3
    assert [r["round"] for r in read_records(out_dir)] == [0, 1, 2, 3]
    final = store.load_model(3)
    assert final.keys() == expected.keys()
    different = [name for name in final if not torch.equal(final[name], expected[name])]
    assert not different, f"resumed run differs from the uninterrupted one in {different[:5]}"


def test_killed_after_commit_loses_only_the_evaluation(reference, tmp_path):
    """Died after HEAD moved to round 2, before its line in rounds.jsonl: the record (cohorts,
    receipts, updated shards) was committed with the manifest, so the restart writes it back."""
    data_root, expected = reference
    out_dir = tmp_path / "run"
    killed = _demo(out_dir, data_root, failpoint="2:after-commit")
    assert killed.returncode != 0, "the failpoint should have killed the coordinator"
    assert ShardStore(out_dir / "store").head().round == 2
    assert [r["round"] for r in read_records(out_dir)] == [0, 1]

    resumed = _demo(out_dir, data_root)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming after round 2" in resumed.stdout
    records = read_records(out_dir)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    rebuilt = records[2]
    assert rebuilt["evaluation_lost"] is True and rebuilt["evaluation"] == {}
    assert set(rebuilt["train"]) == {"honda", "sony", "softbank", "fanuc"} and rebuilt["updated_shards"]
    assert rebuilt["cohorts"] and "recovered_from_store" not in rebuilt
    assert rebuilt["coordinator"]["manifest"] == ShardStore(out_dir / "store").manifest(2).digest, "signed on rebuild"
    final = ShardStore(out_dir / "store").load_model(3)
    assert all(torch.equal(final[name], expected[name]) for name in expected)
    # The summary covers the whole run, not only the rounds after the restart.
    summary = json.loads((out_dir / "summary.json").read_text())
    assert sorted(summary["per_member"], key=int) == ["0", "1", "2", "3"] and summary["per_member"]["2"] == {}
    # Resuming a run that has every round says so and trains nothing.
    again = _demo(out_dir, data_root)
    assert again.returncode == 0 and "all 3 rounds are committed already" in " ".join(again.stdout.split())
    assert ShardStore(out_dir / "store").head().round == 3 and len(read_records(out_dir)) == 4
    assert summary["mean_mse"][0] == pytest.approx(
        sum(e["action_mse"] for e in records[0]["evaluation"].values()) / len(records[0]["evaluation"])
    )
