"""A node answers only as the member the consortium registered it as.

Flower's node authentication proves a SuperNode holds a registered key; the member name is
in the node's own config. With the consortium's pins in the run config (Flower node id and
ledger key per member) the coordinator leaves out a node that names another member, one with
another ledger key, and one that names nobody in the consortium, and keeps everyone else.
A real RoundRunner query over the in-process grid of ``tests.round_fakes``.
"""

from __future__ import annotations

import secrets

import pytest

from coordinator.federation import initial_model
from coordinator.rounds import RoundRunner
from coordinator.run_state import RunState
from shared_model.config import ConfigError, load_config
from tests.round_fakes import FakeGrid

NAMES = ["fanuc", "honda", "softbank", "sony"]  # FakeGrid numbers nodes 1.. in sorted name order
KEYS = {name: secrets.token_hex(32) for name in NAMES}


def _pins(node_ids: bool = True, keys: bool = True) -> list[str]:
    """Run-config overrides pinning each default member to its FakeGrid node and ledger key."""
    order = [m.name for m in load_config(model="tiny").federation.members]
    out = []
    for name in NAMES:
        member = f"federation.members.{order.index(name)}"
        out.append(f"{member}.node_id={NAMES.index(name) + 1 if node_ids else 0}")
        if keys:
            out.append(f"{member}.ledger_public_key='{KEYS[name]}'")
    return out


def _query(tmp_path, overrides: list[str], **grid_kwargs) -> dict[str, int]:
    cfg = load_config(model="tiny", overrides=["secagg.enabled=false", *overrides])
    assert sorted(m.name for m in cfg.federation.members) == NAMES
    state = RunState(cfg, tmp_path)
    state.commit_initial(initial_model(cfg), {"run": "t"})
    grid = FakeGrid({m.name: m.embodiment for m in cfg.federation.members}, state.layout, **grid_kwargs)
    runner = RoundRunner(cfg, grid, state, run_id="t", timeout=30)
    return {info.name: node for node, info in runner.query(1).items()}


def test_pinned_members_that_answer_as_themselves_all_join(tmp_path):
    joined = _query(tmp_path, _pins(), public_keys=KEYS)
    assert joined == {name: i + 1 for i, name in enumerate(NAMES)}


def test_a_registered_node_naming_another_member_is_left_out_and_the_member_stays(tmp_path, caplog):
    joined = _query(tmp_path, _pins(), public_keys=KEYS, answers_as={"softbank": "sony"})
    assert joined == {"fanuc": 1, "honda": 2, "sony": 4}, "the impostor is out, the real sony keeps its place"
    assert "node 3 is left out" in caplog.text and "registered as node 4" in caplog.text


def test_a_node_with_another_ledger_key_is_left_out(tmp_path, caplog):
    keys = {**KEYS, "honda": secrets.token_hex(32)}
    joined = _query(tmp_path, _pins(node_ids=False), public_keys=keys)
    assert set(joined) == {"fanuc", "softbank", "sony"}
    assert "ledger key is not the one 'honda' registered" in caplog.text


def test_a_name_outside_a_pinned_consortium_is_left_out_but_simulation_is_not_pinned(tmp_path, caplog):
    joined = _query(tmp_path / "pinned", _pins(), public_keys=KEYS, answers_as={"fanuc": "yaskawa"})
    assert set(joined) == {"honda", "softbank", "sony"}
    assert "'yaskawa', who is not a consortium member" in caplog.text
    # Unpinned (the local simulation: no registrations, keys made at first start) nobody is refused.
    assert set(_query(tmp_path / "open", [], answers_as={"fanuc": "yaskawa"})) == {"yaskawa", *NAMES[1:]}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("federation.members.0.ledger_public_key=abc", "64 lowercase hex"),
        ("federation.members.0.node_id=-1", "node_id must be >= 0"),
    ],
)
def test_malformed_pins_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(model="tiny", overrides=[override])
