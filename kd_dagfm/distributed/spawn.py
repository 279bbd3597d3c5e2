"""Run a function on N local ranks and collect what each rank returns.

Each rank is a fresh process (``spawn``) with the torch.distributed
environment a ``torchrun`` worker on 127.0.0.1 gets, ``OMP_NUM_THREADS=1``
and one intra-op thread. A rank's return value (or its traceback) is
pickled into a temporary directory. When a rank fails or ``timeout_s``
passes, every rank still running is terminated (the others would wait in a
collective until the process-group timeout). Tests and benchmark jobs use
this to start gloo ranks; run it inside ``scripts/loopback.sh``.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 180.0


class RankFailed(RuntimeError):
    """A rank raised, died or timed out; the message contains its traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_local_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` ranks.

    ``fn`` must be importable (a module-level function). Returns the ranks'
    return values in rank order; raises :class:`RankFailed` with the first
    failing rank's traceback, or on timeout.
    """
    with tempfile.TemporaryDirectory(prefix="kd-dagfm-ranks-") as result_dir:
        context = mp.start_processes(
            _rank_main,
            args=(world_size, free_port(), fn, args, env or {}, result_dir),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        timed_out = False
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    timed_out = True
                    break
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            pass  # A rank failed; its traceback is in its result file.
        finally:
            # A failed rank leaves the others blocked in a collective.
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
                    process.join(timeout=10)

        outcomes: dict[int, tuple[bool, Any]] = {}
        for rank in range(world_size):
            path = Path(result_dir) / f"rank{rank}.pkl"
            if path.exists():
                outcomes[rank] = pickle.loads(path.read_bytes())
        for rank, (ok, value) in sorted(outcomes.items()):
            if not ok:
                raise RankFailed(f"rank {rank} of {fn.__name__} failed:\n{value}")
        if timed_out:
            raise RankFailed(
                f"{world_size} ranks of {fn.__name__} did not finish within "
                f"{timeout_s:.0f} s (finished: {sorted(outcomes)})"
            )
        missing = [rank for rank in range(world_size) if rank not in outcomes]
        if missing:
            raise RankFailed(f"ranks {missing} of {fn.__name__} left no result")
        return [outcomes[rank][1] for rank in range(world_size)]


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    env: dict[str, str],
    result_dir: str,
) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "OMP_NUM_THREADS": "1",
            "KD_DAGFM_DIST_TIMEOUT_S": "120",
            **env,
        }
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        outcome: tuple[bool, Any] = (True, fn(rank, world_size, *args))
    except BaseException:
        outcome = (False, traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    path = Path(result_dir) / f"rank{rank}.pkl"
    path.write_bytes(pickle.dumps(outcome))
    if not outcome[0]:
        raise SystemExit(1)
