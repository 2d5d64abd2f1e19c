"""One contract that every configuration of the optimizer passes (in the spirit of
optax's shared transformation tests): bit-for-bit resume across root steps, batched
equals one-block-at-a-time, NaN gradients leave their parameter and state untouched,
and the diagnostics stay consistent."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from scalable_shampoo import Shampoo, ShampooConfig
from scalable_shampoo.async_roots import resolve_root_delay
from tests.test_eigenvalue_corrected import EC_CONFIGS
from tests.test_optimizer import CONFIGS

ALL_CONFIGS = {**CONFIGS, **EC_CONFIGS}

SHAPES = [(6, 5), (4, 3, 2), (7,), (), (20, 3)]
COMMON = dict(block_size=4, max_preconditioned_dim=10, epsilon=1e-4)
STEPS = 12


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]


def _feed(params, opt, steps, seed, nan_at=None):
    gen = torch.Generator().manual_seed(seed)
    for t in range(1, steps + 1):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if nan_at == (t, i):
                p.grad.view(-1)[0] = float("nan")
        opt.step()


@pytest.fixture(params=sorted(ALL_CONFIGS))
def options(request):
    return {**COMMON, **ALL_CONFIGS[request.param]}


def test_resume_is_bitwise(options):
    straight = _params()
    opt = Shampoo(straight, **options)
    _feed(straight, opt, STEPS, seed=1)

    first = _params()
    opt_first = Shampoo(first, **options)
    gen_state = torch.Generator().manual_seed(1)
    half = STEPS // 2
    for _ in range(half):
        for p in first:
            p.grad = torch.randn(p.shape, generator=gen_state)
        opt_first.step()
    buffer = io.BytesIO()
    torch.save(opt_first.state_dict(), buffer)
    buffer.seek(0)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt_resumed = Shampoo(resumed, **options)
    opt_resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(STEPS - half):
        for p in resumed:
            p.grad = torch.randn(p.shape, generator=gen_state)
        opt_resumed.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_batched_equals_one_block_at_a_time(options):
    batched, looped = _params(torch.float64), _params(torch.float64)
    options = {**options, "factor_dtype": torch.float64}
    opt_b, opt_l = Shampoo(batched, **options), Shampoo(looped, foreach=False, **options)
    _feed(batched, opt_b, STEPS, seed=2)
    _feed(looped, opt_l, STEPS, seed=2)
    for a, b in zip(batched, looped):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_nan_gradient_touches_nothing_of_its_parameter(options):
    params = _params()
    opt = Shampoo(params, **options)
    # Step 6 installs no eigenbasis in any configuration: an install rotates every
    # row's moments into the new basis (a change of coordinates, not an update).
    _feed(params, opt, 5, seed=3)
    before_param = params[1].detach().clone()
    before_state = opt.state_dict()["state"][1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _feed(params, opt, 1, seed=4, nan_at=(1, 1))
    assert torch.equal(params[1], before_param)
    after_state = opt.state_dict()["state"][1]
    for old, new in zip(before_state["blocks"], after_state["blocks"]):
        for key in ("factors", "graft", "momentum", "second_moment"):
            old_t, new_t = old.get(key), new.get(key)
            if isinstance(old_t, list):
                assert all(torch.equal(a, b) for a, b in zip(old_t, new_t))
            elif old_t is not None:
                assert torch.equal(old_t, new_t)
    assert opt.metrics()["nonfinite_grad_skips"] == 1
    assert all(torch.isfinite(p).all() for p in params)


def test_metrics_are_consistent(options):
    params = _params()
    opt = Shampoo(params, **options)
    _feed(params, opt, STEPS, seed=5)
    metrics = opt.metrics()
    assert metrics["step"] == STEPS
    assert metrics["root_failures"] == 0
    assert metrics["root_computations"] > 0
    # Roots in use come from statistics at most one period plus the delay old (unless a
    # basis refresh was skipped, which keeps the older basis).
    assert metrics["root_age_max"] >= 0
    if not metrics["basis_refreshes_skipped"]:
        runtime = ("foreach", "async_roots", "root_workers", "distributed", "process_group")
        config = ShampooConfig(**{k: v for k, v in options.items() if k not in runtime})
        delay = resolve_root_delay(config, bool(options.get("async_roots")))
        assert metrics["root_age_max"] < config.precondition_frequency + delay
    assert metrics["num_blocks"] == sum(len(e["blocks"]) for e in opt.state_dict()["state"].values())
    assert metrics["state_bytes"] > 0
