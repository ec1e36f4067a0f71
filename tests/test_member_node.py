"""The member node's logic and its ClientApp, on generated data (no Flower runtime needed)."""

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from member_node.identity import NodeConfigError, resolve_identity
from member_node.node import MemberNode
from member_node.synthetic import generate_dataset
from shared_model.config import load_config
from shared_model.policy import Policy
from shared_model.protocol import (
    ERR_INVALID_REQUEST,
    ERR_NODE_CONFIG,
    EvaluateRequest,
    ProtocolError,
    QueryRequest,
    TrainHyperParams,
    TrainReply,
    TrainRequest,
)
from shared_model.shards import shard_of

HP = TrainHyperParams(lr=0.01, local_steps=3, batch_size=8, weight_decay=0.0, seed=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("member")
    cfg = load_config(model="tiny", overrides=[f"data_root={root}"])
    generate_dataset(root / "sony", "so100", cfg.embodiments["so100"], episodes=12, episode_seconds=2.0, seed=1)
    identity = resolve_identity({"partition-id": 1}, cfg)  # default federation: sony is member 1
    node = MemberNode(cfg, identity)
    model = {k: v.clone() for k, v in Policy(cfg.model, cfg.embodiments).state_dict().items()}
    return cfg, node, model


def test_identity_from_node_config(setup):
    cfg, node, _ = setup
    assert node.identity.name == "sony" and node.identity.embodiment == "so100"
    ident = resolve_identity({"member": "x", "embodiment": "agv", "data-dir": "/d"}, cfg)
    assert ident.name == "x" and str(ident.data_dir) == "/d"
    with pytest.raises(NodeConfigError, match="data-dir"):
        resolve_identity({"member": "x", "embodiment": "agv"}, cfg)
    with pytest.raises(NodeConfigError, match="does not know"):
        resolve_identity({"member": "x", "embodiment": "boat", "data-dir": "/d"}, cfg)
    with pytest.raises(NodeConfigError, match="has no member"):
        resolve_identity({"partition-id": 9}, cfg)


def test_query_is_coarse(setup):
    _, node, _ = setup
    reply = node.query(QueryRequest(0))
    assert reply.member == "sony" and reply.embodiments == ["so100"] and reply.episodes == 10  # 12 -> 10


def test_train_returns_exactly_the_assigned_shards(setup):
    _, node, model = setup
    shards = ["expert/L0/E1", "adapter/shared", "adapter/emb/so100"]
    reply = node.train(TrainRequest(1, shards, HP, model))
    assert {shard_of(n) for n in reply.deltas} == set(shards)
    assert not any(".lora_A." in n for n in reply.deltas), "LoRA A is frozen"
    assert all(torch.isfinite(d).all() for d in reply.deltas.values())
    assert any(d.abs().sum() > 0 for d in reply.deltas.values())
    assert reply.num_examples > 0 and reply.steps == 3


def test_train_is_reproducible(setup):
    _, node, model = setup
    a = node.train(TrainRequest(1, ["adapter/emb/so100"], HP, model))
    b = node.train(TrainRequest(1, ["adapter/emb/so100"], HP, model))
    assert all(torch.equal(a.deltas[k], b.deltas[k]) for k in a.deltas)


@pytest.mark.parametrize(
    "shards, match",
    [
        (["backbone"], "frozen"),
        (["adapter/emb/aloha"], "another embodiment"),
        (["expert/L9/E0"], "does not exist"),
    ],
)
def test_train_refuses_bad_assignments(setup, shards, match):
    _, node, model = setup
    with pytest.raises(ProtocolError, match=match):
        node.train(TrainRequest(1, shards, HP, model))


def test_wrong_model_tensors_refused(setup):
    _, node, model = setup
    broken = dict(model)
    name = next(iter(broken))
    broken[name] = torch.zeros(1)
    with pytest.raises(ProtocolError, match="shape"):
        node.train(TrainRequest(1, ["adapter/shared"], HP, broken))
    with pytest.raises(ProtocolError, match="missing"):
        node.evaluate(EvaluateRequest(1, {k: v for k, v in model.items() if k != name}))


def test_evaluate(setup):
    _, node, model = setup
    reply = node.evaluate(EvaluateRequest(0, model))
    assert reply.num_examples > 0 and reply.action_mse > 0 and reply.action_mae > 0


# ---------------------------------------------------------------- the ClientApp itself
def _message(content: RecordDict, kind: str) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    # A Message built outside a Flower runtime needs the identity a runtime would set.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    return Message(content, 1, kind)


def _context(cfg, node_config):
    return Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
        run_config={"model": "tiny", "federation": "default", "overrides": f"data_root={cfg.data_root}"},
    )  # fmt: skip


def test_client_app_answers_and_refuses(setup):
    from member_node.client_app import app

    cfg, _, model = setup
    ctx = _context(cfg, {"partition-id": 1})
    reply = app(_message(TrainRequest(1, ["adapter/emb/so100"], HP, model).to_content(), "train"), ctx)
    assert not reply.has_error(), reply.error
    assert TrainReply.from_content(reply.content).member == "sony"

    bad = TrainRequest(1, ["backbone"], HP, model).to_content()
    reply = app(_message(bad, "train"), ctx)
    assert reply.has_error() and reply.error.code == ERR_INVALID_REQUEST and "frozen" in reply.error.reason

    reply = app(_message(RecordDict(), "train"), ctx)
    assert reply.has_error() and reply.error.code == ERR_INVALID_REQUEST

    reply = app(_message(QueryRequest(0).to_content(), "query"), _context(cfg, {}))
    assert reply.has_error() and reply.error.code == ERR_NODE_CONFIG
