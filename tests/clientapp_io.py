"""Flower Messages and Contexts built outside a Flower runtime, for calling the real
ClientApp directly (tests/test_member_node.py, tests/test_reply_timing.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message, RecordDict


def message(content: RecordDict, kind: str) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    # A Message built outside a Flower runtime needs the identity a runtime would set.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    return Message(content, 1, kind)


def context(cfg, node_config: Mapping[str, Any]) -> Context:
    """The Context a SuperNode gives the ClientApp: this node config, a tiny-model run whose
    data and state roots are ``cfg``'s."""
    return Context(
        run_id=1, node_id=1, node_config=dict(node_config), state=RecordDict(),
        run_config={
            "model": "tiny",
            "federation": "default",
            "overrides": f"data_root={cfg.data_root} state_root={cfg.state_root}",
        },
    )  # fmt: skip
