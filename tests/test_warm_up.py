"""warm_up resolution and every way it can be wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kd_dagfm.config import RunConfig
from kd_dagfm.errors import CheckpointError, ConfigError
from kd_dagfm.phases import Phase
from kd_dagfm.pipeline import run_phase
from kd_dagfm.train.checkpoint import CheckpointManager
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    """A finished teacher_training phase to warm-start from."""
    config = tiny_config(tmp_path_factory.mktemp("teacher"), epochs=1)
    run_phase(config, Phase.TEACHER_TRAINING)
    return config


def teacher_dir(config: RunConfig) -> Path:
    return Path(config.train.output_dir) / "teacher_training"


def distill(teacher_config: RunConfig, out: Path, **overrides: object) -> None:
    values: dict[str, object] = {
        "warm_up": str(teacher_dir(teacher_config)),
        "epochs": 1,
    }
    values.update(overrides)
    # The synthetic data lives under the teacher's output_dir; reuse it.
    dataset = Path(teacher_config.train.output_dir) / "data" / "synthetic-6000-5-8-2022"
    config = tiny_config(out, dataset=str(dataset), **values)
    run_phase(config, Phase.DISTILLATION)


@pytest.mark.parametrize(
    "which",
    ["phase_dir", "checkpoints_dir", "output_dir", "checkpoint", "model_file"],
)
def test_warm_up_forms(teacher_run: RunConfig, tmp_path: Path, which: str) -> None:
    phase_dir = teacher_dir(teacher_run)
    newest = CheckpointManager(str(phase_dir / "checkpoints")).latest()
    assert newest is not None
    path = {
        "phase_dir": phase_dir,
        "checkpoints_dir": phase_dir / "checkpoints",
        "output_dir": Path(teacher_run.train.output_dir),
        "checkpoint": Path(newest.path),
        "model_file": phase_dir / "model.pt",
    }[which]
    distill(teacher_run, tmp_path, warm_up=str(path))
    assert (tmp_path / "distillation" / "model.pt").exists()


def test_distillation_needs_warm_up(teacher_run: RunConfig, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="distillation needs warm_up"):
        distill(teacher_run, tmp_path, warm_up=None)
    with pytest.raises(ConfigError, match="distillation needs warm_up"):
        distill(teacher_run, tmp_path, warm_up="  ")


def test_finetuning_needs_warm_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="finetuning needs warm_up: the distillation"):
        run_phase(tiny_config(tmp_path), Phase.FINETUNING)


def test_teacher_training_rejects_warm_up(
    teacher_run: RunConfig, tmp_path: Path
) -> None:
    config = tiny_config(tmp_path, warm_up=str(teacher_dir(teacher_run)))
    with pytest.raises(
        ConfigError, match="set for teacher_training, which starts from scratch"
    ):
        run_phase(config, Phase.TEACHER_TRAINING)


def test_missing_warm_up(teacher_run: RunConfig, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="warm_up '.*nowhere' not found"):
        distill(teacher_run, tmp_path, warm_up=str(tmp_path / "nowhere"))


def test_wrong_phase_warm_up(teacher_run: RunConfig, tmp_path: Path) -> None:
    dataset = Path(teacher_run.train.output_dir) / "data" / "synthetic-6000-5-8-2022"
    config = tiny_config(
        tmp_path, dataset=str(dataset), warm_up=str(teacher_dir(teacher_run))
    )
    with pytest.raises(
        CheckpointError,
        match="is a teacher_training-phase checkpoint; finetuning starts from a distillation",
    ):
        run_phase(config, Phase.FINETUNING)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"teacher": "cin"}, "teacher='crossnet' \\(this run: 'cin'\\)"),
        ({"type": "inner"}, "student_type='outer' \\(this run: 'inner'\\)"),
        ({"embedding_size": 8}, "embedding_size=4 \\(this run: 8\\)"),
        ({"t_depth": 3}, "t_depth=2 \\(this run: 3\\)"),
    ],
)
def test_mismatched_model(
    teacher_run: RunConfig, tmp_path: Path, override: dict[str, object], message: str
) -> None:
    with pytest.raises(
        CheckpointError, match=f"trained with a different model: .*{message}"
    ):
        distill(teacher_run, tmp_path, **override)


def test_mismatched_features(teacher_run: RunConfig, tmp_path: Path) -> None:
    config = tiny_config(
        tmp_path,
        synthetic_vocab_size=9,
        warm_up=str(teacher_dir(teacher_run)),
    )
    with pytest.raises(
        CheckpointError,
        match="trained on other features: feature 'C1' is sparse with 8 embeddings, "
        "expected sparse with 9",
    ):
        run_phase(config, Phase.DISTILLATION)


def test_incomplete_checkpoint(teacher_run: RunConfig, tmp_path: Path) -> None:
    newest = CheckpointManager(str(teacher_dir(teacher_run) / "checkpoints")).latest()
    assert newest is not None
    copy = tmp_path / "ckpt-00000099"
    shutil.copytree(newest.path, copy)
    (copy / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="is incomplete \\(no COMPLETE marker\\)"):
        distill(teacher_run, tmp_path / "out", warm_up=str(copy))


def test_unreadable_meta(teacher_run: RunConfig, tmp_path: Path) -> None:
    newest = CheckpointManager(str(teacher_dir(teacher_run) / "checkpoints")).latest()
    assert newest is not None
    copy = tmp_path / "ckpt-00000099"
    shutil.copytree(newest.path, copy)
    (copy / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json is unreadable"):
        distill(teacher_run, tmp_path / "out", warm_up=str(copy))


def test_unreadable_model_file(teacher_run: RunConfig, tmp_path: Path) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="warm_up file .* is unreadable"):
        distill(teacher_run, tmp_path / "out", warm_up=str(bad))


def test_directory_without_checkpoints(teacher_run: RunConfig, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="contains no complete checkpoint"):
        distill(teacher_run, tmp_path / "out", warm_up=str(empty))
