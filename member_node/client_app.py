"""Flower ClientApp of a member node: adapts Flower messages to :class:`MemberNode`.

Every failure becomes an error reply with a code and a message, never a crash of the node,
and a request that does not validate is refused before the member's data is touched.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from aggregation.secagg.errors import SecAggError
from member_node.identity import MemberIdentity, NodeConfigError, resolve_identity
from member_node.lerobot import DatasetError
from member_node.node import MemberNode
from member_node.reply_timing import ReplyDelay
from shared_model.config import ConfigError, config_from_run_config, to_yaml
from shared_model.protocol import (
    ERR_DATA,
    ERR_INTERNAL,
    ERR_INVALID_REQUEST,
    ERR_NODE_CONFIG,
    ConsistencyRequest,
    EvaluateRequest,
    MaskedInputRequest,
    ProtocolError,
    QueryRequest,
    SeatingNotice,
    ShareKeysRequest,
    TrainRequest,
    UnmaskRequest,
)

log = logging.getLogger("kyodo.member")
app = ClientApp()

# In simulation one process serves many messages; building the node (reading the dataset)
# once per member and config saves seconds per message. Keyed by everything that shapes it.
_NODES: dict[tuple[MemberIdentity, str], MemberNode] = {}


def _node(context: Context) -> MemberNode:
    cfg = config_from_run_config(context.run_config)
    identity = resolve_identity(context.node_config, cfg)
    key = (identity, to_yaml(cfg))  # the whole identity: a changed budget or device is a new node
    if key not in _NODES:
        torch.set_num_threads(max(1, cfg.train.threads))
        _NODES[key] = MemberNode(cfg, identity)
    return _NODES[key]


def forget_nodes() -> None:
    """Build the next message's node afresh (``member_node.executor``: one process serves every
    message of a deployed node, and a member may change its data or budget between them)."""
    _NODES.clear()


def _reply_delay(context: Context, which: str) -> ReplyDelay:
    """The member's padding for ``which`` replies ("train", "eval"; "" for none). Resolved
    before anything else, so the clock starts before the node is built: in deployment Flower
    starts a ClientApp process per message, and building the node is part of the work. A node
    config that does not resolve is not padded (its error says nothing about the data)."""
    if not which:
        return ReplyDelay(0.0, "")
    try:
        train, evaluation = resolve_identity(
            context.node_config, config_from_run_config(context.run_config)
        ).reply_delays()
    except (ConfigError, NodeConfigError, ValueError):
        return ReplyDelay(0.0, which)
    return train if which == "train" else evaluation


# Errors of files the node cannot write (a full or read-only disk) or may not touch.
_CANNOT_WRITE = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM})


def _serve(
    message: Message,
    context: Context,
    handler: Callable[[MemberNode, Any, dt.datetime], Any],
    parse: Callable[[Any], Any],
    padded: str = "",
) -> Message:
    arrived = dt.datetime.now(dt.UTC)
    with _reply_delay(context, padded).held():
        body = _handle(message, context, handler, parse, arrived)
    # Built after the wait: Flower stamps a reply's metadata (``created_at``, and ``ttl``
    # from it) when the Message is made, and the coordinator receives both unchanged, so a
    # reply made before the padding would still say when the work on the data ended.
    return Message(body, reply_to=message)


def _handle(message: Message, context: Context, handler, parse, arrived: dt.datetime) -> RecordDict | Error:
    try:
        node = _node(context)
        request = parse(message.content)
        return handler(node, request, arrived).to_content()
    except ProtocolError as err:
        return Error(ERR_INVALID_REQUEST, f"invalid request: {err}")
    except ConfigError as err:  # the run config the coordinator sent: its own text
        return Error(ERR_NODE_CONFIG, f"run configuration: {err}")
    except NodeConfigError as err:
        # The detail can hold what the coordinator must not learn (paths, the episode
        # count): it goes to the member's own log, the reply says only where to look.
        log.error("node configuration: %s", err)
        return Error(ERR_NODE_CONFIG, "the member's node configuration is invalid (see its node log)")
    except SecAggError as err:
        return Error(ERR_INVALID_REQUEST, f"secure aggregation: {err}")
    except DatasetError as err:
        # Dataset errors name files, frame counts and episode lengths: the member's log only.
        log.error("member data: %s", err)
        return Error(ERR_DATA, "the member's data cannot be used (see its node log)")
    except OSError as err:
        if err.errno not in _CANNOT_WRITE:
            return _internal_error(message, err)
        # A full or read-only state directory (or a file the node may not touch): one line that
        # says what to do, not a traceback (a fault test's member read only an OSError's stack);
        # the path stays in its own log.
        log.error(
            "the node cannot use a file it needs (%s: %s) answering %s: nothing left the node, and what its "
            "ledger records stays spent (kyodo-member status shows it); free space, or make the file and its "
            "directory writable for the node, and it takes part again from the next round",
            err.strerror,
            err.filename,
            message.metadata.message_type,
        )
        return Error(ERR_INTERNAL, "the member's node cannot use a file it needs (see its node log)")
    except Exception as err:  # noqa: BLE001 - a node answers, it does not crash
        return _internal_error(message, err)


def _internal_error(message: Message, err: Exception) -> Error:
    """A fault of the node's own: its traceback in the member's log, only its type in the reply."""
    log.exception("unexpected failure handling %s", message.metadata.message_type)
    return Error(ERR_INTERNAL, f"internal error on node: {type(err).__name__}")


def _unpadded(method: Callable[[MemberNode, Any], Any]) -> Callable[[MemberNode, Any, dt.datetime], Any]:
    """A handler whose work does not touch the member's data: no padding, no arrival time."""
    return lambda node, request, _arrived: method(node, request)


def _at_arrival(method: Callable[..., Any]) -> Callable[[MemberNode, Any, dt.datetime], Any]:
    return lambda node, request, arrived: method(node, request, arrived=arrived)


@app.query()
def query(message: Message, context: Context) -> Message:
    return _serve(message, context, _unpadded(MemberNode.query), QueryRequest.from_content)


@app.query("seating")
def seating(message: Message, context: Context) -> Message:
    return _serve(message, context, _unpadded(MemberNode.seating), SeatingNotice.from_content)


@app.train()
def train(message: Message, context: Context) -> Message:
    return _serve(message, context, _at_arrival(MemberNode.train), TrainRequest.from_content, padded="train")


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return _serve(message, context, _at_arrival(MemberNode.evaluate), EvaluateRequest.from_content, padded="eval")


# Secure aggregation stages (SecAgg+): Flower routes "train.<action>" here. They work on the
# node's stored masked-update state and keys only, never the member's data.
@app.train("share_keys")
def share_keys(message: Message, context: Context) -> Message:
    return _serve(message, context, _unpadded(MemberNode.share_keys), ShareKeysRequest.from_content)


@app.train("masked_input")
def masked_input(message: Message, context: Context) -> Message:
    return _serve(message, context, _unpadded(MemberNode.masked_input), MaskedInputRequest.from_content)


@app.train("consistency")
def consistency(message: Message, context: Context) -> Message:
    return _serve(message, context, _unpadded(MemberNode.consistency), ConsistencyRequest.from_content)


@app.train("unmask")
def unmask(message: Message, context: Context) -> Message:
    return _serve(message, context, _unpadded(MemberNode.unmask), UnmaskRequest.from_content)
