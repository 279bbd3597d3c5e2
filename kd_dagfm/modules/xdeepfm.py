"""xDeepFM teacher: CIN + DNN + a linear term (Lian et al., KDD 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kd_dagfm.modules.cin import CIN
from kd_dagfm.modules.mlp import MLP


class XDeepFM(nn.Module):
    """logit = CIN(E) + MLP(vec(E)) + (w^T vec(E) + b).

    The CIN is the teacher of the same name (every layer sum-pooled over D,
    a bias-free head); the MLP ends in a one-unit linear layer, as in
    FuxiCTR's xDeepFM.

    NOTE: FuxiCTR, RecBole and the authors' code give the linear term its own
    one-dimensional embedding per id. Here the teacher only reads the shared
    E, so the linear term is w^T vec(E) + b: still first-order in the ids, but
    its per-id weight <w_f, e_id> is tied to the shared embedding. The next
    step to untie it is a dimension-1 table per field in the SparseArch's
    collection, sharded with the other tables.

    Args:
        num_fields: F.
        embedding_dim: D.
        cin_sizes: CIN layer sizes H_1 .. H_K.
        mlp_sizes: hidden sizes of the DNN.
        dropout: dropout after each hidden DNN layer.
    """

    def __init__(
        self,
        num_fields: int,
        embedding_dim: int,
        cin_sizes: Sequence[int],
        mlp_sizes: Sequence[int],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        width = num_fields * embedding_dim
        self.cin = CIN(num_fields, cin_sizes)
        self.dnn = MLP(width, mlp_sizes, dropout, output_dim=1)
        self.linear = nn.Linear(width, 1)
        nn.init.xavier_normal_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings: E, (B X F X D).

        Returns:
            logits: (B,).
        """
        flat = embeddings.flatten(start_dim=1)  # (B, FD)
        deep = self.dnn(flat).squeeze(-1)  # (B,)
        linear = self.linear(flat).squeeze(-1)  # (B,)
        return self.cin(embeddings) + deep + linear
