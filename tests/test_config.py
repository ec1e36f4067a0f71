import pytest

from shared_model.config import ConfigError, config_from_run_config, load_config


def test_defaults_compose():
    cfg = load_config()
    assert cfg.model.name == "tiny"
    assert len(cfg.federation.members) == 4
    embodiments = {m.embodiment for m in cfg.federation.members}
    assert len(embodiments) == 4, "default federation: each member a different robot"
    dims = {(cfg.embodiments[e].state_dim, cfg.embodiments[e].action_dim) for e in embodiments}
    assert len(dims) == 4, "embodiments differ in state/action sizes"


@pytest.mark.parametrize("preset", ["tiny", "small", "trillion"])
def test_model_presets(preset):
    assert load_config(model=preset).model.name == preset


def test_trillion_sizes():
    m = load_config(model="trillion").model
    assert (m.n_layers, m.d_model, m.n_experts, m.top_k, m.expert_hidden) == (61, 7168, 384, 8, 2048)


def test_dotlist_overrides_every_section():
    cfg = load_config(
        overrides=["train.rounds=7", "model.d_model=48", "embodiments.so100.fps=15", "federation.members.0.episodes=9"]
    )
    assert cfg.train.rounds == 7
    assert cfg.model.d_model == 48
    assert cfg.embodiments["so100"].fps == 15
    assert cfg.federation.members[0].episodes == 9


def test_a_string_setting_keeps_its_text():
    """YAML reads "000...01" as 1, "0123" as the octal 83 and "1.5e+3" as a float; a string
    setting (a hash, a path) must keep its text."""
    digest = "0" * 63 + "1"
    cfg = load_config(overrides=[f"public.checkpoint_sha256={digest}", "public.checkpoint=1.5e+3", "data_root=0123"])
    assert (cfg.public.checkpoint_sha256, cfg.public.checkpoint, cfg.data_root) == (digest, "1.5e+3", "0123")
    assert load_config(overrides=["data_root='quoted'"]).data_root == "quoted"


def test_preset_chosen_by_override():
    assert load_config(overrides=["model=small"]).model.name == "small"


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.roundz=3", "train.roundz"),
        ("model.d_modle=64", "model.d_modle"),
        ("embodiments.so100.state_dimm=3", "embodiments.so100.state_dimm"),
        ("federation.members.0.nam=x", "federation.members.0.nam"),
        ("nonsense=1", "nonsense"),
    ],
)
def test_unknown_key_is_named(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("privacy.sample_rate=0", r"privacy.sample_rate must be in \(0, 1\]"),
        ("privacy.sample_rate=1.5", r"privacy.sample_rate must be in \(0, 1\]"),
        ("privacy.max_noise_multiplier=0", "privacy.max_noise_multiplier must be positive"),
        ("train.physical_batch=0", "train.physical_batch must be >= 1"),
        ("train.reply_timeout=0", "train.reply_timeout must be a positive number of seconds"),
        (
            "federation.members.0.train_reply_after=-1",
            r"federation.members\[0\]: need 0 <= train_reply_after < train.reply_timeout",
        ),
        ("federation.members.1.eval_reply_after=600", r"federation.members\[1\]: need 0 <= eval_reply_after < train"),
        ("federation.members.2.accountant=gdp", r"federation.members\[2\]: need accountant '', rdp or prv"),
        ("federation.members.2.min_steps=-1", r"federation.members\[2\]: need accountant '', rdp or prv"),
    ],
)
def test_privacy_and_batch_settings_out_of_range_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_bad_value_type():
    with pytest.raises(ConfigError, match="train.rounds"):
        load_config(overrides=["train.rounds=many"])


def test_not_a_dotlist():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["train.rounds"])


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="available: small, tiny, trillion"):
        load_config(model="huge")


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="divisible"):
        load_config(overrides=["model.d_model=30", "model.n_heads=4"])
    with pytest.raises(ConfigError, match="top_k"):
        load_config(overrides=["model.top_k=9"])
    with pytest.raises(ConfigError, match="state_bound"):
        load_config(overrides=["embodiments.so100.state_dim=7"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config(overrides=["federation.members.0.embodiment=spaceship"])
    with pytest.raises(ConfigError, match="action_relative_to"):
        load_config(overrides=["embodiments.so100.action_relative_to=[0,1]"])
    with pytest.raises(ConfigError, match="action_relative_to"):
        load_config(overrides=["embodiments.agv.action_relative_to=[3,5]"])
    with pytest.raises(ConfigError, match="eval_windows_per_episode"):
        load_config(overrides=["train.eval_windows_per_episode=-1"])


def test_learning_rate_comes_with_the_model_size_unless_set():
    assert load_config(model="tiny").train.lr == load_config(model="tiny").model.lr == 0.003
    assert load_config(model="small").train.lr == 0.003
    assert load_config(model="small", overrides=["train.lr=0.02"]).train.lr == 0.02
    assert load_config(model="tiny", overrides=["model.lr=0.05"]).train.lr == 0.05
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(overrides=["train.lr=-0.1"])
    with pytest.raises(ConfigError, match="model.lr"):
        load_config(overrides=["model.lr=0"])


def test_flower_run_config():
    cfg = config_from_run_config(
        {"model": "small", "federation": "default", "overrides": "train.rounds=2 train.lr=0.5"}
    )
    assert cfg.model.name == "small" and cfg.train.rounds == 2 and cfg.train.lr == 0.5
    with pytest.raises(ConfigError, match="train.nope"):
        config_from_run_config({"model": "tiny", "overrides": "train.nope=1"})
    with pytest.raises(ConfigError, match="unknown run-config keys"):
        config_from_run_config({"model": "tiny", "rounds": 3})


def test_pyproject_run_config_keys_match_loader():
    """The Flower app's run-config keys are exactly those the loader understands."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    keys = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(keys) == {"model", "federation", "overrides"}
    config_from_run_config(keys)
    comps = pyproject["tool"]["flwr"]["app"]["components"]
    assert comps == {"serverapp": "coordinator.server_app:app", "clientapp": "member_node.client_app:app"}


def test_a_secagg_threshold_of_half_the_degree_or_less_is_refused():
    with pytest.raises(ConfigError, match="more than half of secagg.degree 4"):
        load_config(model="tiny", overrides=["secagg.degree=4", "secagg.threshold=2"])
    assert load_config(model="tiny", overrides=["secagg.degree=4", "secagg.threshold=3"]).secagg.threshold == 3
    with pytest.raises(ConfigError, match="6 in cohorts larger than it"):  # a review: build_setup refused it later
        load_config(model="tiny", overrides=["secagg.degree=5", "secagg.threshold=3"])


def test_a_federation_larger_than_a_secure_aggregation_cohort_is_refused():
    """adapter/shared's cohort is every member able to train; past 255 nodes refuse its group
    every round (a review's 256-member plan: nothing spent, nothing ever trained)."""
    members = "[" + ", ".join(f"{{name: m{i}, embodiment: so100}}" for i in range(256)) + "]"
    with pytest.raises(ConfigError, match="256 members, but a secure-aggregation cohort has at most 255"):
        load_config(model="tiny", overrides=[f"federation.members={members}"])
    load_config(model="tiny", overrides=[f"federation.members={members}", "secagg.enabled=false"])
    load_config(
        model="tiny", overrides=["federation.members=" + members.replace(", {name: m255, embodiment: so100}", "")]
    )
