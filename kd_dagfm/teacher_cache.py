"""Cached teacher logits: run a trained teacher once, distil from its logits.

Distillation runs the frozen teacher on every batch of every epoch, although
its logits never change. :func:`write_teacher_logits` runs it once over a
dataset and stores one float32 logit per row in a tree parallel to the
shards::

    <cache>/manifest.json                   written last: the cache is complete
    <cache>/train/part-00000.parquet        column teacher_logit, one row group
    <cache>/valid/...                       per source row group, same rows

Row i of cached row group g of ``part-00000.parquet`` is the teacher's logit
for row i of row group g of the dataset's ``train/part-00000.parquet``, in
file order. Rows that validation rejects get NaN and are never read, because
the reader drops the same rows. :class:`CachedLogitsSplit` attaches the
cached column to each row group the reader loads, before shuffling, so every
logit stays with its row through shuffling, skipped rows and resume.

The manifest records the teacher checkpoint (path, sequence number, creation
time, model config, schema fingerprint, SHA-256 digests of the teacher's and
the embedding tables' weights) and the dataset (per split: shard names, file
sizes, rows per row group). Distillation with ``teacher_logits`` checks both
against the run and raises :class:`~kd_dagfm.errors.CheckpointError` or
:class:`~kd_dagfm.errors.DataError` on any difference.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import posixpath
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from kd_dagfm.config import RunConfig, build_config
from kd_dagfm.data.batch import BatchAssembler, RowGroupArrays
from kd_dagfm.data.reader import ParquetSplit, RowGroupUnit, load_schema
from kd_dagfm.data.validation import find_invalid_rows
from kd_dagfm.errors import CheckpointError, DataError
from kd_dagfm.model import KDDAGFM
from kd_dagfm.phases import Phase
from kd_dagfm.schema import FeatureSchema
from kd_dagfm.storage import filesystem, join
from kd_dagfm.train.checkpoint import load_model_weights, resolve_warm_up

logger = logging.getLogger(__name__)

CACHE_FORMAT = "kd-dagfm-teacher-logits"
CACHE_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
LOGIT_COLUMN = "teacher_logit"
DEFAULT_SPLITS = ("train", "valid", "test")


def state_digest(module: nn.Module) -> str | None:
    """SHA-256 over the names, dtypes, shapes and bytes of a module's state.

    Returns None when a tensor is sharded (ShardedTensor or DTensor under
    DistributedModelParallel), because no rank has all of its bytes.
    """
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        if type(value) is not torch.Tensor:
            return None
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class ShardRecord:
    """One dataset shard as the cache saw it.

    Attributes:
        name: file name in the split directory.
        size_bytes: file size, a cheap check that the shard was not rewritten.
        row_groups: (row group index, rows) of each non-empty row group, in
            file order; cached row group k has the logits of row_groups[k].
    """

    name: str
    size_bytes: int
    row_groups: tuple[tuple[int, int], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size_bytes": self.size_bytes,
            "row_groups": [list(pair) for pair in self.row_groups],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardRecord:
        return cls(
            name=str(data["name"]),
            size_bytes=int(data["size_bytes"]),
            row_groups=tuple((int(g), int(n)) for g, n in data["row_groups"]),
        )


def describe_split(split: ParquetSplit) -> list[ShardRecord]:
    """List the shards and row groups the reader uses for ``split``."""
    groups: dict[str, list[tuple[int, int]]] = {}
    for unit in split.units:
        groups.setdefault(unit.shard, []).append((unit.row_group, unit.num_rows))
    return [
        ShardRecord(
            name=posixpath.basename(shard),
            size_bytes=int(split.fs.size(shard)),
            row_groups=tuple(row_groups),
        )
        for shard, row_groups in groups.items()
    ]


class TeacherLogitCache:
    """A complete cache directory, opened through its manifest.

    Args:
        root: the cache directory or URL.
        manifest: the parsed ``manifest.json``.
    """

    def __init__(self, root: str, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self.teacher: dict[str, Any] = manifest["teacher"]
        self.shards: dict[str, dict[str, ShardRecord]] = {
            split: {record["name"]: ShardRecord.from_dict(record) for record in records}
            for split, records in manifest["dataset"]["splits"].items()
        }
        self.split_type = functools.partial(_cached_or_plain_split, cache=self)

    @classmethod
    def open(cls, root: str) -> TeacherLogitCache:
        """Read and check ``<root>/manifest.json``.

        Raises:
            DataError: no manifest (missing or unfinished cache), or one that
                is unreadable or of another format.
        """
        fs, path = filesystem(root)
        manifest_path = join(path, MANIFEST_FILE)
        try:
            with fs.open(manifest_path, "r") as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise DataError(
                f"teacher_logits {root!r} has no {MANIFEST_FILE}: it is not a "
                "teacher-logit cache, or the job writing it did not finish. Run "
                "python -m jobs.cache_teacher_logits again, or unset teacher_logits "
                "to run the teacher during distillation"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(
                f"teacher_logits {root!r}: {MANIFEST_FILE} is unreadable ({e}); "
                "write the cache again with python -m jobs.cache_teacher_logits"
            ) from None
        if manifest.get("format") != CACHE_FORMAT:
            raise DataError(
                f"teacher_logits {root!r} is not a teacher-logit cache (format "
                f"{manifest.get('format')!r}, expected {CACHE_FORMAT!r})"
            )
        if manifest.get("format_version") != CACHE_FORMAT_VERSION:
            raise DataError(
                f"teacher_logits {root!r} has format version "
                f"{manifest.get('format_version')!r}; this kd-dagfm reads version "
                f"{CACHE_FORMAT_VERSION}. Write the cache again with this version"
            )
        return cls(root, manifest)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.shards)

    def check_teacher(
        self, model: KDDAGFM, config: RunConfig, schema: FeatureSchema
    ) -> None:
        """Raise CheckpointError unless ``model`` has the teacher weights the
        cache was written with.

        Compares the model config, the schema fingerprint and the SHA-256 of
        the teacher's weights; the embedding tables' digest is compared too
        when they are not sharded.
        """
        source = f"teacher_logits {self.root!r}"
        cached_model = self.teacher["model"]
        current = config.to_dict()["model"]
        differences = [
            f"{key}={cached_model.get(key)!r} (this run: {value!r})"
            for key, value in current.items()
            if cached_model.get(key) != value
        ]
        if differences:
            raise CheckpointError(
                f"{source} was written by a teacher with another model config: "
                + ", ".join(differences)
                + ". Use the model settings of that run, or write a cache for "
                "this teacher with python -m jobs.cache_teacher_logits"
            )
        if self.teacher["schema_fingerprint"] != schema.fingerprint():
            raise CheckpointError(
                f"{source} was written for features with schema fingerprint "
                f"{self.teacher['schema_fingerprint']}, this dataset has "
                f"{schema.fingerprint()}; write a cache for this dataset"
            )
        checkpoint = self.teacher["checkpoint"]
        teacher_digest = state_digest(model.teacher)
        if teacher_digest != self.teacher["teacher_sha256"]:
            raise CheckpointError(
                f"{source} was written by the teacher of {checkpoint!r} (seq "
                f"{self.teacher['seq']}, created {self.teacher['created']}), but this "
                "run's teacher weights differ (SHA-256 "
                f"{teacher_digest} != {self.teacher['teacher_sha256']}). Set warm_up "
                "to that checkpoint, or write a cache for this run's teacher"
            )
        embedding_digest = state_digest(model.sparse_arch)
        if embedding_digest is None:
            # NOTE: sharded tables are not hashed; the teacher digest above
            # still ties the cache to one teacher_training checkpoint.
            logger.info(
                "%s: embedding tables are sharded, so only the teacher digest "
                "was compared",
                source,
            )
        elif embedding_digest != self.teacher["embedding_sha256"]:
            raise CheckpointError(
                f"{source} was written with the embedding tables of {checkpoint!r}, "
                "but this run's tables differ (SHA-256 "
                f"{embedding_digest} != {self.teacher['embedding_sha256']}). Set "
                "warm_up to that checkpoint, or write a cache for this run"
            )
        logger.info(
            "%s matches this run's teacher (%s, seq %s)",
            source,
            checkpoint,
            self.teacher["seq"],
        )

    def check_split(self, split: ParquetSplit) -> None:
        """Raise DataError unless ``split`` has the shards and row groups the
        cache was written for."""
        cached = self.shards[split.split]
        current = {record.name: record for record in describe_split(split)}
        source = f"teacher_logits {self.root!r}"
        missing = sorted(set(current) - set(cached))
        extra = sorted(set(cached) - set(current))
        if missing or extra:
            raise DataError(
                f"{source} does not match split {split.split!r} of {split.dataset!r}: "
                f"shards without cached logits {missing[:5]}, cached shards no "
                f"longer in the split {extra[:5]}. Write the cache again for this "
                "dataset (python -m jobs.cache_teacher_logits)"
            )
        for name, record in current.items():
            if record != cached[name]:
                raise DataError(
                    f"{source}: shard {name} of split {split.split!r} changed since "
                    f"the cache was written (size {cached[name].size_bytes} -> "
                    f"{record.size_bytes} bytes, row groups "
                    f"{list(cached[name].row_groups)[:4]} -> "
                    f"{list(record.row_groups)[:4]}). Write the cache again for "
                    "this dataset (python -m jobs.cache_teacher_logits)"
                )

    def read_row_group(self, split: str, unit: RowGroupUnit) -> np.ndarray:
        """(N,) float32 cached logits of one source row group, in file order."""
        record = self.shards[split][unit.shard_name]
        index = [g for g, _ in record.row_groups].index(unit.row_group)
        fs, root = filesystem(self.root)
        path = join(root, split, unit.shard_name)
        try:
            with fs.open(path, "rb") as f:
                table = pq.ParquetFile(f).read_row_group(index, columns=[LOGIT_COLUMN])
        except FileNotFoundError:
            raise DataError(
                f"teacher_logits {self.root!r}: {split}/{unit.shard_name} is missing "
                "although the manifest lists it; write the cache again"
            ) from None
        except (pa.ArrowException, OSError) as e:
            raise DataError(
                f"teacher_logits {self.root!r}: failed to read row group {index} of "
                f"{split}/{unit.shard_name} ({e}); write the cache again"
            ) from None
        # A writable copy: torch.from_numpy warns on Arrow's read-only buffers.
        logits = np.array(table.column(LOGIT_COLUMN).to_numpy(), dtype=np.float32)
        if len(logits) != unit.num_rows:
            raise DataError(
                f"teacher_logits {self.root!r}: {split}/{unit.shard_name} row group "
                f"{index} has {len(logits)} logits for {unit.num_rows} rows; write "
                "the cache again"
            )
        return logits


class CachedLogitsSplit(ParquetSplit):
    """A ParquetSplit whose row groups carry the cached teacher logits.

    Args:
        dataset, split, schema: as for :class:`ParquetSplit`; further
            positional and keyword arguments are passed on to it.
        cache: the cache; it must cover ``split``.

    Raises:
        DataError: when the split's shards differ from the cached ones.
    """

    def __init__(
        self,
        dataset: str,
        split: str,
        schema: FeatureSchema,
        *args: Any,
        cache: TeacherLogitCache,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, split, schema, *args, **kwargs)
        self.cache = cache
        cache.check_split(self)

    def attach_columns(
        self, unit: RowGroupUnit, arrays: RowGroupArrays
    ) -> RowGroupArrays:
        logits = self.cache.read_row_group(self.split, unit)
        return dataclasses.replace(arrays, teacher_logits=logits)


def _cached_or_plain_split(
    dataset: str,
    split: str,
    schema: FeatureSchema,
    *args: Any,
    cache: TeacherLogitCache,
    **kwargs: Any,
) -> ParquetSplit:
    """Return a CachedLogitsSplit when the cache covers ``split``, else a
    ParquetSplit (for which distillation runs the teacher)."""
    if split not in cache.splits:
        logger.info(
            "teacher_logits %s has no %s split; the teacher runs on it",
            cache.root,
            split,
        )
        return ParquetSplit(dataset, split, schema, *args, **kwargs)
    return CachedLogitsSplit(dataset, split, schema, *args, cache=cache, **kwargs)


@dataclasses.dataclass(frozen=True)
class CacheSummary:
    """Summary of a cache written by :func:`write_teacher_logits`."""

    root: str
    rows: dict[str, int]
    rows_invalid: dict[str, int]
    wall_time_s: float


def load_teacher(
    checkpoint: str, schema: FeatureSchema, device: torch.device
) -> tuple[KDDAGFM, RunConfig, dict[str, Any]]:
    """Build the model of a teacher_training checkpoint and load its weights.

    Returns:
        (model in eval mode on ``device``, the checkpoint's run config, the
        teacher record for the manifest).
    """
    info = resolve_warm_up(checkpoint, Phase.TEACHER_TRAINING)
    if info.phase != Phase.TEACHER_TRAINING.value:
        raise CheckpointError(
            f"{info.path!r} is a {info.phase or 'unknown'}-phase checkpoint; the "
            "logit cache needs a teacher_training checkpoint"
        )
    saved_schema = FeatureSchema.from_dict(
        info.meta.get("schema", {}), source=info.path
    )
    difference = schema.describe_difference(saved_schema)
    if difference:
        raise CheckpointError(
            f"teacher checkpoint {info.path!r} was trained on other features: "
            f"{difference}. Cache logits for the dataset it was trained on"
        )
    run_config = build_config(info.meta.get("config", {}))
    model = KDDAGFM(schema, run_config.model)
    load_model_weights(info, model.state_dict())
    model = model.to(device).eval()
    record = {
        "checkpoint": info.path,
        "seq": int(info.meta.get("seq", info.seq)),
        "created": info.meta.get("created"),
        "kind": info.kind,
        "model": run_config.to_dict()["model"],
        "schema_fingerprint": schema.fingerprint(),
        "teacher_sha256": state_digest(model.teacher),
        "embedding_sha256": state_digest(model.sparse_arch),
    }
    return model, run_config, record


def write_teacher_logits(
    checkpoint: str,
    dataset: str,
    output: str,
    splits: Sequence[str] = DEFAULT_SPLITS,
    batch_size: int = 8192,
    bad_rows: str = "error",
    device: torch.device | str = "cpu",
    overwrite: bool = False,
) -> CacheSummary:
    """Run the teacher of ``checkpoint`` over ``splits`` of ``dataset`` once
    and write its logits to ``output``.

    Args:
        checkpoint: a teacher_training checkpoint, in any form ``warm_up``
            accepts (model.pt, checkpoint or phase directory, output_dir).
        dataset: dataset directory or URL.
        output: cache directory or URL (often ``<dataset>/teacher_logits``).
        splits: splits to cache; distillation reads the training split, and
            valid/test only speed up its evaluation.
        batch_size: rows per teacher forward pass.
        bad_rows: ``error`` or ``skip``, as in training; skipped rows get NaN.
        device: where the teacher runs.
        overwrite: replace an existing cache at ``output``.

    Raises:
        DataError: ``output`` holds a cache and ``overwrite`` is False.
    """
    # TODO: split the shards over Ray workers for datasets too large for one
    # process; each shard's file is independent, only the manifest is shared.
    started = time.perf_counter()
    device = torch.device(device)
    fs, root = filesystem(output)
    if fs.exists(join(root, MANIFEST_FILE)):
        if not overwrite:
            raise DataError(
                f"{output!r} already contains a teacher-logit cache; pass overwrite "
                "(--overwrite) to replace it, or choose another output"
            )
        fs.rm(join(root, MANIFEST_FILE))
    schema = load_schema(dataset)
    model, _, teacher_record = load_teacher(checkpoint, schema, device)
    logger.info(
        "caching logits of %s (%s) for %s into %s",
        teacher_record["checkpoint"],
        teacher_record["model"]["teacher"],
        dataset,
        output,
    )

    dataset_record: dict[str, list[dict[str, Any]]] = {}
    rows: dict[str, int] = {}
    rows_invalid: dict[str, int] = {}
    for split_name in splits:
        split = ParquetSplit(dataset, split_name, schema)
        records = describe_split(split)
        rows[split_name], rows_invalid[split_name] = _write_split(
            model, split, join(root, split_name), batch_size, bad_rows, device
        )
        dataset_record[split_name] = [record.to_dict() for record in records]
        logger.info(
            "cached %d logits of split %s (%d invalid rows left as NaN)",
            rows[split_name],
            split_name,
            rows_invalid[split_name],
        )

    wall_time_s = time.perf_counter() - started
    manifest = {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "column": LOGIT_COLUMN,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "teacher": teacher_record,
        "dataset": {
            "url": dataset,
            "schema_fingerprint": schema.fingerprint(),
            "splits": dataset_record,
        },
        "rows": rows,
        "rows_invalid": rows_invalid,
        "wall_time_s": wall_time_s,
    }
    # The manifest goes last: a cache without it is rejected as unfinished.
    with fs.open(join(root, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    return CacheSummary(output, rows, rows_invalid, wall_time_s)


def _write_split(
    model: KDDAGFM,
    split: ParquetSplit,
    directory: str,
    batch_size: int,
    bad_rows: str,
    device: torch.device,
) -> tuple[int, int]:
    """Write one cache file per shard; returns (rows, invalid rows)."""
    out_fs, out_dir = filesystem(directory)
    out_fs.makedirs(out_dir, exist_ok=True)
    units: dict[str, list[RowGroupUnit]] = {}
    for unit in split.units:
        units.setdefault(unit.shard, []).append(unit)
    arrow_schema = pa.schema([pa.field(LOGIT_COLUMN, pa.float32())])
    total = invalid_total = 0
    for shard, shard_units in units.items():
        handle, parquet_file = split.open_shard(shard)
        path = join(out_dir, posixpath.basename(shard))
        try:
            with (
                out_fs.open(path, "wb") as out,
                pq.ParquetWriter(out, arrow_schema) as writer,
            ):
                for unit in shard_units:
                    logits, invalid = _row_group_logits(
                        model, split, parquet_file, unit, batch_size, bad_rows, device
                    )
                    table = pa.table({LOGIT_COLUMN: pa.array(logits, pa.float32())})
                    writer.write_table(table, row_group_size=max(len(logits), 1))
                    total += len(logits)
                    invalid_total += invalid
        finally:
            handle.close()
    return total, invalid_total


def _row_group_logits(
    model: KDDAGFM,
    split: ParquetSplit,
    parquet_file: pq.ParquetFile,
    unit: RowGroupUnit,
    batch_size: int,
    bad_rows: str,
    device: torch.device,
) -> tuple[np.ndarray, int]:
    """(N,) float32 logits of a row group in file order (NaN for invalid rows)
    and the number of invalid rows."""
    table = split.read_row_group(parquet_file, unit)
    logits = np.full(unit.num_rows, np.nan, dtype=np.float32)
    if table is None:  # an undecodable row group under bad_shards=skip
        return logits, unit.num_rows
    source = f"{unit.shard} row group {unit.row_group}"
    invalid = find_invalid_rows(table, split.schema, source, bad_rows)
    valid_rows = (
        np.arange(unit.num_rows, dtype=np.int64)
        if invalid is None
        else np.flatnonzero(~invalid)
    )
    arrays = RowGroupArrays.from_table(table, split.schema)
    assembler = BatchAssembler(split.schema)
    with torch.no_grad():
        for begin in range(0, len(valid_rows), batch_size):
            rows = valid_rows[begin : begin + batch_size]
            assembler.add(arrays, rows)
            batch = assembler.build().to(device)
            output = model(
                batch.sparse_features, batch.dense_features, Phase.TEACHER_TRAINING
            )
            assert output.teacher_logits is not None
            logits[rows] = output.teacher_logits.float().cpu().numpy()
    return logits, unit.num_rows - len(valid_rows)
