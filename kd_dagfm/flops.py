"""Parameter and FLOP counts of the dense towers, measured by tracing."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def flops_per_example(tower: nn.Module, num_fields: int, embedding_dim: int) -> float:
    """FLOPs of one forward pass of ``tower`` on E (B X F X D), per example.

    Counted with ``torch.utils.flop_counter``, which counts matrix products,
    einsums (as batched matmuls) and convolutions, at 2 FLOPs per
    multiply-add. Elementwise products, sums and the embedding lookups are
    not counted; for CrossNet and CIN the products dominate, for DAGFM the
    uncounted elementwise work is at most ~F * D per layer (estimate).
    """
    batch = 64
    device = next(tower.parameters()).device
    embeddings = torch.zeros(batch, num_fields, embedding_dim, device=device)
    counter = FlopCounterMode(display=False)
    was_training = tower.training
    tower.eval()
    with torch.no_grad(), counter:
        tower(embeddings)
    tower.train(was_training)
    return counter.get_total_flops() / batch


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_state_elements(module: nn.Module) -> int:
    """Elements of ``module``'s state dict, counting sharded tables whole.

    A sharded module's parameters are this rank's shards only, while its
    state-dict entries (ShardedTensors) have the global size.
    """
    # ShardedTensor has no numel(); its size() is the global one.
    return sum(math.prod(t.size()) for t in module.state_dict().values())
