"""The consortium file: the only thing, besides mathematics, that the auditor trusts.

Each member publishes its Ed25519 public key and the privacy budget it committed to; the
consortium collects them in one file that every party can read and sign off out of band.
The auditor checks every ledger entry and every receipt against the key listed *here* for
the member, never against a key found inside a ledger (an attacker who rewrites a ledger
can put any key in it), and checks every member's spend against the budget listed here.

Format (YAML or JSON, the same structure; ``kyodo-audit consortium`` writes it)::

    format: kyodo-consortium       # required, exactly this
    version: 1                     # required
    name: demo                     # optional, shown in reports
    coordinator_public_key: "9f3c...a1"  # optional: the Ed25519 key that signs committed rounds
    members:                       # required, at least one
      - member: honda              # the name members sign into their ledger entries
        public_key: "2242ac...d085"  # 64 hex characters: the raw Ed25519 public key
        epsilon: 8.0               # the member's budget: total epsilon over everything it runs
        delta: 1.0e-05             # ... at this delta (0 < delta < 1)
        embodiment: aloha          # optional, informational
        accountant: rdp            # optional, informational (what the member's node uses)
        dp: false                  # optional (default true): the member's node trains without DP

Rules: member names and public keys are unique (two members sharing a key could sign for
each other); unknown keys are errors (a typo such as ``epsilom`` must not silently drop a
budget); duplicate keys in a YAML mapping are errors. In YAML, write delta as ``1.0e-05``
or quote it: YAML 1.1 reads ``1e-5`` as a string (accepted here and converted, but other
tools may not).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from privacy.keys import KeyFormatError, load_public_key
from privacy.ledger import parse_strict_json

FORMAT = "kyodo-consortium"
VERSION = 1
_TOP_KEYS = {"format", "version", "name", "members", "coordinator_public_key"}
_MEMBER_KEYS = {"member", "public_key", "epsilon", "delta", "embodiment", "accountant", "departed", "dp"}
_REQUIRED_MEMBER_KEYS = ("member", "public_key", "epsilon", "delta")


class ConsortiumError(ValueError):
    """The consortium file is missing, unreadable or not in the format; the message says where."""


@dataclass(frozen=True)
class Member:
    """One member as the consortium publishes it."""

    name: str
    public_key: str  # 64 lowercase hex
    epsilon: float
    delta: float
    embodiment: str = ""
    accountant: str = ""
    # Left the consortium (kyodo-coordinator remove-member): listed for the runs it trained in,
    # never seated again, and its key no longer accepted by members that pin this file.
    departed: bool = False
    # Its node trains without DP (`kyodo-member init --no-dp`, a debugging switch): its updates
    # and held-out errors leave exact and no budget holds for them, whatever it publishes.
    dp: bool = True

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "member": self.name,
            "public_key": self.public_key,
            "epsilon": self.epsilon,
            "delta": self.delta,
        }
        if self.embodiment:
            out["embodiment"] = self.embodiment
        if self.accountant:
            out["accountant"] = self.accountant
        if self.departed:
            out["departed"] = True
        if not self.dp:
            out["dp"] = False
        return out


@dataclass(frozen=True)
class Consortium:
    """The members, by name, with their published keys and budgets."""

    members: dict[str, Member]
    name: str = ""
    coordinator_public_key: str = ""  # 64 hex; empty: round signatures are not checked

    def key_owner(self, public_key_hex: str) -> str | None:
        """The member whose published key this is (None when it is nobody's)."""
        return next((m.name for m in self.members.values() if m.public_key == public_key_hex), None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "version": VERSION}
        if self.name:
            out["name"] = self.name
        if self.coordinator_public_key:
            out["coordinator_public_key"] = self.coordinator_public_key
        out["members"] = [self.members[n].to_dict() for n in sorted(self.members)]
        return out


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_text(text: str, path: Path) -> Any:
    """JSON for ``.json`` files, YAML otherwise (YAML is a superset, but JSON errors read better)."""
    if path.suffix.lower() == ".json":
        try:
            return parse_strict_json(text)
        except ValueError as exc:
            raise ConsortiumError(f"{path}: not valid JSON: {exc}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConsortiumError(f"{path}: not valid YAML: {exc}") from None


def _number(value: Any, where: str) -> float:
    """A finite real number; numeric strings are accepted because YAML 1.1 reads ``1e-5`` as text."""
    if isinstance(value, bool):
        raise ConsortiumError(f"{where} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConsortiumError(f"{where} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConsortiumError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConsortiumError(f"{where} must be true or false, got {value!r}")
    return value


def _text(value: Any, where: str, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise ConsortiumError(f"{where} must be a non-empty string, got {value!r}")
    return value.strip()


def _public_key(value: Any, where: str, field: str) -> str:
    """A raw Ed25519 public key as 64 lowercase hex characters."""
    if not isinstance(value, str):
        raise ConsortiumError(f"{where}: {field} must be a quoted string of 64 hex characters, got {value!r}")
    try:
        load_public_key(value)
    except KeyFormatError as exc:
        raise ConsortiumError(f"{where}: {field}: {exc}") from None
    return value.strip().lower()


def parse_consortium(raw: Any, source: str = "consortium") -> Consortium:
    """Validate the parsed file content; ConsortiumError names the first problem and where it is."""
    if not isinstance(raw, Mapping):
        raise ConsortiumError(f"{source}: must be a mapping with 'format', 'version' and 'members'")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConsortiumError(f"{source}: unknown keys {unknown} (expected {sorted(_TOP_KEYS)})")
    if raw.get("format") != FORMAT:
        raise ConsortiumError(f"{source}: 'format' must be {FORMAT!r}, got {raw.get('format')!r}")
    if raw.get("version") != VERSION:
        raise ConsortiumError(f"{source}: 'version' must be {VERSION}, got {raw.get('version')!r}")
    entries = raw.get("members")
    if not isinstance(entries, list) or not entries:
        raise ConsortiumError(f"{source}: 'members' must be a non-empty list")
    members: dict[str, Member] = {}
    owners: dict[str, str] = {}
    for i, entry in enumerate(entries):
        where = f"{source}: members[{i}]"
        if not isinstance(entry, Mapping):
            raise ConsortiumError(f"{where} must be a mapping")
        unknown = sorted(set(entry) - _MEMBER_KEYS)
        missing = [k for k in _REQUIRED_MEMBER_KEYS if k not in entry]
        if unknown or missing:
            raise ConsortiumError(f"{where}: missing keys {missing}, unknown keys {unknown}")
        name = _text(entry["member"], f"{where}.member")
        where = f"{source}: member {name!r}"
        key = _public_key(entry["public_key"], where, "public_key")
        epsilon = _number(entry["epsilon"], f"{where}.epsilon")
        delta = _number(entry["delta"], f"{where}.delta")
        if epsilon <= 0:
            raise ConsortiumError(f"{where}: epsilon must be > 0, got {epsilon!r}")
        if not 0 < delta < 1:
            raise ConsortiumError(f"{where}: delta must satisfy 0 < delta < 1, got {delta!r}")
        if name in members:
            raise ConsortiumError(f"{where}: listed twice")
        if key in owners:
            raise ConsortiumError(f"{where}: public key is also listed for member {owners[key]!r}")
        owners[key] = name
        members[name] = Member(
            name=name,
            public_key=key,
            epsilon=epsilon,
            delta=delta,
            embodiment=_text(entry.get("embodiment"), f"{where}.embodiment", required=False),
            accountant=_text(entry.get("accountant"), f"{where}.accountant", required=False),
            departed=_flag(entry.get("departed", False), f"{where}.departed"),
            dp=_flag(entry.get("dp", True), f"{where}.dp"),
        )
    name = raw.get("name")
    coordinator = raw.get("coordinator_public_key")
    if coordinator is not None:
        coordinator = _public_key(coordinator, source, "coordinator_public_key")
        if coordinator in owners:
            raise ConsortiumError(f"{source}: coordinator_public_key is also member {owners[coordinator]!r}'s key")
    return Consortium(members, _text(name, f"{source}: name") if name is not None else "", coordinator or "")


def load_consortium(path: str | Path) -> Consortium:
    """Read and validate a consortium file (YAML, or JSON when it ends in ``.json``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConsortiumError(f"cannot read consortium file {path}: {exc.strerror or exc}") from None
    return consortium_from_text(text, path)


def consortium_from_text(text: str, path: Path) -> Consortium:
    """A consortium file's text, read already (``kyodo-member trust`` reads the file once and
    pins those very bytes); errors name ``path``."""
    raw = _parse_text(text, path)
    if isinstance(raw, Mapping) and "members" in raw and "format" not in raw and {"host", "port"} <= set(raw):
        # The operator's own consortium.yaml beside audit-consortium.yaml: an easy mix-up.
        raise ConsortiumError(
            f"{path} is the operator's run configuration (consortium.yaml), not the published consortium file: "
            "use audit-consortium.yaml from the same directory"
        )
    return parse_consortium(raw, str(path))


def from_nodes(nodes_dir: str | Path, name: str = "", coordinator_public_key: str = "") -> Consortium:
    """Assemble the consortium from members' published ``member.json`` files (``<nodes>/<member>/``).

    In a deployment each member publishes its ``member.json`` (name, public key, budget);
    in a local simulation the node state directories sit side by side under ``nodes/``.
    Only the published fields are read: never a private key, never a ledger.
    """
    nodes_dir = Path(nodes_dir)
    if not nodes_dir.is_dir():
        raise ConsortiumError(f"{nodes_dir} is not a directory of member state directories")
    entries = []
    for path in sorted(nodes_dir.glob("*/member.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConsortiumError(f"{path}: cannot read the member's published identity: {exc}") from None
        if not isinstance(data, Mapping):
            raise ConsortiumError(f"{path}: not a JSON object")
        entries.append({k: data[k] for k in _MEMBER_KEYS if k in data and data[k] not in (None, "")})
    if not entries:
        raise ConsortiumError(f"no <member>/member.json under {nodes_dir}")
    raw: dict[str, Any] = {"format": FORMAT, "version": VERSION, "members": entries}
    if name:
        raw["name"] = name
    if coordinator_public_key:
        raw["coordinator_public_key"] = coordinator_public_key
    return parse_consortium(raw, str(nodes_dir))


def dump_consortium(consortium: Consortium, path: str | Path) -> Path:
    """Write the consortium as YAML (or JSON when ``path`` ends in ``.json``)."""
    path = Path(path)
    data = consortium.to_dict()
    if path.suffix.lower() == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        header = "# kyodo consortium: members' published Ed25519 public keys and privacy budgets (kyodo-audit)\n"
        text = header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
