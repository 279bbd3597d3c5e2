"""Checkpoints with ``torch.distributed.checkpoint`` (DCP), local or on S3.

A phase writes numbered checkpoints under ``<output_dir>/<phase>/checkpoints``::

    ckpt-00000007/
        .metadata, __0_0.distcp, ...   DCP files (tensors, sharded per rank)
        meta.json                      phase, config, schema, metrics, cursor
        COMPLETE                       written last, after every rank finished

A checkpoint without ``COMPLETE`` is invisible: a crash while saving leaves
the previous checkpoints untouched and usable. Rotation keeps the newest
``keep_last`` checkpoints plus the best one. The last checkpoint of a
finished phase has ``kind == "final"`` and contains the best weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

from kd_dagfm.errors import CheckpointError
from kd_dagfm.phases import Phase
from kd_dagfm.storage import filesystem, is_remote, join

logger = logging.getLogger(__name__)

FORMAT = "kd-dagfm-checkpoint"
FORMAT_VERSION = 1
META_FILE = "meta.json"
COMPLETE_FILE = "COMPLETE"
_NAME = re.compile(r"^ckpt-(\d{8})$")


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint on storage and its ``meta.json``."""

    path: str
    seq: int
    meta: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", ""))

    @property
    def phase(self) -> str:
        return str(self.meta.get("phase", ""))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _storage_writer(path: str) -> Any:
    return FsspecWriter(path) if is_remote(path) else dcp.FileSystemWriter(path)


def _storage_reader(path: str) -> Any:
    return FsspecReader(path) if is_remote(path) else dcp.FileSystemReader(path)


def read_meta(path: str) -> dict[str, Any]:
    fs, local = filesystem(path)
    try:
        with fs.open(join(local, META_FILE), "r") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path!r} has no {META_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"checkpoint {path!r}: {META_FILE} is unreadable ({e})"
        ) from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path!r} is not a kd-dagfm checkpoint (format {meta.get('format')!r})"
        )
    return meta


def is_complete(path: str) -> bool:
    fs, local = filesystem(path)
    return bool(fs.exists(join(local, COMPLETE_FILE)))


class CheckpointManager:
    """Saves, lists, rotates and loads the checkpoints of one phase.

    Every rank calls :meth:`save` and :meth:`load` (DCP is collective); only
    rank 0 writes ``meta.json`` and ``COMPLETE`` and deletes old checkpoints.

    Args:
        directory: ``<output_dir>/<phase>/checkpoints``, local or a URL.
        keep_last: number of newest checkpoints kept besides the best one.
    """

    def __init__(self, directory: str, keep_last: int = 2) -> None:
        self.directory = directory
        self.keep_last = keep_last
        try:
            self.fs, self.root = filesystem(directory)
        except Exception as e:  # fsspec raises many types for a bad URL
            raise CheckpointError(
                f"checkpoint store {directory!r} is not usable ({type(e).__name__}: {e}); "
                "check the URL, the credentials and that the endpoint is reachable"
            ) from None

    def list(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first."""
        try:
            if not self.fs.exists(self.root):
                return []
            names = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        except Exception as e:
            raise CheckpointError(
                f"cannot list checkpoint store {self.directory!r} "
                f"({type(e).__name__}: {e}); check the URL, the credentials and that "
                "the endpoint is reachable"
            ) from None
        found = []
        for name in names:
            base = name.rstrip("/").rsplit("/", 1)[-1]
            match = _NAME.match(base)
            if not match:
                continue
            path = join(self.directory, base)
            if is_complete(path):
                found.append(CheckpointInfo(path, int(match.group(1)), read_meta(path)))
        return sorted(found, key=lambda c: c.seq)

    def latest(self) -> CheckpointInfo | None:
        checkpoints = self.list()
        return checkpoints[-1] if checkpoints else None

    def _next_seq(self) -> int:
        try:
            names = (
                self.fs.ls(self.root, detail=False) if self.fs.exists(self.root) else []
            )
        except FileNotFoundError:
            names = []
        seqs = [
            int(m.group(1))
            for m in (_NAME.match(n.rstrip("/").rsplit("/", 1)[-1]) for n in names)
            if m
        ]
        return max(seqs, default=0) + 1

    def save(self, state: dict[str, Any], meta: dict[str, Any]) -> CheckpointInfo:
        """Write ``state`` with DCP and ``meta`` as JSON; returns the new checkpoint.

        ``meta`` must be JSON-serialisable; ``format``, ``seq`` and ``created``
        are added here.
        """
        seq = self._next_seq() if _rank() == 0 else 0
        if dist.is_available() and dist.is_initialized():
            holder = [seq]
            dist.broadcast_object_list(holder, src=0)
            seq = int(holder[0])
        path = join(self.directory, f"ckpt-{seq:08d}")
        started = time.perf_counter()
        try:
            dcp.save(
                state, storage_writer=_storage_writer(path), no_dist=not _distributed()
            )
        except BaseException as e:  # CheckpointException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            if "KeyboardInterrupt" in f"{e!r} {e}":
                # DCP wraps an interrupt on any rank in a CheckpointException.
                raise KeyboardInterrupt from e
            raise CheckpointError(
                f"failed to write checkpoint {path!r} ({type(e).__name__}: {e}); the "
                "previous checkpoints are unchanged. Check free space, permissions and "
                "that the store is reachable"
            ) from None
        full_meta = {
            **meta,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "seq": seq,
        }
        full_meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _barrier()
        if _rank() == 0:
            fs, local = filesystem(path)
            with fs.open(join(local, META_FILE), "w") as f:
                json.dump(full_meta, f, indent=2, sort_keys=True)
            with fs.open(join(local, COMPLETE_FILE), "w") as f:
                f.write("complete\n")
            logger.info(
                "saved %s checkpoint %s (%.2f s)",
                meta.get("kind"),
                path,
                time.perf_counter() - started,
            )
            self._rotate()
        _barrier()
        return CheckpointInfo(path, seq, full_meta)

    def _rotate(self) -> None:
        checkpoints = self.list()
        if not checkpoints:
            return
        best_seq = checkpoints[-1].meta.get("best", {}).get("seq")
        keep = {c.seq for c in checkpoints[-self.keep_last :]}
        if best_seq is not None:
            keep.add(int(best_seq))
        for checkpoint in checkpoints:
            if checkpoint.seq not in keep:
                self._delete(checkpoint.path)
        # Incomplete checkpoints older than the newest complete one were
        # left by a crash while saving; nothing can load them.
        newest = checkpoints[-1].seq
        for name in self.fs.ls(self.root, detail=False):
            base = name.rstrip("/").rsplit("/", 1)[-1]
            match = _NAME.match(base)
            if match and int(match.group(1)) < newest:
                path = join(self.directory, base)
                if not is_complete(path):
                    self._delete(path)

    def _delete(self, path: str) -> None:
        fs, local = filesystem(path)
        # Remove the marker first so a half-deleted checkpoint is invisible.
        if fs.exists(join(local, COMPLETE_FILE)):
            fs.rm(join(local, COMPLETE_FILE))
        fs.rm(local, recursive=True)
        logger.info("deleted old checkpoint %s", path)


def load_state(path: str, state: dict[str, Any]) -> None:
    """Load a DCP checkpoint in place into ``state`` (a subset of what was saved)."""
    try:
        dcp.load(
            state, storage_reader=_storage_reader(path), no_dist=not _distributed()
        )
    except BaseException as e:  # CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        if "KeyboardInterrupt" in f"{e!r} {e}":
            # DCP wraps an interrupt on any rank in a CheckpointException.
            raise KeyboardInterrupt from e
        raise CheckpointError(
            f"failed to load checkpoint {path!r} ({type(e).__name__}: {e})"
        ) from None


def resolve_warm_up(path: str, expected_phase: Phase) -> CheckpointInfo:
    """Find the checkpoint a ``warm_up`` value names.

    Accepted: a model file written by :func:`export_model_file`
    (``<output_dir>/<phase>/model.pt``); a checkpoint directory (``.../ckpt-00000012``); a phase
    directory or its ``checkpoints`` folder (the newest complete checkpoint
    in it); a run's ``output_dir`` (the newest checkpoint of
    ``expected_phase``'s directory in it).
    """
    fs, local = filesystem(path)
    try:
        exists = fs.exists(local)
        is_dir = exists and fs.isdir(local)
    except Exception as e:
        raise CheckpointError(
            f"warm_up {path!r} is unreachable ({type(e).__name__}: {e})"
        ) from None
    if not exists:
        raise CheckpointError(
            f"warm_up {path!r} not found; give the {expected_phase.value} checkpoint "
            f"directory, the phase directory (<output_dir>/{expected_phase.value}) or "
            "the previous run's output_dir"
        )
    if not is_dir:
        return CheckpointInfo(path, 0, read_model_file(path)["meta"])
    if fs.exists(join(local, META_FILE)):
        if not is_complete(path):
            raise CheckpointError(
                f"warm_up {path!r} is incomplete (no {COMPLETE_FILE} marker): it was "
                "being written when its run stopped. Use an earlier checkpoint in "
                "the same folder, or the phase directory to pick the newest complete one"
            )
        seq_match = _NAME.match(path.rstrip("/").rsplit("/", 1)[-1])
        return CheckpointInfo(
            path, int(seq_match.group(1)) if seq_match else 0, read_meta(path)
        )
    for candidate in (
        path,
        join(path, "checkpoints"),
        join(path, expected_phase.value, "checkpoints"),
    ):
        latest = CheckpointManager(candidate).latest()
        if latest is not None:
            return latest
    raise CheckpointError(
        f"warm_up {path!r} contains no complete checkpoint (looked in it, in "
        f"checkpoints/ and in {expected_phase.value}/checkpoints/); the run that "
        "should have written it may have failed before its first checkpoint"
    )


def export_model_file(
    path: str, model_state: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Write a single-file copy of a model for serving and inspection.

    The file holds only tensors and JSON-compatible values, so
    ``torch.load(path, weights_only=True)`` reads it.
    """
    fs, local = filesystem(path)
    with fs.open(local, "wb") as f:
        torch.save(
            {
                "format": FORMAT,
                "meta": json.loads(json.dumps(meta)),
                "model": model_state,
            },
            f,
        )


def read_model_file(path: str) -> dict[str, Any]:
    """Read a file written by :func:`export_model_file` with ``weights_only=True``."""
    fs, local = filesystem(path)
    try:
        with fs.open(local, "rb") as f:
            data = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a bad file
        raise CheckpointError(
            f"warm_up file {path!r} is unreadable ({type(e).__name__}: {e}); expected a "
            "model.pt written by kd-dagfm, or a checkpoint directory"
        ) from None
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT
        or "model" not in data
    ):
        raise CheckpointError(
            f"warm_up file {path!r} is not a kd-dagfm model file; expected the "
            "model.pt that a phase writes into its output directory"
        )
    return data


def load_model_weights(info: CheckpointInfo, model_state: dict[str, Any]) -> None:
    """Copy the model weights of a checkpoint or model file into ``model_state``."""
    fs, local = filesystem(info.path)
    if not fs.isdir(local):
        saved = read_model_file(info.path)["model"]
        missing = sorted(set(model_state) - set(saved))
        if missing:
            raise CheckpointError(
                f"warm_up file {info.path!r} lacks weights {missing[:5]}"
            )
        for key, tensor in model_state.items():
            if saved[key].shape != tensor.shape:
                raise CheckpointError(
                    f"warm_up file {info.path!r}: {key} has shape "
                    f"{tuple(saved[key].shape)}, the model expects {tuple(tensor.shape)}"
                )
            _copy_full_tensor(saved[key], tensor)
        return
    load_state(info.path, {"model": model_state})


def _copy_full_tensor(source: torch.Tensor, target: torch.Tensor) -> None:
    """Copy ``source`` into ``target``; a ShardedTensor receives in each local
    shard the slice of ``source`` at that shard's offsets."""
    if not isinstance(target, ShardedTensor):
        target.copy_(source)
        return
    for shard in target.local_shards():
        index = tuple(
            slice(offset, offset + size)
            for offset, size in zip(
                shard.metadata.shard_offsets, shard.metadata.shard_sizes
            )
        )
        shard.tensor.detach().copy_(source[index])
