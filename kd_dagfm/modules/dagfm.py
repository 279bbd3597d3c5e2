"""DAGFM: the directed-acyclic-graph factorization machine student.

Tian et al., "Directed Acyclic Graph Factorization Machines for CTR Prediction
via Knowledge Distillation", WSDM 2023; the math follows RecBole 1.2.1's
``kd_dagfm.py``.
"""

from __future__ import annotations

import torch
from torch import nn


class DAGFM(nn.Module):
    """Learns interactions of order 2 .. L + 1 along a DAG over the fields.

    Field s receives an edge from every field f <= s. Layer l computes, for
    each field s, with h^0 = C E and C initialised to the identity:

    - ``inner``: h^l_s = h^0_s * sum_{f <= s} p_{l,f,s} * h^{l-1}_f
    - ``outer``: h^l_s = h^0_s * sum_{f <= s} <h^{l-1}_f, p_{l,f,s}> q_{l,f,s}

    The readout sums each h^l over D, concatenates layers 0 .. L (B X F(L+1))
    and applies a linear layer.

    Args:
        num_fields: F.
        embedding_dim: D.
        depth: L.
        interaction: ``"inner"`` or ``"outer"``.
        readout: build the linear readout; DAGFM+ passes False and reads the
            layer states through its own MLP instead.

    Example::

        student = DAGFM(num_fields=7, embedding_dim=16, depth=3, interaction="outer")
        logits = student(torch.randn(32, 7, 16))  # (32,)
    """

    edge_mask: torch.Tensor

    def __init__(
        self,
        num_fields: int,
        embedding_dim: int,
        depth: int,
        interaction: str,
        readout: bool = True,
    ) -> None:
        super().__init__()
        if interaction not in ("inner", "outer"):
            raise ValueError(
                f"invalid interaction {interaction!r}: expected inner or outer"
            )
        self.interaction = interaction
        self.depth = depth
        self.field_mixing = nn.Parameter(torch.eye(num_fields))  # C: (F, F)
        shape = (depth, num_fields, num_fields, embedding_dim)  # (L, F, F, D)
        self.p = nn.Parameter(torch.empty(shape))
        self.q = nn.Parameter(torch.empty(shape)) if interaction == "outer" else None
        # Edge f -> s exists when f <= s: upper triangle, diagonal included.
        self.register_buffer(
            "edge_mask",
            torch.ones(num_fields, num_fields).triu().unsqueeze(-1),
            persistent=False,
        )  # (F, F, 1)
        self.readout = nn.Linear(num_fields * (depth + 1), 1) if readout else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Xavier-normal with gain 1.414 per layer, as RecBole and the authors'
        # code do; for an (F, F, D) slice std = 1.414 / sqrt(F * D).
        with torch.no_grad():
            nn.init.eye_(self.field_mixing)
            for layer in range(self.depth):
                nn.init.xavier_normal_(self.p[layer], gain=1.414)
                if self.q is not None:
                    nn.init.xavier_normal_(self.q[layer], gain=1.414)
        if self.readout is not None:
            self.readout.reset_parameters()

    def layer_states(self, embeddings: torch.Tensor) -> list[torch.Tensor]:
        """Return h^0 .. h^L, each (B X F X D) (views of batch-last tensors)."""
        return [h.permute(2, 0, 1) for h in self._batch_last_states(embeddings)]

    def _batch_last_states(self, embeddings: torch.Tensor) -> list[torch.Tensor]:
        """Return h^0 .. h^L, each (F X D X B), the batch dimension innermost.

        With B innermost, every contraction over F or D is a batched matmul
        whose large dimension is B, and the elementwise products and the
        readout's sums run on contiguous memory. On a CPU this is several
        times faster than einsums over (B, F, D): there, each batched matmul
        has an inner dimension of F or D and reads strided operands. The
        matmuls and their FLOPs are the same.
        """
        batch, num_fields, dim = embeddings.shape
        e = embeddings.permute(1, 2, 0).reshape(num_fields, dim * batch)  # (F, D*B)
        h0 = torch.mm(self.field_mixing, e).view(num_fields, dim, batch)  # (F, D, B)
        states = [h0]
        h = h0
        for layer in range(self.depth):
            p = self.p[layer] * self.edge_mask  # (F, S, D), zero where f > s
            if self.q is None:
                # aggregated[s, d, b] = sum_f p[f, s, d] h[f, d, b], one matmul per d.
                aggregated = torch.bmm(
                    p.permute(2, 1, 0), h.transpose(0, 1)
                )  # (D, S, F) @ (D, F, B) -> (D, S, B)
                aggregated = aggregated.transpose(0, 1)  # (S, D, B)
            else:
                # weights[f, s, b] = <h_f, p_fs>: (F, S, D) @ (F, D, B) -> (F, S, B)
                weights = torch.bmm(p, h)
                aggregated = torch.bmm(
                    self.q[layer].permute(1, 2, 0), weights.transpose(0, 1)
                )  # (S, D, F) @ (S, F, B) -> (S, D, B)
            h = h0 * aggregated  # (F, D, B)
            states.append(h)
        return states

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings: E, (B X F X D).

        Returns:
            logits: (B,).
        """
        assert self.readout is not None, "built with readout=False; use layer_states"
        states = self._batch_last_states(embeddings)
        pooled = torch.cat([h.sum(dim=1) for h in states], dim=0)  # (F(L+1), B)
        # readout(pooled^T), computed as W @ pooled + b: (1, F(L+1)) @ (F(L+1), B).
        logits = torch.addmm(
            self.readout.bias.unsqueeze(1), self.readout.weight, pooled
        )  # (1, B)
        return logits.squeeze(0)
