"""Ray Tune search: RecBole's hyper.test format, the YAML space, a real search."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.tune import (
    TuneOptions,
    load_search_space,
    parse_hyper_test,
    parse_space_mapping,
    run_tune,
)
from kd_dagfm.config import config_from_yaml
from kd_dagfm.errors import ConfigError
from tests.conftest import tiny_config

HYPER_TEST = """\
# RecBole hyper.test: name type values
learning_rate loguniform -8,0
embedding_size choice [8,16,32]

alpha uniform 0.05, 0.5
depth quniform 1,4,1
t_cin choice ['[8,8]','[16,16]']
"""


def test_hyper_test_parses_like_recbole() -> None:
    space = parse_hyper_test(HYPER_TEST)
    by_name = {p.name: p for p in space}
    assert list(by_name) == [
        "learning_rate",
        "embedding_size",
        "alpha",
        "depth",
        "t_cin",
    ]
    assert by_name["learning_rate"].kind == "loguniform"
    assert by_name["learning_rate"].values == (-8.0, 0.0)
    assert by_name["embedding_size"].values == (8, 16, 32)
    # RecBole joins the words after the type, so "0.05, 0.5" reads as one value.
    assert by_name["alpha"].values == (0.05, 0.5)
    assert by_name["depth"].values == (1.0, 4.0, 1.0)
    assert by_name["t_cin"].values == ("[8,8]", "[16,16]")


def test_loguniform_bounds_are_natural_logs() -> None:
    (parameter,) = parse_hyper_test("learning_rate loguniform -8,0")
    domain = parameter.domain("grid")
    assert domain.lower == pytest.approx(math.exp(-8))
    assert domain.upper == pytest.approx(1.0)


def test_choice_is_a_grid_or_random() -> None:
    (parameter,) = parse_hyper_test("embedding_size choice [8,16]")
    assert parameter.domain("grid") == {"grid_search": [8, 16]}
    assert parameter.domain("random").categories == [8, 16]


def test_yaml_layouts_match_hyper_test(tmp_path: Path) -> None:
    per_parameter = tmp_path / "space.yaml"
    per_parameter.write_text(
        "learning_rate: {loguniform: [-8, 0]}\n"
        "embedding_size: {choice: [8, 16, 32]}\n"
        "alpha: {uniform: [0.05, 0.5]}\n"
        "depth: {quniform: [1, 4, 1]}\n"
        "t_cin: {choice: ['[8,8]', '[16,16]']}\n"
    )
    recbole_dict = {
        "loguniform": {"learning_rate": [-8, 0]},
        "choice": {"embedding_size": [8, 16, 32], "t_cin": ["[8,8]", "[16,16]"]},
        "uniform": {"alpha": [0.05, 0.5]},
        "quniform": {"depth": [1, 4, 1]},
    }
    expected = {(p.name, p.kind, p.values) for p in parse_hyper_test(HYPER_TEST)}
    from_file = load_search_space(str(per_parameter))
    assert {(p.name, p.kind, p.values) for p in from_file} == expected
    from_dict = parse_space_mapping(recbole_dict)
    assert {(p.name, p.kind, p.values) for p in from_dict} == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "embedding_size choice [8,16]\nlearning_rate gaussian 0,1",
            "hyper.test line 2 ('learning_rate gaussian 0,1'): unknown type "
            "'gaussian'; expected one of choice, uniform, quniform, loguniform",
        ),
        (
            "\n\nlearning_rate 0.01",
            "hyper.test line 3 ('learning_rate 0.01'): expected 'name type values'",
        ),
        (
            "embedding_size choice [8,16",
            "hyper.test line 1 ('embedding_size choice [8,16'): choice values must "
            "be a Python list literal",
        ),
        (
            "learning_rate uniform 0.1",
            "hyper.test line 1 ('learning_rate uniform 0.1'): uniform needs 2 "
            "numbers low,high",
        ),
        (
            "learning_rate uniform 0.1,0.01",
            "uniform needs low < high, got 0.1 and 0.01",
        ),
        (
            "hidden_size choice [64,128]",
            "hyper.test line 1 ('hidden_size choice [64,128]'): 'hidden_size' is "
            "not a config key",
        ),
        (
            "embedding_size choice [8,0]",
            "hyper.test line 1 ('embedding_size choice [8,0]'): value 0 is invalid: "
            "invalid embedding_size 0: expected a positive integer",
        ),
        (
            "alpha choice [0.1]\nctr_loss_weight choice [0.2]",
            "hyper.test line 2 ('ctr_loss_weight choice [0.2]'): 'ctr_loss_weight' "
            "is already searched at hyper.test line 1",
        ),
        (
            "output_dir choice ['a','b']",
            "'output_dir' cannot be searched; each trial sets it",
        ),
        ("# only a comment\n", "hyper.test defines no parameters"),
    ],
)
def test_invalid_hyper_test_lines(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_hyper_test(text)
    assert message in str(error.value)


def test_invalid_yaml_entry_names_the_key() -> None:
    with pytest.raises(ConfigError) as error:
        parse_space_mapping({"embedding_size": {"choice": [8]}, "depth": [1, 2]})
    assert "space.yaml key depth: expected one of choice" in str(error.value)
    with pytest.raises(ConfigError) as error:
        parse_space_mapping({"uniform": {"alpha": ["low", "high"]}})
    assert "space.yaml key uniform.alpha: uniform needs 2 numbers" in str(error.value)


def test_tune_options_are_checked() -> None:
    with pytest.raises(ConfigError) as error:
        TuneOptions(metric="test_auc")
    assert "invalid metric 'test_auc': expected one of valid_auc" in str(error.value)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.distributed
def test_small_search_writes_table_and_best(local_ray: None, tmp_path: Path) -> None:
    space_file = tmp_path / "hyper.test"
    space_file.write_text(
        "embedding_size choice [2,4,8]\nlearning_rate loguniform -5,-3\n"
    )
    config = tiny_config(tmp_path / "run", epochs=3, prefetch_batches=0)
    options = TuneOptions(name="search", max_concurrent_trials=2, grace_period_epochs=1)
    summary = run_tune(config, load_search_space(str(space_file)), options)

    assert len(summary.rows) == 3
    assert sorted(r["embedding_size"] for r in summary.rows) == [2, 4, 8]
    for row in summary.rows:
        assert math.exp(-5) <= row["learning_rate"] <= math.exp(-3)
        assert row["status"] in ("finished", "stopped by ASHA")
        assert 1 <= row["epochs"] <= 3
        assert 0.0 < row["valid_auc"] <= 1.0
    aucs = [r["valid_auc"] for r in summary.rows]
    assert aucs == sorted(aucs, reverse=True)
    finished = [r for r in summary.rows if r["status"] == "finished"]
    assert finished  # ASHA continues the first trial to reach each rung
    for row in finished:
        assert row["test_auc"] is not None
    best = summary.rows[0]

    directory = Path(summary.directory)
    assert directory == tmp_path / "run" / "tune" / "search"
    with open(directory / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert (directory / "results.txt").read_text().startswith("trial")
    best_config = config_from_yaml(str(directory / "best_config.yaml"))
    assert best_config.model.embedding_size == best["embedding_size"]
    assert best_config.train.learning_rate == pytest.approx(best["learning_rate"])
    assert best_config.model.t_depth == config.model.t_depth
    trial_dirs = list((directory / "trials").iterdir())
    assert len(trial_dirs) == 3
