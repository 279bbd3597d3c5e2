"""All three phases with the deep teachers and the DAGFM+ student."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_dagfm.data.reader import ParquetSplit, SplitReader, load_schema
from kd_dagfm.model import KDDAGFM
from kd_dagfm.phases import Phase
from kd_dagfm.pipeline import format_results, run_pipeline
from kd_dagfm.train.checkpoint import read_model_file
from tests.conftest import tiny_config

# (teacher, student, student_type, extra config), with the expected names.
CASES = [
    ("dcnv2", "dagfm_plus", "inner", {"t_dcn_structure": "stacked"}),
    ("xdeepfm", "dagfm", "outer", {}),
    ("autoint", "dagfm_plus", "outer", {}),
]
NAMES = {
    "dcnv2": ("DCNv2", "DAGFM+-inner"),
    "xdeepfm": ("xDeepFM", "DAGFM-outer"),
    "autoint": ("AutoInt+", "DAGFM+-outer"),
}


def load_model(output_dir: Path, phase: Phase, config) -> KDDAGFM:
    data = read_model_file(str(output_dir / phase.value / "model.pt"))
    schema = load_schema(str(output_dir / "data" / "synthetic-6000-5-8-2022"))
    model = KDDAGFM(schema, config.model)
    model.load_state_dict(data["model"])
    return model.eval()


@pytest.mark.parametrize(("teacher", "student", "student_type", "extra"), CASES)
def test_three_phases_run(
    tmp_path: Path,
    teacher: str,
    student: str,
    student_type: str,
    extra: dict[str, object],
) -> None:
    config = tiny_config(
        tmp_path,
        teacher=teacher,
        student=student,
        student_type=student_type,
        t_mlp=[16, 16],
        student_mlp=[16, 16],
        t_attention_layers=2,
        t_attention_dim=8,
        **extra,
    )
    results = run_pipeline(config)

    assert [r.phase for r in results] == list(Phase)
    teacher_name, student_name = NAMES[teacher]
    assert [r.model_name for r in results] == [teacher_name, student_name, student_name]
    for result in results:
        assert 0.5 < result.test.auc <= 1.0
        assert result.test.examples == 600
        assert result.tower_parameters > 0
        assert result.flops_per_example > 0
    assert f"teacher_training | {teacher_name}" in format_results(results)

    # Distillation moved the student toward the frozen teacher.
    dataset = str(tmp_path / "data" / "synthetic-6000-5-8-2022")
    split = ParquetSplit(dataset, "test", load_schema(dataset))
    batch = next(
        iter(SplitReader(split, 600, shuffle=False, prefetch_batches=0).epoch())
    )
    before = load_model(tmp_path, Phase.TEACHER_TRAINING, config)
    after = load_model(tmp_path, Phase.DISTILLATION, config)
    with torch.no_grad():
        start = before(batch.sparse_features, batch.dense_features, Phase.DISTILLATION)
        end = after(batch.sparse_features, batch.dense_features, Phase.DISTILLATION)
    assert start.teacher_logits is not None and end.teacher_logits is not None
    assert start.student_logits is not None and end.student_logits is not None
    torch.testing.assert_close(start.teacher_logits, end.teacher_logits)
    gap_before = torch.mean((start.student_logits - start.teacher_logits) ** 2)
    gap_after = torch.mean((end.student_logits - end.teacher_logits) ** 2)
    assert gap_after < 0.5 * gap_before
