"""The auditor's independent RDP recomputation of every ledger entry: from cached one-step
curves (``privacy.audit.accounting.rdp_epsilon``) against dp-accounting's ``RdpAccountant``
composing each entry's whole history afresh (the documented way, and how the auditor did it
before), on the same histories in the same run.

A ledger like a long-lived node's: per round one DP-SGD release (sigma 1.2, q 0.08, 25
steps) and, every other round, one held-out-error release (sigma 20, q 1, 1 step). Each entry's
epsilon is recomputed over everything before it, as ``kyodo-audit verify`` does. Prints ms
per entry for both, the ratio, the largest difference in epsilon (must be 0) and peak RSS;
writes ``bench/results/audit_accounting.json``.

    python bench/audit_accounting.py [--entries 300]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from pathlib import Path

from dp_accounting import rdp as dp_rdp

from privacy.audit.accounting import Mech, Totals, _event, rdp_epsilon, totals_of

DELTA = 1e-5


def fresh_accountant_epsilon(totals: Totals, delta: float) -> float:
    acc = dp_rdp.RdpAccountant()
    for sigma, q, steps in totals:
        acc.compose(_event(sigma, q), steps)
    return float(acc.get_epsilon(delta))


def histories(entries: int) -> list[Totals]:
    history: list[Mech] = []
    out = []
    for i in range(entries):
        history.append(Mech(20.0, 1.0, 1) if i % 3 == 2 else Mech(1.2, 0.08, 25))
        out.append(totals_of(history))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=300)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "audit_accounting.json"))
    args = parser.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)
    todo = histories(args.entries)
    timings, values = {}, {}
    for name, fn in (("fresh accountant", fresh_accountant_epsilon), ("one-step curves", rdp_epsilon)):
        start = time.perf_counter()
        values[name] = [fn(totals, DELTA) for totals in todo]
        timings[name] = (time.perf_counter() - start) / len(todo) * 1e3
    ratio = timings["one-step curves"] / timings["fresh accountant"]
    worst = max(abs(a - b) for a, b in zip(values["fresh accountant"], values["one-step curves"], strict=True))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for name, ms in timings.items():
        print(f"{name:17s} {ms:8.2f} ms per entry")
    print(f"ratio (one-step curves / fresh accountant): {ratio:.4f}; largest epsilon difference {worst:.3g}")
    print(f"last entry's epsilon {values['one-step curves'][-1]:.4f}; peak RSS {peak_mb:.0f} MB")
    result = {
        "entries": args.entries,
        "ms_per_entry": timings,
        "ratio": ratio,
        "max_abs_epsilon_difference": worst,
        "peak_rss_mb": peak_mb,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
