"""Optimizers and schedules, single process: LAMB against hand-computed numbers and against its
per-tensor reference loop, weight-decay groups on our BERT, schedule values, config errors.
(LAMB under ZeRO on 2 ranks is tests/test_lamb_zero.py.)"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from bertscale import model as model_mod
from bertscale.config import ModelConfig, from_dict
from bertscale.errors import ConfigError
from bertscale.optim import (Lamb, OptimizerConfig, ScheduleConfig, build_optimizer,
                             build_scheduler, param_groups, warmup_steps)


class CustomNorm(nn.Module):
    """A LayerNorm that is not nn.LayerNorm (as apex's / old HF's BertLayerNorm)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class SmallNet(nn.Module):
    """HF BERT naming: "dense", "LayerNorm", a bare head "bias"; a frozen parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(6, 10)
        self.LayerNorm = CustomNorm(10)
        self.norm2 = nn.LayerNorm(10)
        self.decoder = nn.Linear(10, 4, bias=False)
        self.bias = nn.Parameter(torch.zeros(4))
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, x):
        h = torch.tanh(self.norm2(self.LayerNorm(self.dense(x))))
        return self.decoder(h) + self.bias


def _names(model: nn.Module, params: list) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# ----------------------------------------------------------------------------- param groups


def test_param_groups_small_module():
    model = SmallNet()
    groups = param_groups(model, 0.01)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert _names(model, groups[0]["params"]) == {"dense.weight", "decoder.weight"}
    assert _names(model, groups[1]["params"]) == {
        "dense.bias", "LayerNorm.weight", "LayerNorm.bias", "norm2.weight", "norm2.bias", "bias"}


def test_param_groups_bert_model():
    cfg = ModelConfig(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=24)
    model = model_mod.BertForPreTraining(cfg)
    groups = param_groups(model, 0.01)
    decay, no_decay = (_names(model, g["params"]) for g in groups)
    named = dict(model.named_parameters())
    # In BERT every bias and LayerNorm parameter is a vector and every other one a matrix.
    assert no_decay == {n for n, p in named.items() if p.dim() == 1}
    assert decay == {n for n, p in named.items() if p.dim() == 2}
    assert "cls.predictions.bias" in no_decay
    assert "bert.encoder.layer.1.output.LayerNorm.weight" in no_decay
    assert "bert.embeddings.word_embeddings.weight" in decay
    # The tied decoder weight is the embedding Parameter: listed once in all.
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len({id(p) for p in model.parameters()})


# ---------------------------------------------------------------------------------- LAMB


def test_lamb_one_step_by_hand():
    # Weight-decayed w = [3, 4] (||w|| = 5), g = [0.5, -1]; undecayed b = [0, 0], g = [1, -2].
    # lr 0.1, betas (0.9, 0.999), eps 1e-6, wd 0.01. At t = 1 the bias corrections give
    # m_hat = g and v_hat = g^2, so u = g / (|g| + eps) + wd * w:
    #   u_w = [0.5/0.500001 + 0.03, -1/1.000001 + 0.04] = [1.029998000004, -0.959999000001]
    #   ||u_w|| = 1.408010639169733, phi = 5 / 1.408010639169733 = 3.5511095306413094
    #   w' = w - 0.1 * phi * u_w = [2.6342364285644306, 4.3409061598309675]
    #   b: ||b|| = 0 -> phi = 1; b' = -0.1 * [1/1.000001, -2/2.000001] = [-0.0999999, 0.09999995]
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    b = nn.Parameter(torch.zeros(2))
    opt = Lamb([{"params": [w], "weight_decay": 0.01}, {"params": [b], "weight_decay": 0.0}],
               lr=0.1, betas=(0.9, 0.999), eps=1e-6)
    w.grad = torch.tensor([0.5, -1.0])
    b.grad = torch.tensor([1.0, -2.0])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([2.6342364285644306, 4.3409061598309675]),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(b.detach(), torch.tensor([-0.0999999, 0.09999995]), rtol=0, atol=1e-7)
    st = opt.state[w]
    assert sorted(st) == ["exp_avg", "exp_avg_sq", "step"] and float(st["step"]) == 1.0
    torch.testing.assert_close(st["exp_avg"], torch.tensor([0.05, -0.1]))        # (1 - b1) g
    torch.testing.assert_close(st["exp_avg_sq"], torch.tensor([0.00025, 0.001]))  # (1 - b2) g^2


def _scalar_lamb(w, grads, lr, b1, b2, eps, wd):
    """LAMB on a list of floats, the paper's formula with Python math only."""
    m = [0.0] * len(w)
    v = [0.0] * len(w)
    for t, g in enumerate(grads, start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        u = [(mi / (1 - b1 ** t)) / (math.sqrt(vi / (1 - b2 ** t)) + eps) + wd * wi
             for mi, vi, wi in zip(m, v, w)]
        wn, un = math.sqrt(sum(x * x for x in w)), math.sqrt(sum(x * x for x in u))
        phi = wn / un if wn > 0 and un > 0 else 1.0
        w = [wi - lr * phi * ui for wi, ui in zip(w, u)]
    return w


@pytest.mark.parametrize("implementation", ["foreach", "loop"])
def test_lamb_three_steps_against_scalar_formula(implementation):
    grads = [[0.5, -1.0, 0.25], [-0.3, 0.2, 0.9], [0.05, 0.4, -0.6]]
    w0 = [0.3, -1.2, 2.0]
    p = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = Lamb([p], lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
               implementation=implementation)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    expected = _scalar_lamb(w0, grads, 0.02, 0.8, 0.95, 1e-6, 0.1)
    torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_lamb_foreach_matches_loop(max_grad_norm):
    torch.manual_seed(0)
    a = SmallNet()
    with torch.no_grad():        # a zero weight tensor exercises phi = 1 (||w|| = 0)
        a.bias.zero_()
    b = copy.deepcopy(a)
    start = copy.deepcopy(a)
    opts = [Lamb(param_groups(m, 0.01), lr=0.01, max_grad_norm=max_grad_norm,
                 implementation=impl) for m, impl in ((a, "foreach"), (b, "loop"))]
    x = torch.randn(32, 6)
    for step in range(6):
        for model, opt in zip((a, b), opts):
            opt.zero_grad()
            ((model(x) - 1.0) ** 2).mean().backward()
            if step == 2:         # a parameter without gradient is skipped, its step count lags
                model.dense.bias.grad = None
            opt.step()
    assert float(opts[0].state[a.dense.bias]["step"]) == 5.0
    for (name, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), start.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7, msg=name)
        if pa.requires_grad:
            assert not torch.equal(pa, p0), name


def test_lamb_prenormalisation_is_global_grad_scaling():
    # max_grad_norm = c scales every gradient by c / max(||g_all||, c) before the LAMB math.
    torch.manual_seed(1)
    a = SmallNet()
    b = copy.deepcopy(a)
    opt_a = Lamb(param_groups(a, 0.01), lr=0.01, max_grad_norm=0.1)
    opt_b = Lamb(param_groups(b, 0.01), lr=0.01)
    x = torch.randn(16, 6)
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            ((model(x) - 1.0) ** 2).sum().backward()
        grads = [p.grad for p in b.parameters() if p.grad is not None]
        total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        assert total > 0.1          # so the scaling is active
        for g in grads:
            g.mul_(0.1 / total)
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_lamb_state_dict_resume_is_exact():
    torch.manual_seed(2)
    x = torch.randn(8, 6)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            ((model(x) - 1.0) ** 2).mean().backward()
            opt.step()

    straight = SmallNet()
    resumed = copy.deepcopy(straight)
    opt = Lamb(param_groups(straight, 0.01), lr=0.01)
    train(straight, opt, 5)
    opt2 = Lamb(param_groups(resumed, 0.01), lr=0.01)
    train(resumed, opt2, 2)
    saved = copy.deepcopy(opt2.state_dict())
    opt3 = Lamb(param_groups(resumed, 0.01), lr=0.01)
    opt3.load_state_dict(saved)
    train(resumed, opt3, 3)
    for pa, pb in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)


# ---------------------------------------------------------------------------------- AdamW


def test_build_optimizer_kinds():
    model = SmallNet()
    adam = build_optimizer(OptimizerConfig(name="adamw", lr=1e-4), model)
    assert isinstance(adam, torch.optim.AdamW)
    assert adam.defaults["foreach"] is True and adam.defaults["eps"] == 1e-6
    assert [g["weight_decay"] for g in adam.param_groups] == [0.01, 0.0]
    fused = build_optimizer(OptimizerConfig(implementation="fused"), model)
    assert fused.defaults["fused"] is True
    lamb = build_optimizer(OptimizerConfig(name="lamb", lr=2e-3, implementation="loop"), model)
    assert isinstance(lamb, Lamb) and lamb.defaults["implementation"] == "loop"
    assert lamb.defaults["lr"] == 2e-3 and lamb.defaults["betas"] == (0.9, 0.999)


def test_adamw_fused_and_foreach_match_loop():
    torch.manual_seed(3)
    base = SmallNet()
    x = torch.randn(16, 6)
    finals = {}
    for impl in ("loop", "foreach", "fused"):
        model = copy.deepcopy(base)
        opt = build_optimizer(OptimizerConfig(lr=1e-2, implementation=impl), model)
        for _ in range(4):
            opt.zero_grad()
            ((model(x) - 1.0) ** 2).mean().backward()
            opt.step()
        finals[impl] = [p.detach() for p in model.parameters()]
    for impl in ("foreach", "fused"):
        for a, b in zip(finals[impl], finals["loop"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------ schedules


def _lrs(cfg: ScheduleConfig, total: int, at: list[int], peak: float = 2.0) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    sched = build_scheduler(opt, cfg, total)
    out, step = [], 0
    for s in at:
        while step < s:
            opt.step()
            sched.step()
            step += 1
        out.append(sched.get_last_lr()[0])
    return out


def test_schedule_linear_warmup_then_linear_decay():
    # warmup 10 of 100 steps, peak 2.0: s/10 * 2 in warmup, then 2 * (1 - (s - 10) / 90).
    got = _lrs(ScheduleConfig(warmup=10, decay="linear"), 100, [0, 5, 10, 55, 100, 120])
    assert got == pytest.approx([0.0, 1.0, 2.0, 1.0, 0.0, 0.0])


def test_schedule_fraction_poly_and_floor():
    # warmup 0.1 of 200 = 20 steps; poly power 2 to min_lr_ratio 0.1:
    # s = 110 -> progress (110 - 20) / 180 = 0.5 -> 0.1 + 0.9 * 0.25 = 0.325 (x peak 2.0 = 0.65).
    cfg = ScheduleConfig(warmup=0.1, decay="poly", power=2.0, min_lr_ratio=0.1)
    assert warmup_steps(cfg, 200) == 20
    got = _lrs(cfg, 200, [0, 10, 20, 110, 200, 250])
    assert got == pytest.approx([0.0, 1.0, 2.0, 0.65, 0.2, 0.2])


def test_schedule_constant_and_no_warmup():
    assert _lrs(ScheduleConfig(warmup=4, decay="constant"), 10, [0, 2, 4, 10, 30]) == \
        pytest.approx([0.0, 1.0, 2.0, 2.0, 2.0])
    assert _lrs(ScheduleConfig(warmup=0, decay="linear"), 4, [0, 1, 4]) == \
        pytest.approx([2.0, 1.5, 0.0])


# -------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("kwargs, words", [
    ({"name": "sgd"}, ["optimizer.name", "'adamw'", "'lamb'"]),
    ({"name": "lamb", "implementation": "fused"}, ["optimizer.implementation", "'foreach'"]),
    ({"implementation": "apex"}, ["optimizer.implementation", "'loop'"]),
    ({"lr": -1.0}, ["optimizer.lr"]),
    ({"betas": (0.9, 1.0)}, ["optimizer.betas"]),
    ({"eps": 0.0}, ["optimizer.eps"]),
    ({"weight_decay": -0.1}, ["optimizer.weight_decay"]),
])
def test_optimizer_config_errors_name_the_field(kwargs, words):
    with pytest.raises(ConfigError) as e:
        OptimizerConfig(**kwargs).validate()
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("kwargs, words", [
    ({"warmup": 1.5}, ["schedule.warmup", "[0, 1)"]),
    ({"warmup": -3}, ["schedule.warmup"]),
    ({"decay": "cosine"}, ["schedule.decay", "'linear'", "'poly'", "'constant'"]),
    ({"power": 0.0}, ["schedule.power"]),
    ({"min_lr_ratio": 1.5}, ["schedule.min_lr_ratio"]),
])
def test_schedule_config_errors_name_the_field(kwargs, words):
    with pytest.raises(ConfigError) as e:
        ScheduleConfig(**kwargs).validate()
    for w in words:
        assert w in str(e.value)


def test_scheduler_refuses_warmup_longer_than_run():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match=r"schedule.warmup = 500 .* \(100 steps\)"):
        build_scheduler(opt, ScheduleConfig(warmup=500), 100)
    with pytest.raises(ConfigError, match="total_steps"):
        build_scheduler(opt, ScheduleConfig(warmup=0), 0)


def test_configs_from_recipe_dicts():
    # TOML gives ints for step counts and floats for fractions; both survive from_dict.
    assert from_dict(ScheduleConfig, {"warmup": 10000}, "schedule").warmup == 10000
    assert isinstance(from_dict(ScheduleConfig, {"warmup": 10000}, "schedule").warmup, int)
    assert from_dict(ScheduleConfig, {"warmup": 0.01}, "schedule").warmup == 0.01
    cfg = from_dict(OptimizerConfig, {"name": "lamb", "lr": 1, "betas": [0.9, 0.98]}, "optimizer")
    assert cfg.lr == 1.0 and cfg.betas == (0.9, 0.98)
    with pytest.raises(ConfigError, match="optimizer.name"):
        from_dict(OptimizerConfig, {"name": "adam"}, "optimizer")
