"""End to end: the real ServerApp and ClientApps under Flower's simulation engine (Ray).

Runs ``kyodo-coordinator demo`` as a separate process (as a user would) on ``tiny`` with
the 4-member default federation for 2 rounds, then checks the outcome on disk.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared_model.shards import shard_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out_dir, data_root = root / "run", root / "data"
    cmd = [
        sys.executable, "-m", "coordinator.cli", "demo", "--model", "tiny", "--rounds", "2",
        f"out_dir={out_dir}", f"data_root={data_root}", "train.local_steps=30", "train.lr=0.005",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out_dir, data_root, proc.stdout


def test_every_member_prepared_its_own_data(demo_run):
    _, data_root, _ = demo_run
    for member in ("honda", "sony", "softbank", "fanuc"):
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
    assert "Held-out action error" in stdout


def test_model_changed_only_in_trained_shards(demo_run):
    out_dir, _, _ = demo_run
    records = [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines()]
    trained = {s for rec in records[1:] for s in rec["updated_shards"]}
    before = load_file(str(out_dir / "rounds" / "round-0000.safetensors"))
    after = load_file(str(out_dir / "rounds" / "round-0002.safetensors"))
    assert before.keys() == after.keys()
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
