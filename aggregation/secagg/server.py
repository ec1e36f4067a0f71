"""The coordinator's side of SecAgg+: route keys and sealed shares, sum masked vectors,
collect the survivors' signatures on who survived (consistency), recover what dropouts left
behind, and end with each shard's cohort sum and nothing more.

Transport-free on purpose: ``coordinator.secure_round`` moves the messages over the Flower
Grid, this class only decides what each message says and what a reply means, so every
dropout case is testable without a network.

What the coordinator holds during a round: public keys, ciphertexts it cannot open,
running modular sums of masked vectors (a masked vector is folded in and freed on
arrival), and in the end the shares needed to remove the masks.

Memory: the protocol can unmask nothing before the unmask stage, and that stage starts
only once every masked input of the round is in (members answer ``unmask`` once per round,
and revealing shares group by group could reveal both secrets of one member). So every
shard's masked sum stays open from its first masked input to the end of the round. They
are kept in a :class:`aggregation.sums.SumPool`, which holds them within a RAM budget and
spills the rest to scratch files (a masked sum reveals nothing, on disk or not); and
:meth:`SecAggServer.iter_finish` unmasks and hands over one shard at a time, so the
dequantised (float64) result of only one shard exists at once. It never holds one
member's update: the self mask hides it until the sum is complete, and the self-mask seed
of a member is only recovered for members whose masked vector is already inside the sum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from aggregation.secagg.errors import SecAggError
from aggregation.secagg.graph import default_degree, default_threshold, neighbours
from aggregation.secagg.keys import agree, agreement_needed, mask_context
from aggregation.secagg.masks import apply_masks
from aggregation.secagg.quantize import QuantizationPlan, dequantize_sum, plan_quantization
from aggregation.secagg.shamir import combine_shares
from aggregation.sums import SumBuffer, SumPool
from shared_model.protocol import (
    ConsistencyReply,
    ConsistencyRequest,
    KeyAdvert,
    MaskedInputReply,
    MaskedInputRequest,
    SecAggGroup,
    SecAggSetup,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)

log = logging.getLogger("kyodo.secagg")

SELF_SEED = "self_seed"
MASK_KEY = "mask_key"


def build_setup(
    cohorts: Mapping[str, list[str]],
    *,
    bits: int,
    clip_range: float,
    degree: int = 0,
    threshold: int = 0,
    graph_seed: bytes,
) -> SecAggSetup:
    """Group shards by identical cohort (one mask graph and one sharing per group)."""
    by_cohort: dict[tuple[str, ...], list[str]] = {}
    for shard in sorted(cohorts):
        by_cohort.setdefault(tuple(sorted(cohorts[shard])), []).append(shard)
    groups = []
    for i, (members, shards) in enumerate(sorted(by_cohort.items(), key=lambda kv: kv[1][0])):
        n = len(members)
        k = min(degree or default_degree(n), n - 1)
        if k < n - 1 and k % 2:
            k += 1  # a ring-based (Harary) graph below the complete one needs an even degree
        graph = neighbours(list(members), k, graph_seed + i.to_bytes(4, "big")) if n > 1 else {members[0]: ()}
        t = 0 if n == 1 else min(threshold or default_threshold(k), k)
        if n > 1 and 2 * t <= k:
            raise SecAggError(
                f"secagg.threshold {threshold} is not more than half of a member's {k} neighbours in a cohort of {n}: "
                "a coordinator could collect both of a member's secrets (members refuse such a round); "
                "set 0 for the default, a majority of the neighbours"
            )
        plan = plan_quantization(n, bits, clip_range)
        groups.append(
            SecAggGroup(
                group_id=f"g{i}",
                shards=shards,
                members=list(members),
                neighbours={m: list(graph[m]) for m in members},
                threshold=t,
                quantization=plan.to_dict(),
            )
        )
    return SecAggSetup(groups)


@dataclass
class ShardSum:
    """A shard's unmasked result: the sum of its contributors' (scaled) updates, float64."""

    shard: str
    total: np.ndarray
    contributors: list[str]
    weight: float  # sum of the contributors' weights (the mean is total * scale_base / weight)
    secure: bool  # False only for a cohort of one (its sum is its update)


@dataclass
class SecAggServer:
    """One round of SecAgg+ from the coordinator's side."""

    run: str
    round: int
    setup: SecAggSetup
    lengths: dict[str, int]  # shard -> flat vector length
    adverts: dict[str, KeyAdvert] = field(default_factory=dict)
    identity_keys: dict[str, str] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)  # member -> FedAvg weight
    sealed: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sender -> recipient -> blob
    active: dict[str, list[str]] = field(default_factory=dict)  # group -> members that shared
    scale_base: dict[str, float] = field(default_factory=dict)  # group -> largest active weight
    sums: dict[str, SumBuffer] = field(default_factory=dict)
    masked_from: dict[str, set[str]] = field(default_factory=dict)  # group -> members whose vectors are in
    survivor_signatures: dict[str, dict[str, bytes]] = field(default_factory=dict)  # group -> member -> signature
    unmask_replies: dict[str, UnmaskReply] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # shard -> why
    pool: SumPool | None = None  # where the masked sums live (default: RAM, no budget)

    def __post_init__(self) -> None:
        if self.pool is None:
            self.pool = SumPool()
        self.groups = {g.group_id: g for g in self.setup.groups}
        self.plans = {g.group_id: QuantizationPlan.from_dict(g.quantization) for g in self.setup.groups}

    # ------------------------------------------------------------------ stage 1 replies
    def add_advert(self, member: str, advert: KeyAdvert, identity_key: str, weight: float) -> None:
        if not self.setup.groups_of(member):
            raise SecAggError(f"{member} is in no aggregation group of this round")
        if not (math.isfinite(weight) and weight > 0):
            raise SecAggError(f"{member}: FedAvg weight must be a positive number, got {weight!r}")
        masked_groups = {g.group_id for g in self.setup.groups_of(member) if len(g.members) > 1}
        if set(advert.mask_pks) != masked_groups:
            raise SecAggError(
                f"{member} advertises mask keys for groups {sorted(advert.mask_pks)}, expected {sorted(masked_groups)}"
            )
        self.adverts[member] = advert
        self.identity_keys[member] = identity_key
        self.weights[member] = float(weight)

    # ------------------------------------------------------------------ stage 2
    def share_keys_requests(self) -> dict[str, ShareKeysRequest]:
        out = {}
        for member in self.adverts:
            # Every group member's advert and identity key, not only the neighbours': a node
            # checks the weight it is asked to apply against the counts they signed, and their
            # signatures on the survivor set before it unmasks.
            known = {m for g in self.setup.groups_of(member) for m in g.members if m in self.adverts}
            out[member] = ShareKeysRequest(
                self.round,
                self.run,
                {p: self.adverts[p] for p in sorted(known - {member})},
                {m: self.identity_keys[m] for m in sorted(known)},
            )
        return out

    def add_shares(self, reply: ShareKeysReply) -> None:
        member = reply.member
        if member not in self.adverts:
            raise SecAggError(f"shares from {member}, who did not advertise keys")
        allowed = {n for g in self.setup.groups_of(member) for n in g.neighbours[member]}
        stray = sorted(set(reply.sealed) - allowed)
        if stray:
            raise SecAggError(f"{member} sent shares to non-neighbours {stray}")
        self.sealed[member] = dict(reply.sealed)

    # ------------------------------------------------------------------ stage 3
    def masked_input_requests(self) -> dict[str, MaskedInputRequest]:
        """Fix each group's active set (members that shared keys, or the lone owner of a cohort
        of one); a group left with too few to hide anyone is skipped here."""
        for gid, group in self.groups.items():
            if len(group.members) == 1:
                active = [m for m in group.members if m in self.adverts]
            else:
                shared = [m for m in group.members if m in self.sealed]
                active = _well_connected(shared, group)
                need = max(2, group.threshold + 1)
                if len(active) < need:
                    # A survivor's self-mask needs `threshold` shares from neighbours that stayed.
                    connected = (
                        f", {len(active)} of them with the threshold of active neighbours"
                        if len(active) < len(shared)
                        else ""
                    )
                    self._skip(
                        group,
                        f"{len(shared)} of {len(group.members)} members shared keys{connected}; unmasking the sum "
                        f"needs {need} (secret-sharing threshold {group.threshold})",
                    )
                    active = []
            self.active[gid] = active
            if active:
                self.scale_base[gid] = max(self.weights[m] for m in active)
        out = {}
        for member in set(self.sealed) | {m for a in self.active.values() for m in a}:
            groups = [g for g in self.setup.groups_of(member) if member in self.active.get(g.group_id, [])]
            if not groups:
                continue
            inbox = {s: blobs[member] for s, blobs in self.sealed.items() if member in blobs}
            out[member] = MaskedInputRequest(
                self.round,
                self.run,
                inbox,
                {g.group_id: list(self.active[g.group_id]) for g in groups},
                {g.group_id: self.weights[member] / self.scale_base[g.group_id] for g in groups},
            )
        return out

    def add_masked(self, reply: MaskedInputReply) -> None:
        """Fold one member's masked vectors into the running sums (all of its groups or none)."""
        member = reply.member
        groups = [g for g in self.setup.groups_of(member) if member in self.active.get(g.group_id, [])]
        expected = {s for g in groups for s in g.shards}
        if set(reply.masked) != expected:
            raise SecAggError(f"{member} sent masked shards {sorted(reply.masked)}, expected {sorted(expected)}")
        for g in groups:
            plan = self.plans[g.group_id]
            for shard in g.shards:
                vec = reply.masked[shard]
                if vec.dtype != plan.dtype or vec.shape != (self.lengths[shard],):
                    raise SecAggError(
                        f"{member}: {shard} is {vec.dtype} {vec.shape}, expected {np.dtype(plan.dtype)} "
                        f"({self.lengths[shard]},)"
                    )
        for g in groups:
            for shard in g.shards:
                buf = self.sums.get(shard)
                if buf is None:
                    buf = self.sums[shard] = self.pool.new(self.lengths[shard], self.plans[g.group_id].dtype, shard)
                vec = reply.masked[shard]
                if vec.size:
                    buf.fold(vec, _ring_add)
                buf.mark_written()  # modular sum: numpy's unsigned wrap-around is the reduction
            self.masked_from.setdefault(g.group_id, set()).add(member)

    # ------------------------------------------------------------------ stage 4
    def _survivors(self) -> tuple[list[str], list[str]]:
        survivors = sorted({m for s in self.masked_from.values() for m in s})
        dropped = sorted({m for a in self.active.values() for m in a} - set(survivors))
        return survivors, dropped

    def consistency_requests(self) -> dict[str, ConsistencyRequest]:
        survivors, dropped = self._survivors()
        return {m: ConsistencyRequest(self.round, self.run, survivors, dropped) for m in survivors}

    def add_consistency(self, reply: ConsistencyReply) -> None:
        if reply.member not in {m for s in self.masked_from.values() for m in s}:
            raise SecAggError(f"consistency reply from {reply.member}, who sent no masked input")
        for gid, signature in reply.signatures.items():
            if reply.member not in self.masked_from.get(gid, set()):
                raise SecAggError(f"{reply.member} signed the survivors of group {gid}, which it sent nothing for")
            self.survivor_signatures.setdefault(gid, {})[reply.member] = signature

    # ------------------------------------------------------------------ stage 5
    def unmask_requests(self) -> dict[str, UnmaskRequest]:
        survivors, dropped = self._survivors()
        signers = {m for sigs in self.survivor_signatures.values() for m in sigs}
        return {
            m: UnmaskRequest(self.round, self.run, survivors, dropped, self.survivor_signatures)
            for m in survivors
            if m in signers
        }

    def add_unmask(self, reply: UnmaskReply) -> None:
        if reply.member not in {m for s in self.masked_from.values() for m in s}:
            raise SecAggError(f"unmask reply from {reply.member}, who sent no masked input")
        self.unmask_replies[reply.member] = reply

    def _skip(self, group: SecAggGroup, why: str) -> None:
        for shard in group.shards:
            self.skipped[shard] = why
        log.warning("round %d: secure aggregation skips %s: %s", self.round, ", ".join(group.shards), why)

    def finish(self) -> dict[str, ShardSum]:
        """Every recoverable shard's sum at once (tests, small models); see :meth:`iter_finish`."""
        return {result.shard: result for result in self.iter_finish()}

    def iter_finish(self) -> Iterator[ShardSum]:
        """Remove the masks and yield each recoverable shard's sum, one shard at a time.

        A group's secrets are all recovered before any of its shards is unmasked, so a group
        is unmasked completely or skipped. Each shard's masked sum is freed once its result
        is built; drop each result before taking the next to keep one shard in memory.
        Unrecoverable groups are skipped (``skipped`` says why).
        """
        try:
            for gid, group in self.groups.items():
                if not self.active.get(gid) or any(s in self.skipped for s in group.shards):
                    continue
                contributors = sorted(self.masked_from.get(gid, set()))
                if not contributors:
                    self._skip(group, "no masked input arrived")
                    continue
                lost = self._disagreement(group, contributors)
                if lost:
                    self._skip(group, lost)
                    continue
                try:
                    unmask = self._unmask_seeds(group, contributors)
                except SecAggError as err:
                    self._skip(group, str(err))
                    continue
                plan = self.plans[gid]
                weight = sum(self.weights[m] for m in contributors) / self.scale_base[gid]
                for shard in group.shards:
                    buf = self.sums.pop(shard)
                    total = buf.load()
                    buf.release()
                    if unmask:
                        apply_masks(total, shard, unmask)
                    values = dequantize_sum(total, len(contributors), plan)
                    del total
                    yield ShardSum(shard, values, contributors, weight, secure=len(group.members) > 1)
                    del values
        finally:
            for buf in self.sums.values():
                buf.release()
            self.sums.clear()

    def _disagreement(self, group: SecAggGroup, contributors: list[str]) -> str:
        """Why no holder will reveal a share for this cohort ('' when enough agreed): a holder
        answers only once :func:`agreement_needed` members signed one survivor set, so a cohort
        of three that lost one member after masking is lost whole. Said here, the operator reads
        that rule, not "0 shares returned", which sent a walkthrough looking for missing shares."""
        if len(group.members) == 1:
            return ""
        needed, signed = agreement_needed(group), sorted(self.survivor_signatures.get(group.group_id, {}))
        if len(signed) >= needed:
            return ""
        return (
            f"{len(signed)} of its {len(group.members)} members signed the survivor set ({', '.join(signed) or 'none'}"
            f"; masked input from {', '.join(contributors)}): holders reveal shares only when {needed} did (more "
            f"than half of the cohort and more than its threshold {group.threshold}), so its sum cannot be unmasked "
            "and its members' updates for it are lost this round"
        )

    def _shares(self, group: SecAggGroup, kind: str, owner: str) -> dict[int, bytes]:
        found: dict[int, bytes] = {}
        for holder, reply in self.unmask_replies.items():
            share = reply.shares.get(group.group_id, {}).get(kind, {}).get(owner)
            if share is not None and holder in group.neighbours[owner]:
                found[group.share_id(holder)] = share
        if len(found) < group.threshold:
            raise SecAggError(
                f"{kind.replace('_', ' ')} of {owner}: {len(found)} shares returned, threshold {group.threshold}"
            )
        return found

    def _unmask_seeds(self, group: SecAggGroup, contributors: list[str]) -> list[tuple[bytes, bool]]:
        """The ``(seed, subtract)`` list that removes every mask left in the group's sums
        (empty for a cohort of one, whose sum is unmasked)."""
        if len(group.members) == 1:
            return []
        active = set(self.active[group.group_id])
        dropped = sorted(active - set(contributors))
        # Recover every secret first: a shard is unmasked completely or not at all.
        seeds = {m: combine_shares(self._shares(group, SELF_SEED, m), group.threshold) for m in contributors}
        keys = {m: combine_shares(self._shares(group, MASK_KEY, m), group.threshold) for m in dropped}
        # Masks are removed block by block, all of them per block (``apply_masks``), never
        # expanded whole. N=8, P=10M (bench/secagg.py, old and new code alternating on the shared
        # 2-core box, median of 3): finish() took 452 ms with expand_mask + sub_into per mask and
        # pycryptodome's Shamir.combine, 223 ms now.
        unmask = [(seeds[m], True) for m in contributors]  # each contributor's self mask
        for d in dropped:
            d_key = X25519PrivateKey.from_private_bytes(keys[d])
            for peer in group.neighbours[d]:
                if peer not in contributors:
                    continue  # its masked vector is not in the sum, nor the mask it shares with d
                peer_pk = self.adverts[peer].mask_pks[group.group_id]
                seed = agree(d_key, peer_pk, mask_context(self.run, self.round, group.group_id, d, peer))
                unmask.append((seed, peer < d))  # peer added +mask if peer < d, else -mask: undo exactly that
        return unmask


def _well_connected(active: list[str], group: SecAggGroup) -> list[str]:
    """The active members with at least the threshold of active neighbours (members refuse to
    mask with fewer: their self mask could not be removed), dropping the rest until none is left
    short. Only a sparse graph with dropouts ever loses anyone here."""
    kept = list(active)
    while True:
        short = [m for m in kept if sum(n in kept for n in group.neighbours[m]) < group.threshold]
        if not short:
            return kept
        kept = [m for m in kept if m not in short]


def _ring_add(acc: np.ndarray, src: np.ndarray, first: bool) -> None:
    """Fold kernel of a masked sum: ``acc += src`` modulo 2**bits (unsigned wrap-around)."""
    if first:
        np.copyto(acc, src)
    else:
        np.add(acc, src, out=acc)
