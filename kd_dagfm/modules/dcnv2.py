"""DCNv2 teacher: a full-rank cross network with an MLP (Wang et al., WWW 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kd_dagfm.modules.mlp import MLP

DCN_STRUCTURES = ("parallel", "stacked", "stacked_parallel")


class CrossNetV2(nn.Module):
    """x_{l+1} = x_0 * (W_l x_l + b_l) + x_l with full-rank W_l, returning x_L.

    Args:
        width: F * D.
        depth: number of cross layers.
    """

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.weight = nn.Parameter(torch.empty(depth, width, width))  # (L, FD, FD)
        self.bias = nn.Parameter(torch.empty(depth, width))  # (L, FD)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Xavier-normal weights and zero biases, as FuxiCTR initialises the
        # nn.Linear of each CrossNetV2 layer.
        with torch.no_grad():
            for layer in range(self.depth):
                nn.init.xavier_normal_(self.weight[layer])
            nn.init.zeros_(self.bias)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x0: vec(E), (B X FD).

        Returns:
            x_L: (B X FD).
        """
        x = x0
        for layer in range(self.depth):
            x = x0 * torch.addmm(self.bias[layer], x, self.weight[layer].t()) + x
        return x


class DCNv2(nn.Module):
    """Cross network and MLP over x_0 = vec(E), combined as FuxiCTR's DCNv2 does.

    - ``parallel``: logit = w^T [x_L ; MLP(x_0)] + b.
    - ``stacked``: logit = w^T MLP(x_L) + b.
    - ``stacked_parallel``: logit = w^T [MLP_s(x_L) ; MLP_p(x_0)] + b.

    Args:
        num_fields: F.
        embedding_dim: D.
        cross_layers: cross layers L.
        mlp_sizes: hidden sizes of each MLP.
        structure: one of ``parallel``, ``stacked``, ``stacked_parallel``.
        dropout: dropout after each hidden MLP layer.
    """

    def __init__(
        self,
        num_fields: int,
        embedding_dim: int,
        cross_layers: int,
        mlp_sizes: Sequence[int],
        structure: str = "parallel",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if structure not in DCN_STRUCTURES:
            raise ValueError(
                f"invalid structure {structure!r}: expected one of "
                f"{', '.join(DCN_STRUCTURES)}"
            )
        if not mlp_sizes:
            raise ValueError("DCNv2 needs at least one MLP layer; mlp_sizes is empty")
        width = num_fields * embedding_dim
        self.structure = structure
        self.cross = CrossNetV2(width, cross_layers)
        self.stacked_mlp: MLP | None = None
        self.parallel_mlp: MLP | None = None
        head_width = 0
        if structure in ("stacked", "stacked_parallel"):
            self.stacked_mlp = MLP(width, mlp_sizes, dropout)
            head_width += self.stacked_mlp.output_dim
        else:
            head_width += width
        if structure in ("parallel", "stacked_parallel"):
            self.parallel_mlp = MLP(width, mlp_sizes, dropout)
            head_width += self.parallel_mlp.output_dim
        self.head = nn.Linear(head_width, 1)
        nn.init.xavier_normal_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings: E, (B X F X D).

        Returns:
            logits: (B,).
        """
        x0 = embeddings.flatten(start_dim=1)  # (B, FD)
        crossed = self.cross(x0)  # (B, FD)
        parts = [crossed if self.stacked_mlp is None else self.stacked_mlp(crossed)]
        if self.parallel_mlp is not None:
            parts.append(self.parallel_mlp(x0))  # (B, H)
        return self.head(torch.cat(parts, dim=-1)).squeeze(-1)
