"""The operator's deployment: consortium config, TLS, the SuperLink, registrations, runs.

Everything lives in one operator directory (``kyodo-coordinator init DIR``)::

    consortium.yaml          members (public keys), model, rounds, SuperLink address
    audit-consortium.yaml    the same members in kyodo-audit's format (ledger keys, budgets)
    tls/                     ca.pem (members get it), ca.key, server.pem, server.key
    members/NAME.pub         each member's SuperNode key (OpenSSH), as registered
    superlink/state.db       the SuperLink's database (--database: runs and registrations)
    superlink/registered.json  member -> Flower node id, as registered in that database
    superlink/flwr-home/     the SuperLink's own Flower files (installed app bundles)
    flwr-home/config.toml    the `flwr` CLI's connection to this SuperLink (FLWR_HOME)
    runs/<timestamp>/        one run directory per submitted run (the ServerApp's out_dir)
    runs.jsonl               one line per submission (Flower run id, out_dir, time)

Connection settings stay out of the repository: ``flwr`` reads them from ``FLWR_HOME`` (this
directory's ``flwr-home``), never from ``pyproject.toml`` (``flwr run`` would rewrite it). The
directory must not lie inside the app directory, because ``flwr run`` packs the app
directory's ``*.toml``, ``*.yaml`` and ``*.json`` files into the bundle it ships.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shlex
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from coordinator.run_lock import RunInUseError, check_not_running, run_holder
from coordinator.stop_request import clear_stop_request, request_stop
from coordinator.tls import DEFAULT_HOSTS, TLSError, TLSPaths, check_server_tls, create_tls
from privacy.keys import KeyFormatError, load_or_create_signing_key, load_public_key, public_key_hex
from shared_model.config import ConfigError, KyodoConfig, config_from_run_config, load_config
from shared_model.durable import cannot_write
from shared_model.flower_processes import (
    flower_executable,
    flower_path,
    log_retry,
    parent_running,
    pids_running,
    process_ended,
    still_catches,
)

log = logging.getLogger("kyodo.coordinator")

APP_DIR = Path(__file__).resolve().parent.parent
CONSORTIUM_FILE = "consortium.yaml"
CONNECTION = "kyodo"  # the connection's name in flwr-home/config.toml


class DeployError(Exception):
    """Something the operator must fix; the text says what."""


class Unreachable(Exception):
    """The SuperLink refused or dropped a connection: it may still be starting, so retry."""


# ----------------------------------------------------------------------------- the consortium config


@dataclass
class MemberEntry:
    """A member as the operator knows it: only public keys (from the member's membership.json)."""

    name: str
    embodiment: str
    ledger_public_key: str  # Ed25519, hex: verifies the member's signed privacy receipts
    supernode_public_key: str  # EC P-384, OpenSSH line: registered for Flower's node authentication
    # The budget the member publishes (its node enforces its own; auditors check receipts against this).
    epsilon: float = 8.0
    delta: float = 1e-5
    dp: bool = True  # False: its node trains without DP (a debugging switch), published as such


@dataclass
class Consortium:
    name: str = "kyodo"
    host: str = "127.0.0.1"
    port: int = 9093
    model: str = "small"
    rounds: int = 4
    overrides: list[str] = field(default_factory=list)  # dotlist applied to every run
    members: list[MemberEntry] = field(default_factory=list)
    # Members that left (remove-member): never seated again, but their ledger keys and last
    # published budgets stay in audit-consortium.yaml, for the runs they trained in.
    departed: list[MemberEntry] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def member(self, name: str) -> MemberEntry | None:
        return next((m for m in self.members if m.name == name), None)


@dataclass(frozen=True)
class OperatorDir:
    root: Path

    @property
    def consortium(self) -> Path:
        return self.root / CONSORTIUM_FILE

    @property
    def tls(self) -> TLSPaths:
        return TLSPaths(self.root / "tls")

    @property
    def members(self) -> Path:
        return self.root / "members"

    @property
    def audit_consortium(self) -> Path:
        return self.root / "audit-consortium.yaml"

    @property
    def coordinator_key(self) -> Path:
        """The operator's Ed25519 key that signs every committed round of every run (0600)."""
        return self.root / "coordinator_ed25519.pem"

    @property
    def database(self) -> Path:
        return self.root / "superlink" / "state.db"

    @property
    def registered(self) -> Path:
        return self.root / "superlink" / "registered.json"

    @property
    def superlink_home(self) -> Path:
        return self.root / "superlink" / "flwr-home"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def runs(self) -> Path:
        return self.root / "runs"


def operator_dir(path: Path | str) -> OperatorDir:
    return OperatorDir(Path(path).expanduser().resolve())


def load_consortium(op: OperatorDir) -> Consortium:
    if not op.consortium.is_file():
        raise DeployError(f"{op.consortium} does not exist: run `kyodo-coordinator init {op.root}` first")
    try:
        data = yaml.safe_load(op.consortium.read_text(encoding="utf-8")) or {}
        members = [MemberEntry(**m) for m in data.pop("members", None) or []]
        departed = [MemberEntry(**m) for m in data.pop("departed", None) or []]
        return Consortium(**data, members=members, departed=departed)
    except (yaml.YAMLError, TypeError) as err:
        raise DeployError(f"{op.consortium} is not a valid consortium config: {err}") from None


def save_consortium(op: OperatorDir, consortium: Consortium) -> None:
    text = (
        "# kyodo consortium (kyodo-coordinator init / add-member). Members appear here with their\n"
        "# public keys and the budget each claims in its membership.json (what auditors check its\n"
        "# receipts against). The budget that binds is in the member's own node config: nothing here\n"
        "# can raise it.\n" + yaml.safe_dump(asdict(consortium), sort_keys=False, width=200)
    )
    tmp = op.consortium.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(op.consortium)


def _inside(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
        return True
    except ValueError:
        return False


def init_operator(
    path: Path | str,
    *,
    name: str = "kyodo",
    model: str = "small",
    rounds: int = 4,
    host: str = "127.0.0.1",
    port: int = 9093,
    san: Sequence[str] = DEFAULT_HOSTS,
    overrides: Sequence[str] = (),
) -> OperatorDir:
    """Create the operator directory: TLS material, consortium config, the flwr connection."""
    op = operator_dir(path)
    if _inside(op.root, APP_DIR):
        raise DeployError(
            f"{op.root} is inside the app directory {APP_DIR}: `flwr run` would pack its config files into "
            "the app bundle it ships. Put the operator directory elsewhere (e.g. ~/kyodo-operator)"
        )
    if op.consortium.exists():
        raise DeployError(f"{op.consortium} already exists: this directory is set up")
    if rounds < 1:
        raise DeployError("--rounds must be >= 1")
    _check_run_config(model, list(overrides))
    hosts = list(dict.fromkeys([host, *san]))
    op.root.mkdir(parents=True, exist_ok=True)
    try:
        create_tls(op.tls.root, name, hosts)
    except TLSError as err:
        raise DeployError(str(err)) from None
    save_consortium(
        op, Consortium(name=name, host=host, port=port, model=model, rounds=rounds, overrides=list(overrides))
    )
    write_flwr_connection(op, Consortium(host=host, port=port))
    load_or_create_signing_key(op.coordinator_key)
    return op


def write_flwr_connection(op: OperatorDir, consortium: Consortium) -> Path:
    """``FLWR_HOME/config.toml`` with one TLS connection to this SuperLink, pinned to our CA."""
    op.flwr_home.mkdir(parents=True, exist_ok=True)
    path = op.flwr_home / "config.toml"
    doc = {
        "superlink": {
            "default": CONNECTION,
            CONNECTION: {"address": consortium.address, "root-certificates": str(op.tls.ca_cert)},
        }
    }
    path.write_text(tomli_w.dumps(doc), encoding="utf-8")
    return path


def _load_ssh_public(line: str, what: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(line.strip().encode())
    except (ValueError, TypeError) as err:
        raise DeployError(f"{what} is not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise DeployError(f"{what} must be an EC key on a NIST curve (Flower's node authentication), got {key}")
    return key


def add_member(path: Path | str, membership_file: Path | str, update: bool = False) -> MemberEntry:
    """Admit a member from the ``membership.json`` it sent (public keys and budget), after checking
    both keys parse and neither name nor SuperNode key is taken already.

    ``update``: take a member's new published budget (``kyodo-member budget``); its name,
    embodiment and both keys must be those already admitted (a new key is a new member)."""
    op = operator_dir(path)
    consortium = load_consortium(op)
    if not Path(membership_file).is_file():
        raise DeployError(
            f"{membership_file} not found: pass the membership.json the member's `kyodo-member init` wrote"
        )
    try:
        data = json.loads(Path(membership_file).read_text(encoding="utf-8"))
        entry = MemberEntry(
            name=str(data["member"]),
            embodiment=str(data["embodiment"]),
            ledger_public_key=str(data["ledger_public_key"]),
            supernode_public_key=str(data["supernode_public_key"]).strip(),
            epsilon=float(data["epsilon"]),
            delta=float(data["delta"]),
            dp=data.get("dp", True) is not False,
        )
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DeployError(f"{membership_file}: not a membership file from `kyodo-member init` ({err})") from None
    embodiments = load_config().embodiments
    if entry.embodiment not in embodiments:
        raise DeployError(f"member {entry.name!r}: unknown embodiment {entry.embodiment!r} ({sorted(embodiments)})")
    try:
        load_public_key(entry.ledger_public_key)
    except KeyFormatError as err:
        raise DeployError(f"member {entry.name!r}: ledger key: {err}") from None
    _load_ssh_public(entry.supernode_public_key, f"member {entry.name!r}: SuperNode key")
    if update:
        return _update_budget(op, consortium, entry)
    if consortium.member(entry.name):
        raise DeployError(
            f"member {entry.name!r} is already in {op.consortium} (a new budget: add-member ... --update)"
        )
    if any(m.name == entry.name for m in consortium.departed):
        raise DeployError(
            f"{entry.name!r} is the name of a member that left the consortium: its ledger key stays published for "
            "the runs it trained in, so a new member takes another name"
        )
    for other in consortium.members:
        if other.supernode_public_key.split()[:2] == entry.supernode_public_key.split()[:2]:
            raise DeployError(f"member {entry.name!r} sent the SuperNode key of {other.name!r}")
    consortium.members.append(entry)
    _publish(op, consortium, admitted=entry)
    return entry


def _update_budget(op: OperatorDir, consortium: Consortium, entry: MemberEntry) -> MemberEntry:
    current = consortium.member(entry.name)
    if current is None:
        raise DeployError(f"member {entry.name!r} is not in {op.consortium}: admit it first (without --update)")
    same = (current.embodiment, current.ledger_public_key, current.supernode_public_key.split()[:2]) == (
        entry.embodiment,
        entry.ledger_public_key,
        entry.supernode_public_key.split()[:2],
    )
    if not same:
        raise DeployError(
            f"member {entry.name!r}: --update changes only the budget; this file names another embodiment or key"
        )
    changes = [
        f"{what} {old:g} -> {new:g}"
        for what, old, new in (("epsilon", current.epsilon, entry.epsilon), ("delta", current.delta, entry.delta))
        if old != new
    ]
    log.info("member %s: published budget %s", entry.name, ", ".join(changes) or "unchanged")
    current.epsilon, current.delta = entry.epsilon, entry.delta
    _publish(op, consortium)
    return current


def write_audit_consortium(op: OperatorDir, consortium: Consortium) -> Path:
    """``DIR/audit-consortium.yaml`` in kyodo-audit's format (members' ledger keys and published
    budgets), so an auditor can run ``kyodo-audit verify --consortium`` on this consortium's runs."""
    from privacy.audit.consortium import dump_consortium

    return dump_consortium(_audit_consortium(op, consortium), op.audit_consortium)


def remove_member(path: Path | str, name: str) -> tuple[MemberEntry, bool]:
    """Take a member out: runs submitted from now on neither wait for it nor seat it, and its
    SuperNode key is unregistered (now if the SuperLink answers, else at its next start);
    returns the entry and whether the key was unregistered now. Its ledger key and last budget
    stay in audit-consortium.yaml as departed: the runs it trained in stay auditable against the
    ledger it keeps (a walkthrough found no way for a member to leave: every run waited for it,
    and deleting it by hand would have made its earlier runs fail their audit)."""
    op = operator_dir(path)
    consortium = load_consortium(op)
    entry = consortium.member(name)
    if entry is None:
        gone = " (it left already)" if any(m.name == name for m in consortium.departed) else ""
        names = ", ".join(m.name for m in consortium.members) or "none"
        raise DeployError(f"{name!r} is not a member of {op.consortium}{gone}; its members: {names}")
    consortium.members = [m for m in consortium.members if m.name != name]
    consortium.departed = [*consortium.departed, entry]
    _publish(op, consortium)
    try:
        wait_healthy(consortium.address, op.tls.ca_cert, 3.0)
    except Unreachable:
        return entry, False
    register_members(op, consortium)
    return entry, True


def _publish(op: OperatorDir, consortium: Consortium, admitted: MemberEntry | None = None) -> None:
    """Write consortium.yaml and audit-consortium.yaml (and an ``admitted`` member's SuperNode
    key), or nothing: the audit file's checks run first, so a member it would refuse is never
    left in one file and not the other (an ``epsilon: inf`` once crashed add-member between them)."""
    from privacy.audit.consortium import ConsortiumError

    try:
        _audit_consortium(op, consortium)
    except ConsortiumError as err:
        raise DeployError(f"nothing written: {err}") from None
    if admitted is not None:
        op.members.mkdir(parents=True, exist_ok=True)
        (op.members / f"{admitted.name}.pub").write_text(admitted.supernode_public_key + "\n", encoding="utf-8")
    save_consortium(op, consortium)
    write_audit_consortium(op, consortium)


def _audit_consortium(op: OperatorDir, consortium: Consortium):
    from privacy.audit.consortium import parse_consortium

    raw = {
        "format": "kyodo-consortium",
        "version": 1,
        "name": consortium.name,
        "coordinator_public_key": public_key_hex(load_or_create_signing_key(op.coordinator_key)),
        "members": [
            {"member": m.name, "public_key": m.ledger_public_key, "epsilon": m.epsilon, "delta": m.delta,
             "embodiment": m.embodiment} | ({"departed": True} if m in consortium.departed else {})
            | ({} if m.dp else {"dp": False})
            for m in [*consortium.members, *consortium.departed]
        ],
    }  # fmt: skip
    return parse_consortium(raw, str(op.audit_consortium))


# ----------------------------------------------------------------------------- the SuperLink


def superlink_command(op: OperatorDir, consortium: Consortium) -> list[str]:
    """TLS on the one HTTP port, node authentication, no ``uv sync`` of the app's dependencies
    (the coordinator runs the installed code), and a database so registrations survive restarts."""
    tls = op.tls
    return [
        flower_executable("flower-superlink"),
        "--ssl-certfile", str(tls.server_cert),
        "--ssl-keyfile", str(tls.server_key),
        "--ssl-ca-certfile", str(tls.ca_cert),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database", str(op.database),
        "--host", consortium.host,
        "--port", str(consortium.port),
    ]  # fmt: skip


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As uvicorn does: connections of a previous SuperLink in TIME_WAIT must not count as busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise DeployError(
                f"cannot listen on {host}:{port} ({err.strerror}): another SuperLink or program holds it; "
                "stop it or change port in consortium.yaml"
            ) from None


def probe(address: str, ca_file: Path, timeout: float = 5.0) -> None:
    """``GET /health`` over TLS pinned to our CA: :class:`Unreachable` while it is not up."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPSConnection(
        host, int(port), context=ssl.create_default_context(cafile=str(ca_file)), timeout=timeout
    )
    try:
        conn.request("GET", "/health")
        status = conn.getresponse().status
    except ssl.SSLCertVerificationError as err:
        raise DeployError(f"{address} presents a certificate {ca_file} did not sign ({err.verify_message})") from None
    except (ConnectionError, TimeoutError, OSError, http.client.HTTPException) as err:
        raise Unreachable(f"{type(err).__name__}: {err}") from None
    finally:
        conn.close()
    if status != 200:
        raise Unreachable(f"GET /health answered {status}")


def wait_healthy(address: str, ca_file: Path, timeout: float = 60.0, alive: Callable[[], bool] | None = None) -> None:
    """Retry the health probe with bounded exponential backoff (0.5 s doubling to 8 s)."""

    def check() -> None:
        if alive is not None and not alive():
            raise DeployError("the SuperLink exited during start-up; see its output above")
        probe(address, ca_file)

    for attempt in Retrying(
        retry=retry_if_exception_type(Unreachable),
        stop=stop_after_delay(timeout),
        wait=wait_exponential(multiplier=0.5, min=0.5, max=8),
        before_sleep=log_retry(log, f"SuperLink {address} not healthy yet", level=logging.INFO),
        reraise=True,
    ):
        with attempt:
            check()


def superlink_answers(path: Path | str) -> bool:
    """Whether this operator's SuperLink answers its health probe now (one try)."""
    op = operator_dir(path)
    try:
        probe(load_consortium(op).address, op.tls.ca_cert)
    except (Unreachable, DeployError):
        return False
    return True


def require_superlink(op: OperatorDir, consortium: Consortium, timeout: float = 30.0) -> None:
    """Wait (bounded, with backoff) for this consortium's SuperLink; if it never answers, say how to start it."""
    try:
        wait_healthy(consortium.address, op.tls.ca_cert, timeout)
    except Unreachable as err:
        raise DeployError(
            f"the SuperLink at {consortium.address} did not answer for {timeout:.0f} s ({err}): "
            f"start it with `kyodo-coordinator start {op.root}`"
        ) from None


def flwr_env(op: OperatorDir) -> dict[str, str]:
    env = {**os.environ, "PATH": flower_path(), "FLWR_HOME": str(op.flwr_home)}
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


def flwr_cli(op: OperatorDir, *args: str, timeout: float = 120.0) -> dict[str, Any]:
    """Run ``flwr ... --format json`` against this operator's connection; its JSON answer."""
    cmd = [flower_executable("flwr"), *args, "--format", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=flwr_env(op), timeout=timeout, cwd=op.root)
    text = proc.stdout.strip()
    start = text.find("{")
    try:
        answer = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        answer = {}
    if proc.returncode != 0 or not answer.get("success", False):
        detail = flwr_error_text(answer.get("error-message") or proc.stdout + proc.stderr)[-800:]
        raise DeployError(f"`flwr {' '.join(args[:2])}` failed: {detail}")
    return answer


_BOX = "│╭╮╰╯─┃┏┓┗┛━ "


def flwr_error_text(output: str) -> str:
    """Flower's CLI error as one line: without its "Using SuperLink: ..." banner (which is not
    the error, and was all a one-line message showed of it) and without the box drawn around it."""
    lines = (line.strip().strip(_BOX).strip() for line in output.splitlines())
    return " ".join(line for line in lines if line and not line.startswith("Using SuperLink"))


def _registered(op: OperatorDir) -> dict[str, str]:
    if not op.registered.is_file():
        return {}
    return dict(json.loads(op.registered.read_text(encoding="utf-8")))


def register_members(op: OperatorDir, consortium: Consortium) -> dict[str, str]:
    """``flwr supernode register`` every member whose key this SuperLink's database does not hold
    yet (``registered.json`` is checked against ``flwr supernode list``), and unregister the keys
    of members that left; member -> node id."""
    require_superlink(op, consortium)
    registered = _registered(op)
    known = {
        str(n["node-id"])
        for n in flwr_cli(op, "supernode", "list", CONNECTION).get("nodes", [])
        if n.get("status") != "unregistered"  # the SuperLink lists those too
    }
    for gone in sorted(set(registered) - {m.name for m in consortium.members}):
        node = registered.pop(gone)
        if node in known:
            flwr_cli(op, "supernode", "unregister", node, CONNECTION)
            log.info("unregistered %s's SuperNode key (node %s): it left the consortium", gone, node)
        op.registered.write_text(json.dumps(registered, indent=2), encoding="utf-8")
    for member in consortium.members:
        if registered.get(member.name) in known:
            continue
        key_file = op.members / f"{member.name}.pub"
        answer = flwr_cli(op, "supernode", "register", str(key_file), CONNECTION, "--name", member.name)
        registered[member.name] = str(answer["node-id"])
        log.info("registered %s's SuperNode key as node %s", member.name, registered[member.name])
        op.registered.parent.mkdir(parents=True, exist_ok=True)
        op.registered.write_text(json.dumps(registered, indent=2), encoding="utf-8")
    return registered


class SuperLinkRunner:
    """Runs ``flower-superlink`` in the foreground: checks first, registers members once it is
    healthy, passes SIGTERM/SIGINT on (unless the child got it from a group signal already)."""

    def __init__(self, op: OperatorDir) -> None:
        self.op = op
        self.consortium = load_consortium(op)
        self.child: subprocess.Popen[bytes] | None = None

    def preflight(self) -> None:
        try:
            check_server_tls(self.op.tls, self.consortium.host)
        except TLSError as err:
            raise DeployError(str(err)) from None
        try:
            _check_port_free(self.consortium.host, self.consortium.port)
        except DeployError:
            if not self._ours_answers():
                raise  # someone else's program: the port message says what to do
            pids = pids_running("flower-superlink", str(self.op.database))
            starts = [p for p in (parent_running(pid, "coordinator", "start") for pid in pids) if p is not None]
            if starts:
                raise DeployError(
                    f"this consortium's SuperLink already runs on {self.consortium.address}, under the "
                    f"`kyodo-coordinator start` of pid {starts[0]}: use it as it is (one start per operator "
                    f"directory), or end that start (Ctrl-C in its terminal, or `kill {starts[0]}`) and start again"
                ) from None
            stop = (
                f"stop it (`kill {' '.join(map(str, pids))}`)"
                if pids
                else f"stop the flower-superlink process whose --database is {self.op.database}"
            )
            raise DeployError(
                f"a SuperLink with this consortium's certificate already answers on {self.consortium.address}: "
                "most likely this operator's own, left running when the `start` that ran it was killed. It is "
                f"healthy and keeps its registrations: use it as it is, or {stop} and start again"
            ) from None

    def _ours_answers(self) -> bool:
        """Whether a healthy SuperLink holding this consortium's certificate answers on its address."""
        try:
            probe(self.consortium.address, self.op.tls.ca_cert, timeout=3.0)
        except (DeployError, Unreachable, OSError):
            return False
        return True

    def _forward(self, signum: int, _frame: Any) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        time.sleep(1.0)
        if child.poll() is None and still_catches(child.pid, signum):
            child.send_signal(signum)

    def run(self, register: bool = True, start_timeout: float = 60.0) -> int:
        self.preflight()
        self.op.database.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PATH": flower_path(), "FLWR_HOME": str(self.op.superlink_home)}
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.child = subprocess.Popen(superlink_command(self.op, self.consortium), env=env)
            wait_healthy(
                self.consortium.address, self.op.tls.ca_cert, start_timeout, alive=lambda: self.child.poll() is None
            )
            log.info("SuperLink healthy on https://%s", self.consortium.address)
            if register and self.consortium.members:
                register_members(self.op, self.consortium)
            print(f"kyodo: SuperLink ready on {self.consortium.address}", flush=True)
            self._say_unfinished_run()
            code = self.child.wait()
        except BaseException:
            if self.child is not None and self.child.poll() is None:
                self.child.terminate()
                self.child.wait(timeout=30)
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        # flwr_exit: status 0 for a graceful stop, 1 for any error (its log says which).
        if code in (0, -signal.SIGTERM, -signal.SIGINT):
            return 0
        how = process_ended(code)
        log.error(
            "the SuperLink %s: start it again with `kyodo-coordinator start %s` (registrations are kept); "
            "a run it was running ends failed: resume it with `kyodo-coordinator run %s --out-dir <its run dir>`",
            how,
            self.op.root,
            self.op.root,
        )
        return 1

    def _say_unfinished_run(self) -> None:
        """After a crash the SuperLink comes back without the run it was running, and the run's
        log reads like a stop by the operator: say which run is short of its rounds and how to go on."""
        unfinished = unfinished_run(self.op)
        if unfinished is not None:
            run_dir, progress = unfinished
            log.warning("the newest run, %s: %s", run_dir, progress.stopped_short(self.op.root, run_dir))


@dataclass(frozen=True)
class RunProgress:
    """Where a run directory stands: who runs it now, its HEAD round, the rounds it was planned for."""

    holder: str | None  # a coordinator holding it now ("pid .., since .."), None when none does
    head: int | None
    planned: int | None

    @property
    def unfinished(self) -> bool:
        """Stopped short of its planned rounds, with no coordinator going on with it."""
        done = self.planned is not None and self.head is not None and self.head >= self.planned
        return self.holder is None and not done

    def stopped_short(self, operator: Path | str, run_dir: Path) -> str:
        """Where an unfinished run stopped and the command that goes on with it."""
        planned = self.planned if self.planned is not None else "?"
        where = (
            f"its last committed round is round {self.head} of {planned} planned"
            if self.head is not None
            else f"it committed none of its {planned} planned rounds"
        )
        return (
            f"no coordinator holds it, and {where} (stopped, or its coordinator or SuperLink ended); to go on, "
            f"with the settings it was submitted with:\n{resume_command(operator, run_dir)}"
        )


def resume_command(operator: Path | str, run_dir: Path | str) -> str:
    return f"kyodo-coordinator run {operator} --out-dir {run_dir}"


def run_progress(run_dir: Path, settle: float = 0.0, poll: float = 0.5) -> RunProgress:
    """``settle``: seconds to wait for a coordinator still holding the run to let go (a
    ServerApp ends a moment after the SuperLink reports its run finished)."""
    from coordinator.run_status import head_round, planned_rounds

    deadline = time.monotonic() + settle
    while run_holder(run_dir) is not None and time.monotonic() < deadline:
        time.sleep(poll)
    return RunProgress(run_holder(run_dir), head_round(run_dir), planned_rounds(run_dir))


def unfinished_run(op: OperatorDir) -> tuple[Path, RunProgress] | None:
    """The newest submitted run when it is unfinished (None otherwise, or when nothing was submitted)."""
    submissions = _submissions(op)
    if not submissions or not Path(submissions[-1]["out_dir"]).is_dir():
        return None
    run_dir = Path(submissions[-1]["out_dir"])
    progress = run_progress(run_dir)
    return (run_dir, progress) if progress.unfinished else None


# ----------------------------------------------------------------------------- runs


def online_nodes(op: OperatorDir) -> set[str]:
    return {
        str(n["node-id"])
        for n in flwr_cli(op, "supernode", "list", CONNECTION).get("nodes", [])
        if n.get("status") == "online"
    }


def wait_for_members(
    op: OperatorDir, names: Sequence[str], timeout: float, min_cohort: int, poll: float = 3.0
) -> list[str]:
    """Wait until the named members' SuperNodes are online (a run queries whoever is connected);
    the members still offline after ``timeout``, when enough others are online to go on."""
    registered = _registered(op)
    missing = [n for n in names if n not in registered]
    if missing:
        raise DeployError(f"members {missing} are not registered: run `kyodo-coordinator register {op.root}`")
    deadline = time.monotonic() + timeout
    while True:
        online = online_nodes(op)
        offline = [n for n in names if registered[n] not in online]
        if not offline:
            return []
        if time.monotonic() > deadline:
            refusal = too_few_online(len(names) - len(offline), offline, min_cohort, timeout)
            if refusal:
                raise DeployError(refusal)
            return offline
        log.info("waiting for %s to come online", ", ".join(offline))
        time.sleep(poll)


def consortium_too_small(members: int, min_cohort: int) -> str:
    """A warning when no cohort can form even with every member online ('' otherwise): the run
    goes on, training only each member's own adapter, and a walkthrough's operator saw that
    only in the coordinator's log, after every member had spent on it."""
    if members >= min_cohort:
        return ""
    return (
        f"the consortium has {members} member(s), fewer than train.min_cohort ({min_cohort}): no expert or shared "
        "adapter can train, only each member's own embodiment adapter, and each member still spends its budget on it"
    )


def too_few_online(online: int, offline: Sequence[str], min_cohort: int, waited: float) -> str:
    """Why a run should not start with only ``online`` members up ('' when it may: the round
    goes on without a member that is down, as it does when one drops mid-run, and the member
    joins at the next round its node is up for). Fewer than a cohort train no expert and no
    shared adapter, while every member online spends budget on its own adapter."""
    if online >= min_cohort:
        return ""
    return (
        f"{', '.join(offline)} did not come online within {waited:.0f} s, and the {online} online are fewer than "
        f"train.min_cohort ({min_cohort}): no expert or shared adapter could train. Start their nodes (kyodo-member "
        "start), or submit with --wait-members 0 to go on without them"
    )


def run_config(
    consortium: Consortium,
    out_dir: Path,
    rounds: int | None,
    overrides: Sequence[str],
    registered: Mapping[str, str] | None = None,
    coordinator_key: Path | None = None,
) -> dict[str, str]:
    """The Flower run config: the model preset, and as overrides the schedule, the run directory
    and the consortium's members (recorded in the run's config.yaml instead of the simulation's).

    Each member is pinned to its ledger key and, once registered, to its Flower node id: Flower
    authenticates a SuperNode's key, not the member name in its node config, so without the pin
    one registered member could answer as another."""
    registered = registered or {}
    # epsilon and delta: the budget each member published (a deployed node enforces its own,
    # from its node config); the coordinator warns when a node holds a larger one.
    members = ", ".join(
        f"{{name: {m.name}, embodiment: {m.embodiment}, ledger_public_key: '{m.ledger_public_key}',"
        f" node_id: {int(registered.get(m.name, 0))}, epsilon: {float(m.epsilon)!r}, delta: {float(m.delta)!r}}}"
        for m in consortium.members
    )
    items = [
        f"train.rounds={rounds or consortium.rounds}",
        f"out_dir={out_dir}",
        f"federation.name={consortium.name}",
        f"federation.members=[{members}]",
        *([f"coordinator_key={coordinator_key}"] if coordinator_key else []),
        *consortium.overrides,
        *overrides,
    ]
    _check_run_config(consortium.model, items, Path(out_dir))
    return {"model": consortium.model, "federation": "default", "overrides": " ".join(shlex.quote(i) for i in items)}


def _check_run_config(model: str, overrides: list[str], run_dir: Path | None = None) -> None:
    """The run config must load, a public checkpoint it names must be the published file, and
    a run it continues (``continue_from``) must have a committed round of the same model.
    ``run_dir``: the directory a run is submitted to (none at ``init``): one with committed
    rounds is a resume, which must keep the model its rounds are of."""
    from coordinator.continuation import ContinuationError, earlier_round
    from coordinator.public_checkpoint import CheckpointError, check_published

    try:
        cfg = load_config(model=model, overrides=overrides)
        if run_dir is not None and (run_dir / "store" / "HEAD").is_file():
            _check_same_model(cfg, run_dir)
        else:  # a resume never reads round 0's source, or the run it continued, again
            check_published(cfg)
            if cfg.continue_from:
                earlier_round(cfg)
    except (ConfigError, CheckpointError, ContinuationError) as err:
        raise DeployError(f"config: {err}") from None


def _check_same_model(cfg: KyodoConfig, out: Path) -> None:
    """A resume with other model settings was refused only by the submitted ServerApp, after
    this run directory's settings had been replaced by the refused ones."""
    from coordinator.run_state import resume_refusal
    from shared_model.store import ShardStore, StoreError

    try:
        head = ShardStore(out / "store").head_manifest()
    except (OSError, StoreError) as err:
        raise DeployError(f"{out}: cannot read the run's store ({err})") from None
    refusal = resume_refusal(cfg, out, head.model_config) if head is not None else None
    if refusal:
        raise DeployError(
            f"{refusal}; submit it without the changed model settings, or start a new run (without --out-dir)"
        )


@dataclass
class Submission:
    run_id: str
    out_dir: Path
    status: str = "submitted"
    resumes: bool = False  # the run directory already held a committed round


def _check_writable(out: Path) -> None:
    """The coordinator writes the run's store and records under ``out``: a directory it cannot
    write ended a fault test's resume in a bare traceback (and its run, failed, mid-round)."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    why = cannot_write(existing)
    if why:
        raise DeployError(
            f"{existing} cannot be written ({why}): the coordinator keeps the run's store and round records "
            f"{'there' if existing == out else f'in {out}'}; make it writable (or free space) and submit again"
        )


def submit_run(
    path: Path | str,
    *,
    out_dir: Path | str | None = None,
    rounds: int | None = None,
    overrides: Sequence[str] = (),
    wait_members: float = 120.0,
    new: bool = False,
) -> Submission:
    """``flwr run APP kyodo --run-config FILE`` with FLWR_HOME in the operator directory. The
    run config goes in a TOML file: no shell or Flower quoting rules apply to its values.

    ``out_dir`` names a run to resume; one that does not exist is refused unless ``new`` says
    a new run is meant there (a mistyped resume would start a new run and spend every
    member's budget on it), and one a coordinator is running now is refused too."""
    op = operator_dir(path)
    consortium = load_consortium(op)
    if not consortium.members:
        raise DeployError(f"{op.consortium} has no members: add them with `kyodo-coordinator add-member`")
    out = Path(out_dir).expanduser().resolve() if out_dir else op.runs / time.strftime("%Y%m%d-%H%M%S")
    if out_dir and not out.exists() and not new:
        raise DeployError(
            f"--out-dir {out} does not exist, so there is no run to resume there: name an existing run "
            f"directory (`kyodo-coordinator status {op.root}` shows the newest), or add --new to start a new "
            "run in it"
        )
    if out.exists():
        try:
            check_not_running(out)
        except RunInUseError as err:
            raise DeployError(str(err)) from None
    _check_writable(out)
    resumes = (out / "store" / "HEAD").is_file()
    rounds, overrides = resubmitted(out, rounds, overrides)
    config = run_config(consortium, out, rounds, overrides, _registered(op), op.coordinator_key)
    names = [m.name for m in consortium.members]
    min_cohort = config_from_run_config(config).train.min_cohort
    small = consortium_too_small(len(names), min_cohort)
    if small:
        log.warning("%s", small)
    require_superlink(op, consortium)
    if wait_members > 0:
        offline = wait_for_members(op, names, wait_members, min_cohort)
        if offline:
            log.warning(
                "%s did not come online within %.0f s: the run goes on without them, and each joins at the next "
                "round once its node is up (kyodo-member start)",
                ", ".join(offline),
                wait_members,
            )
    else:  # not waiting, but the operator should still hear who the run starts without
        registered, online = _registered(op), online_nodes(op)
        offline = [n for n in names if registered.get(n) not in online]
        if offline:
            log.warning(
                "%s not online now: the run starts without them, and each joins at the next round once its node is "
                "up (kyodo-member start)",
                ", ".join(offline),
            )
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "run-config.toml"
    config_file.write_text(tomli_w.dumps(config), encoding="utf-8")
    settings = {"overrides": list(overrides), "rounds": rounds}
    (out / SUBMITTED_SETTINGS).write_text(json.dumps(settings), encoding="utf-8")
    clear_stop_request(out)  # a stop that found the run already ended must not end its resume at once
    answer = flwr_cli(op, "run", str(APP_DIR), CONNECTION, "--run-config", str(config_file))
    submission = Submission(run_id=str(answer["run-id"]), out_dir=out, resumes=resumes)
    with open(op.root / "runs.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"run_id": submission.run_id, "out_dir": str(out), "submitted": time.time()}) + "\n")
    return submission


SUBMITTED_SETTINGS = "submitted.json"  # in a run directory: the operator's overrides and rounds


def _submitted_settings(out: Path) -> dict[str, Any] | None:
    """What the operator submitted the run in ``out`` with (None for a new run directory).

    A resume (``run --out-dir`` of a run the coordinator died in) must not fall back to the
    consortium's defaults for what the first submission overrode: the rounds after the
    restart would train with other steps, learning rate or rounds than those before it."""
    path = out / SUBMITTED_SETTINGS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise DeployError(f"{path} is unreadable ({err}): it holds the run's submitted settings") from None
    if not (isinstance(data, dict) and isinstance(data.get("overrides"), list)):
        raise DeployError(f"{path} is not a submission's settings (an object with a list of overrides)")
    return {"overrides": [str(o) for o in data["overrides"]], "rounds": data.get("rounds")}


def resubmitted(out: Path, rounds: int | None, overrides: Sequence[str]) -> tuple[int | None, list[str]]:
    """The rounds and overrides to submit the run in ``out`` with: the operator's, after those
    it was first submitted with when it is a resume (later ones win)."""
    earlier = _submitted_settings(out)
    if earlier is None:
        return rounds, list(overrides)
    kept = " ".join(earlier["overrides"]) or "none"
    rounds_kept = f", --rounds {earlier['rounds']}" if earlier["rounds"] else ""
    log.info("%s was submitted before: its overrides (%s)%s are kept (later ones win)", out, kept, rounds_kept)
    return rounds or earlier["rounds"], [*earlier["overrides"], *overrides]


def _submissions(op: OperatorDir) -> list[dict[str, Any]]:
    """``runs.jsonl``: one line per ``run`` (Flower run id, run directory, time), oldest first."""
    try:
        text = (op.root / "runs.jsonl").read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _submission(op: OperatorDir, which: str | None) -> dict[str, Any]:
    """The newest submission (``which`` None) or the one that wrote run directory ``which``."""
    submissions = _submissions(op)
    if which is None:
        if not submissions:
            raise DeployError(f"no run submitted from {op.root} yet ({op.root / 'runs.jsonl'} is empty)")
        return submissions[-1]
    wanted = Path(which).expanduser().resolve()
    for sub in reversed(submissions):
        if Path(sub["out_dir"]).resolve() == wanted:
            return sub
    if "/" not in which:  # a run directory's name, as `ls runs/` shows it
        for sub in reversed(submissions):
            if Path(sub["out_dir"]).name == which:
                return sub
    raise DeployError(
        f"{which!r} is neither a Flower run id (a number) nor the directory of a run submitted from {op.root} "
        f"(see {op.root / 'runs.jsonl'})"
    )


def _submission_of_run(op: OperatorDir, which: str | None) -> tuple[str, Path | None]:
    """A submission's Flower run id and run directory: ``which`` as a run id (its directory
    None when this operator directory never submitted it), as a run directory, or the newest."""
    if which is not None and which.isdigit():
        for sub in reversed(_submissions(op)):
            if str(sub["run_id"]) == which:
                return which, Path(sub["out_dir"])
        return which, None
    sub = _submission(op, which)
    return str(sub["run_id"]), Path(sub["out_dir"])


def log_run_ids(op: OperatorDir, which: str | None) -> list[str]:
    """The Flower run ids whose logs make up a run's log, oldest first: a run resumed after a
    stop or a crash is one submission per resume, and its log is all of them (``which``: a run
    directory, or None for the newest run; a Flower run id names that submission alone)."""
    run_id, out_dir = _submission_of_run(op, which)
    if out_dir is None or (which is not None and which.isdigit()):
        return [run_id]
    wanted = out_dir.resolve()
    return [str(sub["run_id"]) for sub in _submissions(op) if Path(sub["out_dir"]).resolve() == wanted]


def split_run_argument(path: Path | str, which: str | None) -> tuple[Path, str | None]:
    """(operator directory, run) from a command's DIR [RUN]: a run directory passed as DIR (it
    lies under the operator directory that submitted it) names that run, which a newcomer
    reading ``status`` output types first."""
    given = Path(path).expanduser().resolve()
    if which is not None or (given / CONSORTIUM_FILE).is_file():
        return given, which
    for parent in given.parents:
        if (parent / CONSORTIUM_FILE).is_file() and (parent / "runs.jsonl").is_file():
            return parent, str(given)
    return given, which


def submitted_run_dir(op: OperatorDir, which: str | None) -> Path:
    """The run directory ``status OPERATOR_DIR [RUN]`` shows: the newest submission's, or that of
    a Flower run id or run directory this operator directory submitted (an operator copying the
    run id from ``run``'s output or from ``flwr ls`` gets the run it names, not a path error)."""
    run_id, out_dir = _submission_of_run(op, which)
    if out_dir is None:
        raise DeployError(f"run id {run_id} was not submitted from {op.root} (see {op.root / 'runs.jsonl'})")
    return out_dir


def show_log(op: OperatorDir, run_id: str, follow: bool = False) -> int:
    """The ServerApp's log of a run (progress, cohorts, who sat out and why) on this terminal:
    ``flwr log`` through the operator's connection, printed once or followed."""
    if not run_id.isdigit():
        raise DeployError(f"run id {run_id!r} is not a number (see DIR/runs.jsonl)")
    cmd = [flower_executable("flwr"), "log", run_id, CONNECTION, "--stream" if follow else "--show"]
    return subprocess.run(cmd, env=flwr_env(op), cwd=op.root, check=False).returncode


def run_status(op: OperatorDir, run_id: str) -> str:
    runs = flwr_cli(op, "ls", CONNECTION, "--run-id", run_id).get("runs", [])
    if not runs:
        raise DeployError(f"the SuperLink knows no run {run_id}")
    return str(runs[0].get("status", "?"))


@dataclass(frozen=True)
class StoppedRun:
    run_id: str
    out_dir: Path | None  # None: a run id this operator directory did not submit
    status: str  # Flower's final status of the run (``finished:stopped``...)
    had_ended: bool  # it had finished before the stop was asked for: nothing was stopped


def stop_run(
    path: Path | str, which: str | None = None, timeout: float = 900.0, poll: float = 1.0, now: bool = False
) -> StoppedRun:
    """Stop a run once the round in flight is committed, or at once (``now``: ``flwr stop``),
    and wait until it can be resumed.

    By default the request is left in the run directory (``coordinator.stop_request``) and the
    coordinator ends the run before its next round: stopped in the middle of secure
    aggregation, a round whose members' masked updates already left is lost to their budgets
    (each node masks a round's update once, and declines it on resume). ``now`` stops the
    ServerApp wherever it is: the round in flight is sent again on resume, and a member whose
    update had not yet left masked sends it again, spending nothing.

    Either way the ServerApp holds the run directory until it has ended, and a resume
    submitted in between is refused, so this returns only once the SuperLink says the run
    finished *and* the run directory's lock is free. What was committed stays committed."""
    op = operator_dir(path)
    run_id, out_dir = _submission_of_run(op, which)
    graceful = not now and out_dir is not None and out_dir.is_dir()
    if graceful:
        # Asked before `flwr ls` answers (2-3 s): a live check's stop during evaluation had
        # landed after the next round began, and ended the run a round later than asked.
        request_stop(out_dir)
    status = run_status(op, run_id)
    if status.startswith("finished"):
        if graceful:
            clear_stop_request(out_dir)
        return StoppedRun(run_id, out_dir, status, had_ended=True)
    if not graceful:
        flwr_cli(op, "stop", run_id, CONNECTION)
        log.info("run %s: stop asked for; waiting for its ServerApp to end", run_id)
    else:
        log.info(
            "run %s: asked to stop once the round in flight is committed and evaluated; waiting for it "
            "(--now stops it at once)",
            run_id,
        )
    deadline = time.monotonic() + timeout
    while True:
        status = run_status(op, run_id)
        holder = run_holder(out_dir) if out_dir is not None and out_dir.is_dir() else None
        if status.startswith("finished") and holder is None:
            return StoppedRun(run_id, out_dir, status, had_ended=False)
        if time.monotonic() >= deadline:
            still = (
                f"the SuperLink reports it {status}"
                if holder is None
                else f"a coordinator holds it{f', {holder}' if holder else ''}"
            )
            if not graceful:
                raise DeployError(
                    f"run {run_id} was told to stop {timeout:.0f} s ago but has not ended: {still}. "
                    f"Its ServerApp may be inside a long commit: run `kyodo-coordinator stop {op.root} {run_id} --now` "
                    "again later (it waits again), or see `kyodo-coordinator log`"
                )
            raise DeployError(
                f"run {run_id} was asked {timeout:.0f} s ago to stop after the round in flight, and that round has "
                f"not ended ({still}); the request stands. Run `kyodo-coordinator stop {op.root} {run_id}` again "
                "to wait again, or add --now to stop it at once (a round whose masked updates already left is "
                "then lost: its members' epsilon spent on it buys nothing)"
            )
        time.sleep(poll)


def _first_line(err: Exception) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def wait_for_run(op: OperatorDir, run_id: str, timeout: float, poll: float = 5.0) -> str:
    """Poll ``flwr ls`` until the run is finished; its final status (``finished:completed``...)."""
    deadline = time.monotonic() + timeout
    last, unreachable = "", False
    while time.monotonic() < deadline:
        try:
            status = run_status(op, run_id)
            if unreachable:
                log.info("run %s: the SuperLink answers again", run_id)
                unreachable = False
        except DeployError as err:  # the SuperLink may be restarting: say so once and keep waiting
            if not unreachable:
                log.warning("run %s: cannot ask the SuperLink (%s); waiting for it", run_id, _first_line(err))
                unreachable = True
            status = last
        if status != last:
            log.info("run %s: %s", run_id, status)
            last = status
        if status.startswith("finished"):
            return status
        time.sleep(poll)
    raise DeployError(f"run {run_id} did not finish within {timeout:.0f} s (last status {last or 'unknown'})")
