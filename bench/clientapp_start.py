"""What a member's ClientApp process costs before its handler runs, Opacus imported lazily or at once.

Flower's default SuperNode starts one ClientApp process per message (``../shared/notes``), so
every message paid the import of ``member_node.client_app`` and the building of the node
before its handler did any work. A round sends each node seven messages; four of them are
secure-aggregation stages that never compute an epsilon. ``privacy.accountant`` now imports
Opacus where an epsilon is first computed; the baseline is the same child process that
imports Opacus first, as the module-level import did, measured in the same run, alternating.
(Members now answer from their own executor, ``member_node.executor``, which imports once;
this still measures its start, the simulation's workers, and any node run with Flower's
default isolation.)

Each case runs in a fresh ``python`` process, timed from inside it (interpreter start is the
same for both):

* ``stage``: import the ClientApp, build the node from a SuperNode's context (what a
  share_keys, masked_input, consistency or unmask message pays before its handler);
* ``query``: the same, then answer a DP query (computes the member's epsilon: the control,
  which pays for Opacus either way).

Prints the median seconds of each, the ratio lazy / eager, and the child's peak RSS.
Usage: ``.venv/bin/python bench/clientapp_start.py [--repeats 7]``; writes
``bench/results/clientapp_start.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
if sys.argv[1] == "eager":
    import opacus  # noqa: F401  (what the module-level import in privacy.accountant did)
import member_node.client_app as ca
root = sys.argv[3]
from flwr.app import Context, RecordDict
ctx = Context(
    run_id=1, node_id=1, node_config={"partition-id": 1}, state=RecordDict(),
    run_config={"model": "tiny", "federation": "default",
                "overrides": f"data_root={root} state_root={root}/state"},
)
node = ca._node(ctx)
t1 = time.perf_counter()
if sys.argv[2] == "query":
    from shared_model.protocol import QueryRequest, TrainHyperParams
    hp = TrainHyperParams(lr=0.01, local_steps=3, batch_size=8, weight_decay=0.0, seed=0, sample_rate=0.8)
    node.query(QueryRequest(1, "bench", hp, planned_rounds=4))
t2 = time.perf_counter()
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": t2 - t0, "start": t1 - t0, "peak_rss_mb": peak_mb, "opacus": "opacus" in sys.modules}))
"""


def _child(mode: str, case: str, root: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, case, str(root)], env=env, cwd=ROOT, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"{mode} {case} child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    from member_node.synthetic import generate_dataset
    from shared_model.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = load_config(model="tiny")
        generate_dataset(root / "sony", "so100", cfg.embodiments["so100"], episodes=60, episode_seconds=2.0, seed=1)
        _child("lazy", "stage", root)  # warm the page cache and create the node's state once
        runs: dict[str, list[dict]] = {f"{m}/{c}": [] for c in ("stage", "query") for m in ("eager", "lazy")}
        for _ in range(args.repeats):
            for key in runs:
                mode, case = key.split("/")
                runs[key].append(_child(mode, case, root))
    result: dict = {"repeats": args.repeats, "cases": {}}
    for case in ("stage", "query"):
        eager = statistics.median(r["seconds"] for r in runs[f"eager/{case}"])
        lazy = statistics.median(r["seconds"] for r in runs[f"lazy/{case}"])
        peak = {m: max(r["peak_rss_mb"] for r in runs[f"{m}/{case}"]) for m in ("eager", "lazy")}
        loaded = {m: all(r["opacus"] for r in runs[f"{m}/{case}"]) for m in ("eager", "lazy")}
        result["cases"][case] = {
            "eager_s": eager, "lazy_s": lazy, "ratio": lazy / eager, "peak_rss_mb": peak, "opacus_loaded": loaded,
        }  # fmt: skip
        print(
            f"{case:6s} eager {eager:.2f} s  lazy {lazy:.2f} s  ratio {lazy / eager:.2f}x  "
            f"peak RSS {peak['eager']:.0f} / {peak['lazy']:.0f} MB  opacus loaded: {loaded['lazy']}"
        )
    out = ROOT / "bench" / "results" / "clientapp_start.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
