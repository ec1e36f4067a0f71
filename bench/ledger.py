"""What a long-lived node's ledger costs per request, verified once per request against every read.

A node reads its ledger several times for one request (the rollback check, the replay
check, the accountant's history, the pace, and the append itself), and every read used to
verify every entry's Ed25519 signature and hash link. ``Ledger`` now remembers the bytes it
verified and checks only what was appended since; the baseline here is the same node whose
ledger forgets them before every read (the behaviour before), measured in the same run,
alternating.

For each ledger length N (real entries, signed by the node's key, each composing one more
round): the median wall time of a DP query (the decision a train request would get,
nothing recorded) and of a DP train request (``tiny``, 1 local step, which appends one
entry), each on a fresh ``MemberNode`` as a ClientApp process gets one per message; the
ratio; the process's peak RSS.

Usage: ``python bench/ledger.py [--sizes 100,1000] [--repeats 3]``; writes
``bench/results/ledger.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from member_node.identity import resolve_identity
from member_node.node import MemberNode
from member_node.parallel import peak_rss_mb
from member_node.synthetic import generate_dataset
from privacy.accountant import Mechanism, epsilon
from privacy.ledger import Ledger
from shared_model.config import load_config
from shared_model.policy import Policy
from shared_model.protocol import QueryRequest, TrainHyperParams, TrainRequest

SHARDS = ["adapter/emb/so100"]


class _ForgetfulLedger(Ledger):
    """The baseline: every read verifies every entry again."""

    def _read(self):  # type: ignore[override]
        self._verified = (b"", "", 0)
        return super()._read()


def _fill(ledger: Ledger, count: int, mechanism: dict, delta: float) -> None:
    history: list[Mechanism] = []
    for rnd in range(1, count + 1):
        history.append(Mechanism(mechanism["noise_multiplier"], mechanism["sample_rate"], mechanism["steps"]))
        ledger.append(
            run=f"earlier-{rnd // 100}",
            round=rnd % 100 + 1,
            member="sony",
            shards=SHARDS,
            mechanism=mechanism,
            dataset_fingerprint="sha256:" + "ab" * 32,
            epsilon=epsilon(history, delta),
            delta=delta,
            accountant="rdp",
            decision="full",
        )


class _Requests:
    """One DP query or train request of the member, each on a fresh node (one per message)."""

    def __init__(self, cfg, identity, hparams: TrainHyperParams, model: dict, head: str, ledger_bytes: bytes) -> None:
        self.cfg, self.identity, self.hparams, self.model = cfg, identity, hparams, model
        self.head, self.ledger_bytes, self.rounds = head, ledger_bytes, 0

    def node(self, forgetful: bool) -> MemberNode:
        built = MemberNode(self.cfg, self.identity)
        if forgetful:
            built.ledger = _ForgetfulLedger(built.ledger.path, built.signing_key)
        return built

    def query(self, forgetful: bool) -> None:
        request = QueryRequest(1, run="bench", hparams=self.hparams, planned_rounds=10, ledger_head=self.head)
        reply = self.node(forgetful).query(request)
        assert reply.can_train, reply.reason

    def train(self, forgetful: bool) -> None:
        # Every request appends to the same N entries.
        (self.identity.state_dir / "ledger.jsonl").write_bytes(self.ledger_bytes)
        self.rounds += 1
        request = TrainRequest(
            self.rounds, SHARDS, self.hparams, self.model, run="bench", planned_rounds=10, ledger_head=self.head
        )
        reply = self.node(forgetful).train(request)
        assert reply.steps >= 1, reply


def _median_seconds(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="ledger lengths, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ledger.json")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="kyodo-bench-ledger-"))
    try:
        cfg = load_config(model="tiny", overrides=[f"data_root={root}", f"state_root={root / 'state'}"])
        generate_dataset(root / "sony", "so100", cfg.embodiments["so100"], episodes=24, episode_seconds=2.0, seed=1)
        identity = resolve_identity({"partition-id": 1}, cfg)
        # A budget no ledger here exhausts and a fixed sigma: the bench measures reads, not declines.
        identity = replace(identity, epsilon=1e4, budget_rounds=0, noise_multiplier=1.0)
        model = Policy(cfg.model, cfg.embodiments).state_dict()
        hparams = TrainHyperParams(
            lr=1e-3, local_steps=1, batch_size=8, weight_decay=0.0, seed=0, sample_rate=cfg.privacy.sample_rate
        )
        mechanism = {
            "noise_multiplier": 1.0,
            "sample_rate": cfg.privacy.sample_rate,
            "steps": 25,
            "clipping_norm": 1.0,
            "opacus_mode": "bk",
            "noise_source": "chacha20",
        }
        results = []
        for size in [int(s) for s in args.sizes.split(",")]:
            state = root / f"state-{size}"
            seed_node = MemberNode(cfg, replace(identity, state_dir=state))
            start = time.perf_counter()
            _fill(seed_node.ledger, size, mechanism, identity.delta)
            fill_s = time.perf_counter() - start
            ledger_bytes = (state / "ledger.jsonl").read_bytes()
            head = seed_node.ledger.head_hash()

            requests = _Requests(cfg, replace(identity, state_dir=state), hparams, model, head, ledger_bytes)
            row: dict[str, float | int] = {"entries": size, "fill_s": round(fill_s, 2)}
            for name, action in (("query", requests.query), ("train", requests.train)):
                action(False), action(True)  # warm both (imports, the noise plan)
                once = _median_seconds(lambda a=action: a(False), args.repeats)
                every = _median_seconds(lambda a=action: a(True), args.repeats)
                row |= {f"{name}_verified_once_s": round(once, 4), f"{name}_every_read_s": round(every, 4)}
                row[f"{name}_ratio"] = round(once / every, 3)
            results.append(row)
            print(
                f"{size:5d} entries: query {row['query_verified_once_s']:.3f} s vs {row['query_every_read_s']:.3f} s "
                f"({row['query_ratio']:.2f}x), train {row['train_verified_once_s']:.3f} s vs "
                f"{row['train_every_read_s']:.3f} s ({row['train_ratio']:.2f}x); filled in {fill_s:.1f} s",
                flush=True,
            )
        peak = peak_rss_mb()
        print(f"peak RSS {peak:.0f} MB")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"results": results, "peak_rss_mb": round(peak, 1)}, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
