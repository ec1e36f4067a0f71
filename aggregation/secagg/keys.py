"""Per-round key pairs, pairwise key agreement, share encryption and signed key adverts.

Each member makes fresh X25519 key pairs every round: one *cipher* pair, whose pairwise
keys encrypt the Shamir shares exchanged through the server, and one *mask* pair per
aggregation group (cohort) it is in, whose pairwise keys seed that group's cancelling
masks. The cipher pair must differ from the mask pairs: the server legitimately learns the
mask private key of a member that drops out, and must not thereby also learn the key that
decrypts the shares that member received. The mask pairs must differ from each other: each
group's members answer ``unmask`` on their own, so a coordinator can tell one group that a
member dropped (and collect its mask key) and another that it stayed (and collect its
self-mask seed); with one key for every group the two together opened the member's update
(a review did, max error 1.8e-6).

Adverts (the public keys, and the digest of the round's secure-aggregation setup the member
was sent) are signed with the member's long-lived Ed25519 identity key (``privacy.keys``), so
a server cannot substitute its own keys and sit in the middle, and members can tell when the
server sent them different setups: a review gave one member a cohort of three and its
neighbours one of five under the same group id, and opened the first member's update.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from aggregation.secagg.errors import SecAggError

if TYPE_CHECKING:
    from shared_model.protocol import SecAggGroup

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_PAIR_DOMAIN = b"kyodo/secagg/pair/v1"
_ADVERT_DOMAIN = b"kyodo/secagg/advert/v4"


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.Raw,
        format=serialization.PrivateFormat.Raw,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _check_bytes(value: object, what: str, size: int | None = KEY_BYTES) -> bytes:
    if not isinstance(value, bytes | bytearray):
        raise SecAggError(f"{what} must be bytes, got {type(value).__name__}")
    if size is not None and len(value) != size:
        raise SecAggError(f"{what} must be {size} bytes, got {len(value)}")
    return bytes(value)


def _x25519_private(raw: object, what: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(_check_bytes(raw, what))


@dataclass
class RoundKeys:
    """A member's X25519 key pairs for one round (private halves; never sent anywhere): the
    cipher pair and one mask pair per aggregation group, keyed by group id."""

    cipher_private: X25519PrivateKey = field(repr=False)
    mask_private: dict[str, X25519PrivateKey] = field(repr=False)

    @classmethod
    def generate(cls, groups: Iterable[str]) -> RoundKeys:
        """Fresh keys from OpenSSL's CSPRNG (seeded by the OS), which ``cryptography`` uses for X25519."""
        return cls(
            cipher_private=X25519PrivateKey.generate(),
            mask_private={_check_text(g, "group id"): X25519PrivateKey.generate() for g in groups},
        )

    def public_bytes(self) -> tuple[bytes, dict[str, bytes]]:
        """``(cipher_pk, {group: mask_pk})``, raw 32 bytes each: what the member adverts."""
        return _raw_public(self.cipher_private), {g: _raw_public(k) for g, k in self.mask_private.items()}

    def private_bytes(self) -> tuple[bytes, dict[str, bytes]]:
        """``(cipher_sk, {group: mask_sk})`` raw, so a member can resume a round after a restart.

        Whoever stores these must keep them as private as the identity key (mode 0600).
        """
        return _raw_private(self.cipher_private), {g: _raw_private(k) for g, k in self.mask_private.items()}

    @classmethod
    def from_private_bytes(cls, cipher_private: bytes, mask_private: Mapping[str, bytes]) -> RoundKeys:
        """Inverse of ``private_bytes``."""
        keys = cls(
            cipher_private=_x25519_private(cipher_private, "cipher private key"),
            mask_private={
                _check_text(g, "group id"): _x25519_private(raw, f"mask private key of group {g}")
                for g, raw in mask_private.items()
            },
        )
        # Compare the public halves: X25519 clamps a few bits, so distinct raw bytes can be one key.
        _check_distinct(*keys.public_bytes(), "this member")
        return keys


def _field(value: str | bytes) -> bytes:
    """Length-prefixed field: makes concatenations unambiguous ("ab"+"c" != "a"+"bc")."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    return struct.pack(">I", len(data)) + data


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise SecAggError(f"{what} must be a non-empty str, got {value!r}")
    return value


def _check_round(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 63:
        raise SecAggError(f"round must be a non-negative integer, got {value!r}")
    return value


def _check_distinct(cipher_pk: bytes, mask_pks: Mapping[str, bytes], member: str) -> None:
    """Every key of an advert distinct (see the module docstring for why each must be)."""
    if cipher_pk in mask_pks.values():
        raise SecAggError(f"{member} uses its cipher key as a mask key; they must differ")
    if len(set(mask_pks.values())) != len(mask_pks):
        raise SecAggError(f"{member} uses one mask key in two aggregation groups; each group needs its own")


def pair_context(run: str, round: int, a: str, b: str, purpose: str) -> bytes:
    """HKDF ``info`` binding a pairwise key to one run, round, member pair and purpose.

    The members are put in sorted order, so both ends derive the same key; binding run and
    round means a key (and so a mask) is never reused across rounds even if X25519 keys were,
    and the purpose separates share-encryption keys from mask seeds.
    """
    _check_text(run, "run id")
    _check_round(round)
    _check_text(a, "member name")
    _check_text(b, "member name")
    _check_text(purpose, "key purpose")
    if a == b:
        raise SecAggError(f"a pairwise key needs two distinct members, got {a!r} twice")
    first, second = sorted((a, b))
    return _PAIR_DOMAIN + _field(run) + struct.pack(">Q", round) + _field(first) + _field(second) + _field(purpose)


def mask_context(run: str, round: int, group: str, a: str, b: str) -> bytes:
    """HKDF context of the pairwise mask seed of members ``a`` and ``b`` (either order) in one group."""
    return pair_context(run, round, a, b, "mask/" + _check_text(group, "group id"))


def agree(private: X25519PrivateKey, peer_public: bytes, context: bytes) -> bytes:
    """32-byte pairwise key: HKDF-SHA256 over the X25519 shared secret, ``info=context``.

    The raw X25519 output is not uniform, and using it directly for two purposes would tie
    them together; HKDF both extracts a uniform key and separates purposes via ``context``.
    """
    if not isinstance(private, X25519PrivateKey):
        raise SecAggError(f"private key must be an X25519PrivateKey, got {type(private).__name__}")
    peer = X25519PublicKey.from_public_bytes(_check_bytes(peer_public, "peer public key"))
    context = _check_bytes(context, "key context", size=None)
    if not context:
        raise SecAggError("key context must not be empty: it is what separates keys of different rounds and pairs")
    try:
        shared = private.exchange(peer)
    except ValueError:
        # OpenSSL refuses small-order points (all-zero shared secret): a malformed or hostile key.
        raise SecAggError("peer public key is a small-order X25519 point; refusing the key agreement") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=context).derive(shared)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """ChaCha20-Poly1305 encryption; returns ``nonce || ciphertext || tag``.

    A random 96-bit nonce is safe here because each pairwise key encrypts a handful of
    messages; ``aad`` should name sender, recipient, run and round so that the server cannot
    redirect a ciphertext to another slot undetected.
    """
    cipher = ChaCha20Poly1305(_check_bytes(key, "encryption key"))
    nonce = os.urandom(NONCE_BYTES)
    return nonce + cipher.encrypt(
        nonce, _check_bytes(plaintext, "plaintext", size=None), _check_bytes(aad, "aad", size=None)
    )


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Decrypt a ``seal`` blob; any tampering, wrong key or wrong ``aad`` raises ``SecAggError``."""
    cipher = ChaCha20Poly1305(_check_bytes(key, "encryption key"))
    blob = _check_bytes(blob, "sealed blob", size=None)
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise SecAggError(f"sealed blob is {len(blob)} bytes, shorter than nonce and tag ({NONCE_BYTES + TAG_BYTES})")
    try:
        return cipher.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _check_bytes(aad, "aad", size=None))
    except InvalidTag:
        raise SecAggError("sealed blob failed authentication: wrong key, wrong aad or tampered data") from None


def advert_payload(
    run: str,
    round: int,
    member: str,
    cipher_pk: bytes,
    mask_pks: Mapping[str, bytes],
    setup_digest: bytes,
    weight: int,
) -> bytes:
    """The canonical bytes a member signs for its round key advert.

    Binding run, round and member stops a server from replaying an old advert or passing one
    member's keys off as another's; binding each mask key to its group id stops it from
    moving a key from one group to another; binding ``setup_digest`` (SHA-256 of the round's
    setup as the member received it) lets each neighbour check that both were sent the same
    groups, graphs and thresholds, and ties the advert to one session of the round; binding
    ``weight`` (the example count the member reported, 0 if withheld) lets every member of a
    cohort check the scale the coordinator asks it to apply: a review weighed one member 1e30
    and the cohort's sum became that member's update.
    """
    _check_text(run, "run id")
    _check_round(round)
    _check_text(member, "member name")
    cipher_pk = _check_bytes(cipher_pk, "cipher public key")
    setup_digest = _check_bytes(setup_digest, "setup digest")
    if not isinstance(mask_pks, Mapping):
        raise SecAggError(f"mask public keys must be a mapping of group id to key, got {type(mask_pks).__name__}")
    masks = {
        _check_text(g, "group id"): _check_bytes(pk, f"mask public key of group {g}") for g, pk in mask_pks.items()
    }
    _check_distinct(cipher_pk, masks, f"member {member!r}")
    payload = _ADVERT_DOMAIN + _field(run) + struct.pack(">Q", round) + _field(member) + _field(cipher_pk)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight < 1 << 63:
        raise SecAggError(f"advert weight must be an integer >= 0, got {weight!r}")
    payload += _field(setup_digest) + struct.pack(">Q", weight) + struct.pack(">I", len(masks))
    for group in sorted(masks):
        payload += _field(group) + _field(masks[group])
    return payload


def sign_advert(
    signing_key: Ed25519PrivateKey,
    run: str,
    round: int,
    member: str,
    cipher_pk: bytes,
    mask_pks: Mapping[str, bytes],
    setup_digest: bytes,
    weight: int,
) -> bytes:
    """64-byte Ed25519 signature over ``advert_payload``."""
    return _sign(signing_key, advert_payload(run, round, member, cipher_pk, mask_pks, setup_digest, weight))


def verify_advert(
    public_key: Ed25519PublicKey,
    signature: bytes,
    run: str,
    round: int,
    member: str,
    cipher_pk: bytes,
    mask_pks: Mapping[str, bytes],
    setup_digest: bytes,
    weight: int,
) -> None:
    """Check an advert against the member's identity key; ``SecAggError`` if it does not verify."""
    payload = advert_payload(run, round, member, cipher_pk, mask_pks, setup_digest, weight)
    if not _verifies(public_key, signature, payload, "advert signature"):
        raise SecAggError(f"advert of member {member!r} for run {run!r} round {round} has an invalid signature")


def _sign(signing_key: Ed25519PrivateKey, payload: bytes) -> bytes:
    if not isinstance(signing_key, Ed25519PrivateKey):
        raise SecAggError(f"signing key must be an Ed25519PrivateKey, got {type(signing_key).__name__}")
    return signing_key.sign(payload)


def _verifies(public_key: Ed25519PublicKey, signature: bytes, payload: bytes, what: str) -> bool:
    if not isinstance(public_key, Ed25519PublicKey):
        raise SecAggError(f"identity key must be an Ed25519PublicKey, got {type(public_key).__name__}")
    try:
        public_key.verify(_check_bytes(signature, what, size=64), payload)
    except InvalidSignature:
        return False
    return True


_SURVIVORS_DOMAIN = b"kyodo/secagg/survivors/v2"


def survivors_payload(
    run: str, round: int, group: str, session_digest: bytes, active: Iterable[str], survivors: Iterable[str]
) -> bytes:
    """The canonical bytes a member signs, once per round and group, in the consistency stage:
    the group's active members (whom it masked with) and the survivors it was shown, bound to
    this session of the round by ``session_digest`` (of the group's adverts, whose keys are
    fresh each session: a review pooled signatures from sessions of a round run again).

    A holder reveals shares only for the set it signed and only when more than half of the
    group signed the same (:func:`agreement_needed`): each member signs
    once, so two sets can never both be answered. The threshold alone was not enough: in a
    sparse graph a review had two sets signed by the threshold each and opened a member.
    """
    _check_text(run, "run id")
    _check_round(round)
    _check_text(group, "group id")
    payload = _SURVIVORS_DOMAIN + _field(run) + struct.pack(">Q", round) + _field(group)
    payload += _field(_check_bytes(session_digest, "session digest"))
    for names in (sorted(set(active)), sorted(set(survivors))):
        payload += struct.pack(">I", len(names)) + b"".join(_field(_check_text(n, "member name")) for n in names)
    return payload


def sign_survivors(signing_key: Ed25519PrivateKey, *statement) -> bytes:
    """64-byte Ed25519 signature over ``survivors_payload(*statement)``."""
    return _sign(signing_key, survivors_payload(*statement))


def survivors_signed(public_key: Ed25519PublicKey, signature: bytes, *statement) -> bool:
    """Whether ``signature`` is the key's signature over ``survivors_payload(*statement)``."""
    return _verifies(public_key, signature, survivors_payload(*statement), "survivors signature")


def agreement_needed(group: SecAggGroup) -> int:
    """Survivors a node signs for, and signatures on one survivor set it needs before it
    unmasks: more than half of the group, and more than the threshold (each survivor's seed
    needs the threshold of shares from the others). Two sets can never both have it. Here,
    not in the node, because the coordinator must know it too, to say why a cohort was lost."""
    return max(group.threshold + 1, len(group.members) // 2 + 1)
