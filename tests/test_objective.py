"""The per-phase losses and what each weight multiplies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_dagfm.model import ModelOutput
from kd_dagfm.objective import KDObjective
from kd_dagfm.phases import Phase

LABELS = torch.tensor([1.0, 0.0, 1.0])
STUDENT = torch.tensor([0.5, -1.0, 2.0])
TEACHER = torch.tensor([1.0, -2.0, 1.5])


def test_distillation_weights() -> None:
    """ctr_loss_weight (alpha) multiplies the BCE, kd_loss_weight (beta) the MSE."""
    bce = F.binary_cross_entropy_with_logits(STUDENT, LABELS).item()
    mse = ((0.5 - 1.0) ** 2 + (-1.0 + 2.0) ** 2 + (2.0 - 1.5) ** 2) / 3
    output = ModelOutput(TEACHER, STUDENT)
    loss, parts = KDObjective(ctr_loss_weight=1.0, kd_loss_weight=0.0)(
        output, LABELS, Phase.DISTILLATION
    )
    assert loss.item() == pytest.approx(bce)
    loss, parts = KDObjective(ctr_loss_weight=0.0, kd_loss_weight=1.0)(
        output, LABELS, Phase.DISTILLATION
    )
    assert loss.item() == pytest.approx(mse)
    loss, parts = KDObjective(0.1, 921.6)(output, LABELS, Phase.DISTILLATION)
    assert loss.item() == pytest.approx(0.1 * bce + 921.6 * mse)
    assert parts["kd_mse"].item() == pytest.approx(mse)


def test_distillation_gradient_skips_teacher() -> None:
    teacher = TEACHER.clone().requires_grad_()
    student = STUDENT.clone().requires_grad_()
    loss, _ = KDObjective(0.1, 1.0)(
        ModelOutput(teacher, student), LABELS, Phase.DISTILLATION
    )
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_teacher_and_finetuning_use_bce() -> None:
    objective = KDObjective(0.1, 921.6)
    loss, _ = objective(ModelOutput(TEACHER, None), LABELS, Phase.TEACHER_TRAINING)
    assert loss.item() == pytest.approx(
        F.binary_cross_entropy_with_logits(TEACHER, LABELS).item()
    )
    loss, _ = objective(ModelOutput(None, STUDENT), LABELS, Phase.FINETUNING)
    assert loss.item() == pytest.approx(
        F.binary_cross_entropy_with_logits(STUDENT, LABELS).item()
    )
