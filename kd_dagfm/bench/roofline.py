"""Roofline of a training step: measured machine peaks, counted FLOPs and bytes.

The bound on examples/s of a phase is

    1 / max(FLOPs per example / matmul FLOP/s, bytes per example / bandwidth)

with the machine's measured fp32 matmul rate and memory bandwidth (at the
thread count of the run), and the FLOPs and bytes of one training step per
example. FLOPs are counted by ``torch.utils.flop_counter`` (matmuls,
einsums and convolutions, forward and backward). Bytes are the sizes of
every tensor each ATen operator reads and writes during the step, counted
as if no operator found its inputs in cache. Real traffic is lower, so the
memory term of the bound is pessimistic. The compute term is optimistic:
small matmuls run slower than the large square ones the rate is measured
on.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode


@dataclasses.dataclass(frozen=True)
class MachinePeak:
    """Measured rates of this machine.

    Attributes:
        threads: intra-op threads used for the measurement.
        matmul_gflops: best fp32 matmul rate, GFLOP/s.
        matmul_size: n of the n x n x n matmul measured.
        bandwidth_gbs: best copy bandwidth, GB/s (bytes read plus written).
        copy_mib: size of the copied tensor, MiB.
    """

    threads: int
    matmul_gflops: float
    matmul_size: int
    bandwidth_gbs: float
    copy_mib: int


def measure_peak(
    matmul_size: int = 1024, copy_mib: int = 256, repeats: int = 10
) -> MachinePeak:
    """Measure fp32 matmul GFLOP/s and copy bandwidth; best of ``repeats``."""
    a = torch.randn(matmul_size, matmul_size)
    b = torch.randn(matmul_size, matmul_size)
    flops = 2.0 * matmul_size**3
    matmul_s = _best_time(lambda: torch.mm(a, b), repeats)

    source = torch.empty(copy_mib * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    target = torch.empty_like(source)
    copy_s = _best_time(lambda: target.copy_(source), repeats)
    moved = 2.0 * source.numel() * source.element_size()
    return MachinePeak(
        threads=torch.get_num_threads(),
        matmul_gflops=flops / matmul_s / 1e9,
        matmul_size=matmul_size,
        bandwidth_gbs=moved / copy_s / 1e9,
        copy_mib=copy_mib,
    )


def _best_time(run: Callable[[], Any], repeats: int) -> float:
    run()  # warm-up: first-touch page faults and library initialisation
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


class ByteCounterMode(TorchDispatchMode):
    """Sum the bytes of the tensors every ATen operator reads and writes.

    Each distinct tensor storage among an operator's inputs counts as read
    once and among its outputs as written once. Views, metadata operations
    and allocations without data movement count nothing.
    """

    _FREE = {
        "aten::view",
        "aten::_unsafe_view",
        "aten::reshape",
        "aten::t",
        "aten::transpose",
        "aten::permute",
        "aten::expand",
        "aten::unsqueeze",
        "aten::squeeze",
        "aten::select",
        "aten::slice",
        "aten::as_strided",
        "aten::detach",
        "aten::alias",
        "aten::empty",
        "aten::empty_like",
        "aten::empty_strided",
        "aten::lift_fresh",
    }

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if func._schema.name not in self._FREE:
            self.bytes += _tensor_bytes(args, kwargs) + _tensor_bytes(out)
        return out


def _tensor_bytes(*trees: Any) -> int:
    seen: set[int] = set()
    total = 0
    for tree in trees:
        leaves, _ = tree_flatten(tree)
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor) or leaf.device.type == "meta":
                continue
            key = id(leaf)
            if key in seen:
                continue
            seen.add(key)
            total += leaf.numel() * leaf.element_size()
    return total


@dataclasses.dataclass(frozen=True)
class StepCost:
    """FLOPs and bytes of one training step, per example.

    Attributes:
        flops_per_example: counted matmul, einsum and convolution FLOPs,
            forward and backward.
        bytes_per_example: bytes read and written by all operators.
    """

    flops_per_example: float
    bytes_per_example: float

    def bound_examples_per_s(self, peak: MachinePeak) -> float:
        """Return the roofline bound on training examples/s on ``peak``'s machine."""
        compute_s = self.flops_per_example / (peak.matmul_gflops * 1e9)
        memory_s = self.bytes_per_example / (peak.bandwidth_gbs * 1e9)
        return 1.0 / max(compute_s, memory_s, 1e-30)

    def bound_kind(self, peak: MachinePeak) -> str:
        """``compute`` or ``memory``: which term of the bound is larger."""
        compute_s = self.flops_per_example / (peak.matmul_gflops * 1e9)
        memory_s = self.bytes_per_example / (peak.bandwidth_gbs * 1e9)
        return "compute" if compute_s >= memory_s else "memory"


def count_step(step: Callable[[], Any], batch_size: int) -> StepCost:
    """Count the FLOPs and bytes of ``step()`` (one training step) per example.

    ``step`` runs twice, once under each counter; it should not update
    anything the second run depends on (run it on a throwaway model copy).
    """
    flop_counter = FlopCounterMode(display=False)
    with flop_counter:
        step()
    byte_counter = ByteCounterMode()
    with byte_counter:
        step()
    return StepCost(
        flops_per_example=flop_counter.get_total_flops() / batch_size,
        bytes_per_example=byte_counter.bytes / batch_size,
    )
