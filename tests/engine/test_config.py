"""The run config: YAML with ``base:`` inheritance, dotted overrides, and one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distkd.config import (
    RunConfig,
    TermConfig,
    bundled_configs,
    dump_config,
    from_dict,
    load_config,
    resolve_config_path,
    to_dict,
)
from distkd.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def child(tmp_path: Path) -> Path:
    """``child.yaml`` inheriting ``sub/base.yaml`` (a relative base path) and overriding part of a section."""
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "base.yaml", "name: base\nseed: 3\noptim: {lr: 0.2, momentum: 0.8}\n"
          "loss:\n  distill:\n    - {loss: dist, weight: 2.0, kwargs: {tau: 4.0}}\n    - {loss: kd}\n")
    return write(tmp_path / "child.yaml", "base: sub/base.yaml\nname: child\noptim: {lr: 0.05}\n")


def test_base_inheritance_merges_sections_key_by_key(child: Path) -> None:
    cfg = load_config(child)
    assert cfg.name == "child" and cfg.seed == 3
    assert cfg.optim.lr == 0.05 and cfg.optim.momentum == 0.8
    assert cfg.loss.distill == [TermConfig(loss="dist", weight=2.0, kwargs={"tau": 4.0}), TermConfig(loss="kd")]


def test_defaults_fill_what_the_file_leaves_out(child: Path) -> None:
    cfg = load_config(child)
    assert cfg.schedule == RunConfig().schedule
    assert cfg.teacher is None and cfg.run_dir == Path("runs") / "child"


def test_overrides_reach_nested_keys_list_items_and_null(child: Path) -> None:
    cfg = load_config(child, ["optim.lr=0.01", "loss.distill.1.weight=3", "loss.distill.0.kwargs.tau=2",
                              "teacher.name=small_cnn6_w32", "train.grad_clip=null", "schedule.milestones=[3, 5]"])
    assert cfg.optim.lr == 0.01
    assert cfg.loss.distill[1].weight == 3.0 and isinstance(cfg.loss.distill[1].weight, float)
    assert cfg.loss.distill[0].kwargs == {"tau": 2}
    assert cfg.teacher is not None and cfg.teacher.name == "small_cnn6_w32" and cfg.teacher.checkpoint is None
    assert cfg.train.grad_clip is None
    assert cfg.schedule.milestones == [3, 5]
    assert load_config(child, ["teacher.name=x", "teacher=null"]).teacher is None


def test_override_list_index_out_of_range_names_the_path(child: Path) -> None:
    with pytest.raises(ConfigError, match=r"loss\.distill\.5' needs a list index below 2"):
        load_config(child, ["loss.distill.5.weight=1"])


def test_override_without_equals_sign_is_rejected() -> None:
    with pytest.raises(ConfigError, match="is not key=value"):
        load_config(None, ["optim.lr"])


def test_unknown_key_suggests_the_nearest_valid_one(child: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(child, ["optim.lrr=0.1"])
    message = str(err.value)
    assert "unknown key 'optim.lrr'" in message and "did you mean 'lr'?" in message
    assert "\n" not in message


def test_unknown_key_in_a_file_is_reported_with_its_path(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train\.epoch' \(did you mean 'epochs'\?\)"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.epochs=two", r"train\.epochs: expected an integer, got str 'two'"),
        ("train.epochs=2.5", r"train\.epochs: expected an integer, got float 2\.5"),
        ("data.flip=1", r"data\.flip: expected true or false, got int 1"),
        ("optim.lr=true", r"optim\.lr: expected a number, got bool True"),
        ("name=[1]", r"name: expected a string, got list \[1\]"),
        ("schedule.milestones=3", r"schedule\.milestones: expected a list, got int 3"),
        ("schedule.milestones=[1, x]", r"schedule\.milestones\.1: expected an integer, got str 'x'"),
        ("model=small", r"model: expected a mapping, got str 'small'"),
    ],
)
def test_wrong_types_name_the_key_and_the_value(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr=-1", r"optim\.lr: expected a value > 0, got -1"),
        ("optim.lr=0", r"optim\.lr: expected a value > 0, got 0"),
        ("optim.momentum=1.5", r"optim\.momentum: expected a value <= 1, got 1\.5"),
        ("train.epochs=0", r"train\.epochs: expected a value >= 1, got 0"),
        ("loss.label_smoothing=-0.1", r"loss\.label_smoothing: expected a value >= 0, got -0\.1"),
    ],
)
def test_out_of_range_values_are_rejected(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_invalid_literal_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"optim\.name: expected one of sgd, adamw, rmsprop_tf, got str 'adam'"):
        load_config(None, ["optim.name=adam"])


def test_bad_yaml_reports_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "name: x\noptim:\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+ is not valid YAML") as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_a_top_level_list_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        load_config(write(tmp_path / "list.yaml", "- a\n- b\n"))


def test_missing_file_and_missing_base_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"config file not found: .*gone\.yaml"):
        load_config(write(tmp_path / "c.yaml", "base: gone.yaml\n"))


def test_base_loop_is_detected(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"'base' chain loops back to .*a\.yaml"):
        load_config(tmp_path / "a.yaml")


def test_resolved_config_round_trips_through_dict_and_yaml(child: Path, tmp_path: Path) -> None:
    cfg = load_config(child, ["teacher.name=small_cnn6_w32", "teacher.checkpoint=t.pt", "train.grad_clip=5"])
    assert from_dict(RunConfig, to_dict(cfg)) == cfg
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert from_dict(RunConfig, yaml.safe_load((tmp_path / "resolved.yaml").read_text())) == cfg
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("name", bundled_configs())
def test_every_bundled_config_loads(name: str) -> None:
    cfg = load_config(resolve_config_path(name))
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_a_users_config_can_base_itself_on_a_bundled_name(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text("base: demo/teacher.yaml\nname: mine\ntrain: {epochs: 3}\n")
    cfg = load_config(tmp_path / "mine.yaml")
    bundled = load_config("demo/teacher.yaml")
    assert (cfg.name, cfg.train.epochs) == ("mine", 3) and cfg.model == bundled.model and cfg.optim == bundled.optim
