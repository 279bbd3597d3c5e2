"""DAGFM+ (the KD-DAGFM+ student): DAGFM layer states read out by an MLP.

Tian et al., WSDM 2023, distil implicit as well as explicit interactions into
KD-DAGFM+. The authors' code (``DeepDAGFM`` in GitHub Ethan-TZ/DAGFM) sums
the layer states h^0 + h^1 + ... + h^L, flattens the sum and feeds it to an
MLP; RecBole 1.2.1 has no KD-DAGFM+.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kd_dagfm.modules.dagfm import DAGFM
from kd_dagfm.modules.mlp import MLP


class DeepDAGFM(DAGFM):
    """logit = MLP(vec(h^0 + h^1 + ... + h^L)).

    The DAG propagation (C, p, q, the edge mask) is DAGFM's; the linear
    readout over per-layer sums is replaced by an MLP over the summed
    states, so the student also learns interactions no DAG edge expresses.

    Args:
        num_fields: F.
        embedding_dim: D.
        depth: L.
        interaction: ``"inner"`` or ``"outer"``.
        mlp_sizes: hidden sizes of the MLP (a one-unit output layer follows).
        dropout: dropout after each hidden MLP layer.
    """

    def __init__(
        self,
        num_fields: int,
        embedding_dim: int,
        depth: int,
        interaction: str,
        mlp_sizes: Sequence[int],
        dropout: float = 0.0,
    ) -> None:
        super().__init__(num_fields, embedding_dim, depth, interaction, readout=False)
        self.mlp = MLP(num_fields * embedding_dim, mlp_sizes, dropout, output_dim=1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings: E, (B X F X D).

        Returns:
            logits: (B,).
        """
        states = self._batch_last_states(embeddings)  # each (F, D, B)
        summed = torch.stack(states).sum(dim=0)  # (F, D, B)
        flat = summed.permute(2, 0, 1).reshape(embeddings.shape[0], -1)  # (B, F * D)
        return self.mlp(flat).squeeze(-1)  # (B,)
