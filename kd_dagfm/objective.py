"""Per-phase training losses, including the distillation objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_dagfm.model import ModelOutput
from kd_dagfm.phases import Phase


class KDObjective(nn.Module):
    """Loss of one phase.

    - teacher_training: BCE(teacher logit, label).
    - distillation: ``ctr_loss_weight * BCE(student logit, label)
      + kd_loss_weight * mean((student logit - teacher logit)^2)``, on raw
      logits without temperature. With RecBole's defaults (alpha 0.1,
      beta 921.6) the MSE term dominates.
    - finetuning: BCE(student logit, label).

    Args:
        ctr_loss_weight: weight of the click loss (RecBole ``alpha``).
        kd_loss_weight: weight of the logit-matching loss (RecBole ``beta``).
    """

    def __init__(self, ctr_loss_weight: float, kd_loss_weight: float) -> None:
        super().__init__()
        self.ctr_loss_weight = ctr_loss_weight
        self.kd_loss_weight = kd_loss_weight

    def forward(
        self, output: ModelOutput, labels: torch.Tensor, phase: Phase
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the loss to minimise and its detached parts for logging."""
        if phase is Phase.TEACHER_TRAINING:
            assert output.teacher_logits is not None
            loss = F.binary_cross_entropy_with_logits(output.teacher_logits, labels)
            return loss, {"bce": loss.detach()}

        assert output.student_logits is not None
        bce = F.binary_cross_entropy_with_logits(output.student_logits, labels)
        if phase is Phase.FINETUNING:
            return bce, {"bce": bce.detach()}

        assert output.teacher_logits is not None
        mse = F.mse_loss(output.student_logits, output.teacher_logits.detach())
        loss = self.ctr_loss_weight * bce + self.kd_loss_weight * mse
        return loss, {"bce": bce.detach(), "kd_mse": mse.detach()}
