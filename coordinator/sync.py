"""Incremental model sync: each node is sent only the shard objects it does not hold.

Nodes report the objects in their replica in every ``query`` reply; the coordinator sends a
model as its round manifest plus the missing objects (``shared_model.protocol.ModelRef``)
and from then on counts those objects as held. After the first full download a member
receives, per round, exactly the shards the previous round changed. Bytes sent are counted
per member and round, for the round record.
"""

from __future__ import annotations

from collections import defaultdict

from shared_model.protocol import ModelRef
from shared_model.store import Manifest, ShardStore


class ModelSync:
    def __init__(self, store: ShardStore):
        self.store = store
        self.manifest: Manifest | None = store.head_manifest()
        self.held: dict[str, set[str]] = {}  # member -> object ids its replica reported or was sent
        self.sent_bytes: dict[str, int] = defaultdict(int)  # member -> bytes this round

    def set_head(self, manifest: Manifest) -> None:
        self.manifest = manifest

    def reported(self, member: str, objects: list[str]) -> None:
        """What the node's query reply says its replica holds (the node's word wins)."""
        self.held[member] = set(objects)

    def start_round(self) -> None:
        self.sent_bytes = defaultdict(int)

    def ref_for(self, member: str) -> ModelRef:
        if self.manifest is None:
            raise ValueError("nothing committed yet: no model to send")
        held = self.held.setdefault(member, set())
        wanted = dict(self.manifest.shards)
        missing = sorted(set(wanted.values()) - held)
        objects = {oid: self.store.object_bytes(oid) for oid in missing}
        held.update(missing)
        self.sent_bytes[member] += sum(len(b) for b in objects.values())
        return ModelRef(wanted, objects)
