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
