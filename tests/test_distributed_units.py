"""Pieces of the sharded engine that need no process group, and the
torchrun launcher end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torchrec import EmbeddingBagCollection
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

from kd_dagfm.data.batch import table_to_batch
from kd_dagfm.data.synthetic import generate_synthetic
from kd_dagfm.distributed.alignment import empty_batch, pad_batch
from kd_dagfm.distributed.planning import (
    describe_plan,
    embedding_bytes_per_rank,
    format_bytes,
    host_memory_bytes,
    manual_generators,
    manual_plan,
)
from kd_dagfm.distributed.spawn import free_port
from kd_dagfm.errors import ConfigError
from kd_dagfm.modules.sparse import embedding_bag_configs
from kd_dagfm.schema import make_schema
from tests.conftest import REPO


def test_pad_batch_appends_id_zero_rows() -> None:
    schema, splits = generate_synthetic(20, 3, 5, seed=0)
    batch = table_to_batch(splits["train"].slice(0, 3), schema)
    padded = pad_batch(batch, 5)
    assert len(padded) == 5
    assert torch.equal(padded.labels[:3], batch.labels)
    assert torch.equal(padded.labels[3:], torch.zeros(2))
    for key in schema.field_names[1:]:
        ids = padded.sparse_features[key].to_padded_dense(1).flatten()
        original = batch.sparse_features[key].to_padded_dense(1).flatten()
        assert torch.equal(ids[:3], original)
        assert torch.equal(ids[3:], torch.zeros(2, dtype=ids.dtype))


def test_pad_batch_keeps_list_features() -> None:
    import pyarrow as pa

    schema = make_schema("label", {"user": 4, "genre": 6}, lists=["genre"])
    table = pa.table(
        {
            "label": pa.array([1, 0], pa.int8()),
            "user": pa.array([3, 1], pa.int64()),
            "genre": pa.array([[1, 2, 5], []], pa.list_(pa.int64())),
        }
    )
    padded = pad_batch(table_to_batch(table, schema), 4)
    genre = padded.sparse_features["genre"]
    assert genre.lengths().tolist() == [3, 0, 1, 1]
    assert genre.values().tolist() == [1, 2, 5, 0, 0]
    assert padded.sparse_features["user"].values().tolist() == [3, 1, 0, 0]


def test_padding_only_batch_has_schema_features() -> None:
    schema, _ = generate_synthetic(20, 3, 5, seed=0)
    padded = pad_batch(empty_batch(schema), 4)
    assert len(padded) == 4
    assert padded.sparse_features.keys() == ["C1", "C2", "C3"]
    assert padded.sparse_features.lengths().tolist() == [1] * 12
    assert padded.dense_features.shape == (4, 0)


def _collection(rows: dict[str, int], dim: int = 8) -> EmbeddingBagCollection:
    schema = make_schema("label", rows)
    return EmbeddingBagCollection(
        tables=embedding_bag_configs(schema, dim), device=torch.device("meta")
    )


def _manual(
    collection: EmbeddingBagCollection, sharding: str, world_size: int
) -> dict[str, Any]:
    plan = manual_plan(
        collection,
        sharding,
        EmbeddingBagCollectionSharder(),
        world_size,
        world_size,
        torch.device("cpu"),
    )
    return describe_plan(plan)


def test_table_wise_balances_rows() -> None:
    collection = _collection({"a": 1000, "b": 600, "c": 500, "d": 100})
    plan = _manual(collection, "table_wise", 2)
    # Largest first onto the emptier rank: a -> 0, b -> 1, c -> 1, d -> 0.
    assert {t: e["ranks"] for t, e in plan.items()} == {
        "t_a": [0],
        "t_b": [1],
        "t_c": [1],
        "t_d": [0],
    }
    assert plan["t_a"]["shards"] == [[1000, 8, 0, 0, 0]]
    assert {e["compute_kernel"] for e in plan.values()} == {"dense"}


def test_row_and_column_wise_shards() -> None:
    collection = _collection({"a": 11})
    assert _manual(collection, "row_wise", 2)["t_a"]["shards"] == [
        [6, 8, 0, 0, 0],
        [5, 8, 6, 0, 1],
    ]
    assert _manual(collection, "column_wise", 2)["t_a"]["shards"] == [
        [11, 4, 0, 0, 0],
        [11, 4, 0, 4, 1],
    ]
    replicated = _manual(collection, "data_parallel", 2)["t_a"]
    assert replicated["sharding_type"] == "data_parallel"
    assert replicated["shards"] == []


def test_column_wise_needs_divisible_dim() -> None:
    collection = _collection({"a": 10}, dim=6)
    with pytest.raises(ConfigError, match="6 columns over 4 ranks") as error:
        manual_generators(collection, "column_wise", 4, 4)
    assert "embedding_size divisible by 4" in str(error.value)


def test_table_row_wise_needs_full_hosts() -> None:
    with pytest.raises(ConfigError, match="world size 3 is not a multiple of 2"):
        manual_generators(_collection({"a": 10}), "table_row_wise", 3, 2)


def test_unknown_sharding_rejected() -> None:
    with pytest.raises(ConfigError, match="invalid sharding 'grid'"):
        manual_generators(_collection({"a": 10}), "grid", 2, 2)


def test_embedding_bytes_per_rank() -> None:
    plan = {
        "t_a": {
            "sharding_type": "row_wise",
            "shards": [[6, 8, 0, 0, 0], [4, 8, 6, 0, 1]],
        },
        "t_b": {"sharding_type": "data_parallel", "shards": []},
    }
    shapes = {"t_a": (10, 8), "t_b": (3, 8)}
    # Weights 4 bytes each; row-wise Adagrad adds one fp32 value per row.
    assert embedding_bytes_per_rank(plan, shapes, 2, "rowwise_adagrad") == [
        6 * 8 * 4 + 6 * 4 + 3 * 8 * 4 + 3 * 4,
        4 * 8 * 4 + 4 * 4 + 3 * 8 * 4 + 3 * 4,
    ]
    assert embedding_bytes_per_rank(plan, shapes, 2, "adagrad")[1] == 2 * (
        4 * 8 * 4 + 3 * 8 * 4
    )


def test_host_memory_is_positive_and_bounded() -> None:
    available = host_memory_bytes()
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < available <= physical


def test_format_bytes() -> None:
    assert format_bytes(400) == "400 B"
    assert format_bytes(3 * 2**20) == "3.0 MiB"
    assert format_bytes(5 * 2**30) == "5.0 GiB"


# ---------------------------------------------------------------- torchrun


def _launch(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "kd_dagfm.distributed.launch",
        *flags,
        "--output_dir",
        str(tmp_path / "run"),
        "--synthetic_rows",
        "3000",
        "--synthetic_fields",
        "4",
        "--synthetic_vocab_size",
        "8",
        "--embedding_size",
        "4",
        "--depth",
        "2",
        "--t_depth",
        "2",
        "--train_batch_size",
        "128",
        "--eval_batch_size",
        "512",
        "--epochs",
        "1",
        "--max_steps_per_epoch",
        "3",
        "--log_every_steps",
        "0",
    ]
    return subprocess.run(
        command,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.distributed
def test_torchrun_pipeline(tmp_path: Path) -> None:
    done = _launch(
        tmp_path,
        "pipeline",
        "--sharding",
        "row_wise",
        "--embedding_optimizer",
        "rowwise_adagrad",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Rank 0 alone prints the table: one header, one rule, three phases.
    assert done.stdout.count("teacher_training | CrossNet") == 1
    assert done.stdout.count("finetuning       | DAGFM-outer") == 1
    assert "embedding memory per rank" in done.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["phase"] for r in results] == [
        "teacher_training",
        "distillation",
        "finetuning",
    ]
    assert all(r["valid"]["examples"] == 300 for r in results)


@pytest.mark.distributed
def test_launcher_rejects_adam_on_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without torchrun's environment the launcher runs one rank in-process."""
    from kd_dagfm.distributed import launch

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        assert name not in os.environ
    code = launch.main(
        ["train", "--embedding_optimizer", "adam", "--output_dir", str(tmp_path)]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "error (rank 0): embedding_optimizer 'adam' has no fused CPU kernel" in error
    assert "use one of sgd, adagrad, rowwise_adagrad" in error
    assert not torch.distributed.is_initialized()
    assert list(tmp_path.iterdir()) == []
