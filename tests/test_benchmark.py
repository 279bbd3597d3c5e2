"""The benchmark job in --quick mode, and the helpers it is built from."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from jobs import benchmark, recbole_compare
from kd_dagfm.bench.cost import percentile
from kd_dagfm.bench.report import mean_std, replace_section
from kd_dagfm.bench.roofline import ByteCounterMode, MachinePeak, StepCost, count_step

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_quick_benchmark_writes_every_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing_venv = tmp_path / "no-recbole"
    code = benchmark.main(
        [
            "--quick",
            "--output_dir",
            str(tmp_path / "bench"),
            "--recbole_venv",
            str(missing_venv),
        ]
    )
    assert code == 0
    # The job logs to stderr why RecBole did not run.
    logged = capsys.readouterr().err
    assert (
        f"RecBole comparison skipped: RecBole's environment {missing_venv} does "
        "not exist" in logged
    )

    document = (tmp_path / "bench" / "BENCHMARKS.md").read_text()
    for name in ("run", "accuracy", "curves", "cost", "speed"):
        assert f"<!-- benchmark-job:{name}:begin -->" in document
        assert f"<!-- benchmark-job:{name}:end -->" in document
    assert "RecBole did not run" in document

    # Accuracy: 3 datasets x (2 teachers x 3 phases + the no-teacher student).
    rows = [
        line
        for line in document.splitlines()
        if re.match(r"\| (synthetic|ml-100k|criteo-sample) \|", line)
    ]
    assert len(rows) == 21
    aucs = [float(m) for m in re.findall(r"\| (0\.\d{4}) ± \d\.\d{4} \|", document)]
    assert len(aucs) == 21
    assert all(0.0 <= auc <= 1.0 for auc in aucs)
    assert "DAGFM from scratch (no teacher)" in document

    # Cost: each student's FLOPs as a percentage of each teacher's.
    assert re.search(
        r"\| CrossNet \(depth 2\) \| [\d,]+ \| [\d,]+ \| [\d,]+ \|", document
    )
    assert re.search(r"\| \d+\.\d % \| \d+\.\d % \|", document)

    images = tmp_path / "bench" / "benchmarks"
    for image in (
        "auc_vs_flops.png",
        "curves_synthetic.png",
        "curves_ml-100k.png",
        "curves_criteo-sample.png",
    ):
        assert (images / image).read_bytes()[:8] == PNG_SIGNATURE

    record = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    speeds = record["speed"]["ours"]
    assert [s["phase"] for s in speeds] == [
        "teacher_training",
        "distillation",
        "finetuning",
    ]
    assert all(s["examples_per_s"] > 0 and s["examples_per_cpu_s"] > 0 for s in speeds)
    assert record["speed"]["recbole"] == []
    steps = record["roofline"]["steps"]
    # The CrossNet teacher step has the most matmul FLOPs, finetuning the fewest.
    assert (
        steps["teacher_training"]["flops_per_example"]
        > steps["distillation"]["flops_per_example"]
        > steps["finetuning"]["flops_per_example"]
    )
    assert record["roofline"]["peak"]["matmul_gflops"] > 0


def test_replace_section_keeps_other_text() -> None:
    document = "# Benchmarks\n\n## Theirs\n\nkeep me\n"
    first = replace_section(document, "speed", "## Speed\n\nv1")
    assert first.startswith(document)
    assert "v1" in first
    second = replace_section(
        first + "\n## Later\n\nalso kept\n", "speed", "## Speed\n\nv2"
    )
    assert "v1" not in second
    assert "v2" in second
    assert "keep me" in second
    assert "also kept" in second
    assert second.count("<!-- benchmark-job:speed:begin -->") == 1


def test_byte_counter_counts_inputs_and_outputs() -> None:
    a = torch.ones(8, 4)
    b = torch.ones(4, 3)
    counter = ByteCounterMode()
    with counter:
        torch.mm(a, b)  # reads 32 + 12 floats, writes 24
        a.t()  # a view: no bytes
    assert counter.bytes == (32 + 12 + 24) * 4


def test_count_step_of_a_linear_layer() -> None:
    weight = torch.nn.Parameter(torch.ones(4, 8))
    x = torch.ones(16, 8)

    def step() -> None:
        weight.grad = None
        (x @ weight.t()).sum().backward()

    cost = count_step(step, batch_size=16)
    # Forward x @ W^T and backward dW = g^T x: 2 * 8 * 4 FLOPs each per row.
    assert cost.flops_per_example == 2 * (2 * 8 * 4)
    assert cost.bytes_per_example > (8 + 4) * 4


def test_roofline_bound_picks_the_slower_term() -> None:
    peak = MachinePeak(
        threads=1,
        matmul_gflops=100.0,
        matmul_size=1024,
        bandwidth_gbs=10.0,
        copy_mib=64,
    )
    compute_bound = StepCost(flops_per_example=1e6, bytes_per_example=1e3)
    memory_bound = StepCost(flops_per_example=1e3, bytes_per_example=1e6)
    assert compute_bound.bound_examples_per_s(peak) == pytest.approx(1e5)
    assert compute_bound.bound_kind(peak) == "compute"
    assert memory_bound.bound_examples_per_s(peak) == pytest.approx(1e4)
    assert memory_bound.bound_kind(peak) == "memory"


def test_percentile_and_spread() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50.0) == pytest.approx(50.5)
    assert percentile(values, 99.0) == pytest.approx(99.01)
    mean, spread = mean_std([0.70, 0.72, 0.74])
    assert mean == pytest.approx(0.72)
    assert spread == pytest.approx(0.02)
    assert mean_std([0.5]) == (0.5, 0.0)


@pytest.mark.skipif(
    recbole_compare.recbole_python(recbole_compare.DEFAULT_VENV) is None,
    reason="RecBole's environment .venv-recbole is missing; create it with "
    "bash scripts/setup_recbole_venv.sh",
)
def test_recbole_side_by_side(tmp_path: Path) -> None:
    comparison = recbole_compare.compare(tmp_path, epochs=1, repeats=1, threads=1)
    assert comparison.skipped_reason == ""
    assert comparison.data_identical is True
    assert [s.phase for s in comparison.recbole] == [s.phase for s in comparison.ours]
    for ours, theirs in zip(comparison.ours, comparison.recbole):
        assert theirs.system == "RecBole 1.2.1"
        # Same architecture and sizes: the towers have equal parameter counts.
        assert ours.tower_parameters == theirs.tower_parameters
        assert theirs.examples_per_epoch == 80_000
        assert ours.examples_per_epoch == 39 * 2048
        assert theirs.examples_per_s > 0
        assert 0.5 < theirs.test_auc[0] < 1.0
