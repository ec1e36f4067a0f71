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
