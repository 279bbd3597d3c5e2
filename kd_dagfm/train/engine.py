"""Engines own the model's placement and its optimizers for one phase.

The trainer talks to an engine, never to devices or optimizers directly, so
the same loop runs a single process (:class:`LocalEngine`) or TorchRec's
DistributedModelParallel on many ranks (``kd_dagfm.distributed``).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from kd_dagfm.config import TrainConfig
from kd_dagfm.errors import CheckpointError, ConfigError
from kd_dagfm.model import KDDAGFM
from kd_dagfm.phases import Phase


class Engine(Protocol):
    """What the trainer needs from a model placement."""

    model: nn.Module
    rank: int
    world_size: int
    device: torch.device

    @property
    def unwrapped(self) -> KDDAGFM: ...

    def optimize(self, loss: torch.Tensor) -> None: ...

    def model_state(self) -> dict[str, Any]: ...

    def optimizer_state(self) -> dict[str, Any]: ...

    def load_optimizer_state(self, state: dict[str, Any]) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    def check_resume(self, meta: dict[str, Any]) -> None:
        """Raise CheckpointError when the optimizer state of the checkpoint
        with this meta.json cannot be loaded into this engine."""
        ...


def split_parameters(
    model: KDDAGFM, phase: Phase
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(embedding-table parameters, dense parameters) trained in ``phase``.

    Parameters outside the phase's modules get ``requires_grad = False``, so
    frozen tables and towers cannot move.
    """
    trainable = {id(p) for m in model.trainable_modules(phase) for p in m.parameters()}
    tables = {id(p) for p in model.sparse_arch.embedding_bag_collection.parameters()}
    embedding: list[nn.Parameter] = []
    dense: list[nn.Parameter] = []
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trainable)
        if id(parameter) not in trainable:
            continue
        (embedding if id(parameter) in tables else dense).append(parameter)
    return embedding, dense


class LocalEngine:
    """One process, one device, plain PyTorch optimizers.

    The dense towers use Adam (``learning_rate``, ``weight_decay``); the
    embedding tables use ``embedding_optimizer`` (adam, adagrad or sgd) with
    ``embedding_learning_rate``.
    """

    rank = 0
    world_size = 1

    def __init__(
        self, model: KDDAGFM, config: TrainConfig, phase: Phase, device: torch.device
    ) -> None:
        self.model: nn.Module = model.to(device)
        self.device = device
        embedding, dense = split_parameters(model, phase)
        embedding_lr = config.embedding_learning_rate or config.learning_rate
        self.optimizers: list[torch.optim.Optimizer] = []
        if dense:
            self.optimizers.append(
                torch.optim.Adam(
                    dense,
                    lr=config.learning_rate,
                    weight_decay=config.weight_decay,
                    fused=_can_fuse(dense),
                )
            )
        if embedding:
            self.optimizers.append(
                _embedding_optimizer(
                    config.embedding_optimizer, embedding, embedding_lr
                )
            )
        self._options = StateDictOptions(flatten_optimizer_state_dict=True)

    @property
    def unwrapped(self) -> KDDAGFM:
        assert isinstance(self.model, KDDAGFM)
        return self.model

    def optimize(self, loss: torch.Tensor) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()

    def model_state(self) -> dict[str, Any]:
        return self.model.state_dict()

    def optimizer_state(self) -> dict[str, Any]:
        # get_optimizer_state_dict also materialises lazily created state
        # (Adam's moments before the first step), so a load finds every key.
        return get_optimizer_state_dict(
            self.model, self.optimizers, options=self._options
        )

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(
            self.model, self.optimizers, state, options=self._options
        )

    def describe(self) -> dict[str, Any]:
        return {"engine": "local", "device": str(self.device), "world_size": 1}

    def check_resume(self, meta: dict[str, Any]) -> None:
        engine = meta.get("engine", {}).get("engine", "local")
        if engine != "local":
            raise CheckpointError(
                f"the checkpoint was written by the {engine!r} engine on "
                f"{meta.get('world_size')} ranks; its optimizer state has another "
                "layout than a single process's. Resume it with the distributed "
                "runner, or start the phase again from its warm_up"
            )


def _embedding_optimizer(
    name: str, parameters: list[nn.Parameter], lr: float
) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, fused=_can_fuse(parameters))
    if name == "adagrad":
        return torch.optim.Adagrad(parameters, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr)
    raise ConfigError(
        f"embedding_optimizer {name!r} needs TorchRec's fused kernels, which only run "
        "under DistributedModelParallel; use adam, adagrad or sgd in a single process, "
        "or run with num_workers >= 1 through the distributed runner"
    )


def _can_fuse(parameters: list[nn.Parameter]) -> bool:
    """Whether Adam's fused kernel (one kernel for all tensors, PyTorch >= 2.4
    on CPU) supports every parameter: floating point, on CPU or CUDA."""
    return all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in parameters
    )
