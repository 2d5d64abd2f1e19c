"""Grafting (SPEC 2.4): the first-order methods alone, and the per-block norm transfer.

Before ``start_preconditioning_step`` the update direction is the grafting direction,
so with ``beta1 = 0`` (no momentum) Shampoo *is* the corresponding ``torch.optim``
optimizer; the end-to-end tests below hold it to that, step for step, on a small model
with matrix, vector, 4-d conv and 0-d parameters. The unit tests check
``graft_direction_`` against explicit float64 formulas and ``graft`` against a float64
per-block reference.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from scalable_shampoo import Shampoo
from scalable_shampoo.grafting import block_norms, graft, graft_direction_, needs_state

STEPS = 20
NEVER = 10**6  # a start_preconditioning_step no test reaches


# ------------------------------------------------------------------ end to end model
class SmallNet(nn.Module):
    """Parameters of several orders: conv weight (3, 2, 3, 3), conv bias (3,), linear
    weight (4, 12) and bias (4,), a 0-d scalar gain and a (5, 1, 2) tensor with a size-1
    dimension (squeezed by the blocking)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3)
        self.fc = nn.Linear(12, 4)
        self.gain = nn.Parameter(torch.tensor(0.7))
        self.mix = nn.Parameter(torch.randn(5, 1, 2) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))  # (B, 3, 2, 2)
        h = self.fc(h.flatten(1))  # (B, 4)
        extra = torch.einsum("bi,kj->bk", h[:, :2], self.mix.squeeze(1))[:, :4]
        return self.gain * h + 0.1 * extra


def _train_pair(dtype, make_shampoo, make_reference, steps: int = STEPS, seed: int = 0):
    """Trains two identical copies, one per optimizer, on the same fresh random batches.
    Returns the two models."""
    torch.manual_seed(seed)
    model = SmallNet().to(dtype)
    twin = copy.deepcopy(model)
    shampoo, reference = make_shampoo(model.parameters()), make_reference(twin.parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        x = torch.randn(8, 2, 4, 4, generator=gen, dtype=dtype)
        target = torch.randn(8, 4, generator=gen, dtype=dtype)
        for net, opt in ((model, shampoo), (twin, reference)):
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), target)
            loss.backward()
            opt.step()
    return model, twin


# Tolerances: one float rounding per step may differ (see CASES), compounded over the
# training run. Measured worst case over 20 steps is about a sixth (float32) and a
# twentieth (float64) of these; any algorithmic difference (a missing bias correction,
# eps inside the sqrt, decay applied twice) is orders of magnitude larger.
TOL = {torch.float32: dict(rtol=2e-6, atol=2e-7), torch.float64: dict(rtol=1e-14, atol=1e-15)}


def _assert_same_params(model, twin, dtype, bitwise: bool) -> None:
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert p.dtype == q.dtype == dtype, name
        if bitwise:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, **TOL[dtype], msg=lambda m: f"{name}: {m}")


def _assert_all_moved(model, dtype, seed: int = 0) -> None:
    torch.manual_seed(seed)
    initial = SmallNet().to(dtype)
    for (name, p), q in zip(model.named_parameters(), initial.parameters()):
        assert not torch.equal(p, q), f"{name} never moved"


LRS = {"sgd": 0.05, "adagrad": 0.05, "rmsprop": 0.01, "adam": 0.01}

# (grafting, Shampoo kwargs, torch.optim factory, bitwise).
# "sgd" is bitwise equal to torch.optim.SGD: both compute p + (-lr) * g in one pass
# (SGD: param.add_(grad, alpha=-lr); Shampoo: _foreach_add_(p, g, alpha=-lr)), and the
# coupled weight decay g + wd * p is the same operation in both. The adaptive methods are
# NOT bitwise equal: torch.optim uses param.addcdiv_(g, denom, value=-lr), which rounds
# (-lr * g) / denom, while Shampoo rounds -lr * (g / denom); the last-bit differences then
# compound through training, hence assert_close with a tight tolerance.
CASES = [
    pytest.param("sgd", dict(), lambda ps: torch.optim.SGD(ps, lr=LRS["sgd"]), True,
                 id="sgd"),
    pytest.param("adagrad", dict(grafting_epsilon=1e-6),
                 lambda ps: torch.optim.Adagrad(ps, lr=LRS["adagrad"], eps=1e-6), False,
                 id="adagrad"),
    pytest.param("rmsprop", dict(grafting_beta2=0.95, grafting_epsilon=1e-7),
                 lambda ps: torch.optim.RMSprop(ps, lr=LRS["rmsprop"], alpha=0.95, eps=1e-7),
                 False, id="rmsprop"),
    pytest.param("adam", dict(grafting_beta2=0.99, grafting_epsilon=1e-7),
                 lambda ps: torch.optim.Adam(ps, lr=LRS["adam"], betas=(0.0, 0.99), eps=1e-7),
                 False, id="adam"),
    pytest.param("adam", dict(grafting_beta2=0.995, grafting_epsilon=1e-8, weight_decay=0.05),
                 lambda ps: torch.optim.AdamW(ps, lr=LRS["adam"], betas=(0.0, 0.995),
                                              eps=1e-8, weight_decay=0.05),
                 False, id="adam-decoupled-wd=AdamW"),
    pytest.param("sgd", dict(weight_decay=0.1, decoupled_weight_decay=False),
                 lambda ps: torch.optim.SGD(ps, lr=LRS["sgd"], weight_decay=0.1), True,
                 id="sgd-coupled-wd"),
    pytest.param("rmsprop", dict(grafting_beta2=0.9, grafting_epsilon=1e-8, weight_decay=0.02,
                                 decoupled_weight_decay=False),
                 lambda ps: torch.optim.RMSprop(ps, lr=LRS["rmsprop"], alpha=0.9, eps=1e-8,
                                                weight_decay=0.02),
                 False, id="rmsprop-coupled-wd"),
]


def _check_grafting_alone(grafting, extra, make_reference, bitwise, dtype, foreach,
                          block_size):
    def make_shampoo(params):
        return Shampoo(params, lr=LRS[grafting], betas=(0.0, 0.999), grafting=grafting,
                       start_preconditioning_step=NEVER, block_size=block_size,
                       foreach=foreach, **extra)

    model, twin = _train_pair(dtype, make_shampoo, make_reference)
    _assert_same_params(model, twin, dtype, bitwise)
    _assert_all_moved(model, dtype)  # the run actually trained every parameter


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "forloop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("grafting, extra, make_reference, bitwise", CASES)
def test_grafting_alone_equals_torch_optim(grafting, extra, make_reference, bitwise, dtype,
                                           foreach):
    """With preconditioning never started and beta1 = 0, Shampoo is the grafting method
    (the Kronecker statistics are still accumulated every step; they must not leak into
    the direction)."""
    _check_grafting_alone(grafting, extra, make_reference, bitwise, dtype, foreach, 1024)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "forloop"])
@pytest.mark.parametrize("grafting, extra, make_reference, bitwise",
                         [c for c in CASES if c.id in ("sgd-coupled-wd",
                                                       "adam-decoupled-wd=AdamW")])
def test_grafting_alone_equals_torch_optim_with_small_blocks(grafting, extra, make_reference,
                                                             bitwise, foreach):
    """``block_size=3`` cuts every parameter into many blocks (several stacks, blocks
    of a parameter in different stacks): an elementwise method must not notice."""
    _check_grafting_alone(grafting, extra, make_reference, bitwise, torch.float32, foreach, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_grafting_none_before_start_is_sgd(dtype):
    """SPEC 2.4: with grafting "none" the direction before the start is g itself."""
    make = lambda ps: Shampoo(ps, lr=0.05, betas=(0.0, 0.999), grafting="none",  # noqa: E731
                              start_preconditioning_step=NEVER)
    model, twin = _train_pair(dtype, make, lambda ps: torch.optim.SGD(ps, lr=0.05), steps=10)
    _assert_same_params(model, twin, dtype, bitwise=True)


@pytest.mark.parametrize("grafting", ["adagrad", "rmsprop", "adam"])
def test_grafting_with_lr_zero_keeps_params_but_advances_state(grafting):
    """lr = 0 moves nothing; the accumulator still sees the gradients, so after lr is
    raised the trajectory equals a torch.optim run that also saw them with lr = 0."""
    torch.manual_seed(3)
    params = [nn.Parameter(torch.randn(4, 3, dtype=torch.float64))]
    twin = [nn.Parameter(params[0].detach().clone())]
    kwargs = dict(grafting_beta2=0.9, grafting_epsilon=1e-8)
    opt = Shampoo(params, lr=0.0, betas=(0.0, 0.999), grafting=grafting,
                  start_preconditioning_step=NEVER, **kwargs)
    reference = {"adagrad": lambda: torch.optim.Adagrad(twin, lr=0.0, eps=1e-8),
                 "rmsprop": lambda: torch.optim.RMSprop(twin, lr=0.0, alpha=0.9, eps=1e-8),
                 "adam": lambda: torch.optim.Adam(twin, lr=0.0, betas=(0.0, 0.9), eps=1e-8),
                 }[grafting]()
    start = params[0].detach().clone()
    gen = torch.Generator().manual_seed(4)
    for step in range(6):
        if step == 3:
            for o in (opt, reference):
                o.param_groups[0]["lr"] = 0.1
        g = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        params[0].grad, twin[0].grad = g.clone(), g.clone()
        opt.step()
        reference.step()
        if step < 3:
            assert torch.equal(params[0].detach(), start)
    torch.testing.assert_close(params[0], twin[0], rtol=1e-13, atol=1e-14)


# --------------------------------------------------------------------- graft_direction_
def _reference_directions(method, grads, beta2, eps):
    """Explicit float64 formulas of SPEC 2.4, one step at a time."""
    v = torch.zeros_like(grads[0], dtype=torch.float64)
    out = []
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if method in ("none", "sgd"):
            out.append(g)
            continue
        if method == "adagrad":
            v = v + g * g
            out.append(g / (torch.sqrt(v) + eps))
        elif method == "rmsprop":
            v = beta2 * v + (1 - beta2) * g * g
            out.append(g / (torch.sqrt(v) + eps))
        elif method == "adam":
            v = beta2 * v + (1 - beta2) * g * g
            out.append(g / (torch.sqrt(v / (1 - beta2**t)) + eps))
    return out


METHODS = ["none", "sgd", "adagrad", "rmsprop", "adam"]
BLOCK_SHAPES = [(1,), (3,), (5, 4), (2, 3, 4), (3, 1, 2, 2), (7, 8, 3)]
DIRECTION_TOL = {torch.float32: dict(rtol=2e-6, atol=1e-7),
                 torch.float64: dict(rtol=1e-14, atol=1e-15)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_graft_direction_matches_formula(method, shape, dtype):
    beta2, eps = 0.9, 1e-3  # a large eps so that it visibly matters
    gen = torch.Generator().manual_seed(100 * METHODS.index(method) + sum(shape))
    # Magnitudes vary over several orders, and one step has an exactly zero gradient.
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0 ** (t % 4 - 2)
             for t in range(7)]
    grads[4] = torch.zeros(shape, dtype=torch.float64)
    grads = [g.to(dtype) for g in grads]
    state = torch.zeros(shape, dtype=dtype) if needs_state(method) else None
    expected = _reference_directions(method, grads, beta2, eps)
    for t, (g, want) in enumerate(zip(grads, expected), start=1):
        g_before = g.clone()
        got = graft_direction_(method, g, state, t, beta2, eps)
        assert got.dtype == dtype and got.shape == g.shape
        assert torch.equal(g, g_before), "the gradient must not be modified"
        torch.testing.assert_close(got.double(), want, **DIRECTION_TOL[dtype])
        if method in ("none", "sgd"):
            assert got is g or torch.equal(got, g)


@pytest.mark.parametrize("method, beta2", [("adagrad", 0.5), ("rmsprop", 0.9),
                                           ("rmsprop", 0.5), ("adam", 0.999)])
def test_graft_direction_updates_state_in_place(method, beta2):
    gen = torch.Generator().manual_seed(7)
    g1 = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    g2 = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    state = torch.zeros(2, 5, 3, dtype=torch.float64)
    storage = state.data_ptr()
    graft_direction_(method, g1, state, 1, beta2, 1e-8)
    graft_direction_(method, g2, state, 2, beta2, 1e-8)
    assert state.data_ptr() == storage
    if method == "adagrad":  # beta2 is ignored by adagrad
        expected = g1**2 + g2**2
    else:
        expected = beta2 * (1 - beta2) * g1**2 + (1 - beta2) * g2**2
    torch.testing.assert_close(state, expected, rtol=1e-15, atol=0)


def test_graft_direction_adam_bias_correction_first_step_is_sign_like():
    """At step 1, Adam's v_hat = g^2, so A = g / (|g| + eps): about sign(g)."""
    g = torch.tensor([[3.0, -0.5], [1e-3, -2e4]], dtype=torch.float64)
    state = torch.zeros_like(g)
    got = graft_direction_("adam", g, state, 1, 0.999, 1e-12)
    torch.testing.assert_close(got, torch.sign(g), rtol=1e-8, atol=0)


def test_needs_state():
    assert [needs_state(m) for m in METHODS] == [False, False, True, True, True]


def test_graft_direction_unknown_method_raises():
    g = torch.ones(2, 2)
    with pytest.raises(ValueError, match="unknown grafting method"):
        graft_direction_("lamb", g, torch.zeros(2, 2), 1, 0.9, 1e-8)


# -------------------------------------------------------------------------------- graft
def _reference_graft(direction, graft_dir):
    """Per block, in float64: ``D * ||A|| / ||D||`` (0 where ``||D|| = 0``)."""
    out = []
    for d, a in zip(direction.double(), graft_dir.double()):
        d_norm = math.sqrt(float((d * d).sum()))
        a_norm = math.sqrt(float((a * a).sum()))
        out.append(torch.zeros_like(d) if d_norm == 0 else d * (a_norm / d_norm))
    return torch.stack(out), [math.sqrt(float((a * a).sum())) for a in graft_dir.double()]


STACK_SHAPES = [(1, 4, 4), (6, 3, 5), (4, 1, 7), (3, 8, 2), (5, 10), (2, 3, 2, 4), (9,)]
GRAFT_TOL = {torch.float32: dict(rtol=3e-6, atol=1e-30),
             torch.float64: dict(rtol=1e-14, atol=1e-300)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", STACK_SHAPES, ids=str)
def test_graft_matches_per_block_reference(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    n = shape[0]
    # Per-block scales from 1e-6 to 1e6 for both, so no block's norm is like another's.
    d_scale = 10.0 ** torch.linspace(-6, 6, n, dtype=torch.float64)
    a_scale = 10.0 ** torch.linspace(6, -6, n, dtype=torch.float64)
    view = (n, *([1] * (len(shape) - 1)))
    direction = (torch.randn(shape, generator=gen, dtype=torch.float64)
                 * d_scale.view(view)).to(dtype)
    graft_dir = (torch.randn(shape, generator=gen, dtype=torch.float64)
                 * a_scale.view(view)).to(dtype)
    got = graft(direction, graft_dir)
    assert got.dtype == dtype and got.shape == direction.shape
    expected, a_norms = _reference_graft(direction, graft_dir)
    torch.testing.assert_close(got.double(), expected, **GRAFT_TOL[dtype])
    # The norm is the grafting direction's, per block, and the direction is kept:
    # got = c * direction with c > 0 (cosine similarity 1).
    got_norms = [math.sqrt(float((b.double() ** 2).sum())) for b in got]
    for i, (g_norm, a_norm) in enumerate(zip(got_norms, a_norms)):
        assert g_norm == pytest.approx(a_norm, rel=GRAFT_TOL[dtype]["rtol"]), i
        cosine = torch.nn.functional.cosine_similarity(
            got[i].double().flatten(), direction[i].double().flatten(), dim=0)
        assert float(cosine) == pytest.approx(1.0, abs=1e-6 if dtype == torch.float32
                                              else 1e-13)
    torch.testing.assert_close(block_norms(got).double(), torch.tensor(a_norms, dtype=torch.float64),
                               rtol=GRAFT_TOL[dtype]["rtol"], atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_graft_zero_direction_block_gives_zero(dtype):
    gen = torch.Generator().manual_seed(11)
    direction = torch.randn(4, 3, 5, generator=gen, dtype=dtype)
    graft_dir = torch.randn(4, 3, 5, generator=gen, dtype=dtype)
    direction[1] = 0.0
    direction[3] = -0.0
    graft_dir[2] = 0.0  # a zero graft direction makes that block zero too
    got = graft(direction, graft_dir)
    assert torch.isfinite(got).all()
    assert torch.equal(got[1], torch.zeros(3, 5, dtype=dtype))
    assert torch.equal(got[3].abs(), torch.zeros(3, 5, dtype=dtype))
    assert torch.equal(got[2].abs(), torch.zeros(3, 5, dtype=dtype))
    expected, _ = _reference_graft(direction, graft_dir)
    torch.testing.assert_close(got.double(), expected, **GRAFT_TOL[dtype])
    # Everything zero: still no NaN.
    zeros = torch.zeros(3, 2, 2, dtype=dtype)
    assert torch.equal(graft(zeros, zeros), zeros)
    assert torch.equal(graft(zeros, torch.ones_like(zeros)), zeros)


def test_a_blocks_norm_does_not_depend_on_the_other_blocks_of_its_stack():
    """A zero block (its norm redone in float64) leaves the other blocks' float32 norms
    as they are alone: with data parallelism a stack holds only some of the blocks."""
    gen = torch.Generator().manual_seed(12)
    blocks = torch.randn(5, 7, 3, generator=gen)
    blocks[2] = 0.0
    blocks[4] *= 1e-25  # a norm that underflows in float32
    norms = block_norms(blocks)
    alone = torch.cat([block_norms(blocks[i:i + 1]) for i in range(5)])
    assert torch.equal(norms, alone)
    assert norms[2] == 0 and norms[4] > 0
    assert torch.equal(norms[[0, 1, 3]], torch.linalg.vector_norm(
        blocks[[0, 1, 3]].reshape(3, -1), dim=1).double())


def test_graft_single_element_blocks_take_graft_magnitude_and_own_sign():
    direction = torch.tensor([2.0, -3.0, 0.0, 1e-20], dtype=torch.float64)
    graft_dir = torch.tensor([-5.0, 0.25, 7.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(graft(direction, graft_dir),
                               torch.tensor([5.0, -0.25, 0.0, 3.0], dtype=torch.float64),
                               rtol=1e-15, atol=0)


@pytest.mark.parametrize("scale", [1e20, 1e-25], ids=["overflow", "underflow"])
def test_graft_float32_extreme_direction_norms(scale):
    gen = torch.Generator().manual_seed(5)
    direction = (torch.randn(3, 4, 4, generator=gen, dtype=torch.float64) * scale)
    graft_dir = torch.randn(3, 4, 4, generator=gen, dtype=torch.float64)
    got = graft(direction.float(), graft_dir.float())
    expected, _ = _reference_graft(direction.float(), graft_dir.float())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-30)
