"""SecAgg+ stages 2-5 over the Flower Grid (stage 1, the key advert, rides on the train reply).

Each stage is one push/pull exchange with the members still in; a member that errors,
answers something invalid or does not answer in time is simply no longer in, which the
protocol is built to survive (``aggregation.secagg.server``). The result is each shard's
example-weighted mean update, computed from cohort sums only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
from flwr.app import Message
from flwr.serverapp import Grid

from aggregation.secagg.errors import SecAggError
from aggregation.secagg.server import SecAggServer, ShardSum
from aggregation.secagg.vectors import unflatten_shard
from shared_model.protocol import (
    SECAGG_CONSISTENCY,
    SECAGG_MASKED_INPUT,
    SECAGG_SHARE_KEYS,
    SECAGG_UNMASK,
    ConsistencyReply,
    MaskedInputReply,
    ProtocolError,
    ShareKeysReply,
    UnmaskReply,
)

log = logging.getLogger("kyodo.coordinator")

Exchange = Callable[[Grid, list[Message], float, Callable[[Message, int], None]], set[int]]


def _stage(
    grid: Grid,
    exchange: Exchange,
    timeout: float,
    stage: str,
    requests: Mapping[str, object],
    node_of: Mapping[str, int],
    parse: Callable,
    accept: Callable,
    failed: dict[str, str],
) -> None:
    name_of = {node: name for name, node in node_of.items()}
    messages = [Message(req.to_content(), node_of[member], stage) for member, req in requests.items()]

    def on_reply(reply: Message, node: int) -> None:
        member = name_of.get(node, f"node {node}")
        if reply.has_error():
            failed[member] = f"{stage} error {reply.error.code}: {reply.error.reason}"
            log.warning("%s: %s", member, failed[member])
            return
        try:
            parsed = parse(reply.content)
            if parsed.member != member:
                raise ProtocolError(f"reply names member {parsed.member!r}, node is {member!r}")
            accept(parsed)
        except (ProtocolError, SecAggError, ValueError) as err:
            failed[member] = f"invalid {stage} reply: {err}"
            log.warning("%s: %s", member, failed[member])

    for node in exchange(grid, messages, timeout, on_reply):
        failed[name_of.get(node, str(node))] = f"no {stage} reply in time"
        log.warning("%s: no %s reply in time", name_of.get(node, str(node)), stage)


def secure_aggregate(
    grid: Grid,
    exchange: Exchange,
    timeout: float,
    server: SecAggServer,
    node_of: Mapping[str, int],
    failed: dict[str, str],
) -> Iterator[ShardSum]:
    """Run share keys, masked input, consistency and unmask; then yield the recovered shard sums one at a
    time (``SecAggServer.iter_finish``), so the caller finishes and frees each before the next."""
    _stage(
        grid, exchange, timeout, SECAGG_SHARE_KEYS, server.share_keys_requests(), node_of,
        ShareKeysReply.from_content, server.add_shares, failed,
    )  # fmt: skip
    _stage(
        grid, exchange, timeout, SECAGG_MASKED_INPUT, server.masked_input_requests(), node_of,
        MaskedInputReply.from_content, server.add_masked, failed,
    )  # fmt: skip
    _stage(
        grid, exchange, timeout, SECAGG_CONSISTENCY, server.consistency_requests(), node_of,
        ConsistencyReply.from_content, server.add_consistency, failed,
    )  # fmt: skip
    _stage(
        grid, exchange, timeout, SECAGG_UNMASK, server.unmask_requests(), node_of,
        UnmaskReply.from_content, server.add_unmask, failed,
    )  # fmt: skip
    return server.iter_finish()


def mean_update(result: ShardSum, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The shard's weighted mean delta as named tensors."""
    # Divided straight into float32 (the quotient is computed in float64, then rounded, as
    # ``(total / weight).astype(float32)`` would), without a float64 temporary of the shard's size.
    mean = np.divide(result.total, result.weight, out=np.empty(result.total.shape, np.float32), casting="same_kind")
    return unflatten_shard(mean, shapes)
