"""The billion-row path at a small size: meta-device tables, row-wise on 2 ranks.

Runs the same job as jobs/bench_scale.py (Zipf data written in chunks,
``table_init=sharded``, row-wise sharding, fused row-wise Adagrad, all three
phases) with a 100,000-row item table, in spawned gloo ranks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.bench_scale import format_summary, run_scale
from kd_dagfm.config import build_config
from kd_dagfm.data.zipf import ZipfDatasetSpec, sample_zipf_ranks, write_zipf_dataset
from kd_dagfm.errors import ConfigError
from kd_dagfm.pipeline import local_engine_factory


def test_zipf_ranks_follow_the_power_law() -> None:
    rng = np.random.default_rng(0)
    ranks = sample_zipf_ranks(rng, 400_000, 1_000_000, 1.05)
    assert ranks.min() >= 1
    assert ranks.max() <= 1_000_000
    # Continuous power law: P(rank 1) = (1 - 2^-0.05) / (1 - 1000001^-0.05).
    head = (1 - 2**-0.05) / (1 - 1_000_001**-0.05)
    assert (ranks == 1).mean() == pytest.approx(head, abs=0.005)
    # P(rank <= 1000) = (1 - 1001^-0.05) / (1 - 1000001^-0.05).
    top = (1 - 1001**-0.05) / (1 - 1_000_001**-0.05)
    assert (ranks <= 1000).mean() == pytest.approx(top, abs=0.005)


def test_zipf_dataset_splits_and_ids(tmp_path: Path) -> None:
    spec = ZipfDatasetSpec(rows=10_000, item_rows=5_000, num_raw_ids=50_000)
    schema = write_zipf_dataset(str(tmp_path / "data"), spec, chunk_rows=3_000)
    assert schema.feature("item_id").num_embeddings == 5_000
    counts = {}
    for split in ("train", "valid", "test"):
        table = pq.read_table(tmp_path / "data" / split)
        counts[split] = table.num_rows
        items = table.column("item_id").to_numpy()
        assert items.min() >= 0
        assert items.max() < 5_000
    assert counts == {"train": 8_000, "valid": 1_000, "test": 1_000}
    labels = pq.read_table(tmp_path / "data" / "train").column("label").to_numpy()
    assert 0.1 < labels.mean() < 0.6


def test_sharded_table_init_needs_sharded_engine(tmp_path: Path) -> None:
    config = build_config({"table_init": "sharded", "output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="table_init=sharded leaves the embedding"):
        local_engine_factory(config)


def test_row_wise_meta_tables_two_ranks(tmp_path: Path) -> None:
    spec = ZipfDatasetSpec(rows=24_000, item_rows=100_000, num_raw_ids=200_000)
    result = run_scale(
        spec, str(tmp_path), world_size=2, train_batch_size=512, timeout_s=600
    )
    ranks = result["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for report in ranks:
        phases = [p["phase"] for p in report["phases"]]
        assert phases == ["teacher_training", "distillation", "finetuning"]
        for phase in report["phases"]:
            assert phase["train_examples_per_s"] > 0
            assert (
                phase["valid"]["auc"] > 0.52
            )  # the item and cross effects are learnable
            assert phase["peak_rss_bytes"] > 0
    # Both ranks see the same synced metrics.
    assert ranks[0]["phases"][2]["test"] == ranks[1]["phases"][2]["test"]
    assert not (tmp_path / "run").exists()  # checkpoints removed
    assert "| finetuning |" in format_summary(result)
