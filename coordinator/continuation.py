"""Round 0 taken from an earlier run's committed model (``continue_from=<run dir>``).

A consortium trains one model over many runs: each run is a budgeted campaign (its rounds,
its members' epsilon pacing), and the next one should start where the last one ended, or
members spend budget on a model that is then thrown away. Before this module the only way
was to export the last round and import it as ``public.checkpoint``: one safetensors file
(at most 5 GB, about 1.2B parameters), read whole into RAM, and recorded as an anonymous
"public checkpoint" rather than as the run it came from.

Here the earlier run's store is read at its ``HEAD`` and its shard objects become this
run's round 0 as they are: objects are content-addressed, so the ids do not change, each
one is hard-linked into the new store (no second copy on one filesystem) after its hash is
checked (``ShardStore.import_object``), the coordinator never holds the model, and members
whose replica already holds an object are not sent it again. The server optimiser starts
fresh (its state belongs to the earlier run's schedule).

What was taken is named in round 0's signed record: the earlier run's id, the round, the
manifest's sha256 and the earlier coordinator's signature on that manifest, so an auditor
holding the consortium's coordinator key can check the model's lineage from round 0's
record alone.

Round 0's model is the one the earlier run's members already released held-out errors for,
so those are carried into round 0's record (``evaluation_same_model``, each naming the run
and round of its release and keeping its receipt) and only the other members are asked:
asking again would spend every DP member's budget on a number the consortium already has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.records import read_records
from coordinator.run_state import RunState, model_mismatch
from privacy.round_signature import round_signature_problem
from shared_model.config import KyodoConfig
from shared_model.store import Manifest, ShardStore, StoreError, model_config_hash


class ContinuationError(ValueError):
    """``continue_from`` names no run this one can continue: the message says why and what to do."""


@dataclass(frozen=True)
class EarlierRound:
    """The committed round of an earlier run that becomes this run's round 0."""

    run_dir: Path
    run_id: str
    store: ShardStore
    manifest: Manifest
    signature: dict[str, str]  # the earlier coordinator's signature on the manifest

    def source(self) -> dict[str, Any]:
        """Round 0's ``initial`` (its record and manifest): where the weights came from."""
        return {
            "source": "run",
            "run": self.run_id,
            "round": self.manifest.round,
            # "sha256:" prefix: a bare 64-hex string in a manifest reads as a store object id.
            "manifest": f"sha256:{self.manifest.digest}",
            "coordinator": {k: self.signature[k] for k in ("public_key", "signature", "record") if k in self.signature},
        }


def earlier_round(cfg: KyodoConfig) -> EarlierRound:
    """Open ``cfg.continue_from`` at its HEAD and check it can be continued: a committed round
    of this very model (config hash), with its signed record, signed by the key the run names.

    Reads manifests and records only (no object is hashed here: :func:`import_round` hashes
    each one as it takes it), so it is cheap enough for the CLI's early checks."""
    run_dir = Path(cfg.continue_from).expanduser()
    where = f"continue_from {run_dir}"
    if Path(cfg.out_dir).expanduser().resolve() == run_dir.resolve():
        raise ContinuationError(f"{where} is this run's own directory: to go on with it, resume it (same out_dir)")
    if not (run_dir / "store" / "HEAD").is_file():
        raise ContinuationError(f"{where}: no committed round there ({run_dir / 'store' / 'HEAD'} missing)")
    try:
        store = ShardStore(run_dir / "store")
        manifest = store.head_manifest()
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        records = {r.get("round"): r for r in read_records(run_dir)}
    except (OSError, ValueError, StoreError) as err:
        raise ContinuationError(f"{where}: cannot read the run ({err})") from None
    if manifest is None or not isinstance(info, dict):
        raise ContinuationError(f"{where}: not a run directory (no HEAD manifest, or run.json is not an object)")
    if manifest.model_config != model_config_hash(cfg.model, cfg.embodiments):
        raise ContinuationError(
            f"{where}: its rounds are of {model_mismatch(cfg, run_dir, manifest.model_config)}: "
            f"a run continues only the same model ({cfg.model.name!r}) with the same embodiments"
        )
    run_id = str(info.get("run", ""))
    signed = (records.get(manifest.round) or {}).get("coordinator")
    problem = round_signature_problem(
        signed, run_id, manifest.round, manifest.digest, str(info.get("coordinator_public_key", ""))
    )
    if problem is not None:
        raise ContinuationError(
            f"{where}: round {manifest.round} (its HEAD) has no valid signed record ({problem}); "
            "if its coordinator died after committing it, resume that run first to write the record"
        )
    return EarlierRound(run_dir, run_id, store, manifest, dict(signed))


def same_model_evaluations(run_dir: Path, run_id: str, round_number: int) -> dict[str, dict[str, Any]]:
    """Member -> the held-out error it released for round ``round_number`` of the run in
    ``run_dir`` (the model a continuing run's round 0 is): :func:`released_for_model`."""
    record = next((r for r in read_records(run_dir) if r.get("round") == round_number), {})
    return released_for_model(record, run_id)


def released_for_model(record: dict[str, Any], run_id: str) -> dict[str, dict[str, Any]]:
    """Member -> the held-out error it released for the model of ``record``'s round, with
    ``run`` and ``round`` naming that release: released in the round, or carried by it from
    an earlier release of the same model (passed on as it was)."""
    carried = {m: dict(e) for m, e in (record.get("evaluation_same_model") or {}).items() if isinstance(e, dict)}
    for member, entry in (record.get("evaluation") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("action_mse"), int | float):
            carried[member] = {**entry, "run": run_id, "round": record["round"]}
    return carried


def import_round(state: RunState, earlier: EarlierRound) -> dict[str, str]:
    """Take every shard object of the earlier round into this run's store (verified, linked
    where possible); shard id -> object id, for :meth:`RunState.commit_initial_objects`."""
    differ = set(state.layout.shards) ^ set(earlier.manifest.shards)
    if differ:  # same config hash means the same layout; a hand-edited manifest does not
        raise ContinuationError(f"continue_from {earlier.run_dir}: its round names other shards ({sorted(differ)[:3]})")
    for object_id in sorted(set(earlier.manifest.shards.values())):
        state.store.import_object(earlier.store, object_id)
    return dict(earlier.manifest.shards)
