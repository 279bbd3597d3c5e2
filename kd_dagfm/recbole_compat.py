"""RecBole compatibility: a ``run_recbole`` quick start and a checkpoint converter.

:func:`run_recbole` takes RecBole's arguments (model name, dataset, config
files, config dict with ``phase`` and ``warm_up``) and runs that phase here.

:func:`convert_recbole_state_dict` maps the ``state_dict`` of a RecBole
1.2.1 ``KD_DAGFM`` checkpoint to :class:`~kd_dagfm.model.KDDAGFM`:

=============================================  ==================================
RecBole 1.2.1 key                              kd-dagfm key
=============================================  ==================================
``token_embedding_table.embedding.weight``     ``...embedding_bags.t_<field>.weight``
(one table, each field's rows at an offset)    (one table per field)
``token_seq_embedding_table.<i>.weight``       ``...embedding_bags.t_<field>.weight``
``float_embedding_table[.embedding].weight``   ``sparse_arch.dense_embedding``
``student_network.connect_layer``              ``student.field_mixing``
``student_network.p.<l>``, ``.q.<l>``          ``student.p[l]``, ``student.q[l]``
``student_network.linear.{weight,bias}``       ``student.readout.{weight,bias}``
``teacher_network.cross_layer_w.<l>``          ``teacher.weight[l]``
``teacher_network.bias.<l>`` (FD, 1)           ``teacher.bias[l]`` (FD,)
``teacher_network.linear.{weight,bias}``       ``teacher.head.{weight,bias}``
``teacher_network.cin.<k>.conv.{weight,bias}``  ``teacher.layers.<k>.{weight,bias}``
``teacher_network.linear`` (sum H, 1)          ``teacher.head.weight`` (1, sum H)
``first_order_linear.*``                       not used by KD_DAGFM; dropped
=============================================  ==================================

The conversion is exact when both models see the same fields in the same
order with the same ids. It raises :class:`~kd_dagfm.errors.CheckpointError`
naming the key, field or shape when it cannot be: DAGFM's DAG (edges f -> s
for f <= s) depends on the field order, so fields are never reordered;
RecBole mean-pools ``token_seq`` fields where kd-dagfm sum-pools list
features; token ids are RecBole's remapped ids, so tables whose sizes
differ need an explicit id map (:func:`id_maps_from_vocabularies`).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kd_dagfm.config import ModelConfig, RunConfig, build_config
from kd_dagfm.errors import CheckpointError, ConfigError
from kd_dagfm.model import KDDAGFM
from kd_dagfm.modules.sparse import table_name
from kd_dagfm.phases import Phase
from kd_dagfm.schema import FeatureKind, FeatureSchema
from kd_dagfm.storage import filesystem

logger = logging.getLogger(__name__)

RECBOLE_MODEL = "KD_DAGFM"
EBC_PREFIX = "sparse_arch.embedding_bag_collection.embedding_bags"
# RecBole config keys that have no counterpart here and do not change what a
# kd-dagfm run computes (devices, reporting, RecBole's data loading options).
IGNORED_RECBOLE_KEYS = frozenset(
    {
        "gpu_id",
        "use_gpu",
        "device",
        "state",
        "reproducibility",
        "show_progress",
        "save_dataset",
        "save_dataloaders",
        "dataset_save_path",
        "dataloaders_save_path",
        "log_wandb",
        "wandb_project",
        "metrics",
        "valid_metric",
        "valid_metric_bigger",
        "eval_step",
        "worker",
        "benchmark_filename",
        "load_col",
        "eval_args",
        "threshold",
        "loss_decimal_place",
        "metric_decimal_place",
        "clip_grad_norm",
    }
)
# RecBole key -> kd-dagfm key, beyond the aliases build_config accepts.
RENAMED_RECBOLE_KEYS = {"checkpoint_dir": "output_dir"}


@dataclasses.dataclass(frozen=True)
class RecBoleLayout:
    """How RecBole's ContextRecommender embedded the fields of a checkpoint.

    RecBole's E is [token fields, token_seq fields, float fields], each group
    in its own order (``model.token_field_names`` and so on in RecBole).

    Attributes:
        token_fields: fields of the single offset table, in table order.
        token_seq_fields: fields with one table each, in table order.
        float_fields: fields scaled by one vector each.
        token_field_dims: rows of each token field in the offset table
            (RecBole's ``dataset.num(field)``); None takes the schema's
            ``num_embeddings``.
        seq_pooling: how RecBole pooled token_seq fields (``mean``, its
            default in ``embed_token_seq_fields``, or ``sum``).
    """

    token_fields: tuple[str, ...]
    token_seq_fields: tuple[str, ...] = ()
    float_fields: tuple[str, ...] = ()
    token_field_dims: tuple[int, ...] | None = None
    seq_pooling: str = "mean"

    @classmethod
    def from_schema(cls, schema: FeatureSchema) -> RecBoleLayout:
        """The layout RecBole gives the schema's fields, keeping each kind's order."""
        return cls(
            token_fields=tuple(
                f.name for f in schema.features if f.kind is FeatureKind.SPARSE
            ),
            token_seq_fields=tuple(
                f.name for f in schema.features if f.kind is FeatureKind.SPARSE_LIST
            ),
            float_fields=tuple(f.name for f in schema.dense_features),
        )

    @property
    def field_order(self) -> tuple[str, ...]:
        """The fields along RecBole's F axis of E."""
        return self.token_fields + self.token_seq_fields + self.float_fields


@dataclasses.dataclass(frozen=True)
class ConvertedCheckpoint:
    """A RecBole KD_DAGFM state dict mapped to kd-dagfm.

    Attributes:
        state_dict: loads into ``KDDAGFM(schema, ModelConfig(**model))``.
        model: model config values read from the tensors' shapes.
        dropped: RecBole keys KD_DAGFM never uses (``first_order_linear``).
    """

    state_dict: dict[str, torch.Tensor]
    model: dict[str, Any]
    dropped: tuple[str, ...]


def infer_model_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Teacher, student type and sizes of a RecBole KD_DAGFM state dict.

    Raises:
        CheckpointError: when the keys are not those of KD_DAGFM.
    """
    p_layers = _indexed(state, "student_network.p")
    if "student_network.connect_layer" not in state or not p_layers:
        raise CheckpointError(
            "the state dict has no student_network.connect_layer or "
            "student_network.p.<l>: it is not a RecBole KD_DAGFM checkpoint "
            f"(first keys: {sorted(state)[:6]})"
        )
    model: dict[str, Any] = {
        "depth": len(p_layers),
        "embedding_size": int(p_layers[0].shape[-1]),
        "student_type": "outer" if _indexed(state, "student_network.q") else "inner",
        "student": "dagfm",
    }
    cross = _indexed(state, "teacher_network.cross_layer_w")
    cin_weights = _indexed(state, "teacher_network.cin", suffix=".conv.weight")
    if cross:
        model.update(teacher="crossnet", t_depth=len(cross))
    elif cin_weights:
        model.update(teacher="cin", t_cin=[int(w.shape[0]) for w in cin_weights])
    else:
        raise CheckpointError(
            "the state dict has neither teacher_network.cross_layer_w.<l> (CrossNet) "
            "nor teacher_network.cin.<k>.conv.weight (CIN); RecBole 1.2.1's "
            "KD_DAGFM has only these teachers"
        )
    return model


def convert_recbole_state_dict(
    state: Mapping[str, torch.Tensor],
    schema: FeatureSchema,
    layout: RecBoleLayout | None = None,
    id_maps: Mapping[str, Sequence[int] | np.ndarray] | None = None,
    accept_sum_pooling: bool = False,
) -> ConvertedCheckpoint:
    """Map a RecBole 1.2.1 KD_DAGFM ``state_dict`` to a KDDAGFM state dict.

    Args:
        state: ``torch.load(path)["state_dict"]`` of RecBole's checkpoint
            (see :func:`load_recbole_checkpoint`).
        schema: the kd-dagfm dataset the model will run on.
        layout: RecBole's field layout; default :meth:`RecBoleLayout.from_schema`.
        id_maps: per field, the kd-dagfm id of each RecBole id (-1 for a
            RecBole id with no kd-dagfm id). Fields without a map need
            tables of equal size, and the ids are taken as equal.
        accept_sum_pooling: convert although RecBole mean-pooled token_seq
            fields; rows with more than one id then embed differently.

    Raises:
        CheckpointError: naming the key, field or shape that cannot be mapped.
    """
    layout = layout or RecBoleLayout.from_schema(schema)
    id_maps = id_maps or {}
    model = infer_model_config(state)
    _check_fields(state, schema, layout, accept_sum_pooling)
    dim = model["embedding_size"]

    converted: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    converted.update(_token_tables(state, schema, layout, id_maps, dim, used))
    converted.update(_float_table(state, layout, dim, used))
    converted.update(_student(state, model, used))
    converted.update(_teacher(state, model, used))

    dropped = tuple(sorted(k for k in state if k.startswith("first_order_linear.")))
    unknown = sorted(set(state) - used - set(dropped))
    if unknown:
        raise CheckpointError(
            f"RecBole keys {unknown[:8]} have no kd-dagfm counterpart; the checkpoint "
            "is not a RecBole 1.2.1 KD_DAGFM one, or was made by a modified model"
        )
    _check_against_model(converted, schema, model)
    return ConvertedCheckpoint(converted, model, dropped)


def _check_fields(
    state: Mapping[str, torch.Tensor],
    schema: FeatureSchema,
    layout: RecBoleLayout,
    accept_sum_pooling: bool,
) -> None:
    num_fields = int(state["student_network.connect_layer"].shape[0])
    order = layout.field_order
    if num_fields != len(order):
        raise CheckpointError(
            f"the RecBole checkpoint has {num_fields} fields (connect_layer "
            f"{tuple(state['student_network.connect_layer'].shape)}), the layout "
            f"names {len(order)}: {list(order)}"
        )
    if order != schema.field_names:
        raise CheckpointError(
            f"RecBole's field order {list(order)} (token, then token_seq, then float "
            f"fields) differs from the schema's {list(schema.field_names)}. DAGFM's "
            "edges run from each field to the later ones, so a reordered model is a "
            "different model; convert the data with the fields in RecBole's order"
        )
    for name in layout.token_seq_fields:
        if schema.feature(name).kind is not FeatureKind.SPARSE_LIST:
            raise CheckpointError(
                f"{name!r} is a RecBole token_seq field but a "
                f"{schema.feature(name).kind.value} feature in the schema"
            )
    if layout.token_seq_fields and layout.seq_pooling != "sum":
        if not accept_sum_pooling:
            raise CheckpointError(
                f"RecBole {layout.seq_pooling}-pooled the token_seq fields "
                f"{list(layout.token_seq_fields)}; kd-dagfm sum-pools list features, "
                "so rows with more than one id would embed differently. Pass "
                "accept_sum_pooling=True to convert anyway (logits then differ on "
                "those rows), or fine-tune after converting"
            )
        logger.warning(
            "converting although RecBole %s-pooled %s and kd-dagfm sum-pools them",
            layout.seq_pooling,
            list(layout.token_seq_fields),
        )


def _token_tables(
    state: Mapping[str, torch.Tensor],
    schema: FeatureSchema,
    layout: RecBoleLayout,
    id_maps: Mapping[str, Sequence[int] | np.ndarray],
    dim: int,
    used: set[str],
) -> dict[str, torch.Tensor]:
    tables: dict[str, torch.Tensor] = {}
    if layout.token_fields:
        key = "token_embedding_table.embedding.weight"
        table = _require(state, key, dim)
        dims = layout.token_field_dims or tuple(
            schema.feature(n).num_embeddings for n in layout.token_fields
        )
        if len(dims) != len(layout.token_fields):
            raise CheckpointError(
                f"token_field_dims has {len(dims)} entries for "
                f"{len(layout.token_fields)} token fields {list(layout.token_fields)}"
            )
        if sum(dims) != table.shape[0]:
            raise CheckpointError(
                f"{key} has {table.shape[0]} rows, but the token fields "
                f"{list(layout.token_fields)} have {list(dims)} = {sum(dims)} rows. "
                "Give token_field_dims as RecBole's dataset.num(field) for each field"
            )
        offsets = np.concatenate([[0], np.cumsum(dims)])
        for index, name in enumerate(layout.token_fields):
            rows = table[int(offsets[index]) : int(offsets[index + 1])]
            tables[_table_key(name)] = _map_rows(rows, name, schema, id_maps, key)
        used.add(key)
    for index, name in enumerate(layout.token_seq_fields):
        key = f"token_seq_embedding_table.{index}.weight"
        rows = _require(state, key, dim)
        tables[_table_key(name)] = _map_rows(rows, name, schema, id_maps, key)
        used.add(key)
    return tables


def _map_rows(
    rows: torch.Tensor,
    name: str,
    schema: FeatureSchema,
    id_maps: Mapping[str, Sequence[int] | np.ndarray],
    key: str,
) -> torch.Tensor:
    """RecBole rows of one field (indexed by RecBole id) as kd-dagfm's table."""
    num_embeddings = schema.feature(name).num_embeddings
    if name not in id_maps:
        if rows.shape[0] != num_embeddings:
            raise CheckpointError(
                f"field {name!r}: RecBole's table ({key}) has {rows.shape[0]} rows, "
                f"the schema's has {num_embeddings}. The two id assignments differ; "
                "pass id_maps built with id_maps_from_vocabularies"
            )
        return rows.detach().clone()
    mapping = np.asarray(id_maps[name], dtype=np.int64)
    if mapping.shape != (rows.shape[0],):
        raise CheckpointError(
            f"field {name!r}: the id map has {mapping.shape[0]} entries for "
            f"{rows.shape[0]} RecBole ids"
        )
    valid = mapping >= 0
    if (mapping[valid] >= num_embeddings).any():
        raise CheckpointError(
            f"field {name!r}: the id map points past the schema's "
            f"{num_embeddings} ids (max {int(mapping.max())})"
        )
    targets = mapping[valid]
    if len(np.unique(targets)) != len(targets):
        raise CheckpointError(
            f"field {name!r}: the id map sends two RecBole ids to one id"
        )
    missing = np.setdiff1d(np.arange(num_embeddings), targets)
    if len(missing):
        raise CheckpointError(
            f"field {name!r}: {len(missing)} kd-dagfm ids have no RecBole id (first "
            f"{missing[:5].tolist()}); RecBole never saw those tokens, so the "
            "checkpoint has no embedding for them"
        )
    table = torch.empty(num_embeddings, rows.shape[1], dtype=rows.dtype)
    table[torch.from_numpy(targets)] = rows[torch.from_numpy(np.flatnonzero(valid))]
    return table


def _float_table(
    state: Mapping[str, torch.Tensor], layout: RecBoleLayout, dim: int, used: set[str]
) -> dict[str, torch.Tensor]:
    keys = [
        k
        for k in (
            "float_embedding_table.weight",
            "float_embedding_table.embedding.weight",
        )
        if k in state
    ]
    if not layout.float_fields:
        if keys:
            raise CheckpointError(
                f"the checkpoint has {keys[0]} but the layout names no float fields"
            )
        return {}
    if not keys:
        raise CheckpointError(
            f"the layout names float fields {list(layout.float_fields)}, but the "
            "checkpoint has no float_embedding_table"
        )
    table = _require(state, keys[0], dim)
    if table.shape[0] != len(layout.float_fields):
        raise CheckpointError(
            f"{keys[0]} has {table.shape[0]} rows for {len(layout.float_fields)} float "
            "fields; only one vector per float field maps to kd-dagfm's dense "
            "features (bucketised float fields do not)"
        )
    used.add(keys[0])
    return {"sparse_arch.dense_embedding": table.detach().clone()}


def _student(
    state: Mapping[str, torch.Tensor], model: dict[str, Any], used: set[str]
) -> dict[str, torch.Tensor]:
    out = {
        "student.field_mixing": state["student_network.connect_layer"],
        "student.p": torch.stack(_indexed(state, "student_network.p")),
        "student.readout.weight": state["student_network.linear.weight"],
        "student.readout.bias": state["student_network.linear.bias"],
    }
    used.update(
        {
            "student_network.connect_layer",
            "student_network.linear.weight",
            "student_network.linear.bias",
        }
    )
    used.update(_indexed_keys(state, "student_network.p"))
    if model["student_type"] == "outer":
        out["student.q"] = torch.stack(_indexed(state, "student_network.q"))
        used.update(_indexed_keys(state, "student_network.q"))
    return {k: v.detach().clone() for k, v in out.items()}


def _teacher(
    state: Mapping[str, torch.Tensor], model: dict[str, Any], used: set[str]
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if model["teacher"] == "crossnet":
        out["teacher.weight"] = torch.stack(
            _indexed(state, "teacher_network.cross_layer_w")
        )
        out["teacher.bias"] = torch.stack(
            [b.reshape(-1) for b in _indexed(state, "teacher_network.bias")]
        )
        out["teacher.head.weight"] = state["teacher_network.linear.weight"]
        out["teacher.head.bias"] = state["teacher_network.linear.bias"]
        used.update(_indexed_keys(state, "teacher_network.cross_layer_w"))
        used.update(_indexed_keys(state, "teacher_network.bias"))
        used.update({"teacher_network.linear.weight", "teacher_network.linear.bias"})
    else:
        for key in _indexed_keys(state, "teacher_network.cin", suffix=".conv.weight"):
            layer = key.split(".")[2]
            out[f"teacher.layers.{layer}.weight"] = state[key]
            out[f"teacher.layers.{layer}.bias"] = state[key[: -len("weight")] + "bias"]
            used.update({key, key[: -len("weight")] + "bias"})
        # RecBole multiplies the pooled CIN outputs by a (sum H, 1) parameter.
        out["teacher.head.weight"] = state["teacher_network.linear"].t()
        used.add("teacher_network.linear")
    return {k: v.detach().clone() for k, v in out.items()}


def _check_against_model(
    converted: dict[str, torch.Tensor], schema: FeatureSchema, model: dict[str, Any]
) -> None:
    expected = KDDAGFM(schema, ModelConfig(**model), device="meta").state_dict()
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"converted weights do not fit KDDAGFM: missing {missing[:6]}, "
            f"unexpected {extra[:6]}"
        )
    for key, tensor in expected.items():
        if tuple(converted[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{key}: the RecBole weights give shape {tuple(converted[key].shape)}, "
                f"KDDAGFM expects {tuple(tensor.shape)} for this schema"
            )


def _require(state: Mapping[str, torch.Tensor], key: str, dim: int) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"the RecBole checkpoint has no {key}")
    tensor = state[key]
    if tensor.dim() != 2 or tensor.shape[1] != dim:
        raise CheckpointError(
            f"{key} has shape {tuple(tensor.shape)}; expected (rows, {dim}) with the "
            "student's embedding size"
        )
    return tensor


def _indexed_keys(
    state: Mapping[str, torch.Tensor], prefix: str, suffix: str = ""
) -> list[str]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+){re.escape(suffix)}$")
    found = sorted((int(m.group(1)), key) for key in state if (m := pattern.match(key)))
    indices = [i for i, _ in found]
    if indices != list(range(len(indices))):
        raise CheckpointError(
            f"{prefix}.<i>{suffix} has indices {indices}; expected 0 .. {len(indices) - 1}"
        )
    return [key for _, key in found]


def _indexed(
    state: Mapping[str, torch.Tensor], prefix: str, suffix: str = ""
) -> list[torch.Tensor]:
    return [state[key] for key in _indexed_keys(state, prefix, suffix)]


def _table_key(field: str) -> str:
    return f"{EBC_PREFIX}.{table_name(field)}.weight"


def id_maps_from_vocabularies(
    recbole_id2token: Mapping[str, Sequence[str]],
    token2id: Mapping[str, Mapping[str, int]],
) -> dict[str, np.ndarray]:
    """Id maps for :func:`convert_recbole_state_dict`, matched by token.

    Args:
        recbole_id2token: per field, RecBole's token of each id
            (``dataset.field2id_token[field]``; id 0 is ``[PAD]``).
        token2id: per field, the kd-dagfm id of each token; ``[PAD]`` maps to
            the padding id 0 when absent.

    Returns:
        Per field, the kd-dagfm id of each RecBole id, -1 where the token
        has none.

    NOTE: ``kd-dagfm convert recbole`` does not save its vocabularies, so
    ``token2id`` has to be rebuilt by the caller; the next step is writing
    them beside ``schema.json``.
    """
    maps: dict[str, np.ndarray] = {}
    for field, tokens in recbole_id2token.items():
        if field not in token2id:
            raise CheckpointError(
                f"field {field!r} has a RecBole vocabulary but no kd-dagfm one"
            )
        ours = {"[PAD]": 0, **token2id[field]}
        maps[field] = np.array([ours.get(str(t), -1) for t in tokens], dtype=np.int64)
    return maps


class _Stub:
    """Stands in for RecBole's pickled objects (its Config), which are not needed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _CheckpointUnpickler(pickle.Unpickler):
    # Tensors and containers load as usual; everything else (RecBole's
    # Config, enums, its dataset classes) becomes a stub, so loading needs
    # no RecBole installation and runs no code from the checkpoint's classes.
    _ALLOWED = ("torch", "collections", "numpy", "_codecs", "builtins")

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] in self._ALLOWED:
            return super().find_class(module, name)
        return _Stub


class _PickleModule:
    """A pickle module for ``torch.load`` that uses :class:`_CheckpointUnpickler`."""

    Unpickler = _CheckpointUnpickler
    __name__ = "kd_dagfm_recbole_pickle"

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _CheckpointUnpickler(file, **kwargs).load()


def load_recbole_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a RecBole ``.pth`` checkpoint, without RecBole.

    RecBole pickles its Config object into the checkpoint, which
    ``torch.load(weights_only=True)`` rejects (PyTorch >= 2.6); here that
    object is replaced by a stub and only the tensors are kept.
    """
    fs, local = filesystem(path)
    try:
        with fs.open(local, "rb") as f:
            data = torch.load(
                io.BytesIO(f.read()),
                map_location="cpu",
                pickle_module=_PickleModule,  # type: ignore[arg-type]
                weights_only=False,
            )
    except FileNotFoundError:
        raise CheckpointError(f"RecBole checkpoint {path!r} not found") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CheckpointError(
            f"RecBole checkpoint {path!r} is unreadable ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(data, dict) or "state_dict" not in data:
        raise CheckpointError(
            f"{path!r} has no 'state_dict' entry; RecBole checkpoints hold "
            "{'config', 'epoch', 'state_dict', 'optimizer', ...}"
        )
    return dict(data["state_dict"])


def run_recbole(
    model: str = RECBOLE_MODEL,
    dataset: str = "ml-100k",
    config_file_list: Sequence[str] | None = None,
    config_dict: Mapping[str, Any] | None = None,
    saved: bool = True,
) -> dict[str, Any]:
    """Run one KD-DAGFM phase the way ``recbole.quick_start.run_recbole`` does.

    Args:
        model: ``"KD_DAGFM"``; ``student: dagfm_plus`` in the config gives
            KD-DAGFM+.
        dataset: a directory of RecBole atomic files, a kd-dagfm Parquet
            dataset, or a name looked up under ``data_path`` (RecBole's key,
            default ``dataset/``).
        config_file_list: YAML files, applied in order.
        config_dict: keys applied last: ``phase``, ``warm_up``, RecBole names
            (``alpha``, ``beta``, ``type``, ``stopping_step``,
            ``checkpoint_dir``, ``teacher: CrossNet``) or kd-dagfm keys.
        saved: kept for RecBole's signature; checkpoints are always written
            (to ``<checkpoint_dir>/KD_DAGFM-<dataset>/<phase>``), since a
            later phase warm-starts from them.

    Returns:
        RecBole's result dict: ``best_valid_score`` (valid AUC),
        ``valid_score_bigger``, ``best_valid_result`` and ``test_result``
        (``{"auc": ..., "logloss": ...}``), plus ``phase_result``.

    Raises:
        ConfigError: an unknown model or key, or a missing dataset.
        CheckpointError: a RecBole ``.pth`` as ``warm_up`` (convert it first).
    """
    from kd_dagfm.pipeline import run_phase

    if model != RECBOLE_MODEL:
        raise ConfigError(
            f"model {model!r} is not supported: kd-dagfm runs {RECBOLE_MODEL} (set "
            "student: dagfm_plus for KD-DAGFM+)"
        )
    config = recbole_config(dataset, config_file_list, config_dict)
    if not saved:
        logger.info("saved=False is ignored: later phases warm-start from checkpoints")
    result = run_phase(config)
    return {
        "best_valid_score": result.valid.auc,
        "valid_score_bigger": True,
        "best_valid_result": {
            "auc": result.valid.auc,
            "logloss": result.valid.log_loss,
        },
        "test_result": {"auc": result.test.auc, "logloss": result.test.log_loss},
        "phase_result": result,
    }


def recbole_config(
    dataset: str,
    config_file_list: Sequence[str] | None = None,
    config_dict: Mapping[str, Any] | None = None,
) -> RunConfig:
    """The run config :func:`run_recbole` uses for RecBole-style arguments."""
    import yaml

    values: dict[str, Any] = {}
    for path in config_file_list or ():
        try:
            with open(path, encoding="utf-8") as f:
                values.update(yaml.safe_load(f) or {})
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} not found") from None
    values.update(config_dict or {})

    ignored = sorted(k for k in values if k in IGNORED_RECBOLE_KEYS)
    if ignored:
        logger.info("ignoring RecBole keys without a kd-dagfm counterpart: %s", ignored)
    for key in ignored:
        values.pop(key)
    for old, new in RENAMED_RECBOLE_KEYS.items():
        if old in values:
            values[new] = values.pop(old)
    data_path = str(values.pop("data_path", "dataset"))
    if "model" in values and values.pop("model") != RECBOLE_MODEL:
        raise ConfigError(f"config sets model to something other than {RECBOLE_MODEL}")

    directory = dataset if os.path.isdir(dataset) else os.path.join(data_path, dataset)
    if not os.path.isdir(directory):
        raise ConfigError(
            f"dataset {dataset!r} not found (looked for {directory}); give a "
            "directory of RecBole atomic files or set data_path"
        )
    values["dataset"] = directory
    name = os.path.basename(os.path.normpath(directory))
    values.setdefault("output_dir", "saved")
    values["output_dir"] = os.path.join(
        str(values["output_dir"]), f"{RECBOLE_MODEL}-{name}"
    )

    warm_up = values.get("warm_up")
    if isinstance(warm_up, str) and warm_up.endswith(".pth"):
        raise CheckpointError(
            f"warm_up {warm_up!r} is a RecBole checkpoint. Convert it first with "
            "kd_dagfm.recbole_compat.convert_recbole_checkpoint (its ids and field "
            "order must match this dataset) and pass the written model.pt"
        )
    phase = Phase.parse(values.get("phase", Phase.TEACHER_TRAINING.value))
    values["phase"] = phase.value
    return build_config(values)


def convert_recbole_checkpoint(
    path: str,
    schema: FeatureSchema,
    output: str,
    phase: Phase | str = Phase.TEACHER_TRAINING,
    layout: RecBoleLayout | None = None,
    id_maps: Mapping[str, Sequence[int] | np.ndarray] | None = None,
    accept_sum_pooling: bool = False,
    base: ModelConfig | None = None,
) -> ConvertedCheckpoint:
    """Convert a RecBole ``.pth`` and write it as a kd-dagfm ``model.pt``.

    The file is accepted as ``warm_up`` by the phase after ``phase`` (a
    RecBole teacher_training checkpoint warm-starts distillation). warm_up
    compares the whole model config, so the file records ``base`` (default:
    ModelConfig's defaults) with the values read from the checkpoint; pass
    the model config of the run that will warm-start from it.
    """
    from kd_dagfm.train.checkpoint import export_model_file

    phase = Phase.parse(phase)
    converted = convert_recbole_state_dict(
        load_recbole_checkpoint(path), schema, layout, id_maps, accept_sum_pooling
    )
    model = dataclasses.asdict(base) if base is not None else {}
    config = build_config({"model": {**model, **converted.model}})
    meta = {
        "phase": phase.value,
        "kind": "final",
        "seq": 0,
        "created": None,
        "source": f"RecBole checkpoint {path}",
        "config": config.to_dict(),
        "schema": schema.to_dict(),
    }
    export_model_file(output, converted.state_dict, meta)
    logger.info("converted RecBole checkpoint %s to %s", path, output)
    return converted
