"""A plain multilayer perceptron, the deep part of the deep teachers and DAGFM+."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Linear, ReLU and dropout per hidden layer, then an optional linear output.

    Weights are Xavier-normal and biases zero, the initialisation FuxiCTR's
    ``BaseModel.reset_parameters`` gives every ``nn.Linear``.

    Args:
        input_dim: width of the input.
        hidden_sizes: width of each hidden layer (may be empty).
        dropout: dropout probability after each hidden activation.
        output_dim: width of a final linear layer without activation; None
            returns the last hidden layer.

    Example::

        mlp = MLP(input_dim=64, hidden_sizes=(400, 400), output_dim=1)
        mlp(torch.randn(32, 64)).shape  # (32, 1)
    """

    def __init__(
        self,
        input_dim: int,
        hidden_sizes: Sequence[int],
        dropout: float = 0.0,
        output_dim: int | None = None,
    ) -> None:
        super().__init__()
        if output_dim is None and not hidden_sizes:
            raise ValueError("an MLP needs hidden_sizes or an output_dim; got neither")
        layers: list[nn.Module] = []
        width = input_dim
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        if output_dim is not None:
            layers.append(nn.Linear(width, output_dim))
            width = output_dim
        self.layers = nn.Sequential(*layers)
        self.output_dim = width
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_normal_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (B X input_dim).

        Returns:
            (B X output_dim), or (B X hidden_sizes[-1]) without an output layer.
        """
        return self.layers(x)
