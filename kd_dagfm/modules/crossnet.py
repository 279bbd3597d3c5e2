"""CrossNet teacher (the cross network of DCN, Wang et al. 2017) with full-rank W."""

from __future__ import annotations

import torch
from torch import nn


class CrossNet(nn.Module):
    """x_{l+1} = x_0 * (W_l x_l + b_l) + x_l on x_0 = vec(E), then a linear head.

    Args:
        num_fields: F.
        embedding_dim: D; the cross layers work on F * D features.
        depth: number of cross layers.
    """

    def __init__(self, num_fields: int, embedding_dim: int, depth: int) -> None:
        super().__init__()
        width = num_fields * embedding_dim
        self.depth = depth
        self.weight = nn.Parameter(torch.empty(depth, width, width))  # W_l: (L, FD, FD)
        self.bias = nn.Parameter(torch.empty(depth, width))  # b_l: (L, FD)
        self.head = nn.Linear(width, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # RecBole 1.2.1 draws W_l with std 1, so W_l x_l is sqrt(F * D) (25x at
        # F * D = 624) larger than x_l and each layer multiplies the scale of
        # the output. Xavier-normal (std sqrt(1 / (F * D)) for a square W)
        # keeps W_l x_l at the scale of x_l, so the cross terms start small
        # next to the residual x_l and training starts from a near-linear
        # model at any depth and width.
        with torch.no_grad():
            for layer in range(self.depth):
                nn.init.xavier_normal_(self.weight[layer])
            nn.init.zeros_(self.bias)
        self.head.reset_parameters()

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings: E, (B X F X D).

        Returns:
            logits: (B,).
        """
        x0 = embeddings.flatten(start_dim=1)  # (B, FD)
        x = x0
        for layer in range(self.depth):
            # W_l x_l for every row: x_l @ W_l^T, (B, FD).
            x = x0 * torch.addmm(self.bias[layer], x, self.weight[layer].t()) + x
        return self.head(x).squeeze(-1)
