"""Deployment on 127.0.0.1: TLS, node authentication, member and operator CLIs, restarts.

The fast tests check each piece in process (certificates, keys, command lines, retries, the
status tables). The slow test starts everything as real processes on free loopback ports:
one SuperLink (TLS, node authentication, SQLite database) and three members' SuperNodes, each
through its own CLI, and runs 2 rounds of ``tiny``. While round 1 runs, three SuperNodes that
must be refused try to join (an unregistered key, an impostor's key claiming a member's name,
a client that does not trust the consortium CA), and one member is stopped and restarted.
After round 1 is committed the SuperLink is killed (SIGKILL: its ServerApp dies with it),
started again on the same database and the run resubmitted on the same run directory: it
continues at round 2. Last, a new run is stopped with ``kyodo-coordinator stop`` as soon as
its ServerApp holds its run directory. Every process the test starts is stopped by a finalizer, failure or not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from coordinator import deploy
from coordinator.cli import main as coordinator_main
from coordinator.tls import TLSError, TLSPaths, check_server_tls, create_tls, make_ca
from member_node import supernode
from member_node.cli import main as member_main
from member_node.identity import NodeConfigError, resolve_identity

REPO = Path(__file__).resolve().parent.parent
TRIO = (("honda", "aloha", 11), ("sony", "so100", 22), ("softbank", "agv", 33))


def _free_port() -> int:
    return supernode.free_port()  # below the ephemeral range: no outgoing connection takes it first


# ----------------------------------------------------------------------------- TLS


def test_tls_material_names_loopback_and_refuses_to_be_replaced(tmp_path):
    paths = create_tls(tmp_path / "tls", "test")
    check_server_tls(paths, "127.0.0.1")
    check_server_tls(paths, "localhost")
    assert paths.ca_key.stat().st_mode & 0o777 == 0o600
    assert paths.server_key.stat().st_mode & 0o777 == 0o600
    with pytest.raises(TLSError, match="not '10.0.0.7'"):
        check_server_tls(paths, "10.0.0.7")
    with pytest.raises(TLSError, match="already exists"):
        create_tls(tmp_path / "tls", "test")
    paths.server_cert.unlink()
    with pytest.raises(TLSError, match="server certificate .* does not exist"):
        check_server_tls(paths, "127.0.0.1")


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def _serve_tls(paths: TLSPaths, port: int) -> HTTPServer:
    server = HTTPServer(("127.0.0.1", port), _Health)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(paths.server_cert, paths.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_connection_refused_is_retried_with_backoff_until_the_superlink_is_up(tmp_path, caplog):
    paths = create_tls(tmp_path / "tls", "test")
    port = _free_port()
    started: list[HTTPServer] = []
    timer = threading.Timer(1.6, lambda: started.append(_serve_tls(paths, port)))
    timer.start()
    caplog.set_level(logging.WARNING, logger="kyodo.member")
    member_log = logging.getLogger("kyodo.member")
    member_log.addHandler(caplog.handler)  # the CLI stops it propagating to the root logger
    try:
        supernode.wait_for_superlink(f"127.0.0.1:{port}", str(paths.ca_cert), timeout=20)
    finally:
        timer.join()
        member_log.removeHandler(caplog.handler)
        for server in started:
            server.shutdown()
    retries = [r for r in caplog.records if "not reachable" in r.getMessage()]
    assert len(retries) >= 2, "one log line per retry"
    assert "ConnectionRefusedError" in retries[0].getMessage()


def test_an_untrusted_superlink_certificate_fails_at_once(tmp_path, caplog):
    paths = create_tls(tmp_path / "tls", "test")
    member_log = logging.getLogger("kyodo.member")
    member_log.addHandler(caplog.handler)  # the CLI stops it propagating to the root logger
    caplog.set_level(logging.WARNING, logger="kyodo.member")
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(make_ca("other")[1].public_bytes(serialization.Encoding.PEM))
    port = _free_port()
    server = _serve_tls(paths, port)
    try:
        with pytest.raises(supernode.SetupError, match="does not vouch for"):
            supernode.wait_for_superlink(f"127.0.0.1:{port}", str(other_ca), timeout=30)
        retries = [r for r in caplog.records if "not reachable" in r.getMessage()]
        assert not retries, "a permanent error is not retried"
        supernode.wait_for_superlink(f"127.0.0.1:{port}", str(paths.ca_cert), timeout=5)
    finally:
        member_log.removeHandler(caplog.handler)
        server.shutdown()


# ----------------------------------------------------------------------------- the member's side


def _member(tmp_path: Path, name: str = "sony", embodiment: str = "so100", **kwargs) -> supernode.MemberSetup:
    return supernode.init_member(
        tmp_path / name, member=name, embodiment=embodiment, data_dir=tmp_path / "data" / name,
        epsilon=8.0, delta=1e-5, **kwargs,
    )  # fmt: skip


def _resolved(setup: supernode.MemberSetup, cfg):
    """The identity the member's ClientApp resolves from its ``--node-config`` once it pinned
    the consortium's keys (``kyodo-member trust`` sets the file; the node reads it later)."""
    from dataclasses import replace

    from flwr.common.config import parse_config_args

    pinned = replace(setup, consortium_file=str(setup.dir / supernode.TRUSTED_CONSORTIUM_FILE))
    return resolve_identity(parse_config_args([supernode.node_config_arg(pinned.node_config())]), cfg)


def test_member_init_creates_keys_config_and_membership(tmp_path, tiny_cfg):
    setup = _member(tmp_path, superlink="127.0.0.1:9093")
    assert setup.auth_key.stat().st_mode & 0o777 == 0o600
    assert setup.signing_key.stat().st_mode & 0o777 == 0o600
    assert supernode.load_setup(setup.dir) == setup
    membership = json.loads((setup.dir / "membership.json").read_text())
    assert membership["member"] == "sony" and len(membership["ledger_public_key"]) == 64
    assert membership["supernode_public_key"].startswith("ecdsa-sha2-nistp384 ")
    assert "PRIVATE" not in (setup.dir / "membership.json").read_text()
    with pytest.raises(supernode.SetupError, match="already exists"):
        _member(tmp_path)
    # What --node-config carries is exactly what the ClientApp resolves its identity from.
    identity = _resolved(setup, tiny_cfg)
    assert (identity.name, identity.embodiment, identity.epsilon, identity.delta, identity.dp) == (
        "sony", "so100", 8.0, 1e-5, True,
    )  # fmt: skip
    assert (identity.eval_noise_multiplier, identity.eval_loss_bound, identity.device, identity.workers) == (
        5.0, 0.05, "cpu", 1,
    )  # fmt: skip
    assert identity.require_secagg, "a deployed member requires secure aggregation unless it says otherwise"
    assert identity.require_pinned_keys, "and requires the other members' keys pinned"
    debugging = _member(tmp_path, name="d", require_secagg=False)
    assert not _resolved(debugging, tiny_cfg).require_secagg
    assert str(identity.data_dir) == setup.data_dir and str(identity.state_dir) == setup.state_dir
    with pytest.raises(supernode.SetupError, match="cannot carry a double quote"):
        supernode.init_member(
            tmp_path / "q", member="q", embodiment="so100", data_dir=tmp_path / 'da"ta', epsilon=8, delta=1e-5
        )
    assert not (tmp_path / "q").exists(), "nothing is written for a config Flower could not carry"
    with pytest.raises(supernode.SetupError, match="ca.pem from the operator first"):
        _member(tmp_path, name="c", root_certificates=tmp_path / "missing-ca.pem")
    assert not (tmp_path / "c").exists()
    with pytest.raises(supernode.SetupError, match="--workers: must be >= 1"):
        _member(tmp_path, name="w", workers=0)
    assert _member(tmp_path, name="w2", workers=2).node_config()["workers"] == 2
    with pytest.raises(supernode.SetupError, match="--device: device 'gpu'"):
        _member(tmp_path, name="g", device="gpu")
    assert not (tmp_path / "g").exists(), "nothing is written for a device this node cannot train on"
    padded = _member(tmp_path, name="p", train_reply_after=600, eval_reply_after=30)
    identity = _resolved(padded, tiny_cfg)
    assert (identity.train_reply_after, identity.eval_reply_after) == (600.0, 30.0)
    paced = _member(tmp_path, name="r", budget_rounds=40)
    assert _resolved(paced, tiny_cfg).budget_rounds == 40
    pinned = _member(tmp_path, name="a", accountant="prv", max_noise_multiplier=4.0, min_steps=3)
    identity = _resolved(pinned, tiny_cfg)
    assert (identity.accountant, identity.max_noise_multiplier, identity.min_steps) == ("prv", 4.0, 3)
    assert _resolved(setup, tiny_cfg).privacy_settings(tiny_cfg.privacy) == tiny_cfg.privacy, "unset: the run's"
    for bad, match in (
        ({"accountant": "gdp"}, "--accountant 'gdp' is not one of rdp, prv"),
        ({"max_noise_multiplier": -1.0}, "--max-noise-multiplier must be a positive number"),
        ({"min_steps": -1}, "--min-steps must be >= 0"),
    ):
        with pytest.raises(supernode.SetupError, match=match):
            _member(tmp_path, name="a2", **bad)
        assert not (tmp_path / "a2").exists()
    with pytest.raises(supernode.SetupError, match="--budget-rounds must be >= 0"):
        _member(tmp_path, name="r2", budget_rounds=-1)
    assert not (tmp_path / "r2").exists()
    with pytest.raises(supernode.SetupError, match="budget epsilon must be finite and > 0, got inf"):
        supernode.init_member(tmp_path / "inf", member="inf", embodiment="so100", data_dir=tmp_path / "d",
                              epsilon=float("inf"), delta=1e-5)  # fmt: skip
    with pytest.raises(supernode.SetupError, match="private keys would travel with every copy of the data"):
        supernode.init_member(tmp_path / "data" / "sony" / "node", member="k", embodiment="so100",
                              data_dir=tmp_path / "data" / "sony", epsilon=8, delta=1e-5)  # fmt: skip
    assert not (tmp_path / "inf").exists() and not (tmp_path / "data" / "sony" / "node").exists()
    with pytest.raises(
        supernode.SetupError,
        match=r"--eval-reply-after \(member.yaml: eval_reply_after\) must be a finite number of seconds",
    ):
        _member(tmp_path, name="n", eval_reply_after=-1)


def test_member_init_says_its_budgets_pace_and_whether_updates_may_leave_unmasked(tmp_path, capsys, monkeypatch):
    from member_node.cli import main as member_main

    monkeypatch.setenv("COLUMNS", "200")
    base = ["init", "--embodiment", "so100", "--epsilon", "8", "--delta", "1e-5"]
    assert member_main([*base, str(tmp_path / "a"), "--member", "a", "--data", str(tmp_path / "da")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "with no pace: the first run may spend all of it" in out and "secure agg. required" in out
    # Data may arrive after the keys, but the member hears now what `start` would refuse.
    assert f"warning: data {tmp_path / 'da'}: " in out and "dataset directory not found" in out
    assert "`start` refuses until it is usable" in out
    argv = [*base, str(tmp_path / "b"), "--member", "b", "--data", str(tmp_path / "db"), "--budget-rounds", "40"]
    assert member_main([*argv, "--no-require-secagg"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "spread over at least 40 training rounds" in out and "not required (--no-require-secagg)" in out
    assert not supernode.load_setup(tmp_path / "b").require_secagg
    assert "accounting as each run sets it" in out
    assert "reply timing not padded for every reply (train 0 s, evaluate 0 s)" in out
    argv = [*base, str(tmp_path / "c"), "--member", "c", "--data", str(tmp_path / "dc"), "--accountant", "rdp"]
    assert member_main([*argv, "--min-steps", "10"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "accounting the member's own: accountant rdp, min steps 10; the rest as each run sets them" in out
    assert (supernode.load_setup(tmp_path / "c").accountant, supernode.load_setup(tmp_path / "c").min_steps) == (
        "rdp",
        10,
    )


def test_a_consortium_too_small_for_a_cohort_is_warned_at_submission():
    assert deploy.consortium_too_small(3, 3) == ""
    warning = deploy.consortium_too_small(2, 3)
    assert "has 2 member(s), fewer than train.min_cohort (3)" in warning and "still spends its budget" in warning


def test_a_run_goes_on_without_members_still_down_when_a_cohort_is_up():
    """A walkthrough's run waited 120 s for a member that was down and then refused to start
    at all, resumes included, without saying how to go on."""
    assert deploy.too_few_online(3, ["softbank"], 3, 120) == ""
    refusal = deploy.too_few_online(2, ["softbank", "fanuc"], 3, 120)
    assert "softbank, fanuc did not come online within 120 s" in refusal
    assert "fewer than train.min_cohort (3)" in refusal and "--wait-members 0" in refusal


def test_start_warns_about_each_kind_of_dp_reply_that_is_not_padded(tmp_path, caplog):
    """Padding is the member's choice (it costs everyone's round time), but an unpadded DP
    reply times the work on the member's data: ``start`` says so, per kind, and no more."""
    caplog.set_level("WARNING", logger="kyodo.member")
    assert supernode.warn_unpadded_replies(_member(tmp_path, name="a")) == ["train", "eval"]
    assert "train replies are not padded" in caplog.text and "--eval-reply-after" in caplog.text
    caplog.clear()
    assert supernode.warn_unpadded_replies(_member(tmp_path, name="b", train_reply_after=600)) == ["eval"]
    assert (
        supernode.warn_unpadded_replies(_member(tmp_path, name="c", train_reply_after=600, eval_noise_multiplier=0))
        == []
    )
    padded = _member(tmp_path, name="d", train_reply_after=600, eval_reply_after=60)
    assert supernode.warn_unpadded_replies(padded) == []
    assert supernode.warn_unpadded_replies(_member(tmp_path, name="e", dp=False)) == []  # no budget to speak of


def test_how_a_process_ended_is_said():
    from shared_model.flower_processes import process_ended

    assert process_ended(-9) == "was killed by signal SIGKILL" and process_ended(1) == "exited with status 1"
    assert process_ended(-200) == "was killed by signal 200"


def test_start_refuses_a_state_directory_the_node_cannot_write(tmp_path):
    """A fault test's node started on a read-only state directory and failed every message.
    (Tests may run as root, whom permission bits do not stop: a file in its place does.)"""
    supernode.check_state_writable(tmp_path)
    assert not list(tmp_path.iterdir()), "the check leaves nothing behind"
    (tmp_path / "state").write_text("not a directory")
    with pytest.raises(supernode.SetupError, match=r"state directory .*state cannot be written \(Not a directory\)"):
        supernode.check_state_writable(tmp_path / "state")


def test_supernode_command_has_tls_auth_node_config_and_its_own_port(tmp_path):
    (tmp_path / "ca.pem").write_text("the operator's CA certificate")
    setup = _member(tmp_path, superlink="127.0.0.1:9093", root_certificates=tmp_path / "ca.pem")
    cmd = supernode.supernode_command(setup, 9301)
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert flags["--superlink"] == "127.0.0.1:9093"
    assert flags["--root-certificates"] == str(tmp_path / "ca.pem")
    assert flags["--auth-supernode-private-key"] == str(setup.auth_key)
    assert flags["--port"] == "9301"
    assert 'member="sony"' in flags["--node-config"] and "--insecure" not in cmd
    # The SuperNode starts no ClientApp of the coordinator's: the member's executor answers.
    assert flags["--isolation"] == "process"


def test_member_start_fails_fast_on_what_the_member_must_fix(tmp_path, capsys):
    setup = _member(tmp_path, superlink="127.0.0.1:9")
    assert member_main(["start", str(setup.dir)]) == 3
    assert "no CA certificate" in capsys.readouterr().err
    assert member_main(["start", str(setup.dir), "--root-certificates", str(tmp_path / "nope.pem")]) == 3
    assert "ca.pem from the operator" in capsys.readouterr().err
    paths = create_tls(tmp_path / "tls", "test")
    assert member_main(["start", str(setup.dir), "--root-certificates", str(paths.ca_cert), "--device", "tpu"]) == 3
    assert "--device: device 'tpu' is not one of" in capsys.readouterr().err
    assert member_main(["start", str(setup.dir), "--root-certificates", str(paths.ca_cert)]) == 3
    assert "prepare it with `kyodo-member data synth`" in capsys.readouterr().err
    # The ledger key (Ed25519) is no SuperNode key: say so instead of letting Flower fail later.
    setup.auth_key.unlink()
    setup.auth_key.write_bytes(
        serialization.load_pem_private_key(setup.signing_key.read_bytes(), None).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    with pytest.raises(supernode.SetupError, match="not an EC key"):
        supernode.load_auth_key(setup.auth_key)


# ----------------------------------------------------------------------------- the operator's side


def _spend(setup: supernode.MemberSetup, noise_multiplier: float) -> float:
    """One signed ledger entry (25 steps at q 0.08), as the member's node would write it; its epsilon."""
    from privacy.accountant import Mechanism, epsilon
    from privacy.keys import load_or_create_signing_key
    from privacy.ledger import Ledger

    spent = epsilon([Mechanism(noise_multiplier, 0.08, 25)], setup.delta)
    Ledger(Path(setup.state_dir) / "ledger.jsonl", load_or_create_signing_key(setup.signing_key)).append(
        budget=(setup.epsilon, setup.delta), run="r", round=1, member=setup.member, shards=["adapter/emb/so100"],
        mechanism={"noise_multiplier": noise_multiplier, "sample_rate": 0.08, "steps": 25, "clipping_norm": 1.0,
                   "opacus_mode": "bk", "noise_source": "chacha20"},
        dataset_fingerprint="sha256:" + "ab" * 32, epsilon=spent, delta=setup.delta, accountant="rdp",
        decision="full", release="dp-sgd",
    )  # fmt: skip
    return spent


def test_a_resume_names_an_existing_run_that_no_coordinator_is_running(tmp_path, capsys):
    """A mistyped --out-dir would start a new run and spend every member's budget on it; a
    resume of a run that is still going would run its next round twice. Both are refused
    before anything reaches the SuperLink (there is none here)."""
    from coordinator.run_lock import RunInUseError, check_not_running, holding_run

    setup = _member(tmp_path)
    op_dir = tmp_path / "operator"
    assert coordinator_main(["init", str(op_dir), "--model", "tiny"]) == 0
    assert coordinator_main(["add-member", str(op_dir), str(setup.dir / "membership.json")]) == 0
    capsys.readouterr()
    missing = op_dir / "runs" / "2026120-210329"
    assert coordinator_main(["run", str(op_dir), "--out-dir", str(missing), "--wait-members", "0"]) == 3
    out = " ".join(capsys.readouterr().out.split())
    assert f"--out-dir {missing} does not exist, so there is no run to resume there" in out and "--new" in out
    assert not missing.exists(), "nothing was written"
    running = op_dir / "runs" / "20261206-210329"
    running.mkdir(parents=True)
    with holding_run(running):
        with pytest.raises(RunInUseError, match="being run by another coordinator \\(pid "):
            check_not_running(running)
        with pytest.raises(RunInUseError), holding_run(running):
            pass
        assert coordinator_main(["run", str(op_dir), "--out-dir", str(running), "--wait-members", "0"]) == 3
        assert "is being run by another coordinator" in " ".join(capsys.readouterr().out.split())
    check_not_running(running)  # released when the coordinator ends
    # A run directory the coordinator cannot write (a file in its place stands for a read-only
    # mount: tests may run as root) is refused before anything is submitted, without a traceback.
    blocked = op_dir / "runs" / "blocked"
    blocked.write_text("not a directory")
    assert coordinator_main(["run", str(op_dir), "--out-dir", str(blocked), "--wait-members", "0"]) == 3
    said = " ".join(capsys.readouterr().out.split())
    assert f"{blocked} cannot be written (Not a directory)" in said and "Traceback" not in said


def test_a_resume_with_other_model_settings_is_refused_before_anything_is_written(
    tmp_path, capsys, tiny_cfg, monkeypatch
):
    """It was refused only by the submitted ServerApp, after the run directory's config.yaml and
    submitted settings had become the refused ones: the printed resume command failed again,
    and export described the stored tensors with the wrong task_buckets."""
    from coordinator.federation import initial_model
    from coordinator.run_state import RunState
    from shared_model.config import to_yaml

    setup = _member(tmp_path)
    op_dir = tmp_path / "operator"
    assert coordinator_main(["init", str(op_dir), "--model", "tiny"]) == 0
    assert coordinator_main(["add-member", str(op_dir), str(setup.dir / "membership.json")]) == 0
    run = op_dir / "runs" / "20261207-101010"
    RunState(tiny_cfg, run).commit_initial(initial_model(tiny_cfg), {"run": "t"})
    (run / "config.yaml").write_text(to_yaml(tiny_cfg), encoding="utf-8")
    (run / deploy.SUBMITTED_SETTINGS).write_text(json.dumps({"overrides": [], "rounds": 2}), encoding="utf-8")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    argv = ["run", str(op_dir), "--out-dir", str(run), "--wait-members", "0", "model.task_buckets=16"]
    assert coordinator_main(argv) == 3
    said = " ".join(capsys.readouterr().out.split())
    assert (
        "holds rounds of another model config" in said and "model.task_buckets 0 -> 16 since the run's rounds" in said
    )
    assert "a resume goes on with the model the run started with" in said
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before, "nothing was written"
    # init resumes nothing: a run in the working directory's runs/demo is none of its business
    monkeypatch.chdir(tmp_path)
    RunState(tiny_cfg, tmp_path / "runs" / "demo").commit_initial(initial_model(tiny_cfg), {"run": "t"})
    assert coordinator_main(["init", str(tmp_path / "op2"), "--model", "tiny", "model.task_buckets=16"]) == 0


def test_a_member_pins_the_other_members_keys_to_the_published_consortium_file(tmp_path, capsys, tiny_cfg):
    """The identity keys a secure-aggregation round lists for the other members are the
    coordinator's word; a member that trusts the consortium's published file accepts only
    the keys it lists. The file must list this member under its own key."""
    from flwr.common.config import parse_config_args

    from member_node.cli import main as member_main

    sony, honda = _member(tmp_path), _member(tmp_path, name="honda", embodiment="aloha")
    op_dir = tmp_path / "operator"
    assert coordinator_main(["init", str(op_dir), "--model", "tiny"]) == 0
    assert coordinator_main(["add-member", str(op_dir), str(honda.dir / "membership.json")]) == 0
    published = op_dir / "audit-consortium.yaml"
    assert member_main(["trust", str(sony.dir), str(published)]) == 2
    assert "does not list member 'sony' with this node's ledger key" in " ".join(capsys.readouterr().err.split())
    assert supernode.load_setup(sony.dir).consortium_file == "", "nothing changed"
    assert not list(sony.dir.glob("consortium.*")), "nothing left behind"
    # The operator's run configuration beside it is named as the mix-up it is, under its own path.
    assert member_main(["trust", str(sony.dir), str(op_dir / "consortium.yaml")]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "is the operator's run configuration (consortium.yaml)" in said and "use audit-consortium.yaml" in said
    assert ".tmp" not in said and not list(sony.dir.glob("consortium.*"))
    assert coordinator_main(["add-member", str(op_dir), str(sony.dir / "membership.json")]) == 0
    capsys.readouterr()
    assert member_main(["trust", str(sony.dir), str(published)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "accepts only the identity keys of honda, sony (2 in" in said
    assert "it takes effect when the node starts" in said, "a first pin: the SuperNode must start with its path"
    # Fewer than a cohort: said, since the coordinator will leave this member out of every
    # round the others join until it pins a file listing them.
    assert "warning: the file lists 2 member(s); an expert or the shared adapter needs a cohort of 3" in said
    pinned = supernode.load_setup(sony.dir)
    assert Path(pinned.consortium_file) == sony.dir / "consortium.yaml"
    assert member_main(["trust", str(sony.dir), str(published)]) == 0  # again: the node reads it per message
    assert "a running node takes it from its next message" in " ".join(capsys.readouterr().out.split())
    identity = resolve_identity(parse_config_args([supernode.node_config_arg(pinned.node_config())]), tiny_cfg)
    assert identity.consortium_file == pinned.consortium_file


def test_a_member_starts_only_once_the_other_members_keys_are_pinned(tmp_path, capsys, tiny_cfg):
    """Every check secure aggregation makes against a lying coordinator rests on the identity
    keys being the consortium's, not the coordinator's word: a member set up by ``init`` does
    not start until it pins them (or says, in member.yaml, that it will not), and a pinned
    file that no longer lists it under its own key is refused at start, not at a round."""
    from flwr.common.config import parse_config_args

    from member_node.cli import main as member_main
    from member_node.synthetic import generate_dataset

    paths = create_tls(tmp_path / "tls", "test")
    generate_dataset(tmp_path / "data" / "sony", "so100", tiny_cfg.embodiments["so100"], 4, 1.0, seed=1)
    sony = _member(tmp_path, superlink="127.0.0.1:9", root_certificates=paths.ca_cert)
    assert sony.require_pinned_keys, "init's default"
    start = ["start", str(sony.dir), "--dry-run"]
    assert member_main(start) == 3
    err = " ".join(capsys.readouterr().err.split())
    assert "identity keys are not pinned" in err and f"kyodo-member trust {sony.dir} audit-consortium.yaml" in err
    # A SuperNode started by hand with this node config is refused by the node itself.
    node_config = parse_config_args([supernode.node_config_arg(sony.node_config())])
    with pytest.raises(NodeConfigError, match="'require-pinned-keys' is set but no 'consortium-file'"):
        resolve_identity(node_config, tiny_cfg)

    op_dir = tmp_path / "operator"
    assert coordinator_main(["init", str(op_dir), "--model", "tiny"]) == 0
    assert coordinator_main(["add-member", str(op_dir), str(sony.dir / "membership.json")]) == 0
    assert member_main(["trust", str(sony.dir), str(op_dir / "audit-consortium.yaml")]) == 0
    capsys.readouterr()
    assert member_main(start) == 0
    assert "require-pinned-keys=true" in capsys.readouterr().out
    # The pinned copy replaced by another consortium's file: refused, with the fix.
    other = _member(tmp_path / "other", name="sony")
    other_op = tmp_path / "other-operator"
    assert coordinator_main(["init", str(other_op), "--model", "tiny"]) == 0
    assert coordinator_main(["add-member", str(other_op), str(other.dir / "membership.json")]) == 0
    (sony.dir / "consortium.yaml").write_bytes((other_op / "audit-consortium.yaml").read_bytes())
    capsys.readouterr()
    assert member_main(start) == 3
    assert "does not list member 'sony' with this node's ledger key" in " ".join(capsys.readouterr().err.split())
    (sony.dir / "consortium.yaml").unlink()
    assert member_main(start) == 3
    assert "pinned consortium file" in capsys.readouterr().err
    # The member's explicit choice, for debugging: no pins, and start says nothing against it.
    loose = supernode.init_member(
        tmp_path / "loose", member="loose", embodiment="so100", data_dir=tmp_path / "data" / "sony", epsilon=8.0,
        delta=1e-5, superlink="127.0.0.1:9", root_certificates=paths.ca_cert, require_pinned_keys=False,
    )  # fmt: skip
    assert member_main(["start", str(loose.dir), "--dry-run"]) == 0
    assert "require-pinned-keys=false" in capsys.readouterr().out


def test_a_member_changes_its_budget_and_the_operator_publishes_it(tmp_path, capsys):
    from member_node.cli import main as member_main

    setup = _member(tmp_path)
    op_dir = tmp_path / "operator"
    assert coordinator_main(["init", str(op_dir), "--model", "tiny"]) == 0
    assert coordinator_main(["add-member", str(op_dir), str(setup.dir / "membership.json")]) == 0
    before = json.loads((setup.dir / "membership.json").read_text())
    capsys.readouterr()
    assert member_main(["status", "--state-dir", str(setup.dir)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "sony (so100): its node has not run yet, so nothing is spent: budget ε=8 δ=1e-05" in out
    assert member_main(["status", "--state-dir", str(tmp_path / "nowhere")]) == 1
    assert "nowhere: no such directory" in capsys.readouterr().err
    spent = _spend(setup, 0.8)
    assert 2 < spent < 8
    capsys.readouterr()
    # Not below what its signed ledger records, and not another delta once entries exist.
    assert member_main(["budget", str(setup.dir), "--epsilon", str(spent - 0.1)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"below the {spent:.6g} this member's signed ledger already records" in err
    assert member_main(["budget", str(setup.dir), "--delta", "1e-6"]) == 2
    assert "delta stays 1e-05" in capsys.readouterr().err
    assert member_main(["budget", str(setup.dir), "--epsilon", "inf"]) == 2
    assert "budget epsilon must be finite and > 0, got inf" in capsys.readouterr().err
    assert supernode.load_setup(setup.dir).epsilon == 8.0, "a refused change changes nothing"
    assert member_main(["budget", str(setup.dir), "--epsilon", "16", "--budget-rounds", "40"]) == 0
    assert f"ε {spent:.3f} spent" in capsys.readouterr().out
    changed = supernode.load_setup(setup.dir)
    assert (changed.epsilon, changed.budget_rounds) == (16.0, 40)
    after = json.loads((setup.dir / "membership.json").read_text())
    assert after == before | {"epsilon": 16.0}, "the keys stay, the budget changes"
    # Until the node restarts, status shows the budget it runs with and says a new one waits.
    node = {"member": "sony", "embodiment": "so100", "epsilon": 8.0, "delta": 1e-5, "accountant": "rdp",
            "budget_rounds": 0, "public_key": before["ledger_public_key"]}  # fmt: skip
    (Path(setup.state_dir) / "member.json").write_text(json.dumps(node))
    assert member_main(["status", "--state-dir", str(setup.dir), "--plot", str(tmp_path / "e.png")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "budget ε=8" in out and "member.yaml sets ε=16 δ=1e-05 budget-rounds=40; the node takes it" in out
    (Path(setup.state_dir) / "member.json").write_text(json.dumps(node | {"epsilon": 16.0, "budget_rounds": 40}))
    assert member_main(["status", "--state-dir", str(setup.dir), "--plot", str(tmp_path / "e.png")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "budget changed" not in out
    assert "ε=8 δ=1e-05 from release 1" in out and "the node declares ε=16 δ=1e-05 before its next release" in out
    # The operator publishes it; the audit consortium file follows.
    assert coordinator_main(["add-member", str(op_dir), str(setup.dir / "membership.json")]) == 3
    assert "--update" in capsys.readouterr().out
    assert coordinator_main(["add-member", str(op_dir), str(setup.dir / "membership.json"), "--update"]) == 0
    from privacy.audit.consortium import load_consortium as load_audit_consortium

    op = deploy.operator_dir(op_dir)
    assert deploy.load_consortium(op).member("sony").epsilon == 16.0
    assert load_audit_consortium(op.audit_consortium).members["sony"].epsilon == 16.0
    # --update takes a budget only: not a key that was never admitted, nor a member that was not.
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(after | {"ledger_public_key": "cd" * 32}))
    assert coordinator_main(["add-member", str(op_dir), str(forged), "--update"]) == 3
    assert "changes only the budget" in capsys.readouterr().out
    other = _member(tmp_path, "honda", "aloha")
    assert coordinator_main(["add-member", str(op_dir), str(other.dir / "membership.json"), "--update"]) == 3
    assert "admit it first" in capsys.readouterr().out
    # A budget the audit file would refuse admits nobody and writes nothing (it once crashed
    # add-member between consortium.yaml and audit-consortium.yaml).
    published = {f: f.read_bytes() for f in (op.consortium, op.audit_consortium)}
    unbounded = tmp_path / "unbounded.json"
    unbounded.write_text(json.dumps(json.loads((other.dir / "membership.json").read_text()) | {"epsilon": 1e999}))
    assert coordinator_main(["add-member", str(op_dir), str(unbounded)]) == 3
    assert "nothing written" in capsys.readouterr().out
    assert {f: f.read_bytes() for f in published} == published and not (op.members / "honda.pub").exists()
    raised = tmp_path / "raised.json"
    raised.write_text(json.dumps(after | {"epsilon": 1e999}))
    assert coordinator_main(["add-member", str(op_dir), str(raised), "--update"]) == 3
    assert {f: f.read_bytes() for f in published} == published


def test_a_lowered_budget_holds_for_the_running_node_at_its_next_message(tmp_path, capsys, caplog, tiny_cfg):
    """A walkthrough's node, not restarted after `budget`, went on at the epsilon it was started
    with and spent past the budget its member had just published: every audit failed after."""
    from member_node.cli import main as member_main
    from member_node.identity import BUDGET_FILE, NodeConfigError, resolve_identity

    setup = _member(tmp_path)
    # What the running SuperNode hands every message (epsilon 8); pinning is another test's.
    started = setup.node_config() | {"require-pinned-keys": False}
    spent = _spend(setup, 0.8)
    assert member_main(["budget", str(setup.dir), "--epsilon", f"{spent + 0.5:.6f}"]) == 0
    assert "a lower epsilon holds for the running node from its next message" in capsys.readouterr().out
    assert resolve_identity(started, tiny_cfg).epsilon == pytest.approx(spent + 0.5)
    # A raise waits for a restart: only the member's own start widens what a node may spend.
    assert member_main(["budget", str(setup.dir), "--epsilon", "12"]) == 0
    assert resolve_identity(started, tiny_cfg).epsilon == 8.0
    restarted = supernode.load_setup(setup.dir).node_config() | {"require-pinned-keys": False}
    assert resolve_identity(restarted, tiny_cfg).epsilon == 12.0
    # The member's status says which budget the node holds to, and when.
    from member_node.node import MemberNode

    MemberNode(tiny_cfg, resolve_identity(started, tiny_cfg))  # a message answered at epsilon 8
    assert member_main(["budget", str(setup.dir), "--epsilon", "7"]) == 0
    capsys.readouterr()
    assert member_main(["status", "--state-dir", str(setup.dir), "--plot", str(tmp_path / "e.png")]) == 0
    assert "member.yaml sets a lower ε=7: the node holds to it from its next message" in " ".join(
        capsys.readouterr().out.split()
    )
    # `start` says so when the ledger already records more than the budget in member.yaml.
    overspent = supernode.load_setup(setup.dir)
    assert supernode.warn_budget_spent(overspent) == pytest.approx(spent) and "above its budget" not in caplog.text
    overspent.epsilon = spent / 2
    assert supernode.warn_budget_spent(overspent) == pytest.approx(spent)
    assert "above its budget" in caplog.text and "sit every round out" in caplog.text
    # A budget file it cannot read stops the node rather than letting it spend at the old budget.
    (Path(setup.state_dir) / BUDGET_FILE).write_text("{torn", encoding="utf-8")
    with pytest.raises(NodeConfigError, match="unreadable"):
        resolve_identity(started, tiny_cfg)


def test_operator_init_and_run_check_the_published_checkpoint(tmp_path, capsys, tiny_cfg):
    """The checkpoint every run imports is checked against its published hash at init and at
    every submission (the file may have changed in between), before anything starts."""
    from coordinator.federation import initial_model
    from coordinator.public_checkpoint import write_checkpoint

    path = tmp_path / "round0.safetensors"
    digest = write_checkpoint(initial_model(tiny_cfg), path, {})
    wrong = "0" * 64
    op_dir = tmp_path / "operator"
    argv = ["init", str(op_dir), "--model", "tiny", f"public.checkpoint={path}"]
    assert coordinator_main([*argv, f"public.checkpoint_sha256={wrong}"]) == 3
    assert f"has sha256 {digest}, not the published public.checkpoint_sha256 {wrong}" in capsys.readouterr().out
    assert not op_dir.exists()
    assert coordinator_main([*argv, f"public.checkpoint_sha256={digest}"]) == 0
    consortium = deploy.load_consortium(deploy.operator_dir(op_dir))
    assert f"public.checkpoint_sha256={digest}" in consortium.overrides
    deploy.run_config(consortium, tmp_path / "run", None, [], {})  # the published file: accepted
    path.write_bytes(path.read_bytes() + b" ")
    with pytest.raises(deploy.DeployError, match="not the published public.checkpoint_sha256"):
        deploy.run_config(consortium, tmp_path / "run", None, [], {})


def test_a_run_that_cannot_be_continued_is_refused_at_submission_but_not_its_resume(tmp_path, tiny_cfg):
    from coordinator.federation import initial_model
    from coordinator.run_state import RunState

    op_dir = tmp_path / "operator"
    assert coordinator_main(["init", str(op_dir), "--model", "tiny"]) == 0
    consortium = deploy.load_consortium(deploy.operator_dir(op_dir))
    gone = [f"continue_from={tmp_path / 'gone'}"]
    with pytest.raises(deploy.DeployError, match="no committed round there"):
        deploy.run_config(consortium, tmp_path / "run", None, gone, {})
    # Once the run has committed its round 0 it never reads the run it continued again.
    RunState(tiny_cfg, tmp_path / "run").commit_initial(initial_model(tiny_cfg), {"run": "t"})
    deploy.run_config(consortium, tmp_path / "run", None, gone, {})


def test_a_member_that_leaves_is_taken_out_of_runs_and_kept_for_audits(tmp_path, capsys, tiny_cfg):
    from privacy.audit.consortium import load_consortium as load_audit_consortium

    op_dir = tmp_path / "operator"
    assert coordinator_main(["init", str(op_dir), "--model", "tiny", "--port", str(_free_port())]) == 0
    op = deploy.operator_dir(op_dir)
    for name, emb in (("sony", "so100"), ("fanuc", "franka")):
        assert (
            coordinator_main(["add-member", str(op_dir), str(_member(tmp_path, name, emb).dir / "membership.json")])
            == 0
        )
    capsys.readouterr()
    assert coordinator_main(["remove-member", str(op_dir), "fanuc"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "fanuc removed" in said and "unregistered when the SuperLink next starts" in said  # none runs here
    consortium = deploy.load_consortium(op)
    assert [m.name for m in consortium.members] == ["sony"] and [m.name for m in consortium.departed] == ["fanuc"]
    published = load_audit_consortium(op.audit_consortium).members
    assert set(published) == {"sony", "fanuc"} and published["fanuc"].departed and not published["sony"].departed
    # Members pinning that file accept its key no more (it is there for the runs it trained in).
    from member_node.node import _pinned_keys

    sony = supernode.load_setup(tmp_path / "sony")
    _, listed = supernode.trust_consortium(sony.dir, op.audit_consortium)
    assert listed == ["sony"]
    assert set(_pinned_keys(_resolved(supernode.load_setup(sony.dir), tiny_cfg))) == {"sony"}
    assert coordinator_main(["remove-member", str(op_dir), "fanuc"]) == 3
    assert "(it left already); its members: sony" in " ".join(capsys.readouterr().out.split())
    # Its name stays its own: the published ledger key under it is the one its runs are checked against.
    newcomer = _member(tmp_path / "new", "fanuc", "franka")
    assert coordinator_main(["add-member", str(op_dir), str(newcomer.dir / "membership.json")]) == 3
    assert "a member that left the consortium" in " ".join(capsys.readouterr().out.split())


def test_operator_init_add_member_and_run_config(tmp_path, capsys):
    op_dir = tmp_path / "operator"
    assert coordinator_main(["init", str(op_dir), "--model", "tiny", "--rounds", "3", "--port", "9555"]) == 0
    op = deploy.operator_dir(op_dir)
    assert (op.flwr_home / "config.toml").read_text().count("127.0.0.1:9555") == 1
    consortium = deploy.load_consortium(op)
    assert (consortium.model, consortium.rounds, consortium.address) == ("tiny", 3, "127.0.0.1:9555")
    members = [_member(tmp_path, name, emb) for name, emb, _ in TRIO]
    for m in members:
        assert coordinator_main(["add-member", str(op_dir), str(m.dir / "membership.json")]) == 0
    assert coordinator_main(["add-member", str(op_dir), str(members[0].dir / "membership.json")]) == 3
    assert "already in" in capsys.readouterr().out
    # A member without DP (a debugging switch) is published as such: auditors read that no
    # budget holds for it, where it had published a budget its node never kept.
    open_member = _member(tmp_path, "debug", "so100", dp=False)
    assert json.loads((open_member.dir / "membership.json").read_text())["dp"] is False
    assert coordinator_main(["add-member", str(op_dir), str(open_member.dir / "membership.json")]) == 0
    from privacy.audit.consortium import load_consortium as load_published

    published = load_published(op.audit_consortium).members
    assert not published["debug"].dp and all(published[name].dp for name, _, _ in TRIO)
    assert coordinator_main(["remove-member", str(op_dir), "debug"]) == 0
    capsys.readouterr()
    assert coordinator_main(["add-member", str(op_dir), str(tmp_path / "sony-membership.json")]) == 3
    assert "sony-membership.json not found" in " ".join(capsys.readouterr().out.split())
    assert coordinator_main(["log", str(op_dir)]) == 3
    assert "no run submitted from" in capsys.readouterr().out
    assert coordinator_main(["log", str(op_dir), "x1"]) == 3
    assert "'x1' is neither a Flower run id (a number) nor the directory of a run" in capsys.readouterr().out
    # A run is named by its Flower id or by the directory `status` takes; none: the newest.
    submissions = [{"run_id": 11, "out_dir": str(tmp_path / "r1")}, {"run_id": 12, "out_dir": str(tmp_path / "r2")}]
    (op.root / "runs.jsonl").write_text("".join(json.dumps(s) + "\n" for s in submissions))
    assert deploy.log_run_ids(op, str(tmp_path / "r1")) == ["11"]
    assert deploy.log_run_ids(op, None) == ["12"] and deploy.log_run_ids(op, "7") == ["7"]
    # A run resumed after a stop or a crash is one submission per resume: its log is all of them.
    resumed = [*submissions, {"run_id": 13, "out_dir": str(tmp_path / "r1")}]
    (op.root / "runs.jsonl").write_text("".join(json.dumps(s) + "\n" for s in resumed))
    assert deploy.log_run_ids(op, str(tmp_path / "r1")) == ["11", "13"] == deploy.log_run_ids(op, None)
    assert deploy.log_run_ids(op, "11") == ["11"] and deploy.log_run_ids(op, str(tmp_path / "r2")) == ["12"]
    # The directory's name alone, as `ls runs/` shows it, names the run too.
    assert deploy.log_run_ids(op, "r1") == ["11", "13"] and deploy.submitted_run_dir(op, "r2") == tmp_path / "r2"
    # A run directory under the operator directory, passed where the operator directory goes.
    run_dir = op.root / "runs" / "20261207-134644"
    assert deploy.split_run_argument(run_dir, None) == (op.root, str(run_dir))
    assert deploy.split_run_argument(op.root, None) == (op.root, None)
    consortium = deploy.load_consortium(op)
    assert [m.name for m in consortium.members] == ["honda", "sony", "softbank"]
    assert (op.members / "sony.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    from privacy.audit.consortium import load_consortium as load_audit_consortium

    audit = load_audit_consortium(op.audit_consortium)  # what kyodo-audit verify --consortium reads
    assert (
        audit.members["sony"].public_key
        == json.loads((members[1].dir / "membership.json").read_text())["ledger_public_key"]
    )
    assert (audit.members["sony"].epsilon, audit.members["sony"].delta) == (8.0, 1e-5)
    registered = {"honda": "12345678901234567890", "sony": "7"}  # softbank not registered yet
    consortium.members[1].epsilon = 2.5  # as sony published it
    config = deploy.run_config(consortium, tmp_path / "run", None, ["train.local_steps=5"], registered)
    from shared_model.config import config_from_run_config

    cfg = config_from_run_config(config)
    assert cfg.train.rounds == 3 and cfg.train.local_steps == 5 and cfg.out_dir == str(tmp_path / "run")
    assert [(m.name, m.embodiment) for m in cfg.federation.members] == [(n, e) for n, e, _ in TRIO]
    # Each member is pinned to its registration and ledger key: no registered node can answer as another.
    assert [m.node_id for m in cfg.federation.members] == [12345678901234567890, 7, 0]
    assert [m.ledger_public_key for m in cfg.federation.members] == [m.ledger_public_key for m in consortium.members]
    # The published budgets travel too: the coordinator warns of a node that holds a larger one.
    assert [(m.epsilon, m.delta) for m in cfg.federation.members] == [(8.0, 1e-5), (2.5, 1e-5), (8.0, 1e-5)]
    cmd = deploy.superlink_command(op, consortium)
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation", "--database"):
        assert flag in cmd
    assert "--insecure" not in cmd
    assert coordinator_main(["run", str(op_dir), "train.nope=1"]) == 3
    assert "train.nope" in capsys.readouterr().out
    # Inside the app directory the operator's files would travel in the app bundle.
    with pytest.raises(deploy.DeployError, match="inside the app directory"):
        deploy.init_operator(REPO / "runs" / "operator-test")


def test_a_resubmitted_run_keeps_the_settings_it_was_first_submitted_with(tmp_path):
    out = tmp_path / "run"
    assert deploy.resubmitted(out, None, ["train.lr=0.01"]) == (None, ["train.lr=0.01"])  # a new run
    out.mkdir()
    (out / deploy.SUBMITTED_SETTINGS).write_text(json.dumps({"overrides": ["train.lr=0.01", "x=1"], "rounds": 4}))
    assert deploy.resubmitted(out, None, []) == (4, ["train.lr=0.01", "x=1"])
    assert deploy.resubmitted(out, 6, ["x=2"]) == (6, ["train.lr=0.01", "x=1", "x=2"])  # later ones win
    (out / deploy.SUBMITTED_SETTINGS).write_text("[1]")
    with pytest.raises(deploy.DeployError, match="not a submission's settings"):
        deploy.resubmitted(out, None, [])


def test_superlink_start_refuses_a_busy_port(tmp_path, capsys):
    op_dir = tmp_path / "operator"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        deploy.init_operator(op_dir, model="tiny", port=port)
        assert coordinator_main(["start", str(op_dir)]) == 3
    assert "another SuperLink or program holds it" in capsys.readouterr().out
    op = deploy.operator_dir(op_dir)
    op.tls.server_cert.unlink()
    assert coordinator_main(["start", str(op_dir)]) == 3
    out = capsys.readouterr().out
    assert "server certificate" in out and "does not exist" in out
    # Nothing listens: retried with backoff for the timeout, then a message that says what to do.
    with pytest.raises(deploy.DeployError, match="start it with `kyodo-coordinator start"):
        deploy.require_superlink(op, deploy.load_consortium(op), timeout=1.5)


def test_coordinator_status_of_a_run_directory(tmp_path, capsys, tiny_cfg):
    from coordinator.federation import initial_model
    from coordinator.records import append_record
    from coordinator.run_state import RunState

    run = tmp_path / "run"
    state = RunState(tiny_cfg, run)
    model = initial_model(tiny_cfg)
    state.commit_initial(model, {"run": "t"})
    initial = {"source": "public-checkpoint", "sha256": "sha256:" + "ab" * 32}
    append_record(
        run,
        {
            "round": 0, "initial": initial, "evaluation": {"sony": {"action_mse": 0.2}},
            "evaluation_withheld": {"honda": "privacy budget exhausted"},
        },
    )  # fmt: skip
    name = next(n for n in model if n.startswith("adapters.so100."))
    model[name] = model[name] + 1
    state.commit_round(1, model, ["adapter/emb/so100"], {}, {"run": "t"})
    append_record(
        run,
        {
            "round": 1, "cohorts": {"adapter/emb/so100": ["sony"], "expert/L0/E1": ["sony", "softbank"]},
            "aggregation": {"adapter/emb/so100": "single"},
            "train": {"sony": {"steps": 5}}, "declined": {"honda": "no budget"},
            # "failed" names members and shards alike
            "failed": {"softbank": "share_keys error 5: Node Unavailable", "expert/L0/E1": "1 of 2 shared keys"},
            "receipts": {"sony": {"epsilon": 1.25}},
            "ledger_heads": {"sony": {"epsilon": 1.25}, "honda": {"epsilon": 7.25, "time": "2026-11-30T00:00:00"}},
            "evaluation": {"sony": {"action_mse": 0.1, "receipt": json.dumps({"epsilon": 1.5})}},
            "sync_bytes": {"sony": 10, "honda": 10}, "seconds": 3.0,
            "absent": {"fanuc": "its node was not connected when the round began"},
        },
    )  # fmt: skip
    (run / "config.yaml").write_text("train:\n  rounds: 3\n")
    assert coordinator_main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    # A run that stopped short, however it stopped (a SuperLink crash reads like a stop in its
    # log), says so and how to go on.
    said = " ".join(out.split())
    assert "not running: no coordinator holds it, and its last committed round is round 1 of 3 planned" in said
    assert f"kyodo-coordinator run {run} --out-dir {run}" in said
    from coordinator.run_lock import holding_run

    with holding_run(run):
        assert coordinator_main(["status", str(run)]) == 0
        said = " ".join(capsys.readouterr().out.split())
        assert f"running now: a coordinator holds it (pid {os.getpid()}, since " in said
        assert "not running" not in said and "asked to stop" not in said
        from coordinator.stop_request import clear_stop_request, request_stop

        request_stop(run)  # kyodo-coordinator stop, whose wait ran out before the round in flight ended
        assert coordinator_main(["status", str(run)]) == 0
        said = " ".join(capsys.readouterr().out.split())
        assert "asked to stop at " in said and "it ends once the round in flight is committed" in said
        clear_stop_request(run)
    (run / "config.yaml").write_text("train:\n  rounds: 1\n")
    assert coordinator_main(["status", str(run)]) == 0
    assert "finished: all 1 planned rounds committed" in " ".join(capsys.readouterr().out.split())
    assert coordinator_main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    # epsilon after the member's newest receipt: the evaluation released after its training
    assert "HEAD" in out and "adapter/emb/so100" in out and "1.500" in out
    # honda only declined here: its epsilon is that of the receipt of an earlier run the
    # coordinator held, and why it sat out is said
    assert "7.250" in out and "why members were absent, sat out or failed" in out
    said = " ".join(out.split())
    assert "fanuc 1 absent its node was not connected when the round began" in said
    assert any(line.replace("│", " ").split()[:2] == ["fanuc", "-"] for line in out.splitlines())
    assert any(line.split() == ["honda", "1", "declined", "no", "budget"] for line in out.splitlines())
    assert any(
        line.split() == ["honda", "0", "no", "eval", "privacy", "budget", "exhausted"] for line in out.splitlines()
    )
    assert "…" not in out, "at 80 columns (a pipe) no cell is cut"
    # A shard the round could not update says why in the cohorts table, not as a member.
    assert "not updated: 1 of 2 shared keys" in " ".join(out.split())
    assert any(line.split()[:3] == ["softbank", "1", "failed"] for line in out.splitlines())
    assert not any(line.split()[:1] == ["expert/L0/E1"] and "failed" in line for line in out.splitlines())
    assert "round 0: public checkpoint sha256:" + "ab" * 32 in " ".join(out.split())
    # After gc, round 0 was still committed: its manifest is gone, not its commit.
    assert coordinator_main(["gc", str(run), "--keep-last", "1"]) == 0
    capsys.readouterr()
    assert coordinator_main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "yes (gc)" in out, out
    # What changed at HEAD, and when each shard last changed, died with round 0's manifest: said so.
    said = " ".join(out.split())
    assert "gc removed those before round 1" in said and "? (gc)" in said
    rows = [line.replace("│", " ").split() for line in out.splitlines()]
    assert ["adapter/emb/so100", "1+", "round", "<=", "1"] in [row[:5] for row in rows]
    assert coordinator_main(["status", str(tmp_path / "nowhere")]) == 2
    assert coordinator_main(["status", str(run), "--round", "9"]) == 2
    assert "has no round 9 (its rounds: 0, 1)" in " ".join(capsys.readouterr().out.split())
    # The operator directory stands for its newest run.
    op_dir = tmp_path / "operator"
    assert coordinator_main(["init", str(op_dir), "--model", "tiny"]) == 0
    assert coordinator_main(["status", str(op_dir)]) == 2
    assert "no run submitted from" in capsys.readouterr().out
    # A SuperLink started again after a crash names the newest run if it stopped short.
    op = deploy.operator_dir(op_dir)
    assert deploy.unfinished_run(op) is None
    (op.root / "runs.jsonl").write_text(json.dumps({"run_id": 5, "out_dir": str(run)}) + "\n")
    assert deploy.unfinished_run(op) is None, "all its planned rounds are committed"
    (run / "config.yaml").write_text("train:\n  rounds: 3\n")
    run_dir, progress = deploy.unfinished_run(op)
    assert run_dir == run and (progress.head, progress.planned, progress.holder) == (1, 3, None)
    with holding_run(run):
        assert deploy.unfinished_run(op) is None, "a coordinator still runs it"
    (op_dir / "runs.jsonl").write_text(json.dumps({"run_id": 3, "out_dir": str(run)}) + "\n")
    assert coordinator_main(["status", str(op_dir)]) == 0
    out = capsys.readouterr().out
    assert f"newest run: {run}" in out and "yes (gc)" in out
    # Given the operator directory, each member's spend stands against the budget it published.
    from privacy.audit.consortium import Consortium, Member, dump_consortium

    published = Member(name="honda", public_key="ab" * 32, epsilon=8.0, delta=1e-5)
    dump_consortium(Consortium(members={"honda": published}), op.audit_consortium)
    assert coordinator_main(["status", str(op_dir)]) == 0
    assert "7.250/8" in capsys.readouterr().out
    op.audit_consortium.write_text("members: [", encoding="utf-8")  # damaged: the run is still shown
    assert coordinator_main(["status", str(op_dir)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "published budgets not shown" in out and "7.250" in out and "7.250/8" not in out
    # The Flower run id `run` printed names the same run; one this directory never submitted, or
    # a run id after a run directory, is refused with the reason.
    assert coordinator_main(["status", str(op_dir), "3"]) == 0
    assert f"run: {run}" in capsys.readouterr().out
    assert coordinator_main(["status", str(op_dir), "4"]) == 2
    assert "run id 4 was not submitted from" in " ".join(capsys.readouterr().out.split())
    assert coordinator_main(["status", str(run), "3"]) == 2
    assert "is not an operator directory" in " ".join(capsys.readouterr().out.split())


def test_status_of_a_run_stopped_before_its_round_zero_record_names_its_source(tmp_path, capsys, tiny_cfg):
    from coordinator.federation import initial_model
    from coordinator.run_state import RunState

    run = tmp_path / "run"
    initial = {"source": "init", "init_seed": 7}
    RunState(tiny_cfg, run).commit_initial(initial_model(tiny_cfg), {"run": "t", "initial": json.dumps(initial)})
    assert coordinator_main(["status", str(run)]) == 0  # no rounds.jsonl yet: the manifest says it
    assert "round 0: random initialisation (model.init_seed 7)" in capsys.readouterr().out


def test_status_of_a_round_committed_but_not_yet_evaluated_shows_who_trained_it(tmp_path, capsys, tiny_cfg):
    """rounds.jsonl gets a round's line after the committed model is evaluated; until then the
    manifest's record says who trained (a walkthrough saw every member at 0 rounds trained)."""
    from coordinator.federation import initial_model
    from coordinator.run_state import RunState
    from shared_model.store import ROUND_RECORD_KEY

    run = tmp_path / "run"
    state = RunState(tiny_cfg, run)
    model = initial_model(tiny_cfg)
    state.commit_initial(model, {"run": "t"})
    record = {"round": 1, "cohorts": {"adapter/emb/so100": ["sony"]}, "train": {"sony": {"steps": 5}}}
    state.commit_round(1, model, ["adapter/emb/so100"], {}, {"run": "t", ROUND_RECORD_KEY: json.dumps(record)})
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"rounds": 3}}))
    assert coordinator_main(["status", str(run)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(HEAD: round 1 of 3 planned)" in out
    assert "round 1: committed, its held-out errors not yet in" in out
    assert "│ sony │ T │ 1 │" in out  # participation: trained round 1, one round in all


# ----------------------------------------------------------------------------- end to end (slow)


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc): Flower starts some helpers in sessions of
    their own (the SuperLink's SuperExec), which a process-group signal does not reach."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Proc:
    """A process in its own process group, output to a log file; stopped with everything it started."""

    def __init__(self, name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.cmd = name, cmd
        self.log = log_dir / f"{name}.log"
        self._fh = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        # CI runs .venv/bin/python without activating the venv: put its bin first on PATH, as a
        # user's shell would, for the Flower executables started directly here.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = {**os.environ, "PATH": path, "FLWR_TELEMETRY_ENABLED": "0", **(env or {})}
        self.popen = subprocess.Popen(
            cmd, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO, env=env
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, grace: float = 30.0) -> None:
        """Signal the whole group; after ``grace`` seconds SIGKILL the group and any descendant
        that left it. SIGKILL as ``sig`` is a crash: nothing gets to clean up."""
        descendants = _descendants(self.popen.pid)
        with contextlib.suppress(ProcessLookupError):
            if self.alive():
                os.killpg(self.popen.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(timeout=grace)
        for pid in descendants:  # ClientApps, the ServerApp, SuperExec helpers
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)
        if not self._fh.closed:
            self._fh.close()


@pytest.fixture(scope="module")
def procs() -> Iterator[list[Proc]]:
    """Every process the deployment test starts; all stopped at the end, whatever happened."""
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop(grace=20)


def _cli(module: str, *args: str, timeout: float = 300) -> str:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env
    )
    assert proc.returncode == 0, f"{module} {args}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc.stdout


def _wait_for(what: str, predicate, timeout: float, poll: float = 0.5, procs: list[Proc] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            assert p.alive(), f"{p.name} exited while waiting for {what}:\n{p.output()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(poll)


def _ledger_rounds(setup: supernode.MemberSetup) -> list[int]:
    """Rounds the member started training (its held-out error releases are entries too)."""
    path = Path(setup.state_dir) / "ledger.jsonl"
    if not path.is_file():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e["round"] for e in entries if e.get("release", "dp-sgd") == "dp-sgd"]


def _head(out_dir: Path) -> int | None:
    from shared_model.store import ShardStore

    if not (out_dir / "store" / "HEAD").is_file():
        return None
    head = ShardStore(out_dir / "store").head()
    return head.round if head else None


# The scenario runs in the setup of whichever slow test comes first: allow it more than make
# test's per-test 900 s on a loaded 2-core machine (measured times are in the module's report).
def slow(test):
    return pytest.mark.slow(pytest.mark.timeout(2400)(test))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, procs):
    """The whole scenario (see the module docstring); returns what the tests check."""
    times: dict[str, float] = {}
    t0 = time.monotonic()
    root = tmp_path_factory.mktemp("deploy")
    logs = root / "logs"
    logs.mkdir()
    port = _free_port()
    op_dir = root / "operator"
    _cli("coordinator.cli", "init", str(op_dir), "--model", "tiny", "--rounds", "2", "--port", str(port),
         "train.local_steps=5")  # fmt: skip
    op = deploy.operator_dir(op_dir)
    ca = str(op.tls.ca_cert)
    # Members set themselves up (in parallel: each CLI start imports torch).
    setups: dict[str, supernode.MemberSetup] = {}
    jobs = []
    for name, emb, seed in TRIO:
        data = root / "data" / name
        jobs.append(subprocess.Popen(
            [sys.executable, "-m", "member_node.cli", "data", "synth", "--embodiment", emb, "--episodes", "20",
             "--seed", str(seed), "--out", str(data)], cwd=REPO, stdout=subprocess.DEVNULL,
        ))  # fmt: skip
        jobs.append(subprocess.Popen(
            [sys.executable, "-m", "member_node.cli", "init", str(root / name), "--member", name, "--embodiment", emb,
             "--data", str(data), "--epsilon", "8", "--delta", "1e-5", "--superlink", f"127.0.0.1:{port}",
             "--root-certificates", ca], cwd=REPO, stdout=subprocess.DEVNULL,
        ))  # fmt: skip
    assert [j.wait(timeout=300) for j in jobs] == [0] * len(jobs)
    for name, _, _ in TRIO:
        _cli("coordinator.cli", "add-member", str(op_dir), str(root / name / "membership.json"))
    # A fourth member, admitted, registered at start, its node up, and gone before the run: the
    # run must not wait for it, and its node must say why it ended.
    leaver_data = root / "data" / "leaver"
    _cli("member_node.cli", "data", "synth", "--embodiment", "franka", "--episodes", "8", "--seed", "44",
         "--out", str(leaver_data))  # fmt: skip
    supernode.init_member(
        root / "leaver", member="leaver", embodiment="franka", data_dir=leaver_data, epsilon=8,
        delta=1e-5, superlink=f"127.0.0.1:{port}", root_certificates=ca, require_pinned_keys=False,
    )  # fmt: skip
    _cli("coordinator.cli", "add-member", str(op_dir), str(root / "leaver" / "membership.json"))
    for name, _, _ in TRIO:  # each member pins the others' keys to the file the operator publishes
        assert member_main(["trust", str(root / name), str(op.audit_consortium)]) == 0
        setups[name] = supernode.load_setup(root / name)
        assert setups[name].consortium_file and setups[name].require_pinned_keys
    times["setup"] = time.monotonic() - t0

    def start_superlink(tag: str) -> Proc:
        link = Proc(f"superlink-{tag}", [sys.executable, "-m", "coordinator.cli", "start", str(op_dir)], logs)
        procs.append(link)
        _wait_for("the SuperLink", lambda: "SuperLink ready" in link.output(), 180, procs=[link])
        return link

    def start_member(name: str, tag: str = "") -> Proc:
        node = Proc(f"{name}{tag}", [sys.executable, "-m", "member_node.cli", "start", str(root / name)], logs)
        procs.append(node)
        return node

    t = time.monotonic()
    link = start_superlink("1")
    left = {"registered": json.loads(op.registered.read_text())}
    leaver = start_member("leaver")
    _wait_for("the leaver's node", lambda: "SuperNode ID" in leaver.output(), 180, procs=[leaver])
    left["said"] = _cli("coordinator.cli", "remove-member", str(op_dir), "leaver")
    left["node code"], left["node said"] = leaver.wait(timeout=180), leaver.output()
    left["registered after"] = json.loads(op.registered.read_text())
    left["nodes after"] = deploy.flwr_cli(op, "supernode", "list", deploy.CONNECTION).get("nodes", [])
    nodes = {name: start_member(name) for name, _, _ in TRIO}
    out_dir = root / "run"
    # An override of this submission only: the resumed run must keep it without being told again.
    left["run said"] = _cli(
        "coordinator.cli",
        "run",
        str(op_dir),
        "--out-dir",
        str(out_dir),
        "--new",
        "--wait-members",
        "180",
        "train.lr=0.0042",
    )
    run_ids = [json.loads(line)["run_id"] for line in (op_dir / "runs.jsonl").read_text().splitlines()]
    times["start + submit"] = time.monotonic() - t

    # Refusals, while round 1 runs. An unregistered key, through the member's own CLI.
    supernode.init_member(
        root / "stranger", member="stranger", embodiment="so100", data_dir=root / "data" / "sony", epsilon=8,
        delta=1e-5, superlink=f"127.0.0.1:{port}", root_certificates=ca, require_pinned_keys=False,
    )  # fmt: skip
    refused = {"unregistered": start_member("stranger")}
    # An impostor: claims to be sony (sony's node config) with a key of its own, straight to Flower.
    impostor_key = root / "impostor" / "key"
    supernode.create_auth_key(impostor_key)
    impostor = supernode.MemberSetup(
        **{**setups["sony"].to_dict(), "state_dir": str(root / "impostor" / "state"), "runtime_port": _free_port()},
        dir=root / "sony",
    )
    cmd = supernode.supernode_command(impostor, impostor.runtime_port)
    cmd[cmd.index("--auth-supernode-private-key") + 1] = str(impostor_key)
    refused["impostor"] = Proc("impostor", cmd, logs, env={"FLWR_HOME": str(root / "impostor" / "flwr-home")})
    procs.append(refused["impostor"])
    # A client that does not trust the consortium CA (it pins another one), straight to Flower.
    other_ca = root / "other-ca.pem"
    other_ca.write_bytes(make_ca("other")[1].public_bytes(serialization.Encoding.PEM))
    untrusting = supernode.MemberSetup(
        **{**setups["honda"].to_dict(), "root_certificates": str(other_ca)}, dir=root / "honda"
    )
    refused["untrusting"] = Proc(
        "untrusting", supernode.supernode_command(untrusting, _free_port()), logs,
        env={"FLWR_HOME": str(root / "untrusting-home")},
    )  # fmt: skip
    procs.append(refused["untrusting"])
    codes = {k: p.wait(timeout=180) for k, p in refused.items()}

    # Sony is stopped once it has started round 1 (its ledger entry is written first) and restarted.
    t = time.monotonic()
    _wait_for("sony to start round 1", lambda: 1 in _ledger_rounds(setups["sony"]), 900, procs=[link])
    nodes["sony"].stop(signal.SIGTERM)
    times["member stop"] = time.monotonic() - t
    nodes["sony"] = start_member("sony", "-restarted")

    # The coordinator dies (SIGKILL of the SuperLink's group: its ServerApp too) after round 1 is committed.
    t = time.monotonic()
    _wait_for("round 1 to be committed", lambda: (_head(out_dir) or 0) >= 1, 900, procs=[link])
    times["round 0+1"] = time.monotonic() - t0 - times["setup"] - times["start + submit"]
    link.stop(signal.SIGKILL)
    head_at_kill = _head(out_dir)
    t = time.monotonic()
    link = start_superlink("2")
    _cli("coordinator.cli", "run", str(op_dir), "--out-dir", str(out_dir), "--wait-members", "180", "--wait",
         "--timeout", "900")  # fmt: skip
    times["restart + resumed round 2"] = time.monotonic() - t
    assert "lr: 0.0042" in (out_dir / "config.yaml").read_text(), "the resume kept the first submission's override"
    run_ids = [json.loads(line)["run_id"] for line in (op_dir / "runs.jsonl").read_text().splitlines()]
    status = deploy.run_status(op, run_ids[-1])
    server_log = _cli("coordinator.cli", "log", str(op_dir), run_ids[-1])
    times["total"] = time.monotonic() - t0
    print("deployment wall times (s):", {k: round(v, 1) for k, v in times.items()})
    return {
        "root": root, "op": op, "out_dir": out_dir, "setups": setups, "nodes": nodes, "link": link,
        "refused": refused, "codes": codes, "head_at_kill": head_at_kill, "status": status, "run_ids": run_ids,
        "times": times, "server_log": server_log, "left": left,
    }  # fmt: skip


@slow
def test_the_deployed_run_completes_and_commits_two_rounds(deployment):
    from coordinator.records import read_records
    from shared_model.store import ShardStore

    out_dir = deployment["out_dir"]
    assert deployment["status"] == "finished:completed"
    assert "round 2" in deployment["server_log"], deployment["server_log"][-3000:]  # kyodo-coordinator log
    assert ShardStore(out_dir / "store").head().round == 2
    records = read_records(out_dir)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert set(records[2]["train"]) == {"honda", "sony", "softbank"}, (records[2]["failed"], records[2]["declined"])
    assert records[2]["secure_aggregation"] is True and records[2]["absent"] == {}
    assert all(v in ("secagg", "single") for v in records[2]["aggregation"].values())
    # The run pinned every member to its registration (so it held against a node naming another).
    members = yaml.safe_load((out_dir / "config.yaml").read_text())["federation"]["members"]
    registered = json.loads(deployment["op"].registered.read_text())
    assert {m["name"]: str(m["node_id"]) for m in members} == registered
    assert all(len(m["ledger_public_key"]) == 64 for m in members)
    # The operator's key signed every committed round; the auditors' consortium file publishes it.
    from privacy.audit.consortium import load_consortium as load_audit_consortium
    from privacy.round_signature import round_signature_problem

    published = load_audit_consortium(deployment["op"].audit_consortium).coordinator_public_key
    run_id = json.loads((out_dir / "run.json").read_text())["run"]
    store = ShardStore(out_dir / "store")
    for r in records:
        digest = store.manifest(r["round"]).digest
        assert r["coordinator"]["record"], "the signature covers the whole line, evaluation included"
        assert round_signature_problem(r.get("coordinator"), run_id, r["round"], digest, published, r) is None, r


@slow
def test_members_ledgers_verify_and_count_each_round_once(deployment):
    from privacy.keys import load_public_key
    from privacy.ledger import Ledger, verify_chain

    status = {
        name: subprocess.Popen(
            # the member's own directory: what it knows (the state directory is inside it)
            [sys.executable, "-m", "member_node.cli", "status", "--state-dir", str(setup.dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )  # fmt: skip
        for name, setup in deployment["setups"].items()
    }
    for name, setup in deployment["setups"].items():
        meta = json.loads((Path(setup.state_dir) / "member.json").read_text())
        ledger = Ledger(Path(setup.state_dir) / "ledger.jsonl")
        assert verify_chain(ledger.entries(), load_public_key(meta["public_key"])) == [], name
        entries = ledger.releases()
        trained = [e["round"] for e in entries if e["release"] == "dp-sgd"]
        evaluated = [e["round"] for e in entries if e["release"] == "evaluation"]
        assert trained == [1, 2], name
        # held-out errors are private releases too: the initial and the final ones at least
        # (round 1's may be lost with the killed coordinator), each at most once
        assert evaluated in ([0, 1, 2], [0, 2]), (name, evaluated)
        assert len({e["run"] for e in entries}) == 1, "the resumed run is the same run"
        assert entries[-1]["epsilon"] <= 8.0
        out, _ = status[name].communicate(timeout=300)
        assert status[name].returncode == 0 and "NOT verified" not in out, out


@slow
def test_a_member_that_left_is_unregistered_and_stays_auditable(deployment):
    from privacy.audit.consortium import load_consortium as load_audit_consortium

    left, op = deployment["left"], deployment["op"]
    node = left["registered"]["leaver"]
    said = " ".join(left["said"].split())
    assert "member leaver removed" in said and "SuperNode key is unregistered." in said
    assert "leaver" not in left["registered after"] and set(left["registered after"]) == {n for n, _, _ in TRIO}
    assert {str(n["node-id"]): n["status"] for n in left["nodes after"]}[node] == "unregistered"
    # Its own node, up until then, ends saying why, and what to keep.
    assert left["node code"] == 3, left["node said"][-2000:]
    node_said = " ".join(left["node said"].split())
    assert "most likely the operator removed this member from the consortium" in node_said
    assert "auditors of the runs this member trained in need a copy of it" in node_said
    consortium = deploy.load_consortium(op)
    assert consortium.member("leaver") is None and [m.name for m in consortium.departed] == ["leaver"]
    assert "leaver" in load_audit_consortium(op.audit_consortium).members  # its ledger key stays published
    assert "leaver" not in left["run said"], "the run neither waits for nor names a member that left"


@slow
def test_refused_nodes_never_joined(deployment):
    refused, codes = deployment["refused"], deployment["codes"]
    assert codes["unregistered"] == 3
    assert "it is not registered" in refused["unregistered"].output()
    assert codes["impostor"] != 0 and "Failed to activate SuperNode" in refused["impostor"].output()
    assert codes["untrusting"] != 0 and "CERTIFICATE_VERIFY_FAILED" in refused["untrusting"].output()
    from coordinator.records import read_records

    for record in read_records(deployment["out_dir"]):
        assert "stranger" not in json.dumps(record)


@slow
def test_a_restarted_member_rejoins_and_a_restarted_coordinator_resumes(deployment):
    from coordinator.records import read_records

    out_dir = deployment["out_dir"]
    assert deployment["head_at_kill"] in (1, 2)  # killed right after round 1 was committed
    assert len(deployment["run_ids"]) == 2  # the resubmitted run picked up the same run directory
    records = read_records(out_dir)
    assert "sony" in records[2]["train"], "the restarted member trained again"
    assert deployment["nodes"]["sony"].alive() and "SuperNode ID" in deployment["nodes"]["sony"].output()
    for name in ("honda", "softbank"):
        assert deployment["nodes"][name].alive(), f"{name} survived the SuperLink restart"
    print("wall times (s):", {k: round(v, 1) for k, v in deployment["times"].items()})


@slow
def test_a_stopped_run_ends_and_frees_its_directory_for_a_resume(deployment):
    from coordinator.run_lock import RunInUseError, check_not_running
    from coordinator.run_status import head_round
    from coordinator.stop_request import STOP_REQUEST_FILE, request_stop

    op_dir, out = deployment["op"].root, deployment["root"] / "stopped"

    def coordinator_holds_it() -> bool:
        try:
            check_not_running(out)
        except RunInUseError:
            return True
        return False

    def submitted(*extra: str) -> subprocess.Popen:
        # Submitted with --wait from another terminal: it must say the run was stopped, not failed.
        return subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "run", str(op_dir), "--out-dir", str(out), *extra,
             "--wait-members", "60", "--wait", "--timeout", "900"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
        )  # fmt: skip

    # By default the run ends once the round in flight is committed: stopped in the middle of
    # secure aggregation, a round whose masked updates already left would be lost to every
    # member's budget (each node masks a round's update once and declines it on resume).
    waiting = submitted("--new", "--rounds", "4")
    _wait_for("the ServerApp to hold the run directory", coordinator_holds_it, 300, procs=[deployment["link"]])
    run_id = json.loads((op_dir / "runs.jsonl").read_text().splitlines()[-1])["run_id"]
    said = _cli("coordinator.cli", "stop", str(op_dir), str(out))
    assert deploy.run_status(deployment["op"], str(run_id)) == "finished:completed"
    check_not_running(out)
    head = head_round(out)
    assert head is not None and head < 4, head
    assert f"run {run_id}: finished:completed" in said and f"round {head} is its last committed round" in said, said
    assert f"kyodo-coordinator run {op_dir} --out-dir {out}" in said, said
    waited, _ = waiting.communicate(timeout=300)
    assert waiting.returncode == 1 and f"it stopped after round {head} of 4 as the operator asked" in waited, waited
    again = _cli("coordinator.cli", "stop", str(op_dir), str(run_id))
    assert "had already ended (finished:completed): nothing to stop" in again, again
    assert not (out / STOP_REQUEST_FILE).exists(), "a stop that found its run ended leaves no request behind"
    shown = _cli("coordinator.cli", "status", str(out))
    assert "source not recorded" not in shown, shown
    print("stopped run:", said, shown)
    # --now stops it wherever it is (flwr stop); a request a stop left behind after its run
    # ended does not end the resume at once.
    request_stop(out)
    waiting = submitted()
    _wait_for("the resumed ServerApp to hold the run directory", coordinator_holds_it, 300, procs=[deployment["link"]])
    assert not (out / STOP_REQUEST_FILE).exists()
    run_id = json.loads((op_dir / "runs.jsonl").read_text().splitlines()[-1])["run_id"]
    said = _cli("coordinator.cli", "stop", str(op_dir), str(out), "--now")
    assert deploy.run_status(deployment["op"], str(run_id)) == "finished:stopped"
    check_not_running(out)
    assert f"run {run_id}: finished:stopped" in said, said
    waited, _ = waiting.communicate(timeout=300)
    assert waiting.returncode == 1 and "it was stopped (kyodo-coordinator stop" in waited, waited
    assert f"--out-dir {out}" in waited and "the SuperLink running again" not in waited, waited
    # A resume of a run whose every round is committed trains nothing, and says so.
    finished = _cli("coordinator.cli", "run", str(op_dir), "--out-dir", str(deployment["out_dir"]),
                    "--wait-members", "60", "--wait", "--timeout", "600")  # fmt: skip
    assert "nothing was trained: every planned round" in finished, finished


def test_stop_names_a_run_this_operator_submitted(tmp_path, capsys):
    op_dir = tmp_path / "op"
    assert coordinator_main(["init", str(op_dir), "--model", "tiny"]) == 0
    capsys.readouterr()
    assert coordinator_main(["stop", str(op_dir)]) == 3
    assert "no run submitted from" in capsys.readouterr().out
    assert coordinator_main(["stop", str(op_dir), str(tmp_path / "nowhere")]) == 3
    assert "neither a Flower run id" in capsys.readouterr().out
    # the run may also follow an option
    assert coordinator_main(["stop", str(op_dir), "--now", str(tmp_path / "nowhere")]) == 3
    assert "neither a Flower run id" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        coordinator_main(["stop", str(op_dir), "--now", "a", "b"])


def test_flowers_cli_error_is_one_line_without_its_banner_or_box():
    from coordinator.deploy import flwr_error_text

    output = (
        "Using SuperLink: kyodo (127.0.0.1:19093)\n"
        "╭──────────────────────────── Error ────────────────────────────╮\n"
        "│ Connection to the SuperLink is unavailable. Please check that │\n"
        "│ the SuperLink is running and the address is correct.          │\n"
        "╰───────────────────────────────────────────────────────────────╯\n"
    )
    assert flwr_error_text(output) == (
        "Error Connection to the SuperLink is unavailable. Please check that "
        "the SuperLink is running and the address is correct."
    )


def test_a_superlink_that_dies_says_how_to_go_on(tmp_path, monkeypatch, capsys):
    """`start` runs the SuperLink in the foreground; when it is killed, `start` says so and how
    to recover, instead of ending silently with the child's status."""
    import sys

    from coordinator import deploy

    op_dir = tmp_path / "operator"
    assert coordinator_main(["init", str(op_dir), "--model", "tiny", "--port", "19577"]) == 0
    killed = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    monkeypatch.setattr(deploy, "superlink_command", lambda op, consortium: killed)
    monkeypatch.setattr(deploy, "wait_healthy", lambda *args, **kwargs: None)
    runner = deploy.SuperLinkRunner(deploy.operator_dir(op_dir))
    messages = []
    monkeypatch.setattr(deploy.log, "error", lambda fmt, *args: messages.append(fmt % args))
    assert runner.run(register=False) == 1
    text = " ".join(" ".join(messages).split())
    assert "the SuperLink was killed by signal SIGKILL" in text and f"kyodo-coordinator start {op_dir}" in text


def test_start_recognises_this_consortiums_own_superlink_left_running(tmp_path):
    """A `start` killed without its SuperLink leaves that SuperLink running: the next `start`
    says it is this consortium's own and healthy, not only that the port is taken."""
    import http.server
    import ssl
    import threading

    from coordinator import deploy
    from coordinator.deploy import DeployError

    op_dir = tmp_path / "operator"
    assert coordinator_main(["init", str(op_dir), "--model", "tiny", "--port", "19578"]) == 0
    op = deploy.operator_dir(op_dir)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 19578), Health)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(op.tls.server_cert, op.tls.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # Its pid, found by this operator's database in its arguments: `pkill -f flower-superlink`
    # would end every operator's SuperLink on a shared host.
    fake = tmp_path / "bin" / "flower-superlink"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    fake.chmod(0o755)
    other = subprocess.Popen([str(fake), "--database", str(tmp_path / "another-operator.db")])
    ours = subprocess.Popen([str(fake), "--ssl-certfile", "x", "--database", str(op.database)])
    try:
        with pytest.raises(DeployError, match="a SuperLink with this consortium's certificate already answers") as err:
            deploy.SuperLinkRunner(op).preflight()
        assert f"stop it (`kill {ours.pid}`)" in str(err.value) and "pkill" not in str(err.value)
        assert deploy.superlink_answers(op_dir), "a failed run's resume hint then skips `start`"
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()
        server.shutdown()
        server.server_close()
    assert not deploy.superlink_answers(op_dir)
    with socket_holding(19578), pytest.raises(DeployError, match="another SuperLink or program holds it"):
        deploy.SuperLinkRunner(op).preflight()


def socket_holding(port: int):
    """A plain listening socket on ``port``: some other program holds it."""
    import contextlib
    import socket

    @contextlib.contextmanager
    def held():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()
            yield

    return held()


def test_a_free_runtime_port_is_chosen_below_the_kernels_ephemeral_range():
    """The kernel's own choice comes from the range outgoing connections take their source
    ports from: a CI run's SuperNode lost its runtime port to one before it bound it."""
    low, _ = supernode._ephemeral_range()
    ports = {supernode.free_port() for _ in range(10)}
    assert all(20000 <= port < low for port in ports) and len(ports) > 1
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free when chosen (nothing here took it since)


def _ppid(stat: Path) -> int | None:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_a_superlink_under_a_live_start_is_told_apart_from_one_left_running():
    """A second `start` told its operator to kill the SuperLink the first, live `start` ran."""
    from shared_model.flower_processes import parent_running

    script = "import subprocess; subprocess.run(['sleep', '30'])"
    start = subprocess.Popen([sys.executable, "-c", script, "kyodo-coordinator", "start"])
    children: list[int] = []
    try:
        deadline = time.monotonic() + 10
        while not children and time.monotonic() < deadline:
            children = [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat") if _ppid(stat) == start.pid]
            time.sleep(0.1)
        assert children, "the stand-in start spawned its child"
        assert parent_running(children[0], "coordinator", "start") == start.pid
        assert parent_running(children[0], "coordinator", "stop") is None
        assert parent_running(os.getpid(), "no such argument") is None
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        start.kill()
        start.wait()
