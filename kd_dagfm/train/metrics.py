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

    def __init__(self, device: torch.device | None = None) -> None:
        # NCCL gathers only CUDA tensors, so the state lives on the rank's device.
        self.device = device or torch.device("cpu")
        self.auc = BinaryAUROC(thresholds=None).to(self.device)
        self.log_loss = MeanMetric().to(self.device)
        self.examples = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.detach().float().to(self.device)
        labels = labels.detach().float().to(self.device)
        self.auc.update(torch.sigmoid(logits), labels.long())
        losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        self.log_loss.update(losses)
        self.examples += int(labels.numel())

    def compute(self) -> EvalResult:
        examples = torch.tensor(self.examples, device=self.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(examples)
        return EvalResult(
            auc=float(self.auc.compute()),
            log_loss=float(self.log_loss.compute()),
            examples=int(examples),
        )
