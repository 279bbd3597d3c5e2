"""Golden forward values of the deep teachers (DCNv2, xDeepFM, AutoInt+) and
the DAGFM+ student.

Each vectorised module is checked against a loop-based transcription of its
formula, one multiply-add at a time, and the registry-built models against
seeded golden logits.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from kd_dagfm.config import ModelConfig, build_config
from kd_dagfm.errors import ConfigError
from kd_dagfm.model import KDDAGFM, STUDENTS, TEACHERS
from kd_dagfm.modules import MLP, AutoIntPlus, DCNv2, DeepDAGFM, XDeepFM
from kd_dagfm.modules.autoint import MultiHeadSelfAttention
from kd_dagfm.phases import Phase
from kd_dagfm.schema import make_schema

B, F, D = 4, 3, 2


def linear_by_loops(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = layer.weight.detach()
    out = torch.zeros(x.shape[0], weight.shape[0])
    for b in range(x.shape[0]):
        for o in range(weight.shape[0]):
            total = 0.0 if layer.bias is None else float(layer.bias[o])
            for i in range(weight.shape[1]):
                total += float(weight[o, i]) * float(x[b, i])
            out[b, o] = total
    return out


def mlp_by_loops(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """The MLP's layers in order; dropout is the identity in eval mode."""
    for layer in mlp.layers:
        if isinstance(layer, nn.Linear):
            x = linear_by_loops(layer, x)
        elif isinstance(layer, nn.ReLU):
            x = torch.clamp(x, min=0.0)
    return x


def cross_by_loops(weight: torch.Tensor, bias: torch.Tensor, x0: torch.Tensor):
    """x_{l+1}[i] = x0[i] * (sum_j W_l[i, j] x_l[j] + b_l[i]) + x_l[i]."""
    x = x0.clone()
    for layer in range(weight.shape[0]):
        new = torch.zeros_like(x)
        for b in range(x.shape[0]):
            for i in range(x.shape[1]):
                total = float(bias[layer, i].detach())
                for j in range(x.shape[1]):
                    total += float(weight[layer, i, j]) * float(x[b, j])
                new[b, i] = float(x0[b, i]) * total + float(x[b, i])
        x = new
    return x


def cin_by_loops(cin: nn.Module, e: torch.Tensor) -> torch.Tensor:
    x = e
    pooled = []
    for conv in cin.layers:
        w, bias = conv.weight.detach()[:, :, 0], conv.bias.detach()
        h = x.shape[1]
        out = torch.zeros(e.shape[0], w.shape[0], e.shape[2])
        for o in range(w.shape[0]):
            for i in range(h):
                for f in range(e.shape[1]):
                    out[:, o] += w[o, i * e.shape[1] + f] * x[:, i] * e[:, f]
            out[:, o] += bias[o]
        x = out
        pooled.append(x.sum(-1))
    return torch.cat(pooled, -1) @ cin.head.weight.detach()[0]


@pytest.mark.parametrize("structure", ["parallel", "stacked", "stacked_parallel"])
def test_dcnv2_matches_loops(structure: str) -> None:
    torch.manual_seed(10)
    model = DCNv2(F, D, cross_layers=2, mlp_sizes=(5, 3), structure=structure)
    with torch.no_grad():
        model.cross.bias.normal_()
    e = torch.randn(B, F, D)
    x0 = e.reshape(B, -1)
    crossed = cross_by_loops(model.cross.weight.detach(), model.cross.bias, x0)
    parts = []
    if structure == "parallel":
        parts.append(crossed)
    else:
        assert model.stacked_mlp is not None
        parts.append(mlp_by_loops(model.stacked_mlp, crossed))
    if structure != "stacked":
        assert model.parallel_mlp is not None
        parts.append(mlp_by_loops(model.parallel_mlp, x0))
    expected = linear_by_loops(model.head, torch.cat(parts, -1))[:, 0]
    torch.testing.assert_close(model(e), expected, rtol=1e-5, atol=1e-5)


def test_xdeepfm_matches_loops() -> None:
    torch.manual_seed(11)
    model = XDeepFM(F, D, cin_sizes=(4, 2), mlp_sizes=(5,))
    with torch.no_grad():
        model.linear.bias.fill_(0.3)
    e = torch.randn(B, F, D)
    flat = e.reshape(B, -1)
    expected = (
        cin_by_loops(model.cin, e)
        + mlp_by_loops(model.dnn, flat)[:, 0]
        + linear_by_loops(model.linear, flat)[:, 0]
    )
    torch.testing.assert_close(model(e), expected, rtol=1e-5, atol=1e-5)


def attention_by_loops(layer: MultiHeadSelfAttention, x: torch.Tensor):
    q_w, k_w, v_w = (m.weight.detach() for m in (layer.query, layer.key, layer.value))
    batch, fields, _ = x.shape
    width = q_w.shape[0]
    out = torch.zeros(batch, fields, width)
    for b in range(batch):
        q, k, v = x[b] @ q_w.t(), x[b] @ k_w.t(), x[b] @ v_w.t()  # (F, A)
        for head in range(layer.num_heads):
            cols = slice(head * layer.head_dim, (head + 1) * layer.head_dim)
            for m in range(fields):
                scores = [float(q[m, cols] @ k[j, cols]) for j in range(fields)]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for j in range(fields):
                    out[b, m, cols] += weights[j] / total * v[j, cols]
        residual = x[b] if layer.residual is None else x[b] @ layer.residual.weight.t()
        out[b] = torch.relu(out[b] + residual.detach())
    return out


def test_self_attention_by_hand() -> None:
    """One head, identity projections, F = 2, D = 2, every term written out."""
    layer = MultiHeadSelfAttention(input_dim=2, attention_dim=2, num_heads=1)
    with torch.no_grad():
        for projection in (layer.query, layer.key, layer.value):
            projection.weight.copy_(torch.eye(2))
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    # Field 0: scores (<e0, e0>, <e0, e1>) = (1, 0); weights e / (e + 1) and
    # 1 / (e + 1); attended = (0.7311, 0.2689); plus the residual (1, 0).
    a = math.e / (math.e + 1)
    expected = torch.tensor([[[1 + a, 1 - a], [1 - a, 1 + a]]])
    torch.testing.assert_close(layer(x), expected)


def test_autoint_matches_loops() -> None:
    torch.manual_seed(12)
    model = AutoIntPlus(
        F, D, attention_layers=2, attention_dim=4, num_heads=2, mlp_sizes=(5,)
    )
    e = torch.randn(B, F, D)
    x = e
    for layer in model.attention:
        x = attention_by_loops(layer, x)
    expected = (
        linear_by_loops(model.head, x.reshape(B, -1))[:, 0]
        + mlp_by_loops(model.dnn, e.reshape(B, -1))[:, 0]
    )
    torch.testing.assert_close(model(e), expected, rtol=1e-5, atol=1e-5)


def test_autoint_first_layer_projects_residual() -> None:
    """A residual W_res exists only where the input width differs from A."""
    model = AutoIntPlus(
        F, D, attention_layers=2, attention_dim=4, num_heads=2, mlp_sizes=(5,)
    )
    assert model.attention[0].residual is not None
    assert model.attention[1].residual is None


def states_by_loops(model: DeepDAGFM, e: torch.Tensor) -> list[torch.Tensor]:
    c = model.field_mixing.detach()
    h0 = torch.zeros_like(e)
    for s in range(F):
        for t in range(F):
            h0[:, s] += c[s, t] * e[:, t]
    states, h = [h0], h0
    for layer in range(model.depth):
        new = torch.zeros_like(h)
        for s in range(F):
            total = torch.zeros(e.shape[0], D)
            for f in range(s + 1):  # edges f -> s for f <= s
                p = model.p[layer, f, s].detach()
                if model.interaction == "inner":
                    total += p * h[:, f]
                else:
                    q = model.q[layer, f, s].detach()
                    total += (h[:, f] * p).sum(-1, keepdim=True) * q
            new[:, s] = h0[:, s] * total
        h = new
        states.append(h)
    return states


@pytest.mark.parametrize("interaction", ["inner", "outer"])
def test_deep_dagfm_matches_loops(interaction: str) -> None:
    torch.manual_seed(13)
    model = DeepDAGFM(F, D, depth=2, interaction=interaction, mlp_sizes=(5, 4))
    with torch.no_grad():
        model.field_mixing.add_(0.1 * torch.randn(F, F))
    e = torch.randn(B, F, D)
    summed = torch.zeros(B, F, D)
    for state in states_by_loops(model, e):
        summed += state
    expected = mlp_by_loops(model.mlp, summed.reshape(B, -1))[:, 0]
    torch.testing.assert_close(model(e), expected, rtol=1e-5, atol=1e-5)


def test_deep_dagfm_has_no_linear_readout() -> None:
    model = DeepDAGFM(F, D, depth=2, interaction="outer", mlp_sizes=(5,))
    assert not any(name.startswith("readout") for name in model.state_dict())
    e = torch.randn(B, F, D)
    model(e).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_deep_dagfm_ignores_edges_against_the_order() -> None:
    torch.manual_seed(14)
    model = DeepDAGFM(F, D, depth=2, interaction="inner", mlp_sizes=(5,))
    e = torch.randn(B, F, D)
    before = model(e)
    with torch.no_grad():
        lower = torch.ones(F, F).tril(-1).bool()
        model.p[:, lower] += 100.0
    torch.testing.assert_close(model(e), before)


# Seeded golden logits of registry-built models (teacher, student), recorded
# from this implementation after the loop tests above passed.
GOLDEN_TEACHERS = {
    "dcnv2": [-0.4193, -0.2717, 0.3465],
    "xdeepfm": [0.2293, -0.1495, -0.0642],
    "autoint": [0.6215, 0.1218, 0.0842],
}
GOLDEN_PLUS_STUDENT = {
    "crossnet": [0.0356, -0.1673, -0.0194],
    "cin": [-0.0614, 0.0, 0.0449],
}


def _golden_model(teacher: str, student: str) -> tuple[KDDAGFM, KeyedJaggedTensor]:
    schema = make_schema("label", {"a": 7, "b": 5, "g": 4}, lists=["g"])
    torch.manual_seed(2022)
    model = KDDAGFM(
        schema,
        ModelConfig(
            teacher=teacher,
            student=student,
            student_type="outer",
            embedding_size=4,
            depth=2,
            t_depth=2,
            t_cin=(3, 3),
            t_mlp=(8, 8),
            student_mlp=(8, 8),
            t_attention_layers=2,
            t_attention_heads=2,
            t_attention_dim=6,
        ),
    )
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b", "g"],
        values=torch.tensor([0, 3, 6, 1, 2, 4, 0, 1, 2, 3]),
        lengths=torch.tensor([1, 1, 1, 1, 1, 1, 2, 0, 2]),
    )
    return model.eval(), features


@pytest.mark.parametrize("teacher", sorted(GOLDEN_TEACHERS))
def test_deep_teacher_golden_logits(teacher: str) -> None:
    model, features = _golden_model(teacher, "dagfm")
    output = model(features, None, Phase.TEACHER_TRAINING)
    torch.testing.assert_close(
        output.teacher_logits, torch.tensor(GOLDEN_TEACHERS[teacher]), rtol=0, atol=2e-4
    )


@pytest.mark.parametrize("teacher", sorted(GOLDEN_PLUS_STUDENT))
def test_dagfm_plus_golden_logits(teacher: str) -> None:
    model, features = _golden_model(teacher, "dagfm_plus")
    output = model(features, None, Phase.FINETUNING)
    torch.testing.assert_close(
        output.student_logits,
        torch.tensor(GOLDEN_PLUS_STUDENT[teacher]),
        rtol=0,
        atol=2e-4,
    )


def test_cached_teacher_logits_replace_the_teacher() -> None:
    model, features = _golden_model("autoint", "dagfm_plus")
    cached = torch.tensor([1.0, -2.0, 3.0])
    calls = []
    model.teacher.register_forward_hook(lambda *_: calls.append(1))
    output = model(features, None, Phase.DISTILLATION, teacher_logits=cached)
    assert output.teacher_logits is cached
    assert calls == []
    live = model(features, None, Phase.DISTILLATION)
    assert calls == [1]
    torch.testing.assert_close(output.student_logits, live.student_logits)


def test_registries_cover_config_choices() -> None:
    from kd_dagfm.config import STUDENTS as STUDENT_CHOICES
    from kd_dagfm.config import TEACHERS as TEACHER_CHOICES

    assert set(TEACHERS) == set(TEACHER_CHOICES)
    assert set(STUDENTS) == set(STUDENT_CHOICES)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"student": "deepfm"}, "invalid student 'deepfm': expected one of dagfm"),
        (
            {"t_attention_dim": 10, "t_attention_heads": 4},
            "invalid t_attention_dim 10: it must be divisible by t_attention_heads 4",
        ),
        ({"t_dcn_structure": "serial"}, "invalid t_dcn_structure 'serial'"),
        ({"t_mlp": []}, "invalid t_mlp []: expected a non-empty list"),
        ({"mlp_dropout": 1.0}, "invalid mlp_dropout 1.0: expected a probability"),
    ],
)
def test_plus_config_errors(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_config(overrides)
    assert message in str(error.value)
