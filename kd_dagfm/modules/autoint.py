"""AutoInt+ teacher: multi-head self-attention over fields plus a DNN.

Song et al., "AutoInt: Automatic Feature Interaction Learning via
Self-Attentive Neural Networks", CIKM 2019; AutoInt+ adds a DNN beside the
interacting layers. Layer layout as in FuxiCTR's AutoInt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kd_dagfm.modules.mlp import MLP


class MultiHeadSelfAttention(nn.Module):
    """One interacting layer: self-attention across the F fields.

    For heads h = 1 .. N with A / N columns each, field m attends to every
    field k with softmax_k(<W_q^h e_m, W_k^h e_k>) (no 1 / sqrt scaling, as
    in the paper) and takes the weighted sum of W_v^h e_k. The heads are
    concatenated to A columns, the residual e_m (through W_res when the
    input width differs from A) is added, then ReLU.

    Args:
        input_dim: width of each field's input vector (D for the first layer).
        attention_dim: A, total width over all heads.
        num_heads: N; must divide A.
    """

    def __init__(self, input_dim: int, attention_dim: int, num_heads: int) -> None:
        super().__init__()
        if attention_dim % num_heads:
            raise ValueError(
                f"attention_dim {attention_dim} is not divisible by num_heads "
                f"{num_heads}; each head gets attention_dim / num_heads columns"
            )
        self.num_heads = num_heads
        self.head_dim = attention_dim // num_heads
        self.query = nn.Linear(input_dim, attention_dim, bias=False)
        self.key = nn.Linear(input_dim, attention_dim, bias=False)
        self.value = nn.Linear(input_dim, attention_dim, bias=False)
        self.residual = (
            nn.Linear(input_dim, attention_dim, bias=False)
            if input_dim != attention_dim
            else None
        )
        for layer in (self.query, self.key, self.value, self.residual):
            if layer is not None:
                nn.init.xavier_normal_(layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (B X F X input_dim).

        Returns:
            (B X F X A).
        """
        batch, fields, _ = x.shape
        heads = (batch, fields, self.num_heads, self.head_dim)
        q = self.query(x).view(heads).transpose(1, 2)  # (B, N, F, A / N)
        k = self.key(x).view(heads).transpose(1, 2)  # (B, N, F, A / N)
        v = self.value(x).view(heads).transpose(1, 2)  # (B, N, F, A / N)
        scores = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # (B, N, F, F)
        attended = (scores @ v).transpose(1, 2).reshape(batch, fields, -1)  # (B, F, A)
        residual = x if self.residual is None else self.residual(x)  # (B, F, A)
        return torch.relu(attended + residual)


class AutoIntPlus(nn.Module):
    """logit = w^T vec(interacting layers(E)) + b + MLP(vec(E)).

    Args:
        num_fields: F.
        embedding_dim: D.
        attention_layers: number of interacting layers.
        attention_dim: A, output width of each layer over all heads.
        num_heads: heads per layer.
        mlp_sizes: hidden sizes of the DNN.
        dropout: dropout after each hidden DNN layer.
    """

    def __init__(
        self,
        num_fields: int,
        embedding_dim: int,
        attention_layers: int,
        attention_dim: int,
        num_heads: int,
        mlp_sizes: Sequence[int],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.attention = nn.Sequential(
            *(
                MultiHeadSelfAttention(
                    embedding_dim if index == 0 else attention_dim,
                    attention_dim,
                    num_heads,
                )
                for index in range(attention_layers)
            )
        )
        self.head = nn.Linear(num_fields * attention_dim, 1)
        nn.init.xavier_normal_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.dnn = MLP(num_fields * embedding_dim, mlp_sizes, dropout, output_dim=1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings: E, (B X F X D).

        Returns:
            logits: (B,).
        """
        attended = self.attention(embeddings).flatten(start_dim=1)  # (B, F * A)
        deep = self.dnn(embeddings.flatten(start_dim=1))  # (B, 1)
        return (self.head(attended) + deep).squeeze(-1)
