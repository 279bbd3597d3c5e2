"""Config parsing: keys, aliases, values and their error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd_dagfm.cli import build_parser, config_from_args
from kd_dagfm.config import RunConfig, build_config, config_from_yaml
from kd_dagfm.errors import ConfigError
from kd_dagfm.phases import Phase


def test_defaults_match_recbole() -> None:
    config = RunConfig()
    assert config.model.teacher == "crossnet"
    assert config.model.student_type == "outer"
    assert config.model.embedding_size == 16
    assert config.model.depth == 3
    assert config.model.t_depth == 3
    assert config.model.t_cin == (200, 200, 200)
    assert config.train.ctr_loss_weight == 0.1
    assert config.train.kd_loss_weight == 921.6
    assert config.train.warm_up is None


def test_recbole_aliases_map_to_named_weights() -> None:
    config = build_config(
        {"alpha": 0.3, "beta": 7.0, "type": "INNER", "stopping_step": 4}
    )
    assert config.train.ctr_loss_weight == 0.3
    assert config.train.kd_loss_weight == 7.0
    assert config.model.student_type == "inner"
    assert config.train.early_stopping_patience == 4


def test_flat_and_nested_keys_agree() -> None:
    flat = build_config({"teacher": "CIN", "phase": "distillation", "epochs": 3})
    nested = build_config(
        {"model": {"teacher": "cin"}, "train": {"phase": "distillation", "epochs": 3}}
    )
    assert flat == nested
    assert flat.train.phase is Phase.DISTILLATION
    assert RunConfig.from_dict(flat.to_dict()) == flat


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'lerning_rate'") as info:
        build_config({"lerning_rate": 0.1})
    assert "learning_rate" in str(info.value)


def test_unknown_nested_key_names_section() -> None:
    with pytest.raises(ConfigError, match="unknown key 'depht' in section 'model'"):
        build_config({"model": {"depht": 2}})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"teacher": "dnn"}, "invalid teacher 'dnn': expected one of crossnet, cin"),
        (
            {"type": "kernel"},
            "invalid student_type 'kernel': expected one of inner, outer",
        ),
        (
            {"phase": "pretrain"},
            "invalid value 'pretrain' for 'phase': expected one of teacher",
        ),
        ({"epochs": "ten"}, "invalid value 'ten' for 'epochs': expected int"),
        ({"epochs": 0}, "invalid epochs 0: expected a positive integer"),
        ({"t_cin": []}, "invalid t_cin \\[\\]"),
        ({"learning_rate": -1}, "invalid learning_rate -1.0: expected a finite number"),
        (
            {"learning_rate": "inf"},
            "invalid learning_rate inf: expected a finite number",
        ),
        ({"t_cin": "[200,"}, "invalid value '\\[200,' for 't_cin'"),
        ({"alpha": 0, "beta": 0}, "ctr_loss_weight and kd_loss_weight are both 0"),
        ({"embedding_optimizer": "lamb"}, "invalid embedding_optimizer 'lamb'"),
        ({"sharding": "diagonal"}, "invalid sharding 'diagonal'"),
        ({"synthetic_fields": 2}, "at least 3 are needed"),
        ({"alpha": 0.1, "ctr_loss_weight": 0.2}, "sets 'ctr_loss_weight' twice"),
    ],
)
def test_invalid_values_are_named(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(values)


def test_yaml_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("teacher: cin\nt_cin: [10, 20]\ntrain:\n  epochs: 4\n")
    config = config_from_yaml(str(path), {"epochs": 2})
    assert config.model.t_cin == (10, 20)
    assert config.train.epochs == 2


def test_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        config_from_yaml(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        config_from_yaml(str(bad))


def test_command_line_flags() -> None:
    args = build_parser().parse_args(
        [
            "pipeline",
            "--epochs",
            "3",
            "--t_cin",
            "[4, 5]",
            "--alpha",
            "0.5",
            "--set",
            "depth=2",
        ]
    )
    config = config_from_args(args)
    assert config.train.epochs == 3
    assert config.model.t_cin == (4, 5)
    assert config.train.ctr_loss_weight == 0.5
    assert config.model.depth == 2
    # Keys the flags do not set come from the embedded default job.
    assert config.data.dataset == "synthetic"
