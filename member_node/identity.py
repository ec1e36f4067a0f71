"""Who this node is and where its data lives: from the node's own config, never the coordinator.

Deployment: ``flower-supernode --node-config 'member="sony" embodiment="so100"
data-dir="/srv/kyodo/sony"'``. Simulation: Flower gives each virtual node a ``partition-id``,
which picks the matching member of the federation config, with its data under
``data_root/<member>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared_model.config import KyodoConfig


class NodeConfigError(ValueError):
    """The node's own configuration is missing or inconsistent; the text says what to fix."""


@dataclass(frozen=True)
class MemberIdentity:
    name: str
    embodiment: str
    data_dir: Path


def resolve_identity(node_config: Mapping[str, Any], cfg: KyodoConfig) -> MemberIdentity:
    if "member" in node_config:
        for key in ("embodiment", "data-dir"):
            if key not in node_config:
                raise NodeConfigError(f"node config sets 'member' but not {key!r}")
        identity = MemberIdentity(
            name=str(node_config["member"]),
            embodiment=str(node_config["embodiment"]),
            data_dir=Path(str(node_config["data-dir"])).expanduser(),
        )
    elif "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        members = cfg.federation.members
        if not 0 <= pid < len(members):
            raise NodeConfigError(
                f"simulation node {pid} has no member: federation {cfg.federation.name!r} has {len(members)}"
            )
        m = members[pid]
        identity = MemberIdentity(name=m.name, embodiment=m.embodiment, data_dir=Path(cfg.data_root) / m.name)
    else:
        raise NodeConfigError("node config names no member: set member, embodiment and data-dir")
    if identity.embodiment not in cfg.embodiments:
        raise NodeConfigError(
            f"member {identity.name!r} declares embodiment {identity.embodiment!r}, "
            f"which the consortium config does not know ({sorted(cfg.embodiments)})"
        )
    return identity
