from coordinator.cli import main


def test_model_info_reports_counts(capsys):
    assert main(["model-info", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "expert" in out and "adapter_emb" in out and "shards" in out


def test_config_errors_are_reported_not_raised(capsys):
    assert main(["model-info", "--model", "tiny", "model.d_modle=3"]) == 2
    assert "model.d_modle" in capsys.readouterr().out
    assert main(["demo", "--model", "nope"]) == 2
    assert "available" in capsys.readouterr().out


def test_plan_counts_what_a_round_moves(capsys, tiny_cfg):
    from coordinator.capacity import capacity, trainable_numel
    from shared_model.shards import ShardLayout

    assert main(["plan", "--model", "tiny", "--members", "4"]) == 0
    out = capsys.readouterr().out
    assert "store growth per round" in out and "member-03" in out
    layout = ShardLayout.from_config(tiny_cfg.model, tiny_cfg.embodiments)
    report = capacity(tiny_cfg, 4, layout=layout)
    changed = list(report.round_plan.cohorts)
    assert report.updated_shards == len(changed)
    assert report.store_growth_bytes == sum(layout.numel(s) * 2 for s in changed)
    for member in report.members:
        mine = report.round_plan.shards_of(member.member)
        assert member.upload_bytes == 4 * sum(trainable_numel(layout, s) for s in mine)  # masked uint32
        assert member.download_bytes == report.store_growth_bytes
    assert main(["plan", "--model", "tiny", "--members", "0"]) == 2


def test_plan_for_a_trillion_parameters(capsys):
    assert main(["plan", "--model", "trillion", "--members", "10"]) == 0
    out = capsys.readouterr().out
    assert "1.0447e+12 parameters" in out and "23,430" in out


def test_export_and_gc_of_a_run_directory(tmp_path, capsys, tiny_cfg):
    import json

    import torch
    from safetensors.torch import load_file

    from coordinator.federation import initial_model
    from coordinator.run_state import RunState

    run = tmp_path / "run"
    state = RunState(tiny_cfg, run)
    model = initial_model(tiny_cfg)
    state.commit_initial(model, {"run": "t"})
    name = next(n for n in model if n.startswith("adapters.so100."))
    model[name] = model[name] + 1
    state.commit_round(1, model, ["adapter/emb/so100"], {}, {"run": "t"})
    from shared_model.config import to_yaml

    (run / "config.yaml").write_text(to_yaml(tiny_cfg), encoding="utf-8")  # as the coordinator writes it
    assert main(["export", str(run), "--round", "1", "--out", str(tmp_path / "hf")]) == 0
    # What rebuilds the policy around the tensors: its architecture and each robot's dimensions.
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["kyodo_round"] == 1 and config["model"]["n_layers"] == tiny_cfg.model.n_layers
    assert config["embodiments"]["so100"]["action_dim"] == tiny_cfg.embodiments["so100"].action_dim
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    loaded = {}
    for file in set(index["weight_map"].values()):
        loaded.update(load_file(str(tmp_path / "hf" / file)))
    assert loaded.keys() == model.keys() and all(torch.equal(loaded[k], model[k]) for k in model)
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 1  # refuses to overwrite
    # Not while a coordinator runs the run (a round in flight has objects no manifest names
    # yet), and not on a directory that is no run (it used to create an empty store there).
    from coordinator.run_lock import holding_run

    with holding_run(run):
        assert main(["gc", str(run), "--keep-last", "1"]) == 1
    assert "a coordinator runs" in " ".join(capsys.readouterr().out.split())
    for wrong in (tmp_path, tmp_path / "nowhere"):
        assert main(["gc", str(wrong), "--keep-last", "1"]) == 1
        assert "is not a run directory" in " ".join(capsys.readouterr().out.split())
    assert not (tmp_path / "store").exists() and not (tmp_path / "nowhere").exists()
    assert main(["gc", str(run), "--keep-last", "1"]) == 0
    out = capsys.readouterr().out
    assert "removed 1 rounds, 1 objects" in out and "rounds [0] can no longer be verified" in " ".join(out.split())
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    # A damaged store is a one-line error that says what is wrong, never a traceback.
    capsys.readouterr()
    oid = state.store.manifest(1).shards["adapter/emb/so100"]
    path = state.store.object_path(oid)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    assert main(["export", str(run), "--out", str(tmp_path / "hf2")]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert f"object {oid}" in out and "is corrupt" in out and "member's replica" in out
    head = run / "store" / "HEAD"
    head.write_text(head.read_text()[:10])
    assert main(["export", str(run), "--out", str(tmp_path / "hf3")]) == 1
    assert "export failed:" in capsys.readouterr().out


def test_participation_marks_a_member_that_trained_then_failed_in_secure_aggregation(tmp_path):
    """A member killed after its train reply showed T in the participation table while the
    reasons table said it failed (a walkthrough): it trained, spent, and its update was lost."""
    from rich.console import Console

    from coordinator.run_status import RunReport, participation_table

    record = {"train": {"sony": {}, "fanuc": {}}, "failed": {"sony": "train.masked_input error 5"}}
    # Its own adapter is a cohort of one, untouched by the shared cohort's loss: part of it was used.
    cohorts = {"adapter/shared": ["sony", "fanuc", "honda"], "adapter/emb/so100": ["sony"]}
    partly = {**record, "cohorts": cohorts, "updated_shards": ["adapter/emb/so100"], "train": {"sony": {}}}
    report = RunReport(run_dir=tmp_path, head=2, records={1: record, 2: partly})
    console = Console(width=300, record=True)
    console.print(participation_table(report))
    rows = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if "│" in line}
    assert [c.strip() for c in rows["sony"].split("│")[2:4]] == ["T!", "T~"]
    assert "│ T " in rows["fanuc"]


def test_participation_shows_each_members_spend_against_its_published_budget(tmp_path):
    """The operator sees who is about to run out, and who signed for more than it published
    (an audit will fail it), without asking the members: against the budget the run was
    submitted with (its records' ``budgets``), else the one published now."""
    from rich.console import Console

    from coordinator.run_status import RunReport, participation_table

    def receipt(epsilon: float, time: str) -> dict:
        return {"epsilon": epsilon, "time": time}

    def table(report: RunReport, budgets: dict | None = None) -> tuple[str, dict[str, str]]:
        console = Console(width=300, record=True)
        console.print(participation_table(report, budgets))
        text = console.export_text()
        return text, {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}

    record = {
        "train": {"sony": {}, "fanuc": {}},
        "receipts": {"sony": receipt(2.43, "t1"), "fanuc": receipt(8.2, "t1")},
    }
    report = RunReport(run_dir=tmp_path, head=1, records={1: record})
    text, rows = table(report, {"sony": 2.6, "fanuc": 8.0})
    assert "budget published now" in text
    assert "2.430/2.6" in rows["sony"] and "over" not in rows["sony"]
    assert "8.200/8 over" in rows["fanuc"]
    # Without the operator's file (status given a bare run directory): the spend alone.
    text, rows = table(report)
    assert "budget" not in text and "2.430 " in text
    # A run whose records name the budgets it was submitted with: those, not today's.
    record["budgets"] = {"sony": 2.0, "fanuc": 9.0}
    text, rows = table(report, {"sony": 20.0, "fanuc": 20.0})
    assert "budget published for the run" in text
    assert "2.430/2 over" in rows["sony"] and "8.200/9" in rows["fanuc"] and "over" not in rows["fanuc"]


def test_simulated_members_rewrite_their_data_only_when_the_federation_changed_it(tmp_path, capsys):
    """A two-task federation over the data of a one-task run reused it without a word; data
    kyodo did not write (no note beside it) is kept and the difference said."""
    from coordinator.cli import prepare_member_data
    from member_node.lerobot import read_dataset
    from shared_model.config import load_config

    def cfg(tasks: int, episodes: int = 3):
        member = f"{{name: a, embodiment: so100, episodes: {episodes}, episode_seconds: 0.5, seed: 1, tasks: {tasks}}}"
        return load_config(model="tiny", overrides=[f"data_root={tmp_path}", f"federation.members=[{member}]"])

    emb = cfg(1).embodiments["so100"]
    prepare_member_data(cfg(1))
    info = tmp_path / "a" / "meta" / "info.json"
    first = info.stat().st_mtime_ns
    prepare_member_data(cfg(1))
    assert info.stat().st_mtime_ns == first, "the same settings keep the data"
    capsys.readouterr()
    prepare_member_data(cfg(2, episodes=6))
    assert "was written with other settings; writing it again" in capsys.readouterr().out
    assert read_dataset(tmp_path / "a", emb, "so100").info["total_tasks"] == 2
    (tmp_path / ".a.synth.json").unlink()  # as if the member had put its own recording there
    prepare_member_data(cfg(1))
    said = " ".join(capsys.readouterr().out.split())
    assert (
        "holds 6 episodes of 2 task(s) of 'so100', not the 3 of 1 of 'so100' the federation names: used as it is"
        in said
    )
    assert read_dataset(tmp_path / "a", emb, "so100").info["total_tasks"] == 2
