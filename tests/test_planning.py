"""Meta-device planning of billion-row tables, memory per rank and the errors."""

from __future__ import annotations

import json
import resource

import pytest

from kd_dagfm.cli import main
from kd_dagfm.config import ModelConfig, build_config
from kd_dagfm.errors import ConfigError
from kd_dagfm.planning import (
    CRITEO_1TB_CARDINALITIES,
    GiB,
    billion_row_schema,
    criteo_1tb_schema,
    make_cluster,
    plan_model,
    plan_schema,
    row_bytes,
)

D16 = ModelConfig(embedding_size=16)


@pytest.mark.parametrize(
    ("precision", "optimizer", "weights", "state"),
    [
        ("fp32", "sgd", 64, 0),
        ("fp32", "adagrad", 64, 64),
        ("fp32", "rowwise_adagrad", 64, 4),
        ("fp32", "adam", 64, 128),
        ("fp16", "rowwise_adagrad", 32, 4),
        ("fp16", "adam", 32, 128),
        ("int8", "rowwise_adagrad", 24, 4),
    ],
)
def test_row_bytes(precision: str, optimizer: str, weights: int, state: int) -> None:
    per_row = row_bytes(16, precision, optimizer)
    assert per_row.weights == weights
    assert per_row.optimizer_state == state


def test_billion_rows_on_gpus_without_allocating() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    report = plan_model(
        billion_row_schema(),
        D16,
        make_cluster("h100-80gb", 8),
        optimizer="rowwise_adagrad",
        global_batch_size=65_536,
    )
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 512  # the 64 GB table was never allocated

    big = next(t for t in report.tables if t.name == "t_item_id")
    assert sum(rows for _, rows, _ in big.shards) == 1_000_000_000
    assert big.compute_kernel == "fused"
    rows = 1_000_000_000 + 7 * 100_000
    assert report.total_weights_bytes == rows * 64
    assert report.total_optimizer_bytes == rows * 4
    for usage in report.ranks:
        assert usage.total_bytes <= report.capacity_bytes
        assert usage.planner_bytes is not None
        # TorchRec's estimate adds only small input/output buffers for fp32.
        assert usage.planner_bytes == pytest.approx(
            usage.total_bytes, rel=0.01, abs=2**24
        )
    # 81,559 MiB of HBM minus the 15% margin and the small dense reservation.
    assert report.capacity_bytes == pytest.approx(81_559 * 2**20 * 0.85, rel=0.01)


def test_billion_rows_on_cpu_needs_row_wise() -> None:
    cluster = make_cluster("cpu", 2)
    with pytest.raises(ConfigError) as error:
        plan_model(billion_row_schema(), D16, cluster, optimizer="adagrad")
    message = str(error.value)
    assert "do not fit on 2 CPU ranks (cpu)" in message
    assert (
        "1,000,700,000 rows x 128 bytes (64 of fp32 weights + 64 of adagrad" in message
    )
    assert "sharding=row_wise: the largest table (119.21 GiB)" in message
    assert "embedding_optimizer=rowwise_adagrad" in message

    report = plan_model(
        billion_row_schema(), D16, cluster, optimizer="adagrad", sharding="row_wise"
    )
    big = next(t for t in report.tables if t.name == "t_item_id")
    assert big.sharding_type == "row_wise"
    assert [rows for _, rows, _ in big.shards] == [500_000_000, 500_000_000]
    assert report.ranks[0].weights_bytes == (500_000_000 + 7 * 50_000) * 64
    assert report.ranks[0].planner_bytes is None  # manual plan


def test_unfit_config_lists_numbers_and_fixes() -> None:
    with pytest.raises(ConfigError) as error:
        plan_model(
            billion_row_schema(),
            ModelConfig(embedding_size=128),
            make_cluster("h100-80gb", 8),
            optimizer="adam",
        )
    message = str(error.value)
    assert (
        "1,000,700,000 rows x 1536 bytes (512 of fp32 weights + 1024 of adam" in message
    )
    assert "= 1,431.51 GiB, 178.94 GiB per rank even when split evenly" in message
    assert "more ranks: at least 22 ranks" in message
    assert "fp16 weights: 149.12 GiB per rank" in message
    assert "embedding_size=48" in message
    assert "embedding_optimizer=rowwise_adagrad" in message
    assert "--allow_uvm" in message


def test_uvm_holds_what_hbm_cannot() -> None:
    report = plan_model(
        billion_row_schema(),
        ModelConfig(embedding_size=128),
        make_cluster("h100-80gb", 8),
        optimizer="adam",
        allow_uvm=True,
    )
    big = next(t for t in report.tables if t.name == "t_item_id")
    assert big.compute_kernel.startswith("fused_uvm")
    assert max(r.host_bytes for r in report.ranks) > 100 * GiB


def test_criteo_1tb_on_sixteen_h200() -> None:
    schema = criteo_1tb_schema()
    assert len(schema.sparse_features) == 26
    assert len(schema.dense_features) == 13
    report = plan_model(
        schema,
        ModelConfig(embedding_size=128),
        make_cluster("h200-141gb", 16),
        optimizer="adam",
        global_batch_size=65_536,
    )
    assert len(report.tables) == 26
    for table in report.tables:
        assert sum(rows for _, rows, _ in table.shards) >= table.rows
    rows = sum(CRITEO_1TB_CARDINALITIES)
    assert report.total_weights_bytes >= rows * 128 * 4
    assert max(r.total_bytes for r in report.ranks) <= report.capacity_bytes


def test_plan_schema_from_config() -> None:
    config = build_config({"synthetic_fields": 5, "synthetic_vocab_size": 30})
    schema = plan_schema(config, None)
    assert [f.num_embeddings for f in schema.sparse_features] == [30] * 5
    assert plan_schema(config, "criteo_1tb").num_fields == 39
    with pytest.raises(ConfigError, match="unknown hardware 'tpu'"):
        make_cluster("tpu", 8)


def test_plan_command(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--tables", "billion", "--embedding_optimizer", "rowwise_adagrad"]
    code = main([*argv, "--hardware", "h200-141gb", "--num_ranks", "8,16", "--json"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    reports = [json.loads(line) for line in lines]
    assert [r["cluster"]["world_size"] for r in reports] == [8, 16]
    for report in reports:
        assert sum(r["weights_bytes"] for r in report["ranks"]) == 1_000_700_000 * 64

    code = main([*argv, "--embedding_size", "512", "--num_ranks", "8"])
    assert code == 2
    output = capsys.readouterr().out
    assert "== 8 GPUs (h100-80gb): does not fit" in output
    assert "more ranks: at least" in output
