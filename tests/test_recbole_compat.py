"""RecBole compatibility: the KD_DAGFM checkpoint converter and run_recbole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from kd_dagfm.errors import CheckpointError, ConfigError
from kd_dagfm.model import KDDAGFM
from kd_dagfm.phases import Phase
from kd_dagfm.pipeline import prepare_dataset, run_phase
from kd_dagfm.recbole_compat import (
    RecBoleLayout,
    convert_recbole_checkpoint,
    convert_recbole_state_dict,
    id_maps_from_vocabularies,
    load_recbole_checkpoint,
    run_recbole,
)
from kd_dagfm.schema import FeatureSchema, make_schema
from kd_dagfm.train.checkpoint import read_model_file
from tests.conftest import tiny_config

D, L = 3, 2
SIZES = {"u": 5, "i": 6, "g": 4}  # token, token, token_seq
SCHEMA = make_schema("label", SIZES, lists=["g"], dense=["d"])
F = 4  # u, i, g, d


class FakeRecBoleConfig:
    """Stands in for RecBole's Config, which RecBole pickles into checkpoints."""

    def __init__(self) -> None:
        self.final_config_dict = {"model": "KD_DAGFM"}


def recbole_state(
    teacher: str, student_type: str = "outer", seed: int = 0, sizes=None
) -> dict[str, torch.Tensor]:
    """A state dict with RecBole 1.2.1 KD_DAGFM's key names and shapes."""
    sizes = sizes or SIZES
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.5

    token_rows = sizes["u"] + sizes["i"]
    state = {
        "token_embedding_table.embedding.weight": rand(token_rows, D),
        "token_seq_embedding_table.0.weight": rand(sizes["g"], D),
        "float_embedding_table.weight": rand(1, D),
        "first_order_linear.token_embedding_table.embedding.weight": rand(
            token_rows, 1
        ),
        "first_order_linear.bias": rand(1),
        "student_network.connect_layer": torch.eye(F) + 0.1 * rand(F, F),
        "student_network.linear.weight": rand(1, F * (L + 1)),
        "student_network.linear.bias": rand(1),
    }
    for layer in range(L):
        state[f"student_network.p.{layer}"] = rand(F, F, D)
        if student_type == "outer":
            state[f"student_network.q.{layer}"] = rand(F, F, D)
    if teacher == "crossnet":
        for layer in range(2):
            state[f"teacher_network.cross_layer_w.{layer}"] = 0.2 * rand(F * D, F * D)
            state[f"teacher_network.bias.{layer}"] = rand(F * D, 1)
        state["teacher_network.linear.weight"] = rand(1, F * D)
        state["teacher_network.linear.bias"] = rand(1)
    else:
        sizes_cin = [F, 3, 2]
        for k in range(2):
            state[f"teacher_network.cin.{k}.conv.weight"] = rand(
                sizes_cin[k + 1], sizes_cin[k] * F, 1
            )
            state[f"teacher_network.cin.{k}.conv.bias"] = rand(sizes_cin[k + 1])
        state["teacher_network.linear"] = rand(5, 1)
    return state


# RecBole ids per row: u, i, genres (padded with 0), and the float d.
USERS = [1, 2, 4, 0]
ITEMS = [5, 1, 3, 2]
GENRES = [[1], [], [3], [2]]  # at most one genre: mean pooling equals sum
DENSE = [0.5, -1.0, 2.0, 0.0]


def recbole_embeddings(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """E as RecBole's ContextRecommender builds it: token, token_seq, float."""
    table = state["token_embedding_table.embedding.weight"]
    seq_table = state["token_seq_embedding_table.0.weight"]
    rows = []
    for b in range(len(USERS)):
        u = table[0 + USERS[b]]  # offsets (0, 5)
        i = table[SIZES["u"] + ITEMS[b]]
        ids = [x for x in GENRES[b] if x != 0]
        g = sum((seq_table[x] for x in ids), torch.zeros(D)) / (len(ids) + 1e-8)
        d = DENSE[b] * state["float_embedding_table.weight"][0]
        rows.append(torch.stack([u, i, g, d]))
    return torch.stack(rows)  # (B, F, D)


def recbole_student(state: dict[str, torch.Tensor], e: torch.Tensor) -> torch.Tensor:
    """RecBole's DAGFM.FeatureInteraction, before the sigmoid."""
    adj = torch.zeros(F, F, D)
    for i in range(F):
        for j in range(i, F):
            adj[i, j, :] += 1
    h0 = state["student_network.connect_layer"] @ e
    h = h0
    pooled = [h0.sum(-1)]
    for layer in range(L):
        p = state[f"student_network.p.{layer}"] * adj
        if "student_network.q.0" in state:
            term = torch.einsum("bfd,fsd->bfs", h, p)
            aggregated = torch.einsum(
                "bfs,fsd->bsd", term, state[f"student_network.q.{layer}"]
            )
        else:
            aggregated = torch.einsum("bfd,fsd->bsd", h, p)
        h = h0 * aggregated
        pooled.append(h.sum(-1))
    weight = state["student_network.linear.weight"]
    return (torch.cat(pooled, -1) @ weight.t() + state["student_network.linear.bias"])[
        :, 0
    ]


def recbole_teacher(state: dict[str, torch.Tensor], e: torch.Tensor) -> torch.Tensor:
    if "teacher_network.linear" in state:  # CIN
        x, pooled = e, []
        for k in range(2):
            w = state[f"teacher_network.cin.{k}.conv.weight"]
            outer = (x[:, :, None, :] * e[:, None, :, :]).reshape(e.shape[0], -1, D)
            x = torch.nn.functional.conv1d(
                outer, w, state[f"teacher_network.cin.{k}.conv.bias"]
            )
            pooled.append(x.sum(-1))
        return (torch.cat(pooled, -1) @ state["teacher_network.linear"])[:, 0]
    x0 = e.reshape(e.shape[0], -1, 1)
    x = x0
    for layer in range(2):
        xw = state[f"teacher_network.cross_layer_w.{layer}"] @ x
        x = x0 * (xw + state[f"teacher_network.bias.{layer}"]) + x
    x = x.squeeze(-1)
    return (x @ state["teacher_network.linear.weight"].t())[:, 0] + state[
        "teacher_network.linear.bias"
    ]


def our_logits(
    state: dict[str, torch.Tensor], model: dict[str, object], u=USERS, i=ITEMS
) -> tuple[torch.Tensor, torch.Tensor]:
    from kd_dagfm.config import ModelConfig

    net = KDDAGFM(SCHEMA, ModelConfig(**model)).eval()
    net.load_state_dict(state)
    values = [*u, *i, *(x for row in GENRES for x in row)]
    lengths = [1] * 8 + [len(row) for row in GENRES]
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["u", "i", "g"], values=torch.tensor(values), lengths=torch.tensor(lengths)
    )
    dense = torch.tensor(DENSE).unsqueeze(1)
    with torch.no_grad():
        teacher = net(features, dense, Phase.TEACHER_TRAINING).teacher_logits
        student = net(features, dense, Phase.FINETUNING).student_logits
    assert teacher is not None and student is not None
    return teacher, student


@pytest.mark.parametrize(
    ("teacher", "student_type"), [("crossnet", "outer"), ("cin", "inner")]
)
def test_converted_model_matches_recbole_math(teacher: str, student_type: str) -> None:
    state = recbole_state(teacher, student_type)
    converted = convert_recbole_state_dict(state, SCHEMA, accept_sum_pooling=True)
    assert converted.model["teacher"] == teacher
    assert converted.model["student_type"] == student_type
    assert converted.model["embedding_size"] == D
    assert converted.model["depth"] == L
    assert converted.dropped == (
        "first_order_linear.bias",
        "first_order_linear.token_embedding_table.embedding.weight",
    )
    e = recbole_embeddings(state)
    teacher_logits, student_logits = our_logits(converted.state_dict, converted.model)
    torch.testing.assert_close(teacher_logits, recbole_teacher(state, e))
    torch.testing.assert_close(student_logits, recbole_student(state, e))


def test_token_table_rows_split_at_offsets() -> None:
    state = recbole_state("crossnet")
    converted = convert_recbole_state_dict(state, SCHEMA, accept_sum_pooling=True)
    table = state["token_embedding_table.embedding.weight"]
    prefix = "sparse_arch.embedding_bag_collection.embedding_bags"
    torch.testing.assert_close(converted.state_dict[f"{prefix}.t_u.weight"], table[:5])
    torch.testing.assert_close(converted.state_dict[f"{prefix}.t_i.weight"], table[5:])


def test_id_maps_reorder_rows_by_token() -> None:
    """RecBole numbered the i tokens in another order than kd-dagfm did."""
    tokens = ["[PAD]", "a", "b", "c", "d", "e"]
    ours = {"e": 1, "d": 2, "c": 3, "b": 4, "a": 5}
    maps = id_maps_from_vocabularies({"i": tokens}, {"i": ours})
    assert maps["i"].tolist() == [0, 5, 4, 3, 2, 1]
    state = recbole_state("crossnet")
    converted = convert_recbole_state_dict(
        state, SCHEMA, id_maps=maps, accept_sum_pooling=True
    )
    # Row r of the RecBole data is item RecBole id ITEMS[r], kd-dagfm id maps[ITEMS[r]].
    our_items = [int(maps["i"][x]) for x in ITEMS]
    teacher_logits, _ = our_logits(converted.state_dict, converted.model, i=our_items)
    torch.testing.assert_close(
        teacher_logits, recbole_teacher(state, recbole_embeddings(state))
    )


def test_mean_pooling_needs_consent() -> None:
    with pytest.raises(CheckpointError) as error:
        convert_recbole_state_dict(recbole_state("crossnet"), SCHEMA)
    assert "RecBole mean-pooled the token_seq fields ['g']" in str(error.value)
    assert "accept_sum_pooling=True" in str(error.value)
    layout = RecBoleLayout(("u", "i"), ("g",), ("d",), seq_pooling="sum")
    convert_recbole_state_dict(recbole_state("crossnet"), SCHEMA, layout=layout)


def test_field_order_mismatch_is_rejected() -> None:
    reordered = make_schema("label", {"i": 6, "u": 5, "g": 4}, lists=["g"], dense=["d"])
    with pytest.raises(CheckpointError) as error:
        convert_recbole_state_dict(
            recbole_state("crossnet"),
            reordered,
            layout=RecBoleLayout(("u", "i"), ("g",), ("d",)),
            accept_sum_pooling=True,
        )
    message = str(error.value)
    assert "RecBole's field order ['u', 'i', 'g', 'd']" in message
    assert "differs from the schema's ['i', 'u', 'g', 'd']" in message


def test_table_size_mismatch_names_the_field() -> None:
    state = recbole_state("crossnet", sizes={"u": 5, "i": 7, "g": 4})
    with pytest.raises(CheckpointError) as error:
        convert_recbole_state_dict(state, SCHEMA, accept_sum_pooling=True)
    assert "token_embedding_table.embedding.weight has 12 rows" in str(error.value)
    layout = RecBoleLayout(("u", "i"), ("g",), ("d",), token_field_dims=(5, 7))
    with pytest.raises(CheckpointError) as error:
        convert_recbole_state_dict(state, SCHEMA, layout, accept_sum_pooling=True)
    assert "field 'i': RecBole's table" in str(error.value)
    assert "has 7 rows, the schema's has 6" in str(error.value)


def test_incomplete_id_map_is_rejected() -> None:
    maps = {"i": np.array([0, 1, 2, 3, 4, -1])}  # kd-dagfm id 5 gets no row
    with pytest.raises(CheckpointError) as error:
        convert_recbole_state_dict(
            recbole_state("crossnet"), SCHEMA, id_maps=maps, accept_sum_pooling=True
        )
    assert "field 'i': 1 kd-dagfm ids have no RecBole id (first [5])" in str(
        error.value
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: s.pop("student_network.connect_layer"),
            "not a RecBole KD_DAGFM checkpoint",
        ),
        (
            lambda s: s.update({"teacher_network.extra": torch.zeros(1)}),
            "RecBole keys ['teacher_network.extra'] have no kd-dagfm counterpart",
        ),
        (
            lambda s: s.pop("student_network.p.0"),
            "student_network.p.<i> has indices [1]",
        ),
        (
            lambda s: s.update({"float_embedding_table.weight": torch.zeros(2, D)}),
            "float_embedding_table.weight has 2 rows for 1 float fields",
        ),
    ],
)
def test_malformed_state_dicts(change, message: str) -> None:
    state = recbole_state("crossnet")
    change(state)
    with pytest.raises(CheckpointError) as error:
        convert_recbole_state_dict(state, SCHEMA, accept_sum_pooling=True)
    assert message in str(error.value)


def test_checkpoint_loads_without_recbole(tmp_path: Path) -> None:
    state = recbole_state("cin")
    path = tmp_path / "KD_DAGFM-Jan-01-2026.pth"
    torch.save(
        {"config": FakeRecBoleConfig(), "epoch": 3, "state_dict": state}, str(path)
    )
    loaded = load_recbole_checkpoint(str(path))
    assert loaded.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor)


def synthetic_recbole_state(schema: FeatureSchema) -> dict[str, torch.Tensor]:
    """RecBole-shaped CrossNet/outer weights for the tiny synthetic schema."""
    g = torch.Generator().manual_seed(1)
    fields = schema.num_fields
    dim = 4
    rows = sum(f.num_embeddings for f in schema.sparse_features)
    state = {
        "token_embedding_table.embedding.weight": torch.randn(rows, dim, generator=g),
        "student_network.connect_layer": torch.eye(fields),
        "student_network.linear.weight": torch.randn(1, fields * 3, generator=g),
        "student_network.linear.bias": torch.zeros(1),
        "teacher_network.linear.weight": torch.randn(1, fields * dim, generator=g),
        "teacher_network.linear.bias": torch.zeros(1),
    }
    for layer in range(2):
        state[f"student_network.p.{layer}"] = torch.randn(
            fields, fields, dim, generator=g
        )
        state[f"student_network.q.{layer}"] = torch.randn(
            fields, fields, dim, generator=g
        )
        state[f"teacher_network.cross_layer_w.{layer}"] = 0.05 * torch.randn(
            fields * dim, fields * dim, generator=g
        )
        state[f"teacher_network.bias.{layer}"] = torch.zeros(fields * dim, 1)
    return state


def test_converted_teacher_warm_starts_distillation(tmp_path: Path) -> None:
    dataset, schema = prepare_dataset(tiny_config(tmp_path / "prepare"))
    pth = tmp_path / "KD_DAGFM-teacher.pth"
    torch.save(
        {"config": FakeRecBoleConfig(), "state_dict": synthetic_recbole_state(schema)},
        str(pth),
    )
    model_file = tmp_path / "converted" / "model.pt"
    model_file.parent.mkdir()
    config = tiny_config(
        tmp_path / "run", dataset=dataset, warm_up=str(model_file), epochs=1
    )
    converted = convert_recbole_checkpoint(
        str(pth), schema, str(model_file), base=config.model
    )
    assert converted.model == {
        "depth": 2,
        "embedding_size": 4,
        "student_type": "outer",
        "student": "dagfm",
        "teacher": "crossnet",
        "t_depth": 2,
    }
    result = run_phase(config, Phase.DISTILLATION)
    assert 0.0 < result.test.auc <= 1.0
    distilled = read_model_file(str(tmp_path / "run/distillation/model.pt"))["model"]
    torch.testing.assert_close(
        distilled["teacher.weight"], converted.state_dict["teacher.weight"]
    )


def test_run_recbole_runs_two_phases(ml100k_atomic: Path, tmp_path: Path) -> None:
    common = {
        "checkpoint_dir": str(tmp_path / "saved"),
        "teacher": "CrossNet",
        "type": "outer",
        "embedding_size": 4,
        "depth": 1,
        "t_depth": 1,
        "train_batch_size": 2048,
        "epochs": 1,
        "max_steps_per_epoch": 4,
        "gpu_id": "0",  # a RecBole key without meaning here: ignored
        "log_every_steps": 0,
    }
    teacher = run_recbole(
        model="KD_DAGFM",
        dataset=str(ml100k_atomic),
        config_dict={**common, "phase": "teacher_training"},
    )
    run_dir = tmp_path / "saved" / "KD_DAGFM-ml-100k"
    assert (run_dir / "teacher_training" / "model.pt").exists()
    assert teacher["valid_score_bigger"] is True
    assert teacher["best_valid_score"] == teacher["best_valid_result"]["auc"]
    assert 0.5 < teacher["test_result"]["auc"] < 1.0

    student = run_recbole(
        model="KD_DAGFM",
        dataset=str(ml100k_atomic),
        config_dict={
            **common,
            "phase": "distillation",
            "warm_up": str(run_dir / "teacher_training"),
            "alpha": 0.1,
            "beta": 921.6,
        },
    )
    assert student["phase_result"].model_name == "DAGFM-outer"
    assert student["test_result"]["logloss"] > 0.0


def test_run_recbole_rejects_what_it_cannot_run(
    ml100k_atomic: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as error:
        run_recbole(model="DeepFM", dataset=str(ml100k_atomic))
    assert "model 'DeepFM' is not supported" in str(error.value)
    with pytest.raises(ConfigError) as error:
        run_recbole(dataset="no-such-data", config_dict={"data_path": str(tmp_path)})
    assert "dataset 'no-such-data' not found" in str(error.value)
    with pytest.raises(CheckpointError) as error:
        run_recbole(
            dataset=str(ml100k_atomic),
            config_dict={"phase": "distillation", "warm_up": "saved/KD_DAGFM.pth"},
        )
    assert "is a RecBole checkpoint. Convert it first" in str(error.value)
