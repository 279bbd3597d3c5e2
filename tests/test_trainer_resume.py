"""A phase resumed from any of its checkpoints ends with the uninterrupted
run's weights (single process; the Ray tests repeat this on 2 workers)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from kd_dagfm.pipeline import run_phase
from kd_dagfm.train.checkpoint import CheckpointManager
from tests.conftest import tiny_config

# With this seed and learning rate the valid AUC is best after epoch 0 and
# lower after epochs 1 and 2, so the final weights are epoch 0's.
SETTINGS = {
    "learning_rate": 0.01,
    "epochs": 3,
    "max_steps_per_epoch": 6,
    "checkpoint_every_steps": 3,
    "keep_last_checkpoints": 50,
    "synthetic_rows": 3000,
}


def final_weights(output_dir: Path, scratch: Path) -> dict[str, torch.Tensor]:
    latest = CheckpointManager(
        str(output_dir / "teacher_training" / "checkpoints")
    ).latest()
    assert latest is not None
    assert latest.kind == "final"
    target = scratch / f"{output_dir.name}.pt"
    dcp_to_torch_save(latest.path, str(target))
    return dict(torch.load(target, weights_only=False)["model"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_phase(tiny_config(output_dir, **SETTINGS))
    assert result.best_epoch == 0
    return output_dir


@pytest.mark.parametrize(
    ("seq", "what"),
    [
        (1, "step checkpoint inside epoch 0"),
        (2, "step checkpoint at max_steps_per_epoch"),
        (3, "epoch checkpoint holding the best weights"),
        (4, "step checkpoint after the best epoch"),
        (5, "step checkpoint at max_steps_per_epoch after the best epoch"),
    ],
)
def test_resumed_phase_matches_uninterrupted(
    uninterrupted: Path, tmp_path: Path, seq: int, what: str
) -> None:
    output_dir = tmp_path / "resumed"
    shutil.copytree(uninterrupted, output_dir)
    checkpoints = output_dir / "teacher_training" / "checkpoints"
    for path in checkpoints.iterdir():
        if int(path.name.split("-")[1]) > seq:
            shutil.rmtree(path)
    (output_dir / "teacher_training" / "model.pt").unlink(missing_ok=True)
    latest = CheckpointManager(str(checkpoints)).latest()
    assert latest is not None
    assert latest.seq == seq, what

    run_phase(tiny_config(output_dir, **SETTINGS))

    expected = final_weights(uninterrupted, tmp_path)
    actual = final_weights(output_dir, tmp_path)
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), f"{what}: {key} differs"
