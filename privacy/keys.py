"""The member's Ed25519 identity: the key that signs its privacy ledger and receipts.

Auditors trust only members' public keys, so the private key must never leave the member's
node, never be overwritten (a new key would orphan every receipt signed so far) and never be
readable by other users. Nothing here logs or prints private material.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import stat
import string
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared_model.durable import fsync_dir

log = logging.getLogger(__name__)

_HEX = frozenset(string.hexdigits.lower())


class KeyFormatError(ValueError):
    """A key file or a public key string is not what it must be."""


def load_or_create_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load the member's signing key from ``path``, creating it (mode 0600) on first use.

    Creation is atomic and race-free: the key is written to a private temporary file in the
    same directory, fsynced, then hard-linked into place, which fails rather than replaces
    if another process created the key meanwhile (then that key is loaded instead).
    """
    path = Path(path)
    if path.exists():
        return _load(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    if not _create_exclusive(path, pem):
        return _load(path)
    log.info("created signing key %s (public key %s)", path, public_key_hex(key))
    return key


FINGERPRINT_KEY_FILE = "dataset_fingerprint.key"
KEYED_FINGERPRINT_PREFIX = "hmac-sha256:"


def load_or_create_fingerprint_key(path: str | os.PathLike[str]) -> bytes:
    """The member's secret key for the dataset fingerprints its receipts carry (32 bytes, 0600).

    Why keyed: a plain hash of the dataset manifest in every receipt would let the coordinator
    confirm a guessed dataset exactly (add or drop one episode and the hash changes). Keyed,
    the value still pins the dataset for the member and for an auditor the member gives the
    key to (:func:`fingerprint_matches`).
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _create_exclusive(path, secrets.token_bytes(32).hex().encode())
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("dataset fingerprint key %s is accessible by other users (mode %o); it should be 0600", path, mode)
    key = bytes.fromhex(path.read_text(encoding="ascii").strip())
    if len(key) != 32:
        raise ValueError(f"{path}: a dataset fingerprint key is 32 bytes (64 hex digits)")
    return key


def keyed_fingerprint(key: bytes, fingerprint: str, nonce: bytes | None = None) -> str:
    """What a receipt records for a dataset: ``hmac-sha256:<nonce>:<HMAC(key, nonce || manifest
    fingerprint)>``, with a fresh random 16-byte nonce per receipt (``nonce`` for checks only).

    Why the nonce: with one value per dataset, every receipt told the coordinator whether the
    member's data had changed since the last one. Under a fresh nonce two receipts of the same
    data look unrelated to anyone without the key; with the key, each still pins its data.
    """
    nonce = secrets.token_bytes(16) if nonce is None else nonce
    mac = hmac.new(key, nonce + fingerprint.encode(), hashlib.sha256).hexdigest()
    return f"{KEYED_FINGERPRINT_PREFIX}{nonce.hex()}:{mac}"


def fingerprint_matches(key: bytes, fingerprint: str, recorded: str) -> bool:
    """Whether a receipt's ``recorded`` fingerprint is that of the data with manifest
    ``fingerprint`` under ``key`` (also the older form without a nonce: HMAC of the manifest)."""
    if not recorded.startswith(KEYED_FINGERPRINT_PREFIX):
        return False
    body = recorded[len(KEYED_FINGERPRINT_PREFIX) :]
    if ":" not in body:
        expected = KEYED_FINGERPRINT_PREFIX + hmac.new(key, fingerprint.encode(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, recorded)
    nonce_hex = body.split(":", 1)[0]
    try:
        nonce = bytes.fromhex(nonce_hex)
    except ValueError:
        return False
    return hmac.compare_digest(keyed_fingerprint(key, fingerprint, nonce), recorded)


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Write ``data`` to a new file at ``path`` (0600) atomically; False if ``path`` already exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)
    return True


def _load(path: Path) -> Ed25519PrivateKey:
    """Read an existing key file, refusing anything but an unencrypted Ed25519 PKCS8 PEM key."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("signing key %s is accessible by other users (mode %o); it should be 0600", path, mode)
    data = path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # The exception text from the parser never contains key material, but keep ours generic.
        raise KeyFormatError(
            f"{path} exists but is not an unencrypted PEM private key ({type(exc).__name__}); "
            "refusing to overwrite it: move it away or point the node at the right key file"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFormatError(
            f"{path} holds a {type(key).__name__.removeprefix('_')} key, not an Ed25519 key; refusing to use or overwrite it"
        )
    return key


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key as 64 lowercase hex characters: the member's public identity."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise TypeError(f"expected an Ed25519 key, got {type(key).__name__}")
    return key.public_bytes(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw).hex()


def load_public_key(hex_key: str) -> Ed25519PublicKey:
    """Parse a public key written by ``public_key_hex`` (64 hex characters)."""
    if not isinstance(hex_key, str):
        raise KeyFormatError(f"public key must be a hex string, got {type(hex_key).__name__}")
    text = hex_key.strip().lower()
    if len(text) != 64 or not set(text) <= _HEX:
        shown = hex_key if len(hex_key) <= 80 else hex_key[:77] + "..."
        raise KeyFormatError(f"public key must be 64 hex characters (32 bytes), got {shown!r}")
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))
    except ValueError as exc:
        raise KeyFormatError(f"invalid Ed25519 public key {text}: {exc}") from None
