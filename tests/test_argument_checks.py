"""What users hand the optimizer beyond the hyperparameters' ranges: other optimizers'
argument names, tensor and oversized learning rates, sparse gradients. Each bad input
is refused with a message that names it and says what to use, before any state changes."""

from __future__ import annotations

import inspect

import pytest
import torch

from scalable_shampoo import Shampoo
from tests.state_checks import assert_same_state, optimizer_snapshot


def _params(seed: int = 0, dtype=torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype))
            for s in [(5, 3), (4,)]]


def _grads(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


# -------------------------------------------------------------- other optimizers' names
# (name, value, regex of the hint after "'name': ")
FOREIGN_KEYWORDS = [
    ("eps", 1e-8, r"use grafting_epsilon.*adam_epsilon.*epsilon is not AdamW's eps"),
    ("momentum", 0.9, r"use betas=\(beta1, beta2\)"),
    ("dampening", 0.1, r"use betas"),
    ("max_preconditioner_dim", 512, r"use block_size.*max_preconditioned_dim is another"),
    ("use_nesterov", True, r"use nesterov$"),
    ("use_decoupled_weight_decay", True, r"use decoupled_weight_decay$"),
    ("grafting_config", None, r"use grafting \("),
    ("amsgrad", False, r"Shampoo has no such option"),
    ("grafting_eps", 1e-8, r"did you mean 'grafting_epsilon'"),
    ("blocksize", 64, r"did you mean 'block_size'"),
]


@pytest.mark.parametrize("name, value, hint", FOREIGN_KEYWORDS,
                         ids=[row[0] for row in FOREIGN_KEYWORDS])
def test_other_optimizers_keywords_point_to_ours(name, value, hint):
    with pytest.raises(TypeError, match=rf"^Shampoo\(\) got an unexpected keyword argument "
                       rf"'{name}': {hint}"):
        Shampoo(_params(), **{name: value})


@pytest.mark.parametrize("name, value, hint", FOREIGN_KEYWORDS[:6],
                         ids=[row[0] for row in FOREIGN_KEYWORDS[:6]])
def test_other_optimizers_hyperparameters_in_a_param_group_are_refused(name, value, hint):
    first, second = _params(0), _params(1)
    with pytest.raises(TypeError, match=rf"param group 1: '{name}' is not a Shampoo "
                       rf"hyperparameter: {hint}"):
        Shampoo([{"params": first}, {"params": second, name: value}])
    opt = Shampoo(first)
    with pytest.raises(TypeError, match=rf"param group 1: '{name}'"):
        opt.add_param_group({"params": second, name: value})
    assert len(opt.param_groups) == 1
    # The check keeps the real signature for help() and type checkers.
    assert "block_size" in inspect.signature(Shampoo).parameters


# --------------------------------------------------------------------- a tensor lr
def test_a_tensor_lr_is_accepted_and_follows_a_scheduler():
    as_tensor, as_float = _params(), _params()
    lr = torch.tensor(0.02)
    optimizers = [Shampoo(as_tensor, lr=lr, precondition_frequency=2),
                  Shampoo(as_float, lr=0.02, precondition_frequency=2)]
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
                  for o in optimizers]
    for step in range(4):
        for params, opt, scheduler in zip((as_tensor, as_float), optimizers, schedulers):
            _grads(params, seed=10 + step)
            opt.step()
            scheduler.step()
    assert optimizers[0].param_groups[0]["lr"] is lr  # updated in place, as in torch.optim
    assert lr.item() == pytest.approx(0.02 * 0.5**4)
    for a, b in zip(as_tensor, as_float):
        assert torch.equal(a, b)


@pytest.mark.parametrize("lr, message", [
    (torch.tensor([0.1, 0.2]), r"lr must be a finite real number or a one-element real "
                               r"tensor, got a torch.float32 tensor of shape \(2,\)"),
    (torch.tensor(True), r"lr must be .* got a torch.bool tensor"),
    (torch.tensor(0.1 + 0j), r"lr must be .* got a torch.complex64 tensor"),
    (torch.tensor(-0.1), r"lr must be in \[0(\.0)?, inf\]"),
])
def test_bad_tensor_lrs_are_refused(lr, message):
    with pytest.raises(ValueError, match=message):
        Shampoo(_params(), lr=lr)


# ------------------------------------------------------ an lr the dtype cannot hold
@pytest.mark.parametrize("kwargs, dtype, message", [
    (dict(lr=1e39), torch.float32, r"lr must be at most 3.4e\+37 for the torch.float32 "
                                   r"parameters of param group 0 .* got 1e\+39"),
    # The momentum's bias correction multiplies the step size by up to 1 / (1 - beta1).
    (dict(lr=1e38), torch.float32, r"lr must be at most 3.4e\+37 .*up to 10 lr"),
    (dict(lr=1e38, betas=(0.0, 0.999)), torch.float16, r"at most 6.55e\+04 .*float16"),
    (dict(lr=1e30, weight_decay=1e10), torch.float32, r"lr must be at most 3.4e\+28"),
])
def test_an_lr_the_parameters_dtype_cannot_hold_is_refused_up_front(kwargs, dtype, message):
    with pytest.raises(ValueError, match=message):
        Shampoo(_params(dtype=dtype), **kwargs)


def test_an_lr_set_too_large_later_fails_the_step_before_any_change():
    first, second = _params(0), _params(1)
    opt = Shampoo([{"params": first}, {"params": second}], precondition_frequency=2)
    _grads(first + second, seed=3)
    opt.step()
    opt.param_groups[1]["lr"] = 1e39  # as a buggy scheduler would
    _grads(first + second, seed=4)
    before = optimizer_snapshot(opt)
    with pytest.raises(ValueError, match=r"lr must be at most .* param group 1"):
        opt.step()
    assert_same_state(opt, before)


# ------------------------------------------------------------------ sparse gradients
def test_a_sparse_parameter_is_refused_at_construction():
    sparse = torch.randn(6, 3).to_sparse().requires_grad_()
    with pytest.raises(TypeError, match=r"param group 0, parameter 1 \(shape \(6, 3\)\) is a "
                       r"torch.sparse_coo tensor.*torch.optim.SparseAdam"):
        Shampoo([torch.nn.Parameter(torch.randn(2, 2)), sparse])


def test_a_parameter_with_a_sparse_gradient_is_refused_at_construction():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    embedding(torch.tensor([1, 2, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"param group 1, parameter 0 \(shape \(10, 4\)\) has "
                       r"a sparse gradient.*torch.optim.SparseAdam"):
        Shampoo([{"params": _params()}, {"params": embedding.parameters()}])


def test_a_sparse_gradient_at_step_fails_before_any_group_is_touched():
    dense = _params()
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    opt = Shampoo([{"params": dense}, {"params": embedding.parameters()}],
                  precondition_frequency=2)
    _grads(dense, seed=5)
    opt.step()
    _grads(dense, seed=6)
    embedding(torch.tensor([1, 2, 2])).sum().backward()
    before = optimizer_snapshot(opt)
    with pytest.raises(TypeError, match=r"param group 1, parameter 0 \(shape \(10, 4\)\) has "
                       r"a sparse gradient \(e.g. from nn.Embedding\(sparse=True\)\).*"
                       r"torch.optim.SparseAdam") as error:
        opt.step()
    assert isinstance(error.value, RuntimeError)  # what torch.optim raises for it
    assert_same_state(opt, before)


def test_every_name_the_hints_recommend_is_an_argument_of_ours():
    import re

    from scalable_shampoo.argument_checks import FOREIGN_NAMES

    ours = set(inspect.signature(Shampoo).parameters)
    for foreign, hint in FOREIGN_NAMES.items():
        assert foreign not in ours, foreign
        for recommended in re.findall(r"\buse (\w+)", hint):
            assert recommended in ours, (foreign, recommended)
