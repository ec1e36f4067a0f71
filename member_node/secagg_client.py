"""The member's side of SecAgg+: what it keeps, what it sends, what it refuses.

A round's secure aggregation spans five messages (train + advertise keys, share keys,
masked input, consistency, unmask). In a deployment every message is served by a fresh ClientApp
process, so the round's state lives on disk in the node's own state directory
(``<state>/secagg/<run>/r<round>/``, owner-only permissions) and is deleted once the node
has answered ``unmask``: private keys, the self-mask seeds and the unmasked update never
outlive the round and never leave the node in the clear. Each aggregation group the node is
in gets its own mask key pair and self-mask seed, so what one group's members reveal at
``unmask`` opens nothing in another group.

What the node enforces, whatever the coordinator asks:

- neighbours' key adverts must be signed by the identity keys announced for them;
- its neighbours' adverts must sign the same setup (groups, graphs, thresholds) as it was sent;
- it masks only with neighbours that shared keys with it, and refuses to send a masked
  input for a group where fewer than two members are active (its sum would be its update)
  or fewer than the threshold of its neighbours;
- it answers ``unmask`` once per round and never reveals both the self-mask seed share and
  the mask-key share of the same member (the two would unmask that member's update); and as
  each group's holders answer on their own, a member's two secrets in one group are never
  the same as in another;
- it signs one survivor set per group and session and reveals shares only for that set, and
  only once more than half of the group (and more than the threshold) signed the same one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import save_file

from aggregation.secagg.keys import (
    RoundKeys,
    agree,
    agreement_needed,
    mask_context,
    open_sealed,
    pair_context,
    seal,
    sign_advert,
    sign_survivors,
    survivors_signed,
    verify_advert,
)
from aggregation.secagg.masks import apply_masks
from aggregation.secagg.quantize import QuantizationPlan, quantize, secure_rng
from aggregation.secagg.shamir import split_secret
from aggregation.secagg.vectors import flatten_shard
from privacy.keys import load_public_key, public_key_hex
from shared_model.durable import fsync_dir
from shared_model.protocol import (
    ConsistencyReply,
    ConsistencyRequest,
    KeyAdvert,
    MaskedInputReply,
    MaskedInputRequest,
    ProtocolError,
    SecAggGroup,
    SecAggSetup,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)
from shared_model.shards import shard_of

SELF_SEED = "self_seed"
MASK_KEY = "mask_key"


def _share_aad(run: str, round_number: int, sender: str, recipient: str) -> bytes:
    return f"kyodo-secagg-shares|{run}|{round_number}|{sender}|{recipient}".encode()


def _write_private(path: Path, data: bytes) -> None:
    """Owner-only file, written whole (temp + rename) so a crash never leaves half a key."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    fsync_dir(path.parent)


def _read_update(path: Path) -> dict[str, np.ndarray]:
    """The flat float32 shard vectors that ``begin`` stored with safetensors' ``save_file``.

    Read straight into numpy-owned memory (one ``read`` per vector) rather than with
    ``load_file``, which copies through a buffer of its own: measured for a 10M-entry shard,
    12 ms instead of 44 ms. The header is the safetensors one (8-byte little-endian length,
    then JSON), and only what ``begin`` writes is accepted.
    """
    where = "masked input: stored update"
    size = path.stat().st_size
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if not 2 <= header_len <= min(size - 8, 100_000_000):
            raise ProtocolError(f"{where} has a bad header length")
        header = json.loads(fh.read(header_len))
        base = 8 + header_len
        out: dict[str, np.ndarray] = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, stop = meta["data_offsets"]
            (length,) = meta["shape"]
            if meta["dtype"] != "F32" or stop - start != 4 * length or not 0 <= start <= stop <= size - base:
                raise ProtocolError(f"{where}: {name} is not a float32 vector inside the file")
            fh.seek(base + start)
            vector = np.fromfile(fh, dtype="<f4", count=length)
            if vector.size != length:
                raise ProtocolError(f"{where}: {name} is truncated")
            out[name] = vector.astype(np.float32, copy=False)
    return out


class MemberSecAgg:
    """One node's SecAgg+ state machine, persisted under ``state_dir/secagg``."""

    def __init__(
        self,
        state_dir: Path | str,
        member: str,
        signing_key: Ed25519PrivateKey,
        *,
        equal_weight: bool = False,
        pinned_keys: Mapping[str, str] | None = None,
    ):
        """``equal_weight``: refuse any scale but 1 (a DP node, which withholds its size: a
        scale the coordinator picks could shrink every other member of a cohort to nothing, so
        the cohort's sum would be this node's update alone). ``pinned_keys``: member -> its
        published Ed25519 key (hex); the identity keys a round lists must be these, so the
        coordinator cannot seat members of its own making beside this one (None: not pinned)."""
        self.root = Path(state_dir) / "secagg"
        self.member = member
        self.signing_key = signing_key
        self.equal_weight = equal_weight
        self.pinned_keys = dict(pinned_keys) if pinned_keys is not None else None

    def _dir(self, run: str, round_number: int) -> Path:
        path = self.root / run / f"r{round_number}"
        # The protocol refuses such run ids; this holds even if a path reaches here another way
        # (a review's run id ".." put the round's private keys in state/, never deleted).
        if run in ("", ".", "..") or "/" in run or path.resolve().parent.parent != self.root.resolve():
            raise ProtocolError(f"run id {run!r} cannot name a secure-aggregation directory")
        return path

    def _existing(self, run: str, round_number: int, stage: str) -> Path:
        path = self._dir(run, round_number)
        if not (path / "setup.json").is_file():
            raise ProtocolError(f"{stage}: no secure-aggregation round {round_number} of run {run} on this node")
        return path

    # ------------------------------------------------------------------ stage 1: after training
    def begin(
        self,
        run: str,
        round_number: int,
        setup: SecAggSetup,
        deltas: dict[str, torch.Tensor],
        base: str = "",
        *,
        weight: int = 0,
    ) -> KeyAdvert:
        """Keep the update (and ``base``, the model it was trained from) and fresh round keys on
        disk; return the signed key advert. ``weight``: the example count the node reports for
        the round (0: withheld, as under DP)."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in deltas.items():
            grouped.setdefault(shard_of(name), {})[name] = tensor
        vectors = {shard: flatten_shard(tensors) for shard, tensors in grouped.items()}
        return self._begin(run, round_number, setup, vectors, base, weight)

    def resendable(self, run: str, round_number: int) -> tuple[dict[str, np.ndarray], str] | None:
        """The update this node trained for the round and the model it trained it from, if it
        can go into a new secure-aggregation session: kept, and never masked. Once its masked
        form left, other members' unmask shares could open that session's sum, and the same
        update in a session with another cohort would let the two sums be told apart."""
        if not self.can_resend(run, round_number):
            return None
        path = self._dir(run, round_number)
        base = path / "base.txt"
        return _read_update(path / "update.safetensors"), base.read_text() if base.is_file() else ""

    def can_resend(self, run: str, round_number: int) -> bool:
        """``resendable`` without reading the update."""
        path = self._dir(run, round_number)
        return (path / "update.safetensors").is_file() and not (path / "masked.done").exists()

    def resend(self, run: str, round_number: int, setup: SecAggSetup) -> KeyAdvert:
        """The kept update of ``resendable`` under a new session's fresh keys (a coordinator that
        restarted mid-round sends the round again); its size withheld (weight 0), as the reply is."""
        kept = self.resendable(run, round_number)
        if kept is None:
            raise ProtocolError(f"round {round_number} of run {run}: no update this node can send again")
        return self._begin(run, round_number, setup, *kept, 0)

    def _begin(
        self, run: str, round_number: int, setup: SecAggSetup, vectors: dict[str, np.ndarray], base: str, weight: int
    ) -> KeyAdvert:
        self._forget_other_rounds(run)
        path = self._dir(run, round_number)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path / "update.safetensors.tmp"
        save_file(vectors, str(tmp))
        os.chmod(tmp, 0o600)
        tmp.replace(path / "update.safetensors")
        _write_private(path / "base.txt", base.encode())
        keys = RoundKeys.generate(g.group_id for g in setup.groups_of(self.member) if len(g.members) > 1)
        cipher_sk, mask_sks = keys.private_bytes()
        stored = {"cipher": cipher_sk.hex(), "masks": {g: sk.hex() for g, sk in mask_sks.items()}}
        _write_private(path / "keys.json", json.dumps(stored).encode())
        _write_private(path / "setup.json", setup.to_json().encode())
        _write_private(path / "weight.txt", str(int(weight)).encode())
        cipher_pk, mask_pks = keys.public_bytes()
        digest = setup.digest()
        signature = sign_advert(self.signing_key, run, round_number, self.member, cipher_pk, mask_pks, digest, weight)
        advert = KeyAdvert(cipher_pk, mask_pks, digest, weight, signature)
        _write_private(path / "advert.json", json.dumps(advert.to_json()).encode())
        return advert

    def _forget_other_rounds(self, run: str) -> None:
        """One round at a time: every other round's secrets go when a round begins. A node that
        vanished before ``unmask`` never got to delete them, and a walkthrough found a dropped
        member's round keys and its neighbours' shares still on disk two runs later. Another
        run's update whose masked form never left stays (without its keys) for that run's
        resume to send again under fresh ones; this run's older rounds are never sent again."""
        if not self.root.is_dir():
            return
        for run_dir in self.root.iterdir():
            for round_dir in run_dir.iterdir() if run_dir.is_dir() else ():
                resendable = (round_dir / "update.safetensors").is_file() and not (round_dir / "masked.done").exists()
                if run_dir.name == run or not resendable:
                    shutil.rmtree(round_dir, ignore_errors=True)
                    continue
                for item in round_dir.iterdir():
                    if item.name not in ("update.safetensors", "base.txt"):
                        item.unlink(missing_ok=True)

    def _load(self, path: Path) -> tuple[SecAggSetup, RoundKeys]:
        setup = SecAggSetup.from_json((path / "setup.json").read_text(), "stored secagg setup")
        stored = json.loads((path / "keys.json").read_text())
        masks = {g: bytes.fromhex(sk) for g, sk in stored["masks"].items()}
        return setup, RoundKeys.from_private_bytes(bytes.fromhex(stored["cipher"]), masks)

    # ------------------------------------------------------------------ stage 2
    def share_keys(self, request: ShareKeysRequest) -> ShareKeysReply:
        """Check neighbours' adverts; in each group, Shamir-share the group's mask key and a fresh
        self-mask seed of its own."""
        path = self._existing(request.run, request.round, "share keys")
        if (path / "adverts.json").exists():
            raise ProtocolError("share keys: already answered for this round")
        setup, keys = self._load(path)
        for other, key in request.identity_keys.items():
            if self.pinned_keys is not None and self.pinned_keys.get(other) != key:
                raise ProtocolError(
                    f"share keys: {other}'s identity key is not the one this member's consortium file publishes"
                    + ("" if other in self.pinned_keys else f" ({other} is not in it)")
                )
        for other, advert in request.adverts.items():
            verify_advert(
                load_public_key(request.identity_keys[other]),
                advert.signature,
                request.run,
                request.round,
                other,
                advert.cipher_pk,
                advert.mask_pks,
                advert.setup_sha256,
                advert.weight,
            )
            if advert.setup_sha256 != setup.digest():
                # Its groups, graphs or thresholds differ from this node's: a member told it is
                # in a cohort of three while its neighbours are told five, under one group id,
                # had its update opened in a review.
                raise ProtocolError(f"share keys: {other} was sent another secure-aggregation setup for this round")
        _, mask_sks = keys.private_bytes()
        self_seeds: dict[str, bytes] = {}
        bundles: dict[str, dict[str, dict[str, str]]] = {}
        for group in setup.groups_of(self.member):
            present = [n for n in group.neighbours[self.member] if n in request.adverts]
            if len(group.members) == 1 or len(present) < group.threshold:
                continue  # cannot share safely for this group: the node sits it out
            keyless = [n for n in present if group.group_id not in request.adverts[n].mask_pks]
            if keyless:
                raise ProtocolError(f"share keys: {keyless} advertise no mask key for group {group.group_id}")
            ids = [group.share_id(n) for n in present]
            self_seeds[group.group_id] = os.urandom(32)
            seed_shares = split_secret(self_seeds[group.group_id], group.threshold, ids)
            key_shares = split_secret(mask_sks[group.group_id], group.threshold, ids)
            for n in present:
                sid = group.share_id(n)
                bundles.setdefault(n, {})[group.group_id] = {
                    SELF_SEED: seed_shares[sid].hex(),
                    MASK_KEY: key_shares[sid].hex(),
                }
        cipher_sk, _ = keys.private_bytes()
        sealed = {}
        for recipient, bundle in bundles.items():
            key = agree(
                keys.cipher_private,
                request.adverts[recipient].cipher_pk,
                pair_context(request.run, request.round, self.member, recipient, "shares"),
            )
            plaintext = json.dumps(bundle, sort_keys=True).encode()
            sealed[recipient] = seal(key, plaintext, _share_aad(request.run, request.round, self.member, recipient))
        _write_private(path / "self_seeds.json", json.dumps({g: v.hex() for g, v in self_seeds.items()}).encode())
        own = json.loads((path / "advert.json").read_text())
        sessions = {
            g.group_id: _session_digest(g, request.adverts, self.member, own) for g in setup.groups_of(self.member)
        }
        _write_private(path / "sessions.json", json.dumps(sessions, sort_keys=True).encode())
        _write_private(path / "identity_keys.json", json.dumps(request.identity_keys, sort_keys=True).encode())
        adverts = {m: a.to_json() for m, a in request.adverts.items()}
        _write_private(path / "adverts.json", json.dumps(adverts, sort_keys=True).encode())
        return ShareKeysReply(self.member, sealed)

    # ------------------------------------------------------------------ stage 3
    def masked_input(self, request: MaskedInputRequest) -> MaskedInputReply:
        """Quantize each shard's (weighted) update and add the self mask and pairwise masks."""
        path = self._existing(request.run, request.round, "masked input")
        if not (path / "adverts.json").is_file():
            raise ProtocolError("masked input: this node has not shared keys for this round")
        if (path / "masked.done").exists():
            raise ProtocolError("masked input: already answered for this round")
        setup, keys = self._load(path)
        adverts = {
            m: KeyAdvert.from_json(a, "stored adverts")
            for m, a in json.loads((path / "adverts.json").read_text()).items()
        }
        received: dict[str, dict[str, dict[str, str]]] = {}  # group -> owner -> kind -> share hex
        neighbours = {n for g in setup.groups_of(self.member) for n in g.neighbours[self.member]}
        for sender, blob in request.sealed.items():
            if sender not in adverts or sender not in neighbours:
                raise ProtocolError(f"masked input: shares from {sender}, who is not a neighbour")
            key = agree(
                keys.cipher_private,
                adverts[sender].cipher_pk,
                pair_context(request.run, request.round, self.member, sender, "shares"),
            )
            bundle = json.loads(open_sealed(key, blob, _share_aad(request.run, request.round, sender, self.member)))
            for gid, kinds in bundle.items():
                received.setdefault(gid, {})[sender] = kinds
        own_weight = int((path / "weight.txt").read_text())
        vectors = _read_update(path / "update.safetensors")
        self_seeds = {g: bytes.fromhex(v) for g, v in json.loads((path / "self_seeds.json").read_text()).items()}
        rng = secure_rng()
        masked: dict[str, np.ndarray] = {}
        groups_sent: list[str] = []
        for group in setup.groups_of(self.member):
            active = request.active.get(group.group_id, [])
            if self.member not in active:
                continue
            self._check_active(group, active, received.get(group.group_id, {}))
            if len(group.members) > 1 and group.group_id not in self_seeds:
                raise ProtocolError(
                    f"masked input: group {group.group_id} lists this node as active, but too few of its "
                    "neighbours there shared keys for it to share its secrets"
                )
            scale = request.weights.get(group.group_id)
            if scale is None:
                raise ProtocolError(f"masked input: no weight for group {group.group_id}")
            if self.equal_weight and scale != 1.0:
                raise ProtocolError(
                    f"masked input: group {group.group_id} scales this node's update by {scale:g}; under DP it "
                    "withholds its size, so every update in its cohort weighs the same (1)"
                )
            self._check_scale(group, active, scale, adverts, own_weight)
            plan = QuantizationPlan.from_dict(group.quantization)
            peers = [n for n in group.neighbours[self.member] if n in active]
            for shard in group.shards:
                if shard not in vectors:
                    raise ProtocolError(f"masked input: {shard} was not trained by this node this round")
                # Scaled in place (the vector read from disk is this call's own copy), and the
                # masks folded in block by block (``apply_masks``). N=8, P=10M (bench/secagg.py,
                # old and new code alternating on the shared 2-core box, median of 3): the member's
                # stage (this call and the reply's wire form) took 515 ms when it read the update
                # with ``load_file``, scaled a copy, expanded each mask whole before adding it and
                # serialised through ``np.save``; 351 ms now.
                vector = vectors[shard]
                vector *= np.float32(scale)
                values, _clipped = quantize(vector, plan, rng)
                del vector, vectors[shard]
                if len(group.members) > 1:
                    # The self mask, then +mask with each peer after this node in name order and
                    # -mask with each one before it, so every pairwise mask cancels in the sum.
                    seeds = [(self_seeds[group.group_id], False)]
                    for peer in peers:
                        seed = agree(
                            keys.mask_private[group.group_id],
                            adverts[peer].mask_pks[group.group_id],
                            mask_context(request.run, request.round, group.group_id, self.member, peer),
                        )
                        seeds.append((seed, self.member > peer))
                    apply_masks(values, shard, seeds)
                masked[shard] = values
            groups_sent.append(group.group_id)
        (path / "update.safetensors").unlink()
        received_json = json.dumps({"shares": received, "active": request.active, "groups": groups_sent})
        _write_private(path / "received.json", received_json.encode())
        _write_private(path / "masked.done", b"")
        return MaskedInputReply(self.member, masked)

    def _check_scale(
        self, group: SecAggGroup, active: list[str], scale: float, adverts: dict[str, KeyAdvert], own_weight: int
    ) -> None:
        """The scale must be 1 (every update weighs the same) or this node's signed example count
        over the largest signed count of the group's active members (example-weighted FedAvg):
        a review weighed one member 1e30, every other member's scale became ~0, and the cohort's
        sum was that member's update."""
        if scale == 1.0:
            return
        counts = [own_weight] + [adverts[m].weight if m in adverts else 0 for m in active if m != self.member]
        if min(counts) > 0 and math.isclose(scale, own_weight / max(counts), rel_tol=1e-9):
            return
        raise ProtocolError(
            f"masked input: group {group.group_id} scales this node's update by {scale:g}, not 1 nor its count "
            "over the largest its active members signed"
        )

    def _check_active(self, group: SecAggGroup, active: list[str], received: dict[str, dict]) -> None:
        if len(group.members) == 1:
            return  # a cohort of one: its sum is its update, secure aggregation cannot hide it
        if not set(active) <= set(group.members):
            raise ProtocolError(f"masked input: group {group.group_id} lists active members outside the group")
        if len(active) < 2:
            raise ProtocolError(
                f"masked input: group {group.group_id} has {len(active)} active member; its sum would be one update"
            )
        peers = [n for n in group.neighbours[self.member] if n in active]
        if len(peers) < group.threshold:
            # Honestly this node's self mask could not be removed anyway (its seed needs the
            # threshold of shares from neighbours that stay); a review told one member that a
            # single neighbour was active, so it masked with that one alone, then told the
            # others that neighbour dropped and opened the member's update with its mask key.
            raise ProtocolError(
                f"masked input: group {group.group_id} lists {len(peers)} of this node's neighbours as active, "
                f"fewer than the threshold {group.threshold}"
            )
        missing = [n for n in group.neighbours[self.member] if n in active and n not in received]
        if missing:
            raise ProtocolError(f"masked input: group {group.group_id}: no shares received from active {missing}")

    # ------------------------------------------------------------------ stage 4
    def consistency(self, request: ConsistencyRequest) -> ConsistencyReply:
        """Sign, once per round and group, the survivor set the coordinator shows this node,
        with the group's active members and this session's adverts (``survivors_payload``).
        ``unmask`` then reveals shares only for the set signed here, and only when a majority of
        the group signed the same (Bonawitz et al. 2017, section 4): without this stage a review
        showed each holder a different survivor set and opened a member's update from the union."""
        path = self._existing(request.run, request.round, "consistency")
        if not (path / "masked.done").is_file():
            raise ProtocolError("consistency: this node sent no masked input this round")
        if (path / "survivors.json").exists():
            raise ProtocolError("consistency: already answered for this round")
        state = json.loads((path / "received.json").read_text())
        setup, _ = self._load(path)
        survivors = set(request.survivors)
        if self.member not in survivors:
            raise ProtocolError("consistency: this node is not listed among the survivors")
        signed: dict[str, list[str]] = {}
        for group in setup.groups_of(self.member):
            if group.group_id not in state["groups"] or len(group.members) == 1:
                continue
            active = state["active"][group.group_id]
            group_survivors = sorted(survivors & set(active))
            if len(group_survivors) < agreement_needed(group):
                # An honest round that can be unmasked has more: each survivor's self-mask seed
                # needs the threshold of shares from the others. A review told each holder that
                # it and one target alone survived, and collected the target's seed and every
                # other mask key.
                continue
            signed[group.group_id] = group_survivors
        if not signed:
            # No survivor set signed (only cohorts of one, or too few survivors): no unmask
            # stage will ask for this round's secrets, which would otherwise wait on disk for the
            # node's next round (a walkthrough found them). Gone before the reply leaves.
            shutil.rmtree(path, ignore_errors=True)
            return ConsistencyReply(self.member, {})
        _write_private(path / "survivors.json", json.dumps(signed, sort_keys=True).encode())  # before any signature
        sessions = json.loads((path / "sessions.json").read_text())
        signatures = {
            gid: sign_survivors(
                self.signing_key,
                request.run,
                request.round,
                gid,
                bytes.fromhex(sessions[gid]),
                state["active"][gid],
                group_survivors,
            )
            for gid, group_survivors in signed.items()
        }
        return ConsistencyReply(self.member, signatures)

    # ------------------------------------------------------------------ stage 5
    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Reveal, once, the shares the coordinator needs, for each group whose survivor set this
        node signed and a majority of the group (at least the threshold) signed the same:
        self-seed shares of the survivors, mask-key shares of the members that dropped after
        sharing. Then forget the round, whether it revealed anything or not."""
        path = self._existing(request.run, request.round, "unmask")
        if not (path / "survivors.json").is_file():
            raise ProtocolError("unmask: this node signed no survivor set this round (the consistency stage)")
        if (path / "unmask.done").exists():
            raise ProtocolError("unmask: already answered for this round")
        state = json.loads((path / "received.json").read_text())
        signed = json.loads((path / "survivors.json").read_text())
        sessions = json.loads((path / "sessions.json").read_text())
        keys = {**json.loads((path / "identity_keys.json").read_text()), self.member: public_key_hex(self.signing_key)}
        setup, _ = self._load(path)
        agreed: list[SecAggGroup] = []
        for group in setup.groups_of(self.member):
            if group.group_id not in signed:
                continue
            active, survivors = state["active"][group.group_id], signed[group.group_id]
            if set(request.survivors) & set(active) != set(survivors):
                # Checked before anything is marked: a refused request leaves the round answerable.
                raise ProtocolError(f"unmask: group {group.group_id}'s survivors differ from the set this node signed")
            session = bytes.fromhex(sessions[group.group_id])
            statement = (request.run, request.round, group.group_id, session, active, survivors)
            signatures = request.signatures.get(group.group_id, {})
            agreeing = [
                m
                for m in survivors
                if m in signatures
                and m in keys
                and survivors_signed(load_public_key(keys[m]), signatures[m], *statement)
            ]
            # A majority of the whole group, not only the threshold: each member signs once, so
            # at most one survivor set per group can have it. In a sparse graph the threshold of
            # signers need not be anyone's neighbours, and a review had two sets signed by the
            # threshold each, then opened a member from what their holders revealed.
            if len(agreeing) >= agreement_needed(group):
                agreed.append(group)
        _write_private(path / "unmask.done", b"")  # before revealing anything: never answer twice
        try:
            out: dict[str, dict[str, dict[str, bytes]]] = {}
            for group in agreed:
                active, survivors = state["active"][group.group_id], signed[group.group_id]
                kinds: dict[str, dict[str, bytes]] = {SELF_SEED: {}, MASK_KEY: {}}
                for owner, shares in state["shares"].get(group.group_id, {}).items():
                    if owner not in active:
                        continue  # this node never masked with it: none of its masks is in the sum
                    if owner in survivors:
                        kinds[SELF_SEED][owner] = bytes.fromhex(shares[SELF_SEED])
                    else:
                        kinds[MASK_KEY][owner] = bytes.fromhex(shares[MASK_KEY])
                out[group.group_id] = kinds
            return UnmaskReply(self.member, out)
        finally:
            shutil.rmtree(path, ignore_errors=True)


def _session_digest(group: SecAggGroup, adverts: Mapping[str, KeyAdvert], member: str, own: dict) -> str:
    """SHA-256 of the group's adverts this session (fresh keys each): signed with the survivor
    set so that a signature from one session of a round cannot count in another (a review
    replayed them across sessions of a round a node without DP trained again)."""
    seen = {m: adverts[m].to_json() for m in group.members if m in adverts}
    seen[member] = own
    return hashlib.sha256(json.dumps(seen, sort_keys=True).encode()).hexdigest()
