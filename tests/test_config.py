"""Config schema: YAML + --set overrides, coercion, and clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from rpsft.config import ConfigError, dump_yaml, load_config


def test_defaults_are_paper_defaults():
    cfg = load_config()
    assert (cfg.method, cfg.anchor.rank, cfg.anchor.lam, cfg.train.lr) == ("rpsft", 768, 1.0, 1e-6)
    assert cfg.anchor.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: sft\nanchor:\n  rank: 64\ntrain:\n  lr: 2.0e-5\n")
    cfg = load_config(f, ["rank=0.5", "train.lr=1e-5", "anchor.targets=q_proj,v_proj", "anchor.layers=0-3",
                          "train.bf16=null", "data.limit=10", "anchor.rank={q_proj: 8, '*': 4}"])
    assert cfg.method == "sft"
    assert cfg.anchor.rank == {"q_proj": 8, "*": 4}
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.anchor.targets == ["q_proj", "v_proj"] and cfg.anchor.layers == "0-3"
    assert cfg.train.bf16 is None and cfg.data.limit == 10


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["anchor.rank=@ranks.json", "train.max_steps=7"])
    f = tmp_path / "r.yaml"
    f.write_text(dump_yaml(cfg))
    assert load_config(f) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["anchor.rnak=3"], "did you mean 'anchor.rank'"),
    (["train.lr=fast"], "train.lr: expected a number"),
    (["train.batch_size=2.5"], "expected an integer"),
    (["train.bf16=maybe"], "expected true/false"),
    (["nokey"], "expected key=value"),
    (["train.lr=-1"], "train.lr must be > 0"),
    (["anchor.period=0"], "anchor.period must be >= 1"),
    (["anchor.svd=lanczos"], "anchor.svd must be"),
])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(f)
    f.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        load_config(f)


@dataclass
class Inner:
    limit: int | None = None
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    runs: int = 1
    inner: Inner = field(default_factory=Inner)


def test_one_loader_builds_every_config():
    from rpsft.config import BaseTrainConfig, apply_overrides, load_section
    from rpsft.rl.config import RLConfig, RLTrainConfig

    # rl: an anchor section that does not say `enabled` stays off during RL (its dataclass default), not in train
    rl = load_section(RLConfig, {"anchor": {"rank": 8}, "train": {"lr": "2e-6"}}, label="rl config")
    assert rl.anchor.enabled is False and rl.anchor.rank == 8 and rl.train.lr == 2e-6
    assert load_section(RLConfig, {}).anchor.enabled is False
    assert load_config(None, ["anchor.rank=8"]).anchor.enabled is None
    # the train fields both share are defined once; each config keeps its own defaults
    assert issubclass(RLTrainConfig, BaseTrainConfig) and rl.train.lr_scheduler == "constant"
    assert load_config().train.lr_scheduler == "cosine"
    with pytest.raises(ConfigError, match="unknown rl config key 'train.epochs'"):
        load_section(RLConfig, {"train": {"epochs": 1}}, label="rl config")

    data = apply_overrides({}, ["inner={limit: 3}", "inner.names=a,b"], Outer, label="other")
    built = load_section(Outer, data, label="other")
    assert built.inner.limit == 3 and built.inner.names == ["a", "b"] and built.runs == 1
    with pytest.raises(ConfigError, match="inner.limit: expected an integer"):
        load_section(Outer, {"inner": {"limit": "many"}}, label="other")
    with pytest.raises(ConfigError, match="unknown other key 'inner.limt'; did you mean 'inner.limit'"):
        apply_overrides({}, ["inner.limt=3"], Outer, label="other")


def test_a_reordered_saved_config_is_the_same_config():
    from rpsft.train import _yaml_diff

    assert _yaml_diff("train:\n  lr: 1\n  seed: 2\n", "train:\n  seed: 2\n  lr: 1\n") == []
    assert _yaml_diff("train:\n  lr: 1\n", "train:\n  lr: 3\n") == ["-  lr: 1", "+  lr: 3"]
