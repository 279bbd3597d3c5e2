"""CIN teacher: xDeepFM's compressed interaction network (Lian et al., KDD 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class CIN(nn.Module):
    """Explicit vector-wise interactions, as in RecBole 1.2.1's KD_DAGFM teacher.

    Layer k computes, per embedding dimension d,
    X^k[o, d] = sum_{h, f} W^k[o, h, f] X^{k-1}[h, d] X^0[f, d] + b^k[o]
    (a 1 x 1 convolution over the H_{k-1} * F outer products). Every layer is
    summed over D; the concatenation (B X sum H_k) goes through a linear head
    without bias. No activation and no split-half, as in the reference.

    Args:
        num_fields: F (= H_0).
        layer_sizes: H_1 .. H_K.
    """

    def __init__(self, num_fields: int, layer_sizes: Sequence[int]) -> None:
        super().__init__()
        sizes = [num_fields, *layer_sizes]
        self.layers = nn.ModuleList(
            nn.Conv1d(sizes[k] * num_fields, sizes[k + 1], kernel_size=1)
            for k in range(len(layer_sizes))
        )
        self.head = nn.Linear(sum(layer_sizes), 1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in self.layers:
            assert isinstance(conv, nn.Conv1d)
            conv.reset_parameters()
        # The reference draws the head from N(0, 0.01^2); it multiplies sums
        # over D of products of embeddings, so a small head keeps the initial
        # logits near zero.
        nn.init.normal_(self.head.weight, mean=0.0, std=0.01)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings: E, (B X F X D).

        Returns:
            logits: (B,).
        """
        batch, num_fields, dim = embeddings.shape
        x = embeddings
        pooled = []
        for conv in self.layers:
            assert isinstance(conv, nn.Conv1d)
            outer = x.unsqueeze(2) * embeddings.unsqueeze(1)  # (B, H, F, D)
            outer = outer.reshape(batch, -1, dim)  # (B, H * F, D)
            x = conv(outer)  # (B, H_next, D)
            pooled.append(x.sum(dim=-1))  # (B, H_next)
        return self.head(torch.cat(pooled, dim=-1)).squeeze(-1)
