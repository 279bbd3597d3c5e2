"""Shared fixtures: real data from ../shared/data and small run configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kd_dagfm.config import RunConfig, build_config
from kd_dagfm.data.recbole import convert_recbole

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(
    os.environ.get("KD_DAGFM_SHARED_DATA", REPO.parent / "shared" / "data")
)

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def shared_path(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(
            f"test data {path} is missing; tests read the real datasets from "
            "../shared/data beside the checkout (or KD_DAGFM_SHARED_DATA)"
        )
    return path


@pytest.fixture(scope="session")
def ml100k_atomic() -> Path:
    return shared_path("ml-100k")


@pytest.fixture(scope="session")
def ml100k_dataset(
    tmp_path_factory: pytest.TempPathFactory, ml100k_atomic: Path
) -> str:
    """MovieLens-100K converted to a Parquet dataset (RecBole's protocol)."""
    output = tmp_path_factory.mktemp("ml100k") / "dataset"
    convert_recbole(str(ml100k_atomic), str(output))
    return str(output)


def tiny_config(output_dir: Path, **overrides: object) -> RunConfig:
    """A model and run small enough for a test to train in a second or two."""
    values: dict[str, object] = {
        "dataset": "synthetic",
        "synthetic_rows": 6000,
        "synthetic_fields": 5,
        "synthetic_vocab_size": 8,
        "embedding_size": 4,
        "depth": 2,
        "t_depth": 2,
        "t_cin": [6, 6],
        "train_batch_size": 256,
        "eval_batch_size": 1024,
        "epochs": 2,
        "early_stopping_patience": 0,
        "learning_rate": 0.01,
        "log_every_steps": 0,
        "prefetch_batches": 0,
        "output_dir": str(output_dir),
    }
    values.update(overrides)
    return build_config(values)
