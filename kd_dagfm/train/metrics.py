"""AUC and log loss over a whole split, across ranks, with torchmetrics."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC


@dataclasses.dataclass(frozen=True)
class EvalResult:
    auc: float
    log_loss: float
    examples: int


class BinaryCTRMetrics:
    """Exact AUC (every prediction kept) and mean log loss.

    Under ``torch.distributed`` both metrics gather their state from every
    rank in :meth:`compute`, so the result covers the whole split rather
    than one rank's part.
    """

    def __init__(self) -> None:
        self.auc = BinaryAUROC(thresholds=None)
        self.log_loss = MeanMetric()
        self.examples = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.detach().float().cpu()
        labels = labels.detach().float().cpu()
        self.auc.update(torch.sigmoid(logits), labels.long())
        losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        self.log_loss.update(losses)
        self.examples += int(labels.numel())

    def compute(self) -> EvalResult:
        examples = torch.tensor(self.examples)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(examples)
        return EvalResult(
            auc=float(self.auc.compute()),
            log_loss=float(self.log_loss.compute()),
            examples=int(examples),
        )
