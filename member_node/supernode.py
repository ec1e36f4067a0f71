"""A member's deployment: its keys, its config file, and the Flower SuperNode it runs.

``kyodo-member init`` writes everything a member needs into one directory it owns:

- ``member.yaml``: who the member is, where its data and state live, its privacy budget
  (the node config Flower hands the ClientApp: it never comes from the coordinator), and how
  to reach the consortium's SuperLink;
- ``state/member_ed25519.pem``: the Ed25519 key that signs the privacy ledger (the same file
  :class:`member_node.node.MemberNode` uses, created once and never replaced);
- ``keys/supernode_auth`` (+ ``.pub``): the EC P-384 key Flower's node authentication
  checks (OpenSSH format: what ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` read);
- ``membership.json``: the public half of both keys and the budget it claims, which the
  member sends to the operator (auditors check its receipts against that budget).

``kyodo-member start`` checks all of that before Flower sees it (so a wrong path is one clear
line, not a traceback from a subprocess), waits for the SuperLink with bounded exponential
backoff while it refuses connections, then runs ``flower-supernode`` and watches its output:
a key the SuperLink has never accepted is reported as unregistered at once, while a key it
accepted before is retried for a while, because Flower keeps a node that vanished without
saying goodbye (``kill -9``, power loss) online for two heartbeat intervals and refuses a
second session for it meanwhile.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from member_node.identity import own_privacy_problem, workers_problem, write_budget_file
from member_node.reply_timing import ReplyDelay
from privacy.budget import Budget
from privacy.eval_release import EvalPrivacy
from privacy.keys import load_or_create_signing_key, public_key_hex
from shared_model.device import resolve_device
from shared_model.durable import cannot_write
from shared_model.flower_processes import flower_executable, flower_path, log_retry, process_ended, still_catches

log = logging.getLogger("kyodo.member")

MEMBER_FILE = "member.yaml"
MEMBERSHIP_FILE = "membership.json"
SESSION_FILE = "supernode.json"
SIGNING_KEY_FILE = "member_ed25519.pem"  # inside the state dir, where MemberNode looks for it
AUTH_KEY_FILE = "keys/supernode_auth"

# What flower-supernode prints (Flower 1.42) for the outcomes ``start`` must tell apart.
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_ACTIVATION_REFUSED = "Failed to activate SuperNode"
_TLS_REFUSED = "CERTIFICATE_VERIFY_FAILED"
_KEY_UNREADABLE = "Unable to parse the private key file"
# How a SuperNode that was asked to stop exits: Flower's flwr_exit maps its graceful codes to
# status 0 and every error (activation refused, TLS, bad key) to status 1.
_GRACEFUL = {0, -signal.SIGTERM, -signal.SIGINT}


class SetupError(Exception):
    """Something the member must fix (a path, a key, a registration); the text says what."""


class SuperLinkUnreachable(Exception):
    """The SuperLink refused or dropped the connection: it may still be starting, so retry."""


class StaleSession(Exception):
    """The SuperLink refused a key it accepted before: most likely the node's previous session
    is still counted online (it ended without deactivating), so the same start is retried."""


@dataclass
class MemberSetup:
    """The contents of ``member.yaml`` (paths absolute, so the file works from any directory)."""

    member: str
    embodiment: str
    data_dir: str
    state_dir: str
    epsilon: float = 8.0
    delta: float = 1e-5
    dp: bool = True
    # Spread the budget over at least this many training rounds over all runs (0: the
    # coordinator's planned rounds). Older files: 0.
    budget_rounds: int = 0
    # Releasing the held-out error under DP (privacy.eval_release): noise multiplier (0: none)
    # and per-episode error bound. Older member.yaml files without them get these defaults.
    eval_noise_multiplier: float = 5.0
    eval_loss_bound: float = 0.05
    device: str = "cpu"  # where the node trains (cpu, cuda, cuda:N); older files: cpu
    workers: int = 1  # data-parallel DP-SGD processes (cuda: one per device, device "cuda")
    # Seconds after a train / evaluate request arrived before the reply leaves (hides how long
    # the work took: member_node.reply_timing); 0: off. Older files: off.
    train_reply_after: float = 0.0
    eval_reply_after: float = 0.0
    # Decline rounds whose update would leave unmasked (no secure aggregation, or a cohort of
    # one or two for a shard other than the member's own embodiment adapter). `init` sets it
    # unless told --no-require-secagg; older files: off.
    require_secagg: bool = False
    # A copy of the consortium's published file (`kyodo-member trust`): pins the other members'
    # identity keys in secure aggregation. Older files: not pinned.
    consortium_file: str = ""
    # Start only once those keys are pinned: without them the coordinator supplies every
    # member's identity key, and none of secure aggregation's checks binds a coordinator that
    # lies. `init` sets it unless told --no-require-pinned-keys; older files: off.
    require_pinned_keys: bool = False
    superlink: str = ""  # host:port of the consortium's SuperLink
    root_certificates: str = ""  # the consortium's CA certificate (ca.pem from the operator)
    runtime_port: int = 0  # the SuperNode's own runtime API; 0: a free port at each start
    # The member's own accountant, noise cap and fewest steps per round, in place of the run's
    # privacy.* ('' / 0: the run's). Older files: the run's.
    accountant: str = ""
    max_noise_multiplier: float = 0.0
    min_steps: int = 0
    dir: Path = field(default=Path("."), repr=False)

    @property
    def auth_key(self) -> Path:
        return self.dir / AUTH_KEY_FILE

    @property
    def auth_public_key(self) -> Path:
        return self.dir / f"{AUTH_KEY_FILE}.pub"

    @property
    def signing_key(self) -> Path:
        return Path(self.state_dir) / SIGNING_KEY_FILE

    @property
    def flwr_home(self) -> Path:
        """Flower's own files (installed app bundles) stay inside the member's directory."""
        return self.dir / "flwr-home"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("dir")
        return data

    def node_config(self) -> dict[str, str | int | float | bool]:
        """The ``--node-config`` of this member: keys :func:`member_node.identity.resolve_identity` reads."""
        return {
            "member": self.member,
            "embodiment": self.embodiment,
            "data-dir": self.data_dir,
            "state-dir": self.state_dir,
            "epsilon": float(self.epsilon),
            "delta": float(self.delta),
            "dp": bool(self.dp),
            "budget-rounds": int(self.budget_rounds),
            "eval-noise-multiplier": float(self.eval_noise_multiplier),
            "eval-loss-bound": float(self.eval_loss_bound),
            "device": self.device,
            "workers": int(self.workers),
            "train-reply-after": float(self.train_reply_after),
            "eval-reply-after": float(self.eval_reply_after),
            "require-secagg": bool(self.require_secagg),
            "consortium-file": self.consortium_file,
            "require-pinned-keys": bool(self.require_pinned_keys),
            "accountant": self.accountant,
            "max-noise-multiplier": float(self.max_noise_multiplier),
            "min-steps": int(self.min_steps),
        }


def load_setup(directory: Path | str) -> MemberSetup:
    """Read ``DIR/member.yaml``; a missing or malformed file is a :class:`SetupError`."""
    directory = Path(directory).expanduser().resolve()
    path = directory / MEMBER_FILE
    if not path.is_file():
        raise SetupError(f"{path} does not exist: run `kyodo-member init {directory} ...` first")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return MemberSetup(**data, dir=directory)
    except (yaml.YAMLError, TypeError) as err:
        raise SetupError(f"{path} is not a valid member config: {err}") from None


def save_setup(setup: MemberSetup) -> Path:
    path = setup.dir / MEMBER_FILE
    path.write_text(
        "# kyodo member config (kyodo-member init). The privacy budget is the member's own:\n"
        "# nothing the coordinator sends can raise it.\n" + yaml.safe_dump(setup.to_dict(), sort_keys=False),
        encoding="utf-8",
    )
    return path


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def create_auth_key(path: Path) -> str:
    """Create the SuperNode's EC P-384 key pair (OpenSSH, private 0600); returns the public line."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path.with_name(path.name + ".pub").write_bytes(public + b"\n")
    return public.decode()


def load_auth_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The SuperNode key as Flower will read it; anything else is a :class:`SetupError` naming the fix."""
    if not path.is_file():
        raise SetupError(f"SuperNode key {path} does not exist (kyodo-member init creates it)")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise SetupError(
            f"SuperNode key {path} is not an unencrypted OpenSSH private key ({err}); "
            "Flower needs an EC key on a NIST curve, e.g. the one kyodo-member init creates"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SetupError(
            f"SuperNode key {path} is a {type(key).__name__.lstrip('_')}, not an EC key: Flower's node "
            "authentication needs EC P-384 (the Ed25519 ledger key cannot be used for it)"
        )
    return key


def key_fingerprint(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the public key's OpenSSH line: how the member and the operator name a key."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return "SHA256:" + hashlib.sha256(line).hexdigest()


def _check_budget(epsilon: float, delta: float) -> None:
    """Privacy's own checks, before anything is written: ``--epsilon inf`` once went into
    membership.json as ``Infinity`` (not JSON) and crashed the operator's add-member."""
    try:
        Budget(epsilon, delta)
    except ValueError as err:
        raise SetupError(f"privacy budget: {err}") from None


def init_member(
    directory: Path | str,
    *,
    member: str,
    embodiment: str,
    data_dir: Path | str,
    epsilon: float,
    delta: float,
    dp: bool = True,
    budget_rounds: int = 0,
    eval_noise_multiplier: float = 5.0,
    eval_loss_bound: float = 0.05,
    device: str = "cpu",
    workers: int = 1,
    train_reply_after: float = 0.0,
    eval_reply_after: float = 0.0,
    require_secagg: bool = True,
    require_pinned_keys: bool = True,
    superlink: str = "",
    root_certificates: Path | str = "",
    runtime_port: int = 0,
    accountant: str = "",
    max_noise_multiplier: float = 0.0,
    min_steps: int = 0,
    known_embodiments: Mapping[str, Any] | None = None,
) -> MemberSetup:
    """Create the member's directory, keys and config; refuses to touch an existing one (the keys
    identify the member to the consortium and to auditors: replacing them orphans its ledger)."""
    directory = Path(directory).expanduser().resolve()
    if (directory / MEMBER_FILE).exists():
        raise SetupError(f"{directory / MEMBER_FILE} already exists: this member is set up (keys are never replaced)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", member):
        raise SetupError(f"member name {member!r}: use letters, digits, '_', '.', '-' (at most 64)")
    if known_embodiments is not None and embodiment not in known_embodiments:
        raise SetupError(f"unknown embodiment {embodiment!r}; known: {', '.join(sorted(known_embodiments))}")
    _check_budget(epsilon, delta)
    data = Path(data_dir).expanduser().resolve()
    if directory == data or data in directory.parents:
        raise SetupError(
            f"{directory} lies inside the dataset {data}: the member's private keys would travel with every copy "
            "of the data; put the member's directory elsewhere"
        )
    if budget_rounds < 0:
        raise SetupError(f"--budget-rounds must be >= 0 (got {budget_rounds})")
    try:
        EvalPrivacy(eval_noise_multiplier, eval_loss_bound)
    except ValueError as err:
        raise SetupError(f"--eval-noise-multiplier / --eval-loss-bound: {err}") from None
    _check_device(device, workers)
    _check_reply_delays(train_reply_after, eval_reply_after)
    own = own_privacy_problem(accountant, max_noise_multiplier, min_steps, "--{}")
    if own:
        raise SetupError(own)
    if superlink:
        parse_address(superlink)
    if root_certificates and not Path(root_certificates).expanduser().is_file():
        raise SetupError(
            f"CA certificate {Path(root_certificates).expanduser().resolve()} does not exist: get the consortium's "
            "ca.pem from the operator first (or leave --root-certificates out and pass it to `start`)"
        )
    setup = MemberSetup(
        member=member,
        embodiment=embodiment,
        data_dir=str(data),
        state_dir=str(directory / "state"),
        epsilon=float(epsilon),
        delta=float(delta),
        dp=dp,
        budget_rounds=int(budget_rounds),
        eval_noise_multiplier=float(eval_noise_multiplier),
        eval_loss_bound=float(eval_loss_bound),
        device=str(device),
        workers=int(workers),
        train_reply_after=float(train_reply_after),
        eval_reply_after=float(eval_reply_after),
        require_secagg=bool(require_secagg),
        require_pinned_keys=bool(require_pinned_keys),
        superlink=superlink,
        root_certificates=str(Path(root_certificates).expanduser().resolve()) if root_certificates else "",
        runtime_port=runtime_port,
        accountant=accountant,
        max_noise_multiplier=float(max_noise_multiplier),
        min_steps=int(min_steps),
        dir=directory,
    )
    for value in setup.node_config().values():
        if isinstance(value, str):
            _node_config_value(value)  # refuse paths Flower's --node-config parser cannot carry
    directory.mkdir(parents=True, exist_ok=True)
    signing = load_or_create_signing_key(setup.signing_key)
    public_line = create_auth_key(setup.auth_key)
    save_setup(setup)
    write_membership(setup, public_key_hex(signing), public_line)
    return setup


def write_membership(setup: MemberSetup, ledger_public_key: str, supernode_public_key: str) -> Path:
    """``membership.json``: the public keys and the budget, what the member sends the operator."""
    membership = {
        "member": setup.member,
        "embodiment": setup.embodiment,
        "ledger_public_key": ledger_public_key,
        # Published so auditors can check every receipt against it; the node enforces it itself.
        "epsilon": float(setup.epsilon),
        "delta": float(setup.delta),
        "supernode_public_key": supernode_public_key,
        "supernode_key_fingerprint": key_fingerprint(load_auth_key(setup.auth_key)),
    }
    if not setup.dp:  # auditors must know no budget holds for what it sends
        membership["dp"] = False
    path = setup.dir / MEMBERSHIP_FILE
    path.write_text(json.dumps(membership, indent=2) + "\n", encoding="utf-8")
    return path


TRUSTED_CONSORTIUM_FILE = "consortium.yaml"  # in the member's directory (kyodo-member trust)


def trust_consortium(directory: Path | str, consortium_file: Path | str) -> tuple[MemberSetup, list[str]]:
    """Copy the consortium's published file into the member's directory and pin the node to it;
    returns the setup and the members it lists. Refuses a file that does not list this
    member under its own ledger key: not yet admitted, or another consortium's file."""
    from privacy.audit.consortium import ConsortiumError, consortium_from_text

    setup = load_setup(directory)
    if not setup.signing_key.is_file():
        raise SetupError(f"{setup.signing_key} is missing: this member's identity cannot be checked without it")
    source = Path(consortium_file).expanduser().resolve()
    target = setup.dir / TRUSTED_CONSORTIUM_FILE
    tmp = target.with_suffix(".tmp")
    try:
        data = source.read_bytes()  # read once: the bytes checked are the bytes pinned
        consortium = consortium_from_text(data.decode("utf-8"), source)
    except (ConsortiumError, OSError, UnicodeDecodeError) as err:
        raise SetupError(str(err) if isinstance(err, ConsortiumError) else f"{source}: {err}") from None
    own = public_key_hex(load_or_create_signing_key(setup.signing_key))
    listed = consortium.members.get(setup.member)
    if listed is None or listed.public_key != own:
        raise SetupError(
            f"{source} does not list member {setup.member!r} with this node's ledger key {own[:16]}...: the operator "
            "has not admitted it yet (kyodo-coordinator add-member), or the file is another consortium's"
        )
    tmp.write_bytes(data)
    tmp.replace(target)
    setup.consortium_file = str(target)
    save_setup(setup)
    return setup, sorted(name for name, m in consortium.members.items() if not m.departed)


def change_budget(
    directory: Path | str, *, epsilon: float | None, delta: float | None, budget_rounds: int | None
) -> tuple[MemberSetup, float]:
    """Set a new budget in ``member.yaml`` and ``membership.json`` (keys unchanged); returns the
    setup and the epsilon the ledger already records.

    The budget is the member's to change, and only it can. What it cannot do is publish a
    budget its own signed ledger already breaks: an epsilon below what the ledger records, or
    another delta once entries were accounted at the old one (an auditor checks every entry
    against the published pair). A running node reads a lower epsilon at its next message
    (``state/budget.json``); it keeps a higher one, and the pace, until it is restarted."""
    from privacy.ledger import Ledger, LedgerError

    setup = load_setup(directory)
    try:
        ledger = Ledger(Path(setup.state_dir) / "ledger.jsonl")
        entries, spent = ledger.releases(), ledger.spent_epsilon()
    except LedgerError as err:
        raise SetupError(f"the ledger does not verify ({err}): fix it before changing the budget") from None
    new_epsilon = setup.epsilon if epsilon is None else float(epsilon)
    new_delta = setup.delta if delta is None else float(delta)
    _check_budget(new_epsilon, new_delta)
    if new_epsilon < spent:
        raise SetupError(
            f"epsilon {new_epsilon:g} is below the {spent:.6g} this member's signed ledger already records: "
            "a published budget its own receipts break would fail every audit"
        )
    if entries and new_delta != setup.delta:
        raise SetupError(
            f"delta stays {setup.delta:g}: the ledger's {len(entries)} entries were accounted at it "
            "(a new delta needs a new member identity)"
        )
    if budget_rounds is not None and budget_rounds < 0:
        raise SetupError(f"--budget-rounds must be >= 0 (got {budget_rounds})")
    setup.epsilon, setup.delta = new_epsilon, new_delta
    if budget_rounds is not None:
        setup.budget_rounds = int(budget_rounds)
    for key in (setup.signing_key, setup.auth_public_key):
        if not key.is_file():
            raise SetupError(f"{key} is missing: this member's identity cannot be restated without it")
    signing = load_or_create_signing_key(setup.signing_key)  # exists: loaded, never created here
    public_line = setup.auth_public_key.read_text(encoding="utf-8").strip()
    save_setup(setup)
    write_membership(setup, public_key_hex(signing), public_line)
    write_budget_file(Path(setup.state_dir), setup.epsilon, setup.delta)
    return setup, spent


# ----------------------------------------------------------------------------- the command line of flower-supernode


def _node_config_value(value: str | int | float | bool) -> str:
    """One value in Flower's ``--node-config`` syntax (each ``k=v`` is read as a TOML line).

    Strings go in double quotes, as Flower's own examples write them. Flower's splitter ends a
    value at the next double quote and TOML reads a backslash as an escape, so a value holding
    either (or a newline) is refused rather than passed on altered.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if any(c in value for c in '"\\\n'):
        raise SetupError(f"{value!r}: Flower's --node-config cannot carry a double quote, backslash or newline")
    return f'"{value}"'


def node_config_arg(config: Mapping[str, str | int | float | bool]) -> str:
    return " ".join(f"{key}={_node_config_value(value)}" for key, value in config.items())


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); anything else is a :class:`SetupError`."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SetupError(f"SuperLink address {address!r} must be host:port, e.g. 127.0.0.1:9093")
    return host.strip("[]"), int(port)


def free_port(host: str = "127.0.0.1", tries: int = 64) -> int:
    """A port nothing listens on now, for the SuperNode's runtime API, chosen below the
    kernel's ephemeral range. The kernel's own choice (bind to port 0) comes from that range,
    where the port is free again the moment it is returned and any outgoing connection may
    take it as its source port before flower-supernode binds it: a CI run's node failed so
    ("address already in use")."""
    low = _ephemeral_range()[0]
    for port in (random.randrange(20000, low) for _ in range(tries if low > 21000 else 0)):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, port))
                return port
        except OSError:
            continue
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default; elsewhere a guess that only narrows the choice


def supernode_command(setup: MemberSetup, runtime_port: int) -> list[str]:
    """``flower-supernode`` with TLS pinned to the consortium CA, node authentication, this
    member's node config, and its own runtime API port (several nodes may share a machine).
    ``--isolation process``: the SuperNode starts no ClientApp itself; the member's own
    executor (:func:`executor_command`) answers its tasks with the installed kyodo."""
    return [
        flower_executable("flower-supernode"),
        "--superlink", setup.superlink,
        "--root-certificates", setup.root_certificates,
        "--auth-supernode-private-key", str(setup.auth_key),
        "--node-config", node_config_arg(setup.node_config()),
        "--port", str(runtime_port),
        "--isolation", "process",
    ]  # fmt: skip


def executor_command(runtime_port: int) -> list[str]:
    """The member's task executor (``member_node.executor``) for the SuperNode on ``runtime_port``.
    ``-P``: the working directory is not put on ``sys.path``, so a ``member_node`` package lying
    in the directory ``start`` runs from cannot stand in for the installed one."""
    return [sys.executable, "-P", "-m", "member_node.executor", "--runtime-api-address", f"127.0.0.1:{runtime_port}"]


# ----------------------------------------------------------------------------- checks before start


def preflight(setup: MemberSetup, check_data: Callable[[MemberSetup], None] | None = None) -> None:
    """Everything ``start`` can check locally, each failure naming the file and the fix."""
    if not setup.superlink:
        raise SetupError("no SuperLink address: pass --superlink HOST:PORT (or set superlink in member.yaml)")
    parse_address(setup.superlink)
    if not setup.root_certificates:
        raise SetupError("no CA certificate: pass --root-certificates with the consortium's ca.pem (from the operator)")
    ca = Path(setup.root_certificates)
    if not ca.is_file():
        raise SetupError(f"CA certificate {ca} does not exist: get the consortium's ca.pem from the operator")
    try:
        ssl.create_default_context(cafile=str(ca))
    except ssl.SSLError as err:
        raise SetupError(f"CA certificate {ca} is not a PEM certificate ({err.reason})") from None
    load_auth_key(setup.auth_key)
    _check_device(setup.device, setup.workers)
    _check_reply_delays(setup.train_reply_after, setup.eval_reply_after)
    if not setup.signing_key.is_file():
        raise SetupError(f"ledger key {setup.signing_key} is missing (kyodo-member init creates it)")
    check_state_writable(Path(setup.state_dir))
    if check_data is not None:
        check_data(setup)
    check_pinned_keys(setup)


def check_state_writable(state_dir: Path) -> None:
    """The node appends each release to its ledger before anything leaves, and keeps its
    plans and secure-aggregation secrets beside it: a state directory it cannot write makes
    every message fail. A fault test's node started on a read-only one and failed them all."""
    why = cannot_write(state_dir)
    if why:
        raise SetupError(
            f"state directory {state_dir} cannot be written ({why}): the node records every release "
            "there before anything leaves; make it writable (or free space) and start again"
        )


def check_pinned_keys(setup: MemberSetup) -> None:
    """The node starts pinned to the consortium's published keys (or, by the member's explicit
    choice, not at all): a pinned file that is gone, unreadable, or no longer lists this member
    under its own ledger key is refused here, not at the first round."""
    from privacy.audit.consortium import ConsortiumError, load_consortium

    trust = f"kyodo-member trust {setup.dir} audit-consortium.yaml"
    if not setup.consortium_file:
        if setup.require_pinned_keys:
            raise SetupError(
                "the other members' identity keys are not pinned: without them the coordinator supplies every key "
                "a secure-aggregation round uses, and nothing on this node can tell a key it made up. Get the "
                f"consortium's published audit-consortium.yaml from the operator and run `{trust}` (or, for "
                "debugging, set require_pinned_keys: false in member.yaml)"
            )
        return
    try:
        consortium = load_consortium(setup.consortium_file)
    except (ConsortiumError, OSError) as err:
        raise SetupError(f"pinned consortium file {setup.consortium_file}: {err} (run `{trust}` again)") from None
    own = public_key_hex(load_or_create_signing_key(setup.signing_key))  # exists: preflight checked it
    listed = consortium.members.get(setup.member)
    if listed is None or listed.public_key != own:
        raise SetupError(
            f"pinned consortium file {setup.consortium_file} does not list member {setup.member!r} with this node's "
            f"ledger key {own[:16]}...: run `{trust}` with the operator's current file"
        )


def warn_unpadded_replies(setup: MemberSetup) -> list[str]:
    """Log a warning for each kind of DP reply that leaves as soon as its work is done.

    Not an error: padding costs the whole consortium round time, so it is the member's
    choice. But the choice must be seen: an unpadded reply's arrival time (and Flower's
    metadata on it) tells the coordinator how long the work on the data took, which grows
    with the member's episodes, and no DP budget accounts for that.
    """
    if not setup.dp:
        return []
    unpadded = [("train", setup.train_reply_after)]
    if setup.eval_noise_multiplier > 0:  # 0: the node releases no held-out error at all
        unpadded.append(("eval", setup.eval_reply_after))
    warned = []
    for what, seconds in unpadded:
        if float(seconds) == 0:
            log.warning(
                "%s replies are not padded: the coordinator sees how long each %s took, which grows with "
                "this member's episodes and is not covered by its DP budget; set --%s-reply-after (member.yaml: "
                "%s_reply_after) to a time the work always fits in",
                what, "round" if what == "train" else "evaluation", what, what,
            )  # fmt: skip
            warned.append(what)
    return warned


def warn_budget_spent(setup: MemberSetup) -> float:
    """Warn when the ledger already records more than the budget: the node can then only sit
    every round out, and the published budget fails the member's audit (a walkthrough's node,
    restarted at a budget lowered below what it had spent meanwhile, started without a word).
    Returns the epsilon the ledger records (0 for a ledger that does not read: the node says why)."""
    from privacy.ledger import Ledger, LedgerError

    path = Path(setup.state_dir) / "ledger.jsonl"
    try:
        spent = Ledger(path).spent_epsilon()
    except (LedgerError, OSError, KeyError, ValueError):
        return 0.0
    if setup.dp and spent > setup.epsilon:
        log.warning(
            "this member's ledger records epsilon %.4g, above its budget %g: the node will sit every round out, "
            "and auditors will fail the receipts above the budget",
            spent,
            setup.epsilon,
        )
    return spent


def _check_reply_delays(train: Any, evaluation: Any) -> None:
    for what, seconds in (("train", train), ("eval", evaluation)):
        try:
            ReplyDelay(float(seconds), what)
        except (TypeError, ValueError):
            raise SetupError(
                f"--{what}-reply-after (member.yaml: {what}_reply_after) must be a finite number of seconds >= 0, "
                f"got {seconds!r}"
            ) from None


def _check_device(device: str, workers: int = 1) -> None:
    try:
        resolve_device(device)
    except ValueError as err:
        raise SetupError(f"--device: {err}") from None
    problem = workers_problem(workers, device)
    if problem:
        raise SetupError(f"--workers: {problem}")


def probe_superlink(address: str, ca_file: str, timeout: float = 5.0) -> None:
    """One TLS connection and ``GET /health``. Refused, reset, timed out or not yet healthy:
    :class:`SuperLinkUnreachable` (retry); a certificate this CA did not sign: :class:`SetupError`."""
    host, port = parse_address(address)
    context = ssl.create_default_context(cafile=ca_file)
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=timeout)
    try:
        conn.request("GET", "/health")
        status = conn.getresponse().status
    except ssl.SSLCertVerificationError as err:
        raise SetupError(
            f"the SuperLink at {address} presents a certificate that {ca_file} does not vouch for "
            f"({err.verify_message}): get the consortium's ca.pem from the operator, or check the address"
        ) from None
    except ssl.SSLError as err:
        raise SetupError(
            f"TLS with the SuperLink at {address} failed ({err.reason}): is it started with TLS?"
        ) from None
    except (ConnectionError, TimeoutError, OSError, http.client.HTTPException) as err:
        raise SuperLinkUnreachable(f"{type(err).__name__}: {err}") from None
    finally:
        conn.close()
    if status != 200:
        raise SuperLinkUnreachable(f"GET /health answered {status}")


def wait_for_superlink(address: str, ca_file: str, timeout: float = 60.0) -> None:
    """Retry :func:`probe_superlink` with bounded exponential backoff (0.5 s doubling to 8 s) for
    up to ``timeout`` seconds while the SuperLink is unreachable; permanent errors pass at once."""
    for attempt in Retrying(
        retry=retry_if_exception_type(SuperLinkUnreachable),
        stop=stop_after_delay(timeout),
        wait=wait_exponential(multiplier=0.5, min=0.5, max=8),
        before_sleep=log_retry(log, f"SuperLink {address} not reachable"),
        reraise=True,
    ):
        with attempt:
            probe_superlink(address, ca_file)


# ----------------------------------------------------------------------------- running the SuperNode


def _session(setup: MemberSetup) -> dict[str, Any]:
    path = setup.dir / SESSION_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _record_session(setup: MemberSetup, node_id: str, fingerprint: str) -> None:
    data = {"node_id": node_id, "key_fingerprint": fingerprint, "accepted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
    tmp = setup.dir / f".{SESSION_FILE}.tmp"
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    tmp.replace(setup.dir / SESSION_FILE)


@dataclass
class _Outcome:
    code: int
    node_id: str | None = None
    activation_refused: bool = False
    tls_refused: bool = False
    key_unreadable: bool = False


class _ExecutorKeeper(threading.Thread):
    """Runs the member's task executor beside the SuperNode, and again if it dies while the
    SuperNode runs (a task that crashed the interpreter must not leave the node deaf)."""

    def __init__(self, cmd: list[str], env: Mapping[str, str], supernode: subprocess.Popen[str]) -> None:
        super().__init__(daemon=True, name="executor-keeper")
        self.cmd, self.env, self.supernode = cmd, dict(env), supernode
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self._lock = threading.Lock()  # no executor starts after stop() looked for one to end

    def run(self) -> None:
        while True:
            with self._lock:
                if self.stopping.is_set() or self.supernode.poll() is not None:
                    return
                # --parent-pid: it ends with the SuperNode even if this process is killed outright.
                self.proc = subprocess.Popen([*self.cmd, "--parent-pid", str(self.supernode.pid)], env=self.env)
            code = self.proc.wait()
            if self.stopping.is_set() or self.supernode.poll() is not None:
                return
            log.error("the node's task executor exited with code %s; starting it again", code)
            self.stopping.wait(2.0)

    def stop(self, timeout: float = 15.0) -> None:
        """End the executor: a task in flight ends as a ClientApp process did when its SuperNode stopped."""
        with self._lock:
            self.stopping.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.join(timeout=timeout)


class SuperNodeRunner:
    """Runs ``flower-supernode`` as a child, echoing its output, and turns how it ended into an
    exit code and an actionable message. SIGTERM/SIGINT are passed on so Flower can deactivate
    the node (the coordinator then sees it gone at once instead of after two heartbeats)."""

    def __init__(self, setup: MemberSetup, out: IO[str] | None = None) -> None:
        self.setup = setup
        self.out = out or sys.stdout
        self.child: subprocess.Popen[str] | None = None
        self.stopping = False
        self.fingerprint = key_fingerprint(load_auth_key(setup.auth_key))

    def _forward(self, signum: int, _frame: Any) -> None:
        """Pass a stop signal on, unless the child got it too (Ctrl-C, systemd, ``kill -- -PGID``
        signal the whole process group): Flower handles the first SIGTERM/SIGINT and restores the
        default action, so a second one would kill it before it deactivates the node."""
        self.stopping = True
        child = self.child
        if child is None or child.poll() is not None:
            return
        time.sleep(1.0)  # let a group signal reach the child's handler first
        if child.poll() is None and still_catches(child.pid, signum):
            child.send_signal(signum)

    def _attempt(self, runtime_port: int) -> _Outcome:
        env = {**os.environ, "PATH": flower_path(), "FLWR_HOME": str(self.setup.flwr_home)}
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        cmd = supernode_command(self.setup, runtime_port)
        log.info("starting flower-supernode for %s (runtime API port %d)", self.setup.member, runtime_port)
        outcome = _Outcome(code=0)
        self.child = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
        )
        reader = threading.Thread(target=self._pump, args=(self.child, outcome), daemon=True)
        reader.start()
        keeper = _ExecutorKeeper(executor_command(runtime_port), env, self.child)
        keeper.start()
        try:
            # Reap the child here, not after its output ends: a helper that inherited the pipe
            # only exits once it sees its parent gone, which a zombie (an unreaped child) never is.
            outcome.code = self.child.wait()
        finally:
            keeper.stop()
        reader.join(timeout=15)
        return outcome

    def _pump(self, child: subprocess.Popen[str], outcome: _Outcome) -> None:
        """Echo the SuperNode's output and note the lines that say how it ended."""
        assert child.stdout is not None
        for line in child.stdout:
            self.out.write(line)
            self.out.flush()
            if match := _NODE_ID.search(line):
                outcome.node_id = match.group(1)
                _record_session(self.setup, outcome.node_id, self.fingerprint)
            outcome.activation_refused |= _ACTIVATION_REFUSED in line
            outcome.tls_refused |= _TLS_REFUSED in line
            outcome.key_unreadable |= _KEY_UNREADABLE in line

    def run(self, rejoin_timeout: float = 90.0) -> int:
        """Run until the SuperNode ends; raises :class:`SetupError` for what the member must fix."""
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for attempt in Retrying(
                retry=retry_if_exception_type(StaleSession),
                stop=stop_after_delay(rejoin_timeout),
                wait=wait_exponential(multiplier=1, min=1, max=15),
                before_sleep=log_retry(log, f"SuperLink refused the session of {self.setup.member}"),
                reraise=True,
            ):
                with attempt:
                    return self._once()
        except StaleSession as err:
            raise SetupError(
                f"the SuperLink kept refusing this node for {rejoin_timeout:.0f} s ({err}): another SuperNode "
                f"with key {self.setup.auth_public_key} is online, or the operator unregistered it"
            ) from None
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 1  # unreachable: Retrying either returns or raises

    def _once(self) -> int:
        port = self.setup.runtime_port or free_port()
        outcome = self._attempt(port)
        if self.stopping:
            return 0
        if outcome.code in _GRACEFUL:
            # Nobody asked it to stop, and Flower says nothing on its way out: the SuperLink
            # ended this node's registration (a walkthrough's removed member saw only
            # "SuperNode terminated gracefully").
            raise SetupError(
                "the SuperLink ended this node's session without it being stopped here: most likely the operator "
                "removed this member from the consortium (kyodo-coordinator remove-member) or unregistered its key. "
                f"Ask the operator; keep {Path(self.setup.state_dir) / 'ledger.jsonl'}: auditors of the runs this "
                "member trained in need a copy of it"
            )
        if outcome.key_unreadable:
            raise SetupError(f"flower-supernode could not read the key {self.setup.auth_key}")
        if outcome.tls_refused:
            raise SetupError(
                f"the SuperLink's certificate is not signed by {self.setup.root_certificates}: "
                "get the consortium's ca.pem from the operator"
            )
        if outcome.activation_refused:
            session = _session(self.setup)
            if session.get("key_fingerprint") == self.fingerprint:
                raise StaleSession(f"node {session.get('node_id')} was accepted before; its old session may linger")
            raise SetupError(
                f"the SuperLink refused this node's key ({self.fingerprint}): it is not registered. Send "
                f"{self.setup.dir / MEMBERSHIP_FILE} to the operator (kyodo-coordinator add-member, then register)"
            )
        raise SetupError(
            f"flower-supernode {process_ended(outcome.code)}; see its output above. Start it again with `kyodo-member start {self.setup.dir}`: "
            "the ledger and state are kept, a round it was in goes on without it (what it spent stays spent), and "
            "it takes part again from the next round"
        )
